/**
 * The blob codec: how one piece of plaintext (a disk chunk, an index piece, a manifest, ...) is
 * turned into stored bytes and back. Pure functions, used both on the main thread and in the
 * codec worker threads. The byte layout is specified in docs/repository-format.md §Blobs.
 *
 *   header = "TB" | version (1) | flags        flags: bit0 zstd-compressed, bit1 encrypted
 *   plain:     header | crc32(payload) u32le | payload
 *   encrypted: header | nonce[12] | AES-256-GCM(payload) | tag[16]
 *              AAD = header | type u8 | context id [32] (| base id [32] for delta chunks)
 *
 * The payload is the zstd frame when compressed, else the plaintext. For content-addressed blobs
 * the context id is the blob id, so a blob cannot be passed off as another; for named objects
 * (manifests, index files) it is derived from the object's role/name.
 *
 * A delta chunk (type 9) is a chunk whose zstd frame was made with the plaintext of another
 * chunk, its base, as a raw-content dictionary: an incremental backup stores a chunk that a
 * guest rewrote only in part as little more than the rewritten bytes. The base is always a
 * plain chunk (depth 1), and its id is bound by the AAD, so a delta decoded against any other
 * base fails authentication.
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, createSecretKey, randomBytes, type KeyObject } from 'node:crypto';
import * as zlib from 'node:zlib';
import { bufferView, releaseBuffer } from '../util/bytes.ts';
import { ZstdContexts, zstdFrameOnce } from './zstd-context.ts';
import { DamageError } from '../util/errors.ts';
import type { MasterKey } from './keys.ts';

export const BlobType = {
  chunk: 1,
  indexPiece: 2,
  packHeader: 3,
  indexFile: 4,
  manifest: 5,
  lock: 6,
  meta: 7,
  mapNode: 8,
  deltaChunk: 9,
} as const;
export type BlobTypeValue = (typeof BlobType)[keyof typeof BlobType];

export const BLOB_TYPE_NAMES: Record<number, string> = {
  1: 'chunk', 2: 'index piece', 3: 'pack header', 4: 'index file', 5: 'manifest', 6: 'lock', 7: 'metadata', 8: 'disk-map node', 9: 'delta chunk',
};

/** A chunk's plaintext with its id: the base a delta chunk is compressed against. */
export interface DeltaBase {
  id: Uint8Array;
  plain: Uint8Array;
}

/** Chunk types (plain or delta): both hold disk data under the chunk's own id. */
export function isChunkType(type: number): boolean {
  return type === BlobType.chunk || type === BlobType.deltaChunk;
}

const MAGIC0 = 0x54; // 'T'
const MAGIC1 = 0x42; // 'B'
const VERSION = 1;
const FLAG_COMPRESSED = 1;
const FLAG_ENCRYPTED = 2;
const HEADER = 4;
export const ZERO_ID = Buffer.alloc(32);

export interface CodecKeys {
  /** undefined = unencrypted repository */
  master: MasterKey | undefined;
  /** zstd level, 0 = no compression */
  compressionLevel: number;
  /** zstd strategy (ZSTD_c_strategy: 1 fast … 9 btultra2); undefined = the level's default. */
  compressionStrategy?: number;
  /** zstd ZSTD_c_searchLog and ZSTD_c_minMatch; undefined = the level's defaults. */
  compressionTuning?: CompressionTuning;
}

export interface CompressionTuning {
  searchLog?: number;
  minMatch?: number;
}

/**
 * Passing a Buffer as a key makes Node build a KeyObject on every call, which costs more than
 * hashing a 64 KiB chunk; keys are converted once and cached.
 */
const keyObjects = new WeakMap<Buffer, KeyObject>();
function keyObject(key: Buffer): KeyObject {
  let k = keyObjects.get(key);
  if (!k) keyObjects.set(key, (k = createSecretKey(key)));
  return k;
}

export function computeId(keys: CodecKeys, plaintext: Uint8Array): Buffer {
  return keys.master
    ? createHmac('sha256', keyObject(keys.master.idKey)).update(plaintext).digest()
    : createHash('sha256').update(plaintext).digest();
}

/** Context id for a named object: keyed so the name is not revealed by the AAD either. */
export function nameId(keys: CodecKeys, role: string, name: string): Buffer {
  return computeId(keys, Buffer.from(`${role}\0${name}`));
}

const SAMPLE = 4096;

