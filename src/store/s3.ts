/**
 * S3-compatible object storage blob store: one object per blob, key = `<prefix>/<name>`.
 *
 * - `create` is a single PutObject with `If-None-Match: *`: the server stores the object only if
 *   the key is free and answers 412 otherwise, atomically, so concurrent writers of one name get
 *   exactly one success (verified against Ceph radosgw; servers that ignore the header would
 *   silently overwrite and are not supported). A 409 ConditionalRequestConflict means another
 *   conditional write of the key is still in flight and may yet fail: we ask again until the
 *   server says 200 (ours) or 412 (theirs), so `false` is only ever returned for a blob that
 *   exists. Multipart uploads are never used (radosgw ignores If-None-Match on them).
 * - No retries here (the SDK's are switched off): transient failures — network errors, timeouts,
 *   HTTP 5xx — are StoreErrors with `context.transient = true`, for `withRetries` to retry.
 * - Error messages, hints, context and causes never contain credentials or request signatures:
 *   SDK errors (which carry the server's error document) are never attached as causes.
 * - Every request has timeouts (connect, whole request until the answer, idle socket), so a
 *   server that stops answering makes operations fail instead of hang.
 */
import {
  S3Client,
  PutObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  HeadBucketCommand,
  ListObjectsV2Command,
  DeleteObjectCommand,
  type GetObjectCommandOutput,
} from '@aws-sdk/client-s3';
import { setTimeout as sleep } from 'node:timers/promises';
import { constants as bufferConstants } from 'node:buffer';
import { ExitCode, TresorError, UsageError, type ExitCodeValue } from '../util/errors.ts';
import {
  type BlobInfo, type BlobStore, type ReadRange,
  BlobNotFoundError, StoreError, StoreFullError, validateBlobName, validateRange,
} from './store.ts';

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface S3StoreOptions {
  bucket: string;
  /** Key prefix of the repository inside the bucket, '' for the whole bucket. */
  prefix: string;
  /** Endpoint URL of an S3-compatible service; AWS itself when absent. */
  endpoint?: string;
  /** Default `us-east-1`. */
  region?: string;
  /** When absent, the AWS SDK's default credential chain is used. */
  credentials?: S3Credentials;
  /** Bucket in the path instead of the host name; default: true when `endpoint` is given. */
  forcePathStyle?: boolean;
  /** Milliseconds to establish a connection (default 10 s). */
  connectTimeoutMs?: number;
  /** Milliseconds from sending a request (body included) to the response headers (default 120 s). */
  requestTimeoutMs?: number;
  /** Milliseconds a connection may stay silent while a request or response is under way (default 30 s). */
  idleTimeoutMs?: number;
  /** Concurrent connections (default 64). */
  maxSockets?: number;
}

type Operation = 'create' | 'read' | 'stat' | 'list' | 'delete';

/** A 409 ConditionalRequestConflict is asked again this many times before giving up. */
const CONFLICT_ATTEMPTS = 8;
const DEFAULT_REGION = 'us-east-1';

/** Node/undici error codes of a connection that failed or broke: worth retrying. */
const TRANSIENT_NETWORK_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH',
  'ENETDOWN', 'EHOSTDOWN', 'EAI_AGAIN', 'ERR_STREAM_PREMATURE_CLOSE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED',
]);

/** What we keep from an SDK or network error: no headers, no error document, no secrets. */
interface FailureFacts {
  status: number | undefined;
  s3Code: string | undefined;
  netCode: string | undefined;
  requestId: string | undefined;
  message: string;
}

export class S3Store implements BlobStore {
  readonly location: string;
  readonly bucket: string;
  readonly prefix: string;
  readonly #keyPrefix: string;
  readonly #client: S3Client;
  readonly #endpointLabel: string;
  readonly #secrets: string[];
  #bucketVerified = false;

