/**
 * NTFS reader (read-only; the image is untrusted input).
 *
 * Structures: the boot sector gives the cluster size and where $MFT starts; $MFT's own run list
 * (record 0, extended through its $ATTRIBUTE_LIST when the MFT is very fragmented) maps every
 * other record. Records and index blocks carry update sequence arrays: every 512-byte stride's
 * last two bytes must match the sequence number (else the record was torn) and are restored.
 * Attributes are resident or described by run lists (sparse runs have no LCN); attributes that
 * do not fit one record live in extension records named by $ATTRIBUTE_LIST.
 *
 * Identity: a file's number is its MFT record number (as ntfs-3g reports st_ino), so hard links
 * share it. Directories list their $I30 B+tree in collation order; names in the DOS namespace
 * (8.3 aliases of a long name) are not listed but can be looked up; system files (records below
 * 16, including the root's "." entry) are hidden. Lookups descend the B+tree with NTFS collation
 * (upper-cased through the volume's $UpCase table, then case-sensitive): an exact match wins,
 * else a case-insensitive one, as Windows resolves names.
 *
 * Special files: reparse points with the symlink or mount-point (junction) tag are symlinks; so
 * are Interix symlinks ("IntxLNK\1" system files), which ntfs-3g creates. Like ntfs-3g, Interix
 * character/block devices are devices, and an empty (or one-byte) system file with no other
 * meaning is a FIFO (socket). Symlink targets: relative targets come back with '/' separators;
 * absolute Windows targets ("C:\dir") come back as stored, with the "\??\" prefix removed.
 *
 * Data: sparse runs and bytes past the initialized size read as zeros and are reported as holes.
 * LZNT1-compressed attributes are read per compression unit (16 clusters): a unit whose runs are
 * all sparse is zeros, one fully allocated is stored raw, otherwise its allocated clusters hold
 * LZNT1 chunks. Encrypted ($EFS) data cannot be read without the user's key: an error says so.
 * Alternate data streams are listed in FileStat.streams and read by name.
 */
import { FsDamageError, FsUnsupportedError } from './errors.ts';
import type { FsDamageContext } from './errors.ts';
import type { BlockDevice, DirEntry, FileExtent, FileStat, FileType, Filesystem } from './filesystem.ts';
import {
  LruMap, clampRead, isDirectory, isPowerOfTwo, noSuchStream, notDirectory, notSymlink, pushExtent, readRange, utf16At,
} from './reader-util.ts';

const FS = 'ntfs';
const ROOT_RECORD = 5;
const UPCASE_RECORD = 10;
const VOLUME_RECORD = 3;
/** Records below this number are NTFS metadata files ($MFT, $LogFile, ..., reserved). */
const FIRST_USER_RECORD = 16;
const FIXUP_STRIDE = 512;

const AT_STANDARD_INFORMATION = 0x10;
const AT_ATTRIBUTE_LIST = 0x20;
const AT_FILE_NAME = 0x30;
const AT_VOLUME_NAME = 0x60;
const AT_DATA = 0x80;
const AT_INDEX_ROOT = 0x90;
const AT_INDEX_ALLOCATION = 0xa0;
const AT_REPARSE_POINT = 0xc0;
const AT_END = 0xffffffff;

const ATTR_FLAG_COMPRESSED = 0x0001;
const ATTR_FLAG_ENCRYPTED = 0x4000;

const RECORD_IN_USE = 0x0001;
const RECORD_IS_DIRECTORY = 0x0002;

const FILE_ATTR_SYSTEM = 0x0004;
const FILE_ATTR_DIRECTORY = 0x0010;
const FILE_ATTR_REPARSE_POINT = 0x0400;
/** In $FILE_NAME flags: the file has a $I30 index, i.e. it is a directory. */
const FILE_ATTR_DUP_INDEX_PRESENT = 0x10000000;

const NAMESPACE_DOS = 2;

const INDEX_ENTRY_HAS_SUBNODE = 0x01;
const INDEX_ENTRY_LAST = 0x02;
const COLLATION_FILE_NAME = 0x01;

const REPARSE_TAG_SYMLINK = 0xa000000c;
const REPARSE_TAG_MOUNT_POINT = 0xa0000003;
const SYMLINK_FLAG_RELATIVE = 0x01;

const INTX_SYMLINK = Buffer.from('IntxLNK\u0001', 'latin1');
const INTX_CHARDEV = Buffer.from('IntxCHR\u0000', 'latin1');
const INTX_BLOCKDEV = Buffer.from('IntxBLK\u0000', 'latin1');
/** ntfs-3g's own limit for an Interix file: magic + PATH_MAX UTF-16 units. */
const MAX_INTX_BYTES = 8 + 2 * 4096;

/** 100 ns intervals between 1601-01-01 and 1970-01-01. */
const EPOCH_DIFF_100NS = 116444736000000000n;

const MAX_INDEX_DEPTH = 32;
const MAX_EXTENSION_RECORDS = 4096;
const MAX_ATTRIBUTE_LIST_BYTES = 8 * 1024 * 1024;
const MAX_REPARSE_BYTES = 16 * 1024;

interface NtfsGeometry {
  sectorSize: number;
  clusterSize: number;
  totalClusters: number;
  mftOffset: number;
  recordSize: number;
  indexBlockSize: number;
  serial: bigint;
  totalBytes: number;
}

/** A run of clusters: `lcn` -1 is a sparse run. */
interface Run {
  vcn: number;
  lcn: number;
  length: number;
}

interface Attribute {
  type: number;
  name: string;
  flags: number;
  /** The record the attribute was found in. */
  record: number;
  value: Buffer | undefined;
  nonResident: NonResidentHeader | undefined;
}

interface NonResidentHeader {
  startVcn: number;
  lastVcn: number;
  runs: Run[];
  compressionUnit: number;
  allocatedSize: number;
  dataSize: number;
  initializedSize: number;
}

/** An attribute's value, ready to read. */
type Stream =
  | { resident: true; name: string; data: Buffer }
  | {
    resident: false;
    name: string;
    runs: Run[];
    dataSize: number;
    initializedSize: number;
    /** Clusters per compression unit; 0 when not compressed. */
    unitClusters: number;
    encrypted: boolean;
  };

interface FileNameInfo {
  parent: number;
  name: string;
  namespace: number;
  flags: number;
}

interface NtfsFile {
  record: number;
  isDir: boolean;
  standardInfo: Buffer | undefined;
  fileNames: FileNameInfo[];
  /** '' is the unnamed (default) data stream. */
  dataStreams: Map<string, Stream>;
  indexRoot: Buffer | undefined;
  indexAllocation: Stream | undefined;
  reparse: Buffer | undefined;
}

// ---------------------------------------------------------------------------------------------
// Boot sector, fixups, run lists

