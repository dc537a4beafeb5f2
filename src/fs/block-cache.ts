/**
 * A small LRU block cache in front of a BlockDevice, plus bounds-checked device slices.
 *
 * Filesystem readers make many small reads (a superblock, a group descriptor, an inode, a
 * directory block) that often hit the same regions. Over a snapshot-backed device every miss is
 * a fetch from the repository, so the cache keeps recently used aligned blocks, coalesces the
 * missing blocks of one request into one read per contiguous run, and shares in-flight fetches
 * between concurrent requests. Large reads (file data) bypass the cache so that they do not
 * evict the metadata everyone needs.
 */
import { BadInputError } from '../util/errors.ts';
import type { BlockDevice } from './filesystem.ts';

export interface BlockCacheOptions {
  /** Cache granularity in bytes (power of two, >= 512). */
  blockSize?: number;
  /** Upper bound of cached bytes. */
  maxBytes?: number;
}

const DEFAULT_BLOCK = 64 * 1024;
const DEFAULT_MAX = 8 * 1024 * 1024;

/** Throws unless [offset, offset+length) is a valid range of a device of `size` bytes. */
export function checkRange(what: string, size: number, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0
    || offset + length > size) {
    throw new BadInputError('device_range', `${what}: read of ${length} bytes at ${offset} is outside the ` +
      `device (${size} bytes)`, {
      context: { offset, length, size },
      hint: 'a pointer in the guest disk is out of range: the disk image is damaged or truncated',
    });
  }
}

export function cachedDevice(dev: BlockDevice, options: BlockCacheOptions = {}): BlockDevice {
  return new CachedDevice(dev, options.blockSize ?? DEFAULT_BLOCK, options.maxBytes ?? DEFAULT_MAX);
}

class CachedDevice implements BlockDevice {
  readonly size: number;
  private readonly blocks = new Map<number, Buffer>();
  private readonly inFlight = new Map<number, Promise<Buffer>>();
  private readonly maxBlocks: number;
  private readonly inner: BlockDevice;
  private readonly blockSize: number;

  constructor(inner: BlockDevice, blockSize: number, maxBytes: number) {
    if (!Number.isInteger(blockSize) || blockSize < 512 || (blockSize & (blockSize - 1)) !== 0) {
      throw new BadInputError('cache_block_size', `cache block size ${blockSize} is not a power of two >= 512`);
    }
    this.inner = inner;
    this.blockSize = blockSize;
    this.size = inner.size;
    this.maxBlocks = Math.max(4, Math.floor(maxBytes / blockSize));
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange('cached device', this.size, offset, length);
    if (length === 0) return Buffer.alloc(0);
    if (length > (this.maxBlocks * this.blockSize) / 4) return this.inner.read(offset, length);
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    const pieces = await this.getBlocks(first, last);
    if (pieces.length === 1) {
      const start = offset - first * this.blockSize;
      // A copy: callers may modify what they get (e.g. zero a checksum field to verify it).
      return Buffer.from(pieces[0].subarray(start, start + length));
    }
    const out = Buffer.allocUnsafe(length);
    let written = 0;
    for (let i = 0; i < pieces.length; i++) {
      const blockStart = (first + i) * this.blockSize;
      const from = Math.max(offset, blockStart) - blockStart;
      const to = Math.min(offset + length, blockStart + pieces[i].length) - blockStart;
      pieces[i].copy(out, written, from, to);
      written += to - from;
    }
    return out;
  }

  private async getBlocks(first: number, last: number): Promise<Buffer[]> {
    const waits: Array<Promise<Buffer>> = [];
    let runStart = -1;
    for (let b = first; b <= last + 1; b++) {
      const missing = b <= last && !this.blocks.has(b) && !this.inFlight.has(b);
      if (missing) {
        if (runStart < 0) runStart = b;
        continue;
      }
      if (runStart >= 0) {
        this.fetchRun(runStart, b - 1);
        runStart = -1;
      }
    }
    for (let b = first; b <= last; b++) {
      const hit = this.blocks.get(b);
      if (hit) {
        // Refresh LRU position.
        this.blocks.delete(b);
        this.blocks.set(b, hit);
        waits.push(Promise.resolve(hit));
      } else {
        waits.push(this.inFlight.get(b) as Promise<Buffer>);
      }
    }
    return Promise.all(waits);
  }

  /** Starts one read for blocks [from, to] and registers a promise per block. */
  private fetchRun(from: number, to: number): void {
    const start = from * this.blockSize;
    const end = Math.min(this.size, (to + 1) * this.blockSize);
    const whole = this.inner.read(start, end - start);
    for (let b = from; b <= to; b++) {
      const blockStart = b * this.blockSize - start;
      const piece = whole.then((buf) => {
        if (buf.length !== end - start) {
          throw new BadInputError('device_short_read', `device returned ${buf.length} bytes instead of ${end - start}`, {
            context: { offset: start, length: end - start },
          });
        }
        // Copy so a cached block does not pin the whole run's buffer.
        return Buffer.from(buf.subarray(blockStart, Math.min(buf.length, blockStart + this.blockSize)));
      });
      this.inFlight.set(b, piece);
      piece.then((data) => {
        this.inFlight.delete(b);
        this.insert(b, data);
      }, () => {
        this.inFlight.delete(b);
      });
    }
  }

  private insert(block: number, data: Buffer): void {
    this.blocks.set(block, data);
    while (this.blocks.size > this.maxBlocks) {
      const oldest = this.blocks.keys().next().value as number;
      this.blocks.delete(oldest);
    }
  }
}

/** A bounds-checked window [offset, offset+size) of a device. */
export function subDevice(dev: BlockDevice, offset: number, size: number): BlockDevice {
  checkRange('sub-device', dev.size, offset, size);
  return {
    size,
    async read(at: number, length: number): Promise<Buffer> {
      checkRange('partition', size, at, length);
      return dev.read(offset + at, length);
    },
  };
}
