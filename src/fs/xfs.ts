/**
 * XFS v5 reader (read-only; the image is untrusted input).
 *
 * - Superblock: CRC32c verified; unknown incompatible features stop the reader with a clear
 *   error (read-only compatible features need no support to read). V4 filesystems (no CRCs) are
 *   not supported.
 * - Inodes are found arithmetically from their number (AG, block in the AG, slot in the block);
 *   every inode's CRC32c, magic, version and self-recorded number are checked.
 * - Data forks: local (short-form directories, inline symlinks), extent lists and extent
 *   B+trees (each block CRC-checked, owner and level checked, depth bounded). Extents are checked
 *   to lie inside the filesystem and not to overlap; unwritten extents and gaps read as zeros and
 *   are reported as holes.
 * - Directories: short-form, block, leaf and node formats. Listing scans the data blocks; lookup
 *   hashes the name and descends the leaf/node (da) B+tree, falling back to a scan on
 *   ASCII-case-insensitive filesystems. Directory blocks' CRCs, owners and magics are checked.
 *   A directory that lists itself or its parent under a name is reported as a cycle.
 * - Timestamps: classic (32-bit seconds + ns) or bigtime (64-bit ns since 1901-12-13).
 * Realtime-device files cannot be read from the data device: an error says so.
 */
import { crc32c } from '../util/crc32c.ts';
import { FsDamageError, FsUnsupportedError } from './errors.ts';
import type { FsDamageContext } from './errors.ts';
import type { BlockDevice, DirEntry, FileExtent, FileStat, FileType, Filesystem } from './filesystem.ts';
import {
  LruMap, clampRead, isDirectory, noSuchStream, notDirectory, notSymlink, pushExtent, readRange,
} from './reader-util.ts';

const FS = 'xfs';

const INCOMPAT_FTYPE = 0x1;
const INCOMPAT_SPINODES = 0x2;
const INCOMPAT_META_UUID = 0x4;
const INCOMPAT_BIGTIME = 0x8;
const INCOMPAT_NEEDSREPAIR = 0x10;
const INCOMPAT_NREXT64 = 0x20;
const INCOMPAT_EXCHRANGE = 0x40;
const INCOMPAT_PARENT = 0x80;
/** Features that change nothing this reader looks at, or that it implements. */
const SUPPORTED_INCOMPAT = INCOMPAT_FTYPE | INCOMPAT_SPINODES | INCOMPAT_META_UUID | INCOMPAT_BIGTIME
  | INCOMPAT_NEEDSREPAIR | INCOMPAT_NREXT64 | INCOMPAT_EXCHRANGE | INCOMPAT_PARENT;
const VERSION_ASCII_CI = 0x4000;

const DINODE_CORE_V3 = 176;
const DI_FORMAT_DEV = 0;
const DI_FORMAT_LOCAL = 1;
const DI_FORMAT_EXTENTS = 2;
const DI_FORMAT_BTREE = 3;
const DIFLAG_REALTIME = 0x1;
const DIFLAG2_BIGTIME = 0x8;
const DIFLAG2_NREXT64 = 0x10;

const S_IFMT = 0o170000;
const MODE_TYPES: Record<number, FileType> = {
  0o010000: 'fifo', 0o020000: 'chardev', 0o040000: 'dir', 0o060000: 'blockdev',
  0o100000: 'file', 0o120000: 'symlink', 0o140000: 'socket',
};
const DIRENT_TYPES: FileType[] = ['unknown', 'file', 'dir', 'chardev', 'blockdev', 'fifo', 'socket', 'symlink'];

const BMAP_BTREE_MAGIC = 0x424d4133; // BMA3
const BTREE_LONG_HEADER = 72;
const MAX_BMBT_LEVELS = 9;
/** Extent maps are kept in memory per file: refuse the absurd. */
const MAX_EXTENTS = 4 * 1024 * 1024;

const DIR3_BLOCK_MAGIC = 0x58444233; // XDB3
const DIR3_DATA_MAGIC = 0x58444433; // XDD3
const DIR3_LEAF1_MAGIC = 0x3df1;
const DIR3_LEAFN_MAGIC = 0x3dff;
const DA3_NODE_MAGIC = 0x3ebe;
const DIR3_DATA_HEADER = 64;
const DA3_HEADER = 64;
const DA_MAX_DEPTH = 5;
/** Directory address space: data below 32 GiB, leaf/node blocks from 32 GiB, free index from 64 GiB. */
const DIR_LEAF_OFFSET = 2 ** 35;
const SYMLINK_MAGIC = 0x58534c4d; // XSLM
const SYMLINK_HEADER = 56;
const MAX_SYMLINK_LENGTH = 1024;

/** Bigtime counts ns from 1901-12-13T20:45:52Z, i.e. 2^31 s before the Unix epoch. */
const BIGTIME_EPOCH_OFFSET_NS = 2n ** 31n * 1_000_000_000n;

interface XfsSuper {
  blockSize: number;
  blockLog: number;
  dataBlocks: number;
  agBlocks: number;
  agCount: number;
  agBlockLog: number;
  inodeSize: number;
  inodesPerBlockLog: number;
  dirBlockLog: number;
  rootIno: bigint;
  uuid: Buffer;
  /** The UUID stamped into metadata (differs from `uuid` after xfs_admin -U with meta_uuid). */
  metaUuid: Buffer;
  label: string;
  hasFtype: boolean;
  bigtimeFeature: boolean;
  nrext64: boolean;
  asciiCi: boolean;
}

interface XfsInode {
  ino: bigint;
  mode: number;
  type: FileType;
  format: number;
  uid: number;
  gid: number;
  nlink: number;
  size: number;
  nextents: number;
  flags: number;
  bigtime: boolean;
  raw: Buffer;
  /** Data fork bytes. */
  fork: Buffer;
}