function parseBootSector(b: Buffer): NtfsGeometry | undefined {
  if (b.length < 512 || b.toString('latin1', 3, 11) !== 'NTFS    ') return undefined;
  const where = { fs: FS, structure: 'boot sector' };
  if (b.readUInt16LE(510) !== 0xaa55) throw new FsDamageError('boot signature 0xAA55 missing', where);
  const sectorSize = b.readUInt16LE(11);
  const rawSpc = b[13];
  // Values above 0x80 encode 2^(256 - value) sectors, for clusters above 64 KiB.
  const sectorsPerCluster = rawSpc <= 0x80 ? rawSpc : 2 ** (256 - rawSpc);
  if (!isPowerOfTwo(sectorSize) || sectorSize < 256 || sectorSize > 4096 || !isPowerOfTwo(sectorsPerCluster)) {
    throw new FsDamageError(`sector size ${sectorSize} / sectors per cluster ${rawSpc} are invalid`, where);
  }
  const clusterSize = sectorSize * sectorsPerCluster;
  if (clusterSize > 2 * 1024 * 1024) throw new FsDamageError(`cluster size ${clusterSize} is too large`, where);
  const totalSectors = Number(b.readBigUInt64LE(40));
  const mftLcn = Number(b.readBigUInt64LE(48));
  const recordSize = recordOrBlockSize(b.readInt8(64), clusterSize);
  const indexBlockSize = recordOrBlockSize(b.readInt8(68), clusterSize);
  const facts = { ...where, totalSectors, mftLcn, recordSize, indexBlockSize };
  if (!Number.isSafeInteger(totalSectors * sectorSize) || totalSectors === 0) throw new FsDamageError('total sector count is absurd', facts);
  const totalClusters = Math.floor((totalSectors * sectorSize) / clusterSize);
  if (!isPowerOfTwo(recordSize) || recordSize < 512 || recordSize > 65536) {
    throw new FsDamageError(`MFT record size ${recordSize} is invalid`, facts);
  }
  if (!isPowerOfTwo(indexBlockSize) || indexBlockSize < 512 || indexBlockSize > 65536) {
    throw new FsDamageError(`index block size ${indexBlockSize} is invalid`, facts);
  }
  if (!Number.isSafeInteger(mftLcn) || mftLcn === 0 || mftLcn >= totalClusters) throw new FsDamageError(`$MFT cluster ${mftLcn} is outside the volume`, facts);
  return {
    sectorSize,
    clusterSize,
    totalClusters,
    mftOffset: mftLcn * clusterSize,
    recordSize,
    indexBlockSize,
    serial: b.readBigUInt64LE(72),
    totalBytes: totalSectors * sectorSize,
  };
}

/** Positive: clusters per record; negative n: 2^-n bytes. */
function recordOrBlockSize(raw: number, clusterSize: number): number {
  if (raw > 0) return raw * clusterSize;
  if (raw < 0 && raw >= -31) return 2 ** -raw;
  return 0;
}

/** Checks and undoes the update sequence array of a multi-sector record (FILE, INDX), in place. */
function applyFixups(buf: Buffer, magic: string, where: FsDamageContext): void {
  if (buf.toString('latin1', 0, 4) !== magic) {
    throw new FsDamageError(`expected '${magic}' record, found '${buf.toString('latin1', 0, 4).replace(/[^\x20-\x7e]/g, '?')}'`, where);
  }
  const usaOffset = buf.readUInt16LE(4);
  const usaCount = buf.readUInt16LE(6);
  const strides = buf.length / FIXUP_STRIDE;
  if (usaCount !== strides + 1 || usaOffset % 2 !== 0 || usaOffset < 8 || usaOffset + usaCount * 2 > FIXUP_STRIDE - 2) {
    throw new FsDamageError(`update sequence array (offset ${usaOffset}, ${usaCount} entries) does not fit the ${buf.length}-byte record`, where);
  }
  const usn = buf.readUInt16LE(usaOffset);
  for (let i = 1; i < usaCount; i++) {
    const at = i * FIXUP_STRIDE - 2;
    if (buf.readUInt16LE(at) !== usn) {
      throw new FsDamageError(`update sequence mismatch in sector ${i - 1} (a torn or damaged write)`, { ...where, sector: i - 1 });
    }
    buf.writeUInt16LE(buf.readUInt16LE(usaOffset + i * 2), at);
  }
}

/** Reads a little-endian integer of 1-8 bytes; undefined when it does not fit a safe integer. */
function readVarInt(buf: Buffer, at: number, size: number, signed: boolean): number | undefined {
  let value = 0n;
  for (let i = size - 1; i >= 0; i--) value = (value << 8n) | BigInt(buf[at + i]);
  if (signed && size > 0 && buf[at + size - 1] & 0x80) value -= 1n << BigInt(size * 8);
  const n = Number(value);
  return Number.isSafeInteger(n) ? n : undefined;
}

function decodeRuns(buf: Buffer, start: number, end: number, nr: { startVcn: number; lastVcn: number }, totalClusters: number, where: FsDamageContext): Run[] {
  const runs: Run[] = [];
  let vcn = nr.startVcn;
  let lcn = 0;
  let at = start;
  while (at < end && buf[at] !== 0) {
    const header = buf[at];
    const lengthSize = header & 0x0f;
    const offsetSize = header >> 4;
    if (lengthSize === 0 || lengthSize > 8 || offsetSize > 8 || at + 1 + lengthSize + offsetSize > end) {
      throw new FsDamageError(`run list entry header 0x${header.toString(16)} at byte ${at - start} is invalid`, { ...where, runListOffset: at - start });
    }
    const length = readVarInt(buf, at + 1, lengthSize, false);
    if (length === undefined || length <= 0) throw new FsDamageError('run with an invalid length', where);
    let runLcn = -1;
    if (offsetSize > 0) {
      const delta = readVarInt(buf, at + 1 + lengthSize, offsetSize, true);
      if (delta === undefined) throw new FsDamageError('run with an absurd cluster offset', where);
      lcn += delta;
      if (lcn < 0 || lcn + length > totalClusters) {
        throw new FsDamageError(`run of ${length} clusters at cluster ${lcn} lies outside the volume (${totalClusters} clusters)`,
          { ...where, lcn, length });
      }
      runLcn = lcn;
    }
    runs.push({ vcn, lcn: runLcn, length });
    vcn += length;
    at += 1 + lengthSize + offsetSize;
  }
  if (vcn !== nr.lastVcn + 1 && !(runs.length === 0 && nr.lastVcn < nr.startVcn)) {
    throw new FsDamageError(`run list covers clusters ${nr.startVcn}..${vcn - 1} but the attribute says ..${nr.lastVcn}`,
      { ...where, startVcn: nr.startVcn, lastVcn: nr.lastVcn });
  }
  return runs;
}

// ---------------------------------------------------------------------------------------------
// Records and attributes

function parseAttributes(rec: Buffer, record: number, totalClusters: number): Attribute[] {
  const where = { fs: FS, ino: record, structure: 'MFT record attributes' };
  const bytesInUse = Math.min(rec.readUInt32LE(24), rec.length);
  let at = rec.readUInt16LE(20);
  const out: Attribute[] = [];
  while (at + 8 <= bytesInUse) {
    const type = rec.readUInt32LE(at);
    if (type === AT_END) return out;
    const length = rec.readUInt32LE(at + 4);
    if (length < 24 || length % 8 !== 0 || at + length > bytesInUse) {
      throw new FsDamageError(`attribute 0x${type.toString(16)} at byte ${at} has an invalid length ${length}`, { ...where, attrOffset: at });
    }
    const attr = rec.subarray(at, at + length);
    out.push(parseAttribute(attr, type, record, totalClusters, { ...where, attrType: type, attrOffset: at }));
    at += length;
  }
  throw new FsDamageError('attribute list of the record has no end marker', where);
}

