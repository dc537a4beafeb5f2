/**
 * Native qcow2 reader (versions 2 and 3), following QEMU's docs/interop/qcow2.txt.
 *
 * What it reads: the active layer (internal snapshots are ignored), standard, zero and compressed
 * clusters (deflate or zstd), extended L2 entries (subclusters) and backing chains of qcow2 and
 * raw files. What it refuses, with a BadInputError that says what to do: encryption, external
 * data files, images not closed cleanly (dirty) or marked corrupt, and unknown incompatible
 * features. Every offset, count and size read from the file is checked before it is used, so a
 * damaged or hostile image fails cleanly instead of crashing, hanging or allocating absurd memory.
 *
 * Reads are mapped through L1/L2 tables into segments (runs of host data, zeros, compressed
 * clusters and ranges the backing file provides); neighbouring host clusters that are contiguous in
 * the file are merged, so a large read over sequentially allocated data is a few large preads.
 */
import { LruMap } from '../util/lru.ts';
import { realpath, stat } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import zlib from 'node:zlib';
import type { FileHandle } from 'node:fs/promises';
import type { DiskSource, Extent } from './disk.ts';
import { BadInputError, TresorError, isErrno } from '../util/errors.ts';
import { forEachLimited, openForReading, readAt, sizeOfOpenFile } from './file-io.ts';
import { checkRange, openRaw } from './raw.ts';
import { probeImageFormat } from './probe.ts';

// ---------------------------------------------------------------------------------------------
// On-disk constants, shared with the writer.

export const QCOW2_MAGIC = 0x514649fb;
export const QCOW2_V2_HEADER_LENGTH = 72;
/** v3 header up to and including the compression type byte, padded to 8 bytes. */
export const QCOW2_V3_HEADER_LENGTH = 112;
const QCOW2_V3_MIN_HEADER_LENGTH = 104;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU refuses L1 tables larger than this (QCOW_MAX_L1_SIZE); so do we. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
const MAX_BACKING_NAME_LENGTH = 1023;
const MAX_BACKING_FORMAT_LENGTH = 15;

export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_EXTERNAL_DATA = 1 << 2;
export const INCOMPAT_COMPRESSION_TYPE = 1 << 3;
export const INCOMPAT_EXTENDED_L2 = 1 << 4;
const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTERNAL_DATA
  | INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2;

const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_EXTERNAL_DATA_FILE = 0x44415441;
const FEATURE_NAME_ENTRY_BYTES = 48;

/** L1/L2 entry bit 63 (in the high 32-bit word): refcount is exactly one. */
export const ENTRY_COPIED_HI = 0x80000000;
/** L2 entry bit 62 (high word): compressed cluster. */
const ENTRY_COMPRESSED_HI = 0x40000000;
/** L2 entry bit 0 (low word): the cluster reads as zeros (v3). */
const ENTRY_ZERO_LO = 0x1;
/** Bits 9..55 hold a host offset: bits 32..55 in the high word, 9..31 in the low word. */
const OFFSET_MASK_HI = 0x00ffffff;
const OFFSET_MASK_LO = 0xfffffe00;
const SUBCLUSTERS_PER_CLUSTER = 32;

const COMPRESSION_DEFLATE = 0;
const COMPRESSION_ZSTD = 1;

/** Memory bounds of the caches, whatever the cluster size. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;
const MIN_L2_CACHE_TABLES = 4;
const DECOMPRESSED_CACHE_BYTES = 8 * 1024 * 1024;
const MIN_DECOMPRESSED_CACHE_CLUSTERS = 2;
const DEFAULT_MAX_CHAIN_DEPTH = 64;
/** Parallel preads inside one read(). */
const READ_CONCURRENCY = 8;

// ---------------------------------------------------------------------------------------------
// Public API

export interface BackingReference {
  /** The backing file name exactly as stored in the overlay. */
  name: string;
  /** The backing format from the overlay's header extension, if it has one. */
  format: string | undefined;
  /** Path of the overlay that names this backing file. */
  overlay: string;
}

/**
 * Opens a backing file in place of the default (a path relative to the overlay's directory):
 * e.g. an NBD export for instant recovery. Return undefined to use the default. The returned
 * source ends the chain and is closed with the overlay.
 */
export type BackingResolver = (ref: BackingReference) => Promise<DiskSource | undefined>;

export interface OpenQcow2Options {
  backingResolver?: BackingResolver;
  /** Longest backing chain accepted (default 64). */
  maxChainDepth?: number;
}

export async function openQcow2(path: string, opts: OpenQcow2Options = {}): Promise<DiskSource> {
  const maxDepth = opts.maxChainDepth ?? DEFAULT_MAX_CHAIN_DEPTH;
  return openChainMember(path, opts, [], maxDepth);
}