/** A file's block map: sorted, non-overlapping extents (offsets and lengths in fs blocks). */
interface ExtentMap {
  fileBlock: Float64Array;
  fsBlock: Float64Array;
  blocks: Float64Array;
  unwritten: Uint8Array;
  count: number;
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** CRC32c of a buffer with its 4-byte little-endian CRC field at `at` taken as zero. */
function verifyCrc(buf: Buffer, at: number): boolean {
  const stored = buf.readUInt32LE(at);
  const copy = Buffer.from(buf);
  copy.writeUInt32LE(0, at);
  return crc32c(copy) === stored;
}

// ---------------------------------------------------------------------------------------------
// Superblock

function parseSuperblock(b: Buffer): XfsSuper | undefined {
  if (b.readUInt32BE(0) !== 0x58465342) return undefined; // XFSB
  const where = { fs: FS, structure: 'superblock' };
  const version = b.readUInt16BE(100) & 0x0f;
  if (version !== 5) {
    throw new FsUnsupportedError(`XFS version ${version} filesystems (without metadata CRCs) are not supported`, where);
  }
  const sectorSize = b.readUInt16BE(102);
  if (sectorSize < 512 || sectorSize > 32768 || (sectorSize & (sectorSize - 1)) !== 0 || sectorSize > b.length) {
    throw new FsDamageError(`sector size ${sectorSize} is invalid`, where);
  }
  if (!verifyCrc(b.subarray(0, sectorSize), 224)) throw new FsDamageError('superblock CRC mismatch', where);
  const incompat = b.readUInt32BE(216);
  const unknownIncompat = (incompat & ~SUPPORTED_INCOMPAT) >>> 0;
  if (unknownIncompat !== 0) {
    throw new FsUnsupportedError(`unknown incompatible features ${hex(unknownIncompat)}`, { ...where, incompat },
      'this XFS uses a feature this reader does not know: restore the whole disk and mount it on a recent Linux kernel');
  }
  if (incompat & INCOMPAT_NEEDSREPAIR) {
    throw new FsDamageError('the filesystem is marked as needing xfs_repair', where,
      'xfs_repair was interrupted on this filesystem: restore the disk and run xfs_repair on it');
  }
  const blockSize = b.readUInt32BE(4);
  const blockLog = b[120];
  const inodeSize = b.readUInt16BE(104);
  const inodeLog = b[122];
  const inodesPerBlockLog = b[123];
  const agBlockLog = b[124];
  const agBlocks = b.readUInt32BE(84);
  const agCount = b.readUInt32BE(88);
  const dirBlockLog = b[192];
  const dataBlocks = Number(b.readBigUInt64BE(8));
  const facts = { ...where, blockSize, inodeSize, agBlocks, agCount, dataBlocks };
  if (blockLog < 9 || blockLog > 16 || blockSize !== 2 ** blockLog) throw new FsDamageError('block size is invalid', facts);
  if (inodeLog < 8 || inodeLog > 11 || inodeSize !== 2 ** inodeLog || inodeSize < 512 || inodeSize > blockSize
    || inodesPerBlockLog !== blockLog - inodeLog) {
    throw new FsDamageError('inode size is invalid', facts);
  }
  if (agBlocks < 16 || agCount === 0 || agBlockLog > 31 || 2 ** agBlockLog < agBlocks || 2 ** (agBlockLog - 1) >= agBlocks) {
    throw new FsDamageError('allocation group geometry is invalid', facts);
  }
  if (!Number.isSafeInteger(dataBlocks * blockSize) || dataBlocks > agBlocks * agCount || dataBlocks <= agBlocks * (agCount - 1)) {
    throw new FsDamageError('data block count does not match the allocation groups', facts);
  }
  if (blockLog + dirBlockLog > 16) throw new FsDamageError('directory block size is invalid', facts);
  const hasMetaUuid = (incompat & INCOMPAT_META_UUID) !== 0;
  return {
    blockSize,
    blockLog,
    dataBlocks,
    agBlocks,
    agCount,
    agBlockLog,
    inodeSize,
    inodesPerBlockLog,
    dirBlockLog,
    rootIno: b.readBigUInt64BE(56),
    uuid: Buffer.from(b.subarray(32, 48)),
    metaUuid: Buffer.from(hasMetaUuid ? b.subarray(248, 264) : b.subarray(32, 48)),
    label: b.toString('latin1', 108, 120).replace(/\0+$/, ''),
    hasFtype: (incompat & INCOMPAT_FTYPE) !== 0,
    bigtimeFeature: (incompat & INCOMPAT_BIGTIME) !== 0,
    nrext64: (incompat & INCOMPAT_NREXT64) !== 0,
    asciiCi: (b.readUInt16BE(100) & VERSION_ASCII_CI) !== 0,
  };
}

function formatUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** xfs_da_hashname: the hash directories are indexed by. */
export function xfsDaHash(name: Buffer): number {
  const rol = (x: number, n: number) => ((x << n) | (x >>> (32 - n))) >>> 0;
  let hash = 0;
  let i = 0;
  for (; name.length - i >= 4; i += 4) {
    hash = ((name[i] << 21) ^ (name[i + 1] << 14) ^ (name[i + 2] << 7) ^ name[i + 3] ^ rol(hash, 7 * 4)) >>> 0;
  }
  switch (name.length - i) {
    case 3: return ((name[i] << 14) ^ (name[i + 1] << 7) ^ name[i + 2] ^ rol(hash, 7 * 3)) >>> 0;
    case 2: return ((name[i] << 7) ^ name[i + 1] ^ rol(hash, 7 * 2)) >>> 0;
    case 1: return (name[i] ^ rol(hash, 7)) >>> 0;
    default: return hash;
  }
}

// ---------------------------------------------------------------------------------------------
// The filesystem

export async function probeXfs(dev: BlockDevice): Promise<Filesystem | undefined> {
  if (dev.size < 512) return undefined;
  const first = await dev.read(0, 512);
  if (first.readUInt32BE(0) !== 0x58465342) return undefined;
  const sectorSize = first.readUInt16BE(102);
  const sb = sectorSize > 512 && sectorSize <= 32768 && sectorSize <= dev.size ? await dev.read(0, sectorSize) : first;
  const parsed = parseSuperblock(sb);
  if (!parsed) return undefined;
  const fs = new XfsFilesystem(dev, parsed);
  await fs.checkRoot();
  return fs;
}

interface DataEntry {
  name: Buffer;
  ino: bigint;
  ftype: number;
}

class XfsFilesystem implements Filesystem {
  readonly type = FS;
  readonly label: string | undefined;
  readonly uuid: string;
  readonly rootIno: bigint;
  readonly sizeBytes: number;
  private readonly dev: BlockDevice;
  private readonly sb: XfsSuper;
  private readonly inodes = new LruMap<bigint, XfsInode>(1024);
  private readonly extentMaps = new LruMap<bigint, ExtentMap>(64);

