/**
 * Backs up one disk (any DiskSource) into the repository as a disk map.
 *
 * The disk is processed in batches of whole slots. For each batch the source's extents decide,
 * per slot, without reading: a hole (all zero extents), a copy of the parent's slot (all
 * `unchanged`), or a read. Runs of slots to read are read with one call each, hashed in a worker
 * (which also spots all-zero chunks), looked up in the blob index, and only new chunks are
 * compressed and encrypted (second worker round trip) and handed to the pack writer.
 * Several batches are in flight at once so reading, hashing, encoding and uploading overlap.
 *
 * With a parent, a chunk the source marks changed only in part (a dirty bitmap is 64 KiB, a chunk
 * larger) is encoded as a delta against the parent's chunk in that slot: the unchanged part costs
 * almost nothing to store (docs/repository-format.md §4). A base is a plain chunk, or in a
 * version-3 repository a delta chunk whose base is plain (two levels, never more). The unchanged
 * ends of a run of such slots are not even read from the source: its base holds them (runTrim).
 *
 * With compression dictionaries configured (§4), a compressible new chunk without a parent base
 * is a delta against the disk's current dictionary: a piece of a chunk of this disk that compressed well,
 * stored as a plain chunk of its own. A worker proposes one with its reply to an encode; a new
 * one is taken after every DICTIONARY_SPAN bytes read, as data near each other on a disk is alike.
 */
import { ZERO_ID, BlobType, type DeltaBase } from '../repo/codec.ts';
import { newBaseCache, readDeltaBases } from '../repo/blob-batch.ts';
import type { CodecPool, DictionaryProposal, HashedBatch } from '../repo/codec-pool.ts';
import { DiskMapReader, DiskMapWriter, slotCount } from '../repo/disk-map.ts';
import type { PackWriter } from '../repo/pack-writer.ts';
import type { Repository } from '../repo/repository.ts';
import type { DiskSource, Extent } from '../image/disk.ts';
import { TresorError } from '../util/errors.ts';
import { ByteBudget, allSettledOrThrow } from '../util/concurrency.ts';
import { copyBytes } from '../util/bytes.ts';
import { GarbageCollector, exposeGc } from '../util/gc.ts';

export interface DiskBackupStats {
  bytesRead: number;
  newChunks: number;
  reusedChunks: number;
  holeChunks: number;
  unchangedChunks: number;
  /** New chunks stored as deltas against the parent's chunk in their slot. */
  deltaChunks: number;
  /** New chunks stored as deltas against a compression dictionary. */
  dictionaryChunks: number;
  /** Compression dictionaries used (stored with their first delta, or already in the repository). */
  dictionaries: number;
  /** Unchanged bytes of partly changed slots taken from the parent's chunks instead of the source (runTrim). */
  trimmedBytes: number;
}

export function emptyDiskBackupStats(): DiskBackupStats {
  return { bytesRead: 0, newChunks: 0, reusedChunks: 0, holeChunks: 0, unchangedChunks: 0, deltaChunks: 0, dictionaryChunks: 0, dictionaries: 0, trimmedBytes: 0 };
}

export function addDiskBackupStats(into: DiskBackupStats, s: DiskBackupStats): void {
  for (const k of Object.keys(into) as Array<keyof DiskBackupStats>) into[k] += s[k];
}

/** "12 new chunks (2 as deltas, 7 against 1 dictionary)": for job logs. */
export function newChunksText(s: DiskBackupStats): string {
  const parts = [`${s.deltaChunks} as deltas`];
  if (s.dictionaryChunks > 0) parts.push(`${s.dictionaryChunks} against ${s.dictionaries} ${s.dictionaries === 1 ? 'dictionary' : 'dictionaries'}`);
  return `${s.newChunks} new chunks (${parts.join(', ')})`;
}

/** Bytes read between two compression dictionaries of one disk. */
const DICTIONARY_SPAN = 64 << 20;

export interface DiskBackupOptions {
  /** Parent disk map for `unchanged` extents (incremental). Must have the same size and chunk size. */
  parent?: DiskMapReader;
  /** Called with the number of disk bytes done so far. */
  progress?: (doneBytes: number) => void;
  signal?: AbortSignal;
  /** Batches' worth of data read and being encoded at once (default: one per worker + 2). */
  inFlight?: number;
  /** Bytes per batch (default 2 MiB, at least one chunk; codec-pool.ts sizes its output buffers for it). */
  batchBytes?: number;
  /** Bytes read between two compression dictionaries (default DICTIONARY_SPAN). */
  dictionarySpan?: number;
}

