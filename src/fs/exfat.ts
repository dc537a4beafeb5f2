/**
 * exFAT reader (read-only; the image is untrusted input).
 *
 * - Boot region: the 12-sector main region's checksum is verified; when it fails the backup
 *   region (sectors 12-23) is used, and when both fail the volume is reported damaged.
 * - Files are "entry sets": a File entry, a Stream Extension entry and 1-17 File Name entries,
 *   protected by a 16-bit set checksum that is verified before a set is trusted.
 * - Data lies in a FAT cluster chain or, with the NoFatChain flag, in consecutive clusters. Bytes
 *   between ValidDataLength and DataLength read as zeros and are reported as a hole.
 * - Lookups are case-insensitive through the volume's own up-case table (checksum verified) and
 *   the set's name hash, as Windows does.
 *
 * Identity: a file's number is the byte offset of its File entry on this device; bit 60 is set
 * when the directory holding it has no FAT chain (its clusters are consecutive), which stat needs
 * to follow an entry set across a cluster boundary. The root directory is number 1.
 *
 * Times: exFAT stores local time plus, optionally, the offset from UTC in 15-minute steps. When
 * the offset is recorded it is applied; otherwise the time is read as UTC + `utcOffsetMinutes`
 * (default 0), as for FAT. Modification and creation times carry a 10 ms field.
 */
import { FsDamageError } from './errors.ts';
import type { FsDamageContext } from './errors.ts';
import type { BlockDevice, DirEntry, FileExtent, FileStat, Filesystem } from './filesystem.ts';
import {
  CHAIN_BAD, CHAIN_END, checkCluster, dosDateTimeToMs, followChain, mapRuns, readSegments,
} from './fat.ts';
import type { Chain, ClusterRun, ClusterTable, Segment } from './fat.ts';
import {
  LruMap, clampRead, isDirectory, msToNs, noSuchStream, notDirectory, notSymlink, pushExtent, readRange,
} from './reader-util.ts';

const FS = 'exfat';
const ROOT_INO = 1n;
const NO_FAT_CHAIN_BIT = 1n << 60n;
const ENTRY = 32;
/** The specification caps a directory at 256 MiB. */
const MAX_DIR_BYTES = 256 * 1024 * 1024;
/** Directories are read in pieces of this size. */
const DIR_READ_CHUNK = 256 * 1024;

const TYPE_END = 0x00;
const TYPE_BITMAP = 0x81;
const TYPE_UPCASE = 0x82;
const TYPE_LABEL = 0x83;
const TYPE_FILE = 0x85;
const TYPE_STREAM = 0xc0;
const TYPE_NAME = 0xc1;
const IN_USE = 0x80;

const ATTR_DIRECTORY = 0x10;
const FLAG_ALLOCATION_POSSIBLE = 0x01;
const FLAG_NO_FAT_CHAIN = 0x02;

export interface ExfatOptions {
  /** Offset from UTC, in minutes, for timestamps that do not record their own offset. */
  utcOffsetMinutes?: number;
}

interface ExfatGeometry {
  sectorSize: number;
  clusterSize: number;
  fatOffset: number;
  fatBytes: number;
  heapOffset: number;
  clusterCount: number;
  rootCluster: number;
  volumeBytes: number;
  serial: number;
}

// ---------------------------------------------------------------------------------------------
// Boot region

function bootChecksum(region: Buffer, sectorSize: number): number {
  let sum = 0;
  for (let i = 0; i < sectorSize * 11; i++) {
    // VolumeFlags (106-107) and PercentInUse (112) change at run time and are left out.
    if (i === 106 || i === 107 || i === 112) continue;
    sum = (((sum & 1) ? 0x80000000 : 0) + (sum >>> 1) + region[i]) >>> 0;
  }
  return sum;
}

function checksumSectorMatches(region: Buffer, sectorSize: number): boolean {
  const expected = bootChecksum(region, sectorSize);
  const checksumSector = region.subarray(sectorSize * 11, sectorSize * 12);
  for (let i = 0; i + 4 <= checksumSector.length; i += 4) {
    if (checksumSector.readUInt32LE(i) !== expected) return false;
  }
  return true;
}

