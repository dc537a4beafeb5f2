/**
 * Garbage collection, safe while backups, restores and syncs run (docs/repository-format.md
 * §Garbage collection has the argument in full).
 *
 * A run either resumes the pending plan (`gc/<id>/plan`) or makes one:
 *
 *  Plan (under a maintenance lock, which coexists with backups):
 *   1. list and read every manifest; then read every index file (in this order: every listed
 *      manifest's blobs are then in the index view) and list the packs;
 *   2. mark: every index piece and chunk the manifests reference is live (a piece that cannot be
 *      read stops GC: what it references is unknown);
 *   3. per pack: live bytes (copies the index resolves to) and garbage; packs without live blobs
 *      are deleted, packs with enough garbage are repacked: their live blobs (checked by decoding)
 *      are copied, still encoded, into new packs;
 *   4. the plan index (new packs, live blobs at one location each, unreferenced blobs still
 *      listed for readers) supersedes the index files read;
 *   5. the plan object lists the condemned blob ids: from now on writers store fresh copies
 *      instead of deduplicating against them (Repository.avoids);
 *   6. every lock that exists now is a blocker: its holder may have loaded the index before the
 *      plan was visible. They are recorded in `gc/<id>/blockers`.
 *  Wait until no blocker is alive (bounded; a later run resumes).
 *  Finish:
 *   7. manifests committed since the plan that reference condemned blobs rescue them;
 *   8. the final index (plan index minus condemned, unrescued copies in doomed packs)
 *      supersedes the plan's index files — before anything is deleted;
 *   9. delete the doomed packs that no current index names, then superseded index files,
 *      obsolete damage records, orphan notes; last the plan.
 * Every step is idempotent and re-derived from the repository on resume, so a crash anywhere
 * leaves a repository that verifies clean, and the next run finishes the job.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { DamageError, TresorError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';
import { requireFullAccess } from './access.ts';
import { BlobIndex, entryLocation } from './blob-index.ts';
import { BlobType, ZERO_ID, type BlobTypeValue } from './codec.ts';
import type { CodecPool } from './codec-pool.ts';
import { releaseBuffer } from '../util/bytes.ts';
import { type DamagedCopy, readDamageRecords, writeDamageRecord } from './damage-records.ts';
import {
  type GcPlan, type LockIdentity, type PlanHeader, blockersName, decodeBlockers, encodeBlockers, encodePlan, planName, readPlans,
} from './gc-plan.ts';
import { type BatchItem, deltaBasesOf, newBaseCache, readBlobBatch } from './blob-batch.ts';
import type { BlobLocation } from './blob-index.ts';
import { pieceIds } from './disk-map.ts';
import { IdSet } from './id-set.ts';
import { decodeIndexFile, indexFileId, type IndexedPack } from './index-file.ts';
import { listLocks, type ListedLock, type RepositoryLock } from './lock.ts';
import type { SnapshotManifest } from './manifest.ts';
import { tidyNotes } from './notes.ts';
import { MAX_PACK_SIZE, PackBuilder, type PackEntry, packIdFromName, packName, readPackHeader } from './pack.ts';
import type { Repository } from './repository.ts';

/** Pieces marked per batch of reads (garbage collection checks for abort between batches). */
const MARK_SLICE = 4096;

export interface GcOptions {
  /** Repack a pack when at least this fraction of its bytes is garbage (default 0.1). */
  repackThreshold?: number;
  /** How long to wait for operations that started before the plan (default 10 minutes). */
  maxWaitMs?: number;
  /** Interval between checks of the blockers (default 1 s). */
  pollMs?: number;
  /** Decodes blobs before they are copied (repacking never spreads damage). */
  pool: CodecPool;
  progress?: (phase: string, done: number, total: number) => void;
  signal?: AbortSignal;
}

export interface GcReport {
  /** False when GC stopped waiting for operations that started before its plan. */
  complete: boolean;
  plan: string | undefined;
  resumed: boolean;
  waitingFor: LockIdentity[];
  snapshots: number;
  liveBlobs: number;
  /** Referenced blobs that are in no index (damage: `tresor check`). */
  missingBlobs: number;
  condemnedBlobs: number;
  rescuedBlobs: number;
  deletedPacks: number;
  deletedPackBytes: number;
  repackedPacks: number;
  repackedBlobs: number;
  writtenPacks: number;
  writtenPackBytes: number;
  deletedIndexFiles: number;
  writtenIndexFiles: number;
  /** Stored bytes freed: deleted packs and index files, minus what was written. */
  freedBytes: number;
  damageRecordsDeleted: number;
  notesDeleted: number;
  notesMerged: number;
  discardedDamagedPlans: string[];
  durationMs: number;
}

