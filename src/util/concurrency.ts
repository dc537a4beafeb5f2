/** Concurrency helpers. */

/**
 * Runs `fn` over `items` with at most `limit` at once, preserving result order.
 *
 * After the first failure no further item starts; the ones in flight are waited for, then that
 * first failure is thrown. So when the promise settles, none of the work is still running: a
 * caller that fails can release its lock, close its worker pool or delete its output without
 * deletes, reads or writes of this call still going on behind it (before, the other runners went
 * on through every remaining item after the call had already rejected).
 */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  let failure: { error: unknown } | undefined;
  const run = async () => {
    while (failure === undefined && next < items.length) {
      const i = next++;
      try {
        out[i] = await fn(items[i], i);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
  if (failure !== undefined) throw failure.error;
  return out;
}

/**
 * A budget of bytes in flight: `acquire(n)` waits until n bytes fit (a request larger than the
 * whole budget proceeds alone), `release(n)` gives them back. Bounds memory in pipelines whose
 * items vary in size.
 */
export class ByteBudget {
  readonly limit: number;
  #used = 0;
  readonly #waiting: Array<{ n: number; go: () => void }> = [];

  constructor(limit: number) {
    this.limit = limit;
  }

  acquire(n: number): Promise<void> {
    if (this.#fits(n) && this.#waiting.length === 0) {
      this.#used += n;
      return Promise.resolve();
    }
    return new Promise((go) => this.#waiting.push({ n, go }));
  }

  release(n: number): void {
    this.#used -= n;
    while (this.#waiting.length > 0 && this.#fits(this.#waiting[0].n)) {
      const w = this.#waiting.shift()!;
      this.#used += w.n;
      w.go();
    }
  }

  #fits(n: number): boolean {
    return this.#used === 0 || this.#used + n <= this.limit;
  }
}

/**
 * A fixed set of equally sized shared buffers, handed out one at a time and returned for reuse:
 * memory that is allocated once per operation instead of once per piece of work (so malloc has
 * nothing to fragment), and a bound on the work in flight (callers wait for a free buffer).
 */
export class SharedBufferPool {
  readonly size: number;
  readonly #free: SharedArrayBuffer[];
  readonly #waiting: Array<(b: SharedArrayBuffer) => void> = [];

  constructor(count: number, size: number) {
    this.size = size;
    this.#free = Array.from({ length: count }, () => new SharedArrayBuffer(size));
  }

  acquire(): Promise<SharedArrayBuffer> {
    const b = this.#free.pop();
    return b ? Promise.resolve(b) : new Promise((go) => this.#waiting.push(go));
  }

  release(b: SharedArrayBuffer): void {
    const next = this.#waiting.shift();
    if (next) next(b);
    else this.#free.push(b);
  }
}

/**
 * One SharedArrayBuffer handed out in ranges (first fit, aligned), for buffers that cross
 * threads many times a second. Threads that were given the arena once see a range by its offset;
 * no ArrayBuffer is created, transferred or collected per use. (Each ArrayBuffer a thread
 * receives counts as new external memory for V8, and a gigabyte of them a minute had the main
 * thread's heap marked every ~40 ms: codec-pool.ts batchBuffer.)
 */
export class SharedArena {
  readonly buffer: SharedArrayBuffer;
  readonly #align: number;
  /** Free ranges [start, end), sorted, never adjacent. */
  readonly #free: Array<[number, number]>;

  constructor(bytes: number, align = 4096) {
    this.buffer = new SharedArrayBuffer(bytes);
    this.#align = align;
    this.#free = [[0, bytes]];
  }

  /** The offset of a free range of `bytes`, now taken; undefined when none is free. */
  allocate(bytes: number): number | undefined {
    const size = this.#rounded(bytes);
    const i = this.#free.findIndex(([s, e]) => e - s >= size);
    if (i < 0) return undefined;
    const start = this.#free[i][0];
    if (this.#free[i][1] - start === size) this.#free.splice(i, 1);
    else this.#free[i][0] += size;
    return start;
  }

  /** Gives back a range `allocate` returned (with the same `bytes`). */
  free(offset: number, bytes: number): void {
    const end = offset + this.#rounded(bytes);
    let i = 0;
    while (i < this.#free.length && this.#free[i][0] < offset) i++;
    if ((i > 0 && this.#free[i - 1][1] > offset) || (i < this.#free.length && this.#free[i][0] < end) || end > this.buffer.byteLength) {
      throw new Error(`bug: arena range ${offset}+${bytes} is not in use`);
    }
    const joinsBefore = i > 0 && this.#free[i - 1][1] === offset;
    const joinsAfter = i < this.#free.length && this.#free[i][0] === end;
    if (joinsBefore && joinsAfter) {
      this.#free[i - 1][1] = this.#free[i][1];
      this.#free.splice(i, 1);
    } else if (joinsBefore) {
      this.#free[i - 1][1] = end;
    } else if (joinsAfter) {
      this.#free[i][0] = offset;
    } else {
      this.#free.splice(i, 0, [offset, end]);
    }
  }

  /** Bytes free in all (for tests and diagnostics). */
  get freeBytes(): number {
    return this.#free.reduce((n, [s, e]) => n + e - s, 0);
  }

  #rounded(bytes: number): number {
    return Math.max(this.#align, Math.ceil(bytes / this.#align) * this.#align);
  }
}

/**
 * Like Promise.all, but settles only once every promise has: then rejects with the first
 * rejection, if any. For work that writes into a caller's buffer, so that when it fails, nothing
 * still writes into memory the caller then reuses.
 */
export async function allSettledOrThrow(promises: Array<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
}