  constructor(dev: BlockDevice, sb: XfsSuper) {
    this.dev = dev;
    this.sb = sb;
    this.label = sb.label || undefined;
    this.uuid = formatUuid(sb.uuid);
    this.rootIno = sb.rootIno;
    this.sizeBytes = sb.dataBlocks * sb.blockSize;
  }

  async checkRoot(): Promise<void> {
    const root = await this.inode(this.rootIno);
    if (root.type !== 'dir') throw new FsDamageError('root inode is not a directory', { fs: FS, ino: this.rootIno, structure: 'root inode' });
  }

  async stat(ino: bigint): Promise<FileStat> {
    const inode = await this.inode(ino);
    const raw = inode.raw;
    const stat: FileStat = {
      ino,
      type: inode.type,
      size: inode.type === 'file' || inode.type === 'symlink' || inode.type === 'dir' ? inode.size : 0,
      mode: inode.mode & 0o7777,
      uid: inode.uid,
      gid: inode.gid,
      nlink: inode.nlink,
    };
    const time = (at: number) => this.timestamp(raw, at, inode.bigtime);
    for (const [key, at] of [['atimeNs', 32], ['mtimeNs', 40], ['ctimeNs', 48], ['birthtimeNs', 144]] as const) {
      const ns = time(at);
      if (ns !== undefined) stat[key] = ns;
    }
    if (inode.type === 'chardev' || inode.type === 'blockdev') {
      const dev = inode.fork.readUInt32BE(0);
      stat.rdev = { major: dev >>> 18, minor: dev & 0x3ffff };
    }
    return stat;
  }

  async readdir(ino: bigint): Promise<DirEntry[]> {
    const dir = await this.directory(ino);
    const entries = await this.dirEntries(dir);
    const parent = entries.parent;
    const out: DirEntry[] = [];
    for (const e of entries.list) {
      const name = e.name.toString('utf8');
      if (e.ino === ino || (e.ino === parent && ino !== this.rootIno)) {
        throw new FsDamageError(`directory lists ${e.ino === ino ? 'itself' : 'its parent'} as '${name}' (a directory cycle)`,
          { fs: FS, ino, structure: 'directory' });
      }
      out.push({ name, ino: e.ino, type: this.sb.hasFtype ? DIRENT_TYPES[e.ftype] ?? 'unknown' : 'unknown' });
    }
    return out;
  }

  async lookup(dirIno: bigint, name: string): Promise<DirEntry | undefined> {
    const dir = await this.directory(dirIno);
    const wanted = Buffer.from(name, 'utf8');
    // "." and ".." are not listed by readdir (short-form directories do not even store them).
    if (wanted.length === 0 || wanted.length > 255 || name === '.' || name === '..') return undefined;
    let found: DataEntry | undefined;
    if (dir.format === DI_FORMAT_LOCAL || this.sb.asciiCi) {
      found = (await this.dirEntries(dir)).list.find((e) => e.name.equals(wanted));
    } else {
      found = await this.hashedLookup(dir, wanted);
    }
    if (!found) return undefined;
    return { name, ino: found.ino, type: this.sb.hasFtype ? DIRENT_TYPES[found.ftype] ?? 'unknown' : 'unknown' };
  }

  async read(ino: bigint, offset: number, length: number, stream?: string): Promise<Buffer> {
    if (stream !== undefined) throw noSuchStream(FS, ino, stream);
    const inode = await this.inode(ino);
    if (inode.type === 'dir') throw isDirectory(FS, ino);
    const size = inode.type === 'file' || inode.type === 'symlink' ? inode.size : 0;
    const count = clampRead(FS, offset, length, size);
    if (count === 0) return Buffer.alloc(0);
    if (inode.type === 'symlink') return Buffer.from(Buffer.from(await this.readlink(ino), 'utf8').subarray(offset, offset + count));
    this.checkDataDevice(inode);
    return this.readMapped(inode, offset, count, { fs: FS, ino, structure: 'file data' });
  }

  async extents(ino: bigint): Promise<FileExtent[]> {
    const inode = await this.inode(ino);
    if (inode.type === 'dir') throw isDirectory(FS, ino);
    if (inode.type !== 'file' || inode.size === 0) return [];
    this.checkDataDevice(inode);
    const map = await this.extentMap(inode);
    const bs = this.sb.blockSize;
    const out: FileExtent[] = [];
    let covered = 0;
    for (let i = 0; i < map.count && covered < inode.size; i++) {
      const from = Math.min(map.fileBlock[i] * bs, inode.size);
      const to = Math.min((map.fileBlock[i] + map.blocks[i]) * bs, inode.size);
      pushExtent(out, covered, from - covered, true);
      pushExtent(out, from, to - from, map.unwritten[i] === 1);
      covered = to;
    }
    pushExtent(out, covered, inode.size - covered, true);
    return out;
  }

