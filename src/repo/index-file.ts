/**
 * Index files: which blobs each pack holds, so readers need not open every pack header.
 * Stored as `index/<sha256 of the stored bytes>`; the stored bytes are an encoded blob (type
 * indexFile, context id zero) whose plaintext is (docs/repository-format.md §Index files):
 *
 *   "TIX1" | u32le packCount | u32le supersededCount | superseded index ids [32 each]
 *   then per pack: pack id [32] | u32le blobCount | blobCount × entry(type u8, id[32],
 *   offset u32le, length u32le, rawLength u32le, and for a delta chunk its base id [32])
 *
 * An index file written by GC may list index files it supersedes; readers ignore superseded
 * files that still exist (GC deletes them after writing the new one).
 */
import { createHash } from 'node:crypto';
import { DamageError } from '../util/errors.ts';
import { BlobType, type CodecKeys, ZERO_ID, decodeBlob, encodeBlob } from './codec.ts';
import { type PackEntry, entrySize, readEntry, writeEntry } from './pack.ts';

const MAGIC = Buffer.from('TIX1');
const MIN_ENTRY = 1 + 32 + 4 + 4 + 4;
/** Bounds decompression of an index file; far above what any writer produces (~8M blobs). */
export const MAX_INDEX_PLAINTEXT = 512 << 20;

export interface IndexedPack {
  packId: Buffer;
  entries: PackEntry[];
}

export interface IndexFileContent {
  supersedes: Buffer[];
  packs: IndexedPack[];
}

export function encodeIndexFile(keys: CodecKeys, content: IndexFileContent): { name: string; data: Buffer } {
  let size = 12 + content.supersedes.length * 32;
  for (const p of content.packs) size += 36 + p.entries.reduce((n, e) => n + entrySize(e), 0);
  const buf = Buffer.allocUnsafe(size);
  MAGIC.copy(buf, 0);
  buf.writeUInt32LE(content.packs.length, 4);
  buf.writeUInt32LE(content.supersedes.length, 8);
  let o = 12;
  for (const s of content.supersedes) o += s.copy(buf, o);
  for (const p of content.packs) {
    o += p.packId.copy(buf, o);
    buf.writeUInt32LE(p.entries.length, o);
    o += 4;
    for (const e of p.entries) o = writeEntry(buf, o, e);
  }
  const data = encodeBlob(keys, BlobType.indexFile, ZERO_ID, buf);
  return { name: `index/${createHash('sha256').update(data).digest('hex')}`, data };
}

export function indexFileId(name: string): Buffer | undefined {
  const m = /^index\/([0-9a-f]{64})$/.exec(name);
  return m ? Buffer.from(m[1], 'hex') : undefined;
}

/**
 * One pack's entries as they lie in an index file's plaintext: checked (types, lengths, no delta
 * naming itself), not yet made into objects. Loading the blob index reads them in place
 * (BlobIndex.addPackEntries): a repository's index holds every blob, and an object per entry cost
 * ~3.5 µs each, 0.25 s per 66 000 blobs at every backup's start.
 */
export interface IndexedPackView {
  packId: Buffer;
  /** Number of entries. */
  count: number;
  /** The index file's plaintext; the entries start at `at` (pack.ts entry layout). */
  plain: Buffer;
  at: number;
}

export function decodeIndexFile(keys: CodecKeys, name: string, stored: Buffer): IndexFileContent {
  const { supersedes, packs } = decodeIndexFileViews(keys, name, stored);
  return { supersedes, packs: packs.map((v) => ({ packId: v.packId, entries: viewEntries(v) })) };
}

/** The entries of a pack view as objects. */
export function viewEntries(v: IndexedPackView): PackEntry[] {
  const entries: PackEntry[] = [];
  const bad = (why: string): never => {
    throw new DamageError('damaged-index', `index entry of pack ${v.packId.toString('hex')} is damaged: ${why}`);
  };
  for (let j = 0, o = v.at; j < v.count; j++) {
    const { entry, next } = readEntry(v.plain, o, bad);
    entries.push(entry);
    o = next;
  }
  return entries;
}

/** Decodes and checks an index file, leaving each pack's entries in place (IndexedPackView). */
export function decodeIndexFileViews(keys: CodecKeys, name: string, stored: Buffer): { supersedes: Buffer[]; packs: IndexedPackView[] } {
  const bad = (why: string): never => {
    throw new DamageError('damaged-index', `index file ${name} is damaged: ${why}`, { context: { index: name } });
  };
  const expected = indexFileId(name);
  if (expected && !createHash('sha256').update(stored).digest().equals(expected)) bad('its content does not match its name (SHA-256)');
  const plain = decodeBlob(keys, BlobType.indexFile, ZERO_ID, stored, { maxLength: MAX_INDEX_PLAINTEXT }, () => ({ what: `index file ${name}`, context: { index: name } }));
  if (plain.length < 12 || !plain.subarray(0, 4).equals(MAGIC)) bad('bad magic');
  const packCount = plain.readUInt32LE(4);
  const supCount = plain.readUInt32LE(8);
  let o = 12;
  const need = (n: number) => {
    if (o + n > plain.length) bad(`truncated at byte ${o}`);
  };
  need(supCount * 32);
  const supersedes: Buffer[] = [];
  for (let i = 0; i < supCount; i++, o += 32) supersedes.push(Buffer.from(plain.subarray(o, o + 32)));
  const packs: IndexedPackView[] = [];
  for (let i = 0; i < packCount; i++) {
    need(36);
    const packId = Buffer.from(plain.subarray(o, o + 32));
    const n = plain.readUInt32LE(o + 32);
    o += 36;
    need(n * MIN_ENTRY);
    const at = o;
    for (let j = 0; j < n; j++) o = checkEntry(plain, o, bad);
    packs.push({ packId, count: n, plain, at });
  }
  if (o !== plain.length) bad(`${plain.length - o} trailing bytes`);
  return { supersedes, packs };
}

/** Checks the entry at `o` as readEntry would, without making it; returns the position after it. */
function checkEntry(plain: Buffer, o: number, bad: (why: string) => never): number {
  if (o + MIN_ENTRY > plain.length) bad(`truncated entry at byte ${o}`);
  const type = plain[o];
  if (type < BlobType.chunk || type > BlobType.deltaChunk) bad(`unknown blob type ${type}`);
  if (type !== BlobType.deltaChunk) return o + MIN_ENTRY;
  if (o + MIN_ENTRY + 32 > plain.length) bad(`truncated entry at byte ${o}`);
  if (plain.compare(plain, o + MIN_ENTRY, o + MIN_ENTRY + 32, o + 1, o + 33) === 0) {
    bad(`delta chunk ${plain.toString('hex', o + 1, o + 33)} names itself as its base`);
  }
  return o + MIN_ENTRY + 32;
}