/**
 * The decompressed size a zstd frame header declares (RFC 8878 §3.1.1.1), or undefined when it
 * declares none or is not a frame header. Only a size hint: decompression still enforces limits.
 */
export function frameContentSize(frame: Uint8Array): number | undefined {
  if (frame.length < 6 || frame[0] !== 0x28 || frame[1] !== 0xb5 || frame[2] !== 0x2f || frame[3] !== 0xfd) return undefined;
  const descriptor = frame[4] as number;
  const fcsFlag = descriptor >> 6;
  const singleSegment = (descriptor & 0x20) !== 0;
  const dictionaryBytes = [0, 1, 2, 4][descriptor & 3] as number;
  const fcsBytes = fcsFlag === 0 ? (singleSegment ? 1 : 0) : 1 << fcsFlag;
  if (fcsBytes === 0) return undefined;
  const at = 5 + (singleSegment ? 0 : 1) + dictionaryBytes;
  if (frame.length < at + fcsBytes) return undefined;
  const view = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  switch (fcsBytes) {
    case 1: return view[at] as number;
    case 2: return view.readUInt16LE(at) + 256;
    case 4: return view.readUInt32LE(at);
    default: {
      const size = view.readBigUInt64LE(at);
      return size > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(size);
    }
  }
}

function zstd(data: Uint8Array, level: number, strategy?: number, tuning?: CompressionTuning): Buffer {
  return zstdWith(data, {
    [zlib.constants.ZSTD_c_compressionLevel]: level,
    ...(strategy !== undefined ? { [zlib.constants.ZSTD_c_strategy]: strategy } : {}),
    ...(tuning?.searchLog !== undefined ? { [zlib.constants.ZSTD_c_searchLog]: tuning.searchLog } : {}),
    ...(tuning?.minMatch !== undefined ? { [zlib.constants.ZSTD_c_minMatch]: tuning.minMatch } : {}),
  });
}

/** zstd contexts of this thread, kept across calls (zstd-context.ts). */
const zstdContexts = new ZstdContexts();

/**
 * One zstd frame of `data` that declares its size and is single-segment (decoded without a
 * window; repository-format.md §4). Measured on 128 KiB text chunks against a level's default
 * window and tables: compression +17 %, decompression +20 %.
 *
 * Without `dictionary`, and with a long-lived dictionary (`dictionary.key` given: the same key,
 * the same bytes), the frame comes from a context kept across calls and is a view of its output
 * buffer, valid until this thread's next call: consume it first. With a one-off dictionary (a
 * delta chunk's base), the frame is a buffer of its own.
 */
function zstdWith(data: Uint8Array, params: Record<number, number>, dictionary?: { key?: string; bytes: Uint8Array }): Buffer {
  const frameParams = { ...params, [zlib.constants.ZSTD_c_checksumFlag]: 0, [zlib.constants.ZSTD_c_contentSizeFlag]: 1 };
  if (dictionary === undefined) return zstdContexts.compress(data, frameParams);
  if (dictionary.key !== undefined) return zstdContexts.compress(data, frameParams, { key: dictionary.key, bytes: dictionary.bytes });
  // A raw-content dictionary (no dictionary id in the frame): the base of a delta chunk.
  return zstdFrameOnce(data, frameParams, dictionary.bytes);
}

/**
 * Disk images are largely either compressible (text, binaries, metadata) or not at all (media,
 * encrypted or already compressed data). Three 4 KiB samples (start, middle, end) compressed
 * together at level 1 tell which, for a fraction of the cost of compressing an incompressible
 * chunk in full. One call for the three: a zstd call's setup costs as much as compressing a
 * sample, and half of a typical disk's chunks are sampled and found incompressible.
 */
function looksIncompressible(plaintext: Uint8Array): boolean {
  if (plaintext.length < 4 * SAMPLE) return false;
  // Disk data comes in runs of one kind, and a worker encodes neighbouring chunks: after a chunk
  // that compressed, the next most likely does too, and its samples would only cost (~1/10 of
  // compressing it at level 1). A wrong guess costs one compression that is not kept.
  if (lastChunkCompressed) return false;
  const mid = (plaintext.length >> 1) - (SAMPLE >> 1);
  sampleScratch.set(plaintext.subarray(0, SAMPLE), 0);
  sampleScratch.set(plaintext.subarray(mid, mid + SAMPLE), SAMPLE);
  sampleScratch.set(plaintext.subarray(plaintext.length - SAMPLE), 2 * SAMPLE);
  return zstd(sampleScratch, 1).length >= sampleScratch.length - (SAMPLE >> 4);
}