type SlotPlan = 'hole' | 'parent' | 'read';

/** Bytes at a run's start and end not read from the source (runTrim). */
interface RunTrim {
  head: number;
  tail: number;
}

const NO_TRIM: RunTrim = { head: 0, tail: 0 };

export async function backupDisk(
  repo: Repository, pool: CodecPool, writer: PackWriter, source: DiskSource, opts: DiskBackupOptions = {},
): Promise<{ map: DiskMapWriter; stats: DiskBackupStats }> {
  const chunkSize = repo.config.chunkSize;
  const parent = opts.parent;
  if (parent && (parent.disk.size !== source.size || parent.disk.chunkSize !== chunkSize)) {
    throw new TresorError('parent-mismatch', `the parent disk map (${parent.disk.size} bytes, chunk ${parent.disk.chunkSize}) does not fit ${source.description} (${source.size} bytes, chunk ${chunkSize})`, {
      hint: 'this is a bug: the engine must fall back to a full read when sizes differ',
    });
  }
  const index = await repo.index();
  const map = new DiskMapWriter(repo, writer, source.size, chunkSize, repo.config.pieceSlots, parent);
  const stats = emptyDiskBackupStats();
  // An incremental stores its new chunks at the repository's incremental level, if it sets one;
  // at level 0 (no compression) there are no deltas, so no base is read for them.
  const incrementalLevel = parent !== undefined ? repo.incrementalCompressionLevel : undefined;
  const deltas = parent !== undefined && repo.deltaChunks && incrementalLevel !== 0;
  const dictionaryBytes = incrementalLevel !== 0 ? repo.dictionaryBytes : undefined;
  // The disk's current dictionary; `blob` until the first delta against it stores it.
  let dictionary: (DeltaBase & { blob?: Buffer; used?: boolean }) | undefined;
  let readSinceDictionary = 0;
  const dictionarySpan = opts.dictionarySpan ?? DICTIONARY_SPAN;
  /** No dictionary yet, or a span read since the last one. */
  const wantsDictionary = (): boolean => dictionary === undefined || readSinceDictionary >= dictionarySpan;
  const slots = slotCount(source.size, chunkSize);
  const batchBytes = Math.max(chunkSize, opts.batchBytes ?? 2 << 20);
  const slotsPerBatch = Math.floor(batchBytes / chunkSize);
  const inFlight = opts.inFlight ?? pool.size + 2;
  // Memory is bounded by the bytes being read and encoded, not by batches: an incremental's
  // batches mostly read nothing or a chunk or two, and counting those as full batches would
  // leave the source (an NBD server with its own latency) with few requests in flight.
  const readBudget = new ByteBudget(inFlight * batchBytes);
  const batchesInFlight = Math.max(inFlight, 32);
  // The main thread turns over every byte read in small buffers (an NBD client's socket reads:
  // 64 KiB each, ~40 000 per 2.4 GiB), and V8 lets tens of MiB of them pile up dead before it
  // collects, which malloc keeps as resident memory. A scavenge every 8 MiB read (a fraction of a ms)
  // keeps that pile small. Measured on the 4 GiB corpus VM backup: peak RSS 290-311 → 251-253
  // MiB (unix socket), 311-337 → 253 MiB (TLS), same wall time.
  const collector = new GarbageCollector(exposeGc(), { everyBytes: 8 << 20, majorEvery: 0 });
  let done = 0;

  const processBatch = async (first: number, count: number): Promise<void> => {
    const { plans, partial, unchanged } = await planSlots(source, parent !== undefined, chunkSize, first, count);
    const reads: Array<Promise<void>> = [];
    for (let i = 0; i < count;) {
      const plan = plans[i];
      let j = i + 1;
      while (j < count && plans[j] === plan) j++;
      if (plan === 'hole') {
        for (let s = i; s < j; s++) map.set(first + s, ZERO_ID);
        stats.holeChunks += j - i;
      } else if (plan === 'parent') {
        await reuseParentSlots(first + i, j - i, reads);
      } else {
        const baseIds = deltas ? await parentBaseIds(first + i, partial.subarray(i, j)) : undefined;
        reads.push(readRun(first + i, j - i, baseIds, baseIds !== undefined ? runTrim(first + i, j - i, baseIds, unchanged) : NO_TRIM));
      }
      i = j;
    }
    await Promise.all(reads);
    done += Math.min(count * chunkSize, source.size - first * chunkSize);
    opts.progress?.(done);
  };

  // A parent's chunk is reused only while it may be: not condemned by a pending garbage
  // collection, not recorded as damaged, still in the index. Otherwise the slot is read again.
  const reuseParentSlots = async (firstSlot: number, count: number, reads: Array<Promise<void>>): Promise<void> => {
    // Piece by piece, slot by slot without awaiting each: an incremental passes every slot of
    // the disk through here (32 768 per 4 GiB), and a promise per slot cost more than the rest.
    // Reusable slots go to the map a run at a time (copyFromParent), so that a piece taken from
    // the parent whole is recognised as such and not stored again.
    const pieceSlots = parent!.disk.pieceSlots;
    const end = firstSlot + count;
    let rereadFrom = -1;
    for (let s = firstSlot; s < end;) {
      const p = Math.floor(s / pieceSlots);
      const ids = await parent!.piece(p);
      const pieceStart = p * pieceSlots;
      let copyFrom = s;
      const copy = (to: number): void => {
        if (to > copyFrom) map.copyFromParent(copyFrom, ids.subarray((copyFrom - pieceStart) * 32, (to - pieceStart) * 32));
      };
      for (const pieceEnd = Math.min(end, pieceStart + pieceSlots); s < pieceEnd; s++) {
        const id = ids.subarray((s - pieceStart) * 32, (s - pieceStart) * 32 + 32);
        if (ZERO_ID.equals(id) || (index.has(id) && !repo.avoids(id))) {
          stats.unchangedChunks++;
          if (rereadFrom >= 0) {
            reads.push(readRun(rereadFrom, s - rereadFrom));
            rereadFrom = -1;
            copyFrom = s;
          }
        } else if (rereadFrom < 0) {
          copy(s);
          rereadFrom = s;
        }
      }
      if (rereadFrom < 0) copy(s);
    }
    if (rereadFrom >= 0) reads.push(readRun(rereadFrom, end - rereadFrom));
  };

  /**
   * `baseIds`: per slot of the run, the parent's chunk to make a delta against, if any
   * (parentBaseIds); `trim`: unchanged bytes at its ends that those chunks hold (runTrim).
   */
  const readRun = async (firstSlot: number, count: number, baseIds?: Array<Buffer | null>, trim: RunTrim = NO_TRIM): Promise<void> => {
    const offset = firstSlot * chunkSize;
    const length = Math.min(count * chunkSize, source.size - offset);
    await readBudget.acquire(length);
    try {
      await readAndStore(firstSlot, count, offset, length, baseIds, trim);
    } finally {
      readBudget.release(length);
    }
  };

  /**
   * Unchanged bytes at the start of a run's first slot and at the end of its last slot that need
   * not come from the source: the parent's chunk in that slot holds them, and it is read for the
   * slot's delta anyway. Reading them costs a fifth more of an incremental's reads (2 % rewrite
   * of the reference disk: 98.5 MiB read for 81.9 MiB dirty; the dirty bitmap's clusters are
   * half a chunk). The dirty bitmap vouches for them exactly as it does for a slot left wholly
   * unchanged, whose chunk is taken from the parent as is.
   */
  const runTrim = (firstSlot: number, count: number, baseIds: Array<Buffer | null>, unchanged: UnchangedRanges): RunTrim => {
    const start = firstSlot * chunkSize;
    const end = Math.min(source.size, (firstSlot + count) * chunkSize);
    const lastStart = (firstSlot + count - 1) * chunkSize;
    const head = baseIds[0] ? unchanged.after(start, Math.min(start + chunkSize, end)) : 0;
    const tail = baseIds[count - 1] ? unchanged.before(end, lastStart) : 0;
    // A slot changed only in its middle, with both ends trimmed, still has bytes to read.
    return head + tail < end - start ? { head, tail } : NO_TRIM;
  };

  /** Reads source bytes [from, to) of a batch at `offset` into the same place of `target`. */
  const readRange = async (offset: number, target: Buffer, from: number, to: number): Promise<void> => {
    if (source.readTo !== undefined) await source.readTo(offset + from, to - from, target.subarray(from, to));
    else copyBytes(target, from, await source.read(offset + from, to - from));
    stats.bytesRead += to - from;
  };

  /**
   * A run's bytes with its trimmed ends taken from their slots' bases (`read`: the bases
   * being read, readDeltaBases), the rest from the source. An end whose base cannot be read
   * or has another length is read from the source after all.
   */
  const readTrimmed = async (firstSlot: number, count: number, offset: number, length: number, trim: RunTrim, baseIds: Array<Buffer | null>, bases: Promise<Map<string, DeltaBase | Error>>): Promise<Buffer> => {
    const target = source.readTo !== undefined ? pool.batchBuffer(length) : Buffer.allocUnsafe(length);
    try {
      // Neither may still be writing into the target when a failure gives it back.
      const middle = readRange(offset, target, trim.head, length - trim.tail);
      await allSettledOrThrow([middle, bases]);
      const read = await bases;
      const fromBase = async (k: number, from: number, to: number, baseFrom: number): Promise<void> => {
        const id = baseIds[k];
        const base = id ? read.get(id.toString('hex')) : undefined;
        if (base === undefined || base instanceof Error || base.plain.length !== slotLength(firstSlot + k)) {
          await readRange(offset, target, from, to);
          return;
        }
        copyBytes(target, from, base.plain.subarray(baseFrom, baseFrom + to - from));
        stats.trimmedBytes += to - from;
      };
      const lastLength = slotLength(firstSlot + count - 1);
      await allSettledOrThrow([
        trim.head > 0 ? fromBase(0, 0, trim.head, 0) : Promise.resolve(),
        trim.tail > 0 ? fromBase(count - 1, length - trim.tail, length, lastLength - trim.tail) : Promise.resolve(),
      ]);
      return target;
    } catch (err) {
      if (source.readTo !== undefined) pool.discardBatchBuffer(target);
      throw err;
    }
  };

  // Into the codec pool's shared arena, where the source can (codec-pool.ts batchBuffer).
  const readBatch = async (offset: number, length: number): Promise<Buffer> => {
    if (source.readTo === undefined) return source.read(offset, length);
    const target = pool.batchBuffer(length);
    try {
      await source.readTo(offset, length, target);
    } catch (err) {
      pool.discardBatchBuffer(target);
      throw err;
    }
    return target;
  };

  /**
   * Per slot of a run: the parent's chunk in the same slot where the source changed the slot only
   * in part (`partial`, a delta candidate) and that chunk may serve as a base (usableBase below);
   * undefined when no slot has one. Taken when the run is planned, while the parent's piece is
   * at hand: the run may wait for its read until the parent map's cache has moved far past it.
   */
  const parentBaseIds = async (firstSlot: number, partial: Uint8Array): Promise<Array<Buffer | null> | undefined> => {
    if (!partial.includes(1)) return undefined;
    const ids: Array<Buffer | null> = [];
    for (let k = 0; k < partial.length; k++) {
      let base: Buffer | null = null;
      if (partial[k] === 1) {
        const slot = firstSlot + k;
        const p = Math.floor(slot / parent!.disk.pieceSlots);
        const at = (slot - p * parent!.disk.pieceSlots) * 32;
        const id = (await parent!.piece(p)).subarray(at, at + 32);
        // (A chunk as long as a dictionary is never a delta: dictionaries are plain chunks.)
        if (!ZERO_ID.equals(id) && usableBase(id) && slotLength(slot) !== dictionaryBytes) base = Buffer.from(id);
      }
      ids.push(base);
    }
    return ids.some((b) => b !== null) ? ids : undefined;
  };

  // Bases read once: the bases of two-level deltas (mostly the disk's dictionary) serve many runs.
  const baseCache = newBaseCache();
  const readBases = (ids: Array<Buffer | null>): Promise<Map<string, DeltaBase | Error>> =>
    readDeltaBases(repo, ids.filter((b): b is Buffer => b !== null), (id) => `chunk ${id.toString('hex')} of the parent snapshot`, { trustAead: true, cache: baseCache });

  /**
   * Bases for the new chunks `which` (batch positions) from the run's `baseIds`: the plaintext,
   * or null where there is none or it cannot be read (the chunk is then stored whole; a damaged
   * parent chunk is verify's to report).
   */
  const deltaBases = async (which: number[], baseIds: Array<Buffer | null>, early?: Promise<Map<string, DeltaBase | Error>>): Promise<Array<DeltaBase | null> | undefined> => {
    const wanted = which.map((k) => baseIds[k] ?? null);
    if (wanted.every((b) => b === null)) return undefined;
    const read = await (early ?? readBases(wanted));
    return wanted.map((b) => {
      const got = b === null ? undefined : read.get(b.toString('hex'));
      return got === undefined || got instanceof Error ? null : got;
    });
  };

  /**
   * A parent chunk a delta may be made against: a plain chunk, or (version 3) a delta chunk
   * whose base is a plain chunk, such as a chunk compressed against a dictionary; never deeper.
   * Like a reused chunk, neither may be condemned or damaged.
   */
  const usableBase = (id: Uint8Array): boolean => {
    const loc = index.get(id);
    if (loc === undefined || repo.avoids(id)) return false;
    if (loc.type === BlobType.chunk) return true;
    return repo.twoLevelDeltas && loc.type === BlobType.deltaChunk && loc.base !== undefined
      && index.get(loc.base)?.type === BlobType.chunk && !repo.avoids(loc.base);
  };

  const readAndStore = async (firstSlot: number, count: number, offset: number, length: number, baseIds: Array<Buffer | null> | undefined, trim: RunTrim): Promise<void> => {
    // A trimmed run needs its ends' bases before it can be hashed: they are read at once, while
    // the source is read; other runs read bases only for the chunks that turn out new.
    const trimmed = baseIds !== undefined && (trim.head > 0 || trim.tail > 0);
    const early = trimmed ? readBases(baseIds) : undefined;
    early?.catch(() => undefined); // awaited below; a failed source read drops it
    let data: Buffer;
    if (trimmed) {
      data = await readTrimmed(firstSlot, count, offset, length, trim, baseIds, early!);
    } else {
      data = await readBatch(offset, length);
      stats.bytesRead += length;
    }
    collector.note(length);
    const hashed: HashedBatch = await pool.hash(data, chunkSize);
    const encodeWhich: number[] = [];
    for (let k = 0; k < count; k++) {
      const id = hashed.ids.subarray(k * 32, k * 32 + 32);
      if (ZERO_ID.equals(id)) {
        stats.holeChunks++;
      } else if ((index.has(id) && !repo.avoids(id)) || !writer.claim(Buffer.from(id))) {
        stats.reusedChunks++;
      } else {
        encodeWhich.push(k);
      }
      map.set(firstSlot + k, id);
    }
    let bases: Array<DeltaBase | null> | undefined;
    try {
      bases = baseIds !== undefined && encodeWhich.length > 0 ? await deltaBases(encodeWhich, baseIds, early) : undefined;
    } catch (err) {
      await pool.drop(hashed).catch(() => undefined); // the error that matters is `err`
      throw err;
    }
    const dict = dictionary;
    readSinceDictionary += length;
    const propose = dictionaryBytes !== undefined && encodeWhich.length > 0 && wantsDictionary() ? dictionaryBytes : undefined;
    const { blobs, types, proposal, release } = await pool.encode(hashed, encodeWhich, BlobType.chunk, { bases, level: incrementalLevel, dictionary: dict, propose });
    try {
      if (proposal !== undefined && wantsDictionary()) takeDictionary(proposal);
      for (let n = 0; n < blobs.length; n++) {
        const k = encodeWhich[n];
        const id = Buffer.from(hashed.ids.subarray(k * 32, k * 32 + 32));
        // A chunk given a base is a delta against it or plain; any other delta is the dictionary's.
        const base = types[n] !== BlobType.deltaChunk ? undefined : bases?.[n] ?? dict;
        if (types[n] === BlobType.deltaChunk && base === undefined) throw new Error(`bug: delta chunk ${id.toString('hex')} without a base`);
        if (base !== undefined && base === dict) await storeDictionary(dict);
        await writer.add(types[n], id, blobs[n], slotLength(firstSlot + k), base !== undefined ? Buffer.from(base.id) : undefined);
        stats.newChunks++;
        if (base === undefined) continue;
        if (base === dict) stats.dictionaryChunks++;
        else stats.deltaChunks++;
      }
    } finally {
      release();
    }
  };

  const slotLength = (slot: number): number => Math.min(chunkSize, source.size - slot * chunkSize);

  /**
   * Makes a worker's proposal the disk's dictionary: a plain chunk that is already in the
   * repository (and may be used, like any reused chunk), or is stored with the first delta made
   * against it (so an incremental whose last new chunk brought it stores none that is unused).
   */
  const takeDictionary = (p: DictionaryProposal): void => {
    const known = index.get(p.id);
    if (known !== undefined && (known.type !== BlobType.chunk || repo.avoids(p.id))) return;
    dictionary = { id: p.id, plain: p.plain, ...(known === undefined ? { blob: p.blob } : {}) };
    readSinceDictionary = 0;
  };

  /**
   * Before the first delta against `dict` is written. When another path of this session claimed
   * the same id, it stores these bytes as a plain chunk too: only a chunk as long as a dictionary
   * could have them, and such a chunk is never a delta (codec.ts encodeChunk, deltaBases).
   */
  const storeDictionary = async (dict: DeltaBase & { blob?: Buffer; used?: boolean }): Promise<void> => {
    if (dict.used) return;
    dict.used = true;
    stats.dictionaries++;
    if (dict.blob !== undefined && writer.claim(Buffer.from(dict.id))) await writer.add(BlobType.chunk, Buffer.from(dict.id), dict.blob, dict.plain.length);
  };

  const running = new Set<Promise<void>>();
  let failure: unknown;
  for (let first = 0; first < slots && failure === undefined; first += slotsPerBatch) {
    if (opts.signal?.aborted) throw opts.signal.reason ?? new TresorError('aborted', 'backup cancelled');
    const p: Promise<void> = processBatch(first, Math.min(slotsPerBatch, slots - first))
      .catch((err) => { failure ??= err; })
      .finally(() => running.delete(p));
    running.add(p);
    if (running.size >= batchesInFlight) await Promise.race(running);
  }
  await Promise.all(running);
  if (failure !== undefined) throw failure;
  return { map, stats };
}

