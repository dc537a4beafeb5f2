/**
 * Logical-to-physical block mapping of ext2/3/4 files: extent trees (ext4) and indirect block
 * maps (ext2/3). Both walkers only descend into the parts of the tree that cover the requested
 * range, check every pointer against the filesystem (bounds, metadata overlap) before following
 * it, refuse a node reached twice (a loop or a shared subtree in a hostile image) and bound the
 * depth, so a damaged map is an FsDamageError, never a hang.
 */
import { crc32cUpdate } from '../util/crc32c.ts';
import { damage, hex, INODE_FLAG, has } from './ext4-structures.ts';
import type { Inode, Superblock } from './ext4-structures.ts';

/** A mapped run: logical blocks [lblk, lblk+len) live at physical blocks [pblk, pblk+len). */
export interface BlockRun {
  lblk: number;
  pblk: number;
  len: number;
  /** Allocated but never written (ext4 "unwritten" extent): reads as zeros. */
  uninit: boolean;
}

export interface BlockMapContext {
  readonly fsType: string;
  readonly sb: Superblock;
  readonly metadataCsum: boolean;
  /** Reads one filesystem block (journal overlay applied). */
  readBlock(pblk: number): Promise<Buffer>;
  /** Throws FsDamageError unless [pblk, pblk+len) is inside the filesystem and clear of its metadata. */
  checkRun(ino: number, pblk: number, len: number, structure: string): Promise<void>;
}

const EXTENT_MAGIC = 0xf30a;
const MAX_EXTENT_DEPTH = 5;
/** Logical block numbers are 32 bits. */
const LOGICAL_LIMIT = 2 ** 32;
const INIT_MAX_LEN = 32768;

/** Runs mapping logical blocks [from, to) of the inode, ascending; gaps are holes. */
export async function mapBlocks(ctx: BlockMapContext, inode: Inode, from: number, to: number): Promise<BlockRun[]> {
  if (to <= from) return [];
  if (has(inode.flags, INODE_FLAG.extents)) return mapExtents(ctx, inode, from, Math.min(to, LOGICAL_LIMIT));
  return mapIndirect(ctx, inode, from, to);
}

/** Largest file (in blocks) an indirect block map can describe. */
export function indirectMapLimit(blockSize: number): number {
  const k = blockSize / 4;
  return 12 + k + k * k + k * k * k;
}

// ---------------------------------------------------------------------------------------------
// Extent trees

interface WalkState {
  ctx: BlockMapContext;
  inode: Inode;
  from: number;
  to: number;
  out: BlockRun[];
  visited: Set<number>;
}

async function mapExtents(ctx: BlockMapContext, inode: Inode, from: number, to: number): Promise<BlockRun[]> {
  const state: WalkState = { ctx, inode, from, to, out: [], visited: new Set() };
  await walkExtentNode(state, inode.iblock, undefined, undefined, 0, LOGICAL_LIMIT);
  return state.out;
}

/**
 * Visits one node of the extent tree. `lo`/`hi` is the logical range the parent index assigns to
 * it: every extent below must lie inside, in ascending order without overlap.
 */
async function walkExtentNode(state: WalkState, node: Buffer, nodeBlock: number | undefined,
  expectedDepth: number | undefined, lo: number, hi: number): Promise<void> {
  const { ctx, inode } = state;
  const where = nodeBlock === undefined ? 'extent tree root' : `extent tree block ${nodeBlock}`;
  const fail = (message: string) => damage(ctx.fsType, `${where}: ${message}`, 'extent tree', inode.ino);
  if (node.readUInt16LE(0) !== EXTENT_MAGIC) throw fail('bad magic');
  const entries = node.readUInt16LE(2);
  const max = node.readUInt16LE(4);
  const depth = node.readUInt16LE(6);
  const capacity = Math.floor((node.length - 12) / 12);
  if (max > capacity || entries > max) throw fail(`${entries} entries / ${max} slots exceed the node's ${capacity}`);
  if (depth > MAX_EXTENT_DEPTH) throw fail(`depth ${depth} exceeds ${MAX_EXTENT_DEPTH}`);
  if (expectedDepth !== undefined && depth !== expectedDepth) throw fail(`depth ${depth}, expected ${expectedDepth}`);
  if (nodeBlock !== undefined && ctx.metadataCsum) verifyExtentBlockChecksum(node, max, inode, fail);
  if (depth === 0) {
    for (const extent of leafExtents(state, node, entries, lo, hi, fail)) {
      // Check the whole extent, not just the part asked for: a bad extent is bad for every read.
      await ctx.checkRun(inode.ino, extent.pblk, extent.len, 'extent');
      const clipFrom = Math.max(extent.lblk, state.from);
      const clipTo = Math.min(extent.lblk + extent.len, state.to);
      state.out.push({ lblk: clipFrom, pblk: extent.pblk + (clipFrom - extent.lblk), len: clipTo - clipFrom, uninit: extent.uninit });
    }
    return;
  }
  let previous = -1;
  for (let i = 0; i < entries; i++) {
    const at = 12 + i * 12;
    const first = node.readUInt32LE(at);
    const child = node.readUInt32LE(at + 4) + node.readUInt16LE(at + 8) * 2 ** 32;
    if (first <= previous || first < lo || first >= hi) throw fail(`index ${i} (logical block ${first}) is out of order`);
    previous = first;
    const childHi = i + 1 < entries ? node.readUInt32LE(at + 12) : hi;
    if (childHi <= state.from || first >= state.to) continue;
    await ctx.checkRun(inode.ino, child, 1, 'extent tree node');
    if (state.visited.has(child)) throw fail(`block ${child} is reached twice (loop or shared subtree)`);
    state.visited.add(child);
    const block = await ctx.readBlock(child);
    await walkExtentNode(state, block, child, depth - 1, first, Math.min(childHi, hi));
  }
}