function parseAttribute(attr: Buffer, type: number, record: number, totalClusters: number, where: FsDamageContext): Attribute {
  const nonResident = attr[8] !== 0;
  const nameLength = attr[9];
  const nameOffset = attr.readUInt16LE(10);
  const name = nameLength ? utf16At(attr, nameOffset, nameLength, where) : '';
  const flags = attr.readUInt16LE(12);
  if (!nonResident) {
    const valueLength = attr.readUInt32LE(16);
    const valueOffset = attr.readUInt16LE(20);
    if (valueOffset + valueLength > attr.length) {
      throw new FsDamageError(`resident value of ${valueLength} bytes at ${valueOffset} overruns its attribute`, where);
    }
    return { type, name, flags, record, value: Buffer.from(attr.subarray(valueOffset, valueOffset + valueLength)), nonResident: undefined };
  }
  if (attr.length < 64) throw new FsDamageError('non-resident attribute header is cut short', where);
  const startVcn = Number(attr.readBigInt64LE(16));
  const lastVcn = Number(attr.readBigInt64LE(24));
  const runsOffset = attr.readUInt16LE(32);
  const sizes = [attr.readBigInt64LE(40), attr.readBigInt64LE(48), attr.readBigInt64LE(56)].map(Number);
  const [allocatedSize, dataSize, initializedSize] = sizes;
  if (!Number.isSafeInteger(startVcn) || startVcn < 0 || !Number.isSafeInteger(lastVcn) || lastVcn < -1
    || sizes.some((s) => !Number.isSafeInteger(s) || s < 0) || runsOffset > attr.length) {
    throw new FsDamageError('non-resident attribute header has invalid VCNs, sizes or run list offset', { ...where, startVcn, lastVcn });
  }
  const header = { startVcn, lastVcn };
  return {
    type,
    name,
    flags,
    record,
    value: undefined,
    nonResident: {
      ...header,
      runs: decodeRuns(attr, runsOffset, attr.length, header, totalClusters, where),
      compressionUnit: attr.readUInt16LE(34),
      allocatedSize,
      dataSize,
      initializedSize,
    },
  };
}

/** Joins the pieces of one non-resident attribute (from several records) into one stream. */
function mergeExtents(pieces: Attribute[], geo: NtfsGeometry, where: FsDamageContext): Stream {
  const first = pieces[0];
  if (first.value !== undefined) return { resident: true, name: first.name, data: first.value };
  const sorted = [...pieces].sort((a, b) => (a.nonResident?.startVcn ?? 0) - (b.nonResident?.startVcn ?? 0));
  const runs: Run[] = [];
  let expected = 0;
  for (const piece of sorted) {
    const nr = piece.nonResident;
    if (!nr) throw new FsDamageError('attribute is both resident and non-resident', where);
    if (nr.startVcn !== expected) {
      throw new FsDamageError(`attribute extents are not contiguous: expected VCN ${expected}, found ${nr.startVcn}`, where);
    }
    runs.push(...nr.runs);
    expected = nr.lastVcn + 1;
  }
  const base = sorted[0].nonResident as NonResidentHeader;
  if (base.dataSize > base.allocatedSize) {
    throw new FsDamageError(`data size ${base.dataSize} exceeds allocated size ${base.allocatedSize}`, where);
  }
  const compressed = (sorted[0].flags & ATTR_FLAG_COMPRESSED) !== 0;
  let unitClusters = 0;
  if (compressed) {
    if (base.compressionUnit === 0 || base.compressionUnit > 8) {
      throw new FsDamageError(`compression unit 2^${base.compressionUnit} clusters is invalid`, where);
    }
    if (geo.clusterSize > 4096) throw new FsUnsupportedError('compressed data with clusters above 4 KiB', where);
    unitClusters = 2 ** base.compressionUnit;
  }
  return {
    resident: false,
    name: first.name,
    runs,
    dataSize: base.dataSize,
    initializedSize: Math.min(base.initializedSize, base.dataSize),
    unitClusters,
    encrypted: (sorted[0].flags & ATTR_FLAG_ENCRYPTED) !== 0,
  };
}

function streamSize(stream: Stream): number {
  return stream.resident ? stream.data.length : stream.dataSize;
}

function unitHasData(runs: Run[], unitStart: number, unitClusters: number): boolean {
  for (let vcn = unitStart; vcn < unitStart + unitClusters;) {
    const run = findRun(runs, vcn);
    if (!run) return false;
    if (run.lcn >= 0) return true;
    vcn = run.vcn + run.length;
  }
  return false;
}