  async readlink(ino: bigint): Promise<string> {
    const inode = await this.inode(ino);
    if (inode.type !== 'symlink') throw notSymlink(FS, ino);
    const where = { fs: FS, ino, structure: 'symlink' };
    if (inode.size === 0 || inode.size > MAX_SYMLINK_LENGTH) throw new FsDamageError(`symlink length ${inode.size} is invalid`, where);
    if (inode.format === DI_FORMAT_LOCAL) {
      if (inode.size > inode.fork.length) throw new FsDamageError('inline symlink overruns the inode', where);
      return inode.fork.toString('utf8', 0, inode.size);
    }
    return this.remoteSymlink(inode, where);
  }

  // -------------------------------------------------------------------------------------------
  // Geometry and inodes

  private timestamp(raw: Buffer, at: number, bigtime: boolean): bigint | undefined {
    if (bigtime) {
      const ns = raw.readBigUInt64BE(at);
      return ns === 0n ? undefined : ns - BIGTIME_EPOCH_OFFSET_NS;
    }
    const sec = raw.readInt32BE(at);
    const nsec = raw.readUInt32BE(at + 4);
    if (nsec >= 1_000_000_000) return undefined;
    return BigInt(sec) * 1_000_000_000n + BigInt(nsec);
  }

  /** Byte offset of filesystem block `fsb` (AG number in the high bits), checked to be inside the filesystem. */
  private blockOffset(fsb: number, count: number, where: FsDamageContext): number {
    const ag = Math.floor(fsb / 2 ** this.sb.agBlockLog);
    const agBlock = fsb % 2 ** this.sb.agBlockLog;
    const linear = ag * this.sb.agBlocks + agBlock;
    if (ag >= this.sb.agCount || agBlock + count > this.sb.agBlocks || linear + count > this.sb.dataBlocks || count < 0) {
      throw new FsDamageError(`block ${fsb} (+${count}) lies outside the filesystem`, { ...where, fsBlock: fsb, blocks: count });
    }
    return linear * this.sb.blockSize;
  }

  private async inode(ino: bigint): Promise<XfsInode> {
    const cached = this.inodes.get(ino);
    if (cached) return cached;
    const inode = await this.loadInode(ino);
    this.inodes.set(ino, inode);
    return inode;
  }

  private async loadInode(ino: bigint): Promise<XfsInode> {
    const sb = this.sb;
    const where = { fs: FS, ino, structure: 'inode' };
    const slotBits = BigInt(sb.inodesPerBlockLog);
    const agBits = BigInt(sb.agBlockLog) + slotBits;
    if (ino <= 0n || ino >> agBits >= BigInt(sb.agCount)) throw new FsDamageError(`inode number ${ino} is outside the filesystem`, where);
    const fsb = Number(ino >> slotBits);
    const slot = Number(ino & ((1n << slotBits) - 1n));
    const offset = this.blockOffset(fsb, 1, where) + slot * sb.inodeSize;
    const raw = await readRange(this.dev, offset, sb.inodeSize, where);
    if (raw.readUInt16BE(0) !== 0x494e) throw new FsDamageError('inode magic is not "IN"', where);
    if (raw[4] !== 3) throw new FsDamageError(`inode version ${raw[4]} on a v5 filesystem`, where);
    if (!verifyCrc(raw, 100)) throw new FsDamageError('inode CRC mismatch', where);
    if (raw.readBigUInt64BE(152) !== ino) throw new FsDamageError(`inode says it is inode ${raw.readBigUInt64BE(152)}`, where);
    if (!raw.subarray(160, 176).equals(sb.metaUuid)) throw new FsDamageError('inode belongs to another filesystem (UUID mismatch)', where);
    const mode = raw.readUInt16BE(2);
    const type = MODE_TYPES[mode & S_IFMT];
    if (mode === 0 || !type) throw new FsDamageError(mode === 0 ? 'inode is not in use' : `inode mode ${mode.toString(8)} has no valid type`, where);
    const flags2 = raw.readBigUInt64BE(120);
    const nrext64 = (flags2 & BigInt(DIFLAG2_NREXT64)) !== 0n;
    if (nrext64 && !sb.nrext64) throw new FsDamageError('inode uses large extent counts the filesystem does not enable', where);
    const nextents = nrext64 ? Number(raw.readBigUInt64BE(24)) : raw.readUInt32BE(76);
    const forkOffset = raw[82] * 8;
    const literal = sb.inodeSize - DINODE_CORE_V3;
    if (forkOffset >= literal) throw new FsDamageError(`attribute fork offset ${forkOffset} is past the inode`, where);
    const size = Number(raw.readBigInt64BE(56));
    if (!Number.isSafeInteger(size) || size < 0) throw new FsDamageError(`size ${raw.readBigInt64BE(56)} is invalid`, where);
    const format = raw[5];
    const expected = type === 'dir' || type === 'symlink' || type === 'file'
      ? [DI_FORMAT_EXTENTS, DI_FORMAT_BTREE, ...(type === 'file' ? [] : [DI_FORMAT_LOCAL])]
      : [DI_FORMAT_DEV];
    if (!expected.includes(format)) throw new FsDamageError(`data fork format ${format} is invalid for a ${type}`, where);
    if (!Number.isSafeInteger(nextents) || nextents > sb.dataBlocks) throw new FsDamageError(`extent count ${nextents} is absurd`, where);
    return {
      ino,
      mode,
      type,
      format,
      uid: raw.readUInt32BE(8),
      gid: raw.readUInt32BE(12),
      nlink: raw.readUInt32BE(16),
      size,
      nextents,
      flags: raw.readUInt16BE(90),
      bigtime: (flags2 & BigInt(DIFLAG2_BIGTIME)) !== 0n,
      raw,
      fork: raw.subarray(DINODE_CORE_V3, DINODE_CORE_V3 + (forkOffset || literal)),
    };
  }

