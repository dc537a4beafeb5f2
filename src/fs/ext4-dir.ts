/**
 * ext2/3/4 directory blocks: linear entries, the checksum tail of leaf blocks, and the hashed
 * B-tree (htree) index blocks. Pure functions over buffers; ext4.ts drives them.
 */
import { crc32cUpdate } from '../util/crc32c.ts';
import { hex } from './ext4-structures.ts';
import type { FileType } from './filesystem.ts';

export interface RawDirEntry {
  ino: number;
  name: Buffer;
  /** Directory-entry file type (0 when the filesystem does not store it). */
  fileType: number;
}

export interface DirFormat {
  blockSize: number;
  /** FILETYPE feature: byte 7 is the type, otherwise the high byte of a 16-bit name length. */
  hasFileType: boolean;
  inodesCount: number;
  metadataCsum: boolean;
}

const TAIL_SIZE = 12;
const TAIL_FILE_TYPE = 0xde;

/** The dirent file_type byte as a FileType. */
export function direntType(code: number): FileType {
  switch (code) {
    case 1: return 'file';
    case 2: return 'dir';
    case 3: return 'chardev';
    case 4: return 'blockdev';
    case 5: return 'fifo';
    case 6: return 'socket';
    case 7: return 'symlink';
    default: return 'unknown';
  }
}

/** rec_len as stored; 64 KiB blocks need the kernel's encoding of 65536. */
function recordLength(raw: number, blockSize: number): number {
  if (blockSize < 65536) return raw;
  if (raw === 0xffff || raw === 0) return 65536;
  return (raw & 0xfffc) | ((raw & 3) << 16);
}

/**
 * Parses the entries of [0, length) of `data`; entries with inode 0 (unused space) are skipped.
 * Every record is checked the way the kernel's ext4_check_dir_entry does.
 */
export function parseDirEntries(data: Buffer, length: number, format: DirFormat, fail: (m: string) => Error): RawDirEntry[] {
  const entries: RawDirEntry[] = [];
  let at = 0;
  while (at < length) {
    if (at + 8 > length) throw fail(`entry at byte ${at} is truncated`);
    const ino = data.readUInt32LE(at);
    const recLen = recordLength(data.readUInt16LE(at + 4), format.blockSize);
    const nameLen = data[at + 6];
    const fileType = format.hasFileType ? data[at + 7] : 0;
    if (recLen < 12) throw fail(`entry at byte ${at} has rec_len ${recLen} < 12`);
    if (recLen % 4 !== 0) throw fail(`entry at byte ${at} has rec_len ${recLen} not a multiple of 4`);
    if (at + recLen > length) throw fail(`entry at byte ${at} (rec_len ${recLen}) runs past the block`);
    if (8 + nameLen > recLen) throw fail(`entry at byte ${at}: name of ${nameLen} bytes does not fit rec_len ${recLen}`);
    if (ino > format.inodesCount) throw fail(`entry at byte ${at} points to inode ${ino} > inode count ${format.inodesCount}`);
    if (ino !== 0 && nameLen === 0) throw fail(`entry at byte ${at} has an empty name`);
    if (ino !== 0) entries.push({ ino, name: data.subarray(at + 8, at + 8 + nameLen), fileType });
    at += recLen;
  }
  return entries;
}

/** Bytes of a leaf block that hold entries (the checksum tail excluded), after verifying it. */
export function leafEntryBytes(block: Buffer, format: DirFormat, csumSeed: number, fail: (m: string) => Error): number {
  if (!format.metadataCsum) return block.length;
  const tailAt = block.length - TAIL_SIZE;
  if (block.readUInt32LE(tailAt) !== 0 || block.readUInt16LE(tailAt + 4) !== TAIL_SIZE || block[tailAt + 6] !== 0
    || block[tailAt + 7] !== TAIL_FILE_TYPE) {
    throw fail('directory block has no checksum tail');
  }
  const stored = block.readUInt32LE(tailAt + 8);
  const actual = crc32cUpdate(csumSeed, block.subarray(0, tailAt));
  if (stored !== actual) throw fail(`directory block checksum mismatch (stored ${hex(stored)}, computed ${hex(actual)})`);
  return tailAt;
}