/** What the header says, after validation. Exported for tests and tools (e.g. `tresor inspect`). */
export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  /** Virtual size in bytes, as stored (the disk QEMU shows is this rounded down to 512). */
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountOrder: number;
  headerLength: number;
  incompatibleFeatures: number;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  compressionType: number;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  extendedL2: boolean;
}

// ---------------------------------------------------------------------------------------------
// Errors

function damaged(path: string, structure: string, message: string, context: Record<string, unknown> = {}): BadInputError {
  return new BadInputError('qcow2_damaged', `${path}: ${message}`, {
    context: { file: path, format: 'qcow2', structure, ...context },
    hint: 'the qcow2 image is damaged: inspect it with `qemu-img check`, repair a copy with '
      + '`qemu-img check -r all`, or back up from another copy of the disk',
  });
}

function unsupported(path: string, feature: string, message: string, hint: string): BadInputError {
  return new BadInputError('qcow2_unsupported', `${path}: ${message}`, {
    context: { file: path, format: 'qcow2', feature }, hint,
  });
}

const CONVERT_HINT = 'convert the image to a plain qcow2 or raw file first, e.g. '
  + '`qemu-img convert -O qcow2 SOURCE plain.qcow2`, and use that';

// ---------------------------------------------------------------------------------------------
// Header parsing

/** Reads a big-endian u64 that must fit a JS number (2^53); larger values are damage. */
function readSafeU64(buf: Buffer, at: number, path: string, field: string): number {
  const hi = buf.readUInt32BE(at);
  const lo = buf.readUInt32BE(at + 4);
  if (hi >= 0x200000) throw damaged(path, 'header', `header field ${field} is absurdly large`, { field, hi, lo });
  return hi * 2 ** 32 + lo;
}

export function parseQcow2Header(cluster0: Buffer, fileSize: number, path: string): Qcow2Header {
  if (cluster0.length < QCOW2_V2_HEADER_LENGTH || cluster0.readUInt32BE(0) !== QCOW2_MAGIC) {
    throw new BadInputError('qcow2_not_qcow2', `${path} is not a qcow2 image (no qcow2 header)`, {
      context: { file: path, fileSize },
      hint: 'check the path and the format; `qemu-img info` tells what the file is',
    });
  }
  const version = cluster0.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw unsupported(path, 'version', `qcow2 version ${version} is not supported (only 2 and 3)`, CONVERT_HINT);
  }
  const backingFileOffset = readSafeU64(cluster0, 8, path, 'backing_file_offset');
  const backingFileSize = cluster0.readUInt32BE(16);
  const clusterBits = cluster0.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw damaged(path, 'header', `cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`, { clusterBits });
  }
  const clusterSize = 2 ** clusterBits;
  const size = readSafeU64(cluster0, 24, path, 'size');
  const cryptMethod = cluster0.readUInt32BE(32);
  const l1Size = cluster0.readUInt32BE(36);
  const l1TableOffset = readSafeU64(cluster0, 40, path, 'l1_table_offset');
  const refcountTableOffset = readSafeU64(cluster0, 48, path, 'refcount_table_offset');

  let headerLength = QCOW2_V2_HEADER_LENGTH;
  let incompatibleHigh = 0;
  let incompatibleFeatures = 0;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let compressionType = COMPRESSION_DEFLATE;
  if (version === 3) {
    if (cluster0.length < QCOW2_V3_MIN_HEADER_LENGTH) throw damaged(path, 'header', 'the v3 header is truncated');
    incompatibleHigh = cluster0.readUInt32BE(72);
    incompatibleFeatures = cluster0.readUInt32BE(76);
    compatibleFeatures = cluster0.readBigUInt64BE(80);
    autoclearFeatures = cluster0.readBigUInt64BE(88);
    refcountOrder = cluster0.readUInt32BE(96);
    headerLength = cluster0.readUInt32BE(100);
    if (headerLength < QCOW2_V3_MIN_HEADER_LENGTH || headerLength > clusterSize || headerLength > cluster0.length) {
      throw damaged(path, 'header', `header_length ${headerLength} is invalid`, { headerLength });
    }
    if (headerLength > QCOW2_V3_MIN_HEADER_LENGTH) compressionType = cluster0.readUInt8(104);
  }

  if (cryptMethod !== 0) {
    const kind = cryptMethod === 1 ? 'AES' : cryptMethod === 2 ? 'LUKS' : `method ${cryptMethod}`;
    throw unsupported(path, 'encryption', `the image is encrypted (${kind}); Tresor cannot read encrypted qcow2 images`,
      'back up the running VM through libvirt (it reads the decrypted disk), or decrypt a copy with '
      + '`qemu-img convert --object secret,... --image-opts ... -O qcow2`');
  }
  const features = parseHeaderExtensions(cluster0, path, version === 3 ? headerLength : QCOW2_V2_HEADER_LENGTH,
    backingFileOffset > 0 ? Math.min(backingFileOffset, clusterSize) : clusterSize);
  checkIncompatibleFeatures(path, incompatibleHigh, incompatibleFeatures, features.featureNames, features.hasExternalDataFile);

  if (refcountOrder > 6) throw damaged(path, 'header', `refcount_order ${refcountOrder} is invalid (at most 6)`, { refcountOrder });
  if (compressionType !== COMPRESSION_DEFLATE && compressionType !== COMPRESSION_ZSTD) {
    throw unsupported(path, 'compression', `unknown compression type ${compressionType}`, CONVERT_HINT);
  }
  const compressionBit = (incompatibleFeatures & INCOMPAT_COMPRESSION_TYPE) !== 0;
  if (compressionBit !== (compressionType !== COMPRESSION_DEFLATE)) {
    throw damaged(path, 'header', 'the compression type and its incompatible feature bit disagree', { compressionType });
  }
  const extendedL2 = (incompatibleFeatures & INCOMPAT_EXTENDED_L2) !== 0;
  if (extendedL2 && clusterBits < 14) {
    throw damaged(path, 'header', 'extended L2 entries need clusters of at least 16 KiB', { clusterBits });
  }
  if (refcountTableOffset % clusterSize !== 0) {
    throw damaged(path, 'header', 'the refcount table offset is not cluster aligned', { refcountTableOffset });
  }

  const backingFile = readBackingFileName(cluster0, path, backingFileOffset, backingFileSize, clusterSize);
  checkL1Geometry(path, { size, clusterBits, extendedL2, l1Size, l1TableOffset, fileSize });
  return {
    version, clusterBits, size, l1Size, l1TableOffset, refcountOrder, headerLength, incompatibleFeatures,
    compatibleFeatures, autoclearFeatures, compressionType, backingFile,
    backingFormat: backingFile === undefined ? undefined : features.backingFormat, extendedL2,
  };
}

