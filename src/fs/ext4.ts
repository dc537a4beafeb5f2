/**
 * Read-only ext2/ext3/ext4 reader.
 *
 * Supports: 64bit, extents and indirect block maps, flex_bg, meta_bg, sparse_super(2), inline
 * data (files, directories and symlinks), linear and hashed (htree) directories, fast and slow
 * symlinks, device nodes, nanosecond times, huge_file, and metadata_csum (superblock, group
 * descriptors, inodes, extent blocks, directory leaves and htree nodes are verified; a mismatch is
 * an FsDamageError for that structure) or the older gdt_csum. Unknown INCOMPAT features are
 * refused. A filesystem that was not cleanly unmounted (a crash-consistent snapshot) has its
 * journal replayed in memory (ext4-journal.ts), as the kernel would at mount.
 *
 * Lazy by design: the superblock and the group descriptor table are read at mount (like the
 * kernel does); everything else is read on demand through a small block cache. Nothing scans
 * bitmaps or inode tables.
 */
import { BadInputError } from '../util/errors.ts';
import { cachedDevice } from './block-cache.ts';
import { FsDamageError, FsUnsupportedError } from './errors.ts';
import type { BlockDevice, DirEntry, FileExtent, FileStat, FileType, Filesystem } from './filesystem.ts';
import {
  BG_FLAG, COMPAT, INCOMPAT, INODE_FLAG, RO_COMPAT, ROOT_INO, S_IFMT, SUPERBLOCK_OFFSET,
  damage, formatUuid, groupDescChecksumProblem, groupDescLocation, groupFirstBlock, groupHasSuper,
  groupSuperAndGdtRange, has, parseGroupDesc, parseInode, parseSuperblock,
} from './ext4-structures.ts';
import type { GroupDesc, Inode, Superblock } from './ext4-structures.ts';
import { indirectMapLimit, mapBlocks } from './ext4-blockmap.ts';
import type { BlockMapContext, BlockRun } from './ext4-blockmap.ts';
import {
  DX_NODE_ENTRIES_OFFSET, DX_ROOT_ENTRIES_OFFSET, direntType, dxFindSlot, isDxNode, leafEntryBytes,
  parseDirEntries, parseDxEntries, parseDxRootInfo,
} from './ext4-dir.ts';
import type { DirFormat, DxEntries, RawDirEntry } from './ext4-dir.ts';
import { extDirHash } from './ext4-dirhash.ts';
import { replayJournal, unescapeJournalBlock } from './ext4-journal.ts';

/** Group descriptor tables larger than this (a ~64 TiB filesystem) are refused. */
const MAX_GDT_BYTES = 32 * 1024 * 1024;
/** Directories larger than this are refused: readdir returns them whole. */
const MAX_DIR_BYTES = 64 * 1024 * 1024;
/** One read() call returns at most this much. */
const MAX_READ_BYTES = 256 * 1024 * 1024;
const INODE_CACHE_ENTRIES = 4096;
const DIR_WINDOW_BLOCKS = 64;
const XATTR_MAGIC = 0xea020000;
const XATTR_INDEX_SYSTEM = 7;
const MAX_SYMLINK_BYTES = 4096;

/** Probe: an ext2/3/4 Filesystem when the device holds one, undefined when it does not. */
export async function probeExt(dev: BlockDevice): Promise<Filesystem | undefined> {
  if (dev.size < SUPERBLOCK_OFFSET + 1024) return undefined;
  const raw = await dev.read(SUPERBLOCK_OFFSET, 1024);
  const sb = parseSuperblock(raw, dev.size);
  if (!sb) return undefined;
  const fs = new ExtFilesystem(dev, sb);
  await fs.mount();
  return fs;
}

interface GroupState {
  desc?: GroupDesc;
  problem?: string;
}

export class ExtFilesystem implements Filesystem, BlockMapContext {
  readonly type: string;
  readonly label: string | undefined;
  readonly uuid: string | undefined;
  readonly rootIno = BigInt(ROOT_INO);
  readonly sizeBytes: number;
  /**
   * The filesystem was not cleanly unmounted (a crash-consistent snapshot): its journal is replayed
   * in memory at mount, see `journalBlocks` and `warnings`.
   */
  readonly needsRecovery: boolean;
  /** Blocks whose newest copy comes from the journal. */
  journalBlocks = 0;
  /** Things that did not prevent reading but make the view less than exact (journal problems). */
  readonly warnings: string[] = [];
  readonly fsType: string;
  readonly sb: Superblock;
  readonly metadataCsum: boolean;

  private readonly dev: BlockDevice;
  private readonly dirFormat: DirFormat;
  private gdt: Buffer = Buffer.alloc(0);
  private readonly groups = new Map<number, GroupState>();
  private readonly inodes = new Map<number, Inode>();
  private metadataRanges: Float64Array | undefined;
  /** Journal replay overlay: filesystem block → physical block of its newest journal copy. */
  private overlay = new Map<number, { pblk: number; escaped: boolean }>();

