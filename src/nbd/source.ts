/**
 * A DiskSource over an NBD export (one connection or a pool): reads go to the server; extents
 * come from NBD block status.
 *
 * - `base:allocation`: ZERO set → 'zero' (reads as zeros without reading); otherwise 'data'.
 *   HOLE without ZERO is deliberately 'data': the spec says such ranges have undefined contents,
 *   so only a read tells what the guest would see. Without the context everything is 'data'.
 * - With `dirtyBitmap` (`qemu:dirty-bitmap:NAME`): ranges the bitmap marks clean are
 *   'unchanged'. The bitmap context must have been granted; otherwise construction fails —
 *   silently treating everything as dirty would hide a broken setup, and treating anything as
 *   clean without the bitmap would make a wrong incremental.
 */
import type { DiskSource, Extent, ExtentKind } from '../image/disk.ts';
import {
  AllocationFlag, BASE_ALLOCATION, DIRTY_BITMAP_FLAG_DIRTY, DIRTY_BITMAP_PREFIX, NbdError, NbdReaderPool,
} from './client.ts';
import type { BlockStatusExtent, NbdConnectOptions, NbdReader, NbdTarget } from './client.ts';

export interface NbdDiskSourceOptions {
  /** Metadata context of a dirty bitmap, e.g. `qemu:dirty-bitmap:backup-vda`. */
  dirtyBitmap?: string;
  /** Block status is asked for this many bytes at a time, which bounds memory. Default 1 GiB. */
  statusWindow?: number;
}

const DEFAULT_STATUS_WINDOW = 2 ** 30;

export class NbdDiskSource implements DiskSource {
  readonly format = 'nbd';
  readonly reader: NbdReader;
  readonly dirtyBitmap: string | undefined;
  private readonly hasAllocation: boolean;
  private readonly statusWindow: number;
  private readonly windows = new Map<number, Promise<Extent[]>>();

  /** Takes ownership of `reader`: close() closes it. */
  constructor(reader: NbdReader, options: NbdDiskSourceOptions = {}) {
    const { dirtyBitmap, statusWindow = DEFAULT_STATUS_WINDOW } = options;
    if (!Number.isSafeInteger(statusWindow) || statusWindow <= 0) {
      throw new NbdError('nbd-usage', `statusWindow must be a positive integer, got ${statusWindow}`);
    }
    if (dirtyBitmap !== undefined) {
      if (!dirtyBitmap.startsWith(DIRTY_BITMAP_PREFIX) || dirtyBitmap.length === DIRTY_BITMAP_PREFIX.length) {
        throw new NbdError('nbd-usage', `dirty bitmap context "${dirtyBitmap}" must look like ${DIRTY_BITMAP_PREFIX}NAME`);
      }
      if (!reader.contexts.has(dirtyBitmap)) {
        const granted = [...reader.contexts.keys()].join(', ') || 'none';
        throw new NbdError('nbd-context-missing',
          `NBD export ${reader.description} does not provide dirty bitmap "${dirtyBitmap}" (granted contexts: ${granted}); an incremental read is impossible`, {
            server: reader.description,
            hint: 'ask for the context when connecting and export the bitmap (libvirt backup with <incremental>, or qemu-nbd -B NAME); otherwise do a full read',
          });
      }
    }
    this.reader = reader;
    this.dirtyBitmap = dirtyBitmap;
    this.hasAllocation = reader.contexts.has(BASE_ALLOCATION);
    this.statusWindow = statusWindow;
  }

  /** Connects (over `connections` connections, default 1) asking for base:allocation and the bitmap. */
  static async open(target: NbdTarget, options: NbdConnectOptions & NbdDiskSourceOptions & { connections?: number }): Promise<NbdDiskSource> {
    const metaContexts = [BASE_ALLOCATION, ...(options.dirtyBitmap === undefined ? [] : [options.dirtyBitmap])];
    const pool = await NbdReaderPool.open(target, { ...options, metaContexts, connections: options.connections ?? 1 });
    try {
      return new NbdDiskSource(pool, options);
    } catch (err) {
      await pool.close();
      throw err;
    }
  }

  get size(): number {
    return this.reader.size;
  }

  get description(): string {
    return this.reader.description;
  }