/** The run containing `vcn` (runs are sorted and contiguous), or undefined. */
function findRun(runs: Run[], vcn: number): Run | undefined {
  let lo = 0;
  let hi = runs.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const run = runs[mid];
    if (vcn < run.vcn) hi = mid - 1;
    else if (vcn >= run.vcn + run.length) lo = mid + 1;
    else return run;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// LZNT1

const LZNT1_CHUNK = 4096;

/**
 * Decompresses LZNT1 chunks from `src` into `dst` (a compression unit). Each chunk is a 2-byte
 * header (bit 15: compressed; bits 0-11: data size - 1) and up to 4 KiB of output; a chunk that
 * ends early leaves the rest of its 4 KiB zero. Back-references are bounds-checked.
 */
export function lznt1Decompress(src: Buffer, dst: Buffer, where: FsDamageContext): void {
  let inAt = 0;
  let chunkStart = 0;
  while (inAt + 2 <= src.length && chunkStart < dst.length) {
    const header = src.readUInt16LE(inAt);
    if (header === 0) break;
    const size = (header & 0x0fff) + 1;
    const dataStart = inAt + 2;
    const dataEnd = dataStart + size;
    if (dataEnd > src.length) throw new FsDamageError(`LZNT1 chunk of ${size} bytes overruns the compressed data`, where);
    const chunkEnd = Math.min(chunkStart + LZNT1_CHUNK, dst.length);
    if (!(header & 0x8000)) {
      src.copy(dst, chunkStart, dataStart, Math.min(dataEnd, dataStart + (chunkEnd - chunkStart)));
    } else {
      decompressChunk(src, dataStart, dataEnd, dst, chunkStart, chunkEnd, where);
    }
    inAt = dataEnd;
    chunkStart += LZNT1_CHUNK;
  }
}

function decompressChunk(src: Buffer, from: number, to: number, dst: Buffer, chunkStart: number, chunkEnd: number, where: FsDamageContext): void {
  let inAt = from;
  let out = chunkStart;
  while (inAt < to && out < chunkEnd) {
    const tags = src[inAt++];
    for (let bit = 0; bit < 8 && inAt < to && out < chunkEnd; bit++) {
      if (!(tags & (1 << bit))) {
        dst[out++] = src[inAt++];
        continue;
      }
      if (inAt + 2 > to) throw new FsDamageError('LZNT1 back-reference cut short', where);
      const token = src.readUInt16LE(inAt);
      inAt += 2;
      // The split between displacement and length bits moves as the chunk fills up.
      let lengthBits = 12;
      for (let pos = out - chunkStart - 1; pos >= 0x10; pos >>= 1) lengthBits--;
      const displacement = (token >> lengthBits) + 1;
      const length = (token & ((1 << lengthBits) - 1)) + 3;
      if (displacement > out - chunkStart) {
        throw new FsDamageError(`LZNT1 back-reference reaches ${displacement} bytes back from position ${out - chunkStart}`, where);
      }
      const end = Math.min(out + length, chunkEnd);
      // Overlapping copies repeat recent bytes: copy byte by byte.
      for (; out < end; out++) dst[out] = dst[out - displacement];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Index entries

interface IndexEntry {
  fileRecord: number;
  flags: number;
  key: Buffer | undefined;
  subnodeVcn: number | undefined;
}

function parseIndexEntries(buf: Buffer, start: number, end: number, where: FsDamageContext): IndexEntry[] {
  const out: IndexEntry[] = [];
  let at = start;
  while (at + 16 <= end) {
    const length = buf.readUInt16LE(at + 8);
    const keyLength = buf.readUInt16LE(at + 10);
    const flags = buf.readUInt16LE(at + 12);
    const hasSubnode = (flags & INDEX_ENTRY_HAS_SUBNODE) !== 0;
    const last = (flags & INDEX_ENTRY_LAST) !== 0;
    if (length < 16 + (hasSubnode ? 8 : 0) || length % 8 !== 0 || at + length > end || (!last && 16 + keyLength > length - (hasSubnode ? 8 : 0))) {
      throw new FsDamageError(`index entry at byte ${at} has an invalid length ${length} (key ${keyLength})`, { ...where, entryOffset: at });
    }
    let subnodeVcn: number | undefined;
    if (hasSubnode) {
      subnodeVcn = Number(buf.readBigInt64LE(at + length - 8));
      if (!Number.isSafeInteger(subnodeVcn) || subnodeVcn < 0) throw new FsDamageError('index entry points to a negative block', where);
    }
    out.push({
      fileRecord: Number(buf.readBigUInt64LE(at) & 0xffffffffffffn),
      flags,
      key: last ? undefined : buf.subarray(at + 16, at + 16 + keyLength),
      subnodeVcn,
    });
    if (last) return out;
    at += length;
  }
  throw new FsDamageError('index node has no end entry', where);
}

function parseFileName(value: Buffer, where: FsDamageContext): FileNameInfo {
  if (value.length < 66) throw new FsDamageError(`$FILE_NAME of ${value.length} bytes is too short`, where);
  return {
    parent: Number(value.readBigUInt64LE(0) & 0xffffffffffffn),
    flags: value.readUInt32LE(56),
    namespace: value[65],
    name: utf16At(value, 66, value[64], where),
  };
}

/** The type an index entry's $FILE_NAME key tells without reading the file's record. */
function typeFromFileName(key: Buffer): FileType {
  const flags = key.readUInt32LE(56);
  if (flags & FILE_ATTR_REPARSE_POINT) {
    const tag = key.readUInt32LE(60);
    if (tag === REPARSE_TAG_SYMLINK || tag === REPARSE_TAG_MOUNT_POINT) return 'symlink';
  }
  if (flags & FILE_ATTR_DUP_INDEX_PRESENT) return 'dir';
  // A system file may be an Interix symlink, device or FIFO: stat decides.
  return flags & FILE_ATTR_SYSTEM ? 'unknown' : 'file';
}

function ntfsTimeToNs(raw: bigint): bigint | undefined {
  return raw === 0n ? undefined : (raw - EPOCH_DIFF_100NS) * 100n;
}

// ---------------------------------------------------------------------------------------------
// The filesystem

export async function probeNtfs(dev: BlockDevice): Promise<Filesystem | undefined> {
  if (dev.size < 512) return undefined;
  const geo = parseBootSector(await dev.read(0, 512));
  if (!geo) return undefined;
  const fs = new NtfsFilesystem(dev, geo);
  await fs.bootstrap();
  return fs;
}

class NtfsFilesystem implements Filesystem {
  readonly type = FS;
  label: string | undefined;
  readonly uuid: string;
  readonly rootIno = BigInt(ROOT_RECORD);
  readonly sizeBytes: number;
  private readonly dev: BlockDevice;
  private readonly geo: NtfsGeometry;
  private mft: Stream | undefined;
  private recordCount = 0;
  private readonly records = new LruMap<number, Buffer>(2048);
  private readonly files = new LruMap<number, NtfsFile>(512);
  private readonly units = new LruMap<string, Buffer>(16);
  private readonly indexBlocks = new LruMap<string, IndexEntry[]>(256);
  private upcaseTable: Promise<Uint16Array> | undefined;

  constructor(dev: BlockDevice, geo: NtfsGeometry) {
    this.dev = dev;
    this.geo = geo;
    this.sizeBytes = geo.totalBytes;
    this.uuid = geo.serial.toString(16).toUpperCase().padStart(16, '0');
  }

  /** Reads $MFT's own record and run list, then the volume label. */
  async bootstrap(): Promise<void> {
    const where = { fs: FS, ino: 0, structure: '$MFT record' };
    const rec0 = await readRange(this.dev, this.geo.mftOffset, this.geo.recordSize, where);
    applyFixups(rec0, 'FILE', where);
    const attrs = parseAttributes(rec0, 0, this.geo.totalClusters);
    let dataPieces = attrs.filter((a) => a.type === AT_DATA && a.name === '');
    if (dataPieces.length === 0 || !dataPieces[0].nonResident) throw new FsDamageError('$MFT has no non-resident $DATA', where);
    // Enough of the MFT to read its own extension records, which always sit early in it.
    this.mft = mergeExtents(dataPieces, this.geo, where);
    this.recordCount = Math.floor(streamSize(this.mft) / this.geo.recordSize);
    const list = attrs.find((a) => a.type === AT_ATTRIBUTE_LIST);
    if (list) {
      const entries = parseAttributeList(await this.attributeValue(list, 0), 0);
      for (const record of new Set(entries.filter((e) => e.type === AT_DATA && e.name === '' && e.record !== 0).map((e) => e.record))) {
        const ext = await this.readRecord(record);
        dataPieces = [...dataPieces, ...parseAttributes(ext, record, this.geo.totalClusters).filter((a) => a.type === AT_DATA && a.name === '')];
      }
      this.mft = mergeExtents(dataPieces, this.geo, where);
      this.recordCount = Math.floor(streamSize(this.mft) / this.geo.recordSize);
    }
    try {
      const rec = await this.readRecord(VOLUME_RECORD);
      const nameAttr = parseAttributes(rec, VOLUME_RECORD, this.geo.totalClusters).find((a) => a.type === AT_VOLUME_NAME);
      this.label = nameAttr?.value && nameAttr.value.length > 0 ? nameAttr.value.toString('utf16le') : undefined;
    } catch (err) {
      if (!(err instanceof FsDamageError)) throw err;
      // A damaged $Volume only costs the label.
    }
  }

  async stat(ino: bigint): Promise<FileStat> {
    const file = await this.file(toRecord(ino));
    const special = await this.specialType(file);
    const data = file.dataStreams.get('');
    const si = file.standardInfo;
    const stat: FileStat = {
      ino,
      type: special?.type ?? (file.isDir ? 'dir' : 'file'),
      size: file.isDir ? 0 : data ? streamSize(data) : 0,
      nlink: Math.max(1, file.fileNames.filter((f) => f.namespace !== NAMESPACE_DOS).length),
    };
    if (special?.target !== undefined) stat.size = Buffer.byteLength(special.target);
    if (special?.rdev) stat.rdev = special.rdev;
    if (si && si.length >= 36) {
      const set = (key: 'birthtimeNs' | 'mtimeNs' | 'ctimeNs' | 'atimeNs', at: number) => {
        const ns = ntfsTimeToNs(si.readBigUInt64LE(at));
        if (ns !== undefined) stat[key] = ns;
      };
      set('birthtimeNs', 0);
      set('mtimeNs', 8);
      set('ctimeNs', 16);
      set('atimeNs', 24);
      stat.attributes = si.readUInt32LE(32) | (file.isDir ? FILE_ATTR_DIRECTORY : 0);
    }
    const streams = [...file.dataStreams.keys()].filter((name) => name !== '');
    if (streams.length > 0) stat.streams = streams;
    return stat;
  }

  async readdir(ino: bigint): Promise<DirEntry[]> {
    const file = await this.directory(ino);
    const out: DirEntry[] = [];
    const visited = new Set<number>();
    const walk = async (entries: IndexEntry[], depth: number): Promise<void> => {
      for (const entry of entries) {
        if (entry.subnodeVcn !== undefined) {
          const node = await this.indexBlock(file, entry.subnodeVcn, depth + 1, visited);
          await walk(node, depth + 1);
        }
        if (!entry.key || entry.fileRecord < FIRST_USER_RECORD) continue;
        const name = parseFileName(entry.key, { fs: FS, ino, structure: 'index entry' });
        if (name.namespace === NAMESPACE_DOS) continue;
        if (entry.fileRecord === file.record || (entry.fileRecord === parentOf(file) && file.record !== ROOT_RECORD)) {
          throw new FsDamageError(`directory lists ${entry.fileRecord === file.record ? 'itself' : 'its parent'} as '${name.name}' (a directory cycle)`,
            { fs: FS, ino, structure: 'directory index' });
        }
        out.push({ name: name.name, ino: BigInt(entry.fileRecord), type: typeFromFileName(entry.key) });
      }
    };
    await walk(this.rootEntries(file), 0);
    // System files may be Interix symlinks, devices or FIFOs: only their record tells.
    for (const entry of out) {
      if (entry.type === 'unknown') entry.type = await this.typeOf(entry.ino);
    }
    return out;
  }

  private async typeOf(ino: bigint): Promise<FileType> {
    try {
      return (await this.stat(ino)).type;
    } catch (err) {
      if (err instanceof FsDamageError) return 'unknown'; // stat() reports the damage when the walk gets there
      throw err;
    }
  }

  async lookup(dirIno: bigint, name: string): Promise<DirEntry | undefined> {
    const file = await this.directory(dirIno);
    const upcase = await this.upcase();
    const wanted = toUnits(name);
    const where = { fs: FS, ino: dirIno, structure: 'index entry' };
    let caseless: IndexEntry | undefined;
    let entries = this.rootEntries(file);
    const visited = new Set<number>();
    for (let depth = 0; ; depth++) {
      let next: IndexEntry | undefined;
      for (const entry of entries) {
        if (!entry.key) {
          next = entry;
          break;
        }
        const key = fileNameKey(entry.key, where);
        // System files (and the root's "." entry) are not listed, so they are not found either.
        const visible = entry.fileRecord >= FIRST_USER_RECORD;
        if (visible && collateKey(wanted, key, undefined) === 0) return this.lookupResult(entry);
        const folded = collateKey(wanted, key, upcase);
        if (visible && folded === 0) caseless ??= entry;
        if (folded < 0 || (folded === 0 && collateKey(wanted, key, undefined) < 0)) {
          next = entry;
          break;
        }
      }
      if (next?.subnodeVcn === undefined) return caseless ? this.lookupResult(caseless) : undefined;
      entries = await this.indexBlock(file, next.subnodeVcn, depth + 1, visited);
    }
  }

  private async lookupResult(entry: IndexEntry): Promise<DirEntry> {
    const key = entry.key as Buffer;
    const ino = BigInt(entry.fileRecord);
    const type = typeFromFileName(key);
    return { name: key.toString('utf16le', 66, 66 + key[64] * 2), ino, type: type === 'unknown' ? await this.typeOf(ino) : type };
  }

  async read(ino: bigint, offset: number, length: number, stream?: string): Promise<Buffer> {
    const file = await this.file(toRecord(ino));
    if (file.isDir && stream === undefined) throw isDirectory(FS, ino);
    const data = file.dataStreams.get(stream ?? '');
    if (!data) {
      if (stream !== undefined) throw noSuchStream(FS, ino, stream);
      clampRead(FS, offset, length, 0);
      return Buffer.alloc(0);
    }
    const count = clampRead(FS, offset, length, streamSize(data));
    if (count === 0) return Buffer.alloc(0);
    return this.readStream(data, offset, count, { fs: FS, ino, structure: stream ? `data stream '${stream}'` : 'file data' });
  }

  async extents(ino: bigint): Promise<FileExtent[]> {
    const file = await this.file(toRecord(ino));
    if (file.isDir) throw isDirectory(FS, ino);
    const data = file.dataStreams.get('');
    if (!data) return [];
    return this.streamExtents(data);
  }

  async readlink(ino: bigint): Promise<string> {
    const file = await this.file(toRecord(ino));
    const special = await this.specialType(file);
    if (special?.target === undefined) throw notSymlink(FS, ino);
    return special.target;
  }

  // -------------------------------------------------------------------------------------------
  // Records and files

  private async readRecord(record: number): Promise<Buffer> {
    const cached = this.records.get(record);
    if (cached) return cached;
    const where = { fs: FS, ino: record, structure: 'MFT record' };
    if (!this.mft) throw new FsDamageError('MFT not loaded', where);
    if (!Number.isSafeInteger(record) || record < 0 || record >= this.recordCount) {
      throw new FsDamageError(`record ${record} is outside the MFT (${this.recordCount} records)`, where);
    }
    const buf = await this.readStream(this.mft, record * this.geo.recordSize, this.geo.recordSize, where);
    applyFixups(buf, 'FILE', where);
    const attrsOffset = buf.readUInt16LE(20);
    const bytesInUse = buf.readUInt32LE(24);
    if (attrsOffset < 42 || attrsOffset >= this.geo.recordSize || bytesInUse > this.geo.recordSize || bytesInUse < attrsOffset) {
      throw new FsDamageError(`record header is inconsistent (attributes at ${attrsOffset}, ${bytesInUse} bytes used)`, where);
    }
    // NTFS 3.1 records name their own number: a mismatch means the MFT mapping is wrong.
    if (buf.readUInt16LE(4) >= 48 && buf.readUInt32LE(44) !== record % 2 ** 32) {
      throw new FsDamageError(`record ${record} claims to be record ${buf.readUInt32LE(44)}`, where);
    }
    this.records.set(record, buf);
    return buf;
  }

  private async file(record: number): Promise<NtfsFile> {
    const cached = this.files.get(record);
    if (cached) return cached;
    const file = await this.loadFile(record);
    this.files.set(record, file);
    return file;
  }

  private async loadFile(record: number): Promise<NtfsFile> {
    const where = { fs: FS, ino: record, structure: 'MFT record' };
    const rec = await this.readRecord(record);
    const flags = rec.readUInt16LE(22);
    if (!(flags & RECORD_IN_USE)) throw new FsDamageError(`record ${record} is not in use (a deleted file)`, where);
    if (rec.readBigUInt64LE(32) & 0xffffffffffffn) throw new FsDamageError(`record ${record} is an extension record, not a file`, where);
    let attrs = parseAttributes(rec, record, this.geo.totalClusters);
    const list = attrs.find((a) => a.type === AT_ATTRIBUTE_LIST);
    if (list) {
      const entries = parseAttributeList(await this.attributeValue(list, record), record);
      const extensions = [...new Set(entries.map((e) => e.record))].filter((r) => r !== record);
      if (extensions.length > MAX_EXTENSION_RECORDS) throw new FsDamageError(`${extensions.length} extension records`, where);
      for (const ext of extensions) {
        const extRec = await this.readRecord(ext);
        const base = Number(extRec.readBigUInt64LE(32) & 0xffffffffffffn);
        if (base !== record || !(extRec.readUInt16LE(22) & RECORD_IN_USE)) {
          throw new FsDamageError(`extension record ${ext} belongs to record ${base}, not ${record}`, { ...where, extension: ext });
        }
        attrs = attrs.concat(parseAttributes(extRec, ext, this.geo.totalClusters));
      }
    }
    return this.assembleFile(record, flags, attrs);
  }

  private async assembleFile(record: number, flags: number, attrs: Attribute[]): Promise<NtfsFile> {
    const where = { fs: FS, ino: record, structure: 'attributes' };
    const byKey = new Map<string, Attribute[]>();
    for (const a of attrs) {
      const key = `${a.type}:${a.name}`;
      const list = byKey.get(key);
      if (list) list.push(a);
      else byKey.set(key, [a]);
    }
    const dataStreams = new Map<string, Stream>();
    let indexAllocation: Stream | undefined;
    for (const [key, pieces] of byKey) {
      const type = pieces[0].type;
      if (type === AT_DATA) dataStreams.set(pieces[0].name, mergeExtents(pieces, this.geo, { ...where, structure: `$DATA '${pieces[0].name}'` }));
      if (type === AT_INDEX_ALLOCATION && key === `${AT_INDEX_ALLOCATION}:$I30`) {
        indexAllocation = mergeExtents(pieces, this.geo, { ...where, structure: '$INDEX_ALLOCATION' });
      }
    }
    const fileNames = attrs.filter((a) => a.type === AT_FILE_NAME && a.value)
      .map((a) => parseFileName(a.value as Buffer, { ...where, structure: '$FILE_NAME' }));
    const reparseAttr = attrs.find((a) => a.type === AT_REPARSE_POINT);
    const indexRoot = attrs.find((a) => a.type === AT_INDEX_ROOT && a.name === '$I30')?.value;
    return {
      record,
      isDir: (flags & RECORD_IS_DIRECTORY) !== 0 && indexRoot !== undefined,
      standardInfo: attrs.find((a) => a.type === AT_STANDARD_INFORMATION)?.value,
      fileNames,
      dataStreams,
      indexRoot,
      indexAllocation,
      reparse: reparseAttr ? await this.attributeValue(reparseAttr, record, MAX_REPARSE_BYTES) : undefined,
    };
  }

  /** The whole value of a (small) attribute, resident or not. */
  private async attributeValue(attr: Attribute, record: number, limit = MAX_ATTRIBUTE_LIST_BYTES): Promise<Buffer> {
    const where = { fs: FS, ino: record, structure: `attribute 0x${attr.type.toString(16)}` };
    const stream = mergeExtents([attr], this.geo, where);
    const size = streamSize(stream);
    if (size > limit) throw new FsDamageError(`attribute value of ${size} bytes exceeds ${limit}`, where);
    return size === 0 ? Buffer.alloc(0) : this.readStream(stream, 0, size, where);
  }

  private async directory(ino: bigint): Promise<NtfsFile> {
    const file = await this.file(toRecord(ino));
    if (!file.isDir) throw notDirectory(FS, ino);
    return file;
  }

  /** Symlink, device or FIFO meaning of a reparse point or an Interix/ntfs-3g system file. */
  private async specialType(file: NtfsFile): Promise<{ type: FileType; target?: string; rdev?: { major: number; minor: number } } | undefined> {
    const where = { fs: FS, ino: file.record, structure: 'reparse point' };
    if (file.reparse) {
      const target = parseReparseTarget(file.reparse, where);
      return target === undefined ? undefined : { type: 'symlink', target };
    }
    const attributes = file.standardInfo && file.standardInfo.length >= 36 ? file.standardInfo.readUInt32LE(32) : 0;
    const data = file.dataStreams.get('');
    if (file.isDir || !(attributes & FILE_ATTR_SYSTEM) || !data) return undefined;
    const size = streamSize(data);
    if (size === 0) return { type: 'fifo' };
    if (size === 1) return { type: 'socket' };
    if (size < 8 || size > MAX_INTX_BYTES) return undefined;
    const content = await this.readStream(data, 0, size, { ...where, structure: 'Interix file' });
    const magic = content.subarray(0, 8);
    if (magic.equals(INTX_SYMLINK)) {
      if ((size - 8) % 2 !== 0) throw new FsDamageError('Interix symlink target has an odd byte count', where);
      return { type: 'symlink', target: content.toString('utf16le', 8) };
    }
    if ((magic.equals(INTX_CHARDEV) || magic.equals(INTX_BLOCKDEV)) && size === 24) {
      const major = Number(content.readBigUInt64LE(8) & 0xffffffffn);
      const minor = Number(content.readBigUInt64LE(16) & 0xffffffffn);
      return { type: magic.equals(INTX_CHARDEV) ? 'chardev' : 'blockdev', rdev: { major, minor } };
    }
    return undefined;
  }

  // -------------------------------------------------------------------------------------------
  // Streams

  private async readStream(stream: Stream, offset: number, length: number, where: FsDamageContext): Promise<Buffer> {
    if (stream.resident) return Buffer.from(stream.data.subarray(offset, offset + length));
    if (stream.encrypted) {
      throw new FsUnsupportedError('the data is encrypted with EFS', where, 'EFS-encrypted files can only be read on Windows with the owner\'s key');
    }
    const out = Buffer.alloc(length); // sparse runs and bytes past the initialized size stay zero
    const readable = Math.min(offset + length, stream.initializedSize) - offset;
    if (readable <= 0) return out;
    if (stream.unitClusters > 0) await this.readCompressed(stream, offset, readable, out, where);
    else await this.readPlain(stream, offset, readable, out, where);
    return out;
  }

  private async readPlain(stream: Extract<Stream, { resident: false }>, offset: number, length: number, out: Buffer, where: FsDamageContext): Promise<void> {
    const cs = this.geo.clusterSize;
    const reads: Array<Promise<void>> = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const vcn = Math.floor(at / cs);
      const run = findRun(stream.runs, vcn);
      if (!run) throw new FsDamageError(`run list does not map cluster ${vcn} of a ${stream.dataSize}-byte stream`, { ...where, vcn });
      const runEnd = Math.min(end, (run.vcn + run.length) * cs);
      if (run.lcn >= 0) {
        const devOffset = (run.lcn + (vcn - run.vcn)) * cs + (at % cs);
        const target = at - offset;
        const count = runEnd - at;
        reads.push(readRange(this.dev, devOffset, count, where).then((buf) => { buf.copy(out, target); }));
      }
      at = runEnd;
    }
    await Promise.all(reads);
  }

  private async readCompressed(stream: Extract<Stream, { resident: false }>, offset: number, length: number, out: Buffer, where: FsDamageContext): Promise<void> {
    const unitBytes = stream.unitClusters * this.geo.clusterSize;
    const end = offset + length;
    for (let unit = Math.floor(offset / unitBytes); unit * unitBytes < end; unit++) {
      const data = await this.compressionUnit(stream, unit, where);
      const from = Math.max(offset, unit * unitBytes);
      const to = Math.min(end, (unit + 1) * unitBytes);
      data.copy(out, from - offset, from - unit * unitBytes, to - unit * unitBytes);
    }
  }

  /** One decompressed compression unit. */
  private async compressionUnit(stream: Extract<Stream, { resident: false }>, unit: number, where: FsDamageContext): Promise<Buffer> {
    const key = `${where.ino}:${stream.name}:${unit}`;
    const cached = this.units.get(key);
    if (cached) return cached;
    const cs = this.geo.clusterSize;
    const firstVcn = unit * stream.unitClusters;
    const pieces: Array<{ lcn: number; count: number }> = [];
    let sparse = 0;
    for (let vcn = firstVcn; vcn < firstVcn + stream.unitClusters;) {
      const run = findRun(stream.runs, vcn);
      if (!run) throw new FsDamageError(`run list does not map cluster ${vcn} of a compressed stream`, { ...where, vcn });
      const count = Math.min(run.vcn + run.length, firstVcn + stream.unitClusters) - vcn;
      if (run.lcn < 0) sparse += count;
      else pieces.push({ lcn: run.lcn + (vcn - run.vcn), count });
      vcn += count;
    }
    const unitBytes = stream.unitClusters * cs;
    const result = Buffer.alloc(unitBytes);
    if (pieces.length > 0) {
      const stored = Buffer.concat(await Promise.all(pieces.map((p) => readRange(this.dev, p.lcn * cs, p.count * cs, where))));
      if (sparse === 0) stored.copy(result); // a unit that did not compress is stored as is
      else lznt1Decompress(stored, result, { ...where, structure: 'LZNT1 compressed data', unit });
    }
    this.units.set(key, result);
    return result;
  }

  /** Data and hole ranges of a stream: sparse runs, whole sparse compression units and bytes past the initialized size are holes. */
  private streamExtents(stream: Stream): FileExtent[] {
    const size = streamSize(stream);
    const out: FileExtent[] = [];
    if (stream.resident) {
      pushExtent(out, 0, size, false);
      return out;
    }
    const cs = this.geo.clusterSize;
    const push = (fromVcn: number, toVcn: number, hole: boolean) => {
      const from = Math.min(fromVcn * cs, size);
      const to = Math.min(toVcn * cs, size);
      const dataEnd = Math.max(from, Math.min(to, stream.initializedSize));
      pushExtent(out, from, dataEnd - from, hole);
      pushExtent(out, dataEnd, to - dataEnd, true);
    };
    const unit = stream.unitClusters;
    for (const run of stream.runs) {
      if (run.vcn * cs >= size) break;
      const runEnd = run.vcn + run.length;
      if (run.lcn >= 0 || unit === 0) {
        push(run.vcn, runEnd, run.lcn < 0);
        continue;
      }
      // In a compressed stream, the sparse tail of a unit that holds data only means "compressed".
      for (let vcn = run.vcn; vcn < runEnd;) {
        const unitStart = Math.floor(vcn / unit) * unit;
        if (vcn === unitStart && runEnd >= unitStart + unit) {
          const wholeEnd = Math.floor(runEnd / unit) * unit;
          push(vcn, wholeEnd, true);
          vcn = wholeEnd;
        } else {
          const pieceEnd = Math.min(runEnd, unitStart + unit);
          push(vcn, pieceEnd, !unitHasData(stream.runs, unitStart, unit));
          vcn = pieceEnd;
        }
      }
    }
    const covered = out.length ? out[out.length - 1].offset + out[out.length - 1].length : 0;
    pushExtent(out, covered, size - covered, true);
    return out;
  }

  // -------------------------------------------------------------------------------------------
  // Directory indexes

  private rootEntries(file: NtfsFile): IndexEntry[] {
    const where = { fs: FS, ino: file.record, structure: '$INDEX_ROOT' };
    const root = file.indexRoot as Buffer;
    if (root.length < 32) throw new FsDamageError('$INDEX_ROOT is too short', where);
    if (root.readUInt32LE(0) !== AT_FILE_NAME || root.readUInt32LE(4) !== COLLATION_FILE_NAME) {
      throw new FsDamageError('$I30 index is not a file name index', where);
    }
    const entriesOffset = root.readUInt32LE(16);
    const indexLength = root.readUInt32LE(20);
    if (16 + indexLength > root.length || entriesOffset >= indexLength) {
      throw new FsDamageError(`index header (entries at ${entriesOffset}, length ${indexLength}) overruns $INDEX_ROOT`, where);
    }
    return parseIndexEntries(root, 16 + entriesOffset, 16 + indexLength, where);
  }

  private async indexBlock(file: NtfsFile, vcn: number, depth: number, visited: Set<number>): Promise<IndexEntry[]> {
    const where = { fs: FS, ino: file.record, structure: 'index block', vcn };
    if (depth > MAX_INDEX_DEPTH) throw new FsDamageError(`directory B+tree is deeper than ${MAX_INDEX_DEPTH} levels`, where);
    if (visited.has(vcn)) throw new FsDamageError(`index block ${vcn} is reached twice (a cycle in the B+tree)`, where);
    visited.add(vcn);
    const key = `${file.record}:${vcn}`;
    const cached = this.indexBlocks.get(key);
    if (cached) return cached;
    const entries = await this.loadIndexBlock(file, vcn, where);
    this.indexBlocks.set(key, entries);
    return entries;
  }

  private async loadIndexBlock(file: NtfsFile, vcn: number, where: FsDamageContext): Promise<IndexEntry[]> {
    const alloc = file.indexAllocation;
    if (!alloc) throw new FsDamageError('index entry points to a block but there is no $INDEX_ALLOCATION', where);
    const root = file.indexRoot as Buffer;
    const blockSize = root.readUInt32LE(8);
    if (!isPowerOfTwo(blockSize) || blockSize < 512 || blockSize > 65536) throw new FsDamageError(`index block size ${blockSize} is invalid`, where);
    // Index VCNs count clusters, or 512-byte units when blocks are smaller than a cluster.
    const vcnBytes = blockSize >= this.geo.clusterSize ? this.geo.clusterSize : 512;
    const offset = vcn * vcnBytes;
    if (!Number.isSafeInteger(offset) || offset + blockSize > streamSize(alloc)) {
      throw new FsDamageError(`index block ${vcn} lies beyond $INDEX_ALLOCATION`, where);
    }
    const buf = await this.readStream(alloc, offset, blockSize, where);
    applyFixups(buf, 'INDX', where);
    if (Number(buf.readBigInt64LE(16)) !== vcn) throw new FsDamageError(`index block at VCN ${vcn} says it is VCN ${buf.readBigInt64LE(16)}`, where);
    const entriesOffset = buf.readUInt32LE(24);
    const indexLength = buf.readUInt32LE(28);
    if (24 + indexLength > blockSize || entriesOffset >= indexLength) {
      throw new FsDamageError(`index header (entries at ${entriesOffset}, length ${indexLength}) overruns the block`, where);
    }
    return parseIndexEntries(buf, 24 + entriesOffset, 24 + indexLength, where);
  }

  private upcase(): Promise<Uint16Array> {
    this.upcaseTable ??= (async () => {
      const file = await this.file(UPCASE_RECORD);
      const data = file.dataStreams.get('');
      const where = { fs: FS, ino: UPCASE_RECORD, structure: '$UpCase' };
      if (!data || streamSize(data) < 256 || streamSize(data) > 131072) throw new FsDamageError('$UpCase is missing or has a wrong size', where);
      const raw = await this.readStream(data, 0, streamSize(data), where);
      const table = new Uint16Array(65536);
      for (let i = 0; i < table.length; i++) table[i] = i * 2 + 1 < raw.length ? raw.readUInt16LE(i * 2) : i;
      return table;
    })();
    return this.upcaseTable;
  }
}

// ---------------------------------------------------------------------------------------------

/** The parent directory record of a file, from its first non-DOS name. */
function parentOf(file: NtfsFile): number | undefined {
  return (file.fileNames.find((f) => f.namespace !== NAMESPACE_DOS) ?? file.fileNames[0])?.parent;
}

function toRecord(ino: bigint): number {
  if (ino < 0n || ino > 0xffffffffffffn) {
    throw new FsDamageError(`inode number ${ino} is not an MFT record number`, { fs: FS, ino, structure: 'inode number' });
  }
  return Number(ino);
}

interface AttributeListEntry {
  type: number;
  name: string;
  record: number;
}

function parseAttributeList(buf: Buffer, record: number): AttributeListEntry[] {
  const where = { fs: FS, ino: record, structure: '$ATTRIBUTE_LIST' };
  const out: AttributeListEntry[] = [];
  let at = 0;
  while (at + 26 <= buf.length) {
    const length = buf.readUInt16LE(at + 4);
    if (length < 26 || at + length > buf.length) throw new FsDamageError(`entry at byte ${at} has an invalid length ${length}`, where);
    const nameLength = buf[at + 6];
    const nameOffset = buf[at + 7];
    out.push({
      type: buf.readUInt32LE(at),
      name: nameLength ? utf16At(buf.subarray(at, at + length), nameOffset, nameLength, where) : '',
      record: Number(buf.readBigUInt64LE(at + 16) & 0xffffffffffffn),
    });
    at += length;
  }
  return out;
}

function parseReparseTarget(buf: Buffer, where: FsDamageContext): string | undefined {
  if (buf.length < 8) throw new FsDamageError('reparse point is too short', where);
  const tag = buf.readUInt32LE(0);
  const dataLength = buf.readUInt16LE(4);
  if (tag !== REPARSE_TAG_SYMLINK && tag !== REPARSE_TAG_MOUNT_POINT) return undefined;
  const pathStart = tag === REPARSE_TAG_SYMLINK ? 20 : 16;
  if (8 + dataLength > buf.length || dataLength < pathStart - 8) throw new FsDamageError('reparse data overruns its attribute', where);
  const data = buf.subarray(8, 8 + dataLength);
  const substitute = { offset: data.readUInt16LE(0), length: data.readUInt16LE(2) };
  const print = { offset: data.readUInt16LE(4), length: data.readUInt16LE(6) };
  const relative = tag === REPARSE_TAG_SYMLINK && (data.readUInt32LE(8) & SYMLINK_FLAG_RELATIVE) !== 0;
  const pathBuffer = data.subarray(pathStart - 8);
  const take = (p: { offset: number; length: number }): string => {
    if (p.offset % 2 !== 0 || p.length % 2 !== 0 || p.offset + p.length > pathBuffer.length) {
      throw new FsDamageError('reparse path overruns the reparse data', where);
    }
    return pathBuffer.toString('utf16le', p.offset, p.offset + p.length);
  };
  let target = take(print) || take(substitute);
  if (target.startsWith('\\??\\')) target = target.slice(4);
  return relative ? target.replaceAll('\\', '/') : target;
}

function toUnits(name: string): Uint16Array {
  const units = new Uint16Array(name.length);
  for (let i = 0; i < name.length; i++) units[i] = name.charCodeAt(i);
  return units;
}

/** The name of an index key ($FILE_NAME), checked to fit the key. */
function fileNameKey(key: Buffer, where: FsDamageContext): Buffer {
  if (key.length < 66 || 66 + key[64] * 2 > key.length) throw new FsDamageError('index key is not a valid $FILE_NAME', where);
  return key.subarray(66, 66 + key[64] * 2);
}

/**
 * NTFS file name collation of a name against a key's UTF-16LE bytes: code unit by code unit
 * (upper-cased when a table is given), then by length.
 */
function collateKey(a: Uint16Array, b: Buffer, upcase: Uint16Array | undefined): number {
  const bLength = b.length >> 1;
  const n = Math.min(a.length, bLength);
  for (let i = 0; i < n; i++) {
    const bu = b[i * 2] | (b[i * 2 + 1] << 8);
    const x = upcase ? upcase[a[i]] : a[i];
    const y = upcase ? upcase[bu] : bu;
    if (x !== y) return x < y ? -1 : 1;
  }
  return a.length === bLength ? 0 : a.length < bLength ? -1 : 1;
}