  constructor(dev: BlockDevice, sb: Superblock) {
    this.sb = sb;
    this.fsType = sb.fsType;
    this.type = sb.fsType;
    this.label = sb.label === '' ? undefined : sb.label;
    this.uuid = formatUuid(sb.uuid);
    this.sizeBytes = sb.blocksCount * sb.blockSize;
    this.metadataCsum = has(sb.roCompat, RO_COMPAT.metadataCsum);
    this.needsRecovery = has(sb.incompat, INCOMPAT.recover);
    this.dev = cachedDevice(dev, { blockSize: Math.max(sb.blockSize, 64 * 1024), maxBytes: 16 * 1024 * 1024 });
    this.dirFormat = {
      blockSize: sb.blockSize,
      hasFileType: has(sb.incompat, INCOMPAT.filetype),
      inodesCount: sb.inodesCount,
      metadataCsum: this.metadataCsum,
    };
  }

  /** Reads the group descriptor table, replays the journal if needed, checks the root directory. */
  async mount(): Promise<void> {
    await this.loadGroupDescriptors();
    if (this.needsRecovery) {
      await this.replayJournal();
      if (this.overlay.size > 0) {
        // The group descriptors themselves may have newer copies in the journal.
        this.groups.clear();
        this.inodes.clear();
        this.metadataRanges = undefined;
        await this.loadGroupDescriptors();
      }
    }
    const root = await this.inode(ROOT_INO);
    if ((root.mode & S_IFMT) !== 0o040000) throw damage(this.fsType, 'the root inode is not a directory', 'inode', ROOT_INO);
  }

  private async loadGroupDescriptors(): Promise<void> {
    const { sb } = this;
    const gdtBytes = sb.groupCount * sb.descSize;
    if (gdtBytes > MAX_GDT_BYTES) {
      throw new FsUnsupportedError(`${sb.groupCount} block groups: the filesystem is too large for this reader`, {
        fs: this.fsType, structure: 'group descriptors',
      });
    }
    const perBlock = sb.blockSize / sb.descSize;
    const blocks = Math.ceil(sb.groupCount / perBlock);
    const parts: Buffer[] = [];
    const contiguous = has(sb.incompat, INCOMPAT.metaBg) ? Math.min(blocks, sb.firstMetaBg) : blocks;
    if (contiguous > 0) parts.push(await this.readBlocks(groupDescLocation(sb, 0).block, contiguous));
    for (let metaGroup = contiguous; metaGroup < blocks; metaGroup++) {
      parts.push(await this.readBlock(groupDescLocation(sb, metaGroup * perBlock).block));
    }
    this.gdt = Buffer.concat(parts);
  }

