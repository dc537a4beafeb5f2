/**
 * Pack files: many encoded blobs in one stored object, so small chunks do not cost one file (or
 * one S3 PUT and fsync) each. Layout (docs/repository-format.md §Packs):
 *
 *   blob_0 | blob_1 | ... | blob_n-1 | header blob | u32le header length | "TRPACK01"
 *
 * The header is itself an encoded blob (type packHeader, context id zero) whose plaintext lists
 * every blob: "TPH1" | u32le count | count × entry(type u8, id[32], offset u32le, length u32le,
 * rawLength u32le, and for a delta chunk its base id[32]). It makes a pack self-describing: indexes can be rebuilt from packs alone.
 * A pack is named by a random 32-byte id: data/<first 2 hex>/<64 hex>.
 */
import { randomBytes } from 'node:crypto';
import { copyBytes, releaseBuffer } from '../util/bytes.ts';
import { DamageError } from '../util/errors.ts';
import { BlobType, type BlobTypeValue, type CodecKeys, ZERO_ID, decodeBlob, encodeBlob } from './codec.ts';

export const PACK_MAGIC = Buffer.from('TRPACK01');
/** The blob types a pack holds (docs/repository-format.md §5): chunks and disk-map blobs. */
const PACKED_TYPES: ReadonlySet<number> = new Set([BlobType.chunk, BlobType.indexPiece, BlobType.mapNode, BlobType.deltaChunk]);
const HEADER_MAGIC = Buffer.from('TPH1');
const ENTRY = 1 + 32 + 4 + 4 + 4;
/** A delta chunk's entry also names its base. */
const DELTA_ENTRY = ENTRY + 32;
export const PACK_TRAILER = 4 + PACK_MAGIC.length;
/** No pack may exceed this, so u32 offsets always suffice. */
export const MAX_PACK_SIZE = 1 << 30;

export interface PackEntry {
  type: BlobTypeValue;
  id: Buffer;
  offset: number;
  length: number;
  rawLength: number;
  /** Delta chunks only: the id of the plain chunk the delta was made against. */
  base?: Buffer;
}

export interface SealedPack {
  id: Buffer;
  name: string;
  data: Buffer;
  entries: PackEntry[];
}

export function packName(id: Uint8Array): string {
  const hex = Buffer.from(id.buffer, id.byteOffset, id.byteLength).toString('hex');
  return `data/${hex.slice(0, 2)}/${hex}`;
}

export function packIdFromName(name: string): Buffer | undefined {
  const m = /^data\/([0-9a-f]{2})\/([0-9a-f]{64})$/.exec(name);
  return m && m[2].startsWith(m[1]) ? Buffer.from(m[2], 'hex') : undefined;
}

/**
 * Lays a pack out as blobs arrive: each blob is copied into one growing buffer (so callers may
 * free or reuse theirs at once, and sealing is no second copy of the whole pack), then the
 * header and trailer are appended. `capacity`: the expected pack size, allocated up front;
 * `buffer`: one to lay the pack out in instead (it belongs to the builder and its sealed pack).
 */
export class PackBuilder {
  readonly entries: PackEntry[] = [];
  size = 0;
  #buf: Buffer | undefined;
  readonly #capacity: number;

  constructor(capacity = 1 << 20, buffer?: Buffer) {
    this.#capacity = capacity;
    this.#buf = buffer;
  }

