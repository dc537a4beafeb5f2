/**
 * FAT12/16/32 reader with VFAT long file names (read-only; the image is untrusted input).
 *
 * Identity: FAT has no inodes. A file's number is the byte offset, on this device, of its short
 * (8.3) directory entry, which holds everything stat needs; the root directory, which has no
 * entry, is number 1. Numbers are therefore stable for a given image and unique per entry.
 *
 * Types: the FAT kind follows Linux: a BPB whose 16-bit FAT size is zero is FAT32 (its root
 * directory is a cluster chain); otherwise the cluster count decides FAT12 (< 4085) or FAT16.
 *
 * Times: FAT stores local wall-clock time with no zone (mtime to 2 s, creation to 10 ms, access
 * as a date only). They are read as if the guest's clock ran at UTC + `utcOffsetMinutes`
 * (default 0: Linux mounts with a UTC clock and mtools under TZ=UTC write UTC; pass the guest's
 * offset for Windows guests, which write their local time). Unset or invalid dates are omitted.
 *
 * Safety: cluster chains are followed for at most the clusters the file size needs (or the
 * 2 MiB a directory may hold), every cluster number is range-checked, and a chain that visits a
 * cluster twice is reported as a loop. A directory whose own entry lies inside its clusters
 * (a directory that contains itself) is reported instead of listed. Walkers should still keep a
 * set of the directory numbers on their path, as for any filesystem.
 */
import { FsDamageError } from './errors.ts';
import type { FsDamageContext } from './errors.ts';
import type { BlockDevice, DirEntry, FileExtent, FileStat, Filesystem } from './filesystem.ts';
import {
  LruMap, clampRead, isDirectory, isPowerOfTwo, msToNs, noSuchStream, notDirectory, notSymlink, readRange,
} from './reader-util.ts';

const FS = 'vfat';
const ROOT_INO = 1n;
const DIRENT_SIZE = 32;
/** The FAT specification caps a directory at 65536 entries. */
const MAX_DIR_BYTES = 65536 * DIRENT_SIZE;

const ATTR_VOLUME_ID = 0x08;
const ATTR_DIRECTORY = 0x10;
const ATTR_LONG_NAME_MASK = 0x3f;
const ATTR_LONG_NAME = 0x0f;
/** Windows NT / Linux "lowercase base name" and "lowercase extension" flags in byte 12. */
const NT_LOWER_BASE = 0x08;
const NT_LOWER_EXT = 0x10;


export interface FatOptions {
  /** Offset of the guest's clock from UTC, in minutes (FAT times are local wall-clock times). */
  utcOffsetMinutes?: number;
}

// ---------------------------------------------------------------------------------------------
// Cluster chains (shared with exFAT, whose FAT works the same way)

/** Normalised FAT values: every FAT width maps its end-of-chain and bad-cluster markers to these. */
export const CHAIN_END = 0xffffffff;
export const CHAIN_BAD = 0xfffffff7;

export interface ClusterTable {
  readonly fs: string;
  /** Valid data clusters are 2 .. clusterCount + 1. */
  readonly clusterCount: number;
  /** The normalised FAT entry of `cluster`: the next cluster, CHAIN_END, CHAIN_BAD or 0 (free). */
  next(cluster: number): Promise<number>;
}

/** `count` consecutive clusters starting at `cluster`. */
export interface ClusterRun {
  cluster: number;
  count: number;
}

export interface Chain {
  runs: ClusterRun[];
  clusters: number;
  /** True when the chain's end marker was reached within the limit. */
  ended: boolean;
}

export function checkCluster(table: ClusterTable, cluster: number, where: FsDamageContext): void {
  if (!Number.isInteger(cluster) || cluster < 2 || cluster > table.clusterCount + 1) {
    throw new FsDamageError(`cluster number ${cluster} is outside the data area (2..${table.clusterCount + 1})`,
      { ...where, cluster });
  }
}