interface HeaderExtensions {
  backingFormat: string | undefined;
  featureNames: Map<string, string>;
  hasExternalDataFile: boolean;
}

function parseHeaderExtensions(cluster0: Buffer, path: string, start: number, end: number): HeaderExtensions {
  const result: HeaderExtensions = { backingFormat: undefined, featureNames: new Map(), hasExternalDataFile: false };
  end = Math.min(end, cluster0.length);
  let pos = start;
  while (pos < end) {
    if (pos + 8 > end) throw damaged(path, 'header extension', 'a header extension is cut off', { offset: pos });
    const type = cluster0.readUInt32BE(pos);
    const length = cluster0.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    const data = pos + 8;
    if (length > end - data) {
      throw damaged(path, 'header extension', `header extension 0x${type.toString(16)} is longer than the space for it`,
        { offset: pos, length });
    }
    const body = cluster0.subarray(data, data + length);
    if (type === EXT_BACKING_FORMAT) {
      if (length > MAX_BACKING_FORMAT_LENGTH) throw damaged(path, 'header extension', 'the backing format name is too long', { length });
      result.backingFormat = body.toString('latin1');
    } else if (type === EXT_FEATURE_NAMES) {
      for (let at = 0; at + FEATURE_NAME_ENTRY_BYTES <= length; at += FEATURE_NAME_ENTRY_BYTES) {
        const name = body.toString('latin1', at + 2, at + FEATURE_NAME_ENTRY_BYTES).replace(/\0.*$/s, '');
        result.featureNames.set(`${body[at]}:${body[at + 1]}`, name);
      }
    } else if (type === EXT_EXTERNAL_DATA_FILE) {
      result.hasExternalDataFile = true;
    }
    pos = data + Math.ceil(length / 8) * 8;
  }
  return result;
}

function checkIncompatibleFeatures(path: string, high: number, low: number, names: Map<string, string>, externalDataExt: boolean): void {
  if ((low & INCOMPAT_EXTERNAL_DATA) !== 0 || externalDataExt) {
    throw unsupported(path, 'external data file', 'the image keeps its data in an external data file, which Tresor does not read',
      CONVERT_HINT);
  }
  const unknownBits: number[] = [];
  for (let bit = 0; bit < 32; bit++) if ((low & ~KNOWN_INCOMPAT & (1 << bit)) !== 0) unknownBits.push(bit);
  for (let bit = 0; bit < 32; bit++) if ((high & (1 << bit)) !== 0) unknownBits.push(32 + bit);
  if (unknownBits.length > 0) {
    const described = unknownBits.map((bit) => names.get(`0:${bit}`) ?? `bit ${bit}`).join(', ');
    throw unsupported(path, 'incompatible features', `the image uses incompatible features Tresor does not know: ${described}`,
      CONVERT_HINT);
  }
  if ((low & INCOMPAT_CORRUPT) !== 0) {
    throw new BadInputError('qcow2_corrupt', `${path}: QEMU marked this image as corrupt`, {
      context: { file: path, format: 'qcow2', feature: 'corrupt bit' },
      hint: 'check and repair it with `qemu-img check -r all` (on a copy if unsure), then back it up again',
    });
  }
  if ((low & INCOMPAT_DIRTY) !== 0) {
    throw new BadInputError('qcow2_dirty', `${path}: the image was not closed cleanly (dirty bit set; QEMU crashed or is still using it)`, {
      context: { file: path, format: 'qcow2', feature: 'dirty bit' },
      hint: 'if no VM uses the image, repair it with `qemu-img check -r all`; if a VM is running, back it up through libvirt instead',
    });
  }
}

