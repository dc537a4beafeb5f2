/** Concurrency helpers. */

/** Runs `fn` over `items` with at most `limit` at once, preserving result order. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const run = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
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