  /**
   * Builds the journal overlay. A journal that cannot be read leaves the filesystem readable as
   * it is on disk, with a warning: that is what e2fsck -n would show too.
   */
  private async replayJournal(): Promise<void> {
    const { sb } = this;
    if (sb.journalInum === 0) {
      this.warnings.push('the filesystem needs journal recovery but its journal is external: read without replay');
      return;
    }
    try {
      const journal = await this.inode(sb.journalInum);
      const journalBlocks = Math.floor(journal.size / sb.blockSize);
      const runs = await this.mapFile(journal, 0, journalBlocks);
      const physical = (n: number): number => {
        let lo = 0;
        let hi = runs.length - 1;
        while (lo < hi) {
          const mid = (lo + hi + 1) >> 1;
          if (runs[mid].lblk <= n) lo = mid;
          else hi = mid - 1;
        }
        const run = runs[lo];
        if (!run || n < run.lblk || n >= run.lblk + run.len) {
          throw damage(this.fsType, `journal block ${n} is not mapped`, 'journal', sb.journalInum);
        }
        return run.pblk + (n - run.lblk);
      };
      const replay = await replayJournal({
        blockSize: sb.blockSize,
        journalBlocks,
        blocksCount: sb.blocksCount,
        readJournalBlock: (n) => this.readRawBlocks(physical(n), 1),
      });
      if (!replay) return;
      this.warnings.push(...replay.warnings);
      for (const [fsBlock, copy] of replay.blocks) this.overlay.set(fsBlock, { pblk: physical(copy.journalBlock), escaped: copy.escaped });
      this.journalBlocks = this.overlay.size;
    } catch (err) {
      this.warnings.push(`the journal could not be replayed (${err instanceof Error ? err.message : String(err)}): read without replay`);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Filesystem interface

  async stat(ino: bigint): Promise<FileStat> {
    const inode = await this.inode(this.inoNumber(ino));
    const type = this.fileType(inode);
    const stat: FileStat = {
      ino: BigInt(inode.ino),
      type,
      size: type === 'file' || type === 'symlink' || type === 'dir' ? inode.size : 0,
      mode: inode.mode & 0o7777,
      uid: inode.uid,
      gid: inode.gid,
      nlink: inode.linksCount,
      atimeNs: inode.atimeNs,
      mtimeNs: inode.mtimeNs,
      ctimeNs: inode.ctimeNs,
    };
    if (inode.birthtimeNs !== undefined) stat.birthtimeNs = inode.birthtimeNs;
    if (type === 'chardev' || type === 'blockdev') stat.rdev = deviceNumber(inode.iblock);
    return stat;
  }

  async readdir(ino: bigint): Promise<DirEntry[]> {
    const dir = await this.directory(this.inoNumber(ino));
    const raw: RawDirEntry[] = [];
    await this.scanDirectory(dir, (entries) => {
      raw.push(...entries);
      return false;
    });
    const out: DirEntry[] = [];
    for (const entry of raw) {
      const name = entry.name.toString('utf8');
      if (name === '.' || name === '..') continue;
      out.push({ name, ino: BigInt(entry.ino), type: await this.entryType(entry) });
    }
    return out;
  }

  async lookup(dirIno: bigint, name: string): Promise<DirEntry | undefined> {
    const dir = await this.directory(this.inoNumber(dirIno));
    if (name === '.') return { name, ino: BigInt(dir.ino), type: 'dir' };
    if (name === '..') return { name, ino: BigInt(await this.parentOf(dir)), type: 'dir' };
    const wanted = Buffer.from(name, 'utf8');
    if (wanted.length === 0 || wanted.length > 255) return undefined;
    // A name that was not valid UTF-8 on disk comes back with U+FFFD: compare decoded names then.
    const matches = name.includes('\ufffd')
      ? (e: RawDirEntry) => e.name.toString('utf8') === name
      : (e: RawDirEntry) => e.name.equals(wanted);
    let found: RawDirEntry | undefined;
    if (this.usesHtree(dir) && !name.includes('\ufffd')) {
      // Like the kernel, a damaged index falls back to a linear search of the leaf blocks.
      const result = await this.htreeLookup(dir, wanted).catch((err: unknown) => {
        if (err instanceof FsDamageError) return 'unsupported' as const;
        throw err;
      });
      found = result === 'unsupported' ? await this.linearLookup(dir, matches) : result;
    } else {
      found = await this.linearLookup(dir, matches);
    }
    if (!found) return undefined;
    return { name, ino: BigInt(found.ino), type: await this.entryType(found) };
  }

  async read(ino: bigint, offset: number, length: number, stream?: string): Promise<Buffer> {
    if (stream !== undefined && stream !== '') {
      throw new BadInputError('fs_no_stream', `${this.fsType} files have no named data streams ("${stream}")`);
    }
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || length > MAX_READ_BYTES) {
      throw new BadInputError('fs_bad_range', `read of ${length} bytes at ${offset} is not a valid range`, {
        hint: `read in pieces of at most ${MAX_READ_BYTES} bytes`,
      });
    }
    const inode = await this.inode(this.inoNumber(ino));
    const type = this.fileType(inode);
    if (type !== 'file' && type !== 'symlink') {
      throw new BadInputError('fs_not_file', `inode ${inode.ino} is a ${type}, not a file`, { context: { ino: inode.ino } });
    }
    this.refuseEncrypted(inode);
    return this.readData(inode, offset, length);
  }

  async extents(ino: bigint): Promise<FileExtent[]> {
    const inode = await this.inode(this.inoNumber(ino));
    const type = this.fileType(inode);
    if (type !== 'file' && type !== 'symlink' && type !== 'dir') return [];
    if (inode.size === 0) return [];
    if (has(inode.flags, INODE_FLAG.inlineData) || this.isFastSymlink(inode)) {
      return [{ offset: 0, length: inode.size, hole: false }];
    }
    const bs = this.sb.blockSize;
    const runs = await this.mapFile(inode, 0, Math.ceil(inode.size / bs));
    return toFileExtents(runs, bs, inode.size);
  }

  async readlink(ino: bigint): Promise<string> {
    const inode = await this.inode(this.inoNumber(ino));
    if (this.fileType(inode) !== 'symlink') {
      throw new BadInputError('fs_not_symlink', `inode ${inode.ino} is not a symbolic link`, { context: { ino: inode.ino } });
    }
    this.refuseEncrypted(inode);
    if (inode.size > MAX_SYMLINK_BYTES) {
      throw damage(this.fsType, `symlink target of ${inode.size} bytes is longer than ${MAX_SYMLINK_BYTES}`, 'symlink', inode.ino);
    }
    if (this.isFastSymlink(inode)) return inode.iblock.toString('utf8', 0, inode.size);
    return (await this.readData(inode, 0, inode.size)).toString('utf8');
  }

  // -------------------------------------------------------------------------------------------
  // Blocks

  async readBlock(pblk: number): Promise<Buffer> {
    return this.readBlocks(pblk, 1);
  }

  /** Reads blocks with the journal overlay applied. */
  private async readBlocks(pblk: number, count: number): Promise<Buffer> {
    const raw = await this.readRawBlocks(pblk, count);
    if (this.overlay.size === 0) return raw;
    const bs = this.sb.blockSize;
    let data = raw;
    const patch = async (fsBlock: number, copy: { pblk: number; escaped: boolean }) => {
      const journalCopy = unescapeJournalBlock(await this.readRawBlocks(copy.pblk, 1), copy.escaped);
      // Never modify a buffer the device may share with others.
      if (data === raw) data = Buffer.from(raw);
      journalCopy.copy(data, (fsBlock - pblk) * bs);
    };
    if (count <= this.overlay.size) {
      for (let b = pblk; b < pblk + count; b++) {
        const copy = this.overlay.get(b);
        if (copy) await patch(b, copy);
      }
    } else {
      for (const [b, copy] of this.overlay) if (b >= pblk && b < pblk + count) await patch(b, copy);
    }
    return data;
  }

  private async readRawBlocks(pblk: number, count: number): Promise<Buffer> {
    if (pblk < 0 || count < 1 || pblk + count > this.sb.blocksCount) {
      throw damage(this.fsType, `blocks ${pblk}+${count} are outside the filesystem (${this.sb.blocksCount} blocks)`, 'block pointer');
    }
    return this.dev.read(pblk * this.sb.blockSize, count * this.sb.blockSize);
  }

  async checkRun(ino: number, pblk: number, len: number, structure: string): Promise<void> {
    const { sb } = this;
    if (pblk < sb.firstDataBlock || pblk + len > sb.blocksCount) {
      throw damage(this.fsType, `${structure} at blocks ${pblk}-${pblk + len - 1} lies outside the filesystem ` +
        `(${sb.firstDataBlock}-${sb.blocksCount - 1})`, structure, ino);
    }
    const ranges = this.metadataMap();
    // Ranges are sorted, merged pairs [start, end): find the first that ends after pblk.
    let lo = 0;
    let hi = ranges.length / 2;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (ranges[mid * 2 + 1] <= pblk) lo = mid + 1;
      else hi = mid;
    }
    if (lo < ranges.length / 2 && ranges[lo * 2] < pblk + len) {
      throw damage(this.fsType, `${structure} at blocks ${pblk}-${pblk + len - 1} overlaps filesystem metadata ` +
        `(blocks ${ranges[lo * 2]}-${ranges[lo * 2 + 1] - 1})`, structure, ino);
    }
  }