function readBackingFileName(cluster0: Buffer, path: string, offset: number, length: number, clusterSize: number): string | undefined {
  if (offset === 0) return undefined;
  if (length === 0 || length > MAX_BACKING_NAME_LENGTH || offset > clusterSize - length || offset + length > cluster0.length) {
    throw damaged(path, 'header', 'the backing file name is out of bounds or too long', { offset, length });
  }
  return cluster0.toString('utf8', offset, offset + length);
}

interface L1Geometry {
  size: number;
  clusterBits: number;
  extendedL2: boolean;
  l1Size: number;
  l1TableOffset: number;
  fileSize: number;
}

function checkL1Geometry(path: string, g: L1Geometry): void {
  const clusterSize = 2 ** g.clusterBits;
  const bytesPerL1Entry = clusterSize * (clusterSize / (g.extendedL2 ? 16 : 8));
  const needed = Math.ceil(g.size / bytesPerL1Entry);
  if (g.l1Size < needed) {
    throw damaged(path, 'L1 table', `the L1 table (${g.l1Size} entries) is too small for the virtual size ${g.size}`,
      { l1Size: g.l1Size, needed });
  }
  if (g.l1Size * 8 > MAX_L1_BYTES) {
    throw damaged(path, 'L1 table', `the L1 table size ${g.l1Size} is absurd (virtual size ${g.size})`, { l1Size: g.l1Size });
  }
  if (g.l1Size > 0 && (g.l1TableOffset % clusterSize !== 0 || g.l1TableOffset === 0)) {
    throw damaged(path, 'L1 table', 'the L1 table offset is not a valid cluster offset', { l1TableOffset: g.l1TableOffset });
  }
  if (g.l1TableOffset + g.l1Size * 8 > g.fileSize) {
    throw damaged(path, 'L1 table', 'the L1 table lies beyond the end of the file (the file is truncated?)',
      { l1TableOffset: g.l1TableOffset, l1Size: g.l1Size, fileSize: g.fileSize });
  }
}

// ---------------------------------------------------------------------------------------------
// Opening a chain

async function openChainMember(path: string, opts: OpenQcow2Options, chain: string[], maxDepth: number): Promise<Qcow2Disk> {
  const fh = await openForReading(path);
  try {
    const st = await fh.stat();
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new BadInputError('image_not_a_file', `${path} is neither a regular file nor a block device`, {
        context: { file: path }, hint: 'give the path of a disk image file',
      });
    }
    const fileSize = await sizeOfOpenFile(fh);
    const cluster0 = await readCluster0(fh, fileSize);
    const header = parseQcow2Header(cluster0, fileSize, path);
    const l1 = Buffer.alloc(header.l1Size * 8);
    if (await readAt(fh, l1, 0, l1.length, header.l1TableOffset) !== l1.length) {
      throw damaged(path, 'L1 table', 'the L1 table is cut off by the end of the file');
    }
    const identity = await realpath(path);
    const backing = header.backingFile === undefined ? undefined
      : await openBacking(path, header, opts, [...chain, identity], maxDepth);
    return new Qcow2Disk(path, fh, fileSize, header, l1, backing);
  } catch (err) {
    await fh.close();
    throw err;
  }
}

/** The first cluster (header, extensions, backing file name), or less if the file is shorter. */
async function readCluster0(fh: FileHandle, fileSize: number): Promise<Buffer> {
  const first = Buffer.alloc(Math.min(fileSize, 512));
  await readAt(fh, first, 0, first.length, 0);
  const clusterBits = first.length >= 24 ? first.readUInt32BE(20) : 0;
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) return first;
  const cluster0 = Buffer.alloc(Math.min(fileSize, 2 ** clusterBits));
  await readAt(fh, cluster0, 0, cluster0.length, 0);
  return cluster0;
}