/**
 * Random 96-bit GCM nonces, taken from a block of CSPRNG output drawn 4 KiB at a time: the same
 * randomness as one randomBytes(12) per blob, without a call into the CSPRNG per blob (~20 µs
 * each, 20 000 per 2.5 GiB backed up).
 */
const NONCE_BLOCK = 4096 - (4096 % 12);
let nonceBlock = Buffer.alloc(0);
let nonceAt = 0;
function nextNonce(): Buffer {
  if (nonceAt + 12 > nonceBlock.length) {
    nonceBlock = randomBytes(NONCE_BLOCK);
    nonceAt = 0;
  }
  const nonce = nonceBlock.subarray(nonceAt, nonceAt + 12);
  nonceAt += 12;
  return nonce;
}

/** Whether the last chunk this thread encoded was stored compressed (looksIncompressible). */
let lastChunkCompressed = false;

/** The samples of looksIncompressible (one per thread: the codec runs synchronously). */
const sampleScratch = Buffer.alloc(3 * SAMPLE);

function compress(plaintext: Uint8Array, keys: CodecKeys, sample: boolean): Buffer | undefined {
  const level = keys.compressionLevel;
  if (level <= 0 || plaintext.length < 64 || (sample && looksIncompressible(plaintext))) return undefined;
  const out = zstd(plaintext, level, keys.compressionStrategy, keys.compressionTuning);
  // Keep it only when it saves at least 1/32: otherwise restore pays decompression for nothing.
  return out.length < plaintext.length - (plaintext.length >> 5) ? out : undefined;
}

export function encodeBlob(keys: CodecKeys, type: BlobTypeValue, contextId: Uint8Array, plaintext: Uint8Array): Buffer {
  if (type === BlobType.deltaChunk) throw new Error('a delta chunk is made by encodeChunk with a base');
  return encodeWith(keys, type, contextId, plaintext);
}

/**
 * Encodes a chunk: as a delta chunk against `base` when that compresses (by 1/32 at least, like
 * any compressed blob), else as a plain chunk. A base is worth it when the chunk was rewritten
 * in part (the rest matches the base); the caller decides that. Without compression configured
 * there are no deltas. `level`: a zstd level other than the repository's, for this chunk.
 *
 * `dictionary`: a chunk given no base, that is compressible (sampled as any chunk), is compressed
 * against the dictionary (a plain chunk with a sample of the disk's data, repository-format.md
 * §4) at DICTIONARY_PARAMS (at `level` alone when given) and stored as a delta chunk against it
 * when that saves 1/32. A chunk
 * given a base never falls back to the dictionary: the caller knows which base a delta has. A
 * chunk as long as the dictionary is never a delta against it (it could be the dictionary, and
 * a dictionary must stay a plain chunk). The result says which base the delta was made against.
 */
export function encodeChunk(
  keys: CodecKeys, id: Uint8Array, plaintext: Uint8Array, base: DeltaBase | undefined, level?: number, dictionary?: DeltaBase,
): { type: BlobTypeValue; blob: Buffer; base?: Uint8Array; ratio?: number } {
  const encoded = encodeChunkOnce(keys, id, plaintext, base, level, dictionary);
  if (base === undefined) lastChunkCompressed = encoded.ratio !== undefined;
  return encoded;
}