  /** Superblock copies, GDT blocks, bitmaps and inode tables of every group, sorted and merged. */
  private metadataMap(): Float64Array {
    if (this.metadataRanges) return this.metadataRanges;
    const { sb } = this;
    const ranges: Array<[number, number]> = [];
    const itableBlocks = Math.ceil((sb.inodesPerGroup * sb.inodeSize) / sb.blockSize);
    const perBlock = sb.blockSize / sb.descSize;
    for (let g = 0; g < sb.groupCount; g++) {
      const first = groupFirstBlock(sb, g);
      const superAndGdt = groupSuperAndGdtRange(sb, g);
      if (superAndGdt) ranges.push(superAndGdt);
      if (has(sb.incompat, INCOMPAT.metaBg)) {
        const metaGroup = Math.floor(g / perBlock);
        const index = g % perBlock;
        if (metaGroup >= sb.firstMetaBg && (index === 0 || index === 1 || index === perBlock - 1)) {
          const at = index === 0 ? groupDescLocation(sb, g).block : first + (groupHasSuper(sb, g) ? 1 : 0);
          ranges.push([at, at + 1]);
        }
      }
      const state = this.groupState(g);
      if (!state.desc) continue;
      ranges.push([state.desc.blockBitmap, state.desc.blockBitmap + 1]);
      ranges.push([state.desc.inodeBitmap, state.desc.inodeBitmap + 1]);
      ranges.push([state.desc.inodeTable, state.desc.inodeTable + itableBlocks]);
    }
    ranges.sort((a, b) => a[0] - b[0]);
    const merged: number[] = [];
    for (const [start, end] of ranges) {
      const last = merged.length - 1;
      if (last > 0 && start <= merged[last]) merged[last] = Math.max(merged[last], end);
      else merged.push(start, end);
    }
    this.metadataRanges = Float64Array.from(merged);
    return this.metadataRanges;
  }

  // -------------------------------------------------------------------------------------------
  // Groups and inodes

  private groupState(group: number): GroupState {
    const cached = this.groups.get(group);
    if (cached) return cached;
    const { sb } = this;
    const raw = this.gdt.subarray(group * sb.descSize, (group + 1) * sb.descSize);
    let state: GroupState;
    const problem = raw.length === sb.descSize ? groupDescChecksumProblem(sb, group, raw) : 'missing';
    if (problem) {
      state = { problem };
    } else {
      const desc = parseGroupDesc(sb, raw);
      const itableBlocks = Math.ceil((sb.inodesPerGroup * sb.inodeSize) / sb.blockSize);
      const inside = (b: number, n: number) => b >= sb.firstDataBlock && b + n <= sb.blocksCount;
      if (!inside(desc.inodeTable, itableBlocks) || !inside(desc.blockBitmap, 1) || !inside(desc.inodeBitmap, 1)) {
        state = { problem: `group descriptor ${group} points outside the filesystem` };
      } else {
        state = { desc };
      }
    }
    this.groups.set(group, state);
    return state;
  }

