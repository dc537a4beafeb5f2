/**
 * Writes a qcow2 v3 image (refcount_order 4, no backing, no compression) as a DiskWriter.
 *
 * Layout, in the order clusters are appended: cluster 0 is reserved for the header; L2 tables and
 * data clusters follow as writes arrive; at close come the L1 table, the refcount table and the
 * refcount blocks, then the header, which makes the file a qcow2 image only once everything it
 * points to is durable. Every cluster in the file is used exactly once, so every refcount is 1.
 *
 * Memory stays small whatever the virtual size: an L2 entry is written to its (appended) L2 table
 * in the file as soon as its data cluster is allocated, so the writer keeps only the L1 table
 * and the clusters that are partly written so far. All allocation for one write() happens
 * synchronously before its first await, so concurrent writes never race for clusters.
 */
import { open, stat, unlink, type FileHandle } from 'node:fs/promises';
import type { DiskWriter } from './disk.ts';
import { BadInputError, TresorError, isErrno } from '../util/errors.ts';
import { isAllZero } from '../util/bytes.ts';
import { writeAt } from './file-io.ts';
import { checkRange } from './raw.ts';
import {
  ENTRY_COPIED_HI, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, QCOW2_MAGIC, QCOW2_V3_HEADER_LENGTH,
} from './qcow2.ts';

export interface Qcow2WriterOptions {
  /** Power of two from 512 B to 2 MiB; default 64 KiB (QEMU's default). */
  clusterSize?: number;
  compression?: 'none';
  /** Replace an existing regular file (default: refuse). */
  overwrite?: boolean;
}

const DEFAULT_CLUSTER_SIZE = 65536;
const REFCOUNT_ORDER = 4;
const REFCOUNT_BYTES = 2;
const L2_ENTRY_BYTES = 8;

export async function createQcow2Writer(path: string, size: number, opts: Qcow2WriterOptions = {}): Promise<DiskWriter> {
  const clusterSize = opts.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw usage(path, `cluster size ${clusterSize} is not a power of two between 512 and 2 MiB`);
  }
  if ((opts.compression ?? 'none') !== 'none') throw usage(path, `compression '${String(opts.compression)}' is not supported`);
  if (!Number.isSafeInteger(size) || size < 0) throw usage(path, `invalid disk size ${size}`);
  // QEMU sizes disks in 512-byte sectors: a remainder is rounded up, as `qemu-img create` does.
  const headerSize = Math.ceil(size / 512) * 512;
  const l1Size = Math.ceil(headerSize / (clusterSize * (clusterSize / L2_ENTRY_BYTES)));
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw new BadInputError('qcow2_too_large', `${path}: a ${size}-byte disk needs an L1 table larger than QEMU accepts`, {
      context: { file: path, size, clusterSize }, hint: 'use a larger cluster size, or restore to a raw file',
    });
  }
  const fh = await createTarget(path, opts.overwrite === true);
  return new Qcow2Writer(path, fh, size, headerSize, clusterBits, l1Size);
}

function usage(path: string, message: string): TresorError {
  return new TresorError('qcow2_writer_invalid', `${path}: ${message}`, {
    context: { file: path }, hint: 'this is a bug in the caller: report it',
  });
}

async function createTarget(path: string, overwrite: boolean): Promise<FileHandle> {
  const existing = await stat(path).catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) return undefined;
    throw err;
  });
  if (existing !== undefined && !(existing.isFile() && overwrite)) {
    throw new BadInputError('target_exists', `${path} already exists`, {
      context: { file: path }, hint: 'remove it, choose another path, or ask to overwrite it',
    });
  }
  return open(path, existing === undefined ? 'wx' : 'w');
}

/** A guest cluster that has received some but not all of its bytes. */
interface PartialCluster {
  /** File offset, or 0 while everything written to it was zeros. */
  host: number;
  bytesCovered: number;
}

interface PendingWrite {
  position: number;
  data: Uint8Array;
}

