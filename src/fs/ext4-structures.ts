/**
 * ext2/3/4 on-disk structures: superblock, group descriptors, inodes and their checksums.
 * Field offsets follow the kernel's fs/ext4/ext4.h (all little-endian). Parsing validates every
 * value later code relies on, so the reader above works only with sane numbers.
 */
import { crc32cUpdate } from '../util/crc32c.ts';
import { FsDamageError, FsUnsupportedError } from './errors.ts';

export const EXT_MAGIC = 0xef53;
export const SUPERBLOCK_OFFSET = 1024;
export const ROOT_INO = 2;

export const COMPAT = { hasJournal: 0x4, dirIndex: 0x20, sparseSuper2: 0x200 } as const;

export const INCOMPAT = {
  compression: 0x1,
  filetype: 0x2,
  recover: 0x4,
  journalDev: 0x8,
  metaBg: 0x10,
  extents: 0x40,
  bit64: 0x80,
  mmp: 0x100,
  flexBg: 0x200,
  eaInode: 0x400,
  dirData: 0x1000,
  csumSeed: 0x2000,
  largeDir: 0x4000,
  inlineData: 0x8000,
  encrypt: 0x10000,
  casefold: 0x20000,
} as const;

/** INCOMPAT features this reader handles; anything else could make it read wrong data. */
const SUPPORTED_INCOMPAT = INCOMPAT.filetype | INCOMPAT.recover | INCOMPAT.metaBg | INCOMPAT.extents
  | INCOMPAT.bit64 | INCOMPAT.mmp | INCOMPAT.flexBg | INCOMPAT.eaInode | INCOMPAT.csumSeed | INCOMPAT.largeDir
  | INCOMPAT.inlineData | INCOMPAT.encrypt | INCOMPAT.casefold;

const INCOMPAT_NAMES: Record<number, string> = {
  0x1: 'compression', 0x8: 'journal_dev', 0x1000: 'dirdata',
};

export const RO_COMPAT = {
  sparseSuper: 0x1,
  largeFile: 0x2,
  hugeFile: 0x8,
  gdtCsum: 0x10,
  dirNlink: 0x20,
  extraIsize: 0x40,
  bigalloc: 0x200,
  metadataCsum: 0x400,
} as const;

export const INODE_FLAG = {
  compressed: 0x4,
  encrypted: 0x800,
  index: 0x1000,
  hugeFile: 0x40000,
  extents: 0x80000,
  eaInode: 0x200000,
  inlineData: 0x10000000,
  casefold: 0x40000000,
} as const;

export const BG_FLAG = { inodeUninit: 0x1, blockUninit: 0x2 } as const;

const SB_FLAG_UNSIGNED_HASH = 0x2;

export interface Superblock {
  /** 'ext2' | 'ext3' | 'ext4', the way blkid names them. */
  fsType: string;
  inodesCount: number;
  blocksCount: number;
  firstDataBlock: number;
  blockSize: number;
  blocksPerGroup: number;
  inodesPerGroup: number;
  inodeSize: number;
  firstIno: number;
  revLevel: number;
  compat: number;
  incompat: number;
  roCompat: number;
  uuid: Buffer;
  label: string;
  hashSeed: number[];
  defaultHashVersion: number;
  hashUnsigned: boolean;
  descSize: number;
  firstMetaBg: number;
  logGroupsPerFlex: number;
  reservedGdtBlocks: number;
  backupBgs: [number, number];
  journalInum: number;
  checksumSeed: number;
  groupCount: number;
  /** Raw 1024 bytes, for checksum re-verification. */
  raw: Buffer;
}

export function has(flags: number, bit: number): boolean {
  return (flags & bit) !== 0;
}

export function damage(fsType: string, message: string, structure: string, ino?: number, extra: Record<string, unknown> = {}): FsDamageError {
  return new FsDamageError(message, { fs: fsType, ino, structure, ...extra },
    'the filesystem is damaged here: check a restored copy with `e2fsck -fn`, or restore this file from another snapshot');
}

