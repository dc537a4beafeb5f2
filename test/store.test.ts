/**
 * Blob stores: the contract suite on the local store and on S3Store against a real Ceph radosgw,
 * then what only S3 has (credentials, buckets, a server that dies or stalls), and the retry
 * wrapper.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { S3Client, PutObjectCommand } from '@aws-sdk/client-s3';
import { ExitCode, TresorError } from '../src/util/errors.ts';
import { BlobNotFoundError, StoreError, StoreFullError, type BlobInfo, type BlobStore, type ReadRange } from '../src/store/store.ts';
import { LocalStore } from '../src/store/local.ts';
import { S3Store, openS3Store, parseS3Url, type S3StoreOptions } from '../src/store/s3.ts';
import { withRetries, isTransientStoreError, type RetryEvent } from '../src/store/retry.ts';
import { storeContract } from './store-contract.ts';
import { startCeph, type CephLab } from './lab/ceph.ts';
import { tempDir } from './helpers/tmp.ts';

// One Ceph for the whole file, started when the first test needs it.
let labStarting: Promise<CephLab> | undefined;
function ceph(): Promise<CephLab> {
  labStarting ??= startCeph().then((lab) => {
    console.log(`# Ceph lab started in ${lab.startupMs} ms`);
    return lab;
  });
  return labStarting;
}
// Start it now, in the background, while the local store's tests run; failures surface in the
// tests that await it.
void ceph().catch(() => undefined);
after(async () => {
  if (labStarting !== undefined) await (await labStarting.catch(() => undefined))?.stop();
});

function uniqueBucket(purpose: string): string {
  return `${purpose}-${randomBytes(4).toString('hex')}`;
}

function s3Store(lab: CephLab, bucket: string, prefix: string, extra: Partial<S3StoreOptions> = {}): S3Store {
  return new S3Store({
    bucket,
    prefix,
    endpoint: lab.endpoint,
    region: lab.region,
    credentials: { accessKeyId: lab.accessKeyId, secretAccessKey: lab.secretAccessKey },
    ...extra,
  });
}

async function listAll(store: BlobStore, prefix: string): Promise<BlobInfo[]> {
  const out: BlobInfo[] = [];
  for await (const info of store.list(prefix)) out.push(info);
  return out;
}

/** Everything an error could show anywhere: message, hint, context, cause chain, stack. */
function everythingShown(err: unknown): string {
  const json = err instanceof TresorError ? JSON.stringify(err.toJSON()) : '';
  return `${inspect(err, { depth: Infinity, showHidden: true })}\n${json}\n${(err as Error)?.stack ?? ''}`;
}

async function rejection(p: Promise<unknown> | (() => Promise<unknown>)): Promise<unknown> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (err) {
    return err;
  }
  assert.fail('expected the operation to fail');
}

/** Every store operation once, each expected to fail. */
function everyOperation(store: BlobStore): Array<[string, () => Promise<unknown>]> {
  return [
    ['create', () => store.create('some/blob', Buffer.from('data'))],
    ['read', () => store.read('some/blob')],
    ['read range', () => store.read('some/blob', { offset: 1, length: 2 })],
    ['stat', () => store.stat('some/blob')],
    ['list', () => listAll(store, 'some/')],
    ['delete', () => store.delete('some/blob')],
  ];
}

// ---------------------------------------------------------------------------------------------

storeContract('local filesystem', async () => {
  const dir = await tempDir('tresor-store-');
  return { store: await LocalStore.open(join(dir.path, 'repo'), { create: true }), cleanup: dir.cleanup };
});

storeContract('local filesystem behind withRetries', async () => {
  const dir = await tempDir('tresor-store-');
  return { store: withRetries(await LocalStore.open(join(dir.path, 'repo'), { create: true })), cleanup: dir.cleanup };
});

storeContract('S3 on Ceph radosgw', async () => {
  const lab = await ceph();
  const bucket = uniqueBucket('contract');
  await lab.createBucket(bucket);
  return { store: s3Store(lab, bucket, 'repos/one'), cleanup: async () => {} };
});

// ---------------------------------------------------------------------------------------------

