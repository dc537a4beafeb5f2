/**
 * `tresor check`: the structure of the repository, without reading chunk data (or with it,
 * `readData`: then every referenced chunk is decoded too, as `tresor verify` does).
 *
 *  - every index file decodes; every manifest decodes and its disk maps match their digests;
 *  - every index piece is read, and every piece and chunk a snapshot needs is in the index, its
 *    pack exists, and the blob lies inside the pack (verify.ts, without data);
 *  - every pack's header (one small ranged read at its end) agrees with what the index says of
 *    that pack: same blobs at the same places; the pack's size matches its header;
 *  - notes: packs no index names (interrupted writers; GC removes them), index entries naming
 *    packs that are gone (unreferenced ones only, else they are errors above), blobs stored
 *    twice, a pending garbage collection, damage records, unreadable snapshot notes, stale locks.
 */
import { mapLimit } from '../util/concurrency.ts';
import type { CodecPool } from './codec-pool.ts';
import { readDamageRecords } from './damage-records.ts';
import { readPlans } from './gc-plan.ts';
import { IdSet } from './id-set.ts';
import { decodeIndexFile, indexFileId, type IndexedPack } from './index-file.ts';
import { listLocks } from './lock.ts';
import { listNotes, readSnapshotStates } from './notes.ts';
import { type PackEntry, packIdFromName, packName, readPackHeader } from './pack.ts';
import type { Repository } from './repository.ts';
import { type Damage, verifyRepository } from './verify.ts';

export interface CheckIssue {
  kind: 'pack-header' | 'index-mismatch' | 'pack-size';
  object: string;
  error: string;
}

export interface CheckNote {
  kind: 'unindexed-pack' | 'index-names-missing-pack' | 'duplicate-blobs' | 'gc-pending' | 'damage-record' | 'unreadable-note' | 'stale-lock';
  object: string;
  message: string;
}

export interface CheckReport {
  ok: boolean;
  readData: boolean;
  snapshots: number;
  packs: number;
  indexFiles: number;
  blobsChecked: number;
  bytesRead: number;
  /** Damage found through the snapshots (verify.ts). */
  damage: Damage[];
  /** Inconsistencies between packs and index files. */
  issues: CheckIssue[];
  /** Not damage, worth knowing. */
  notes: CheckNote[];
}

export interface CheckOptions {
  readData?: boolean;
  progress?: (done: number, total: number) => void;
}

export async function checkRepository(repo: Repository, pool: CodecPool, opts: CheckOptions = {}): Promise<CheckReport> {
  const lock = await repo.lock('shared', 'check');
  try {
    repo.invalidateIndex();
    const verified = await verifyRepository(repo, pool, { readData: opts.readData === true, progress: opts.progress });
    const report: CheckReport = {
      ok: verified.ok, readData: opts.readData === true, snapshots: verified.snapshots.length, packs: 0,
      indexFiles: verified.indexFiles, blobsChecked: verified.blobsChecked, bytesRead: verified.bytesRead,
      damage: verified.damage, issues: [], notes: [],
    };
    await checkPacksAgainstIndex(repo, report);
    await collectNotes(repo, report, verified.snapshots);
    report.ok = report.damage.length === 0 && report.issues.length === 0;
    return report;
  } finally {
    await lock.release();
  }
}

/** What the current (not superseded) index files say about each pack. */
async function indexedPacks(repo: Repository): Promise<Map<string, PackEntry[]>> {
  const names: string[] = [];
  for await (const b of repo.store.list('index/')) if (indexFileId(b.name)) names.push(b.name);
  const files = await mapLimit(names, 8, async (name) => {
    try {
      return { name, content: decodeIndexFile(repo.keys, name, await repo.store.read(name)) };
    } catch {
      return undefined; // damaged ones are reported by verify; vanished ones were superseded
    }
  });
  const superseded = new Set(files.flatMap((f) => f?.content.supersedes.map((s) => `index/${s.toString('hex')}`) ?? []));
  const packs = new Map<string, PackEntry[]>();
  for (const f of files) {
    if (!f || superseded.has(f.name)) continue;
    for (const p of f.content.packs as IndexedPack[]) {
      const hex = p.packId.toString('hex');
      const list = packs.get(hex);
      if (list) {
        // Two index files naming one pack (a pack adopted by sync, say): union of the entries.
        const have = new Set(list.map((e) => `${e.id.toString('hex')}@${e.offset}`));
        for (const e of p.entries) if (!have.has(`${e.id.toString('hex')}@${e.offset}`)) list.push(e);
      } else {
        packs.set(hex, [...p.entries]);
      }
    }
  }
  return packs;
}