/** Parses and validates the primary superblock; undefined when the magic is not ext's. */
export function parseSuperblock(raw: Buffer, deviceSize: number): Superblock | undefined {
  if (raw.length < 1024 || raw.readUInt16LE(0x38) !== EXT_MAGIC) return undefined;
  const revLevel = raw.readUInt32LE(0x4c);
  const dynamic = revLevel >= 1;
  const compat = dynamic ? raw.readUInt32LE(0x5c) : 0;
  const incompat = dynamic ? raw.readUInt32LE(0x60) : 0;
  const roCompat = dynamic ? raw.readUInt32LE(0x64) : 0;
  const fsType = extFlavour(compat, incompat, roCompat);
  const fail = (message: string) => damage(fsType, message, 'superblock');
  const logBlockSize = raw.readUInt32LE(0x18);
  if (logBlockSize > 6) throw fail(`block size 2^(10+${logBlockSize}) is invalid`);
  const blockSize = 1024 << logBlockSize;
  if (revLevel > 1) throw fail(`revision ${revLevel} is unknown`);
  const unsupported = incompat & ~SUPPORTED_INCOMPAT;
  if (unsupported !== 0) {
    const names = [];
    for (let bit = 1; bit !== 0 && bit <= 0x80000000; bit = (bit << 1) >>> 0) {
      if (unsupported & bit) names.push(INCOMPAT_NAMES[bit] ?? `0x${bit.toString(16)}`);
    }
    throw new FsUnsupportedError(`incompatible feature(s) ${names.join(', ')} not supported by this reader`, {
      fs: fsType, structure: 'superblock', features: names,
    }, has(incompat, INCOMPAT.journalDev)
      ? 'this is an external ext3/ext4 journal device: it holds no files'
      : undefined);
  }
  const is64 = has(incompat, INCOMPAT.bit64);
  const blocksCount = raw.readUInt32LE(0x04) + (is64 ? raw.readUInt32LE(0x150) * 2 ** 32 : 0);
  const firstDataBlock = raw.readUInt32LE(0x14);
  const blocksPerGroup = raw.readUInt32LE(0x20);
  const inodesPerGroup = raw.readUInt32LE(0x28);
  const inodesCount = raw.readUInt32LE(0x00);
  const inodeSize = dynamic ? raw.readUInt16LE(0x58) : 128;
  const firstIno = dynamic ? raw.readUInt32LE(0x54) : 11;
  if (firstDataBlock > 1 || (blockSize > 1024 && firstDataBlock !== 0)) {
    throw fail(`first data block ${firstDataBlock} is invalid for ${blockSize}-byte blocks`);
  }
  if (blocksCount <= firstDataBlock || !Number.isSafeInteger(blocksCount * blockSize)) throw fail(`block count ${blocksCount} is invalid`);
  if (blocksPerGroup < 8 || blocksPerGroup > 65536 * 8 * 16) throw fail(`blocks per group ${blocksPerGroup} is invalid`);
  if (inodesPerGroup < 1 || inodesPerGroup > blockSize * 8) throw fail(`inodes per group ${inodesPerGroup} is invalid`);
  if (inodeSize < 128 || inodeSize > blockSize || (inodeSize & (inodeSize - 1)) !== 0) throw fail(`inode size ${inodeSize} is invalid`);
  const groupCount = Math.ceil((blocksCount - firstDataBlock) / blocksPerGroup);
  if (inodesCount > groupCount * inodesPerGroup || inodesCount < ROOT_INO) throw fail(`inode count ${inodesCount} is invalid`);
  if (firstIno <= ROOT_INO || firstIno > inodesCount) throw fail(`first inode ${firstIno} is invalid`);
  let descSize = 32;
  if (is64) {
    descSize = raw.readUInt16LE(0xfe);
    if (descSize < 64 || descSize > 1024 || (descSize & (descSize - 1)) !== 0) throw fail(`group descriptor size ${descSize} is invalid`);
  }
  if (blocksCount * blockSize > deviceSize + blockSize) {
    // Reads past the device fail individually; say it here too, it explains those errors.
    throw fail(`filesystem claims ${blocksCount * blockSize} bytes but the device holds ${deviceSize}: truncated image?`);
  }
  const metadataCsum = has(roCompat, RO_COMPAT.metadataCsum);
  if (metadataCsum) {
    if (raw[0x175] !== 1) throw fail(`checksum type ${raw[0x175]} is unknown`);
    const stored = raw.readUInt32LE(0x3fc);
    const actual = crc32cUpdate(0xffffffff, raw.subarray(0, 0x3fc));
    if (stored !== actual) throw fail(`superblock checksum mismatch (stored ${hex(stored)}, computed ${hex(actual)})`);
  }
  const uuid = Buffer.from(raw.subarray(0x68, 0x78));
  const checksumSeed = has(incompat, INCOMPAT.csumSeed) ? raw.readUInt32LE(0x270) : crc32cUpdate(0xffffffff, uuid);
  return {
    fsType,
    inodesCount,
    blocksCount,
    firstDataBlock,
    blockSize,
    blocksPerGroup,
    inodesPerGroup,
    inodeSize,
    firstIno,
    revLevel,
    compat,
    incompat,
    roCompat,
    uuid,
    label: cString(raw.subarray(0x78, 0x88)),
    hashSeed: [0xec, 0xf0, 0xf4, 0xf8].map((o) => raw.readUInt32LE(o)),
    defaultHashVersion: raw[0xfc],
    hashUnsigned: has(raw.readUInt32LE(0x160), SB_FLAG_UNSIGNED_HASH),
    descSize,
    firstMetaBg: raw.readUInt32LE(0x104),
    logGroupsPerFlex: raw[0x174],
    reservedGdtBlocks: raw.readUInt16LE(0xce),
    backupBgs: [raw.readUInt32LE(0x24c), raw.readUInt32LE(0x250)],
    journalInum: has(compat, COMPAT.hasJournal) ? raw.readUInt32LE(0xe0) : 0,
    checksumSeed,
    groupCount,
    raw: Buffer.from(raw),
  };
}