  add(type: BlobTypeValue, id: Buffer, encoded: Uint8Array, rawLength: number, base?: Buffer): void {
    if ((type === BlobType.deltaChunk) !== (base !== undefined)) throw new Error(`a ${type === BlobType.deltaChunk ? 'delta chunk needs' : 'blob of another type has no'} base`);
    this.#reserve(encoded.length);
    copyBytes(this.#buf!, this.size, encoded);
    this.entries.push({ type, id, offset: this.size, length: encoded.length, rawLength, ...(base !== undefined ? { base } : {}) });
    this.size += encoded.length;
  }

  get count(): number {
    return this.entries.length;
  }

  /**
   * Appends header and trailer; the builder is spent. `data` is a view of a buffer that belongs
   * to the sealed pack alone (free it with releaseBuffer(data, 'arraybuffer') once stored).
   */
  seal(keys: CodecKeys): SealedPack {
    const header = encodeBlob(keys, BlobType.packHeader, ZERO_ID, encodePackHeader(this.entries));
    const tail = Buffer.allocUnsafe(PACK_TRAILER);
    tail.writeUInt32LE(header.length, 0);
    PACK_MAGIC.copy(tail, 4);
    this.#reserve(header.length + tail.length);
    const buf = this.#buf!;
    buf.set(header, this.size);
    buf.set(tail, this.size + header.length);
    const data = buf.subarray(0, this.size + header.length + tail.length);
    this.#buf = undefined;
    // Random, not content-derived: every blob inside is authenticated (or CRC- and id-checked)
    // on its own, and hashing each pack would cost the main thread ~1 s per GiB stored.
    const id = randomBytes(32);
    return { id, name: packName(id), data, entries: this.entries };
  }

  #reserve(n: number): void {
    const need = this.size + n;
    if (this.#buf && need <= this.#buf.length) return;
    const grown = Buffer.allocUnsafeSlow(Math.max(need, this.#buf ? this.#buf.length * 2 : this.#capacity));
    if (this.#buf) {
      this.#buf.copy(grown, 0, 0, this.size);
      releaseBuffer(this.#buf);
    }
    this.#buf = grown;
  }
}

/** Bytes of one entry in a pack header or index file (§5): 45, or 77 for a delta chunk. */
export function entrySize(e: PackEntry): number {
  return e.type === BlobType.deltaChunk ? DELTA_ENTRY : ENTRY;
}

/** Writes one entry at `p`; returns the position after it. */
export function writeEntry(buf: Buffer, p: number, e: PackEntry): number {
  buf[p] = e.type;
  e.id.copy(buf, p + 1);
  buf.writeUInt32LE(e.offset, p + 33);
  buf.writeUInt32LE(e.length, p + 37);
  buf.writeUInt32LE(e.rawLength, p + 41);
  if (e.type !== BlobType.deltaChunk) return p + ENTRY;
  if (e.base === undefined || e.base.length !== 32) throw new Error(`delta chunk ${e.id.toString('hex')} has no base id`);
  e.base.copy(buf, p + ENTRY);
  return p + DELTA_ENTRY;
}

/**
 * Reads one entry at `p` of `plain` (its type already checked by the caller); `bad` reports
 * damage. Returns the entry and the position after it.
 */
export function readEntry(plain: Buffer, p: number, bad: (why: string) => never): { entry: PackEntry; next: number } {
  if (p + ENTRY > plain.length) bad(`truncated entry at byte ${p}`);
  const type = plain[p] as BlobTypeValue;
  const entry: PackEntry = {
    type, id: Buffer.from(plain.subarray(p + 1, p + 33)),
    offset: plain.readUInt32LE(p + 33), length: plain.readUInt32LE(p + 37), rawLength: plain.readUInt32LE(p + 41),
  };
  if (type !== BlobType.deltaChunk) return { entry, next: p + ENTRY };
  if (p + DELTA_ENTRY > plain.length) bad(`truncated entry at byte ${p}`);
  entry.base = Buffer.from(plain.subarray(p + ENTRY, p + DELTA_ENTRY));
  if (entry.base.equals(entry.id)) bad(`delta chunk ${entry.id.toString('hex')} names itself as its base`);
  return { entry, next: p + DELTA_ENTRY };
}

export function encodePackHeader(entries: PackEntry[]): Buffer {
  const buf = Buffer.allocUnsafe(8 + entries.reduce((n, e) => n + entrySize(e), 0));
  HEADER_MAGIC.copy(buf, 0);
  buf.writeUInt32LE(entries.length, 4);
  let p = 8;
  for (const e of entries) p = writeEntry(buf, p, e);
  return buf;
}

/** Parses and checks a pack header: entries must tile the data area exactly, in order. */
export function decodePackHeader(plain: Buffer, headerOffset: number, packLabel: string): PackEntry[] {
  const bad = (why: string): never => {
    throw new DamageError('damaged-pack', `pack ${packLabel} has a damaged header: ${why}`, { context: { pack: packLabel } });
  };
  if (plain.length < 8 || !plain.subarray(0, 4).equals(HEADER_MAGIC)) bad('bad header magic');
  const count = plain.readUInt32LE(4);
  if (plain.length < 8 + count * ENTRY) bad(`header length ${plain.length} is too short for ${count} entries`);
  const entries: PackEntry[] = [];
  let expectOffset = 0;
  let p = 8;
  for (let i = 0; i < count; i++) {
    const type = plain[p] as BlobTypeValue;
    if (!PACKED_TYPES.has(type)) bad(`entry ${i} has blob type ${type}, which packs never hold (only ${[...PACKED_TYPES].join(', ')})`);
    const { entry, next } = readEntry(plain, p, bad);
    if (entry.offset !== expectOffset || entry.offset + entry.length > headerOffset) bad(`entry ${i} at ${entry.offset}+${entry.length} is out of place`);
    entries.push(entry);
    expectOffset = entry.offset + entry.length;
    p = next;
  }
  if (p !== plain.length) bad(`header length ${plain.length} does not match ${count} entries`);
  if (expectOffset !== headerOffset) bad(`entries end at ${expectOffset} but the header starts at ${headerOffset}`);
  return entries;
}

/** Reads the header of a stored pack given its total size and a ranged reader. */
export async function readPackHeader(
  keys: CodecKeys, name: string, size: number, readRange: (offset: number, length: number) => Promise<Buffer>,
): Promise<PackEntry[]> {
  if (size < PACK_TRAILER) throw new DamageError('damaged-pack', `pack ${name} is truncated (${size} bytes)`, { context: { pack: name } });
  const tail = await readRange(size - PACK_TRAILER, PACK_TRAILER);
  if (!tail.subarray(4).equals(PACK_MAGIC)) throw new DamageError('damaged-pack', `pack ${name} has no pack trailer (truncated or not a pack)`, { context: { pack: name } });
  const hlen = tail.readUInt32LE(0);
  const headerOffset = size - PACK_TRAILER - hlen;
  if (hlen < 8 || headerOffset < 0) throw new DamageError('damaged-pack', `pack ${name} has an impossible header length ${hlen}`, { context: { pack: name } });
  const stored = await readRange(headerOffset, hlen);
  const plain = decodeBlob(keys, BlobType.packHeader, ZERO_ID, stored, { maxLength: 64 + hlen * 64 }, () => ({ what: `header of pack ${name}`, context: { pack: name } }));
  return decodePackHeader(plain, headerOffset, name);
}