describe('S3 locations', () => {
  it('parseS3Url splits bucket and prefix', () => {
    assert.deepEqual(parseS3Url('s3://backups'), { bucket: 'backups', prefix: '' });
    assert.deepEqual(parseS3Url('s3://backups/'), { bucket: 'backups', prefix: '' });
    assert.deepEqual(parseS3Url('s3://my.backups-2/site-a/tresor/'), { bucket: 'my.backups-2', prefix: 'site-a/tresor' });
  });

  it('parseS3Url rejects what is not a usable S3 location, without repeating credentials', () => {
    for (const url of ['http://backups/x', 's3:/backups', 's3://', 's3://ab', 's3://Backups', 's3://-backups', 's3://back..ups',
      's3://backups/a/../b', 's3://backups/a b', 's3://backups/a//b', 's3://backups?x=1']) {
      assert.throws(() => parseS3Url(url), (err: unknown) => err instanceof TresorError && err.exitCode === ExitCode.usage, url);
    }
    const err = (() => {
      try {
        parseS3Url('s3://AKIDEXAMPLE:wJalrXUtnFEMIK7MDENG@backups/x');
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    assert.ok(err instanceof TresorError);
    assert.ok(!everythingShown(err).includes('wJalrXUtnFEMIK7MDENG'), 'the secret is repeated in the error');
    assert.match(err.hint ?? '', /AWS_SECRET_ACCESS_KEY/);
  });

  it('openS3Store needs credentials from the environment and says which are missing', () => {
    const err = (() => {
      try {
        openS3Store('s3://backups/x', { env: { AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE' } });
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    assert.ok(err instanceof TresorError);
    assert.equal(err.code, 's3-credentials-missing');
    assert.equal(err.exitCode, ExitCode.auth);
    assert.match(err.message, /AWS_SECRET_ACCESS_KEY/);
    assert.doesNotMatch(err.message, /AWS_ACCESS_KEY_ID/);
    assert.throws(() => openS3Store('s3://backups/x', { env: {} }), /AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/);
  });

  it('an endpoint with credentials in it is refused', () => {
    assert.throws(() => openS3Store('s3://backups/x', { endpoint: 'http://user:hunter22@127.0.0.1:7480', env: { AWS_ACCESS_KEY_ID: 'a', AWS_SECRET_ACCESS_KEY: 'b' } }),
      (err: unknown) => err instanceof TresorError && !everythingShown(err).includes('hunter22'));
  });
});

describe('S3Store on Ceph radosgw', () => {
  let lab: CephLab;
  let bucket: string;

  before(async () => {
    lab = await ceph();
    bucket = uniqueBucket('s3store');
    await lab.createBucket(bucket);
  });

  const labEnv = (extra: Record<string, string> = {}) => ({
    AWS_ACCESS_KEY_ID: lab.accessKeyId,
    AWS_SECRET_ACCESS_KEY: lab.secretAccessKey,
    AWS_REGION: lab.region,
    ...extra,
  });

  it('openS3Store takes credentials, region and endpoint from the AWS variables; an endpoint option overrides them', async () => {
    const fromEnv = openS3Store(`s3://${bucket}/env`, { env: labEnv({ AWS_ENDPOINT_URL: lab.endpoint }) });
    assert.equal(fromEnv.location, `s3://${bucket}/env`);
    assert.equal(await fromEnv.create('x', Buffer.from('via env')), true);
    await fromEnv.close();

    // A dead endpoint in the environment, the lab's as the option: the option wins.
    const overridden = openS3Store(`s3://${bucket}/env`, { endpoint: lab.endpoint, env: labEnv({ AWS_ENDPOINT_URL: 'http://127.0.0.1:9' }) });
    assert.deepEqual(await overridden.read('x'), Buffer.from('via env'));
    await overridden.close();

    const s3Specific = openS3Store(`s3://${bucket}/env`, { env: labEnv({ AWS_ENDPOINT_URL: 'http://127.0.0.1:9', AWS_ENDPOINT_URL_S3: lab.endpoint }) });
    assert.deepEqual(await s3Specific.stat('x'), { name: 'x', size: 7 });
    await s3Specific.close();
  });

  it('location is s3://bucket/prefix and holds no secret', async () => {
    const store = s3Store(lab, bucket, '/some/prefix/');
    assert.equal(store.location, `s3://${bucket}/some/prefix`);
    assert.equal(s3Store(lab, bucket, '').location, `s3://${bucket}`);
    assert.ok(!store.location.includes(lab.secretAccessKey) && !store.location.includes(lab.accessKeyId));
    await store.close();
  });

  it('a store sees only its own prefix, and skips objects that are not blobs', async () => {
    const raw = new S3Client({
      endpoint: lab.endpoint, region: lab.region, forcePathStyle: true,
      credentials: { accessKeyId: lab.accessKeyId, secretAccessKey: lab.secretAccessKey },
      requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED',
    });
    try {
      for (const key of ['iso/ok', 'iso/not a blob', 'iso/a//b', 'isolated/x', 'iso-other/y']) {
        await raw.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: Buffer.from(key) }));
      }
    } finally {
      raw.destroy();
    }
    const store = s3Store(lab, bucket, 'iso');
    assert.deepEqual(await listAll(store, ''), [{ name: 'ok', size: 6 }]);
    assert.deepEqual(await store.read('ok'), Buffer.from('iso/ok'));
    const whole = s3Store(lab, bucket, '');
    const names = (await listAll(whole, 'iso')).map((b) => b.name).sort();
    assert.deepEqual(names, ['iso-other/y', 'iso/ok', 'isolated/x']);
    await store.close();
    await whole.close();
  });

  it('wrong secret key: every operation fails with an auth error that names the problem and leaks nothing', async () => {
    const wrongSecret = `Wrong${randomBytes(16).toString('hex')}`;
    const store = s3Store(lab, bucket, 'auth', { credentials: { accessKeyId: lab.accessKeyId, secretAccessKey: wrongSecret } });
    for (const [op, run] of everyOperation(store)) {
      const err = await rejection(run);
      assert.ok(err instanceof StoreError, `${op}: ${String(err)}`);
      assert.equal(err.exitCode, ExitCode.auth, op);
      assert.match(err.message, /secret access key does not match/, op);
      assert.match(err.hint ?? '', /AWS_SECRET_ACCESS_KEY/, op);
      assert.equal(isTransientStoreError(err), false, op);
      const shown = everythingShown(err);
      for (const secret of [wrongSecret, lab.secretAccessKey, lab.accessKeyId]) assert.ok(!shown.includes(secret), `${op} shows a credential`);
      assert.doesNotMatch(shown, /Signature=|StringToSign|SignatureProvided/i, op);
    }
    await store.close();
  });

  it('unknown access key, and a user without rights on the bucket, are told apart', async () => {
    const unknown = s3Store(lab, bucket, 'auth', { credentials: { accessKeyId: 'NOSUCHKEY0123456789X', secretAccessKey: 'x'.repeat(40) } });
    for (const [op, run] of everyOperation(unknown)) {
      const err = await rejection(run);
      assert.ok(err instanceof StoreError && err.exitCode === ExitCode.auth, `${op}: ${String(err)}`);
      assert.match(err.message, /does not know the access key id/, op);
      assert.ok(!everythingShown(err).includes('NOSUCHKEY0123456789X'), `${op} shows the key id`);
    }
    await unknown.close();

    const other = await lab.createUser(`other-${randomBytes(3).toString('hex')}`);
    const stranger = s3Store(lab, bucket, 'auth', { credentials: other });
    for (const [op, run] of everyOperation(stranger)) {
      const err = await rejection(run);
      assert.ok(err instanceof StoreError && err.exitCode === ExitCode.auth, `${op}: ${String(err)}`);
      assert.match(err.message, /denied access/, op);
      assert.ok(!everythingShown(err).includes(other.secretAccessKey), `${op} shows the secret`);
    }
    await stranger.close();
  });

  it('a missing bucket is a clear error with a hint, for every operation', async () => {
    const missing = uniqueBucket('missing');
    const store = s3Store(lab, missing, 'x');
    for (const [op, run] of everyOperation(store)) {
      const err = await rejection(run);
      assert.ok(err instanceof StoreError && !(err instanceof BlobNotFoundError), `${op}: ${String(err)}`);
      assert.match(err.message, new RegExp(`bucket ${missing} does not exist`), op);
      assert.match(err.hint ?? '', /create the bucket/, op);
      assert.equal(isTransientStoreError(err), false, op);
    }
    await store.close();
  });

  it('a full quota is a StoreFullError', async () => {
    const small = uniqueBucket('quota');
    await lab.createBucket(small);
    await lab.setBucketQuota(small, 256 << 10);
    // A body small enough to be sent whole before radosgw answers: its answer always arrives.
    const store = s3Store(lab, small, 'q');
    assert.equal(await store.create('fits', randomBytes(100 << 10)), true);
    await assert.rejects(store.create('too-big', randomBytes(200 << 10)), StoreFullError);
    assert.equal(await store.stat('too-big'), undefined);
    await store.close();
  });

  it('a full quota refusing a large upload is named as a possible cause even when radosgw cuts the answer off', async () => {
    const small = uniqueBucket('quota');
    await lab.createBucket(small);
    await lab.setBucketQuota(small, 1 << 20);
    const store = s3Store(lab, small, 'q');
    assert.equal(await store.create('fits', randomBytes(100 << 10)), true);
    // radosgw answers 403 QuotaExceeded while the 8 MiB are still being sent and closes the
    // connection: the client sees the answer, a cut-off answer, or a broken pipe.
    for (let attempt = 0; attempt < 3; attempt++) {
      const err = await rejection(() => store.create('too-big', randomBytes(8 << 20)));
      if (err instanceof StoreFullError) continue;
      assert.ok(err instanceof StoreError, String(err));
      assert.match(`${err.message} ${err.hint ?? ''}`, /quota/, 'the quota must be named as a possible cause');
    }
    assert.equal(await store.stat('too-big'), undefined);
    await store.close();
  });

  it('radosgw killed during operations: each fails with a transient StoreError, none hangs; after a restart the same store works', async () => {
    const store = s3Store(lab, bucket, 'kill', { connectTimeoutMs: 2000, requestTimeoutMs: 5000, idleTimeoutMs: 3000 });
    const seed = randomBytes(4 << 20);
    assert.equal(await store.create('seed', seed), true);

    const inFlight = [
      ...Array.from({ length: 6 }, (_, i) => store.create(`w${i}`, seed)),
      ...Array.from({ length: 6 }, () => store.read('seed')),
      store.stat('seed'),
      listAll(store, ''),
    ];
    const settling = Promise.allSettled(inFlight);
    await sleep(50); // let the transfers get going
    await lab.killRadosgw();
    const t0 = performance.now();
    const outcomes = await settling;
    assert.ok(performance.now() - t0 < 8000, 'operations hung after radosgw died');
    const failures = outcomes.flatMap((o) => (o.status === 'rejected' ? [o.reason as unknown] : []));
    assert.ok(failures.length > 0, 'radosgw died after everything had finished: the test proves nothing');
    for (const err of failures) {
      assert.ok(err instanceof StoreError, `not a StoreError: ${String(err)}`);
      assert.equal(isTransientStoreError(err), true, err.message);
      assert.ok(!everythingShown(err).includes(lab.secretAccessKey));
    }

    // While it is down: refused connections, immediately.
    for (const [op, run] of everyOperation(store)) {
      const err = await rejection(run);
      assert.ok(err instanceof StoreError && isTransientStoreError(err), `${op}: ${String(err)}`);
      assert.match(err.message, /cannot talk to http:\/\/127\.0\.0\.1/, op);
      assert.match(err.hint ?? '', /running and reachable/, op);
    }

    await lab.restartRadosgw();
    assert.ok((await store.read('seed')).equals(seed));
    assert.equal(await store.create('after-restart', Buffer.from('ok')), true);
    assert.deepEqual(await store.read('after-restart'), Buffer.from('ok'));
    await store.close();
  });

  it('withRetries rides out a radosgw restart', async () => {
    const store = s3Store(lab, bucket, 'ride', { connectTimeoutMs: 2000, requestTimeoutMs: 5000 });
    await store.create('blob', Buffer.from('still here'));
    const retries: RetryEvent[] = [];
    const retrying = withRetries(store, { attempts: 10, baseDelayMs: 100, maxDelayMs: 800, onRetry: (e) => retries.push(e) });
    await lab.killRadosgw();
    const reading = retrying.read('blob');
    const creating = retrying.create('during-outage', Buffer.from('late but stored'));
    await sleep(600);
    await lab.restartRadosgw();
    assert.deepEqual(await reading, Buffer.from('still here'));
    assert.equal(await creating, true);
    assert.deepEqual(await store.read('during-outage'), Buffer.from('late but stored'));
    assert.ok(retries.length >= 2, `expected retries, saw ${retries.length}`);
    assert.ok(retries.every((r) => isTransientStoreError(r.error)));
    await store.close();
  });

  it('a radosgw that stops answering makes operations time out instead of hang', async () => {
    const store = s3Store(lab, bucket, 'stall', { connectTimeoutMs: 1500, requestTimeoutMs: 1500, idleTimeoutMs: 1500 });
    await store.create('blob', Buffer.from('x'));
    lab.pauseRadosgw();
    try {
      const t0 = performance.now();
      const err = await rejection(store.read('blob'));
      const elapsed = performance.now() - t0;
      assert.ok(err instanceof StoreError && isTransientStoreError(err), String(err));
      assert.match(err.message, /did not answer in time/);
      assert.ok(elapsed < 5000, `took ${Math.round(elapsed)} ms`);
    } finally {
      lab.resumeRadosgw();
    }
    assert.deepEqual(await store.read('blob'), Buffer.from('x'));
    await store.close();
  });
});

// ---------------------------------------------------------------------------------------------

type Fault = 'before' | 'after' | 'permanent';

/**
 * Passes calls to a real store, failing the ones told to: 'before' fails without doing anything,
 * 'after' does the work and then loses the answer (as a connection reset would), 'permanent' fails
 * with a non-transient error. Listing can be reordered and fail after a number of names.
 */
class FaultInjector implements BlobStore {
  readonly location: string;
  readonly inner: BlobStore;
  readonly faults: Record<string, Fault[]> = {};
  readonly calls: Record<string, number> = {};
  listOrder: 'ascending' | 'descending' = 'ascending';
  listFailAfter: number[] = [];

  constructor(inner: BlobStore) {
    this.inner = inner;
    this.location = inner.location;
  }

  async #call<T>(op: string, name: string, work: () => Promise<T>): Promise<T> {
    this.calls[op] = (this.calls[op] ?? 0) + 1;
    const fault = this.faults[op]?.shift();
    const lost = (what: string) => new StoreError(`injected ${what} failure of ${op} ${name}`, { context: { transient: true } });
    if (fault === 'permanent') throw new StoreError(`injected permanent failure of ${op} ${name}`);
    if (fault === 'before') throw lost('transient');
    const result = await work();
    if (fault === 'after') throw lost('lost-answer');
    return result;
  }

  create(name: string, data: Uint8Array): Promise<boolean> {
    return this.#call('create', name, () => this.inner.create(name, data));
  }

  read(name: string, range?: ReadRange): Promise<Buffer> {
    return this.#call('read', name, () => this.inner.read(name, range));
  }

  stat(name: string): Promise<BlobInfo | undefined> {
    return this.#call('stat', name, () => this.inner.stat(name));
  }

  delete(name: string): Promise<void> {
    return this.#call('delete', name, () => this.inner.delete(name));
  }

  async *list(prefix: string): AsyncIterable<BlobInfo> {
    this.calls.list = (this.calls.list ?? 0) + 1;
    const all = await listAll(this.inner, prefix);
    all.sort((a, b) => (a.name < b.name ? -1 : 1));
    if (this.listOrder === 'descending') all.reverse();
    const failAfter = this.listFailAfter.shift();
    for (const [i, info] of all.entries()) {
      if (i === failAfter) throw new StoreError('injected listing failure', { context: { transient: true } });
      yield info;
    }
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

describe('withRetries', () => {
  let dir: { path: string; cleanup(): Promise<void> };
  let real: BlobStore;
  const fast = { attempts: 4, baseDelayMs: 1, maxDelayMs: 5 };

  before(async () => {
    dir = await tempDir('tresor-retry-');
    real = await LocalStore.open(dir.path, { create: true });
  });
  after(async () => {
    await real?.close();
    await dir?.cleanup();
  });

  it('retries transient failures of read, stat and delete', async () => {
    await real.create('r/blob', Buffer.from('abc'));
    const faulty = new FaultInjector(real);
    faulty.faults.read = ['before', 'after'];
    faulty.faults.stat = ['before'];
    faulty.faults.delete = ['after', 'before'];
    const events: RetryEvent[] = [];
    const store = withRetries(faulty, { ...fast, onRetry: (e) => events.push(e) });
    assert.deepEqual(await store.read('r/blob'), Buffer.from('abc'));
    assert.deepEqual(await store.stat('r/blob'), { name: 'r/blob', size: 3 });
    await store.delete('r/blob');
    assert.equal(await real.stat('r/blob'), undefined);
    assert.deepEqual(faulty.calls, { read: 3, stat: 2, delete: 3 });
    assert.deepEqual(events.map((e) => `${e.op}#${e.attempt}`), ['read#1', 'read#2', 'stat#1', 'delete#1', 'delete#2']);
  });

  it('does not retry errors that are not transient, and gives up after the attempts allowed', async () => {
    const faulty = new FaultInjector(real);
    faulty.faults.read = ['permanent'];
    const store = withRetries(faulty, fast);
    await assert.rejects(store.read('x'), /injected permanent/);
    assert.equal(faulty.calls.read, 1);
    await assert.rejects(store.read('never/there'), BlobNotFoundError);
    assert.equal(faulty.calls.read, 2);

    faulty.faults.stat = ['before', 'before', 'before', 'before', 'before'];
    await assert.rejects(store.stat('x'), (err: unknown) => isTransientStoreError(err));
    assert.equal(faulty.calls.stat, 4);
  });

  it('create whose first attempt landed but whose answer was lost still resolves true', async () => {
    const faulty = new FaultInjector(real);
    faulty.faults.create = ['after'];
    const store = withRetries(faulty, fast);
    assert.equal(await store.create('c/landed', Buffer.from('mine')), true);
    assert.equal(faulty.calls.create, 2);
    assert.deepEqual(await real.read('c/landed'), Buffer.from('mine'));
  });

  it('create that finds someone else\'s bytes after a failed attempt resolves false', async () => {
    await real.create('c/theirs', Buffer.from('theirs'));
    const faulty = new FaultInjector(real);
    faulty.faults.create = ['after'];
    const store = withRetries(faulty, fast);
    assert.equal(await store.create('c/theirs', Buffer.from('mine!!')), false);
    await real.create('c/theirs-same-size', Buffer.from('abcdef'));
    faulty.faults.create = ['before'];
    assert.equal(await store.create('c/theirs-same-size', Buffer.from('ABCDEF')), false);
    assert.deepEqual(await real.read('c/theirs'), Buffer.from('theirs'));
  });

  it('create without any failure keeps the backend\'s false', async () => {
    await real.create('c/exists', Buffer.from('same'));
    const store = withRetries(new FaultInjector(real), fast);
    assert.equal(await store.create('c/exists', Buffer.from('same')), false);
  });

  it('a listing that fails midway resumes after the last name when names come in order', async () => {
    const names = Array.from({ length: 30 }, (_, i) => `l/${String(i).padStart(2, '0')}`);
    for (const n of names) await real.create(n, Buffer.from(n));
    const faulty = new FaultInjector(real);
    faulty.listFailAfter = [0, 7, 7, 20];
    const store = withRetries(faulty, { ...fast, attempts: 3 });
    const listed = (await listAll(store, 'l/')).map((b) => b.name);
    assert.deepEqual(listed, names);
    assert.equal(faulty.calls.list, 5);
  });

  it('a listing in no particular order that fails midway passes the error on instead of repeating names', async () => {
    const faulty = new FaultInjector(real);
    faulty.listOrder = 'descending';
    faulty.listFailAfter = [5];
    const store = withRetries(faulty, fast);
    await assert.rejects(listAll(store, 'l/'), /injected listing failure/);
    faulty.listFailAfter = [0];
    assert.equal((await listAll(store, 'l/')).length, 30, 'nothing yielded yet: a restart is safe');
  });
});
