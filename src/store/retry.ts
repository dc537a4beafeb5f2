/**
 * Retries of transient store failures, as a wrapper around any BlobStore (backends never retry).
 *
 * Only failures a backend marks transient are retried (`context.transient === true`: network
 * errors, timeouts, HTTP 5xx); everything else — missing blobs, bad names, denied access, full
 * storage — fails at once. Waits grow exponentially with jitter and are bounded.
 *
 * - read, stat, delete: simply repeated (they are idempotent).
 * - create: a request that failed in transit may still have been carried out: the retry then
 *   finds the name taken and the backend says `false`. So after a failed attempt, a `false` is
 *   checked by reading the blob back: if it holds exactly our bytes we report `true` — the blob
 *   is stored as asked. The only other way to get identical bytes is a concurrent writer storing
 *   the same content, which for immutable blobs is the same outcome; a caller that uses `create`
 *   as a mutual exclusion (locks) must therefore put something unique (its own id) in the data.
 *   If the bytes differ, someone else's blob holds the name and `false` stands.
 * - list: a listing that fails before yielding anything starts over. One that fails midway can
 *   resume only if the names came in strictly ascending order (as S3 returns them): the retry
 *   skips every name up to the last one yielded, so no name is reported twice. Otherwise the
 *   error is passed on, since repeating names would break the caller's count.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { TresorError } from '../util/errors.ts';
import type { BlobInfo, BlobStore, ReadRange } from './store.ts';

export interface RetryOptions {
  /** Attempts in total, the first included (default 5). */
  attempts?: number;
  /** Wait before the first retry, doubled for each further one (default 200 ms). */
  baseDelayMs?: number;
  /** Longest wait between attempts (default 5 s). */
  maxDelayMs?: number;
  /** Told about every retry, e.g. for the job log. */
  onRetry?: (event: RetryEvent) => void;
}

export interface RetryEvent {
  op: string;
  name: string;
  /** The attempt that failed (1 = the first). */
  attempt: number;
  delayMs: number;
  error: unknown;
}

/** True for errors that a backend marked as worth trying again. */
export function isTransientStoreError(err: unknown): boolean {
  return err instanceof TresorError && err.context.transient === true;
}

export function withRetries(store: BlobStore, opts: RetryOptions = {}): BlobStore {
  return new RetryingStore(store, opts);
}

class RetryingStore implements BlobStore {
  readonly location: string;
  readonly #inner: BlobStore;
  readonly #attempts: number;
  readonly #baseDelayMs: number;
  readonly #maxDelayMs: number;
  readonly #onRetry: ((event: RetryEvent) => void) | undefined;

  get parallelCreates(): number | undefined {
    return this.#inner.parallelCreates;
  }

  constructor(inner: BlobStore, opts: RetryOptions) {
    this.#inner = inner;
    this.location = inner.location;
    this.#attempts = Math.max(1, Math.floor(opts.attempts ?? 5));
    this.#baseDelayMs = Math.max(0, opts.baseDelayMs ?? 200);
    this.#maxDelayMs = Math.max(this.#baseDelayMs, opts.maxDelayMs ?? 5000);
    this.#onRetry = opts.onRetry;
  }

  /** Waits before retry number `failures` (1-based); throws `err` when retrying is not allowed. */
  async #backOff(op: string, name: string, failures: number, err: unknown): Promise<void> {
    if (!isTransientStoreError(err) || failures >= this.#attempts) throw err;
    const ceiling = Math.min(this.#maxDelayMs, this.#baseDelayMs * 2 ** (failures - 1));
    const delayMs = Math.round(ceiling * (0.5 + Math.random() / 2));
    this.#onRetry?.({ op, name, attempt: failures, delayMs, error: err });
    await sleep(delayMs);
  }

  async #retry<T>(op: string, name: string, attempt: () => Promise<T>, onFailure?: () => void): Promise<T> {
    for (let failures = 1; ; failures++) {
      try {
        return await attempt();
      } catch (err) {
        await this.#backOff(op, name, failures, err);
        onFailure?.();
      }
    }
  }

  async create(name: string, data: Uint8Array): Promise<boolean> {
    let anAttemptMayHaveLanded = false;
    return this.#retry('create', name, async () => {
      const created = await this.#inner.create(name, data);
      if (created || !anAttemptMayHaveLanded) return created;
      return this.#holdsExactly(name, data);
    }, () => {
      anAttemptMayHaveLanded = true;
    });
  }

  async #holdsExactly(name: string, data: Uint8Array): Promise<boolean> {
    const info = await this.#inner.stat(name);
    if (info === undefined || info.size !== data.byteLength) return false;
    const stored = await this.#inner.read(name);
    return Buffer.from(data.buffer, data.byteOffset, data.byteLength).equals(stored);
  }

  read(name: string, range?: ReadRange): Promise<Buffer> {
    return this.#retry('read', name, () => this.#inner.read(name, range));
  }

  stat(name: string): Promise<BlobInfo | undefined> {
    return this.#retry('stat', name, () => this.#inner.stat(name));
  }

  delete(name: string): Promise<void> {
    return this.#retry('delete', name, () => this.#inner.delete(name));
  }

  async *list(prefix: string): AsyncIterable<BlobInfo> {
    let last: string | undefined; // the last name yielded
    let ascending = true; // every name so far came after the one before it
    let failures = 0; // consecutive failures without progress
    for (;;) {
      const resumeAfter = last;
      try {
        for await (const info of this.#inner.list(prefix)) {
          if (resumeAfter !== undefined && info.name <= resumeAfter) continue;
          if (last !== undefined && info.name <= last) ascending = false;
          last = info.name;
          yield info;
        }
        return;
      } catch (err) {
        if (last !== undefined && !ascending) throw err;
        failures = last !== resumeAfter ? 1 : failures + 1;
        await this.#backOff('list', prefix, failures, err);
      }
    }
  }

  close(): Promise<void> {
    return this.#inner.close();
  }
}
