/**
 * The blob store: the only thing the repository layer knows about where bytes live.
 *
 * Contract (every backend implements exactly this, and `test/store-contract.ts` checks it):
 * - Names are relative, '/'-separated, made of [A-Za-z0-9._-] segments; never empty segments,
 *   '.' or '..'. `validateBlobName` enforces this; backends call it on every name.
 * - `create` stores a new blob atomically and only if no blob of that name exists. It resolves
 *   `true` once the blob is durable (fsynced / acknowledged by the server), `false` if the name
 *   already existed (the existing blob is left untouched and `data` is discarded). A reader never
 *   sees a partially written blob. There is no overwrite: blobs are immutable.
 * - `read` returns the whole blob or the exact range asked for. A missing blob is a
 *   `BlobNotFoundError`; a range that ends past the end of the blob is a `StoreError` (short read).
 * - `stat` returns the size, or undefined when the blob does not exist.
 * - `list(prefix)` yields every blob whose name starts with `prefix` (no order promised). Blobs
 *   created or deleted while listing may or may not appear.
 * - `delete` removes a blob; deleting a missing blob is not an error.
 * - Transient failures are retried by wrappers, not inside backends; backends throw `StoreError`
 *   with the operation, the name and a hint.
 * - `parallelCreates` (optional, a hint like restic's `Connections`): how many `create`s are worth
 *   having in flight at once. Writers default to 2; each one in flight holds a pack in memory.
 */
import { TresorError, NotFoundError, ExitCode, type ErrorDetails } from '../util/errors.ts';

export interface BlobInfo {
  name: string;
  size: number;
}

export interface ReadRange {
  offset: number;
  length: number;
}

export interface BlobStore {
  /** Human-readable location, e.g. `/srv/backup` or `s3://bucket/prefix`. Never contains secrets. */
  readonly location: string;
  readonly parallelCreates?: number;
  create(name: string, data: Uint8Array): Promise<boolean>;
  read(name: string, range?: ReadRange): Promise<Buffer>;
  stat(name: string): Promise<BlobInfo | undefined>;
  list(prefix: string): AsyncIterable<BlobInfo>;
  delete(name: string): Promise<void>;
  close(): Promise<void>;
}

export class StoreError extends TresorError {
  constructor(message: string, details: ErrorDetails = {}) {
    super('store', message, details);
  }
}

export class StoreFullError extends TresorError {
  constructor(location: string, name: string, cause?: unknown) {
    super('store-full', `no space left in the repository storage at ${location} while writing ${name}`, {
      hint: 'free space on that filesystem (or run `tresor prune` and `tresor gc`) and run the command again; nothing already stored was lost',
      context: { location, blob: name },
      cause,
      exitCode: ExitCode.noSpace,
    });
  }
}

export class BlobNotFoundError extends NotFoundError {
  constructor(location: string, name: string) {
    super('blob-not-found', `${name} does not exist in the repository at ${location}`, {
      hint: 'the repository is incomplete or damaged; run `tresor verify`',
      context: { location, blob: name },
    });
  }
}

const segment = /^[A-Za-z0-9_-][A-Za-z0-9._-]*$/;

export function validateBlobName(name: string): string {
  const parts = name.split('/');
  if (name.length === 0 || name.length > 1024 || !parts.every((p) => segment.test(p) && p !== '.' && p !== '..')) {
    throw new TresorError('bad-blob-name', `invalid blob name ${JSON.stringify(name)}`, {
      hint: 'this is a bug in Tresor: blob names are generated internally',
    });
  }
  return name;
}

export function validateRange(name: string, range: ReadRange | undefined): void {
  if (range === undefined) return;
  if (!Number.isSafeInteger(range.offset) || !Number.isSafeInteger(range.length) || range.offset < 0 || range.length < 0) {
    throw new StoreError(`invalid read range ${range.offset}+${range.length} for ${name}`);
  }
}