function looksLikeExfat(sector: Buffer): boolean {
  if (sector.length < 512 || sector.toString('latin1', 3, 11) !== 'EXFAT   ') return false;
  // The legacy BPB range must be zero so that FAT drivers do not mount the volume.
  for (let i = 11; i < 64; i++) if (sector[i] !== 0) return false;
  return true;
}

function parseGeometry(b: Buffer): ExfatGeometry {
  const where = { fs: FS, structure: 'boot sector' };
  const sectorShift = b[108];
  const clusterShift = b[109];
  const fatCount = b[110];
  if (b.readUInt16LE(510) !== 0xaa55) throw new FsDamageError('boot signature missing', where);
  if (sectorShift < 9 || sectorShift > 12 || clusterShift > 25 - sectorShift) {
    throw new FsDamageError(`sector shift ${sectorShift} / cluster shift ${clusterShift} out of range`, where);
  }
  if (fatCount !== 1 && fatCount !== 2) throw new FsDamageError(`${fatCount} FATs`, where);
  const sectorSize = 2 ** sectorShift;
  const clusterSize = sectorSize * 2 ** clusterShift;
  const volumeSectors = Number(b.readBigUInt64LE(72));
  const fatOffsetSectors = b.readUInt32LE(80);
  const fatLengthSectors = b.readUInt32LE(84);
  const heapOffsetSectors = b.readUInt32LE(88);
  const clusterCount = b.readUInt32LE(92);
  const rootCluster = b.readUInt32LE(96);
  const volumeFlags = b.readUInt16LE(106);
  const activeFat = fatCount === 2 ? volumeFlags & 1 : 0;
  const fatBytes = fatLengthSectors * sectorSize;
  const facts = { ...where, fatOffsetSectors, fatLengthSectors, heapOffsetSectors, clusterCount, volumeSectors };
  if (fatOffsetSectors < 24 || fatBytes < (clusterCount + 2) * 4) {
    throw new FsDamageError('FAT position or length does not fit the cluster count', facts);
  }
  if (heapOffsetSectors < fatOffsetSectors + fatLengthSectors * fatCount) {
    throw new FsDamageError('cluster heap overlaps the FAT', facts);
  }
  if (clusterCount === 0 || clusterCount > 0xfffffff5
    || heapOffsetSectors + clusterCount * 2 ** clusterShift > volumeSectors) {
    throw new FsDamageError('cluster heap does not fit in the volume', facts);
  }
  if (rootCluster < 2 || rootCluster > clusterCount + 1) throw new FsDamageError(`root cluster ${rootCluster} out of range`, facts);
  const volumeBytes = volumeSectors * sectorSize;
  if (!Number.isSafeInteger(volumeBytes)) throw new FsDamageError('volume length is absurd', facts);
  return {
    sectorSize,
    clusterSize,
    fatOffset: (fatOffsetSectors + activeFat * fatLengthSectors) * sectorSize,
    fatBytes,
    heapOffset: heapOffsetSectors * sectorSize,
    clusterCount,
    rootCluster,
    volumeBytes,
    serial: b.readUInt32LE(100),
  };
}

async function readBootRegion(dev: BlockDevice): Promise<ExfatGeometry | undefined> {
  const first = await dev.read(0, 512);
  if (!looksLikeExfat(first)) return undefined;
  const sectorShift = first[108];
  if (sectorShift < 9 || sectorShift > 12) {
    throw new FsDamageError(`bytes-per-sector shift ${sectorShift} out of range`, { fs: FS, structure: 'boot sector' });
  }
  const sectorSize = 2 ** sectorShift;
  for (const copy of [0, 1]) {
    const regionBytes = 12 * sectorSize;
    if ((copy + 1) * regionBytes > dev.size) break;
    const region = await readRange(dev, copy * regionBytes, regionBytes, { fs: FS, structure: 'boot region' });
    if (looksLikeExfat(region) && checksumSectorMatches(region, sectorSize)) return parseGeometry(region);
  }
  throw new FsDamageError('both boot regions fail their checksum', { fs: FS, structure: 'boot region' },
    'the exFAT boot region is damaged: restore the whole disk and run fsck.exfat on it');
}

// ---------------------------------------------------------------------------------------------
// FAT

const FAT_PAGE_BYTES = 64 * 1024;