  private checkDataDevice(inode: XfsInode): void {
    if (inode.flags & DIFLAG_REALTIME) {
      throw new FsUnsupportedError('the file lives on the realtime device, which is not part of this disk', { fs: FS, ino: inode.ino, structure: 'inode' });
    }
  }

  // -------------------------------------------------------------------------------------------
  // Block maps

  private async extentMap(inode: XfsInode): Promise<ExtentMap> {
    const cached = this.extentMaps.get(inode.ino);
    if (cached) return cached;
    const where = { fs: FS, ino: inode.ino, structure: 'extent list' };
    if (inode.nextents > MAX_EXTENTS) throw new FsUnsupportedError(`${inode.nextents} extents are more than this reader keeps in memory`, where);
    const collector = new ExtentCollector(inode.nextents);
    if (inode.format === DI_FORMAT_EXTENTS) {
      if (inode.nextents * 16 > inode.fork.length) throw new FsDamageError(`${inode.nextents} extents do not fit the inode`, where);
      for (let i = 0; i < inode.nextents; i++) collector.add(inode.fork, i * 16, where);
    } else if (inode.format === DI_FORMAT_BTREE) {
      await this.walkBmbt(inode, collector, where);
    } else {
      throw new FsDamageError(`data fork format ${inode.format} has no block map`, where);
    }
    const map = collector.finish(where);
    for (let i = 0; i < map.count; i++) this.blockOffset(map.fsBlock[i], map.blocks[i], { ...where, extent: i });
    this.extentMaps.set(inode.ino, map);
    return map;
  }

  /** Walks the extent B+tree rooted in the inode, adding leaf records in order. */
  private async walkBmbt(inode: XfsInode, collector: ExtentCollector, where: FsDamageContext): Promise<void> {
    const fork = inode.fork;
    const level = fork.readUInt16BE(0);
    const numrecs = fork.readUInt16BE(2);
    const maxrecs = Math.floor((fork.length - 4) / 16);
    if (level === 0 || level > MAX_BMBT_LEVELS || numrecs === 0 || numrecs > maxrecs) {
      throw new FsDamageError(`extent B+tree root has level ${level} and ${numrecs} records (max ${maxrecs})`, where);
    }
    const visited = new Set<number>();
    for (let i = 0; i < numrecs; i++) {
      const ptr = Number(fork.readBigUInt64BE(4 + maxrecs * 8 + i * 8));
      await this.walkBmbtBlock(inode, ptr, level - 1, collector, visited, where);
    }
  }

  private async walkBmbtBlock(inode: XfsInode, fsb: number, level: number, collector: ExtentCollector, visited: Set<number>, where: FsDamageContext): Promise<void> {
    const at = { ...where, structure: 'extent B+tree block', fsBlock: fsb };
    if (visited.has(fsb)) throw new FsDamageError(`extent B+tree block ${fsb} is reached twice`, at);
    visited.add(fsb);
    const bs = this.sb.blockSize;
    const offset = this.blockOffset(fsb, 1, at);
    const block = await readRange(this.dev, offset, bs, at);
    if (block.readUInt32BE(0) !== BMAP_BTREE_MAGIC) throw new FsDamageError(`magic ${hex(block.readUInt32BE(0))} is not BMA3`, at);
    if (!verifyCrc(block, 64)) throw new FsDamageError('extent B+tree block CRC mismatch', at);
    if (block.readBigUInt64BE(56) !== inode.ino) throw new FsDamageError(`block belongs to inode ${block.readBigUInt64BE(56)}`, at);
    if (Number(block.readBigUInt64BE(24)) !== offset / 512) throw new FsDamageError('block records another disk address', at);
    const blockLevel = block.readUInt16BE(4);
    const numrecs = block.readUInt16BE(6);
    if (blockLevel !== level) throw new FsDamageError(`block has level ${blockLevel}, expected ${level}`, at);
    if (level === 0) {
      // Every leaf holds at least one record, which bounds the walk by the declared extent count.
      if (numrecs === 0 || BTREE_LONG_HEADER + numrecs * 16 > bs) throw new FsDamageError(`leaf with ${numrecs} records`, at);
      for (let i = 0; i < numrecs; i++) collector.add(block, BTREE_LONG_HEADER + i * 16, at);
      return;
    }
    const maxrecs = Math.floor((bs - BTREE_LONG_HEADER) / 16);
    if (numrecs === 0 || numrecs > maxrecs) throw new FsDamageError(`${numrecs} keys in a node (max ${maxrecs})`, at);
    for (let i = 0; i < numrecs; i++) {
      const ptr = Number(block.readBigUInt64BE(BTREE_LONG_HEADER + maxrecs * 8 + i * 8));
      await this.walkBmbtBlock(inode, ptr, level - 1, collector, visited, where);
    }
  }

  /** Reads [offset, offset+length) of a file through its block map (holes and unwritten extents are zeros). */
  private async readMapped(inode: XfsInode, offset: number, length: number, where: FsDamageContext): Promise<Buffer> {
    const map = await this.extentMap(inode);
    const bs = this.sb.blockSize;
    const out = Buffer.alloc(length);
    const end = offset + length;
    const reads: Array<Promise<void>> = [];
    // First extent that ends after `offset`.
    let lo = 0;
    let hi = map.count;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((map.fileBlock[mid] + map.blocks[mid]) * bs <= offset) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < map.count && map.fileBlock[i] * bs < end; i++) {
      if (map.unwritten[i]) continue;
      const from = Math.max(offset, map.fileBlock[i] * bs);
      const to = Math.min(end, (map.fileBlock[i] + map.blocks[i]) * bs);
      const devOffset = this.blockOffset(map.fsBlock[i], map.blocks[i], where) + (from - map.fileBlock[i] * bs);
      reads.push(readRange(this.dev, devOffset, to - from, where).then((buf) => { buf.copy(out, from - offset); }));
    }
    await Promise.all(reads);
    return out;
  }