  /**
   * Extents come from block status over whole aligned windows of `statusWindow` bytes, each
   * asked once and kept while the caller walks forward: a backup asks about every 2 MiB batch,
   * and one round trip (two with a dirty bitmap) per batch would dominate an incremental.
   */
  async *extents(offset: number, length: number): AsyncIterable<Extent> {
    this.checkRange(offset, length);
    const end = offset + length;
    let pending: Extent | undefined;
    for (let index = Math.floor(offset / this.statusWindow); index * this.statusWindow < end; index++) {
      const extents = await this.windowExtents(index);
      // The window's extents are in order and touch: start at the one holding `offset` (a
      // backup asks for 2 MiB at a time from a window of thousands), stop past `end`.
      for (let i = firstEndingAfter(extents, offset); i < extents.length && extents[i].offset < end; i++) {
        const extent = extents[i];
        const from = Math.max(extent.offset, offset);
        const to = Math.min(extent.offset + extent.length, end);
        if (to <= from) continue;
        if (pending !== undefined && pending.kind === extent.kind && pending.offset + pending.length === from) {
          pending.length += to - from;
          continue;
        }
        if (pending !== undefined) yield pending;
        pending = { offset: from, length: to - from, kind: extent.kind };
      }
    }
    if (pending !== undefined) yield pending;
  }

  private windowExtents(index: number): Promise<Extent[]> {
    let window = this.windows.get(index);
    if (window === undefined) {
      const start = index * this.statusWindow;
      window = this.classifyWindow(start, Math.min(this.statusWindow, this.size - start));
      window.catch(() => undefined); // awaited by every caller; a failure is theirs to see
      this.windows.set(index, window);
      // Callers walk forward: windows before the previous one are done with.
      for (const k of this.windows.keys()) if (k < index - 1) this.windows.delete(k);
    }
    return window;
  }

  read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    return this.reader.read(offset, length);
  }

  readTo(offset: number, length: number, target: Buffer): Promise<void> {
    this.checkRange(offset, length);
    return this.reader.readInto(offset, length, target);
  }

  close(): Promise<void> {
    return this.reader.close();
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new NbdError('nbd-usage', `NBD export ${this.description}: range of ${length} bytes at offset ${offset} is outside the disk (${this.size} bytes)`, {
        server: this.description,
      });
    }
  }

  private async classifyWindow(offset: number, length: number): Promise<Extent[]> {
    const [allocation, dirty] = await Promise.all([
      this.hasAllocation ? this.reader.blockStatus(BASE_ALLOCATION, offset, length) : Promise.resolve([{ offset, length, flags: 0 }]),
      this.dirtyBitmap === undefined ? Promise.resolve(undefined) : this.reader.blockStatus(this.dirtyBitmap, offset, length),
    ]);
    const extents = dirty === undefined
      ? allocation.map((extent) => ({ offset: extent.offset, length: extent.length, kind: allocationKind(extent.flags) }))
      : overlay(allocation, dirty);
    const covered = extents.reduce((sum, extent) => sum + extent.length, 0);
    if (extents[0]?.offset !== offset || covered !== length) {
      // blockStatus() covers exactly what was asked; anything else is a bug, never a guess.
      throw new NbdError('nbd-protocol', `NBD export ${this.description}: block status for ${length} bytes at ${offset} covered ${covered} bytes`, {
        server: this.description,
      });
    }
    return extents;
  }
}

/** Index of the first of `extents` (in order) that ends after `offset`; extents.length if none. */
function firstEndingAfter(extents: Extent[], offset: number): number {
  let lo = 0;
  let hi = extents.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (extents[mid].offset + extents[mid].length <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function allocationKind(flags: number): ExtentKind {
  return (flags & AllocationFlag.zero) !== 0 ? 'zero' : 'data';
}

/**
 * Walks both extent lists (each covers the same range exactly) and cuts where either changes:
 * clean → 'unchanged', dirty → what base:allocation says.
 */
function overlay(allocation: BlockStatusExtent[], dirty: BlockStatusExtent[]): Extent[] {
  const result: Extent[] = [];
  let a = 0;
  let d = 0;
  let position = allocation[0]?.offset ?? 0;
  while (a < allocation.length && d < dirty.length) {
    const alloc = allocation[a] as BlockStatusExtent;
    const bits = dirty[d] as BlockStatusExtent;
    const end = Math.min(alloc.offset + alloc.length, bits.offset + bits.length);
    const kind: ExtentKind = (bits.flags & DIRTY_BITMAP_FLAG_DIRTY) === 0 ? 'unchanged' : allocationKind(alloc.flags);
    const last = result[result.length - 1];
    if (last !== undefined && last.kind === kind) last.length += end - position;
    else result.push({ offset: position, length: end - position, kind });
    position = end;
    if (alloc.offset + alloc.length === end) a++;
    if (bits.offset + bits.length === end) d++;
  }
  return result;
}