  private inoNumber(ino: bigint): number {
    if (typeof ino !== 'bigint' || ino < 1n || ino > BigInt(this.sb.inodesCount)) {
      throw damage(this.fsType, `inode number ${ino} is outside 1-${this.sb.inodesCount}`, 'inode number', undefined, {
        requested: String(ino),
      });
    }
    return Number(ino);
  }

  async inode(ino: number): Promise<Inode> {
    const cached = this.inodes.get(ino);
    if (cached) {
      this.inodes.delete(ino);
      this.inodes.set(ino, cached);
      return cached;
    }
    const inode = await this.loadInode(ino);
    this.inodes.set(ino, inode);
    if (this.inodes.size > INODE_CACHE_ENTRIES) this.inodes.delete(this.inodes.keys().next().value as number);
    return inode;
  }

  private async loadInode(ino: number): Promise<Inode> {
    const { sb } = this;
    if (ino < 1 || ino > sb.inodesCount) throw damage(this.fsType, `inode number ${ino} is out of range`, 'inode', ino);
    const group = Math.floor((ino - 1) / sb.inodesPerGroup);
    const index = (ino - 1) % sb.inodesPerGroup;
    const state = this.groupState(group);
    if (!state.desc) throw damage(this.fsType, `inode ${ino} is in block group ${group}: ${state.problem}`, `group descriptor ${group}`, ino);
    const lazyInit = this.metadataCsum || has(sb.roCompat, RO_COMPAT.gdtCsum);
    if (lazyInit && (has(state.desc.flags, BG_FLAG.inodeUninit) || index >= sb.inodesPerGroup - state.desc.itableUnused)) {
      throw damage(this.fsType, `inode ${ino} lies in the unused part of group ${group}'s inode table`, 'inode', ino);
    }
    const byteInTable = index * sb.inodeSize;
    const block = await this.readBlock(state.desc.inodeTable + Math.floor(byteInTable / sb.blockSize));
    const at = byteInTable % sb.blockSize;
    const raw = Buffer.from(block.subarray(at, at + sb.inodeSize));
    const inode = parseInode(sb, this.fsType, ino, raw);
    this.validateInode(inode);
    return inode;
  }

  private validateInode(inode: Inode): void {
    const fail = (message: string) => damage(this.fsType, message, 'inode', inode.ino);
    if (inode.linksCount === 0 && inode.ino >= this.sb.firstIno) throw fail(`inode ${inode.ino} is not in use (link count 0)`);
    const type = inode.mode & S_IFMT;
    if (![0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000].includes(type)) {
      throw fail(`inode ${inode.ino} has an invalid file type 0o${type.toString(8)}`);
    }
    const extents = has(inode.flags, INODE_FLAG.extents);
    const inline = has(inode.flags, INODE_FLAG.inlineData);
    if (extents && !has(this.sb.incompat, INCOMPAT.extents)) throw fail('inode uses extents but the filesystem does not enable them');
    if (inline && !has(this.sb.incompat, INCOMPAT.inlineData)) throw fail('inode uses inline data but the filesystem does not enable it');
    if (extents && inline) throw fail('inode claims both extents and inline data');
    const maxBlocks = extents ? 2 ** 32 : indirectMapLimit(this.sb.blockSize);
    if (Math.ceil(inode.size / this.sb.blockSize) > maxBlocks) {
      throw fail(`size ${inode.size} exceeds what the inode's block map can hold`);
    }
  }

  private fileType(inode: Inode): FileType {
    switch (inode.mode & S_IFMT) {
      case 0o100000: return 'file';
      case 0o040000: return 'dir';
      case 0o120000: return 'symlink';
      case 0o020000: return 'chardev';
      case 0o060000: return 'blockdev';
      case 0o010000: return 'fifo';
      case 0o140000: return 'socket';
      default: return 'unknown';
    }
  }

  private refuseEncrypted(inode: Inode): void {
    if (has(inode.flags, INODE_FLAG.encrypted)) {
      throw new FsUnsupportedError(`inode ${inode.ino} is encrypted (fscrypt)`, { fs: this.fsType, ino: inode.ino, structure: 'inode' },
        'encrypted files can only be read by the guest that holds the key: restore the whole disk');
    }
  }

  /** The kernel's rule: a symlink without data blocks keeps its target in i_block. */
  private isFastSymlink(inode: Inode): boolean {
    if (this.fileType(inode) !== 'symlink' || has(inode.flags, INODE_FLAG.inlineData)) return false;
    const eaSectors = inode.fileAcl !== 0 ? this.sb.blockSize / 512 : 0;
    const dataSectors = has(inode.flags, INODE_FLAG.hugeFile) ? inode.sectors * (this.sb.blockSize / 512) : inode.sectors;
    return dataSectors - eaSectors === 0 && inode.size < 60;
  }