async function openBacking(overlay: string, header: Qcow2Header, opts: OpenQcow2Options, chain: string[], maxDepth: number): Promise<DiskSource> {
  const name = header.backingFile as string;
  const format = header.backingFormat;
  const fromResolver = await opts.backingResolver?.({ name, format, overlay });
  if (fromResolver !== undefined) return fromResolver;

  const context = { file: overlay, backingFile: name, backingFormat: format };
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) || name.includes('\0')) {
    throw new BadInputError('qcow2_backing_unsupported', `${overlay}: the backing file ${JSON.stringify(name)} is not a plain file path`, {
      context, hint: 'copy the backing chain into plain files, or flatten it with `qemu-img convert`',
    });
  }
  const path = isAbsolute(name) ? name : resolve(dirname(overlay), name);
  let identity: string;
  try {
    identity = await realpath(path);
  } catch (err) {
    if (!isErrno(err, 'ENOENT', 'ENOTDIR', 'ELOOP', 'EACCES', 'ENAMETOOLONG')) throw err;
    throw new BadInputError('qcow2_backing_missing', `${overlay}: its backing file ${JSON.stringify(name)} (${path}) cannot be found`, {
      context: { ...context, resolvedPath: path }, cause: err,
      hint: 'put the backing file where the image expects it, or point the image at it with `qemu-img rebase -u -b NEW`',
    });
  }
  if (chain.includes(identity)) {
    throw new BadInputError('qcow2_backing_loop', `${overlay}: the backing chain loops back to ${identity}`, {
      context: { ...context, chain: [...chain, identity] },
      hint: 'fix the backing file names with `qemu-img rebase -u -b`; a backing chain must not contain a loop',
    });
  }
  if (chain.length >= maxDepth) {
    throw new BadInputError('qcow2_backing_too_deep', `${overlay}: the backing chain is deeper than ${maxDepth} images`, {
      context: { ...context, depth: chain.length },
      hint: 'shorten the chain with `qemu-img commit` or flatten it with `qemu-img convert`',
    });
  }
  try {
    const st = await stat(path);
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new BadInputError('qcow2_backing_unsupported', `${overlay}: its backing file ${path} is neither a file nor a block device`, {
        context: { ...context, resolvedPath: path }, hint: 'fix the backing file name with `qemu-img rebase -u -b`',
      });
    }
    const actualFormat = format ?? await probeImageFormat(path);
    if (actualFormat === 'qcow2') return await openChainMember(path, opts, chain, maxDepth);
    if (actualFormat === 'raw') return await openRaw(path);
    throw new BadInputError('qcow2_backing_unsupported', `${overlay}: its backing file ${path} has format '${actualFormat}', which Tresor does not read`, {
      context: { ...context, resolvedPath: path }, hint: CONVERT_HINT,
    });
  } catch (err) {
    if (err instanceof TresorError) throw err;
    throw new BadInputError('qcow2_backing_unreadable', `${overlay}: its backing file ${path} cannot be read: ${(err as Error).message}`, {
      context: { ...context, resolvedPath: path }, cause: err, hint: 'check that the backing file exists and is readable',
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Mapping guest ranges to segments

type SegmentKind = 'host' | 'zero' | 'backing' | 'compressed';

interface Segment {
  kind: SegmentKind;
  /** Guest offset. */
  offset: number;
  length: number;
  /** 'host': file offset of `offset`. 'compressed': guest offset of the cluster start. */
  host: number;
  /** 'compressed' only: the raw L2 entry. */
  descriptor: bigint;
}

function pushSegment(out: Segment[], kind: SegmentKind, offset: number, length: number, host = 0, descriptor = 0n): void {
  const last = out.length > 0 ? out[out.length - 1] : undefined;
  if (last !== undefined && last.kind === kind && kind !== 'compressed' && last.offset + last.length === offset
    && (kind !== 'host' || last.host + last.length === host)) {
    last.length += length;
    return;
  }
  out.push({ kind, offset, length, host, descriptor });
}

/** Folds extents of the same kind that touch into one, as the contract asks. */
class ExtentMerger {
  private pending: Extent | undefined;

  /** Adds an extent; returns the previous one if it is now complete. */
  add(offset: number, length: number, kind: Extent['kind']): Extent | undefined {
    if (length === 0) return undefined;
    const p = this.pending;
    if (p !== undefined && p.kind === kind && p.offset + p.length === offset) {
      p.length += length;
      return undefined;
    }
    this.pending = { offset, length, kind };
    return p;
  }

  flush(): Extent | undefined {
    const p = this.pending;
    this.pending = undefined;
    return p;
  }
}


class Qcow2Disk implements DiskSource {
  readonly format = 'qcow2';
  readonly size: number;
  readonly description: string;
  private readonly path: string;
  private readonly fh: FileHandle;
  private readonly fileSize: number;
  private readonly header: Qcow2Header;
  private readonly l1: Buffer;
  private readonly backing: DiskSource | undefined;
  private readonly clusterSize: number;
  private readonly l2EntryBytes: number;
  private readonly l2Entries: number;
  /** Guest bytes covered by one L1 entry (one L2 table). */
  private readonly bytesPerL2: number;
  private readonly l2Cache: LruMap<number, Promise<Buffer>>;
  private readonly decompressedCache: LruMap<bigint, Promise<Buffer>>;

  constructor(path: string, fh: FileHandle, fileSize: number, header: Qcow2Header, l1: Buffer, backing: DiskSource | undefined) {
    this.path = path;
    this.description = path;
    this.fh = fh;
    this.fileSize = fileSize;
    this.header = header;
    this.l1 = l1;
    this.backing = backing;
    // QEMU counts the disk in 512-byte sectors and ignores a remainder.
    this.size = Math.floor(header.size / 512) * 512;
    this.clusterSize = 2 ** header.clusterBits;
    this.l2EntryBytes = header.extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.l2EntryBytes;
    this.bytesPerL2 = this.clusterSize * this.l2Entries;
    this.l2Cache = new LruMap(Math.max(MIN_L2_CACHE_TABLES, Math.floor(L2_CACHE_BYTES / this.clusterSize)));
    this.decompressedCache = new LruMap(Math.max(MIN_DECOMPRESSED_CACHE_CLUSTERS, Math.floor(DECOMPRESSED_CACHE_BYTES / this.clusterSize)));
  }

  async close(): Promise<void> {
    try {
      await this.backing?.close();
    } finally {
      await this.fh.close();
    }
  }

  // --- extents ---

  async *extents(offset: number, length: number): AsyncIterable<Extent> {
    checkRange(this, offset, length);
    const merger = new ExtentMerger();
    const end = offset + length;
    // One L2 table at a time, so a huge disk never needs a huge segment list.
    for (let pos = offset; pos < end;) {
      const stop = Math.min(end, (Math.floor(pos / this.bytesPerL2) + 1) * this.bytesPerL2);
      const segments: Segment[] = [];
      await this.mapRange(pos, stop - pos, segments);
      for (const seg of segments) {
        if (seg.kind === 'backing') {
          for await (const e of this.backingExtents(seg.offset, seg.length)) {
            const done = merger.add(e.offset, e.length, e.kind);
            if (done !== undefined) yield done;
          }
        } else {
          const done = merger.add(seg.offset, seg.length, seg.kind === 'zero' ? 'zero' : 'data');
          if (done !== undefined) yield done;
        }
      }
      pos = stop;
    }
    const last = merger.flush();
    if (last !== undefined) yield last;
  }

  private async *backingExtents(offset: number, length: number): AsyncIterable<Extent> {
    const backing = this.backing;
    const inBacking = backing === undefined ? 0 : Math.max(0, Math.min(length, backing.size - offset));
    if (backing !== undefined && inBacking > 0) {
      for await (const e of backing.extents(offset, inBacking)) {
        // 'unchanged' only makes sense against a snapshot parent, not inside a backing chain.
        yield { offset: e.offset, length: e.length, kind: e.kind === 'zero' ? 'zero' : 'data' };
      }
    }
    // Beyond a shorter backing file the disk reads as zeros.
    if (inBacking < length) yield { offset: offset + inBacking, length: length - inBacking, kind: 'zero' };
  }

  // --- read ---

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this, offset, length);
    const out = Buffer.alloc(length);
    await this.readInto(offset, length, out, 0);
    return out;
  }

  /** Reads guest [offset, offset+length) into target[at...]; target must be zeroed there. */
  async readInto(offset: number, length: number, target: Buffer, at: number): Promise<void> {
    const segments: Segment[] = [];
    await this.mapRange(offset, length, segments);
    await forEachLimited(segments, READ_CONCURRENCY, async (seg) => {
      const into = at + seg.offset - offset;
      if (seg.kind === 'host') await this.readHost(seg, target, into);
      else if (seg.kind === 'compressed') await this.readCompressed(seg, target, into);
      else if (seg.kind === 'backing') await this.readBacking(seg, target, into);
    });
  }

  private async readHost(seg: Segment, target: Buffer, into: number): Promise<void> {
    // A data cluster that the end of the file cuts short reads as zeros past it, as in QEMU.
    const available = Math.max(0, Math.min(seg.length, this.fileSize - seg.host));
    await readAt(this.fh, target, into, available, seg.host);
  }

  private async readBacking(seg: Segment, target: Buffer, into: number): Promise<void> {
    const backing = this.backing;
    if (backing === undefined) return;
    const inBacking = Math.max(0, Math.min(seg.length, backing.size - seg.offset));
    if (inBacking === 0) return;
    if (backing instanceof Qcow2Disk) {
      await backing.readInto(seg.offset, inBacking, target, into);
    } else {
      (await backing.read(seg.offset, inBacking)).copy(target, into);
    }
  }

  private async readCompressed(seg: Segment, target: Buffer, into: number): Promise<void> {
    let cluster = this.decompressedCache.get(seg.descriptor);
    if (cluster === undefined) {
      cluster = this.decompressCluster(seg.descriptor, seg.host);
      this.decompressedCache.set(seg.descriptor, cluster);
      cluster.catch(() => this.decompressedCache.delete(seg.descriptor));
    }
    const data = await cluster;
    const from = seg.offset - seg.host;
    data.copy(target, into, from, from + seg.length);
  }

  private async decompressCluster(descriptor: bigint, guestOffset: number): Promise<Buffer> {
    const { clusterBits } = this.header;
    // The descriptor splits its 62 bits between a byte offset and a count of 512-byte sectors.
    const offsetBits = BigInt(62 - (clusterBits - 8));
    const hostOffset = Number(descriptor & ((1n << offsetBits) - 1n));
    const sectors = Number((descriptor >> offsetBits) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
    const context = { guestOffset, hostOffset, sectors, fileSize: this.fileSize };
    if (hostOffset >= this.fileSize) {
      throw damaged(this.path, 'L2 table', 'a compressed cluster lies beyond the end of the file', context);
    }
    // The compressed stream ends somewhere in its last sector; the file may end before that sector does.
    const storedLength = Math.min(sectors * 512 - (hostOffset % 512), this.fileSize - hostOffset);
    const stored = Buffer.alloc(storedLength);
    await readAt(this.fh, stored, 0, storedLength, hostOffset);
    const data = this.header.compressionType === COMPRESSION_ZSTD
      ? this.inflateZstd(stored, context) : this.inflateDeflate(stored, context);
    if (data.length !== this.clusterSize) {
      throw damaged(this.path, 'compressed cluster', `a compressed cluster decompresses to ${data.length} bytes instead of ${this.clusterSize}`, context);
    }
    return data;
  }

  private inflateDeflate(stored: Buffer, context: Record<string, unknown>): Buffer {
    try {
      // QEMU accepts a stream that fills the cluster even without its end marker: so do we.
      return zlib.inflateRawSync(stored, { maxOutputLength: this.clusterSize, finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } catch (err) {
      throw damaged(this.path, 'compressed cluster', `a deflate-compressed cluster cannot be decompressed (${(err as Error).message})`,
        { ...context, cause: String(err) });
    }
  }

  private inflateZstd(stored: Buffer, context: Record<string, unknown>): Buffer {
    const frameLength = zstdFrameLength(stored);
    if (frameLength === undefined) {
      throw damaged(this.path, 'compressed cluster', 'a zstd-compressed cluster does not hold a complete zstd frame', context);
    }
    try {
      // The sectors read usually end with the start of the next cluster's frame: decode just this one.
      return zlib.zstdDecompressSync(stored.subarray(0, frameLength), { maxOutputLength: this.clusterSize });
    } catch (err) {
      throw damaged(this.path, 'compressed cluster', `a zstd-compressed cluster cannot be decompressed (${(err as Error).message})`,
        { ...context, cause: String(err) });
    }
  }

  // --- mapping ---

  /** Appends the segments of guest [offset, offset+length) to `out`, merging neighbours. */
  private async mapRange(offset: number, length: number, out: Segment[]): Promise<void> {
    const end = offset + length;
    for (let pos = offset; pos < end;) {
      const l1Index = Math.floor(pos / this.bytesPerL2);
      const stop = Math.min(end, (l1Index + 1) * this.bytesPerL2);
      const l2Offset = this.l2TableOffset(l1Index);
      if (l2Offset === 0) {
        pushSegment(out, 'backing', pos, stop - pos);
      } else {
        this.mapClusters(await this.loadL2(l2Offset, l1Index), pos, stop, out);
      }
      pos = stop;
    }
  }

  private l2TableOffset(l1Index: number): number {
    const hi = this.l1.readUInt32BE(l1Index * 8);
    const lo = this.l1.readUInt32BE(l1Index * 8 + 4);
    const offset = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
    if (offset === 0) return 0;
    if (offset % this.clusterSize !== 0 || offset + this.clusterSize > this.fileSize) {
      throw damaged(this.path, 'L1 table', `L1 entry ${l1Index} points to an L2 table at ${offset}, which is `
        + (offset % this.clusterSize !== 0 ? 'not cluster aligned' : 'beyond the end of the file'),
      { l1Index, l2Offset: offset, fileSize: this.fileSize });
    }
    return offset;
  }

  private loadL2(l2Offset: number, l1Index: number): Promise<Buffer> {
    let table = this.l2Cache.get(l2Offset);
    if (table === undefined) {
      table = (async () => {
        const buf = Buffer.alloc(this.clusterSize);
        if (await readAt(this.fh, buf, 0, buf.length, l2Offset) !== buf.length) {
          throw damaged(this.path, 'L2 table', `the L2 table of L1 entry ${l1Index} is cut off by the end of the file`, { l1Index, l2Offset });
        }
        return buf;
      })();
      this.l2Cache.set(l2Offset, table);
      table.catch(() => this.l2Cache.delete(l2Offset));
    }
    return table;
  }

  /** Maps guest [from, to), which lies within the region of one L2 table. */
  private mapClusters(table: Buffer, from: number, to: number, out: Segment[]): void {
    const cs = this.clusterSize;
    for (let pos = from; pos < to;) {
      const clusterIndex = Math.floor(pos / cs);
      const clusterStart = clusterIndex * cs;
      const stop = Math.min(to, clusterStart + cs);
      const entryAt = (clusterIndex % this.l2Entries) * this.l2EntryBytes;
      const hi = table.readUInt32BE(entryAt);
      const lo = table.readUInt32BE(entryAt + 4);
      if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
        pushSegment(out, 'compressed', pos, stop - pos, clusterStart, table.readBigUInt64BE(entryAt) & ((1n << 62n) - 1n));
      } else {
        const host = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
        if (host % cs !== 0) {
          throw damaged(this.path, 'L2 table', `the cluster at guest offset ${clusterStart} has an unaligned host offset ${host}`,
            { guestOffset: clusterStart, hostOffset: host });
        }
        if (this.header.extendedL2) {
          this.mapSubclusters(table, entryAt, host, clusterStart, pos, stop, out);
        } else if ((lo & ENTRY_ZERO_LO) !== 0) {
          if (this.header.version < 3) {
            throw damaged(this.path, 'L2 table', `a version 2 image has a zero cluster at guest offset ${clusterStart}`, { guestOffset: clusterStart });
          }
          pushSegment(out, 'zero', pos, stop - pos);
        } else if (host === 0) {
          pushSegment(out, 'backing', pos, stop - pos);
        } else {
          this.checkDataCluster(host, clusterStart);
          pushSegment(out, 'host', pos, stop - pos, host + (pos - clusterStart));
        }
      }
      pos = stop;
    }
  }

  private mapSubclusters(table: Buffer, entryAt: number, host: number, clusterStart: number, from: number, to: number, out: Segment[]): void {
    const zeroBits = table.readUInt32BE(entryAt + 8);
    const allocBits = table.readUInt32BE(entryAt + 12);
    const context = { guestOffset: clusterStart, hostOffset: host, allocBits, zeroBits };
    if ((zeroBits & allocBits) !== 0) {
      throw damaged(this.path, 'L2 table', `a subcluster at guest offset ${clusterStart} is marked both allocated and zero`, context);
    }
    if (allocBits !== 0) {
      if (host === 0) throw damaged(this.path, 'L2 table', `allocated subclusters at guest offset ${clusterStart} have no host cluster`, context);
      this.checkDataCluster(host, clusterStart);
    }
    const subSize = this.clusterSize / SUBCLUSTERS_PER_CLUSTER;
    for (let pos = from; pos < to;) {
      const index = Math.floor((pos - clusterStart) / subSize);
      const stop = Math.min(to, clusterStart + (index + 1) * subSize);
      const bit = 1 << index;
      if ((allocBits & bit) !== 0) pushSegment(out, 'host', pos, stop - pos, host + (pos - clusterStart));
      else if ((zeroBits & bit) !== 0) pushSegment(out, 'zero', pos, stop - pos);
      else pushSegment(out, 'backing', pos, stop - pos);
      pos = stop;
    }
  }

  private checkDataCluster(host: number, guestOffset: number): void {
    if (host >= this.fileSize) {
      throw damaged(this.path, 'L2 table', `the data cluster of guest offset ${guestOffset} lies beyond the end of the file`,
        { guestOffset, hostOffset: host, fileSize: this.fileSize });
    }
  }
}

/**
 * Length of the zstd frame at the start of `buf` (RFC 8878 §3.1.1), or undefined if it is not a
 * complete frame. Walks the block headers only; decoding is left to zlib.
 */
export function zstdFrameLength(buf: Buffer): number | undefined {
  if (buf.length < 6 || buf.readUInt32LE(0) !== 0xfd2fb528) return undefined;
  const descriptor = buf[4];
  const contentSizeFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const hasChecksum = (descriptor >> 2) & 1;
  const dictionaryIdBytes = [0, 1, 2, 4][descriptor & 3];
  const contentSizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][contentSizeFlag];
  let pos = 5 + (singleSegment ? 0 : 1) + dictionaryIdBytes + contentSizeBytes;
  for (;;) {
    if (pos + 3 > buf.length) return undefined;
    const blockHeader = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16);
    const last = blockHeader & 1;
    const type = (blockHeader >> 1) & 3;
    const blockSize = blockHeader >>> 3;
    if (type === 3) return undefined;
    pos += 3 + (type === 1 ? 1 : blockSize);
    if (last) break;
  }
  if (hasChecksum) pos += 4;
  return pos <= buf.length ? pos : undefined;
}