function encodeChunkOnce(
  keys: CodecKeys, id: Uint8Array, plaintext: Uint8Array, base: DeltaBase | undefined, level: number | undefined, dictionary: DeltaBase | undefined,
): { type: BlobTypeValue; blob: Buffer; base?: Uint8Array; ratio?: number } {
  // Another level than the repository's (incremental backups, repository-format.md §2): that
  // level alone, without the repository's strategy and search tuning.
  if (level !== undefined && level !== keys.compressionLevel) keys = { ...keys, compressionLevel: level, compressionStrategy: undefined, compressionTuning: undefined };
  if (base !== undefined && keys.compressionLevel > 0 && plaintext.length >= 64 && usableAsBase(base.plain)) {
    // No sampling: half a random chunk that matches its base compresses well against it. Level
    // 1 (zstd's fast strategy): what matches the base costs next to nothing at any level, and the
    // stronger settings pay to index the whole base on every call (DELTA_LEVEL below).
    const out = zstdWith(plaintext, { [zlib.constants.ZSTD_c_compressionLevel]: Math.min(keys.compressionLevel, DELTA_LEVEL) }, { bytes: base.plain });
    try {
      if (out.length < plaintext.length - (plaintext.length >> 5)) {
        return { type: BlobType.deltaChunk, blob: seal(keys, BlobType.deltaChunk, deltaContext(id, base.id), out, true), base: base.id };
      }
    } finally {
      // A one-off frame (its base is this chunk's alone): its buffer belongs to this call.
      releaseBuffer(out, 'arraybuffer');
    }
  } else if (base === undefined && dictionary !== undefined && keys.compressionLevel > 0 && plaintext.length >= 64 && usableAsBase(dictionary.plain)
    && plaintext.length !== dictionary.plain.length && !looksIncompressible(plaintext)) {
    // The dictionary serves many chunks: its context (and the dictionary digested in it) is kept.
    const out = zstdWith(plaintext, level !== undefined ? { [zlib.constants.ZSTD_c_compressionLevel]: keys.compressionLevel } : DICTIONARY_PARAMS,
      { key: bufferView(dictionary.id).toString('hex'), bytes: dictionary.plain });
    if (out.length < plaintext.length - (plaintext.length >> 5)) {
      const ratio = out.length / plaintext.length;
      return { type: BlobType.deltaChunk, blob: seal(keys, BlobType.deltaChunk, deltaContext(id, dictionary.id), out, true), base: dictionary.id, ratio };
    }
    return { type: BlobType.chunk, blob: seal(keys, BlobType.chunk, id, plaintext, false) };
  }
  const compressed = compress(plaintext, keys, true);
  return { type: BlobType.chunk, blob: seal(keys, BlobType.chunk, id, compressed ?? plaintext, compressed !== undefined), ...(compressed !== undefined ? { ratio: compressed.length / plaintext.length } : {}) };
}

/**
 * zstd settings for chunks compressed against a dictionary: the double-fast strategy with small
 * tables (ZSTD_c_strategy 2, hashLog 14, chainLog 14, minMatch 6). Measured on the reference
 * corpus's text (docs/performance.md, ninth session): ~2.2x the speed of the repository's lazy
 * setting, 2-3 % larger; without the dictionary the same setting is ~8 % larger. Decoders need
 * none of this.
 */
const DICTIONARY_PARAMS: Record<number, number> = {
  [zlib.constants.ZSTD_c_compressionLevel]: 1,
  [zlib.constants.ZSTD_c_strategy]: 2,
  [zlib.constants.ZSTD_c_hashLog]: 14,
  [zlib.constants.ZSTD_c_chainLog]: 14,
  [zlib.constants.ZSTD_c_minMatch]: 6,
};

/**
 * A dictionary candidate: the last `bytes` of a chunk that compressed to under DICTIONARY_RATIO
 * of its size (text-like data worth a dictionary), when that piece may serve as a base.
 */
const DICTIONARY_RATIO = 0.5;
export function dictionaryCandidate(plaintext: Uint8Array, ratio: number | undefined, bytes: number): Uint8Array | undefined {
  if (ratio === undefined || ratio >= DICTIONARY_RATIO || plaintext.length < bytes) return undefined;
  const piece = plaintext.subarray(plaintext.length - bytes);
  return usableAsBase(piece) ? piece : undefined;
}

/**
 * zstd level of delta chunks. Measured on the reference corpus's 2 % rewrite (the partly
 * rewritten chunks against their parents): level 1 adds 2.7 % more than the repository's lazy
 * setting, at a third of its CPU (docs/performance.md, seventh and eighth sessions).
 */
const DELTA_LEVEL = 1;

/**
 * zstd takes a dictionary that starts with its dictionary magic (37 A4 30 EC) as a formatted
 * dictionary, not as raw content: a guest could write such a chunk, so it never serves as a base.
 */
function usableAsBase(plain: Uint8Array): boolean {
  return !(plain.length >= 4 && plain[0] === 0x37 && plain[1] === 0xa4 && plain[2] === 0x30 && plain[3] === 0xec);
}

/** The context a delta chunk's AAD binds: its id and its base's id. */
function deltaContext(id: Uint8Array, baseId: Uint8Array): Uint8Array {
  const both = Buffer.allocUnsafe(64);
  both.set(id, 0);
  both.set(baseId, 32);
  return both;
}