/**
 * Decides per slot of [first, first+count) whether it is a hole, a parent copy, or a read; and
 * which reads are partial (with a parent: changed data or zeros next to unchanged data in one slot).
 */
async function planSlots(source: DiskSource, hasParent: boolean, chunkSize: number, first: number, count: number): Promise<{ plans: SlotPlan[]; partial: Uint8Array; unchanged: UnchangedRanges }> {
  const start = first * chunkSize;
  const end = Math.min(source.size, (first + count) * chunkSize);
  // Per slot: bit 1 = has data, bit 2 = has zero, bit 4 = has unchanged.
  const kinds = new Uint8Array(count);
  const unchanged = new UnchangedRanges();
  for await (const e of source.extents(start, end - start)) {
    markExtent(kinds, e, start, chunkSize, end);
    if (e.kind === 'unchanged') unchanged.add(Math.max(e.offset, start), Math.min(e.offset + e.length, end));
  }
  const plans = new Array<SlotPlan>(count);
  const partial = new Uint8Array(count);
  for (let i = 0; i < count; i++) {
    const k = kinds[i];
    // Changed (data, or zeros where the guest discarded) next to unchanged: a delta candidate.
    if (hasParent && (k & 4) !== 0 && (k & 3) !== 0) partial[i] = 1;
    if (k === 2) plans[i] = 'hole';
    else if (k === 4 && hasParent) plans[i] = 'parent';
    else if (k === 0) throw new TresorError('extent-gap', `${source.description}: extents do not cover bytes at ${start + i * chunkSize}`, { hint: 'this is a bug in the disk reader' });
    else plans[i] = 'read';
  }
  return { plans, partial, unchanged };
}