/** Index entries per file GC writes (well below the readers' plaintext bound). */
const ENTRIES_PER_INDEX_FILE = 2_000_000;

interface RawIndexFile {
  name: string;
  supersedes: string[];
  packs: IndexedPack[];
}

class Aborted extends TresorError {
  constructor(reason: unknown) {
    super('interrupted', reason instanceof Error ? reason.message : 'garbage collection interrupted', { cause: reason });
  }
}

export async function collectGarbage(repo: Repository, opts: GcOptions): Promise<GcReport> {
  await requireFullAccess(repo, 'collect garbage');
  const started = Date.now();
  const lock = await repo.lock('maintenance', 'gc');
  try {
    const report = emptyReport();
    const gc = new GarbageCollection(repo, lock, opts, report);
    await gc.run();
    report.durationMs = Date.now() - started;
    return report;
  } finally {
    await lock.release();
  }
}

function emptyReport(): GcReport {
  return {
    complete: false, plan: undefined, resumed: false, waitingFor: [], snapshots: 0, liveBlobs: 0, missingBlobs: 0,
    condemnedBlobs: 0, rescuedBlobs: 0, deletedPacks: 0, deletedPackBytes: 0, repackedPacks: 0, repackedBlobs: 0,
    writtenPacks: 0, writtenPackBytes: 0, deletedIndexFiles: 0, writtenIndexFiles: 0, freedBytes: 0,
    damageRecordsDeleted: 0, notesDeleted: 0, notesMerged: 0, discardedDamagedPlans: [], durationMs: 0,
  };
}

class GarbageCollection {
  readonly #repo: Repository;
  readonly #lock: RepositoryLock;
  readonly #opts: GcOptions;
  readonly #report: GcReport;
  #deletedIndexBytes = 0;
  #writtenIndexBytes = 0;

  constructor(repo: Repository, lock: RepositoryLock, opts: GcOptions, report: GcReport) {
    this.#repo = repo;
    this.#lock = lock;
    this.#opts = opts;
    this.#report = report;
  }

  #checkAbort(): void {
    if (this.#opts.signal?.aborted) throw new Aborted(this.#opts.signal.reason);
  }

  async run(): Promise<void> {
    const repo = this.#repo;
    const { plans, damaged } = await readPlans(repo.store, repo.keys);
    for (const name of damaged) {
      // Safe to drop (gc-plan.ts readPlans): the final index is always written before deletions.
      const dir = name.slice(0, name.lastIndexOf('/') + 1);
      for await (const b of repo.store.list(dir)) await repo.store.delete(b.name);
      this.#report.discardedDamagedPlans.push(name);
    }
    let plan: GcPlan | undefined = plans.sort((a, b) => (a.header.created < b.header.created ? -1 : 1))[0];
    if (plan) {
      this.#report.resumed = true;
    } else {
      plan = await this.#makePlan();
      if (!plan) {
        await this.#housekeeping(undefined);
        this.#report.complete = true;
        this.#report.freedBytes = this.#deletedIndexBytes - this.#writtenIndexBytes;
        return;
      }
    }
    this.#report.plan = plan.header.id;
    const blockers = await this.#blockers(plan);
    if (await this.#waitFor(blockers)) {
      await this.#finish(plan);
      this.#report.complete = true;
    }
    const r = this.#report;
    r.freedBytes = r.deletedPackBytes + this.#deletedIndexBytes - r.writtenPackBytes - this.#writtenIndexBytes;
  }

  // ---- reading the repository -------------------------------------------------------------

  async #readIndexFiles(): Promise<{ files: RawIndexFile[]; damaged: Array<{ name: string; error: string }> }> {
    for (let attempt = 1; ; attempt++) {
      const names: string[] = [];
      for await (const b of this.#repo.store.list('index/')) if (indexFileId(b.name)) names.push(b.name);
      let vanished = false;
      const damaged: Array<{ name: string; error: string }> = [];
      const files = await mapLimit(names, 8, async (name): Promise<RawIndexFile | undefined> => {
        try {
          const c = decodeIndexFile(this.#repo.keys, name, await this.#repo.store.read(name));
          return { name, supersedes: c.supersedes.map((s) => `index/${s.toString('hex')}`), packs: c.packs };
        } catch (err) {
          if ((err as TresorError).code === 'blob-not-found') vanished = true;
          else damaged.push({ name, error: (err as Error).message });
          return undefined;
        }
      });
      if (vanished && attempt < 4) continue;
      return { files: files.filter((f): f is RawIndexFile => f !== undefined), damaged };
    }
  }

  async #listPacks(): Promise<Map<string, number>> {
    const sizes = new Map<string, number>();
    for await (const b of this.#repo.store.list('data/')) {
      const id = packIdFromName(b.name);
      if (id) sizes.set(id.toString('hex'), b.size);
    }
    return sizes;
  }