  private async remoteSymlink(inode: XfsInode, where: FsDamageContext): Promise<string> {
    const map = await this.extentMap(inode);
    const bs = this.sb.blockSize;
    const parts: Buffer[] = [];
    let got = 0;
    for (let i = 0; i < map.count && got < inode.size; i++) {
      for (let b = 0; b < map.blocks[i] && got < inode.size; b++) {
        const offset = this.blockOffset(map.fsBlock[i] + b, 1, where);
        const block = await readRange(this.dev, offset, bs, where);
        if (block.readUInt32BE(0) !== SYMLINK_MAGIC) throw new FsDamageError('remote symlink block magic is not XSLM', where);
        if (!verifyCrc(block, 12)) throw new FsDamageError('remote symlink block CRC mismatch', where);
        if (block.readBigUInt64BE(32) !== inode.ino) throw new FsDamageError('remote symlink block belongs to another inode', where);
        const blockOffsetInLink = block.readUInt32BE(4);
        const bytes = block.readUInt32BE(8);
        if (blockOffsetInLink !== got || bytes > bs - SYMLINK_HEADER || got + bytes > inode.size || bytes === 0) {
          throw new FsDamageError(`remote symlink block claims bytes ${blockOffsetInLink}..${blockOffsetInLink + bytes}`, where);
        }
        parts.push(block.subarray(SYMLINK_HEADER, SYMLINK_HEADER + bytes));
        got += bytes;
      }
    }
    if (got !== inode.size) throw new FsDamageError(`remote symlink holds ${got} of ${inode.size} bytes`, where);
    return Buffer.concat(parts).toString('utf8');
  }

  // -------------------------------------------------------------------------------------------
  // Directories

  private async directory(ino: bigint): Promise<XfsInode> {
    const inode = await this.inode(ino);
    if (inode.type !== 'dir') throw notDirectory(FS, ino);
    return inode;
  }

  private get dirBlockSize(): number {
    return this.sb.blockSize * 2 ** this.sb.dirBlockLog;
  }

  /** All entries of a directory (without "." and ".."), plus its parent's inode number. */
  private async dirEntries(dir: XfsInode): Promise<{ list: DataEntry[]; parent: bigint | undefined }> {
    if (dir.format === DI_FORMAT_LOCAL) return this.shortFormEntries(dir);
    const map = await this.extentMap(dir);
    const list: DataEntry[] = [];
    let parent: bigint | undefined;
    for (const dirBlock of this.dataDirBlocks(map, dir.size)) {
      const block = await this.dirBlock(dir, dirBlock);
      for (const e of this.dataBlockEntries(dir, block, dirBlock)) {
        const name = e.name.toString('latin1');
        if (name === '.') continue;
        if (name === '..') parent = e.ino;
        else list.push(e);
      }
    }
    return { list, parent };
  }

  private shortFormEntries(dir: XfsInode): { list: DataEntry[]; parent: bigint } {
    const where = { fs: FS, ino: dir.ino, structure: 'short-form directory' };
    const fork = dir.fork;
    if (dir.size > fork.length || dir.size < 6) throw new FsDamageError(`short-form size ${dir.size} does not fit the inode`, where);
    const data = fork.subarray(0, dir.size);
    const count = data[0];
    const wide = data[1] > 0;
    const inoSize = wide ? 8 : 4;
    const readIno = (at: number): bigint => (wide ? data.readBigUInt64BE(at) : BigInt(data.readUInt32BE(at)));
    const parent = readIno(2);
    let at = 2 + inoSize;
    const list: DataEntry[] = [];
    for (let i = 0; i < count; i++) {
      const nameLength = data[at];
      const entrySize = 3 + nameLength + (this.sb.hasFtype ? 1 : 0) + inoSize;
      if (nameLength === 0 || at + entrySize > data.length) throw new FsDamageError(`entry ${i} overruns the short-form directory`, where);
      const name = Buffer.from(data.subarray(at + 3, at + 3 + nameLength));
      const ftype = this.sb.hasFtype ? data[at + 3 + nameLength] : 0;
      list.push({ name, ftype, ino: readIno(at + 3 + nameLength + (this.sb.hasFtype ? 1 : 0)) });
      at += entrySize;
    }
    return { list, parent };
  }

  /** Directory block numbers of the data section (which ends at the directory's size), in order. */
  private *dataDirBlocks(map: ExtentMap, size: number): Generator<number> {
    const perDirBlock = 2 ** this.sb.dirBlockLog;
    const leafBlock = Math.min(DIR_LEAF_OFFSET, size) / this.sb.blockSize;
    let last = -1;
    for (let i = 0; i < map.count; i++) {
      const first = map.fileBlock[i];
      const end = Math.min(first + map.blocks[i], leafBlock);
      for (let b = first; b < end; b++) {
        const dirBlock = Math.floor(b / perDirBlock);
        if (dirBlock !== last) yield dirBlock;
        last = dirBlock;
      }
    }
  }

