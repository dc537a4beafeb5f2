/**
 * A local copy of a repository's loaded blob index, so that a backup or restore does not read,
 * decrypt, check and hash every index file of the repository before its first chunk. Measured on
 * the live-VM benchmark's repository (44 index files, 65 785 blobs): loading from the files took
 * ~100 ms of CPU alone and ~250 ms inside an incremental backup (next to its codec workers
 * starting), and the backup could not start reading before it; the cache loads in a few ms.
 * The cost of the index files grows with the repository; the cache's with the blobs it holds.
 *
 * Why it is safe: an index file is immutable (its name is the SHA-256 of its bytes) and counts
 * for as long as it is listed and no listed file supersedes it (docs/repository-format.md §6). The
 * cache records which files its entries came from (`files`) and which listed files it skipped as
 * superseded (`skipped`). Repository.index uses it only while every one of `files` is still
 * listed and no file it has not seen supersedes one of them; the files listed since are then
 * read as usual and added. Anything else (a file gone, a new superseding file, damage records, a
 * damaged index file, a cache that does not authenticate) means a load from the files, as
 * without a cache. Which copy of a blob listed twice wins may differ from a load from the files;
 * §6 allows either. Verification, check and garbage collection always load from the files: they
 * must see the files' own damage.
 *
 * File: `<dir>/<config id>.idx`, mode 0600, written atomically (temporary file + rename), with
 * the index's arrays as they are in memory (BlobIndex.state), so loading is one read and one
 * decryption (~25 ms for the 65 785 blobs above, 8 MB). For an encrypted repository it is sealed with AES-256-GCM under
 * `name id("index-cache", <config id>)` (a key only the repository's key gives), for an
 * unencrypted one it carries a SHA-256 checksum. A file that fails either is ignored and
 * replaced. Caches of other repositories untouched for 30 days are removed when one is saved.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, stat, utimes } from 'node:fs/promises';
import { endianness } from 'node:os';
import { dirname, join } from 'node:path';
import { BlobIndex, type BlobIndexState } from './blob-index.ts';
import { nameId, type CodecKeys } from './codec.ts';
import { sweepDaily } from './snapshot-catalog.ts';

const MAGIC = Buffer.from('TRSXC001');
const FORMAT = 'tresor-index-cache';
const VERSION = 1;
const SEALED = 1;
const CHECKSUMMED = 0;
/** A cache in use gets its time refreshed when older than this, so other repositories' saves keep it. */
const TOUCH_AFTER_MS = 24 * 3600 * 1000;

/** What a cache holds: the index, and the index files it was made from. */
export interface CachedIndex {
  index: BlobIndex;
  /** Index files whose entries the index holds. */
  files: Set<string>;
  /** Listed index files left out as superseded when the index was made. */
  skipped: Set<string>;
}

interface Header {
  format: typeof FORMAT;
  version: typeof VERSION;
  repository: string;
  endianness: string;
  files: string[];
  skipped: string[];
  capacity: number;
  count: number;
  packs: number;
  baseRef: boolean;
  bases: number;
}

export function indexCachePath(dir: string, repositoryId: string): string {
  return join(dir, `${repositoryId}.idx`);
}

/** The cache of repository `repositoryId` in `dir`, or undefined when there is none or it is unusable. */
export async function readIndexCache(dir: string, repositoryId: string, keys: CodecKeys): Promise<CachedIndex | undefined> {
  const path = indexCachePath(dir, repositoryId);
  let file: Buffer;
  try {
    file = await readFile(path);
  } catch {
    return undefined;
  }
  try {
    const payload = openFile(file, repositoryId, keys);
    if (payload === undefined) return undefined;
    const cached = parsePayload(payload, repositoryId);
    const now = Date.now();
    if (cached !== undefined && now - (await stat(path)).mtimeMs > TOUCH_AFTER_MS) await utimes(path, now / 1000, now / 1000).catch(() => undefined);
    return cached;
  } catch {
    return undefined; // not a cache this code can use: replaced at the next save
  }
}

/**
 * Writes the cache; a failure only costs the next load its time. The index's state is taken
 * before this returns its promise (sealed or copied at once: the index may change while the file
 * is written), which costs one copy of the index in memory for as long as the write takes.
 */
export async function writeIndexCache(dir: string, repositoryId: string, keys: CodecKeys, cached: CachedIndex): Promise<void> {
  const path = indexCachePath(dir, repositoryId);
  const tmp = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    const file = sealFile(payloadParts(repositoryId, cached), repositoryId, keys);
    await mkdir(dirname(path), { recursive: true, mode: 0o700 });
    const fh = await open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(file); // (writes every piece whole, unlike one writev call)
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch {
    await rm(tmp, { force: true }).catch(() => undefined);
  }
  await sweepDaily(dir, path, '.idx').catch(() => undefined);
}

function additionalData(repositoryId: string, mode: number): Buffer {
  return Buffer.concat([MAGIC, Buffer.from([mode]), Buffer.from(repositoryId, 'utf8')]);
}

/** The file's pieces: the payload sealed (or checksummed and copied), in new buffers of their own. */
function sealFile(payload: Uint8Array[], repositoryId: string, keys: CodecKeys): Buffer[] {
  if (keys.master === undefined) {
    const sum = createHash('sha256').update(additionalData(repositoryId, CHECKSUMMED));
    for (const part of payload) sum.update(part);
    return [MAGIC, Buffer.from([CHECKSUMMED]), ...payload.map((part) => Buffer.from(part)), sum.digest()];
  }
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', nameId(keys, 'index-cache', repositoryId), nonce);
  cipher.setAAD(additionalData(repositoryId, SEALED));
  const sealed = payload.map((part) => cipher.update(part));
  return [MAGIC, Buffer.from([SEALED]), nonce, ...sealed, cipher.final(), cipher.getAuthTag()];
}

