/**
 * Bandwidth limits as wrappers: a token bucket shared by everything one limit covers, and a
 * DiskSource that waits for tokens before each read (bounding the I/O load a backup puts on the
 * guest's storage).
 */
import type { DiskSource, Extent } from '../image/disk.ts';
import { UsageError } from '../util/errors.ts';
import { copyBytes } from '../util/bytes.ts';

export class TokenBucket {
  readonly bytesPerSecond: number;
  #available: number;
  #last = Date.now();
  #queue: Promise<void> = Promise.resolve();

  constructor(bytesPerSecond: number) {
    if (!(bytesPerSecond > 0)) throw new UsageError(`invalid bandwidth limit ${bytesPerSecond}`, 'give a positive rate such as 100M (bytes per second)');
    this.bytesPerSecond = bytesPerSecond;
    // Allow a burst of 1/4 s so small reads are not delayed needlessly.
    this.#available = bytesPerSecond / 4;
  }

  /** Resolves once `bytes` may be transferred; callers are served in order. */
  take(bytes: number): Promise<void> {
    const turn = this.#queue.then(() => this.#wait(bytes));
    this.#queue = turn;
    return turn;
  }

  async #wait(bytes: number): Promise<void> {
    const now = Date.now();
    this.#available = Math.min(this.bytesPerSecond / 4, this.#available + ((now - this.#last) / 1000) * this.bytesPerSecond);
    this.#last = now;
    this.#available -= bytes;
    if (this.#available < 0) {
      await new Promise((r) => setTimeout(r, (-this.#available / this.bytesPerSecond) * 1000));
    }
  }
}

export class RateLimitedSource implements DiskSource {
  readonly #inner: DiskSource;
  readonly #bucket: TokenBucket;

  constructor(inner: DiskSource, bucket: TokenBucket) {
    this.#inner = inner;
    this.#bucket = bucket;
  }

  get size(): number {
    return this.#inner.size;
  }

  get format(): string {
    return this.#inner.format;
  }

  get description(): string {
    return this.#inner.description;
  }

  extents(offset: number, length: number): AsyncIterable<Extent> {
    return this.#inner.extents(offset, length);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    await this.#bucket.take(length);
    return this.#inner.read(offset, length);
  }

  async readTo(offset: number, length: number, target: Buffer): Promise<void> {
    await this.#bucket.take(length);
    if (this.#inner.readTo !== undefined) await this.#inner.readTo(offset, length, target);
    else copyBytes(target, 0, await this.#inner.read(offset, length));
  }

  close(): Promise<void> {
    return this.#inner.close();
  }
}