/** The unchanged byte ranges of a batch (extents arrive in order; touching ones merge). */
class UnchangedRanges {
  readonly #ranges: Array<[number, number]> = [];

  add(from: number, to: number): void {
    if (to <= from) return;
    const last = this.#ranges.at(-1);
    if (last !== undefined && from <= last[1]) last[1] = Math.max(last[1], to);
    else this.#ranges.push([from, to]);
  }

  /** Unchanged bytes from `at` forward, up to `limit`. */
  after(at: number, limit: number): number {
    const r = this.#ranges.find(([a, b]) => a <= at && at < b);
    return r === undefined ? 0 : Math.min(r[1], limit) - at;
  }

  /** Unchanged bytes before `at` backward, down to `limit`. */
  before(at: number, limit: number): number {
    const r = this.#ranges.find(([a, b]) => a < at && at <= b);
    return r === undefined ? 0 : at - Math.max(r[0], limit);
  }
}

function markExtent(kinds: Uint8Array, e: Extent, start: number, chunkSize: number, end: number): void {
  const bit = e.kind === 'data' ? 1 : e.kind === 'zero' ? 2 : 4;
  const a = Math.max(e.offset, start);
  const b = Math.min(e.offset + e.length, end);
  if (b <= a) return;
  const s0 = Math.floor((a - start) / chunkSize);
  const s1 = Math.floor((b - 1 - start) / chunkSize);
  for (let s = s0; s <= s1; s++) kinds[s] |= bit;
}