function encodeWith(keys: CodecKeys, type: BlobTypeValue, contextId: Uint8Array, plaintext: Uint8Array): Buffer {
  // Only disk data is sampled first: metadata is small. A disk-map piece or node is a list of
  // keyed ids, random bytes, that compresses only where the list repeats itself (runs of zero
  // ids for holes, of the all-hole piece's id in a node): without such a run zstd is not tried.
  const idList = type === BlobType.indexPiece || type === BlobType.mapNode;
  const compressed = idList && !repeatsAnId(plaintext) ? undefined : compress(plaintext, keys, type === BlobType.chunk);
  return seal(keys, type, contextId, compressed ?? plaintext, compressed !== undefined);
}

/** Whether some 32-byte entry of the id list `list` equals the one before it. */
function repeatsAnId(list: Uint8Array): boolean {
  for (let at = 32; at + 32 <= list.length; at += 32) {
    let same = true;
    for (let k = 0; k < 32 && same; k++) same = list[at + k] === list[at - 32 + k];
    if (same) return true;
  }
  return false;
}

/** Header, then the payload under CRC32 or AES-256-GCM (copied: `payload` may be reused after). */
function seal(keys: CodecKeys, type: BlobTypeValue, contextId: Uint8Array, payload: Buffer | Uint8Array, compressed: boolean): Buffer {
  const flags = (compressed ? FLAG_COMPRESSED : 0) | (keys.master ? FLAG_ENCRYPTED : 0);
  const header = Buffer.from([MAGIC0, MAGIC1, VERSION, flags]);
  // Every blob gets its own ArrayBuffer (not a slice of Node's shared pool): it can be
  // transferred between threads and freed on its own (util/bytes.ts releaseBuffer).
  let blob: Buffer;
  if (!keys.master) {
    blob = Buffer.allocUnsafeSlow(HEADER + 4 + payload.length);
    header.copy(blob, 0);
    blob.writeUInt32LE(zlib.crc32(payload), HEADER);
    blob.set(payload, HEADER + 4);
  } else {
    const nonce = nextNonce();
    const c = createCipheriv('aes-256-gcm', keyObject(keys.master.encKey), nonce);
    c.setAAD(aad(header, type, contextId));
    const ct1 = c.update(payload);
    const ct2 = c.final();
    const tag = c.getAuthTag();
    blob = Buffer.allocUnsafeSlow(HEADER + 12 + ct1.length + ct2.length + tag.length);
    header.copy(blob, 0);
    nonce.copy(blob, HEADER);
    ct1.copy(blob, HEADER + 12);
    ct2.copy(blob, HEADER + 12 + ct1.length);
    tag.copy(blob, HEADER + 12 + ct1.length + ct2.length);
    releaseBuffer(ct1);
  }
  return blob;
}

/** Header, type and context id; a delta chunk's context is 64 bytes (its id, then its base's). */
function aad(header: Buffer, type: number, contextId: Uint8Array): Buffer {
  const n = type === BlobType.deltaChunk ? 64 : 32;
  const a = Buffer.allocUnsafe(HEADER + 1 + n);
  header.copy(a, 0, 0, HEADER);
  a[HEADER] = type;
  Buffer.from(contextId.buffer, contextId.byteOffset, contextId.byteLength).copy(a, HEADER + 1, 0, n);
  return a;
}

export interface DecodeExpect {
  /** For content-addressed blobs: the id the plaintext must hash to. */
  id?: Uint8Array;
  /** Upper bound (or exact size when `exact`) of the plaintext; bounds decompression. */
  maxLength: number;
  exactLength?: boolean;
  /**
   * Encrypted repositories: accept the AES-GCM tag as proof of identity instead of hashing the
   * plaintext again. The tag covers the id (in the AAD), so only a holder of the key could have
   * made this blob for this id; what recomputing adds is a check of Tresor's own writer, which
   * `verify` does. Restores set this (a third of their CPU); verify never does.
   */
  trustAead?: boolean;
}

/** Describes the blob for error messages, e.g. "chunk 1a2b... in pack data/ab/ab12...". */
export type BlobLabel = () => { what: string; context: Record<string, unknown> };

/**
 * Decodes a stored blob. A delta chunk (type 9) needs `base`, the plaintext of the chunk its
 * index entry names as its base (authenticated by the AAD, identity-checked like any chunk).
 */