  // -------------------------------------------------------------------------------------------
  // File data

  private mapFile(inode: Inode, from: number, to: number): Promise<BlockRun[]> {
    return mapBlocks(this, inode, from, to);
  }

  private async readData(inode: Inode, offset: number, length: number): Promise<Buffer> {
    const end = Math.min(inode.size, offset + length);
    if (offset >= end) return Buffer.alloc(0);
    if (has(inode.flags, INODE_FLAG.inlineData)) {
      const data = this.inlineData(inode);
      const out = Buffer.alloc(end - offset);
      data.copy(out, 0, Math.min(offset, data.length), Math.min(end, data.length));
      return out;
    }
    const bs = this.sb.blockSize;
    const runs = await this.mapFile(inode, Math.floor(offset / bs), Math.ceil(end / bs));
    const out = Buffer.alloc(end - offset);
    await Promise.all(runs.filter((r) => !r.uninit).map(async (run) => {
      const from = Math.max(offset, run.lblk * bs);
      const to = Math.min(end, (run.lblk + run.len) * bs);
      if (from >= to) return;
      const firstBlock = run.pblk + Math.floor((from - run.lblk * bs) / bs);
      const lastBlock = run.pblk + Math.ceil((to - run.lblk * bs) / bs);
      const data = await this.readBlocks(firstBlock, lastBlock - firstBlock);
      const skip = from - (run.lblk * bs + (firstBlock - run.pblk) * bs);
      data.copy(out, from - offset, skip, skip + (to - from));
    }));
    return out;
  }

  /** Inline data: the 60 bytes of i_block followed by the value of the "system.data" xattr. */
  private inlineData(inode: Inode): Buffer {
    const extra = this.inlineXattr(inode) ?? Buffer.alloc(0);
    if (inode.size > 60 + extra.length && this.fileType(inode) !== 'dir') {
      throw damage(this.fsType, `inline data holds ${60 + extra.length} bytes but the size is ${inode.size}`, 'inline data', inode.ino);
    }
    return Buffer.concat([inode.iblock, extra]);
  }

  /** The value of the in-inode "system.data" extended attribute, if present. */
  private inlineXattr(inode: Inode): Buffer | undefined {
    const { inodeSize } = this.sb;
    const fail = (message: string) => damage(this.fsType, `in-inode extended attributes: ${message}`, 'xattr', inode.ino);
    const start = 128 + inode.extraIsize;
    if (inodeSize <= 128 || start + 4 > inodeSize) return undefined;
    const raw = inode.raw;
    if (raw.readUInt32LE(start) !== XATTR_MAGIC) return undefined;
    const first = start + 4;
    let at = first;
    for (let count = 0; count < 1024; count++) {
      if (at + 4 > inodeSize) throw fail('entry list runs past the inode');
      if (raw.readUInt32LE(at) === 0) return undefined;
      if (at + 16 > inodeSize) throw fail('entry runs past the inode');
      const nameLen = raw[at];
      const index = raw[at + 1];
      const valueOffset = raw.readUInt16LE(at + 2);
      const valueInode = raw.readUInt32LE(at + 4);
      const valueSize = raw.readUInt32LE(at + 8);
      if (at + 16 + nameLen > inodeSize) throw fail('name runs past the inode');
      const name = raw.toString('latin1', at + 16, at + 16 + nameLen);
      if (index === XATTR_INDEX_SYSTEM && name === 'data') {
        if (valueInode !== 0) throw fail('system.data is stored in a separate inode');
        if (first + valueOffset + valueSize > inodeSize) throw fail('system.data value runs past the inode');
        return Buffer.from(raw.subarray(first + valueOffset, first + valueOffset + valueSize));
      }
      at += (16 + nameLen + 3) & ~3;
    }
    throw fail('too many entries');
  }

  // -------------------------------------------------------------------------------------------
  // Directories

  private async directory(ino: number): Promise<Inode> {
    const inode = await this.inode(ino);
    if (this.fileType(inode) !== 'dir') {
      throw new BadInputError('fs_not_dir', `inode ${ino} is not a directory`, { context: { ino } });
    }
    this.refuseEncrypted(inode);
    if (inode.size > MAX_DIR_BYTES) {
      throw new FsUnsupportedError(`directory ${ino} is ${inode.size} bytes: larger than this reader lists (${MAX_DIR_BYTES})`, {
        fs: this.fsType, ino, structure: 'directory',
      });
    }
    return inode;
  }

  /** The entry's type; without the filetype feature it takes a stat (a damaged inode: 'unknown'). */
  private async entryType(entry: RawDirEntry): Promise<FileType> {
    const type = direntType(entry.fileType);
    if (type !== 'unknown' || this.dirFormat.hasFileType) return type;
    try {
      return this.fileType(await this.inode(entry.ino));
    } catch (err) {
      if (err instanceof FsDamageError) return 'unknown';
      throw err;
    }
  }

