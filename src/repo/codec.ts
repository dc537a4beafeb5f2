/**
 * The blob codec: how one piece of plaintext (a disk chunk, an index piece, a manifest, ...) is
 * turned into stored bytes and back. Pure functions, used both on the main thread and in the
 * codec worker threads. The byte layout is specified in docs/repository-format.md §Blobs.
 *
 *   header = "TB" | version (1) | flags        flags: bit0 zstd-compressed, bit1 encrypted
 *   plain:     header | crc32(payload) u32le | payload
 *   encrypted: header | nonce[12] | AES-256-GCM(payload) | tag[16]
 *              AAD = header | type u8 | context id [32]
 *
 * The payload is the zstd frame when compressed, else the plaintext. For content-addressed blobs
 * the context id is the blob id, so a blob cannot be passed off as another; for named objects
 * (manifests, index files) it is derived from the object's role/name.
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, createSecretKey, randomBytes, type KeyObject } from 'node:crypto';
import * as zlib from 'node:zlib';
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
} as const;
export type BlobTypeValue = (typeof BlobType)[keyof typeof BlobType];

export const BLOB_TYPE_NAMES: Record<number, string> = {
  1: 'chunk', 2: 'index piece', 3: 'pack header', 4: 'index file', 5: 'manifest', 6: 'lock', 7: 'metadata',
};

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

function zstd(data: Uint8Array, level: number, strategy?: number): Buffer {
  return zlib.zstdCompressSync(data, {
    params: {
      [zlib.constants.ZSTD_c_compressionLevel]: level,
      ...(strategy !== undefined ? { [zlib.constants.ZSTD_c_strategy]: strategy } : {}),
      [zlib.constants.ZSTD_c_checksumFlag]: 0,
      [zlib.constants.ZSTD_c_contentSizeFlag]: 1,
    },
  });
}

/**
 * Disk images are largely either compressible (text, binaries, metadata) or not at all (media,
 * encrypted or already compressed data). Two 4 KiB samples at level 1 tell which, for a fraction
 * of the cost of compressing an incompressible chunk in full.
 */
function looksIncompressible(plaintext: Uint8Array): boolean {
  if (plaintext.length < 4 * SAMPLE) return false;
  const mid = (plaintext.length >> 1) - (SAMPLE >> 1);
  for (const at of [0, mid, plaintext.length - SAMPLE]) {
    if (zstd(plaintext.subarray(at, at + SAMPLE), 1).length < SAMPLE - (SAMPLE >> 4)) return false;
  }
  return true;
}

function compress(plaintext: Uint8Array, level: number, strategy?: number): Buffer | undefined {
  if (level <= 0 || plaintext.length < 64 || looksIncompressible(plaintext)) return undefined;
  const out = zstd(plaintext, level, strategy);
  // Keep it only when it saves at least 1/32: otherwise restore pays decompression for nothing.
  return out.length < plaintext.length - (plaintext.length >> 5) ? out : undefined;
}

export function encodeBlob(keys: CodecKeys, type: BlobTypeValue, contextId: Uint8Array, plaintext: Uint8Array): Buffer {
  const compressed = compress(plaintext, keys.compressionLevel, keys.compressionStrategy);
  const payload = compressed ?? plaintext;
  const flags = (compressed ? FLAG_COMPRESSED : 0) | (keys.master ? FLAG_ENCRYPTED : 0);
  const header = Buffer.from([MAGIC0, MAGIC1, VERSION, flags]);
  if (!keys.master) {
    const crc = Buffer.allocUnsafe(4);
    crc.writeUInt32LE(zlib.crc32(payload), 0);
    return Buffer.concat([header, crc, payload]);
  }
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', keyObject(keys.master.encKey), nonce);
  c.setAAD(aad(header, type, contextId));
  const ct1 = c.update(payload);
  const ct2 = c.final();
  return Buffer.concat([header, nonce, ct1, ct2, c.getAuthTag()]);
}

function aad(header: Buffer, type: number, contextId: Uint8Array): Buffer {
  const a = Buffer.allocUnsafe(HEADER + 1 + 32);
  header.copy(a, 0, 0, HEADER);
  a[HEADER] = type;
  Buffer.from(contextId.buffer, contextId.byteOffset, contextId.byteLength).copy(a, HEADER + 1, 0, 32);
  return a;
}

export interface DecodeExpect {
  /** For content-addressed blobs: the id the plaintext must hash to. */
  id?: Uint8Array;
  /** Upper bound (or exact size when `exact`) of the plaintext; bounds decompression. */
  maxLength: number;
  exactLength?: boolean;
}

/** Describes the blob for error messages, e.g. "chunk 1a2b... in pack data/ab/ab12...". */
export type BlobLabel = () => { what: string; context: Record<string, unknown> };

export function decodeBlob(keys: CodecKeys, type: BlobTypeValue, contextId: Uint8Array, stored: Uint8Array, expect: DecodeExpect, label: BlobLabel): Buffer {
  const fail = (why: string): never => {
    const l = label();
    throw new DamageError('damaged-blob', `${l.what} is damaged: ${why}`, { context: { ...l.context, reason: why } });
  };
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
    d.setAAD(aad(buf.subarray(0, HEADER), type, contextId));
    d.setAuthTag(tag);
    try {
      payload = Buffer.concat([d.update(buf.subarray(HEADER + 12, buf.length - 16)), d.final()]);
    } catch {
      return fail('authentication failed (AES-GCM tag mismatch: modified, truncated, or not this blob)');
    }
  }
  let plain: Buffer = payload;
  if (flags & FLAG_COMPRESSED) {
    try {
      plain = zlib.zstdDecompressSync(payload, { maxOutputLength: Math.max(1, expect.maxLength) });
    } catch (err) {
      fail(`zstd decompression failed (${err instanceof Error ? err.message : String(err)})`);
    }
  }
  if (expect.exactLength ? plain.length !== expect.maxLength : plain.length > expect.maxLength) {
    fail(`plaintext is ${plain.length} bytes, expected ${expect.exactLength ? '' : 'at most '}${expect.maxLength}`);
  }
  if (expect.id && !computeId(keys, plain).equals(expect.id)) fail('content does not match its identifier');
  return plain;
}

/** Overhead bytes an encoded blob adds on top of its payload. */
export function blobOverhead(encrypted: boolean): number {
  return encrypted ? HEADER + 12 + 16 : HEADER + 4;
}