/** blkid's rule: ext4 once any feature beyond ext3's is on; ext3 when it has a journal. */
function extFlavour(compat: number, incompat: number, roCompat: number): string {
  const ext3Incompat = INCOMPAT.filetype | INCOMPAT.recover | INCOMPAT.metaBg;
  const ext3RoCompat = RO_COMPAT.sparseSuper | RO_COMPAT.largeFile | 0x4;
  if ((incompat & ~ext3Incompat) !== 0 || (roCompat & ~ext3RoCompat) !== 0) return 'ext4';
  return has(compat, COMPAT.hasJournal) ? 'ext3' : 'ext2';
}

export function hex(n: number): string {
  return `0x${(n >>> 0).toString(16).padStart(8, '0')}`;
}

export function cString(buf: Buffer): string {
  const nul = buf.indexOf(0);
  return buf.toString('utf8', 0, nul < 0 ? buf.length : nul);
}

export function formatUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---------------------------------------------------------------------------------------------
// Group descriptors

export interface GroupDesc {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  flags: number;
  itableUnused: number;
}

export function parseGroupDesc(sb: Superblock, raw: Buffer): GroupDesc {
  const wide = sb.descSize >= 64;
  const hi = (at: number) => (wide ? raw.readUInt32LE(at) * 2 ** 32 : 0);
  return {
    blockBitmap: raw.readUInt32LE(0x00) + hi(0x20),
    inodeBitmap: raw.readUInt32LE(0x04) + hi(0x24),
    inodeTable: raw.readUInt32LE(0x08) + hi(0x28),
    flags: raw.readUInt16LE(0x12),
    itableUnused: raw.readUInt16LE(0x1c) + (wide ? raw.readUInt16LE(0x32) * 65536 : 0),
  };
}

/** Verifies a group descriptor's checksum (metadata_csum: crc32c; gdt_csum: crc16); '' if fine. */
export function groupDescChecksumProblem(sb: Superblock, group: number, raw: Buffer): string {
  const stored = raw.readUInt16LE(0x1e);
  const groupLe = Buffer.alloc(4);
  groupLe.writeUInt32LE(group);
  const copy = Buffer.from(raw.subarray(0, sb.descSize));
  copy.writeUInt16LE(0, 0x1e);
  let actual: number;
  if (has(sb.roCompat, RO_COMPAT.metadataCsum)) {
    actual = crc32cUpdate(crc32cUpdate(sb.checksumSeed, groupLe), copy) & 0xffff;
  } else if (has(sb.roCompat, RO_COMPAT.gdtCsum)) {
    let crc = crc16(0xffff, sb.uuid);
    crc = crc16(crc, groupLe);
    crc = crc16(crc, raw.subarray(0, 0x1e));
    if (sb.descSize > 32) crc = crc16(crc, raw.subarray(0x20, sb.descSize));
    actual = crc;
  } else {
    return '';
  }
  return stored === actual ? '' : `group descriptor ${group} checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${actual.toString(16)})`;
}