/** The payload of an authentic cache file of this repository, else undefined. */
function openFile(file: Buffer, repositoryId: string, keys: CodecKeys): Buffer | undefined {
  if (file.length < MAGIC.length + 1 + 32 || !file.subarray(0, MAGIC.length).equals(MAGIC)) return undefined;
  const mode = file[MAGIC.length];
  const body = file.subarray(MAGIC.length + 1);
  if (mode === CHECKSUMMED && keys.master === undefined) {
    const payload = body.subarray(0, body.length - 32);
    const sum = createHash('sha256').update(additionalData(repositoryId, CHECKSUMMED)).update(payload).digest();
    if (!timingSafeEqual(sum, body.subarray(body.length - 32))) return undefined;
    const out = Buffer.from(new ArrayBuffer(payload.length)); // aligned, for the arrays' views
    out.set(payload, 0);
    return out;
  }
  if (mode !== SEALED || keys.master === undefined) return undefined;
  const decipher = createDecipheriv('aes-256-gcm', nameId(keys, 'index-cache', repositoryId), body.subarray(0, 12));
  decipher.setAAD(additionalData(repositoryId, SEALED));
  decipher.setAuthTag(body.subarray(body.length - 16));
  const a = decipher.update(body.subarray(12, body.length - 16));
  const b = decipher.final(); // throws when the file is not authentic
  // The arrays are viewed in place, so the plaintext must start 8-aligned in a buffer of its own
  // (GCM's output is, in one piece).
  if (b.length === 0 && a.byteOffset % 8 === 0 && a.buffer instanceof ArrayBuffer) return a;
  const out = Buffer.from(new ArrayBuffer(a.length + b.length));
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/** Section sizes in payload order, each starting 8-aligned. */
function sections(h: Pick<Header, 'capacity' | 'packs' | 'baseRef' | 'bases'>): number[] {
  const cap = h.capacity;
  return [h.packs * 32, cap * 32, cap * 4, cap * 4, cap * 4, cap * 4, cap, h.baseRef ? cap * 4 : 0, h.bases * 32];
}

const align8 = (n: number): number => (n + 7) & ~7;

/** The payload as views of the header and of the index's arrays, with the padding between them. */
function payloadParts(repositoryId: string, cached: CachedIndex): Uint8Array[] {
  const s: BlobIndexState = cached.index.state();
  const header: Header = {
    format: FORMAT, version: VERSION, repository: repositoryId, endianness: endianness(),
    files: [...cached.files].sort(), skipped: [...cached.skipped].sort(),
    capacity: s.capacity, count: s.count, packs: s.packIds.length, baseRef: s.baseRef !== undefined, bases: s.bases.length / 8,
  };
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const length = Buffer.alloc(4);
  length.writeUInt32LE(json.length, 0);
  const parts: Uint8Array[] = [length, json, new Uint8Array(align8(4 + json.length) - 4 - json.length)];
  const sectionData = [Buffer.concat(s.packIds), bytesOf(s.ids), bytesOf(s.pack), bytesOf(s.offset), bytesOf(s.length), bytesOf(s.rawLength), s.type, s.baseRef ? bytesOf(s.baseRef) : new Uint8Array(0), bytesOf(s.bases)];
  const sizes = sections(header);
  sectionData.forEach((data, i) => {
    if (data.length !== sizes[i]) throw new Error(`bug: index cache section ${i} has ${data.length} bytes, not ${sizes[i]}`);
    parts.push(data, new Uint8Array(align8(data.length) - data.length));
  });
  return parts;
}

function parsePayload(payload: Buffer, repositoryId: string): CachedIndex | undefined {
  const jsonLength = payload.readUInt32LE(0);
  const header = JSON.parse(payload.toString('utf8', 4, 4 + jsonLength)) as Header;
  if (header.format !== FORMAT || header.version !== VERSION || header.repository !== repositoryId || header.endianness !== endianness()
    || !Array.isArray(header.files) || !Array.isArray(header.skipped)) return undefined;
  const sizes = sections(header);
  let at = align8(4 + jsonLength);
  if (at + sizes.reduce((n, len) => n + align8(len), 0) !== payload.length || payload.byteOffset % 8 !== 0) return undefined;
  const buffer = payload.buffer as ArrayBuffer; // openFile's own
  const take = (len: number): Uint8Array<ArrayBuffer> => {
    const view = new Uint8Array(buffer, payload.byteOffset + at, len);
    at += align8(len);
    return view;
  };
  const words = (len: number): Uint32Array<ArrayBuffer> => {
    const b = take(len);
    return new Uint32Array(buffer, b.byteOffset, len / 4);
  };
  const packBytes = take(sizes[0]);
  const packIds = Array.from({ length: header.packs }, (_, i) => Buffer.from(packBytes.subarray(i * 32, i * 32 + 32)));
  const ids = words(sizes[1]);
  const pack = words(sizes[2]);
  const offset = words(sizes[3]);
  const length = words(sizes[4]);
  const rawLength = words(sizes[5]);
  const type = take(sizes[6]);
  const baseRef = words(sizes[7]);
  const bases = words(sizes[8]);
  const state: BlobIndexState = {
    capacity: header.capacity, count: header.count, packIds, ids, pack, offset, length, rawLength, type, ...(header.baseRef ? { baseRef } : {}), bases,
  };
  return { index: BlobIndex.fromState(state), files: new Set(header.files), skipped: new Set(header.skipped) };
}

function bytesOf(a: Uint32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