class ExfatTable implements ClusterTable {
  readonly fs = FS;
  readonly clusterCount: number;
  private readonly dev: BlockDevice;
  private readonly fatOffset: number;
  private readonly pages = new LruMap<number, Buffer>(64);

  constructor(dev: BlockDevice, geo: ExfatGeometry) {
    this.dev = dev;
    this.fatOffset = geo.fatOffset;
    this.clusterCount = geo.clusterCount;
  }

  async next(cluster: number): Promise<number> {
    const at = cluster * 4;
    const index = Math.floor(at / FAT_PAGE_BYTES);
    let page = this.pages.get(index);
    if (!page) {
      const start = index * FAT_PAGE_BYTES;
      const length = Math.min(FAT_PAGE_BYTES, (this.clusterCount + 2) * 4 - start);
      page = await readRange(this.dev, this.fatOffset + start, length, { fs: FS, structure: 'FAT', page: index });
      this.pages.set(index, page);
    }
    const value = page.readUInt32LE(at % FAT_PAGE_BYTES);
    if (value === 0xffffffff) return CHAIN_END;
    if (value === 0xfffffff7) return CHAIN_BAD;
    return value;
  }
}

// ---------------------------------------------------------------------------------------------
// Entry sets

/** Where a directory's bytes are: a FAT chain or consecutive clusters. */
interface DirLocation {
  ino: bigint;
  firstCluster: number;
  noFatChain: boolean;
  /** Known length (subdirectories); undefined for the root, whose chain decides. */
  dataLength: number | undefined;
}

interface ExfatFile {
  ino: bigint;
  name: string;
  attributes: number;
  nameHash: number;
  noFatChain: boolean;
  firstCluster: number;
  validDataLength: number;
  dataLength: number;
  /** The whole set, kept for the timestamps. */
  fileEntry: Buffer;
}

function setChecksum(set: Buffer): number {
  let sum = 0;
  for (let i = 0; i < set.length; i++) {
    if (i === 2 || i === 3) continue; // the checksum field itself
    sum = ((((sum & 1) << 15) | (sum >>> 1)) + set[i]) & 0xffff;
  }
  return sum;
}