  async #listManifestKeys(): Promise<string[]> {
    const keys: string[] = [];
    for await (const b of this.#repo.store.list('snapshots/')) if (/^snapshots\/[0-9a-f]{64}$/.test(b.name)) keys.push(b.name);
    return keys;
  }

  async #readManifest(key: string): Promise<SnapshotManifest | undefined> {
    try {
      return this.#repo.decodeManifest(key, await this.#repo.store.read(key));
    } catch (err) {
      if ((err as TresorError).code === 'blob-not-found') return undefined; // pruned meanwhile
      throw new DamageError('gc-unreadable-manifest', `garbage collection cannot run: manifest ${key} is unreadable (${(err as Error).message}), so what it references is unknown`, {
        hint: 'run `tresor check` to see the damage; GC deletes nothing while a snapshot it cannot read may need data',
        context: { manifest: key },
      });
    }
  }

  /**
   * Adds to `refs` the disk-map nodes, pieces and chunks of `manifests`, reading the blobs that
   * `locate` finds, and the bases of referenced delta chunks (`index` lists them). Returns the
   * number of referenced blobs `has` does not know.
   */
  async #mark(manifests: SnapshotManifest[], refs: IdSet, index: BlobIndex): Promise<number> {
    const locate = (id: Buffer) => index.get(id);
    const has = (id: Buffer) => index.has(id);
    const repo = this.#repo;
    const pieces: BatchItem[] = [];
    let missing = 0;
    const disks = manifests.flatMap((m) => m.disks.map((d) => ({ m, d })));
    const lists = await mapLimit(disks, 8, async ({ m, d }) => {
      this.#checkAbort();
      for (const hex of d.nodes ?? []) {
        const id = Buffer.from(hex, 'hex');
        if (refs.add(id) && !has(id)) missing++;
      }
      try {
        return await pieceIds(repo, m.name, d, { locate });
      } catch (err) {
        throw new DamageError('gc-unreadable-piece', `garbage collection cannot run: the disk map of disk ${d.name} in snapshot ${m.name} cannot be read (${(err as Error).message}), so the chunks it references are unknown`, {
          hint: 'run `tresor verify` to see the damage; a backup of the same disk may heal it',
          context: { snapshot: m.name, disk: d.name },
        });
      }
    });
    disks.forEach(({ m, d }, n) => {
      lists[n].forEach((hex, p) => {
        const id = Buffer.from(hex, 'hex');
        if (refs.add(id)) pieces.push({ id, type: BlobType.indexPiece, what: () => `index piece ${p} of disk ${d.name} in snapshot ${m.name}` });
      });
    });
    // Pieces in slices, each read with few ranged reads (blob-batch.ts); abort checked between.
    let done = 0;
    for (let at = 0; at < pieces.length; at += MARK_SLICE) {
      this.#checkAbort();
      let failure: { item: BatchItem; error: unknown } | undefined;
      await readBlobBatch(repo, pieces.slice(at, at + MARK_SLICE), (item, outcome) => {
        if (outcome.plain === undefined) {
          failure ??= { item, error: outcome.error };
          return;
        }
        const plain = outcome.plain;
        for (let k = 0; k < plain.length; k += 32) {
          const c = plain.subarray(k, k + 32);
          if (!ZERO_ID.equals(c) && refs.add(c) && !has(Buffer.from(c))) missing++;
        }
        this.#opts.progress?.('mark', ++done, pieces.length);
      }, { locate });
      if (failure) {
        throw new DamageError('gc-unreadable-piece', `garbage collection cannot run: ${failure.item.what()} cannot be read (${(failure.error as Error).message}), so the chunks it references are unknown`, {
          hint: 'run `tresor verify` to see the damage; a backup of the same disk may heal it',
          context: { piece: failure.item.id.toString('hex') },
        });
      }
    }
    // A live delta chunk keeps its base alive, and a base that is a delta its own base (two
    // levels at most, §4: two passes reach every one, in whatever order the index lists them).
    for (let pass = 0; pass < 2; pass++) {
      for (const [id, base] of index.deltaBases()) {
        if (refs.has(id) && refs.add(base) && !has(base)) missing++;
      }
    }
    return missing;
  }

  // ---- plan -------------------------------------------------------------------------------

  async #makePlan(): Promise<GcPlan | undefined> {
    const repo = this.#repo;
    const report = this.#report;
    // Manifests first: every blob they reference is then in the index files read next.
    const manifestKeys = await this.#listManifestKeys();
    const manifests = (await mapLimit(manifestKeys, 16, (k) => this.#readManifest(k))).filter((m): m is SnapshotManifest => m !== undefined);
    report.snapshots = manifests.length;
    const { files, damaged: damagedFiles } = await this.#readIndexFiles();
    const packSizes = await this.#listPacks();
    this.#checkAbort();

    const superseded = new Set(files.flatMap((f) => f.supersedes));
    const current = files.filter((f) => !superseded.has(f.name));
    // The effective view: each pack once, from the first current index file naming it.
    const view = new Map<string, IndexedPack>();
    for (const f of current) for (const p of f.packs) if (!view.has(p.packId.toString('hex'))) view.set(p.packId.toString('hex'), p);
    if (damagedFiles.length > 0) {
      // Packs are self-describing: what a damaged index file named is found in pack headers.
      const unknown = [...packSizes].filter(([hex]) => !view.has(hex));
      await mapLimit(unknown, 8, async ([hex, size]) => {
        const name = packName(Buffer.from(hex, 'hex'));
        try {
          const entries = await readPackHeader(repo.keys, name, size, (o, l) => repo.store.read(name, { offset: o, length: l }));
          view.set(hex, { packId: Buffer.from(hex, 'hex'), entries });
        } catch {
          // Unreadable header: left alone, reported by `tresor check`.
        }
      });
    }

    // The canonical copy of each blob, chosen like the index loader: damaged copies last.
    const { records } = await readDamageRecords(repo.store, repo.keys);
    const damagedAt = new Map<string, Set<string>>();
    for (const r of records) for (const b of r.blobs) (damagedAt.get(b.id) ?? damagedAt.set(b.id, new Set()).get(b.id)!).add(b.pack);
    let total = 0;
    for (const p of view.values()) total += p.entries.length;
    const canon = new BlobIndex(Math.ceil(total / 0.6));
    const deferred: Array<{ pack: IndexedPack; e: PackEntry }> = [];
    const isDamagedCopy = (e: PackEntry, packHex: string) => damagedAt.size > 0 && damagedAt.get(e.id.toString('hex'))?.has(packHex) === true;
    for (const [hex, p] of view) {
      for (const e of p.entries) {
        if (isDamagedCopy(e, hex)) deferred.push({ pack: p, e });
        else canon.add(e.id, entryLocation(p.packId, e));
      }
    }
    for (const { pack, e } of deferred) canon.add(e.id, entryLocation(pack.packId, e));

    // Mark.
    const live = new IdSet(total * 1.2);
    report.missingBlobs = await this.#mark(manifests, live, canon);
    report.liveBlobs = live.size;
    this.#checkAbort();

    // Sweep plan: classify packs.
    const threshold = this.#opts.repackThreshold ?? 0.1;
    const isCanonicalHere = (e: PackEntry, packId: Buffer): boolean => {
      const loc = canon.get(e.id);
      return loc !== undefined && loc.offset === e.offset && loc.packId.equals(packId);
    };
    const deletePacks: string[] = [];
    const repack: Array<{ hex: string; pack: IndexedPack; live: PackEntry[] }> = [];
    let garbageBlobs = 0;
    let garbageBytes = 0;
    for (const [hex, p] of view) {
      const keep: PackEntry[] = [];
      let dead = 0;
      let deadBlobs = 0;
      let damagedGarbage = false;
      for (const e of p.entries) {
        if (live.has(e.id) && isCanonicalHere(e, p.packId)) keep.push(e);
        else {
          dead += e.length;
          deadBlobs++;
          if (isDamagedCopy(e, hex)) damagedGarbage = true;
        }
      }
      if (deadBlobs === 0) continue;
      const size = packSizes.get(hex);
      if (keep.length === 0) {
        deletePacks.push(hex);
      } else if (size !== undefined && (dead >= threshold * size || damagedGarbage)) {
        // A damaged copy that has a healthy twin goes however little garbage its pack holds.
        repack.push({ hex, pack: p, live: keep });
      } else continue;
      garbageBlobs += deadBlobs;
      garbageBytes += dead;
    }
    const unindexedPacks = [...packSizes.keys()].filter((hex) => !view.has(hex));
    if (deletePacks.length === 0 && repack.length === 0 && unindexedPacks.length === 0 && damagedFiles.length === 0) return undefined;

    // Repack, checking every blob copied.
    const { newPacks, repacked } = await this.#repack(repack, packSizes, damagedAt, (id) => canon.get(id));
    const repackedHex = new Set(repacked.map((r) => r.hex));

    // Condemned: unreferenced blobs that will be gone, i.e. with no copy outside doomed packs.
    const doomed = new Set([...deletePacks, ...repackedHex]);
    const inDoomed = new IdSet();
    const inKept = new IdSet();
    for (const [hex, p] of view) for (const e of p.entries) if (!live.has(e.id)) (doomed.has(hex) ? inDoomed : inKept).add(e.id);
    const condemned = [...inDoomed].filter((id) => !inKept.has(id));
    report.condemnedBlobs = condemned.length;

    // The plan index: what readers use from now on.
    const planPacks: IndexedPack[] = [];
    for (const [hex, p] of view) {
      const entries = p.entries.filter((e) => {
        if (!live.has(e.id)) return true; // condemned: still readable until the final index
        return isCanonicalHere(e, p.packId) && !repackedHex.has(hex);
      });
      if (entries.length > 0) planPacks.push({ packId: p.packId, entries });
    }
    planPacks.push(...newPacks);
    const readNames = [...files.map((f) => f.name), ...damagedFiles.map((d) => d.name)];
    const planIndexFiles = await this.#writeIndex(planPacks, closure(readNames, files));
    this.#checkAbort();

    const header: PlanHeader = {
      format: 'tresor-gc-plan', version: 1, id: randomBytes(16).toString('hex'), created: new Date().toISOString(), host: hostname(),
      indexFiles: readNames, planIndexFiles, deletePacks,
      repackedPacks: [...repackedHex], unindexedPacks,
      stats: { garbageBlobs, garbageBytes, repackedBlobs: this.#report.repackedBlobs, repackedBytes: this.#report.writtenPackBytes },
    };
    const plan: GcPlan = { header, condemned, seenManifests: manifestKeys.map((k) => k.slice('snapshots/'.length)) };
    const { name, data } = encodePlan(repo.keys, plan);
    await repo.store.create(name, data);
    return plan;
  }

  async #repack(
    candidates: Array<{ hex: string; pack: IndexedPack; live: PackEntry[] }>, packSizes: Map<string, number>, recorded: Map<string, Set<string>>,
    locate: (id: Buffer) => BlobLocation | undefined,
  ): Promise<{ newPacks: IndexedPack[]; repacked: Array<{ hex: string }> }> {
    const repo = this.#repo;
    const target = Math.min(repo.config.packSize, MAX_PACK_SIZE);
    const newPacks: IndexedPack[] = [];
    const repacked: Array<{ hex: string }> = [];
    const damaged: DamagedCopy[] = [];
    let builder = new PackBuilder(target + (1 << 20));
    const seal = async () => {
      if (builder.count === 0) return;
      const sealed = builder.seal(repo.keys);
      builder = new PackBuilder(target + (1 << 20));
      await repo.store.create(sealed.name, sealed.data);
      newPacks.push({ packId: sealed.id, entries: sealed.entries });
      this.#report.writtenPacks++;
      this.#report.writtenPackBytes += sealed.data.length;
      releaseBuffer(sealed.data, 'arraybuffer');
    };
    const baseCache = newBaseCache();
    let done = 0;
    for (const c of candidates) {
      this.#checkAbort();
      const name = packName(c.pack.packId);
      const sorted = [...c.live].sort((a, b) => a.offset - b.offset);
      const from = sorted[0].offset;
      const to = sorted.at(-1)!.offset + sorted.at(-1)!.length;
      if ((packSizes.get(c.hex) ?? 0) < to) continue; // truncated: left alone for `tresor check` to report
      const data = await repo.store.read(name, { offset: from, length: to - from });
      // A delta chunk is checked against its base (read from wherever the plan's index has it).
      const baseOf = await deltaBasesOf(repo, sorted, (id) => `chunk ${id.toString('hex')}`, { locate, cache: baseCache });
      // Verdicts only: the stored bytes are copied as they are, the plaintext is not needed.
      const results = await this.#opts.pool.check(sorted.map((e) => {
        const base = baseOf(e);
        return {
          type: e.type, id: e.id, rawLength: e.rawLength, stored: data.subarray(e.offset - from, e.offset - from + e.length),
          label: `${blobTypeName(e.type)} ${e.id.toString('hex')} in ${name}`, base: base instanceof Error ? undefined : base,
        };
      }));
      const verdict = (e: PackEntry, i: number): string | undefined => {
        const base = baseOf(e);
        if (base instanceof Error) return `its base cannot be read: ${base.message}`;
        const r = results[i];
        return r.ok ? undefined : r.message;
      };
      const bad = sorted.map((e, i) => ({ e, error: verdict(e, i) })).filter(({ error }) => error !== undefined);
      if (bad.length > 0) {
        // Never copy damage: the pack stays as it is, and the damage is recorded for healing.
        for (const { e, error } of bad) {
          const id = e.id.toString('hex');
          if (!recorded.get(id)?.has(c.hex)) damaged.push({ type: e.type, id, pack: c.hex, error: error ?? '' });
        }
        continue;
      }
      for (const e of sorted) {
        builder.add(e.type, e.id, data.subarray(e.offset - from, e.offset - from + e.length), e.rawLength, e.base);
        if (builder.size >= target) await seal();
      }
      releaseBuffer(data); // its blobs were copied into the new pack
      repacked.push({ hex: c.hex });
      this.#report.repackedPacks++;
      this.#report.repackedBlobs += sorted.length;
      this.#opts.progress?.('repack', ++done, candidates.length);
    }
    await seal();
    await writeDamageRecord(repo.store, repo.keys, damaged);
    return { newPacks, repacked };
  }

  /**
   * Writes `packs` as index files superseding `supersedes`. Only the last file lists them, so
   * until every file is durable the superseded files still count (duplicates, never gaps).
   */
  async #writeIndex(packs: IndexedPack[], supersedes: string[]): Promise<string[]> {
    const groups: IndexedPack[][] = [[]];
    let n = 0;
    for (const p of packs) {
      if (n + p.entries.length > ENTRIES_PER_INDEX_FILE && groups.at(-1)!.length > 0) {
        groups.push([]);
        n = 0;
      }
      groups.at(-1)!.push(p);
      n += p.entries.length;
    }
    const names: string[] = [];
    for (let i = 0; i < groups.length; i++) {
      const last = i === groups.length - 1;
      const ids = last ? supersedes.map((s) => indexFileId(s)!).filter((b) => b !== undefined) : [];
      const { name, size } = await this.#repo.writeIndexFile(groups[i], ids);
      names.push(name);
      this.#report.writtenIndexFiles++;
      this.#writtenIndexBytes += size;
    }
    return names;
  }

  // ---- waiting ----------------------------------------------------------------------------

  /** The plan's blockers, recorded on first need (a resumed plan without them takes every lock now). */
  async #blockers(plan: GcPlan): Promise<LockIdentity[]> {
    const repo = this.#repo;
    const name = blockersName(plan.header.id);
    try {
      return decodeBlockers(repo.keys, name, await repo.store.read(name)).locks;
    } catch (err) {
      if ((err as TresorError).code !== 'blob-not-found') throw err;
    }
    const locks = (await listLocks(repo.store, repo.keys)).filter((l) => !l.stale && !this.#isOwn(l)).map(identity);
    const { data } = encodeBlockers(repo.keys, plan.header.id, { format: 'tresor-gc-blockers', version: 1, time: new Date().toISOString(), locks });
    if (!(await repo.store.create(name, data))) return decodeBlockers(repo.keys, name, await repo.store.read(name)).locks;
    return locks;
  }

  #isOwn(l: ListedLock): boolean {
    const me = this.#lock.info;
    return l.info !== undefined && l.info.host === me.host && l.info.pid === me.pid && l.info.started === me.started;
  }

  async #waitFor(blockers: LockIdentity[]): Promise<boolean> {
    const deadline = Date.now() + (this.#opts.maxWaitMs ?? 10 * 60_000);
    for (;;) {
      const alive = (await listLocks(this.#repo.store, this.#repo.keys)).filter((l) => !l.stale && !this.#isOwn(l)).map(identity);
      const waiting = blockers.filter((b) => alive.some((a) => sameHolder(a, b)));
      this.#report.waitingFor = waiting;
      if (waiting.length === 0) return true;
      if (Date.now() >= deadline) return false;
      this.#checkAbort();
      await sleep(Math.min(this.#opts.pollMs ?? 1000, Math.max(1, deadline - Date.now())), undefined, { signal: this.#opts.signal }).catch(() => undefined);
      this.#checkAbort();
    }
  }

  // ---- finish -----------------------------------------------------------------------------

  async #finish(plan: GcPlan): Promise<void> {
    const repo = this.#repo;
    const report = this.#report;
    const h = plan.header;
    const condemned = new IdSet(plan.condemned.length * 1.5);
    for (const id of plan.condemned) condemned.add(id);
    report.condemnedBlobs = condemned.size;
    const planFiles = new Set([...h.indexFiles, ...h.planIndexFiles]);
    const doomed = new Set([...h.deletePacks, ...h.repackedPacks]);

    const first = await this.#readIndexFiles();
    let files = first.files;
    const existing = new Set(files.map((f) => f.name));
    const supersededNow = new Set(files.flatMap((f) => f.supersedes));
    const finalWritten = [...planFiles].every((n) => !existing.has(n) || supersededNow.has(n));
    const unknown = first.damaged.filter((d) => !supersededNow.has(d.name));
    if (unknown.length > 0) {
      // A damaged index file may name packs this plan would delete: nothing is deleted blind.
      // Before the final index nothing was deleted, so the plan can be dropped and made anew
      // (a new plan rebuilds what the damaged file said from the pack headers).
      if (!finalWritten) {
        await repo.store.delete(blockersName(h.id));
        await repo.store.delete(planName(h.id));
      }
      throw new DamageError('gc-damaged-index', `garbage collection cannot finish: index file ${unknown[0].name} is damaged (${unknown[0].error})`, {
        hint: finalWritten ? 'run `tresor check` to see the damage' : 'run `tresor gc` again: the new plan rebuilds the index from the pack headers',
        context: { index: unknown[0].name },
      });
    }

    if (!finalWritten) {
      // Rescue: snapshots committed since the plan by writers that could not see it.
      const seen = new Set(plan.seenManifests);
      const newKeys = (await this.#listManifestKeys()).filter((k) => !seen.has(k.slice('snapshots/'.length)));
      const manifests = (await mapLimit(newKeys, 16, (k) => this.#readManifest(k))).filter((m): m is SnapshotManifest => m !== undefined);
      repo.invalidateIndex();
      const index = await repo.index({ fresh: true });
      const refs = new IdSet();
      await this.#mark(manifests, refs, index);
      const elsewhere = new IdSet();
      for (const f of files) {
        if (planFiles.has(f.name) || supersededNow.has(f.name)) continue;
        for (const p of f.packs) for (const e of p.entries) if (condemned.has(e.id)) elsewhere.add(e.id);
      }
      const rescued = new IdSet();
      for (const id of condemned) if (refs.has(id) && !elsewhere.has(id)) rescued.add(id);
      report.rescuedBlobs = rescued.size;

      // The final index: the plan's view without the condemned copies in doomed packs.
      const effective = files.filter((f) => planFiles.has(f.name) && !supersededNow.has(f.name));
      const finalPacks: IndexedPack[] = [];
      const seenPacks = new Set<string>();
      for (const f of effective) {
        for (const p of f.packs) {
          const hex = p.packId.toString('hex');
          if (seenPacks.has(hex)) continue;
          seenPacks.add(hex);
          // Doomed packs hold only condemned blobs now (live ones were relocated by the plan index).
          const entries = doomed.has(hex) ? p.entries.filter((e) => rescued.has(e.id)) : p.entries;
          if (entries.length > 0) finalPacks.push({ packId: p.packId, entries });
        }
      }
      await this.#writeIndex(finalPacks, closure([...planFiles], files));
      this.#checkAbort();
      ({ files } = await this.#readIndexFiles());
    }

    // Delete doomed packs no current index names.
    const supersededFinal = new Set(files.flatMap((f) => f.supersedes));
    const named = new Set<string>();
    for (const f of files) if (!supersededFinal.has(f.name)) for (const p of f.packs) named.add(p.packId.toString('hex'));
    const packSizes = await this.#listPacks();
    const toDelete = [...doomed, ...h.unindexedPacks].filter((hex) => !named.has(hex) && packSizes.has(hex));
    let deleted = 0;
    await mapLimit(toDelete, 8, async (hex) => {
      this.#checkAbort();
      await repo.store.delete(packName(Buffer.from(hex, 'hex')));
      report.deletedPacks++;
      report.deletedPackBytes += packSizes.get(hex)!;
      this.#opts.progress?.('delete', ++deleted, toDelete.length);
    });
    await this.#housekeeping(files);
    await repo.store.delete(blockersName(h.id));
    await repo.store.delete(planName(h.id));
  }

  /**
   * Removes superseded index files (compacting many into one first when there are several),
   * damage records that no index entry needs any more, and orphan notes.
   */
  async #housekeeping(known: RawIndexFile[] | undefined): Promise<void> {
    const repo = this.#repo;
    let files = known ?? (await this.#readIndexFiles()).files;
    let superseded = new Set(files.flatMap((f) => f.supersedes));
    const current = files.filter((f) => !superseded.has(f.name));
    if (known === undefined && current.length > 1) {
      // Compaction: the same entries in fewer files; nothing is deleted but superseded files.
      const packs = new Map<string, IndexedPack>();
      for (const f of current) for (const p of f.packs) if (!packs.has(p.packId.toString('hex'))) packs.set(p.packId.toString('hex'), p);
      await this.#writeIndex([...packs.values()], closure(current.map((f) => f.name), files));
      ({ files } = await this.#readIndexFiles());
      superseded = new Set(files.flatMap((f) => f.supersedes));
    }
    const doomedFiles = files.filter((f) => superseded.has(f.name));
    let sizes = 0;
    for await (const b of repo.store.list('index/')) if (superseded.has(b.name)) sizes += b.size;
    await mapLimit(doomedFiles, 8, async (f) => {
      await repo.store.delete(f.name);
      this.#report.deletedIndexFiles++;
    });
    this.#deletedIndexBytes += sizes;

    // Damage records: obsolete once no current index names the damaged copy.
    const live = files.filter((f) => !superseded.has(f.name));
    const { records } = await readDamageRecords(repo.store, repo.keys);
    if (records.length > 0) {
      const wanted = new Set(records.flatMap((r) => r.blobs.map((b) => b.pack)));
      const copies = new Set<string>();
      for (const f of live) {
        for (const p of f.packs) {
          const hex = p.packId.toString('hex');
          if (wanted.has(hex)) for (const e of p.entries) copies.add(`${e.id.toString('hex')}@${hex}`);
        }
      }
      for (const r of records) {
        if (r.blobs.every((b) => !copies.has(`${b.id}@${b.pack}`))) {
          await repo.store.delete(r.name);
          this.#report.damageRecordsDeleted++;
        }
      }
    }

    // Notes of snapshots that no longer exist, and long note histories.
    const keys = new Set((await this.#listManifestKeys()).map((k) => k.slice('snapshots/'.length)));
    const notes = await tidyNotes(repo, keys, async (key) => (await this.#readManifest(`snapshots/${key}`).catch(() => undefined))?.name);
    this.#report.notesDeleted = notes.orphansDeleted;
    this.#report.notesMerged = notes.merged;
  }
}

/** `names` plus every index file they (transitively) supersede that still exists. */
function closure(names: string[], files: RawIndexFile[]): string[] {
  const byName = new Map(files.map((f) => [f.name, f]));
  const out = new Set<string>();
  const todo = [...names];
  while (todo.length > 0) {
    const n = todo.pop()!;
    if (out.has(n)) continue;
    out.add(n);
    for (const s of byName.get(n)?.supersedes ?? []) if (byName.has(s)) todo.push(s);
  }
  return [...out];
}

function identity(l: ListedLock): LockIdentity {
  return l.info
    ? { host: l.info.host, pid: l.info.pid, started: l.info.started, operation: l.info.operation }
    : { host: '?', pid: -1, started: l.name, operation: `unreadable lock ${l.name}` };
}

function sameHolder(a: LockIdentity, b: LockIdentity): boolean {
  if (a.host !== b.host || a.pid !== b.pid) return false;
  return a.started !== undefined && b.started !== undefined ? a.started === b.started : a.operation === b.operation;
}

function blobTypeName(type: BlobTypeValue): string {
  return type === BlobType.chunk ? 'chunk' : type === BlobType.deltaChunk ? 'delta chunk' : type === BlobType.indexPiece ? 'index piece' : type === BlobType.mapNode ? 'disk-map node' : `blob of type ${type}`;
}