export function decodeBlob(keys: CodecKeys, type: BlobTypeValue, contextId: Uint8Array, stored: Uint8Array, expect: DecodeExpect, label: BlobLabel, base?: DeltaBase): Buffer {
  const fail = (why: string): never => {
    const l = label();
    throw new DamageError('damaged-blob', `${l.what} is damaged: ${why}`, { context: { ...l.context, reason: why } });
  };
  const delta = type === BlobType.deltaChunk;
  if (delta && base === undefined) throw new Error(`${label().what}: a delta chunk cannot be decoded without its base`);
  const buf = Buffer.from(stored.buffer, stored.byteOffset, stored.byteLength);
  if (buf.length < HEADER + 4 || buf[0] !== MAGIC0 || buf[1] !== MAGIC1) fail('not a Tresor blob (bad magic)');
  if (buf[2] !== VERSION) fail(`unknown blob version ${buf[2]}`);
  const flags = buf[3];
  if ((flags & ~(FLAG_COMPRESSED | FLAG_ENCRYPTED)) !== 0) fail(`unknown blob flags ${flags}`);
  const encrypted = (flags & FLAG_ENCRYPTED) !== 0;
  if (encrypted !== (keys.master !== undefined)) {
    fail(encrypted ? 'blob is encrypted but the repository is not' : 'blob is not encrypted but the repository is');
  }
  let payload: Buffer;
  if (!keys.master) {
    payload = buf.subarray(HEADER + 4);
    if (zlib.crc32(payload) !== buf.readUInt32LE(HEADER)) fail('CRC32 mismatch');
  } else {
    if (buf.length < HEADER + 12 + 16) fail('too short for an encrypted blob');
    const nonce = buf.subarray(HEADER, HEADER + 12);
    const tag = buf.subarray(buf.length - 16);
    const d = createDecipheriv('aes-256-gcm', keyObject(keys.master.encKey), nonce);
    d.setAAD(aad(buf.subarray(0, HEADER), type, delta ? deltaContext(contextId, base!.id) : contextId));
    d.setAuthTag(tag);
    try {
      payload = d.update(buf.subarray(HEADER + 12, buf.length - 16));
      const rest = d.final(); // GCM is a stream mode: nothing is held back, but be exact.
      if (rest.length > 0) payload = Buffer.concat([payload, rest]);
    } catch {
      return fail('authentication failed (AES-GCM tag mismatch: modified, truncated, or not this blob)');
    }
  }
  let plain: Buffer = payload;
  if (delta && !(flags & FLAG_COMPRESSED)) fail('a delta chunk that is not a zstd frame');
  if (delta && !usableAsBase(base!.plain)) fail('its base starts with the zstd dictionary magic (no writer makes such a delta)');
  if (flags & FLAG_COMPRESSED) {
    try {
      // One output buffer of the frame's own size (its header says, bounded by what the caller
      // allows): sizing it by the bound instead cost a 256 MiB allocation per manifest.
      const size = Math.min(expect.maxLength, frameContentSize(payload) ?? 1 << 20);
      plain = zlib.zstdDecompressSync(payload, {
        maxOutputLength: Math.max(1, expect.maxLength), chunkSize: Math.max(64, size),
        ...(delta ? { dictionary: bufferView(base!.plain) } : {}),
      });
    } catch (err) {
      fail(`zstd decompression failed (${err instanceof Error ? err.message : String(err)})`);
    }
    // The decrypted payload is this call's own buffer (unencrypted: a view of `stored`: kept).
    if (keys.master) releaseBuffer(payload);
  }
  if (expect.exactLength ? plain.length !== expect.maxLength : plain.length > expect.maxLength) {
    fail(`plaintext is ${plain.length} bytes, expected ${expect.exactLength ? '' : 'at most '}${expect.maxLength}`);
  }
  // Identity: recomputed, except where the caller accepts the AEAD tag instead (see DecodeExpect).
  const identityProven = keys.master !== undefined && expect.trustAead === true;
  if (expect.id && !identityProven && !computeId(keys, plain).equals(expect.id)) fail('content does not match its identifier');
  return plain;
}

/** Overhead bytes an encoded blob adds on top of its payload. */
export function blobOverhead(encrypted: boolean): number {
  return encrypted ? HEADER + 12 + 16 : HEADER + 4;
}