/** Parses and verifies a complete entry set (File + Stream + Names [+ vendor entries]). */
function parseEntrySet(set: Buffer, ino: bigint): ExfatFile {
  const where = { fs: FS, ino, structure: 'directory entry set' };
  const secondaryCount = set[1];
  if (set.length !== (secondaryCount + 1) * ENTRY) throw new FsDamageError('entry set is cut short', where);
  const stored = set.readUInt16LE(2);
  const actual = setChecksum(set);
  if (stored !== actual) throw new FsDamageError(`entry set checksum ${hex(stored)} != computed ${hex(actual)}`, where);
  const stream = set.subarray(ENTRY, 2 * ENTRY);
  if (stream[0] !== TYPE_STREAM) throw new FsDamageError(`second entry of a set has type ${hex(stream[0])}, not a stream extension`, where);
  const flags = stream[1];
  const nameLength = stream[3];
  const nameEntries = Math.ceil(nameLength / 15);
  if (nameLength === 0 || 1 + nameEntries > secondaryCount) {
    throw new FsDamageError(`name of ${nameLength} characters does not fit ${secondaryCount - 1} name entries`, where);
  }
  const units = Buffer.alloc(nameEntries * 30);
  for (let i = 0; i < nameEntries; i++) {
    const entry = set.subarray((2 + i) * ENTRY, (3 + i) * ENTRY);
    if (entry[0] !== TYPE_NAME) throw new FsDamageError(`name entry ${i} has type ${hex(entry[0])}`, where);
    entry.copy(units, i * 30, 2, 32);
  }
  const validDataLength = Number(stream.readBigUInt64LE(8));
  const dataLength = Number(stream.readBigUInt64LE(24));
  const firstCluster = stream.readUInt32LE(20);
  if (!Number.isSafeInteger(dataLength) || !Number.isSafeInteger(validDataLength) || validDataLength > dataLength) {
    throw new FsDamageError(`valid data length ${validDataLength} / data length ${dataLength} are inconsistent`, where);
  }
  if (!(flags & FLAG_ALLOCATION_POSSIBLE) && dataLength !== 0) {
    throw new FsDamageError('a stream without allocation claims data', where);
  }
  return {
    ino,
    name: units.toString('utf16le', 0, nameLength * 2),
    attributes: set.readUInt16LE(4),
    nameHash: stream.readUInt16LE(4),
    noFatChain: (flags & FLAG_NO_FAT_CHAIN) !== 0,
    firstCluster,
    validDataLength,
    dataLength,
    fileEntry: Buffer.from(set.subarray(0, ENTRY)),
  };
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** exFAT name hash over the up-cased name's UTF-16LE bytes. */
function nameHash(upcased: string): number {
  let hash = 0;
  for (let i = 0; i < upcased.length; i++) {
    const unit = upcased.charCodeAt(i);
    for (const byte of [unit & 0xff, unit >> 8]) hash = ((((hash & 1) << 15) | (hash >>> 1)) + byte) & 0xffff;
  }
  return hash;
}

/** One listed entry: a parsed set, or the error that makes its set unusable. */
type ListedEntry = { file: ExfatFile } | { ino: bigint; name: string; error: FsDamageError };

interface Listing {
  entries: ListedEntry[];
  byName: Map<string, ExfatFile>;
  /** Built on the first lookup (needs the up-case table). */
  byUpcasedName: Map<string, ExfatFile> | undefined;
}

function asDirEntry(file: ExfatFile): DirEntry {
  return { name: file.name, ino: file.ino, type: file.attributes & ATTR_DIRECTORY ? 'dir' : 'file' };
}

interface CriticalEntries {
  label: string | undefined;
  upcase: { firstCluster: number; length: number; checksum: number } | undefined;
  bitmap: { firstCluster: number; length: number } | undefined;
}

// ---------------------------------------------------------------------------------------------
// The filesystem

export async function probeExfat(dev: BlockDevice, options: ExfatOptions = {}): Promise<Filesystem | undefined> {
  if (dev.size < 512) return undefined;
  const geo = await readBootRegion(dev);
  if (!geo) return undefined;
  const fs = new ExfatFilesystem(dev, geo, options);
  await fs.loadCriticalEntries();
  return fs;
}

class ExfatFilesystem implements Filesystem {
  readonly type = FS;
  label: string | undefined;
  readonly uuid: string | undefined;
  readonly rootIno = ROOT_INO;
  readonly sizeBytes: number;
  private readonly dev: BlockDevice;
  private readonly geo: ExfatGeometry;
  private readonly table: ExfatTable;
  private readonly offsetMs: number;
  private readonly chains = new LruMap<string, Chain>(256);
  private readonly listings = new LruMap<bigint, Listing>(32);
  private upcaseInfo: CriticalEntries['upcase'];
  private upcaseTable: Promise<Uint16Array> | undefined;

  constructor(dev: BlockDevice, geo: ExfatGeometry, options: ExfatOptions) {
    this.dev = dev;
    this.geo = geo;
    this.table = new ExfatTable(dev, geo);
    this.sizeBytes = geo.volumeBytes;
    this.offsetMs = (options.utcOffsetMinutes ?? 0) * 60_000;
    const h = geo.serial.toString(16).toUpperCase().padStart(8, '0');
    this.uuid = `${h.slice(0, 4)}-${h.slice(4)}`;
  }

  /** Finds the label, the allocation bitmap and the up-case table in the root directory. */
  async loadCriticalEntries(): Promise<void> {
    const found: CriticalEntries = { label: undefined, upcase: undefined, bitmap: undefined };
    for await (const { entry } of this.rawEntries(this.rootLocation())) {
      if (entry[0] === TYPE_LABEL) {
        const count = Math.min(entry[1], 11);
        found.label = entry.toString('utf16le', 2, 2 + count * 2);
      } else if (entry[0] === TYPE_UPCASE && !found.upcase) {
        found.upcase = { checksum: entry.readUInt32LE(4), firstCluster: entry.readUInt32LE(20), length: Number(entry.readBigUInt64LE(24)) };
      } else if (entry[0] === TYPE_BITMAP && !found.bitmap) {
        found.bitmap = { firstCluster: entry.readUInt32LE(20), length: Number(entry.readBigUInt64LE(24)) };
      }
      if (found.label !== undefined && found.upcase && found.bitmap) break;
    }
    const where = { fs: FS, structure: 'root directory' };
    if (!found.bitmap) throw new FsDamageError('no allocation bitmap entry in the root directory', where);
    if (found.bitmap.length < Math.ceil(this.geo.clusterCount / 8)) {
      throw new FsDamageError(`allocation bitmap of ${found.bitmap.length} bytes is too small for ${this.geo.clusterCount} clusters`, where);
    }
    checkCluster(this.table, found.bitmap.firstCluster, { ...where, structure: 'allocation bitmap' });
    this.label = found.label || undefined;
    this.upcaseInfo = found.upcase;
  }

  async stat(ino: bigint): Promise<FileStat> {
    if (ino === ROOT_INO) return { ino, type: 'dir', size: 0, nlink: 1, attributes: ATTR_DIRECTORY };
    const file = await this.fileAt(ino);
    const isDir = (file.attributes & ATTR_DIRECTORY) !== 0;
    const e = file.fileEntry;
    const stat: FileStat = { ino, type: isDir ? 'dir' : 'file', size: isDir ? 0 : file.dataLength, nlink: 1, attributes: file.attributes };
    // File entry: create @8, modified @12, accessed @16; 10 ms fields @20/21; UTC offsets @22/23/24.
    stat.birthtimeNs = this.time(e.readUInt32LE(8), e[20], e[22]);
    stat.mtimeNs = this.time(e.readUInt32LE(12), e[21], e[23]);
    stat.atimeNs = this.time(e.readUInt32LE(16), 0, e[24]);
    for (const key of ['birthtimeNs', 'mtimeNs', 'atimeNs'] as const) if (stat[key] === undefined) delete stat[key];
    return stat;
  }

  async readdir(ino: bigint): Promise<DirEntry[]> {
    const listing = await this.listing(ino);
    return listing.entries.map((listed) => ('file' in listed
      ? asDirEntry(listed.file)
      // Listed so the walk can report it; stat() on it raises the set's error.
      : { name: listed.name, ino: listed.ino, type: 'unknown' }));
  }

  async lookup(dirIno: bigint, name: string): Promise<DirEntry | undefined> {
    const listing = await this.listing(dirIno);
    const upcase = await this.upcase();
    if (!listing.byUpcasedName) {
      // exFAT names are unique ignoring case (through the volume's own up-case table).
      listing.byUpcasedName = new Map();
      for (const listed of listing.entries) {
        if (!('file' in listed)) continue;
        const key = upcaseWith(upcase, listed.file.name);
        if (nameHash(key) !== listed.file.nameHash) continue; // a set whose hash disagrees is not trusted for lookups
        if (!listing.byUpcasedName.has(key)) listing.byUpcasedName.set(key, listed.file);
      }
    }
    const found = listing.byName.get(name) ?? listing.byUpcasedName.get(upcaseWith(upcase, name));
    return found ? asDirEntry(found) : undefined;
  }

  /** A directory's entry sets, kept for a while: lookups come in bursts for one directory. */
  private async listing(ino: bigint): Promise<Listing> {
    let listing = this.listings.get(ino);
    if (!listing) {
      const entries: ListedEntry[] = [];
      for await (const listed of this.entrySets(await this.directoryLocation(ino))) entries.push(listed);
      listing = { entries, byName: new Map(), byUpcasedName: undefined };
      for (const listed of entries) if ('file' in listed && !listing.byName.has(listed.file.name)) listing.byName.set(listed.file.name, listed.file);
      this.listings.set(ino, listing);
    }
    return listing;
  }

  async read(ino: bigint, offset: number, length: number, stream?: string): Promise<Buffer> {
    if (stream !== undefined) throw noSuchStream(FS, ino, stream);
    const file = await this.regularFile(ino);
    const count = clampRead(FS, offset, length, file.dataLength);
    if (count === 0) return Buffer.alloc(0);
    const out = Buffer.alloc(count); // beyond ValidDataLength stays zero
    const stored = Math.min(offset + count, file.validDataLength) - offset;
    if (stored > 0) {
      const runs = await this.dataRuns(file, file.validDataLength, 'file data');
      const data = await readSegments(this.dev, mapRuns(runs, this.geo.clusterSize, this.geo.heapOffset, offset, stored),
        { fs: FS, ino, structure: 'file data' });
      data.copy(out, 0);
    }
    return out;
  }

  async extents(ino: bigint): Promise<FileExtent[]> {
    const file = await this.regularFile(ino);
    const out: FileExtent[] = [];
    pushExtent(out, 0, file.validDataLength, false);
    pushExtent(out, file.validDataLength, file.dataLength - file.validDataLength, true);
    return out;
  }

  async readlink(ino: bigint): Promise<string> {
    if (ino !== ROOT_INO) await this.fileAt(ino);
    throw notSymlink(FS, ino);
  }

  // -------------------------------------------------------------------------------------------

  private time(stamp: number, tenMs: number, utcOffset: number): bigint | undefined {
    let ms = dosDateTimeToMs(stamp >>> 16, stamp & 0xffff);
    if (ms === undefined) return undefined;
    if (tenMs <= 199) ms += tenMs * 10;
    if (utcOffset & 0x80) {
      const quarters = utcOffset & 0x40 ? (utcOffset & 0x7f) - 0x80 : utcOffset & 0x7f; // signed 7 bits
      ms -= quarters * 15 * 60_000;
    } else {
      ms -= this.offsetMs;
    }
    return msToNs(ms);
  }

  private rootLocation(): DirLocation {
    return { ino: ROOT_INO, firstCluster: this.geo.rootCluster, noFatChain: false, dataLength: undefined };
  }

  private async directoryLocation(ino: bigint): Promise<DirLocation> {
    if (ino === ROOT_INO) return this.rootLocation();
    const file = await this.fileAt(ino);
    if (!(file.attributes & ATTR_DIRECTORY)) throw notDirectory(FS, ino);
    if (file.dataLength === 0 || file.dataLength > MAX_DIR_BYTES) {
      throw new FsDamageError(`directory length ${file.dataLength} is outside 1..${MAX_DIR_BYTES}`, { fs: FS, ino, structure: 'directory' });
    }
    return { ino, firstCluster: file.firstCluster, noFatChain: file.noFatChain, dataLength: file.dataLength };
  }

  private async regularFile(ino: bigint): Promise<ExfatFile> {
    if (ino === ROOT_INO) throw isDirectory(FS, ino);
    const file = await this.fileAt(ino);
    if (file.attributes & ATTR_DIRECTORY) throw isDirectory(FS, ino);
    return file;
  }

  /** The clusters holding the first `bytes` bytes of a stream. */
  private async dataRuns(stream: { ino: bigint; firstCluster: number; noFatChain: boolean }, bytes: number, structure: string): Promise<ClusterRun[]> {
    const where = { fs: FS, ino: stream.ino, structure };
    const needed = Math.ceil(bytes / this.geo.clusterSize);
    if (needed === 0) return [];
    if (needed > this.geo.clusterCount) {
      throw new FsDamageError(`${bytes} bytes need more clusters than the volume has`, { ...where, bytes });
    }
    checkCluster(this.table, stream.firstCluster, where);
    if (stream.noFatChain) {
      checkCluster(this.table, stream.firstCluster + needed - 1, { ...where, clusters: needed });
      return [{ cluster: stream.firstCluster, count: needed }];
    }
    const key = `${stream.firstCluster}:${needed}`;
    let chain = this.chains.get(key);
    if (!chain) {
      chain = await followChain(this.table, stream.firstCluster, needed, where);
      if (chain.clusters < needed) {
        throw new FsDamageError(`cluster chain ends after ${chain.clusters} clusters but ${needed} are needed`, { ...where, bytes });
      }
      this.chains.set(key, chain);
    }
    return chain.runs;
  }

  /** Device segments of a directory, in order. */
  private async directorySegments(dir: DirLocation): Promise<Segment[]> {
    const { clusterSize, heapOffset } = this.geo;
    if (dir.dataLength !== undefined) {
      const runs = await this.dataRuns(dir, dir.dataLength, 'directory clusters');
      return mapRuns(runs, clusterSize, heapOffset, 0, dir.dataLength);
    }
    const maxClusters = Math.floor(MAX_DIR_BYTES / clusterSize);
    const where = { fs: FS, ino: dir.ino, structure: 'directory cluster chain' };
    const chain = await followChain(this.table, dir.firstCluster, maxClusters + 1, where);
    if (!chain.ended) throw new FsDamageError('directory chain is longer than 256 MiB (looped or runaway)', where);
    return mapRuns(chain.runs, clusterSize, heapOffset, 0, chain.clusters * clusterSize);
  }

  /** Every 32-byte entry of a directory up to the end marker, with its device offset. */
  private async *rawEntries(dir: DirLocation): AsyncGenerator<{ pos: number; entry: Buffer }> {
    const where = { fs: FS, ino: dir.ino, structure: 'directory' };
    for (const segment of await this.directorySegments(dir)) {
      for (let done = 0; done < segment.length; done += DIR_READ_CHUNK) {
        const length = Math.min(DIR_READ_CHUNK, segment.length - done);
        const buf = await readRange(this.dev, segment.devOffset + done, length, where);
        for (let at = 0; at + ENTRY <= buf.length; at += ENTRY) {
          const entry = buf.subarray(at, at + ENTRY);
          if (entry[0] === TYPE_END) return;
          yield { pos: segment.devOffset + done + at, entry };
        }
      }
    }
  }

  /** The file entry sets of a directory, each parsed and verified (or its error). */
  private async *entrySets(dir: DirLocation): AsyncGenerator<ListedEntry> {
    if (dir.ino !== ROOT_INO) {
      const own = Number(dir.ino & ~NO_FAT_CHAIN_BIT);
      const segments = await this.directorySegments(dir);
      if (segments.some((s) => own >= s.devOffset && own < s.devOffset + s.length)) {
        throw new FsDamageError('directory contains its own entry (a directory cycle)', { fs: FS, ino: dir.ino, structure: 'directory' });
      }
    }
    const flag = dir.noFatChain ? NO_FAT_CHAIN_BIT : 0n;
    let pending: { ino: bigint; parts: Buffer[]; wanted: number } | undefined;
    for await (const { pos, entry } of this.rawEntries(dir)) {
      const type = entry[0];
      if (pending) {
        // A set is interrupted by an unused entry or a new primary entry.
        if ((type & IN_USE) && (type & 0x40)) {
          pending.parts.push(Buffer.from(entry));
          if (pending.parts.length === pending.wanted) {
            yield this.finishSet(pending.ino, Buffer.concat(pending.parts));
            pending = undefined;
          }
          continue;
        }
        yield damagedSet(pending.ino, 'entry set is cut short');
        pending = undefined;
      }
      if (type === TYPE_FILE) {
        const secondaryCount = entry[1];
        const ino = BigInt(pos) | flag;
        if (secondaryCount < 2 || secondaryCount > 18) {
          yield damagedSet(ino, `file entry with ${secondaryCount} secondary entries`);
          continue;
        }
        pending = { ino, parts: [Buffer.from(entry)], wanted: secondaryCount + 1 };
      }
    }
    if (pending) yield damagedSet(pending.ino, 'entry set is cut short by the end of the directory');
  }

  private finishSet(ino: bigint, set: Buffer): ListedEntry {
    try {
      return { file: parseEntrySet(set, ino) };
    } catch (err) {
      if (!(err instanceof FsDamageError)) throw err;
      return { ino, name: bestEffortName(set) || placeholderName(ino), error: err };
    }
  }

  /** Reads and verifies the entry set a file number points at. */
  private async fileAt(ino: bigint): Promise<ExfatFile> {
    const where: FsDamageContext = { fs: FS, ino, structure: 'directory entry set' };
    const noFatChain = (ino & NO_FAT_CHAIN_BIT) !== 0n;
    const offset = Number(ino & ~NO_FAT_CHAIN_BIT);
    const { heapOffset, clusterSize } = this.geo;
    if (ino < 0n || ino >= 1n << 61n || offset % ENTRY !== 0 || offset < heapOffset
      || offset >= heapOffset + this.geo.clusterCount * clusterSize) {
      throw new FsDamageError(`file number ${ino} is not the position of a directory entry`, where);
    }
    const first = await readRange(this.dev, offset, ENTRY, where);
    if (first[0] !== TYPE_FILE) throw new FsDamageError(`no file entry at byte ${offset} (type ${hex(first[0])})`, where);
    const total = (first[1] + 1) * ENTRY;
    if (first[1] < 2 || first[1] > 18) throw new FsDamageError(`file entry with ${first[1]} secondary entries`, where);
    // The set may continue in the directory's next cluster.
    const parts: Buffer[] = [];
    let cluster = Math.floor((offset - heapOffset) / clusterSize) + 2;
    let at = offset;
    let got = 0;
    while (got < total) {
      const clusterEnd = heapOffset + (cluster - 1) * clusterSize;
      const take = Math.min(total - got, clusterEnd - at);
      parts.push(await readRange(this.dev, at, take, where));
      got += take;
      if (got >= total) break;
      const next = noFatChain ? cluster + 1 : await this.table.next(cluster);
      checkCluster(this.table, next, { ...where, previousCluster: cluster });
      cluster = next;
      at = heapOffset + (cluster - 2) * clusterSize;
    }
    return parseEntrySet(Buffer.concat(parts), ino);
  }

  private upcase(): Promise<Uint16Array> {
    this.upcaseTable ??= this.loadUpcase();
    return this.upcaseTable;
  }

  private async loadUpcase(): Promise<Uint16Array> {
    const where = { fs: FS, structure: 'up-case table' };
    const info = this.upcaseInfo;
    if (!info) throw new FsDamageError('no up-case table entry in the root directory', where);
    // Uncompressed, the table is 65536 UTF-16 units; compressed tables are smaller.
    if (info.length < 2 || info.length > 2 * 65536 || info.length % 2 !== 0) {
      throw new FsDamageError(`up-case table length ${info.length} is invalid`, where);
    }
    const runs = await this.dataRuns({ ino: 0n, firstCluster: info.firstCluster, noFatChain: false }, info.length, 'up-case table');
    const raw = await readSegments(this.dev, mapRuns(runs, this.geo.clusterSize, this.geo.heapOffset, 0, info.length), where);
    let sum = 0;
    for (const byte of raw) sum = (((sum & 1) ? 0x80000000 : 0) + (sum >>> 1) + byte) >>> 0;
    if (sum !== info.checksum) throw new FsDamageError(`up-case table checksum ${hex(sum)} != recorded ${hex(info.checksum)}`, where);
    return expandUpcase(raw);
  }
}

/** Expands the compressed up-case table: 0xFFFF followed by n means "the next n characters map to themselves". */
function expandUpcase(raw: Buffer): Uint16Array {
  const table = new Uint16Array(65536);
  for (let i = 0; i < table.length; i++) table[i] = i;
  let ch = 0;
  for (let at = 0; at + 2 <= raw.length && ch < 65536; at += 2) {
    const value = raw.readUInt16LE(at);
    if (value === 0xffff && at + 4 <= raw.length) {
      ch += raw.readUInt16LE(at + 2);
      at += 2;
      continue;
    }
    table[ch++] = value;
  }
  return table;
}

function upcaseWith(table: Uint16Array, name: string): string {
  let out = '';
  for (let i = 0; i < name.length; i++) out += String.fromCharCode(table[name.charCodeAt(i)]);
  return out;
}

function placeholderName(ino: bigint): string {
  return `damaged entry at byte ${ino & ~NO_FAT_CHAIN_BIT}`;
}

function damagedSet(ino: bigint, message: string): ListedEntry {
  return { ino, name: placeholderName(ino), error: new FsDamageError(message, { fs: FS, ino, structure: 'directory entry set' }) };
}

/** The name of a set whose checksum failed, for the listing that reports it. */
function bestEffortName(set: Buffer): string {
  if (set.length < 3 * ENTRY || set[ENTRY] !== TYPE_STREAM) return '';
  const length = Math.min(set[ENTRY + 3], 15 * Math.floor(set.length / ENTRY - 2));
  const units: Buffer[] = [];
  for (let at = 2 * ENTRY; at < set.length; at += ENTRY) units.push(set.subarray(at + 2, at + 32));
  return Buffer.concat(units).toString('utf16le', 0, length * 2);
}