const CRC16_TABLE = (() => {
  const table = new Uint16Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0xa001 : c >>> 1;
    table[n] = c;
  }
  return table;
})();

/** The kernel's lib/crc16 (polynomial 0x8005 reflected), raw register. */
export function crc16(crc: number, data: Uint8Array): number {
  let c = crc & 0xffff;
  for (const byte of data) c = (c >>> 8) ^ CRC16_TABLE[(c ^ byte) & 0xff];
  return c;
}

/** Does block group `group` hold a superblock backup (and so a GDT copy)? */
export function groupHasSuper(sb: Superblock, group: number): boolean {
  if (group === 0) return true;
  if (has(sb.compat, COMPAT.sparseSuper2)) return group === sb.backupBgs[0] || group === sb.backupBgs[1];
  if (group <= 1 || !has(sb.roCompat, RO_COMPAT.sparseSuper)) return true;
  if (group % 2 === 0) return false;
  return isPowerOf(group, 3) || isPowerOf(group, 5) || isPowerOf(group, 7);
}

function isPowerOf(n: number, base: number): boolean {
  let x = n;
  while (x % base === 0) x /= base;
  return x === 1;
}

export function groupFirstBlock(sb: Superblock, group: number): number {
  return sb.firstDataBlock + group * sb.blocksPerGroup;
}

/** The block holding the primary superblock: 1 with 1 KiB blocks, else 0 (it is at byte 1024). */
export function superblockBlock(sb: Superblock): number {
  return Math.floor(SUPERBLOCK_OFFSET / sb.blockSize);
}

/** Block number and byte offset in it of group `group`'s descriptor (the kernel's descriptor_loc). */
export function groupDescLocation(sb: Superblock, group: number): { block: number; offset: number } {
  const perBlock = sb.blockSize / sb.descSize;
  const metaGroup = Math.floor(group / perBlock);
  const offset = (group % perBlock) * sb.descSize;
  if (has(sb.incompat, INCOMPAT.metaBg) && metaGroup >= sb.firstMetaBg) {
    // meta_bg: each meta group's descriptors sit in its own first group (after a superblock copy).
    const firstGroup = metaGroup * perBlock;
    let skip = groupHasSuper(sb, firstGroup) ? 1 : 0;
    // 1 KiB blocks with first_data_block 0 (bigalloc): group 0 also holds the boot block.
    if (sb.blockSize === 1024 && metaGroup === 0 && sb.firstDataBlock === 0) skip++;
    return { block: groupFirstBlock(sb, firstGroup) + skip, offset };
  }
  return { block: superblockBlock(sb) + 1 + metaGroup, offset };
}

/**
 * Blocks [start, end) at the start of a group used by the boot block (group 0), the superblock
 * copy, the GDT and the reserved GDT blocks; undefined when the group has no superblock copy.
 */
export function groupSuperAndGdtRange(sb: Superblock, group: number): [number, number] | undefined {
  if (!groupHasSuper(sb, group)) return undefined;
  const perBlock = sb.blockSize / sb.descSize;
  const gdtBlocks = has(sb.incompat, INCOMPAT.metaBg)
    ? Math.min(sb.firstMetaBg, Math.ceil(sb.groupCount / perBlock))
    : Math.ceil(sb.groupCount / perBlock);
  const first = groupFirstBlock(sb, group);
  if (group === 0) return [0, superblockBlock(sb) + 1 + gdtBlocks + sb.reservedGdtBlocks];
  return [first, first + 1 + gdtBlocks + sb.reservedGdtBlocks];
}

// ---------------------------------------------------------------------------------------------
// Inodes

export interface Inode {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  linksCount: number;
  flags: number;
  /** i_blocks in 512-byte sectors. */
  sectors: number;
  fileAcl: number;
  generation: number;
  /** The 60-byte i_block area (block map, extent root, inline data or fast symlink). */
  iblock: Buffer;
  extraIsize: number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
  birthtimeNs: bigint | undefined;
  /** Seed for checksums of the inode's own blocks (extent tree, directory blocks). */
  csumSeed: number;
  raw: Buffer;
}

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;