function sameEntries(a: PackEntry[], b: PackEntry[]): string | undefined {
  const key = (e: PackEntry) => `${e.type}:${e.id.toString('hex')}:${e.offset}:${e.length}:${e.rawLength}:${e.base?.toString('hex') ?? ''}`;
  const inHeader = new Set(a.map(key));
  const inIndex = new Set(b.map(key));
  const onlyIndex = [...inIndex].filter((k) => !inHeader.has(k));
  if (onlyIndex.length > 0) return `the index lists ${onlyIndex.length} blob(s) the pack header does not (first: ${onlyIndex[0]})`;
  const onlyHeader = [...inHeader].filter((k) => !inIndex.has(k));
  if (onlyHeader.length > 0) return `the pack holds ${onlyHeader.length} blob(s) the index does not list (first: ${onlyHeader[0]})`;
  return undefined;
}

async function checkPacksAgainstIndex(repo: Repository, report: CheckReport): Promise<void> {
  const indexed = await indexedPacks(repo);
  const { plans } = await readPlans(repo.store, repo.keys);
  const scheduled = new Set(plans.flatMap((p) => [...p.header.unindexedPacks, ...p.header.deletePacks, ...p.header.repackedPacks]));
  const stored: Array<{ name: string; size: number; hex: string }> = [];
  for await (const b of repo.store.list('data/')) {
    const id = packIdFromName(b.name);
    if (id) stored.push({ ...b, hex: id.toString('hex') });
  }
  report.packs = stored.length;
  const present = new Set(stored.map((p) => p.hex));
  await mapLimit(stored, 16, async (p) => {
    const entries = indexed.get(p.hex);
    if (!entries) {
      report.notes.push({ kind: 'unindexed-pack', object: p.name, message: scheduled.has(p.hex) ? 'no index names it; a pending garbage collection will remove it' : 'no index names it (left by an interrupted backup or sync; `tresor gc` removes it)' });
      return;
    }
    let header: PackEntry[];
    try {
      header = await readPackHeader(repo.keys, p.name, p.size, tailReader(repo, p.name, p.size));
    } catch (err) {
      report.issues.push({ kind: 'pack-header', object: p.name, error: (err as Error).message });
      return;
    }
    const mismatch = sameEntries(header, entries);
    if (mismatch) report.issues.push({ kind: 'index-mismatch', object: p.name, error: mismatch });
  });
  for (const hex of indexed.keys()) {
    if (!present.has(hex)) {
      report.notes.push({ kind: 'index-names-missing-pack', object: packName(Buffer.from(hex, 'hex')), message: 'an index names this pack but it does not exist (an error only if a snapshot needs its blobs: see damage)' });
    }
  }
  const seen = new IdSet();
  let duplicates = 0;
  for (const entries of indexed.values()) for (const e of entries) if (!seen.add(e.id)) duplicates++;
  if (duplicates > 0) report.notes.push({ kind: 'duplicate-blobs', object: 'index', message: `${duplicates} blob(s) are stored more than once (harmless; \`tresor gc\` keeps one copy)` });
}

/** A ranged reader that fetches the last 64 KiB once: pack trailer and header in one request. */
function tailReader(repo: Repository, name: string, size: number): (offset: number, length: number) => Promise<Buffer> {
  const start = Math.max(0, size - (64 << 10));
  let tail: Promise<Buffer> | undefined;
  return async (offset, length) => {
    if (offset >= start) {
      tail ??= repo.store.read(name, { offset: start, length: size - start });
      const t = await tail;
      return t.subarray(offset - start, offset - start + length);
    }
    return repo.store.read(name, { offset, length });
  };
}

async function collectNotes(repo: Repository, report: CheckReport, snapshots: string[]): Promise<void> {
  const { plans, damaged } = await readPlans(repo.store, repo.keys);
  for (const p of plans) {
    report.notes.push({ kind: 'gc-pending', object: `gc/${p.header.id}/plan`, message: `a garbage collection started ${p.header.created} on ${p.header.host} waits to finish (${p.header.deletePacks.length + p.header.repackedPacks.length} packs to delete); run \`tresor gc\`` });
  }
  for (const name of damaged) report.notes.push({ kind: 'gc-pending', object: name, message: 'an unreadable garbage collection plan; the next `tresor gc` discards it' });
  const { records, unreadable } = await readDamageRecords(repo.store, repo.keys);
  for (const r of records) report.notes.push({ kind: 'damage-record', object: r.name, message: `${r.blobs.length} damaged blob copy(ies) recorded; the next backup of the same data stores fresh copies` });
  for (const u of unreadable) report.notes.push({ kind: 'damage-record', object: u.name, message: `unreadable damage record: ${u.error}` });
  const { damaged: badNotes } = await readSnapshotStates(repo, snapshots, await listNotes(repo));
  for (const n of badNotes) report.notes.push({ kind: 'unreadable-note', object: n.object, message: n.error });
  for (const l of await listLocks(repo.store, repo.keys)) {
    if (l.stale) report.notes.push({ kind: 'stale-lock', object: l.name, message: `stale lock of ${l.info?.operation ?? 'an unknown operation'} (pid ${l.info?.pid} on ${l.info?.host}); \`tresor unlock\` removes it` });
  }
}