class Qcow2Writer implements DiskWriter {
  readonly size: number;
  private readonly path: string;
  private readonly fh: FileHandle;
  private readonly headerSize: number;
  private readonly clusterBits: number;
  private readonly clusterSize: number;
  private readonly l2Entries: number;
  /** File offset of each L1 entry's L2 table, 0 while it has none. */
  private readonly l2Offsets: Float64Array;
  private readonly partial = new Map<number, PartialCluster>();
  /** Next free cluster index in the file; cluster 0 is the header. */
  private nextCluster = 1;
  private readonly inFlight = new Set<Promise<void>>();
  private failure: unknown;
  private finished = false;

  constructor(path: string, fh: FileHandle, size: number, headerSize: number, clusterBits: number, l1Size: number) {
    this.path = path;
    this.fh = fh;
    this.size = size;
    this.headerSize = headerSize;
    this.clusterBits = clusterBits;
    this.clusterSize = 2 ** clusterBits;
    this.l2Entries = this.clusterSize / L2_ENTRY_BYTES;
    this.l2Offsets = new Float64Array(l1Size);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.finished) throw usage(this.path, 'write after close or abort');
    checkRange({ size: this.size, description: this.path }, offset, data.length);
    const pending = this.plan(offset, data);
    const done = this.perform(pending);
    this.inFlight.add(done);
    try {
      await done;
    } catch (err) {
      this.failure ??= err;
      throw err;
    } finally {
      this.inFlight.delete(done);
    }
  }

  /**
   * Allocates clusters and L2 tables for one write and returns the pwrites to do, coalesced:
   * consecutive new clusters are contiguous in the file, and so are their L2 entries.
   * Synchronous on purpose (see the file comment).
   */
  private plan(offset: number, data: Uint8Array): PendingWrite[] {
    const cs = this.clusterSize;
    const end = offset + data.length;
    this.allocateL2Tables(offset, end);
    const dataWrites: PendingWrite[] = [];
    const entries = new L2EntryBatch();
    for (let pos = offset; pos < end;) {
      const clusterIndex = Math.floor(pos / cs);
      const clusterStart = clusterIndex * cs;
      const clusterEnd = Math.min(clusterStart + cs, this.size);
      const stop = Math.min(end, clusterEnd);
      const piece = data.subarray(pos - offset, stop - offset);
      const placement = pos === clusterStart && stop === clusterEnd
        ? this.placeWholeCluster(piece)
        : this.placePartialCluster(clusterIndex, clusterEnd - clusterStart, piece);
      if (placement !== undefined) {
        appendWrite(dataWrites, placement.host + (pos - clusterStart), piece);
        if (placement.isNew) entries.add(this.l2EntryPosition(clusterIndex), placement.host);
      }
      pos = stop;
    }
    return [...dataWrites, ...entries.writes()];
  }

  /** Where a cluster written whole goes; undefined when it is all zeros (left unallocated). */
  private placeWholeCluster(piece: Uint8Array): Placement | undefined {
    return isAllZero(piece) ? undefined : { host: this.allocateCluster(), isNew: true };
  }

  /**
   * Where part of a cluster goes. Non-overlapping writes may fill one cluster in several pieces:
   * the first non-zero piece allocates it, the others land in it; zero pieces of a cluster still
   * unallocated need nothing (an unwritten part of an allocated cluster is a hole: zeros).
   */
  private placePartialCluster(clusterIndex: number, clusterBytes: number, piece: Uint8Array): Placement | undefined {
    let state = this.partial.get(clusterIndex);
    if (state === undefined) {
      state = { host: 0, bytesCovered: 0 };
      this.partial.set(clusterIndex, state);
    }
    state.bytesCovered += piece.length;
    // Once every byte has arrived nothing else can land in this cluster: forget it.
    if (state.bytesCovered >= clusterBytes) this.partial.delete(clusterIndex);
    if (isAllZero(piece)) return undefined;
    if (state.host !== 0) return { host: state.host, isNew: false };
    state.host = this.allocateCluster();
    return { host: state.host, isNew: true };
  }

  private allocateCluster(): number {
    return this.nextCluster++ * this.clusterSize;
  }

  private allocateL2Tables(from: number, to: number): void {
    const bytesPerL2 = this.clusterSize * this.l2Entries;
    for (let l1Index = Math.floor(from / bytesPerL2); l1Index * bytesPerL2 < to; l1Index++) {
      if (this.l2Offsets[l1Index] === 0) this.l2Offsets[l1Index] = this.allocateCluster();
    }
  }

  private l2EntryPosition(clusterIndex: number): number {
    const l1Index = Math.floor(clusterIndex / this.l2Entries);
    return this.l2Offsets[l1Index] + (clusterIndex % this.l2Entries) * L2_ENTRY_BYTES;
  }

  private async perform(writes: PendingWrite[]): Promise<void> {
    for (const w of writes) await writeAt(this.fh, w.data, w.position);
  }

  async close(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    try {
      await Promise.allSettled([...this.inFlight]);
      if (this.failure !== undefined) {
        throw new TresorError('qcow2_write_failed', `${this.path}: a write failed, the image is incomplete`, {
          context: { file: this.path }, cause: this.failure, hint: 'fix the cause of the failed write and restore again',
        });
      }
      await this.writeMetadata();
    } catch (err) {
      await this.fh.close().catch(() => undefined);
      await unlink(this.path).catch(() => undefined);
      throw err;
    }
    await this.fh.close();
  }

  async abort(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    await Promise.allSettled([...this.inFlight]);
    await this.fh.close().catch(() => undefined);
    await unlink(this.path).catch((err: unknown) => {
      if (!isErrno(err, 'ENOENT')) throw err;
    });
  }

  /** L1 table, refcounts, then (after an fsync) the header that makes it all visible. */
  private async writeMetadata(): Promise<void> {
    const cs = this.clusterSize;
    // An empty disk (L1 size 0) has no L1 table: a cluster for it would be a leak to `qemu-img check`.
    const l1Clusters = Math.ceil(this.l2Offsets.length * 8 / cs);
    const l1Offset = l1Clusters === 0 ? 0 : this.nextCluster * cs;
    this.nextCluster += l1Clusters;
    if (l1Clusters > 0) await writeAt(this.fh, this.l1Table(l1Clusters), l1Offset);

    const layout = refcountLayout(this.nextCluster, cs);
    const tableOffset = this.nextCluster * cs;
    const firstBlock = this.nextCluster + layout.tableClusters;
    const table = Buffer.alloc(layout.tableClusters * cs);
    for (let i = 0; i < layout.blocks; i++) writeU64(table, i * 8, (firstBlock + i) * cs, 0);
    await writeAt(this.fh, table, tableOffset);
    const entriesPerBlock = cs / REFCOUNT_BYTES;
    const block = Buffer.alloc(cs);
    for (let i = 0; i < layout.blocks; i++) {
      // Every cluster below totalClusters is in use exactly once: refcount 1.
      const used = Math.min(entriesPerBlock, layout.totalClusters - i * entriesPerBlock);
      block.fill(0);
      for (let e = 0; e < used; e++) block.writeUInt16BE(1, e * REFCOUNT_BYTES);
      await writeAt(this.fh, block, (firstBlock + i) * cs);
    }
    this.nextCluster = layout.totalClusters;
    await this.fh.truncate(layout.totalClusters * cs);
    await this.fh.sync();
    await writeAt(this.fh, this.header(l1Offset, tableOffset, layout.tableClusters), 0);
    await this.fh.sync();
  }

  private l1Table(clusters: number): Buffer {
    const l1 = Buffer.alloc(clusters * this.clusterSize);
    this.l2Offsets.forEach((offset, i) => {
      if (offset !== 0) writeU64(l1, i * 8, offset, ENTRY_COPIED_HI);
    });
    return l1;
  }

  private header(l1Offset: number, refcountTableOffset: number, refcountTableClusters: number): Buffer {
    const h = Buffer.alloc(QCOW2_V3_HEADER_LENGTH + 8); // + the end-of-extensions marker (zeros)
    h.writeUInt32BE(QCOW2_MAGIC, 0);
    h.writeUInt32BE(3, 4);
    // 8: backing_file_offset, 16: backing_file_size: none
    h.writeUInt32BE(this.clusterBits, 20);
    writeU64(h, 24, this.headerSize, 0);
    // 32: crypt_method: none
    h.writeUInt32BE(this.l2Offsets.length, 36);
    writeU64(h, 40, l1Offset, 0);
    writeU64(h, 48, refcountTableOffset, 0);
    h.writeUInt32BE(refcountTableClusters, 56);
    // 60: nb_snapshots, 64: snapshots_offset, 72..95: feature bits: none
    h.writeUInt32BE(REFCOUNT_ORDER, 96);
    h.writeUInt32BE(QCOW2_V3_HEADER_LENGTH, 100);
    // 104: compression_type deflate (0), then padding
    return h;
  }
}