// ---------------------------------------------------------------------------------------------
// htree

export interface DxRootInfo {
  hashVersion: number;
  indirectLevels: number;
}

export interface DxEntries {
  /** Hash of each entry; entry 0's is implicitly 0 (its slot holds count/limit). */
  hashes: number[];
  /** Logical directory block of each entry. */
  blocks: number[];
}

export const DX_ROOT_ENTRIES_OFFSET = 32;
export const DX_NODE_ENTRIES_OFFSET = 8;

/** Validates block 0 of an indexed directory ("." and ".." then dx_root_info). */
export function parseDxRootInfo(block: Buffer, format: DirFormat, fail: (m: string) => Error): DxRootInfo {
  const dotRecLen = recordLength(block.readUInt16LE(4), format.blockSize);
  const dotDotRecLen = recordLength(block.readUInt16LE(16), format.blockSize);
  if (dotRecLen !== 12 || block[6] !== 1 || block[8] !== 0x2e) throw fail('htree root: "." entry is malformed');
  if (block[12 + 6] !== 2 || block[12 + 8] !== 0x2e || block[12 + 9] !== 0x2e || dotDotRecLen !== format.blockSize - 12) {
    throw fail('htree root: ".." entry is malformed');
  }
  if (block.readUInt32LE(24) !== 0) throw fail('htree root: reserved field is not zero');
  if (block[29] !== 8) throw fail(`htree root: info length ${block[29]} is not 8`);
  return { hashVersion: block[28], indirectLevels: block[30] };
}

/** Reads count/limit and entries of a dx root or node, verifying its checksum tail if any. */
export function parseDxEntries(block: Buffer, entriesOffset: number, format: DirFormat, csumSeed: number,
  fail: (m: string) => Error): DxEntries {
  const limit = block.readUInt16LE(entriesOffset);
  const count = block.readUInt16LE(entriesOffset + 2);
  const tailBytes = format.metadataCsum ? 8 : 0;
  const expectedLimit = Math.floor((format.blockSize - entriesOffset - tailBytes) / 8);
  if (limit !== expectedLimit) throw fail(`htree node limit ${limit}, expected ${expectedLimit}`);
  if (count === 0 || count > limit) throw fail(`htree node count ${count} is invalid (limit ${limit})`);
  if (format.metadataCsum) {
    const tailAt = entriesOffset + limit * 8;
    const stored = block.readUInt32LE(tailAt + 4);
    let crc = crc32cUpdate(csumSeed, block.subarray(0, entriesOffset + count * 8));
    crc = crc32cUpdate(crc, block.subarray(tailAt, tailAt + 4));
    crc = crc32cUpdate(crc, Buffer.alloc(4));
    if (stored !== crc) throw fail(`htree node checksum mismatch (stored ${hex(stored)}, computed ${hex(crc)})`);
  }
  const hashes: number[] = [];
  const blocks: number[] = [];
  for (let i = 0; i < count; i++) {
    const at = entriesOffset + i * 8;
    const hash = i === 0 ? 0 : block.readUInt32LE(at);
    if (i > 0 && hash < hashes[i - 1]) throw fail(`htree node hashes are not sorted at entry ${i}`);
    hashes.push(hash);
    blocks.push(block.readUInt32LE(at + 4) & 0x0fffffff);
  }
  return { hashes, blocks };
}

/** Is this (non-root) block of an indexed directory an htree interior node? */
export function isDxNode(block: Buffer, format: DirFormat): boolean {
  return block.readUInt32LE(0) === 0 && recordLength(block.readUInt16LE(4), format.blockSize) === format.blockSize
    && block[6] === 0;
}

/** Index of the last entry whose hash is <= `hash` (entry 0 always qualifies). */
export function dxFindSlot(entries: DxEntries, hash: number): number {
  let lo = 0;
  let hi = entries.hashes.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (entries.hashes[mid] <= hash) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}