  /** Reads one directory block (dirBlockSize bytes at directory block `dirBlock`), checking its CRC and owner. */
  private async dirBlock(dir: XfsInode, dirBlock: number): Promise<Buffer> {
    const where = { fs: FS, ino: dir.ino, structure: 'directory block', dirBlock };
    const map = await this.extentMap(dir);
    const perDirBlock = 2 ** this.sb.dirBlockLog;
    const bs = this.sb.blockSize;
    const parts: Buffer[] = [];
    let firstDaddr = -1;
    for (let b = dirBlock * perDirBlock; b < (dirBlock + 1) * perDirBlock; b++) {
      const i = findExtent(map, b);
      if (i < 0 || map.unwritten[i]) throw new FsDamageError(`directory block ${dirBlock} is not mapped`, where);
      const offset = this.blockOffset(map.fsBlock[i] + (b - map.fileBlock[i]), 1, where);
      if (firstDaddr < 0) firstDaddr = offset / 512;
      parts.push(await readRange(this.dev, offset, bs, where));
    }
    const block = parts.length === 1 ? parts[0] : Buffer.concat(parts);
    const magic32 = block.readUInt32BE(0);
    const magic16 = block.readUInt16BE(8);
    // Data/block/free blocks keep their CRC at byte 4, da (leaf/node) blocks at byte 12.
    const isData = magic32 === DIR3_BLOCK_MAGIC || magic32 === DIR3_DATA_MAGIC || magic32 === 0x58444633;
    const isDa = magic16 === DIR3_LEAF1_MAGIC || magic16 === DIR3_LEAFN_MAGIC || magic16 === DA3_NODE_MAGIC;
    if (!isData && !isDa) throw new FsDamageError(`unknown directory block magic ${hex(magic32)}`, where);
    const crcAt = isData ? 4 : 12;
    const base = isData ? 8 : 16; // blkno, lsn, uuid, owner follow the CRC
    if (!verifyCrc(block, crcAt)) throw new FsDamageError('directory block CRC mismatch', where);
    if (block.readBigUInt64BE(base + 32) !== dir.ino) throw new FsDamageError(`directory block belongs to inode ${block.readBigUInt64BE(base + 32)}`, where);
    if (!block.subarray(base + 16, base + 32).equals(this.sb.metaUuid)) throw new FsDamageError('directory block UUID mismatch', where);
    if (Number(block.readBigUInt64BE(base)) !== firstDaddr) throw new FsDamageError('directory block records another disk address', where);
    return block;
  }

  /** Entries of a data (XDD3) or single-block (XDB3) directory block. */
  private dataBlockEntries(dir: XfsInode, block: Buffer, dirBlock: number): DataEntry[] {
    const where = { fs: FS, ino: dir.ino, structure: 'directory data block', dirBlock };
    const magic = block.readUInt32BE(0);
    if (magic !== DIR3_DATA_MAGIC && magic !== DIR3_BLOCK_MAGIC) throw new FsDamageError(`magic ${hex(magic)} is not a data block`, where);
    let end = block.length;
    if (magic === DIR3_BLOCK_MAGIC) {
      const count = block.readUInt32BE(block.length - 8);
      end = block.length - 8 - count * 8;
      if (end < DIR3_DATA_HEADER) throw new FsDamageError(`${count} leaf entries overrun the block`, where);
    }
    const out: DataEntry[] = [];
    let at = DIR3_DATA_HEADER;
    while (at < end) {
      if (block.readUInt16BE(at) === 0xffff) {
        const length = block.readUInt16BE(at + 2);
        if (length < 8 || length % 8 !== 0 || at + length > end) throw new FsDamageError(`free space of ${length} bytes at ${at}`, where);
        at += length;
        continue;
      }
      out.push(this.dataEntryAt(block, at, end, where));
      at += this.dataEntrySize(block[at + 8]);
    }
    return out;
  }

  private dataEntrySize(nameLength: number): number {
    return Math.ceil((8 + 1 + nameLength + (this.sb.hasFtype ? 1 : 0) + 2) / 8) * 8;
  }

  private dataEntryAt(block: Buffer, at: number, end: number, where: FsDamageContext): DataEntry {
    if (at + 16 > end) throw new FsDamageError(`entry at ${at} overruns the block`, where);
    const nameLength = block[at + 8];
    const size = this.dataEntrySize(nameLength);
    if (nameLength === 0 || at + size > end) throw new FsDamageError(`entry at ${at} with a ${nameLength}-byte name overruns the block`, where);
    if (block.readUInt16BE(at + size - 2) !== at) throw new FsDamageError(`entry at ${at} has a wrong tag`, where);
    return {
      ino: block.readBigUInt64BE(at),
      name: Buffer.from(block.subarray(at + 9, at + 9 + nameLength)),
      ftype: this.sb.hasFtype ? block[at + 9 + nameLength] : 0,
    };
  }

  /** Lookup through the name hash: block directories' leaf tail, or the leaf/node B+tree. */
  private async hashedLookup(dir: XfsInode, name: Buffer): Promise<DataEntry | undefined> {
    const hash = xfsDaHash(name);
    const map = await this.extentMap(dir);
    const first = await this.dirBlock(dir, 0);
    const addresses: number[] = [];
    if (first.readUInt32BE(0) === DIR3_BLOCK_MAGIC) {
      const count = first.readUInt32BE(first.length - 8);
      const start = first.length - 8 - count * 8;
      if (start < DIR3_DATA_HEADER) throw new FsDamageError('block directory leaf overruns the block', { fs: FS, ino: dir.ino, structure: 'directory leaf' });
      for (let i = 0; i < count; i++) {
        if (first.readUInt32BE(start + i * 8) === hash) addresses.push(first.readUInt32BE(start + i * 8 + 4));
      }
    } else {
      const leafDirBlock = DIR_LEAF_OFFSET / this.dirBlockSize;
      if (findExtent(map, leafDirBlock * 2 ** this.sb.dirBlockLog) < 0) {
        throw new FsDamageError('multi-block directory has no leaf block', { fs: FS, ino: dir.ino, structure: 'directory leaf' });
      }
      addresses.push(...await this.leafAddresses(dir, leafDirBlock, hash));
    }
    for (const address of addresses) {
      if (address === 0) continue; // stale entry
      const byteOffset = address * 8;
      const dirBlock = Math.floor(byteOffset / this.dirBlockSize);
      const block = dirBlock === 0 ? first : await this.dirBlock(dir, dirBlock);
      const at = byteOffset % this.dirBlockSize;
      const end = block.readUInt32BE(0) === DIR3_BLOCK_MAGIC ? block.length - 8 - block.readUInt32BE(block.length - 8) * 8 : block.length;
      const entry = this.dataEntryAt(block, at, end, { fs: FS, ino: dir.ino, structure: 'directory data block', dirBlock });
      if (entry.name.equals(name)) return entry;
    }
    return undefined;
  }