interface Placement {
  host: number;
  /** The cluster was allocated by this write: its L2 entry must be written. */
  isNew: boolean;
}

/** Appends a pwrite, or extends the previous one when it ends exactly where this one starts. */
function appendWrite(writes: PendingWrite[], position: number, data: Uint8Array): void {
  const last = writes.length > 0 ? writes[writes.length - 1] : undefined;
  if (last !== undefined && last.position + last.data.length === position
    && last.data.buffer === data.buffer && last.data.byteOffset + last.data.length === data.byteOffset) {
    last.data = new Uint8Array(data.buffer, last.data.byteOffset, last.data.length + data.length);
    return;
  }
  writes.push({ position, data });
}

/** L2 entries to write, grouped into runs of consecutive slots. */
class L2EntryBatch {
  private readonly runs: Array<{ position: number; hosts: number[] }> = [];

  add(position: number, host: number): void {
    const last = this.runs.length > 0 ? this.runs[this.runs.length - 1] : undefined;
    if (last !== undefined && last.position + last.hosts.length * L2_ENTRY_BYTES === position) last.hosts.push(host);
    else this.runs.push({ position, hosts: [host] });
  }

  writes(): PendingWrite[] {
    return this.runs.map(({ position, hosts }) => {
      const buf = Buffer.alloc(hosts.length * L2_ENTRY_BYTES);
      hosts.forEach((host, i) => writeU64(buf, i * L2_ENTRY_BYTES, host, ENTRY_COPIED_HI));
      return { position, data: buf };
    });
  }
}

/**
 * Number of refcount blocks and refcount table clusters needed when `usedClusters` clusters are
 * in use before them: they must also count themselves, hence the fixed point.
 */
export function refcountLayout(usedClusters: number, clusterSize: number): { blocks: number; tableClusters: number; totalClusters: number } {
  const entriesPerBlock = clusterSize / REFCOUNT_BYTES;
  let blocks = 0;
  let tableClusters = 0;
  for (;;) {
    const totalClusters = usedClusters + blocks + tableClusters;
    const neededBlocks = Math.ceil(totalClusters / entriesPerBlock);
    const neededTable = Math.ceil(neededBlocks * 8 / clusterSize);
    if (neededBlocks === blocks && neededTable === tableClusters) return { blocks, tableClusters, totalClusters };
    blocks = neededBlocks;
    tableClusters = neededTable;
  }
}

/** Writes a u64 offset (< 2^56) big-endian, OR-ing `flagsHi` into the top 32 bits. */
function writeU64(buf: Buffer, at: number, value: number, flagsHi: number): void {
  buf.writeUInt32BE((Math.floor(value / 2 ** 32) | flagsHi) >>> 0, at);
  buf.writeUInt32BE(value % 2 ** 32, at + 4);
}