  constructor(opts: S3StoreOptions) {
    this.bucket = validateBucketName(opts.bucket);
    this.prefix = normalizePrefix(opts.prefix);
    this.#keyPrefix = this.prefix === '' ? '' : `${this.prefix}/`;
    this.location = this.prefix === '' ? `s3://${this.bucket}` : `s3://${this.bucket}/${this.prefix}`;
    const region = opts.region || DEFAULT_REGION;
    this.#endpointLabel = opts.endpoint === undefined ? `AWS S3 (${region})` : checkEndpoint(opts.endpoint);
    this.#secrets = [opts.credentials?.accessKeyId, opts.credentials?.secretAccessKey, opts.credentials?.sessionToken]
      .filter((s): s is string => typeof s === 'string' && s.length >= 4);
    const agent = { keepAlive: true, maxSockets: opts.maxSockets ?? 64 };
    this.#client = new S3Client({
      region,
      endpoint: opts.endpoint,
      forcePathStyle: opts.forcePathStyle ?? opts.endpoint !== undefined,
      credentials: opts.credentials,
      maxAttempts: 1,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: {
        connectionTimeout: opts.connectTimeoutMs ?? 10_000,
        requestTimeout: opts.requestTimeoutMs ?? 120_000,
        throwOnRequestTimeout: true,
        socketTimeout: opts.idleTimeoutMs ?? 30_000,
        httpAgent: agent,
        httpsAgent: agent,
        logger: silentLogger,
      },
    });
  }

  #key(name: string): string {
    return this.#keyPrefix + validateBlobName(name);
  }

  async create(name: string, data: Uint8Array): Promise<boolean> {
    const key = this.#key(name);
    for (let attempt = 1; ; attempt++) {
      try {
        await this.#client.send(new PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: data,
          ContentLength: data.byteLength,
          ContentType: 'application/octet-stream',
          IfNoneMatch: '*',
        }));
        return true;
      } catch (err) {
        const facts = this.#facts(err);
        if (facts.status === 412 || facts.s3Code === 'PreconditionFailed') return false;
        if (facts.status === 409 && facts.s3Code === 'ConditionalRequestConflict') {
          if (attempt < CONFLICT_ATTEMPTS) {
            await sleep(Math.min(1000, 25 * 2 ** attempt));
            continue;
          }
          throw new StoreError(`cannot create ${name} in ${this.location}: another write of the same name stayed in progress on ${this.#endpointLabel}`, {
            hint: 'another Tresor process is writing the same blob; try again',
            context: this.#context('create', name, facts, true),
          });
        }
        throw await this.#fail('create', name, err);
      }
    }
  }

  async read(name: string, range?: ReadRange): Promise<Buffer> {
    const key = this.#key(name);
    validateRange(name, range);
    if (range !== undefined && range.length === 0) return this.#readNothing(name, range);
    let res: GetObjectCommandOutput;
    try {
      res = await this.#client.send(new GetObjectCommand({
        Bucket: this.bucket,
        Key: key,
        Range: range === undefined ? undefined : `bytes=${range.offset}-${range.offset + range.length - 1}`,
      }));
    } catch (err) {
      const facts = this.#facts(err);
      if (facts.s3Code === 'NoSuchKey') throw new BlobNotFoundError(this.location, name);
      if (facts.status === 416 && range !== undefined) throw this.#shortRead(name, range, undefined);
      throw await this.#fail('read', name, err);
    }
    return this.#body(name, range, res);
  }

  /** A zero-length range needs no transfer, only the blob's existence and size. */
  async #readNothing(name: string, range: ReadRange): Promise<Buffer> {
    const info = await this.stat(name);
    if (info === undefined) throw new BlobNotFoundError(this.location, name);
    if (range.offset > info.size) throw this.#shortRead(name, range, info.size);
    return Buffer.alloc(0);
  }

  /** Collects a GetObject body, insisting on exactly the bytes asked for. */
  async #body(name: string, range: ReadRange | undefined, res: GetObjectCommandOutput): Promise<Buffer> {
    const stream = res.Body as (AsyncIterable<Uint8Array> & { destroy?: () => void }) | undefined;
    // A server that ignores Range answers 200 with the whole object: take our slice of it.
    const ignoredRange = range !== undefined && res.$metadata.httpStatusCode === 200;
    if (range !== undefined && !ignoredRange) {
      const start = /^bytes (\d+)-/.exec(res.ContentRange ?? '');
      if (start === null || Number(start[1]) !== range.offset) {
        stream?.destroy?.();
        throw new StoreError(`reading ${name} from ${this.location}: the server answered range ${JSON.stringify(res.ContentRange)} for bytes ${range.offset}+${range.length}`, {
          hint: 'the S3 service does not implement ranged reads correctly',
          context: { location: this.location, blob: name, op: 'read', endpoint: this.#endpointLabel },
        });
      }
    }
    // Content-Length is what this answer carries: for a range that runs past the end, less than asked.
    const expected = res.ContentLength;
    const tooMuch = range !== undefined && !ignoredRange && expected !== undefined && expected > range.length;
    if (tooMuch || (expected !== undefined && (!Number.isSafeInteger(expected) || expected < 0 || expected > bufferConstants.MAX_LENGTH))) {
      stream?.destroy?.();
      throw new StoreError(`reading ${name} from ${this.location}: the server announced an impossible length ${expected}`, {
        hint: 'the S3 service answered a read incorrectly',
        context: { location: this.location, blob: name, op: 'read', endpoint: this.#endpointLabel },
      });
    }
    let data: Buffer;
    try {
      data = await collect(stream, expected);
    } catch (err) {
      if (err instanceof StoreError) {
        throw new StoreError(`reading ${name} from ${this.location}: ${err.message}`, {
          hint: 'the S3 service sent a different number of bytes than it announced; try again, then run `tresor verify`',
          // A body cut short is a transport failure like a reset connection: worth another try.
          context: { location: this.location, blob: name, op: 'read', endpoint: this.#endpointLabel, transient: true },
        });
      }
      throw await this.#fail('read', name, err);
    }
    if (range === undefined) return data;
    const total = ignoredRange ? data.length : Number(/\/(\d+)$/.exec(res.ContentRange ?? '')?.[1] ?? Number.NaN);
    if (ignoredRange) data = data.subarray(range.offset, range.offset + range.length);
    if (data.length < range.length) throw this.#shortRead(name, range, Number.isSafeInteger(total) ? total : undefined);
    return data;
  }

  #shortRead(name: string, range: ReadRange, size: number | undefined): StoreError {
    return new StoreError(`short read of ${name} in ${this.location}: wanted ${range.length} bytes at ${range.offset}, `
      + (size === undefined ? 'the blob ends before that' : `the blob has ${size} bytes`), {
      hint: 'the blob is shorter than its index says (truncated or damaged); run `tresor verify`',
      context: { location: this.location, blob: name, op: 'read', offset: range.offset, length: range.length },
    });
  }

  async stat(name: string): Promise<BlobInfo | undefined> {
    const key = this.#key(name);
    let size: number | undefined;
    try {
      const res = await this.#client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      size = res.ContentLength;
    } catch (err) {
      const facts = this.#facts(err);
      if (facts.status === 404) {
        // A HEAD answer has no body: "no such key" and "no such bucket" look the same.
        await this.#requireBucket('stat', name);
        return undefined;
      }
      throw await this.#fail('stat', name, err);
    }
    if (size === undefined || !Number.isSafeInteger(size) || size < 0) {
      throw new StoreError(`the S3 service gave no valid size for ${name} in ${this.location}`, {
        context: { location: this.location, blob: name, op: 'stat', endpoint: this.#endpointLabel },
      });
    }
    return { name, size };
  }

  async *list(prefix: string): AsyncIterable<BlobInfo> {
    validateListPrefix(prefix);
    let token: string | undefined;
    do {
      let page;
      try {
        page = await this.#client.send(new ListObjectsV2Command({
          Bucket: this.bucket,
          Prefix: this.#keyPrefix + prefix,
          ContinuationToken: token,
        }));
      } catch (err) {
        throw await this.#fail('list', prefix, err);
      }
      for (const object of page.Contents ?? []) {
        const key = object.Key ?? '';
        const name = key.slice(this.#keyPrefix.length);
        // Objects that are not blobs (someone else's files in the bucket) are not ours to report.
        if (!key.startsWith(this.#keyPrefix) || !isBlobName(name)) continue;
        yield { name, size: object.Size ?? 0 };
      }
      const next = page.IsTruncated ? page.NextContinuationToken : undefined;
      if (page.IsTruncated && (next === undefined || next === token)) {
        throw new StoreError(`listing ${this.location}: the S3 service said there are more results but gave no way to get them`, {
          hint: 'the S3 service does not implement ListObjectsV2 paging correctly',
          context: { location: this.location, prefix, op: 'list', endpoint: this.#endpointLabel },
        });
      }
      token = next;
    } while (token !== undefined);
  }

  async delete(name: string): Promise<void> {
    const key = this.#key(name);
    try {
      await this.#client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
    } catch (err) {
      if (this.#facts(err).s3Code === 'NoSuchKey') return;
      throw await this.#fail('delete', name, err);
    }
  }

  async close(): Promise<void> {
    this.#client.destroy();
  }

  /** Throws a clear error unless the bucket exists (checked once per store). */
  async #requireBucket(op: Operation, name: string): Promise<void> {
    if (this.#bucketVerified) return;
    try {
      await this.#client.send(new HeadBucketCommand({ Bucket: this.bucket }));
    } catch (err) {
      if (this.#facts(err).status === 404) throw this.#noSuchBucket(op, name, this.#facts(err));
      throw await this.#fail(op, name, err);
    }
    this.#bucketVerified = true;
  }

  #noSuchBucket(op: Operation, name: string, facts: FailureFacts): StoreError {
    return new StoreError(`bucket ${this.bucket} does not exist on ${this.#endpointLabel} (while trying to ${op} ${name})`, {
      hint: `create the bucket (for example \`aws s3 mb s3://${this.bucket}\`, or with your storage's admin tool) or correct the repository location ${this.location}`,
      context: this.#context(op, name, facts, false),
    });
  }

  /** Extracts the facts of a failure, with every credential removed from the text. */
  #facts(err: unknown): FailureFacts {
    const e = (err ?? {}) as {
      name?: unknown; code?: unknown; message?: unknown; Code?: unknown;
      $metadata?: { httpStatusCode?: unknown; requestId?: unknown };
    };
    const status = typeof e.$metadata?.httpStatusCode === 'number' ? e.$metadata.httpStatusCode : undefined;
    const netCode = typeof e.code === 'string' ? e.code : undefined;
    // The SDK names service exceptions after the S3 error code; "Unknown"/"NotFound" for body-less
    // answers, and plain "Error" when the body was cut off before its code (radosgw closes the
    // connection right after refusing an upload whose body is still being sent).
    let s3Code: string | undefined;
    if (status !== undefined) {
      const named = typeof e.Code === 'string' ? e.Code : typeof e.name === 'string' ? e.name : undefined;
      s3Code = named === 'Unknown' || named === 'UnknownError' || named === 'Error' ? undefined : named;
    }
    const message = this.#redact(typeof e.message === 'string' ? e.message : String(err));
    const requestId = typeof e.$metadata?.requestId === 'string' ? e.$metadata.requestId : undefined;
    return { status, s3Code, netCode: status === undefined ? netCode ?? (e.name === 'TimeoutError' ? 'ETIMEDOUT' : undefined) : undefined, requestId, message };
  }

  #redact(text: string): string {
    let out = text;
    for (const secret of this.#secrets) out = out.split(secret).join('***');
    return out.replace(/(Signature|Credential|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=[^\s,&]+/gi, '$1=***');
  }

  #context(op: Operation, name: string, facts: FailureFacts, transient: boolean): Record<string, unknown> {
    const context: Record<string, unknown> = { location: this.location, op, endpoint: this.#endpointLabel };
    context[op === 'list' ? 'prefix' : 'blob'] = name;
    if (facts.status !== undefined) context.httpStatus = facts.status;
    if (facts.s3Code !== undefined) context.s3Code = facts.s3Code;
    if (facts.netCode !== undefined) context.networkError = facts.netCode;
    if (facts.requestId !== undefined) context.requestId = facts.requestId;
    if (transient) context.transient = true;
    return context;
  }

  /** Maps any failure of an S3 request to a typed, secret-free Tresor error. */
  async #fail(op: Operation, name: string, err: unknown): Promise<Error> {
    if (err instanceof TresorError) return err;
    let facts = this.#facts(err);
    const what = op === 'list' ? `list blobs starting with ${JSON.stringify(name)} in ${this.location}` : `${op} ${name} in ${this.location}`;
    const cause = new Error(facts.s3Code ?? facts.netCode ?? facts.message);
    const make = (message: string, hint: string, transient: boolean, exitCode?: ExitCodeValue) =>
      new StoreError(message, { hint, context: this.#context(op, name, facts, transient), cause, exitCode });

    if (facts.status === undefined) {
      const code = facts.netCode;
      // The SDK names resets "TimeoutError" too; the code tells them apart.
      if (code === 'ETIMEDOUT') {
        return make(`cannot ${what}: ${this.#endpointLabel} did not answer in time`,
          'the S3 service is overloaded, hung or unreachable; check it and try again', true);
      }
      if ((err as { name?: unknown }).name === 'CredentialsProviderError') {
        return make(`cannot ${what}: no S3 credentials found`,
          'set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or configure an AWS profile)', false, ExitCode.auth);
      }
      if (code === undefined) {
        return make(`cannot ${what}: ${facts.message}`, 'an unexpected failure of the S3 client; if it persists, report it with this message', false);
      }
      const transient = TRANSIENT_NETWORK_CODES.has(code);
      return make(`cannot ${what}: cannot talk to ${this.#endpointLabel}: ${facts.message}`,
        code === 'ENOTFOUND'
          ? 'the endpoint host name does not resolve; check --s3-endpoint / AWS_ENDPOINT_URL'
          : op === 'create' && (code === 'EPIPE' || code === 'ECONNRESET')
            // Seen from radosgw: it answers 403 QuotaExceeded while a large upload is still being
            // sent, then closes the connection, and the answer is lost with it.
            ? 'the connection broke while the data was being sent; if this repeats, the service may be refusing uploads (a full bucket or user quota closes the connection this way on Ceph radosgw: check the quota), otherwise check the network'
            : 'check that the S3 service is running and reachable from this host (endpoint URL, firewall, TLS certificate)', transient);
    }

    const status = facts.status;
    if (status === 403 && facts.s3Code === undefined) {
      // HEAD answers carry no error code, and a refused upload's answer may be cut off: a listing
      // request tells what the server objects to.
      facts = { ...facts, s3Code: await this.#diagnoseForbidden() };
      if (op === 'create' && facts.s3Code === 'AccessDenied') {
        // Listing works, so the credentials are good; the upload's own reason was lost.
        return make(`cannot ${what}: ${this.#endpointLabel} refused the upload (HTTP 403; its reason was cut off)`,
          `either the credentials may read but not write bucket ${this.bucket} (check the bucket policy or ACL), or a bucket or user quota is exhausted (check the quota)`, false);
      }
    }
    switch (facts.s3Code) {
      case 'NoSuchBucket':
        return this.#noSuchBucket(op, name, facts);
      case 'QuotaExceeded':
      case 'InsufficientCapacity':
      case 'XMinioStorageFull':
        return new StoreFullError(this.location, name, new Error(`S3 ${facts.s3Code}: the bucket's or user's quota or the storage capacity is exhausted`));
      case 'InvalidAccessKeyId':
        return make(`cannot ${what}: ${this.#endpointLabel} does not know the access key id`,
          'check AWS_ACCESS_KEY_ID (and that the user exists on this S3 service)', false, ExitCode.auth);
      case 'SignatureDoesNotMatch':
        return make(`cannot ${what}: ${this.#endpointLabel} rejected the request signature: the secret access key does not match the access key id`,
          'check AWS_SECRET_ACCESS_KEY', false, ExitCode.auth);
      case 'RequestTimeTooSkewed':
        return make(`cannot ${what}: this host's clock differs too much from ${this.#endpointLabel}'s`,
          'synchronise the clock (NTP) and try again', false, ExitCode.auth);
      case 'ExpiredToken':
      case 'InvalidToken':
      case 'TokenRefreshRequired':
        return make(`cannot ${what}: the session token was rejected (${facts.s3Code})`,
          'renew the temporary credentials (AWS_SESSION_TOKEN)', false, ExitCode.auth);
      case 'AuthorizationHeaderMalformed':
      case 'PermanentRedirect':
      case 'IllegalLocationConstraintException':
        return make(`cannot ${what}: bucket ${this.bucket} is in another region than ${this.#endpointLabel} expects (${facts.s3Code})`,
          'set AWS_REGION to the bucket\'s region', false);
      case 'AccessDenied':
      case 'AllAccessDisabled':
      case 'AccountProblem':
        return make(`cannot ${what}: ${this.#endpointLabel} denied access (${facts.s3Code})`,
          `the credentials are valid but may not ${op === 'create' ? 'write to' : op === 'delete' ? 'delete from' : 'read'} bucket ${this.bucket}; check the user's bucket policy or ACL`,
          false, ExitCode.auth);
      case 'InvalidBucketName':
        return make(`cannot ${what}: ${this.#endpointLabel} rejects the bucket name ${this.bucket}`,
          'use a bucket name of 3-63 lowercase letters, digits, dots and hyphens', false);
      default:
        break;
    }
    if (status >= 500 || facts.s3Code === 'SlowDown' || facts.s3Code === 'RequestTimeout') {
      return make(`cannot ${what}: ${this.#endpointLabel} failed (HTTP ${status}${facts.s3Code ? ` ${facts.s3Code}` : ''})`,
        'the S3 service is overloaded or failing; try again later or check its logs', true);
    }
    if (status === 403) {
      return make(`cannot ${what}: ${this.#endpointLabel} refused the request (HTTP 403)`,
        'check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the user\'s permissions on the bucket', false, ExitCode.auth);
    }
    return make(`cannot ${what}: ${this.#endpointLabel} answered HTTP ${status}${facts.s3Code ? ` ${facts.s3Code}` : ''}`,
      'see the S3 service\'s documentation for this error', false);
  }

  /** The S3 error code behind a body-less 403, from a harmless request that has a body. */
  async #diagnoseForbidden(): Promise<string | undefined> {
    try {
      await this.#client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.#keyPrefix, MaxKeys: 1 }));
      return 'AccessDenied';
    } catch (err) {
      return this.#facts(err).s3Code;
    }
  }
}

/** Reads a stream into one buffer; with `expected`, exactly that many bytes or a StoreError. */
async function collect(stream: AsyncIterable<Uint8Array> & { destroy?: () => void } | undefined, expected: number | undefined): Promise<Buffer> {
  if (stream === undefined) {
    if (expected === undefined || expected === 0) return Buffer.alloc(0);
    throw new StoreError(`got no data instead of ${expected} bytes`);
  }
  if (expected === undefined) {
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    return Buffer.concat(chunks);
  }
  const out = Buffer.allocUnsafe(expected);
  let filled = 0;
  for await (const chunk of stream) {
    if (filled + chunk.byteLength > expected) {
      stream.destroy?.();
      throw new StoreError(`got more than the ${expected} bytes announced`);
    }
    out.set(chunk, filled);
    filled += chunk.byteLength;
  }
  if (filled !== expected) throw new StoreError(`got ${filled} of the ${expected} bytes announced`);
  return out;
}

const silentLogger = { trace() {}, debug() {}, info() {}, warn() {}, error() {} };

function isBlobName(name: string): boolean {
  try {
    validateBlobName(name);
    return true;
  } catch {
    return false;
  }
}

/** A list prefix is any beginning of a valid name: whole segments, then a partial one. */
function validateListPrefix(prefix: string): void {
  const slash = prefix.lastIndexOf('/');
  if (slash >= 0) validateBlobName(prefix.slice(0, slash));
  const partial = prefix.slice(slash + 1);
  if (prefix.length > 1024 || !/^[A-Za-z0-9._-]*$/.test(partial)) validateBlobName(prefix); // throws the standard error
}

const BUCKET_NAME = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

function validateBucketName(bucket: string): string {
  if (!BUCKET_NAME.test(bucket) || bucket.includes('..')) {
    throw new UsageError(`invalid S3 bucket name ${JSON.stringify(bucket)}`,
      'bucket names have 3-63 characters: lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit');
  }
  return bucket;
}

function normalizePrefix(prefix: string): string {
  const trimmed = prefix.replace(/^\/+|\/+$/g, '');
  if (trimmed === '') return '';
  if (!isBlobName(trimmed) || trimmed.length > 512) {
    throw new UsageError(`invalid S3 key prefix ${JSON.stringify(trimmed)}`,
      'use /-separated segments of letters, digits, dot, underscore and hyphen, for example s3://bucket/tresor/site-a');
  }
  return trimmed;
}

/** Returns a printable endpoint; refuses credentials embedded in it. */
function checkEndpoint(endpoint: string): string {
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    throw new UsageError('the S3 endpoint is not a URL', 'give it as http(s)://HOST[:PORT], for example https://s3.example.com');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new UsageError(`the S3 endpoint must be an http:// or https:// URL, not ${url.protocol}`, 'give it as http(s)://HOST[:PORT]');
  }
  if (url.username !== '' || url.password !== '') {
    throw new UsageError('the S3 endpoint URL must not contain credentials', 'put them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead');
  }
  return url.origin + (url.pathname === '/' ? '' : url.pathname);
}

/** Splits `s3://BUCKET` or `s3://BUCKET/PREFIX` into its parts. */
export function parseS3Url(url: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/?#]*)(?:\/([^?#]*))?$/.exec(url);
  if (m === null) {
    // The text may hold credentials someone pasted in; do not repeat it.
    throw new UsageError('not an S3 location: it must look like s3://BUCKET or s3://BUCKET/PREFIX',
      'credentials belong in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint in --s3-endpoint or AWS_ENDPOINT_URL');
  }
  if (m[1].includes('@') || m[1].includes(':')) {
    throw new UsageError('an S3 location must not contain credentials or a port',
      'write s3://BUCKET/PREFIX; credentials go in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint in --s3-endpoint or AWS_ENDPOINT_URL');
  }
  return { bucket: validateBucketName(m[1]), prefix: normalizePrefix(m[2] ?? '') };
}

export interface OpenS3Options {
  /** Overrides AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. */
  endpoint?: string;
  /** Where to read the AWS variables; default `process.env`. */
  env?: Record<string, string | undefined>;
  /** Passed through to `S3Store` (timeouts, connections). */
  tuning?: Pick<S3StoreOptions, 'connectTimeoutMs' | 'requestTimeoutMs' | 'idleTimeoutMs' | 'maxSockets'>;
}

/**
 * Opens `s3://BUCKET/PREFIX` with the standard AWS environment: AWS_ACCESS_KEY_ID,
 * AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION and
 * AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. With an endpoint, buckets are addressed path-style.
 * Nothing is sent until the first operation.
 */
export function openS3Store(url: string, opts: OpenS3Options = {}): S3Store {
  const { bucket, prefix } = parseS3Url(url);
  const env = opts.env ?? process.env;
  const endpoint = nonEmpty(opts.endpoint) ?? nonEmpty(env.AWS_ENDPOINT_URL_S3) ?? nonEmpty(env.AWS_ENDPOINT_URL);
  const accessKeyId = nonEmpty(env.AWS_ACCESS_KEY_ID);
  const secretAccessKey = nonEmpty(env.AWS_SECRET_ACCESS_KEY);
  if (accessKeyId === undefined || secretAccessKey === undefined) {
    const missing = [accessKeyId === undefined ? 'AWS_ACCESS_KEY_ID' : '', secretAccessKey === undefined ? 'AWS_SECRET_ACCESS_KEY' : ''].filter(Boolean);
    throw new TresorError('s3-credentials-missing', `no S3 credentials for ${bucket}: ${missing.join(' and ')} ${missing.length > 1 ? 'are' : 'is'} not set`, {
      hint: 'export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_REGION, AWS_ENDPOINT_URL for non-AWS services)',
      exitCode: ExitCode.auth,
    });
  }
  return new S3Store({
    bucket,
    prefix,
    endpoint,
    region: nonEmpty(env.AWS_REGION) ?? nonEmpty(env.AWS_DEFAULT_REGION),
    credentials: { accessKeyId, secretAccessKey, sessionToken: nonEmpty(env.AWS_SESSION_TOKEN) },
    forcePathStyle: endpoint !== undefined,
    ...opts.tuning,
  });
}

function nonEmpty(s: string | undefined): string | undefined {
  return s === undefined || s === '' ? undefined : s;
}