  private usesHtree(dir: Inode): boolean {
    return has(dir.flags, INODE_FLAG.index) && has(this.sb.compat, COMPAT.dirIndex)
      && !has(dir.flags, INODE_FLAG.inlineData) && !has(dir.flags, INODE_FLAG.casefold);
  }

  private dirFail(dir: Inode, lblk?: number) {
    return (message: string) => damage(this.fsType, lblk === undefined ? message : `directory block ${lblk}: ${message}`,
      'directory', dir.ino, lblk === undefined ? {} : { block: lblk });
  }

  /**
   * Calls `visit` with the entries of each directory block in order (all leaf blocks of an htree
   * directory; its index blocks are skipped); stops when `visit` returns true.
   */
  private async scanDirectory(dir: Inode, visit: (entries: RawDirEntry[]) => boolean): Promise<void> {
    if (has(dir.flags, INODE_FLAG.inlineData)) {
      visit(this.inlineDirEntries(dir));
      return;
    }
    const bs = this.sb.blockSize;
    if (dir.size % bs !== 0) throw this.dirFail(dir)(`size ${dir.size} is not a multiple of the block size`);
    const total = dir.size / bs;
    const isIndexBlock = this.usesHtree(dir) ? await this.htreeIndexBlocks(dir) : () => false;
    for (let window = 0; window < total; window += DIR_WINDOW_BLOCKS) {
      const runs = await this.mapFile(dir, window, Math.min(total, window + DIR_WINDOW_BLOCKS));
      for (const run of runs) {
        if (run.uninit) continue;
        const data = await this.readBlocks(run.pblk, run.len);
        for (let i = 0; i < run.len; i++) {
          const lblk = run.lblk + i;
          const block = data.subarray(i * bs, (i + 1) * bs);
          if (isIndexBlock(lblk, block)) continue;
          const fail = this.dirFail(dir, lblk);
          const bytes = leafEntryBytes(block, this.dirFormat, dir.csumSeed, fail);
          if (visit(parseDirEntries(block, bytes, this.dirFormat, fail))) return;
        }
      }
    }
  }

  /**
   * Which blocks of an htree directory are index blocks: found by walking the index from its
   * root (checksums verified). When the index is damaged, fall back like the kernel does to
   * reading the directory linearly, recognising index blocks by their empty covering entry.
   */
  private async htreeIndexBlocks(dir: Inode): Promise<(lblk: number, block: Buffer) => boolean> {
    const heuristic = (lblk: number, block: Buffer) => lblk === 0 || isDxNode(block, this.dirFormat);
    try {
      const root = await this.dirBlock(dir, 0);
      const info = parseDxRootInfo(root, this.dirFormat, this.dirFail(dir, 0));
      const maxLevels = has(this.sb.incompat, INCOMPAT.largeDir) ? 3 : 2;
      if (info.indirectLevels >= maxLevels) return heuristic;
      const index = new Set<number>([0]);
      let level = [parseDxEntries(root, DX_ROOT_ENTRIES_OFFSET, this.dirFormat, dir.csumSeed, this.dirFail(dir, 0))];
      for (let depth = 0; depth < info.indirectLevels; depth++) {
        const next: DxEntries[] = [];
        for (const node of level) {
          for (const lblk of node.blocks) {
            if (index.has(lblk)) return heuristic;
            index.add(lblk);
            const block = await this.dirBlock(dir, lblk);
            if (!isDxNode(block, this.dirFormat)) return heuristic;
            next.push(parseDxEntries(block, DX_NODE_ENTRIES_OFFSET, this.dirFormat, dir.csumSeed, this.dirFail(dir, lblk)));
          }
        }
        level = next;
      }
      return (lblk: number) => index.has(lblk);
    } catch (err) {
      if (!(err instanceof FsDamageError)) throw err;
      return heuristic;
    }
  }

  /** An inline directory: the parent's inode number, then entries in i_block and system.data. */
  private inlineDirEntries(dir: Inode): RawDirEntry[] {
    const fail = this.dirFail(dir);
    const entries = parseDirEntries(dir.iblock.subarray(4), 56, this.dirFormat, fail);
    const extra = this.inlineXattr(dir);
    if (extra && extra.length > 0) entries.push(...parseDirEntries(extra, extra.length, this.dirFormat, fail));
    return entries;
  }

  private async parentOf(dir: Inode): Promise<number> {
    if (has(dir.flags, INODE_FLAG.inlineData)) return dir.iblock.readUInt32LE(0);
    // Block 0 starts with "." then ".." (whose record may span the rest of the block).
    const block = await this.dirBlock(dir, 0);
    const fail = this.dirFail(dir, 0);
    const dot = parseDirEntries(block, 12, this.dirFormat, fail);
    const dotDotAt = block.readUInt16LE(4);
    if (dot.length !== 1 || dot[0].name.toString('latin1') !== '.' || dotDotAt !== 12) throw fail('no "." entry at the start');
    const nameLen = block[12 + 6];
    if (nameLen !== 2 || block.toString('latin1', 20, 22) !== '..') throw fail('no ".." entry after "."');
    return block.readUInt32LE(12);
  }