/**
 * Follows a cluster chain from `first` for at most `limit` clusters. Every link is range
 * checked; free and bad clusters inside a chain and any cluster visited twice are damage.
 */
export async function followChain(table: ClusterTable, first: number, limit: number, where: FsDamageContext): Promise<Chain> {
  checkCluster(table, first, where);
  const runs: ClusterRun[] = [];
  let clusters = 0;
  let cluster = first;
  let ended = false;
  for (;;) {
    const last = runs[runs.length - 1];
    if (last && last.cluster + last.count === cluster) last.count++;
    else runs.push({ cluster, count: 1 });
    clusters++;
    if (clusters >= limit) break;
    const next = await table.next(cluster);
    if (next === CHAIN_END) {
      ended = true;
      break;
    }
    if (next === 0 || next === CHAIN_BAD) {
      throw new FsDamageError(`cluster chain reaches a ${next === 0 ? 'free' : 'bad'} cluster after cluster ${cluster}`,
        { ...where, cluster, position: clusters });
    }
    checkCluster(table, next, { ...where, previousCluster: cluster });
    cluster = next;
  }
  assertNoRepeats(runs, where);
  return { runs, clusters, ended };
}

/** A chain that visits a cluster twice is a loop: two of its runs overlap. */
function assertNoRepeats(runs: ClusterRun[], where: FsDamageContext): void {
  if (runs.length < 2) return;
  const sorted = runs.map((r) => [r.cluster, r.cluster + r.count] as const).sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i][0] < sorted[i - 1][1]) {
      throw new FsDamageError(`cluster chain loops: cluster ${sorted[i][0]} is used twice`, { ...where, cluster: sorted[i][0] });
    }
  }
}

/** A contiguous piece of a file or directory on the device. */
export interface Segment {
  devOffset: number;
  length: number;
}

/** Maps [offset, offset+length) of the byte stream stored in `runs` to device segments. */
export function mapRuns(runs: ClusterRun[], clusterSize: number, heapOffset: number, offset: number, length: number): Segment[] {
  const out: Segment[] = [];
  let runStart = 0;
  const end = offset + length;
  for (const run of runs) {
    const runBytes = run.count * clusterSize;
    const runEnd = runStart + runBytes;
    if (runEnd > offset && runStart < end) {
      const from = Math.max(offset, runStart);
      const to = Math.min(end, runEnd);
      out.push({ devOffset: heapOffset + (run.cluster - 2) * clusterSize + (from - runStart), length: to - from });
    }
    if (runEnd >= end) break;
    runStart = runEnd;
  }
  return out;
}