/** Parses an on-disk inode after verifying its checksum (metadata_csum). */
export function parseInode(sb: Superblock, fsType: string, ino: number, raw: Buffer): Inode {
  const fail = (message: string) => damage(fsType, message, 'inode', ino);
  const inodeSize = sb.inodeSize;
  const extraIsize = inodeSize > 128 ? raw.readUInt16LE(0x80) : 0;
  if (inodeSize > 128 && (128 + extraIsize > inodeSize || extraIsize % 4 !== 0)) {
    throw fail(`extra inode size ${extraIsize} is invalid`);
  }
  const generation = raw.readUInt32LE(0x64);
  const metadataCsum = has(sb.roCompat, RO_COMPAT.metadataCsum);
  let csumSeed = 0;
  if (metadataCsum) {
    const le = Buffer.alloc(8);
    le.writeUInt32LE(ino, 0);
    le.writeUInt32LE(generation, 4);
    csumSeed = crc32cUpdate(crc32cUpdate(sb.checksumSeed, le.subarray(0, 4)), le.subarray(4, 8));
    verifyInodeChecksum(raw, inodeSize, extraIsize, csumSeed, fail);
  }
  const fits = (offset: number) => inodeSize > 128 && offset + 4 <= 128 + extraIsize;
  const time = (secondsAt: number, extraAt: number): bigint => {
    const seconds = BigInt(raw.readInt32LE(secondsAt));
    if (!fits(extraAt)) return seconds * 1_000_000_000n;
    const extra = raw.readUInt32LE(extraAt);
    const epoch = BigInt(extra & 3) << 32n;
    return (seconds + epoch) * 1_000_000_000n + BigInt(extra >>> 2);
  };
  const sizeLo = raw.readUInt32LE(0x04);
  const sizeHi = raw.readUInt32LE(0x6c);
  if (sizeHi >= 0x200000) throw fail(`size ${sizeHi} * 2^32 + ${sizeLo} is absurd`);
  return {
    ino,
    mode: raw.readUInt16LE(0x00),
    uid: raw.readUInt16LE(0x02) | (raw.readUInt16LE(0x78) << 16),
    gid: raw.readUInt16LE(0x18) | (raw.readUInt16LE(0x7a) << 16),
    size: sizeHi * 2 ** 32 + sizeLo,
    linksCount: raw.readUInt16LE(0x1a),
    flags: raw.readUInt32LE(0x20),
    sectors: raw.readUInt32LE(0x1c) + (has(sb.roCompat, RO_COMPAT.hugeFile) ? raw.readUInt16LE(0x74) * 2 ** 32 : 0),
    fileAcl: raw.readUInt32LE(0x68) + (has(sb.incompat, INCOMPAT.bit64) ? raw.readUInt16LE(0x76) * 2 ** 32 : 0),
    generation,
    iblock: Buffer.from(raw.subarray(0x28, 0x28 + 60)),
    extraIsize,
    atimeNs: time(0x08, 0x8c),
    mtimeNs: time(0x10, 0x88),
    ctimeNs: time(0x0c, 0x84),
    birthtimeNs: fits(0x90) && fits(0x94) ? time(0x90, 0x94) : undefined,
    csumSeed,
    raw,
  };
}

function verifyInodeChecksum(raw: Buffer, inodeSize: number, extraIsize: number, seed: number,
  fail: (m: string) => FsDamageError): void {
  const copy = Buffer.from(raw.subarray(0, inodeSize));
  copy.writeUInt16LE(0, 0x7c);
  const hasHi = inodeSize > 128 && extraIsize >= 4;
  if (hasHi) copy.writeUInt16LE(0, 0x82);
  let actual = crc32cUpdate(seed, copy);
  let stored = raw.readUInt16LE(0x7c);
  if (hasHi) stored = (stored | (raw.readUInt16LE(0x82) << 16)) >>> 0;
  else actual &= 0xffff;
  if (stored !== actual) throw fail(`inode checksum mismatch (stored ${hex(stored)}, computed ${hex(actual)})`);
}