/** The leaf's extents that intersect the requested range, after checking the whole leaf's order. */
function leafExtents(state: WalkState, node: Buffer, entries: number, lo: number, hi: number,
  fail: (m: string) => Error): BlockRun[] {
  const wanted: BlockRun[] = [];
  let previousEnd = lo;
  for (let i = 0; i < entries; i++) {
    const at = 12 + i * 12;
    const first = node.readUInt32LE(at);
    const rawLen = node.readUInt16LE(at + 4);
    const pblk = node.readUInt16LE(at + 6) * 2 ** 32 + node.readUInt32LE(at + 8);
    const uninit = rawLen > INIT_MAX_LEN;
    const len = uninit ? rawLen - INIT_MAX_LEN : rawLen;
    if (len === 0) throw fail(`extent ${i} has length 0`);
    if (first < previousEnd) throw fail(`extent ${i} (logical ${first}) overlaps the previous one or lies before its index`);
    const end = first + len;
    if (end > hi) throw fail(`extent ${i} (logical ${first}-${end - 1}) runs past its index range`);
    previousEnd = end;
    if (end > state.from && first < state.to) wanted.push({ lblk: first, pblk, len, uninit });
  }
  return wanted;
}

function verifyExtentBlockChecksum(node: Buffer, max: number, inode: Inode, fail: (m: string) => Error): void {
  const tailAt = 12 + 12 * max;
  if (tailAt + 4 > node.length) throw fail('no room for the checksum tail');
  const stored = node.readUInt32LE(tailAt);
  const actual = crc32cUpdate(inode.csumSeed, node.subarray(0, tailAt));
  if (stored !== actual) throw fail(`checksum mismatch (stored ${hex(stored)}, computed ${hex(actual)})`);
}

// ---------------------------------------------------------------------------------------------
// Indirect block maps (ext2/ext3): 12 direct pointers, then single, double and triple indirect.

async function mapIndirect(ctx: BlockMapContext, inode: Inode, from: number, to: number): Promise<BlockRun[]> {
  const k = ctx.sb.blockSize / 4;
  const limit = indirectMapLimit(ctx.sb.blockSize);
  const end = Math.min(to, limit);
  const collector = new RunCollector();
  for (let i = from; i < Math.min(12, end); i++) {
    const ptr = inode.iblock.readUInt32LE(i * 4);
    if (ptr !== 0) collector.add(i, ptr);
  }
  const visited = new Set<number>();
  let base = 12;
  for (let level = 1; level <= 3; level++) {
    const span = k ** level;
    const ptr = inode.iblock.readUInt32LE((11 + level) * 4);
    await walkIndirect(ctx, inode, ptr, level, base, from, end, collector, visited);
    base += span;
  }
  for (const run of collector.runs) await ctx.checkRun(inode.ino, run.pblk, run.len, 'data block');
  return collector.runs;
}

async function walkIndirect(ctx: BlockMapContext, inode: Inode, ptr: number, level: number, base: number,
  from: number, to: number, collector: RunCollector, visited: Set<number>): Promise<void> {
  const k = ctx.sb.blockSize / 4;
  const span = k ** level;
  if (ptr === 0 || base >= to || base + span <= from) return;
  await ctx.checkRun(inode.ino, ptr, 1, 'indirect block');
  if (visited.has(ptr)) {
    throw damage(ctx.fsType, `indirect block ${ptr} is reached twice (loop or shared block)`, 'block map', inode.ino);
  }
  visited.add(ptr);
  const block = await ctx.readBlock(ptr);
  const childSpan = span / k;
  const firstSlot = Math.max(0, Math.floor((from - base) / childSpan));
  const lastSlot = Math.min(k - 1, Math.floor((to - 1 - base) / childSpan));
  for (let slot = firstSlot; slot <= lastSlot; slot++) {
    const child = block.readUInt32LE(slot * 4);
    if (child === 0) continue;
    if (level === 1) collector.add(base + slot, child);
    else await walkIndirect(ctx, inode, child, level - 1, base + slot * childSpan, from, to, collector, visited);
  }
}

/** Merges single-block mappings into runs as they arrive in logical order. */
class RunCollector {
  readonly runs: BlockRun[] = [];

  add(lblk: number, pblk: number): void {
    const last = this.runs[this.runs.length - 1];
    if (last && last.lblk + last.len === lblk && last.pblk + last.len === pblk) {
      last.len++;
      return;
    }
    this.runs.push({ lblk, pblk, len: 1, uninit: false });
  }
}