  private async dirBlock(dir: Inode, lblk: number): Promise<Buffer> {
    const runs = await this.mapFile(dir, lblk, lblk + 1);
    if (runs.length === 0 || runs[0].uninit) throw this.dirFail(dir, lblk)('hole in the directory');
    return this.readBlock(runs[0].pblk);
  }

  private async linearLookup(dir: Inode, matches: (e: RawDirEntry) => boolean): Promise<RawDirEntry | undefined> {
    let found: RawDirEntry | undefined;
    await this.scanDirectory(dir, (entries) => {
      found = entries.find(matches);
      return found !== undefined;
    });
    return found;
  }

  /** Hashed lookup: descend the index to the leaf block(s) that can hold the name's hash. */
  private async htreeLookup(dir: Inode, name: Buffer): Promise<RawDirEntry | undefined | 'unsupported'> {
    const fail = this.dirFail(dir, 0);
    const root = await this.dirBlock(dir, 0);
    const info = parseDxRootInfo(root, this.dirFormat, fail);
    const maxLevels = has(this.sb.incompat, INCOMPAT.largeDir) ? 3 : 2;
    if (info.indirectLevels >= maxLevels) throw fail(`htree depth ${info.indirectLevels} exceeds ${maxLevels - 1}`);
    let version = info.hashVersion;
    if (version <= 2 && this.sb.hashUnsigned) version += 3;
    const hash = extDirHash(name, version, this.sb.hashSeed);
    if (hash === undefined) return 'unsupported';
    const entries = parseDxEntries(root, DX_ROOT_ENTRIES_OFFSET, this.dirFormat, dir.csumSeed, fail);
    const result = await this.dxSearch(dir, entries, 0, info.indirectLevels, hash, name, false, new Set([0]));
    return result.found;
  }

  /**
   * Searches below one index node. Names with equal hashes may continue into the next block,
   * marked by the low "collision" bit of the next entry's hash; `more` tells the parent that the
   * search ran off the end of this node and may continue in its next child.
   */
  private async dxSearch(dir: Inode, entries: DxEntries, level: number, levels: number, hash: number, name: Buffer,
    fromStart: boolean, visited: Set<number>): Promise<{ found?: RawDirEntry; more: boolean }> {
    let slot = fromStart ? 0 : dxFindSlot(entries, hash);
    let startChildAtFirst = fromStart;
    while (true) {
      const lblk = entries.blocks[slot];
      const fail = this.dirFail(dir, lblk);
      if (visited.has(lblk)) throw fail('htree block reached twice (loop in the index)');
      visited.add(lblk);
      const block = await this.dirBlock(dir, lblk);
      if (level < levels) {
        if (!isDxNode(block, this.dirFormat)) throw fail('expected an htree index node');
        const child = parseDxEntries(block, DX_NODE_ENTRIES_OFFSET, this.dirFormat, dir.csumSeed, fail);
        const result = await this.dxSearch(dir, child, level + 1, levels, hash, name, startChildAtFirst, visited);
        if (result.found || !result.more) return result;
      } else {
        const bytes = leafEntryBytes(block, this.dirFormat, dir.csumSeed, fail);
        const found = parseDirEntries(block, bytes, this.dirFormat, fail).find((e) => e.name.equals(name));
        if (found) return { found, more: false };
      }
      if (slot + 1 >= entries.hashes.length) return { more: true };
      if (((entries.hashes[slot + 1] & ~1) >>> 0) !== hash) return { more: false };
      slot++;
      startChildAtFirst = true;
    }
  }
}

/** Device numbers: old 16-bit encoding in i_block[0], new 32-bit one in i_block[1]. */
function deviceNumber(iblock: Buffer): { major: number; minor: number } {
  const old = iblock.readUInt32LE(0);
  if (old !== 0) return { major: (old >>> 8) & 0xff, minor: old & 0xff };
  const dev = iblock.readUInt32LE(4);
  return { major: (dev & 0xfff00) >>> 8, minor: (dev & 0xff) | ((dev >>> 12) & 0xfff00) };
}

/** Turns mapped runs into data/hole byte ranges covering [0, size); unwritten extents are holes. */
function toFileExtents(runs: BlockRun[], blockSize: number, size: number): FileExtent[] {
  const out: FileExtent[] = [];
  const push = (offset: number, end: number, hole: boolean) => {
    const clippedEnd = Math.min(end, size);
    if (clippedEnd <= offset) return;
    const last = out[out.length - 1];
    if (last && last.hole === hole && last.offset + last.length === offset) last.length = clippedEnd - last.offset;
    else out.push({ offset, length: clippedEnd - offset, hole });
  };
  let cursor = 0;
  for (const run of runs) {
    const start = run.lblk * blockSize;
    if (start > cursor) push(cursor, start, true);
    push(start, (run.lblk + run.len) * blockSize, run.uninit);
    cursor = (run.lblk + run.len) * blockSize;
  }
  if (cursor < size) push(cursor, size, true);
  return out;
}