export async function readSegments(dev: BlockDevice, segments: Segment[], where: FsDamageContext): Promise<Buffer> {
  const parts = await Promise.all(segments.map((s) => readRange(dev, s.devOffset, s.length, where)));
  return parts.length === 1 ? parts[0] : Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------------
// DOS date/time (shared with exFAT)

/**
 * Milliseconds since the epoch of a DOS date + time read as UTC wall-clock time, or undefined
 * when the date is unset or invalid (month 0, day 0, hour 25...).
 */
export function dosDateTimeToMs(date: number, time: number): number | undefined {
  const year = 1980 + (date >> 9);
  const month = (date >> 5) & 0x0f;
  const day = date & 0x1f;
  const hour = time >> 11;
  const minute = (time >> 5) & 0x3f;
  const second = (time & 0x1f) * 2;
  if (month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 || second > 59) return undefined;
  const ms = Date.UTC(year, month - 1, day, hour, minute, second);
  // Date.UTC rolls Feb 31 over into March: reject dates that do not exist.
  if (new Date(ms).getUTCDate() !== day) return undefined;
  return ms;
}

/**
 * A simple per-code-unit upper-casing close to what FAT/NTFS tables do: characters whose upper
 * case is not a single code unit (ß, ligatures) stay as they are.
 */
export function upcaseSimple(name: string): string {
  let out = '';
  for (const ch of name) {
    const up = ch.toUpperCase();
    out += up.length === ch.length ? up : ch;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Boot sector

interface FatGeometry {
  bits: 12 | 16 | 32;
  sectorSize: number;
  clusterSize: number;
  /** Byte offset and length of the FAT copy that is read. */
  fatOffset: number;
  fatBytes: number;
  /** FAT12/16: the fixed root directory area. */
  rootDirOffset: number;
  rootDirBytes: number;
  /** Byte offset of cluster 2. */
  dataOffset: number;
  clusterCount: number;
  /** FAT32: first cluster of the root directory. */
  rootCluster: number;
  totalBytes: number;
  serial: number;
  bpbLabel: string;
}

/** Parses the BPB; undefined when the sector is not a FAT boot sector at all. */
function parseBootSector(b: Buffer): FatGeometry | undefined {
  if (b.length < 512 || b.readUInt16LE(510) !== 0xaa55) return undefined;
  if (b[0] !== 0xeb && b[0] !== 0xe9) return undefined;
  const sectorSize = b.readUInt16LE(11);
  const sectorsPerCluster = b[13];
  const reservedSectors = b.readUInt16LE(14);
  const fatCount = b[16];
  const rootEntries = b.readUInt16LE(17);
  const totalSectors = b.readUInt16LE(19) || b.readUInt32LE(32);
  const media = b[21];
  const fat16Sectors = b.readUInt16LE(22);
  const fatSectors = fat16Sectors || b.readUInt32LE(36);
  if (![512, 1024, 2048, 4096].includes(sectorSize) || !isPowerOfTwo(sectorsPerCluster)) return undefined;
  if (reservedSectors === 0 || fatCount === 0 || fatCount > 4 || totalSectors === 0 || fatSectors === 0) return undefined;
  if (media !== 0xf0 && media < 0xf8) return undefined;

  const isFat32Layout = fat16Sectors === 0;
  const where = { fs: FS, structure: 'boot sector' };
  if (isFat32Layout && rootEntries !== 0) {
    throw new FsDamageError(`FAT32 boot sector declares ${rootEntries} fixed root entries`, where);
  }
  const rootDirBytes = rootEntries * DIRENT_SIZE;
  const rootDirSectors = Math.ceil(rootDirBytes / sectorSize);
  let activeFat = 0;
  if (isFat32Layout) {
    const extFlags = b.readUInt16LE(40);
    // Bit 7: mirroring off, bits 0-3 name the one active FAT.
    if (extFlags & 0x80) activeFat = extFlags & 0x0f;
    if (activeFat >= fatCount) throw new FsDamageError(`active FAT ${activeFat} of ${fatCount}`, where);
  }
  const firstDataSector = reservedSectors + fatCount * fatSectors + rootDirSectors;
  if (firstDataSector >= totalSectors) {
    throw new FsDamageError(`data area starts at sector ${firstDataSector}, past the ${totalSectors} sectors of the volume`, where);
  }
  let clusterCount = Math.floor((totalSectors - firstDataSector) / sectorsPerCluster);
  let bits: 12 | 16 | 32;
  if (isFat32Layout) bits = 32;
  else if (clusterCount < 4085) bits = 12;
  else if (clusterCount <= 65524) bits = 16;
  else throw new FsDamageError(`${clusterCount} clusters do not fit a FAT16 table`, where);
  if (!isFat32Layout && rootEntries === 0) throw new FsDamageError('FAT12/16 boot sector without a root directory', where);
  // Like Linux, only the clusters the FAT can describe are usable.
  const fatBytes = fatSectors * sectorSize;
  const describable = Math.floor((bits === 12 ? (fatBytes * 2) / 3 : fatBytes / (bits / 8))) - 2;
  clusterCount = Math.min(clusterCount, describable, bits === 32 ? 0x0ffffff5 : Infinity);
  if (clusterCount < 1) throw new FsDamageError('the FAT describes no clusters', where);
  const rootCluster = isFat32Layout ? b.readUInt32LE(44) : 0;
  if (isFat32Layout && (rootCluster < 2 || rootCluster > clusterCount + 1)) {
    throw new FsDamageError(`root directory cluster ${rootCluster} is outside the data area`, where);
  }
  const ext = isFat32Layout ? 64 : 36; // extended BPB: drive, reserved, signature, serial, label
  const hasExtendedBpb = b[ext + 2] === 0x29;
  return {
    bits,
    sectorSize,
    clusterSize: sectorSize * sectorsPerCluster,
    fatOffset: (reservedSectors + activeFat * fatSectors) * sectorSize,
    fatBytes,
    rootDirOffset: (reservedSectors + fatCount * fatSectors) * sectorSize,
    rootDirBytes,
    dataOffset: firstDataSector * sectorSize,
    clusterCount,
    rootCluster,
    totalBytes: totalSectors * sectorSize,
    serial: hasExtendedBpb ? b.readUInt32LE(ext + 3) : 0,
    bpbLabel: hasExtendedBpb ? b.toString('latin1', ext + 7, ext + 18) : '',
  };
}

// ---------------------------------------------------------------------------------------------
// The FAT itself

/** FAT32 tables can be hundreds of MiB: they are read in pages, of which a few are kept. */
const FAT_PAGE_BYTES = 64 * 1024;
const FAT_PAGES_KEPT = 64;

class FatTable implements ClusterTable {
  readonly fs = FS;
  readonly clusterCount: number;
  private readonly dev: BlockDevice;
  private readonly geo: FatGeometry;
  private small: Buffer | undefined;
  private readonly pages = new LruMap<number, Buffer>(FAT_PAGES_KEPT);

  constructor(dev: BlockDevice, geo: FatGeometry) {
    this.dev = dev;
    this.geo = geo;
    this.clusterCount = geo.clusterCount;
  }

  async next(cluster: number): Promise<number> {
    const { bits } = this.geo;
    if (bits === 32) {
      const at = cluster * 4;
      const page = await this.page(Math.floor(at / FAT_PAGE_BYTES));
      const value = page.readUInt32LE(at % FAT_PAGE_BYTES) & 0x0fffffff;
      if (value >= 0x0ffffff8) return CHAIN_END;
      return value === 0x0ffffff7 ? CHAIN_BAD : value;
    }
    // FAT12/16 tables are at most 6 KiB / 128 KiB: keep the used part whole.
    const table = await this.wholeSmallTable();
    if (bits === 16) {
      const value = table.readUInt16LE(cluster * 2);
      if (value >= 0xfff8) return CHAIN_END;
      return value === 0xfff7 ? CHAIN_BAD : value;
    }
    const pair = table.readUInt16LE(Math.floor(cluster * 1.5));
    const value = cluster & 1 ? pair >> 4 : pair & 0x0fff;
    if (value >= 0xff8) return CHAIN_END;
    return value === 0xff7 ? CHAIN_BAD : value;
  }

  private async wholeSmallTable(): Promise<Buffer> {
    if (!this.small) {
      const entries = this.clusterCount + 2;
      const bytes = this.geo.bits === 16 ? entries * 2 : Math.ceil(entries * 1.5) + 1;
      this.small = await readRange(this.dev, this.geo.fatOffset, Math.min(bytes, this.geo.fatBytes),
        { fs: FS, structure: 'FAT' });
      if (this.small.length < bytes) this.small = Buffer.concat([this.small, Buffer.alloc(bytes - this.small.length)]);
    }
    return this.small;
  }

  private async page(index: number): Promise<Buffer> {
    let page = this.pages.get(index);
    if (!page) {
      const start = index * FAT_PAGE_BYTES;
      const length = Math.min(FAT_PAGE_BYTES, this.geo.fatBytes - start);
      page = await readRange(this.dev, this.geo.fatOffset + start, length, { fs: FS, structure: 'FAT', page: index });
      if (page.length < FAT_PAGE_BYTES) page = Buffer.concat([page, Buffer.alloc(FAT_PAGE_BYTES - page.length)]);
      this.pages.set(index, page);
    }
    return page;
  }
}

// ---------------------------------------------------------------------------------------------
// Directory entries

/** Code page 437 for bytes 0x80-0xFF of 8.3 names (the OEM code page Linux and mtools default to). */
const CP437_HIGH = 'ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u00a0';

function decodeOem(bytes: Buffer): string {
  let out = '';
  for (const byte of bytes) out += byte < 0x80 ? String.fromCharCode(byte) : CP437_HIGH[byte - 0x80];
  return out;
}

function shortNameOf(entry: Buffer): string {
  const raw = Buffer.from(entry.subarray(0, 11));
  if (raw[0] === 0x05) raw[0] = 0xe5; // 0x05 stands for a real leading 0xE5 (deleted marker)
  let base = decodeOem(raw.subarray(0, 8)).replace(/ +$/, '');
  let ext = decodeOem(raw.subarray(8, 11)).replace(/ +$/, '');
  if (entry[12] & NT_LOWER_BASE) base = base.toLowerCase();
  if (entry[12] & NT_LOWER_EXT) ext = ext.toLowerCase();
  return ext ? `${base}.${ext}` : base;
}

function shortNameChecksum(entry: Buffer): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) sum = (((sum & 1) << 7) + (sum >> 1) + entry[i]) & 0xff;
  return sum;
}

/** The 13 UTF-16 units of one LFN entry, in name order. */
const LFN_UNIT_OFFSETS = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
/** ord values 1..20 cover the 255-character VFAT maximum. */
const MAX_LFN_ENTRIES = 20;

/** Collects the LFN entries before a short entry; they are only trusted when complete and checksummed. */
class LongNameCollector {
  private units: number[][] = [];
  private expectedOrd = 0;
  private checksum = -1;

  add(entry: Buffer): void {
    const ord = entry[0];
    const index = ord & 0x1f;
    if (ord & 0x40) {
      if (index === 0 || index > MAX_LFN_ENTRIES) return this.reset();
      this.units = new Array(index);
      this.checksum = entry[13];
    } else if (index !== this.expectedOrd || entry[13] !== this.checksum || index === 0) {
      return this.reset();
    }
    this.units[index - 1] = LFN_UNIT_OFFSETS.map((o) => entry.readUInt16LE(o));
    this.expectedOrd = index - 1;
  }

  /** The long name for this short entry, or undefined when the collected entries do not belong to it. */
  take(shortEntry: Buffer): string | undefined {
    const complete = this.units.length > 0 && this.expectedOrd === 0 && this.checksum === shortNameChecksum(shortEntry);
    const units = complete ? this.units.flat() : [];
    this.reset();
    if (!complete) return undefined;
    const end = units.indexOf(0);
    const used = end < 0 ? units : units.slice(0, end);
    if (used.length === 0) return undefined;
    const buf = Buffer.alloc(used.length * 2);
    used.forEach((u, i) => buf.writeUInt16LE(u, i * 2));
    return buf.toString('utf16le');
  }

  reset(): void {
    this.units = [];
    this.expectedOrd = 0;
    this.checksum = -1;
  }
}

interface FatDirent {
  name: string;
  shortName: string;
  ino: bigint;
  entry: Buffer;
}

interface Listing {
  entries: FatDirent[];
  byName: Map<string, FatDirent>;
  byFoldedName: Map<string, FatDirent>;
}

function asDirEntry(e: FatDirent): DirEntry {
  return { name: e.name, ino: e.ino, type: e.entry[11] & ATTR_DIRECTORY ? 'dir' : 'file' };
}

interface DirectoryData {
  buf: Buffer;
  /** Where each piece of `buf` lies on the device, in order. */
  segments: Segment[];
}

function devOffsetAt(data: DirectoryData, index: number): number {
  let start = 0;
  for (const s of data.segments) {
    if (index < start + s.length) return s.devOffset + (index - start);
    start += s.length;
  }
  return -1;
}

function parseEntries(data: DirectoryData): { entries: FatDirent[]; volumeLabel: string | undefined } {
  const entries: FatDirent[] = [];
  let volumeLabel: string | undefined;
  const longName = new LongNameCollector();
  for (let at = 0; at + DIRENT_SIZE <= data.buf.length; at += DIRENT_SIZE) {
    const entry = data.buf.subarray(at, at + DIRENT_SIZE);
    if (entry[0] === 0x00) break; // end of directory
    if (entry[0] === 0xe5) {
      longName.reset();
      continue;
    }
    const attr = entry[11];
    if ((attr & ATTR_LONG_NAME_MASK) === ATTR_LONG_NAME) {
      longName.add(entry);
      continue;
    }
    if (attr & ATTR_VOLUME_ID) {
      if (!(attr & ATTR_DIRECTORY) && volumeLabel === undefined) volumeLabel = decodeOem(entry.subarray(0, 11)).trimEnd();
      longName.reset();
      continue;
    }
    const shortName = shortNameOf(entry);
    const name = longName.take(entry) ?? shortName;
    if (shortName === '.' || shortName === '..') continue;
    entries.push({ name, shortName, ino: BigInt(devOffsetAt(data, at)), entry: Buffer.from(entry) });
  }
  return { entries, volumeLabel };
}

function entryFirstCluster(entry: Buffer, bits: number): number {
  const high = bits === 32 ? entry.readUInt16LE(20) : 0;
  return high * 0x10000 + entry.readUInt16LE(26);
}

// ---------------------------------------------------------------------------------------------
// The filesystem

/** A FAT filesystem; `variant` tells which FAT width the volume uses. */
export interface FatVolume extends Filesystem {
  readonly variant: 'FAT12' | 'FAT16' | 'FAT32';
}

export async function probeFat(dev: BlockDevice, options: FatOptions = {}): Promise<FatVolume | undefined> {
  if (dev.size < 512) return undefined;
  const geo = parseBootSector(await dev.read(0, 512));
  if (!geo) return undefined;
  const fs = new FatFilesystem(dev, geo, options);
  await fs.loadLabel();
  return fs;
}

class FatFilesystem implements FatVolume {
  readonly type: string;
  readonly variant: FatVolume['variant'];
  label: string | undefined;
  readonly uuid: string | undefined;
  readonly rootIno = ROOT_INO;
  readonly sizeBytes: number;
  private readonly dev: BlockDevice;
  private readonly geo: FatGeometry;
  private readonly table: FatTable;
  private readonly offsetMs: number;
  private readonly chains = new LruMap<string, Chain>(256);
  private readonly listings = new LruMap<bigint, Listing>(32);

  constructor(dev: BlockDevice, geo: FatGeometry, options: FatOptions) {
    this.dev = dev;
    this.geo = geo;
    this.table = new FatTable(dev, geo);
    this.type = FS;
    this.variant = `FAT${geo.bits}`;
    this.sizeBytes = geo.totalBytes;
    this.offsetMs = (options.utcOffsetMinutes ?? 0) * 60_000;
    const hex = geo.serial.toString(16).toUpperCase().padStart(8, '0');
    this.uuid = geo.serial ? `${hex.slice(0, 4)}-${hex.slice(4)}` : undefined;
    this.label = cleanLabel(geo.bpbLabel);
  }

  /** The volume label entry in the root directory wins over the BPB copy, as with Windows and blkid. */
  async loadLabel(): Promise<void> {
    try {
      const { volumeLabel } = parseEntries(await this.directoryData(ROOT_INO, undefined));
      if (volumeLabel !== undefined) this.label = cleanLabel(volumeLabel);
    } catch (err) {
      if (!(err instanceof FsDamageError)) throw err;
      // A damaged root directory is reported when it is listed; the label stays the BPB's.
    }
  }

  async stat(ino: bigint): Promise<FileStat> {
    if (ino === ROOT_INO) return { ino, type: 'dir', size: 0, nlink: 1, attributes: ATTR_DIRECTORY };
    const entry = await this.entryAt(ino);
    const attr = entry[11];
    const isDir = (attr & ATTR_DIRECTORY) !== 0;
    const stat: FileStat = {
      ino,
      type: isDir ? 'dir' : 'file',
      size: isDir ? 0 : entry.readUInt32LE(28),
      nlink: 1,
      attributes: attr,
    };
    const mtime = this.time(entry.readUInt16LE(24), entry.readUInt16LE(22));
    if (mtime !== undefined) stat.mtimeNs = msToNs(mtime);
    const atime = this.time(entry.readUInt16LE(18), 0);
    if (atime !== undefined) stat.atimeNs = msToNs(atime);
    const created = this.time(entry.readUInt16LE(16), entry.readUInt16LE(14));
    // Byte 13 counts 10 ms units (0-199) on top of the 2-second creation time.
    if (created !== undefined && entry[13] <= 199) stat.birthtimeNs = msToNs(created + entry[13] * 10);
    return stat;
  }

  async readdir(ino: bigint): Promise<DirEntry[]> {
    const listing = await this.listing(ino);
    return listing.entries.map(asDirEntry);
  }

  async lookup(dirIno: bigint, name: string): Promise<DirEntry | undefined> {
    const listing = await this.listing(dirIno);
    // Exact long or short name first; FAT names are case-insensitive otherwise.
    const found = listing.byName.get(name) ?? listing.byFoldedName.get(upcaseSimple(name));
    return found ? asDirEntry(found) : undefined;
  }

  async read(ino: bigint, offset: number, length: number, stream?: string): Promise<Buffer> {
    if (stream !== undefined) throw noSuchStream(FS, ino, stream);
    const entry = await this.fileEntry(ino);
    const size = entry.readUInt32LE(28);
    const count = clampRead(FS, offset, length, size);
    if (count === 0) return Buffer.alloc(0);
    const chain = await this.fileChain(ino, entry, size);
    const segments = mapRuns(chain.runs, this.geo.clusterSize, this.geo.dataOffset, offset, count);
    return readSegments(this.dev, segments, { fs: FS, ino, structure: 'file data' });
  }

  async extents(ino: bigint): Promise<FileExtent[]> {
    const entry = await this.fileEntry(ino);
    const size = entry.readUInt32LE(28);
    // FAT cannot store holes: every byte up to the size has a cluster.
    return size === 0 ? [] : [{ offset: 0, length: size, hole: false }];
  }

  async readlink(ino: bigint): Promise<string> {
    if (ino !== ROOT_INO) await this.entryAt(ino);
    throw notSymlink(FS, ino);
  }

  // -------------------------------------------------------------------------------------------

  /** A directory's parsed entries, kept for a while: lookups come in bursts for one directory. */
  private async listing(ino: bigint): Promise<Listing> {
    let listing = this.listings.get(ino);
    if (!listing) {
      const { entries } = parseEntries(await this.directoryData(ino, undefined));
      listing = { entries, byName: new Map(), byFoldedName: new Map() };
      for (const e of entries) {
        for (const n of [e.name, e.shortName]) {
          if (!listing.byName.has(n)) listing.byName.set(n, e);
          const folded = upcaseSimple(n);
          if (!listing.byFoldedName.has(folded)) listing.byFoldedName.set(folded, e);
        }
      }
      this.listings.set(ino, listing);
    }
    return listing;
  }

  private time(date: number, time: number): number | undefined {
    const ms = dosDateTimeToMs(date, time);
    return ms === undefined ? undefined : ms - this.offsetMs;
  }

  /** The short directory entry an inode number points at, checked to be a file or directory entry. */
  private async entryAt(ino: bigint): Promise<Buffer> {
    const where = { fs: FS, ino, structure: 'directory entry' };
    const offset = Number(ino);
    const inRoot = this.geo.bits !== 32 && offset >= this.geo.rootDirOffset
      && offset < this.geo.rootDirOffset + this.geo.rootDirBytes;
    const inData = offset >= this.geo.dataOffset && offset < this.geo.totalBytes;
    if (ino < 0n || ino > BigInt(Number.MAX_SAFE_INTEGER) || offset % DIRENT_SIZE !== 0 || (!inRoot && !inData)) {
      throw new FsDamageError(`inode number ${ino} is not the position of a directory entry`, where);
    }
    const entry = await readRange(this.dev, offset, DIRENT_SIZE, where);
    const attr = entry[11];
    if (entry[0] === 0 || entry[0] === 0xe5 || (attr & ATTR_LONG_NAME_MASK) === ATTR_LONG_NAME || (attr & ATTR_VOLUME_ID)) {
      throw new FsDamageError(`no file entry at byte ${offset}`, where);
    }
    return entry;
  }

  private async fileEntry(ino: bigint): Promise<Buffer> {
    if (ino === ROOT_INO) throw isDirectory(FS, ino);
    const entry = await this.entryAt(ino);
    if (entry[11] & ATTR_DIRECTORY) throw isDirectory(FS, ino);
    return entry;
  }

  private async fileChain(ino: bigint, entry: Buffer, size: number): Promise<Chain> {
    const first = entryFirstCluster(entry, this.geo.bits);
    const needed = Math.ceil(size / this.geo.clusterSize);
    const key = `${first}:${needed}`;
    let chain = this.chains.get(key);
    if (!chain) {
      const where = { fs: FS, ino, structure: 'file cluster chain' };
      chain = await followChain(this.table, first, needed, where);
      if (chain.clusters < needed) {
        throw new FsDamageError(`cluster chain ends after ${chain.clusters} clusters but the size (${size} bytes) needs ${needed}`,
          { ...where, size, clusters: chain.clusters });
      }
      this.chains.set(key, chain);
    }
    return chain;
  }

  /** The raw bytes of a directory and where they lie; `entry` may be passed when already read. */
  private async directoryData(ino: bigint, entry: Buffer | undefined): Promise<DirectoryData> {
    const where = { fs: FS, ino, structure: 'directory' };
    if (ino === ROOT_INO && this.geo.bits !== 32) {
      const buf = await readRange(this.dev, this.geo.rootDirOffset, this.geo.rootDirBytes, where);
      return { buf, segments: [{ devOffset: this.geo.rootDirOffset, length: buf.length }] };
    }
    let first = this.geo.rootCluster;
    if (ino !== ROOT_INO) {
      const dirEntry = entry ?? await this.entryAt(ino);
      if (!(dirEntry[11] & ATTR_DIRECTORY)) throw notDirectory(FS, ino);
      first = entryFirstCluster(dirEntry, this.geo.bits);
    }
    const maxClusters = Math.max(1, Math.floor(MAX_DIR_BYTES / this.geo.clusterSize));
    const chain = await followChain(this.table, first, maxClusters + 1, { ...where, structure: 'directory cluster chain' });
    if (!chain.ended) {
      throw new FsDamageError(`directory is longer than the ${MAX_DIR_BYTES} bytes FAT allows (a looped or runaway chain)`,
        { ...where, firstCluster: first });
    }
    const segments = mapRuns(chain.runs, this.geo.clusterSize, this.geo.dataOffset, 0, chain.clusters * this.geo.clusterSize);
    if (ino !== ROOT_INO) {
      const own = Number(ino);
      if (segments.some((s) => own >= s.devOffset && own < s.devOffset + s.length)) {
        throw new FsDamageError('directory contains its own entry (a directory cycle)', { ...where, firstCluster: first });
      }
    }
    return { buf: await readSegments(this.dev, segments, where), segments };
  }
}

function cleanLabel(raw: string): string | undefined {
  const label = raw.replace(/[ \0]+$/, '');
  return label === '' || label === 'NO NAME' ? undefined : label;
}