  /** Data addresses of all leaf entries with `hash`, descending da nodes from the leaf root. */
  private async leafAddresses(dir: XfsInode, rootDirBlock: number, hash: number): Promise<number[]> {
    const where = { fs: FS, ino: dir.ino, structure: 'directory leaf/node' };
    let dirBlock = rootDirBlock;
    let block = await this.dirBlock(dir, dirBlock);
    for (let depth = 0; block.readUInt16BE(8) === DA3_NODE_MAGIC; depth++) {
      if (depth >= DA_MAX_DEPTH) throw new FsDamageError(`da B+tree is deeper than ${DA_MAX_DEPTH} levels`, where);
      const count = block.readUInt16BE(56);
      if (count === 0 || DA3_HEADER + count * 8 > block.length) throw new FsDamageError(`node with ${count} entries`, where);
      let next = block.readUInt32BE(DA3_HEADER + (count - 1) * 8 + 4);
      for (let i = 0; i < count; i++) {
        if (block.readUInt32BE(DA3_HEADER + i * 8) >= hash) {
          next = block.readUInt32BE(DA3_HEADER + i * 8 + 4);
          break;
        }
      }
      dirBlock = this.dirBlockFromFsBlock(next);
      block = await this.dirBlock(dir, dirBlock);
    }
    // Leaves: equal hashes may continue into the next leaf (forward sibling).
    const out: number[] = [];
    const seen = new Set<number>();
    for (;;) {
      const magic = block.readUInt16BE(8);
      if (magic !== DIR3_LEAF1_MAGIC && magic !== DIR3_LEAFN_MAGIC) throw new FsDamageError(`magic ${hex(magic)} is not a leaf`, where);
      seen.add(dirBlock);
      const count = block.readUInt16BE(56);
      if (DA3_HEADER + count * 8 > block.length) throw new FsDamageError(`leaf with ${count} entries overruns its block`, where);
      let lastHash = -1;
      for (let i = 0; i < count; i++) {
        const h = block.readUInt32BE(DA3_HEADER + i * 8);
        if (h === hash) out.push(block.readUInt32BE(DA3_HEADER + i * 8 + 4));
        lastHash = h;
      }
      const forward = block.readUInt32BE(0);
      if (lastHash !== hash || forward === 0) return out;
      dirBlock = this.dirBlockFromFsBlock(forward);
      if (seen.has(dirBlock)) throw new FsDamageError('leaf sibling chain loops', where);
      block = await this.dirBlock(dir, dirBlock);
    }
  }

  /** da B+tree pointers are directory-relative file block numbers. */
  private dirBlockFromFsBlock(fileBlock: number): number {
    return Math.floor(fileBlock / 2 ** this.sb.dirBlockLog);
  }
}

// ---------------------------------------------------------------------------------------------

/** Collects extent records, checking order and overlap; grows with what it finds, not with what is claimed. */
class ExtentCollector {
  private map: ExtentMap;
  private readonly declared: number;

  constructor(declared: number) {
    this.declared = declared;
    this.map = emptyExtentMap(Math.min(Math.max(declared, 1), 1024));
  }

  add(buf: Buffer, at: number, where: FsDamageContext): void {
    let map = this.map;
    if (map.count >= this.declared) throw new FsDamageError(`more extents than the ${this.declared} the inode declares`, where);
    if (map.count === map.fileBlock.length) map = this.map = grownExtentMap(map, Math.min(this.declared, map.count * 2));
    const l0 = buf.readBigUInt64BE(at);
    const l1 = buf.readBigUInt64BE(at + 8);
    const fileBlock = Number((l0 & 0x7fffffffffffffffn) >> 9n);
    const fsBlock = Number(((l0 & 0x1ffn) << 43n) | (l1 >> 21n));
    const blocks = Number(l1 & 0x1fffffn);
    const i = map.count;
    if (blocks === 0) throw new FsDamageError(`extent ${i} has no blocks`, where);
    if (i > 0 && fileBlock < map.fileBlock[i - 1] + map.blocks[i - 1]) {
      throw new FsDamageError(`extent ${i} at file block ${fileBlock} overlaps or precedes the previous one`, { ...where, extent: i });
    }
    map.fileBlock[i] = fileBlock;
    map.fsBlock[i] = fsBlock;
    map.blocks[i] = blocks;
    map.unwritten[i] = l0 >> 63n ? 1 : 0;
    map.count++;
  }

  finish(where: FsDamageContext): ExtentMap {
    if (this.map.count !== this.declared) {
      throw new FsDamageError(`found ${this.map.count} extents, the inode declares ${this.declared}`, where);
    }
    return this.map;
  }
}

function emptyExtentMap(capacity: number): ExtentMap {
  return {
    fileBlock: new Float64Array(capacity),
    fsBlock: new Float64Array(capacity),
    blocks: new Float64Array(capacity),
    unwritten: new Uint8Array(capacity),
    count: 0,
  };
}

function grownExtentMap(map: ExtentMap, capacity: number): ExtentMap {
  const grown = emptyExtentMap(capacity);
  grown.fileBlock.set(map.fileBlock);
  grown.fsBlock.set(map.fsBlock);
  grown.blocks.set(map.blocks);
  grown.unwritten.set(map.unwritten);
  grown.count = map.count;
  return grown;
}

/** Index of the extent containing file block `block`, or -1. */
function findExtent(map: ExtentMap, block: number): number {
  let lo = 0;
  let hi = map.count - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (block < map.fileBlock[mid]) hi = mid - 1;
    else if (block >= map.fileBlock[mid] + map.blocks[mid]) lo = mid + 1;
    else return mid;
  }
  return -1;
}
