/**
 * `tresor sync --to REPO`: copies snapshots into a second repository (an off-site copy), which may
 * be on another backend and have other keys (docs/repository-format.md §Sync).
 *
 * Blob ids are keyed per repository (HMAC with each repository's id key), so a chunk's id in the
 * target is computed from its plaintext: a chunk whose target id the target already has is never
 * sent. The pairs (source id → target id) learnt are kept in the target (`sync/<source repository
 * id>/…`, with the names of the snapshots copied), so the next sync knows without reading the
 * source chunk again. Index pieces are rebuilt with target ids; the manifest is the source's with
 * the new piece lists (and `syncedFrom`).
 *
 * Crash safety and resumption: per snapshot, packs → index file → manifest, like a backup. A
 * killed sync leaves packs that no index names; the next sync indexes them from their headers
 * (packs are self-describing) before it starts, so what arrived is not sent again.
 *
 * Retention is the target's own: a snapshot pruned there is not copied again (the sync state
 * remembers it), and the target's GC works as on any repository. Chunk sizes must match: a chunk
 * is copied as it is, never re-cut.
 */
import { randomBytes } from 'node:crypto';
import { TresorError, UsageError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';
import { credentialAccess } from './access.ts';
import { type BlobLocation, entryLocation } from './blob-index.ts';
import { BLOB_TYPE_NAMES, BlobType, type DeltaBase, ZERO_ID } from './codec.ts';
import { deltaBasesOf } from './blob-batch.ts';
import { type CodecPool, transferable } from './codec-pool.ts';
import { releaseBuffer } from '../util/bytes.ts';
import { DiskMapReader, diskMapDigest, storeMapBlob, storeMapNodes, unitPieces } from './disk-map.ts';
import { readPlans } from './gc-plan.ts';
import { IdMap } from './id-set.ts';
import { type DiskRecord, MANIFEST_VERSION, type SnapshotManifest } from './manifest.ts';
import { decodeMetaObject, encodeMetaObject, nameTime } from './meta-object.ts';
import { packIdFromName, packName, readPackHeader } from './pack.ts';
import { PackWriter } from './pack-writer.ts';
import type { Repository } from './repository.ts';

export interface SyncOptions {
  /** Backup ids to copy (default: all). */
  ids?: string[];
  /** Codec pool with the source's keys (decoding). */
  sourcePool: CodecPool;
  /** Codec pool with the target's keys (hashing and encoding). */
  targetPool: CodecPool;
  progress?: (snapshot: string, doneBytes: number, totalBytes: number) => void;
  signal?: AbortSignal;
}

export interface SyncReport {
  source: string;
  target: string;
  copied: string[];
  /** Already in the target, or copied before and pruned there since. */
  skipped: string[];
  chunksSent: number;
  bytesSent: number;
  chunksAlreadyThere: number;
  /** Packs of an interrupted sync found in the target and indexed. */
  adoptedPacks: number;
  durationMs: number;
}

const STATE_MAGIC = Buffer.from('TSY1');
const STATE_NAME = /^sync\/([0-9a-f]{32})\/\d{8}T\d{9}Z-[0-9a-f]{16}$/;
/** Sync state objects above this count are merged into one (full-access targets only). */
const MERGE_STATE_ABOVE = 16;

export class ChunkSizeMismatchError extends TresorError {
  constructor(source: number, target: number, location: string) {
    super('chunk-size-mismatch', `the target repository at ${location} cuts disks into ${target}-byte chunks, the source into ${source}-byte chunks; sync copies chunks as they are`, {
      hint: `create the target with the same chunk size: \`tresor repo init --chunk-size ${source}\``,
      context: { sourceChunkSize: source, targetChunkSize: target, target: location },
    });
  }
}

interface SyncState {
  map: IdMap;
  synced: Set<string>;
  objects: string[];
}

function stateName(sourceId: string): string {
  return `sync/${sourceId}/${nameTime(new Date())}-${randomBytes(8).toString('hex')}`;
}

function encodeState(snapshots: string[], pairs: Array<[Buffer, Buffer]>, sourceId: string): Buffer {
  const json = Buffer.from(JSON.stringify({ format: 'tresor-sync-state', version: 1, source: sourceId, time: new Date().toISOString(), snapshots }));
  const buf = Buffer.allocUnsafe(4 + 4 + json.length + 4 + pairs.length * 64);
  let o = STATE_MAGIC.copy(buf, 0);
  o = buf.writeUInt32LE(json.length, o);
  o += json.copy(buf, o);
  o = buf.writeUInt32LE(pairs.length, o);
  for (const [a, b] of pairs) {
    o += a.copy(buf, o);
    o += b.copy(buf, o);
  }
  return buf;
}

function decodeState(plain: Buffer, into: SyncState): void {
  if (plain.length < 12 || !plain.subarray(0, 4).equals(STATE_MAGIC)) throw new Error('bad magic');
  const jl = plain.readUInt32LE(4);
  if (8 + jl + 4 > plain.length) throw new Error('truncated');
  const doc = JSON.parse(plain.subarray(8, 8 + jl).toString('utf8')) as { snapshots?: unknown };
  if (!Array.isArray(doc.snapshots)) throw new Error('no snapshot list');
  for (const s of doc.snapshots) if (typeof s === 'string') into.synced.add(s);
  let o = 8 + jl;
  const n = plain.readUInt32LE(o);
  o += 4;
  if (o + n * 64 !== plain.length) throw new Error('wrong length');
  for (let i = 0; i < n; i++, o += 64) into.map.set(plain.subarray(o, o + 32), plain.subarray(o + 32, o + 64));
}

async function loadState(target: Repository, sourceId: string): Promise<SyncState> {
  const state: SyncState = { map: new IdMap(), synced: new Set(), objects: [] };
  for await (const b of target.store.list(`sync/${sourceId}/`)) if (STATE_NAME.test(b.name)) state.objects.push(b.name);
  for (const name of state.objects) {
    try {
      decodeState(decodeMetaObject(target.keys, name, await target.store.read(name), 1 << 30), state);
    } catch (err) {
      // A damaged or vanished state object only costs re-reading source chunks: ignore it.
      if ((err as TresorError).code === 'blob-not-found') continue;
    }
  }
  return state;
}

async function saveState(target: Repository, sourceId: string, snapshots: string[], pairs: Array<[Buffer, Buffer]>): Promise<string> {
  const name = stateName(sourceId);
  await target.store.create(name, encodeMetaObject(target.keys, name, encodeState(snapshots, pairs, sourceId)));
  return name;
}

/**
 * Indexes packs that no index names (left by an interrupted sync or backup), except packs a
 * pending garbage collection has scheduled: their blobs become reusable at once.
 */
async function adoptUnindexedPacks(target: Repository): Promise<number> {
  const index = await target.index();
  const known = new Set(index.packIds().map((p) => p.toString('hex')));
  const { plans } = await readPlans(target.store, target.keys);
  const scheduled = new Set(plans.flatMap((p) => [...p.header.unindexedPacks, ...p.header.deletePacks, ...p.header.repackedPacks]));
  const orphans: Array<{ name: string; size: number }> = [];
  for await (const b of target.store.list('data/')) {
    const id = packIdFromName(b.name);
    if (id && !known.has(id.toString('hex')) && !scheduled.has(id.toString('hex'))) orphans.push(b);
  }
  const packs = (await mapLimit(orphans, 8, async (b) => {
    try {
      return { packId: packIdFromName(b.name)!, entries: await readPackHeader(target.keys, b.name, b.size, (o, l) => target.store.read(b.name, { offset: o, length: l })) };
    } catch {
      return undefined; // unreadable header: not ours to judge here (`tresor check` reports it)
    }
  })).filter((p) => p !== undefined);
  if (packs.length === 0) return 0;
  await target.writeIndexFile(packs);
  for (const p of packs) for (const e of p.entries) index.add(e.id, entryLocation(p.packId, e));
  return packs.length;
}

export async function syncRepositories(source: Repository, target: Repository, opts: SyncOptions): Promise<SyncReport> {
  const started = Date.now();
  if (source.config.id === target.config.id) {
    throw new UsageError(`the source and the target are the same repository (${source.config.id})`, 'give another repository with --to');
  }
  if (source.config.chunkSize !== target.config.chunkSize) throw new ChunkSizeMismatchError(source.config.chunkSize, target.config.chunkSize, target.store.location);
  const report: SyncReport = {
    source: source.store.location, target: target.store.location, copied: [], skipped: [],
    chunksSent: 0, bytesSent: 0, chunksAlreadyThere: 0, adoptedPacks: 0, durationMs: 0,
  };
  const sourceLock = await source.lock('shared', `sync to ${target.config.id}`);
  try {
    const targetLock = await target.lock('shared', `sync from ${source.config.id}`);
    try {
      // Both indexes are loaded after the locks exist (garbage collection relies on it).
      source.invalidateIndex();
      target.invalidateIndex();
      await Promise.all([source.index(), target.index()]);
      report.adoptedPacks = await adoptUnindexedPacks(target);
      const state = await loadState(target, source.config.id);
      const there = new Set((await target.listSnapshots()).snapshots.map((m) => m.name));
      const wanted = opts.ids && opts.ids.length > 0 ? new Set(opts.ids) : undefined;
      const { snapshots } = await source.listSnapshots();
      for (const m of snapshots) {
        if (wanted && !wanted.has(m.id)) continue;
        if (there.has(m.name) || state.synced.has(m.name)) {
          report.skipped.push(m.name);
          continue;
        }
        if (opts.signal?.aborted) throw opts.signal.reason ?? new TresorError('interrupted', 'sync interrupted');
        const pairs = await copySnapshot(source, target, m, state.map, opts, report);
        await saveState(target, source.config.id, [m.name], pairs);
        report.copied.push(m.name);
      }
      if (state.objects.length > MERGE_STATE_ABOVE && (await credentialAccess(target)) === 'full') {
        await saveState(target, source.config.id, [...state.synced, ...report.copied], [...state.map.entries()]);
        await mapLimit(state.objects, 8, (n) => target.store.delete(n));
      }
    } finally {
      await targetLock.release();
    }
  } finally {
    await sourceLock.release();
  }
  report.durationMs = Date.now() - started;
  return report;
}

/** Copies one snapshot; returns the id pairs it learnt. */
async function copySnapshot(
  source: Repository, target: Repository, m: SnapshotManifest, map: IdMap, opts: SyncOptions, report: SyncReport,
): Promise<Array<[Buffer, Buffer]>> {
  const writer = new PackWriter(target);
  // Target ids of delta bases this copy sent as plain chunks (pending in `writer`, not yet indexed).
  const sentBases = new Set<string>();
  const learnt: Array<[Buffer, Buffer]> = [];
  const disks: DiskRecord[] = [];
  const total = m.disks.reduce((n, d) => n + d.size, 0);
  let done = 0;
  for (const disk of m.disks) {
    if (disk.chunkSize !== target.config.chunkSize) throw new ChunkSizeMismatchError(disk.chunkSize, target.config.chunkSize, target.store.location);
    const perUnit = unitPieces(disk.pieceSlots);
    const reader = await DiskMapReader.open(source, m.name, disk, { readAhead: 2 * perUnit });
    const pieces = new Array<string>(reader.pieceCount());
    const units = Array.from({ length: Math.ceil(pieces.length / perUnit) }, (_, u) => u);
    await mapLimit(units, 2, async (u) => {
      if (opts.signal?.aborted) throw opts.signal.reason ?? new TresorError('interrupted', 'sync interrupted');
      const first = u * perUnit;
      const count = Math.min(perUnit, pieces.length - first);
      const ids = await copyPieces(source, target, reader, first, count, map, writer, sentBases, opts, report, learnt);
      ids.forEach((id, k) => (pieces[first + k] = id));
      done += Math.min(count * disk.pieceSlots * disk.chunkSize, disk.size - first * disk.pieceSlots * disk.chunkSize);
      opts.progress?.(m.name, done, total);
    });
    const { pieces: _sourceList, ...rest } = disk;
    disks.push({ ...rest, ...(await storeMapNodes(target, writer, pieces)), digest: diskMapDigest(pieces) });
  }
  await writer.commitIndex();
  report.bytesSent += writer.stats.bytes;
  const copy = { ...m, version: MANIFEST_VERSION, disks, syncedFrom: { repository: source.config.id, time: new Date().toISOString() } } as SnapshotManifest;
  await target.commitSnapshot(copy); // false = someone else copied it meanwhile: the same snapshot
  return learnt;
}

/**
 * Rebuilds pieces [first, first + count) with target ids, sending the chunks the target lacks;
 * returns their target ids.
 */
async function copyPieces(
  source: Repository, target: Repository, reader: DiskMapReader, first: number, count: number, map: IdMap, writer: PackWriter,
  sentBases: Set<string>, opts: SyncOptions, report: SyncReport, learnt: Array<[Buffer, Buffer]>,
): Promise<string[]> {
  const targetIndex = await target.index();
  const usable = (id: Uint8Array) => (targetIndex.has(id) && !target.avoids(id)) || writer.isPending(Buffer.from(id));
  const per = reader.disk.pieceSlots;
  const firstSlot = first * per;
  const src = await reader.ids(firstSlot, Math.min(count * per, reader.slots - firstSlot));
  const out = Buffer.alloc(src.length);
  const todo = new Map<string, { id: Buffer; slots: number[] }>();
  for (let k = 0; k < src.length; k += 32) {
    const id = src.subarray(k, k + 32);
    if (ZERO_ID.equals(id)) continue;
    const known = map.get(id);
    if (known && usable(known)) {
      known.copy(out, k);
      report.chunksAlreadyThere++;
      continue;
    }
    const hex = id.toString('hex');
    let t = todo.get(hex);
    if (!t) todo.set(hex, (t = { id: Buffer.from(id), slots: [] }));
    t.slots.push(k);
  }
  if (todo.size > 0) {
    const sourceIndex = await source.index();
    const wanted = [...todo.values()].map((t) => ({ ...t, loc: sourceIndex.get(t.id) }));
    const missing = wanted.find((w) => !w.loc);
    if (missing) await source.locate(missing.id, () => `chunk ${missing.id.toString('hex')} of snapshot ${reader.snapshot}`); // throws
    for (const group of groupByPack(wanted as Array<{ id: Buffer; slots: number[]; loc: BlobLocation }>)) {
      const { plains, bases } = await readChunks(source, opts.sourcePool, group, reader.snapshot);
      // A delta travels as a delta when its base is in the target as a plain chunk (or, version 3,
      // as a delta chunk against a plain chunk). A base that deltas of this group share (a
      // compression dictionary) is sent first, as a plain chunk.
      const plainInTarget = (tid: Buffer | undefined) => tid !== undefined
        && ((targetIndex.get(tid)?.type === BlobType.chunk && !target.avoids(tid)) || sentBases.has(tid.toString('hex')));
      const baseInTarget = (tid: Buffer | undefined): boolean => {
        if (plainInTarget(tid)) return true;
        const loc = tid === undefined ? undefined : targetIndex.get(tid);
        return target.twoLevelDeltas && loc?.type === BlobType.deltaChunk && !target.avoids(tid!) && plainInTarget(loc.base);
      };
      if (target.deltaChunks) await sendSharedBases(target, opts.targetPool, writer, bases, plainInTarget, map, sentBases, usable, report, learnt);
      const targetBases = bases.map((b) => {
        const tid = b === undefined || !target.deltaChunks ? undefined : map.get(b.id);
        return baseInTarget(tid) ? { id: tid!, plain: b!.plain } : null;
      });
      // A chunk as long as the target's dictionaries is never a delta there (§4).
      plains.forEach((pl, i) => { if (pl.length === target.dictionaryBytes) targetBases[i] = null; });
      const targetIds = await sendChunks(target, opts.targetPool, writer, plains, targetBases, usable, report);
      group.forEach((w, i) => {
        const tid = targetIds[i];
        for (const k of w.slots) tid.copy(out, k);
        map.set(w.id, tid);
        learnt.push([w.id, tid]);
      });
    }
  }
  const ids: string[] = [];
  for (let k = 0; k < count; k++) {
    const piece = out.subarray(k * per * 32, Math.min(out.length, (k + 1) * per * 32));
    ids.push((await storeMapBlob(target, writer, BlobType.indexPiece, piece)).toString('hex'));
  }
  return ids;
}

/**
 * Sends the bases the target lacks that two or more of `bases` share, or that are shorter than a
 * chunk (compression dictionaries), as plain chunks, and learns their target ids: a dictionary
 * costs one small chunk, and its deltas then travel as deltas. The whole-chunk base of a single
 * delta (its parent chunk) is not worth it: that delta is sent whole instead.
 */
async function sendSharedBases(
  target: Repository, pool: CodecPool, writer: PackWriter, bases: Array<DeltaBase | undefined>, plainInTarget: (tid: Buffer | undefined) => boolean,
  map: IdMap, sentBases: Set<string>, usable: (id: Uint8Array) => boolean, report: SyncReport, learnt: Array<[Buffer, Buffer]>,
): Promise<void> {
  const uses = new Map<string, { base: DeltaBase; count: number }>();
  for (const b of bases) {
    if (b === undefined || plainInTarget(map.get(b.id))) continue;
    const hex = Buffer.from(b.id).toString('hex');
    const u = uses.get(hex);
    if (u) u.count++;
    else uses.set(hex, { base: b, count: 1 });
  }
  for (const { base, count } of uses.values()) {
    if (count < 2 && base.plain.length >= target.config.chunkSize) continue;
    const sentBefore = report.chunksSent;
    const [tid] = await sendChunks(target, pool, writer, [Buffer.from(base.plain)], [null], usable, report);
    // Sent now: a plain chunk. Already pending in this writer, it may be a delta: only an indexed
    // copy then tells (plainInTarget).
    if (report.chunksSent > sentBefore) sentBases.add(tid.toString('hex'));
    map.set(Buffer.from(base.id), tid);
    learnt.push([Buffer.from(base.id), tid]);
  }
}

/**
 * Groups wanted chunks by pack, sorted by offset, at most ~2 MiB of stored data per group (the
 * size the codec pool's reusable encode buffers hold: codec-pool.ts).
 */
function groupByPack<T extends { loc: BlobLocation }>(wanted: T[]): T[][] {
  const byPack = new Map<string, T[]>();
  for (const w of wanted) {
    const k = w.loc.packId.toString('hex');
    let list = byPack.get(k);
    if (!list) byPack.set(k, (list = []));
    list.push(w);
  }
  const groups: T[][] = [];
  for (const list of byPack.values()) {
    list.sort((a, b) => a.loc.offset - b.loc.offset);
    let current: T[] = [];
    let bytes = 0;
    for (const w of list) {
      if (current.length > 0 && bytes + w.loc.length > 2 << 20) {
        groups.push(current);
        current = [];
        bytes = 0;
      }
      current.push(w);
      bytes += w.loc.length;
    }
    if (current.length > 0) groups.push(current);
  }
  return groups;
}

/**
 * Reads and decodes chunks of one pack; returns their plaintexts in order, and for delta chunks
 * the base they were decoded against (source id and plaintext).
 */
async function readChunks(source: Repository, pool: CodecPool, group: Array<{ id: Buffer; loc: BlobLocation }>, snapshot: string): Promise<{ plains: Buffer[]; bases: Array<DeltaBase | undefined> }> {
  const pack = packName(group[0].loc.packId);
  const from = group[0].loc.offset;
  const to = Math.max(...group.map((w) => w.loc.offset + w.loc.length));
  const baseOf = await deltaBasesOf(source, group.map((w) => w.loc), (id) => `chunk ${id.toString('hex')} (the base of a delta chunk of snapshot ${snapshot})`);
  const data = await source.store.read(pack, { offset: from, length: to - from });
  const bases = group.map((w) => {
    const base = baseOf(w.loc);
    if (base instanceof Error) {
      throw new TresorError('sync-source-damaged', `cannot copy snapshot ${snapshot}: delta chunk ${w.id.toString('hex')} cannot be decoded: ${base.message}`, {
        hint: 'run `tresor verify` on the source; a new backup of the same data heals it, then sync again', context: { snapshot, pack },
      });
    }
    return base;
  });
  const results = await pool.decode(group.map((w, i) => ({
    type: w.loc.type, id: w.id, rawLength: w.loc.rawLength,
    stored: data.subarray(w.loc.offset - from, w.loc.offset - from + w.loc.length),
    label: `${BLOB_TYPE_NAMES[w.loc.type]} ${w.id.toString('hex')} in ${pack} (snapshot ${snapshot})`,
    base: bases[i],
  })), transferable(data));
  const plains = results.map((r) => {
    if (!r.ok) {
      throw new TresorError('sync-source-damaged', `cannot copy snapshot ${snapshot}: ${r.message}`, {
        hint: 'run `tresor verify` on the source; a new backup of the same data heals it, then sync again', context: { snapshot, pack },
      });
    }
    return Buffer.from(r.plain.buffer, r.plain.byteOffset, r.plain.byteLength);
  });
  return { plains, bases };
}

/**
 * Hashes plaintexts with the target's key and stores those the target lacks, each as a delta
 * against `bases[i]` (a plain chunk of the target, by its target id) where given and worth it;
 * returns target ids.
 */
async function sendChunks(
  target: Repository, pool: CodecPool, writer: PackWriter, plains: Buffer[], bases: Array<DeltaBase | null>, usable: (id: Uint8Array) => boolean, report: SyncReport,
): Promise<Buffer[]> {
  const chunkSize = target.config.chunkSize;
  const ids = new Array<Buffer>(plains.length);
  // Full chunks go in one batch; a short chunk (the end of a disk) in a batch of its own.
  const batches: number[][] = [[]];
  plains.forEach((pl, i) => {
    if (pl.length === chunkSize) batches[0].push(i);
    else batches.push([i]);
  });
  for (const members of batches) {
    if (members.length === 0) continue;
    const data = Buffer.concat(members.map((i) => plains[i]));
    const lengths = plains.map((pl) => pl.length);
    for (const i of members) releaseBuffer(plains[i]); // copied into `data`
    const hashed = await pool.hash(data, chunkSize);
    const encodeWhich: number[] = [];
    members.forEach((i, k) => {
      const id = Buffer.from(hashed.ids.subarray(k * 32, k * 32 + 32));
      ids[i] = id;
      // An all-zero chunk (the hash says so with the zero id) becomes a hole in the target.
      if (ZERO_ID.equals(id) || usable(id) || !writer.claim(id)) report.chunksAlreadyThere++;
      else encodeWhich.push(k);
    });
    const which = encodeWhich.map((k) => bases[members[k]]);
    const { blobs, types, release } = await pool.encode(hashed, encodeWhich, BlobType.chunk, { bases: which });
    try {
      for (let n = 0; n < blobs.length; n++) {
        const i = members[encodeWhich[n]];
        await writer.add(types[n], ids[i], blobs[n], lengths[i], types[n] === BlobType.deltaChunk ? Buffer.from(which[n]!.id) : undefined);
        report.chunksSent++;
      }
    } finally {
      release();
    }
  }
  return ids;
}
