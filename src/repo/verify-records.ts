/**
 * Verification records: which snapshots to verify (`--all`, `--new`, `--older-than DAYS`) and
 * what is kept of a verification — the result and time per snapshot (a note, notes.ts) and the
 * damaged blob copies (a damage record, damage-records.ts, so the next backup heals them).
 */
import { UsageError } from '../util/errors.ts';
import { readDamageRecords, writeDamageRecord, type DamagedCopy } from './damage-records.ts';
import { readSnapshotStates, writeNote } from './notes.ts';
import type { Repository } from './repository.ts';
import type { VerifyReport } from './verify.ts';

export interface VerifySelection {
  /** Explicit snapshot names. */
  names?: string[];
  all?: boolean;
  /** Only snapshots never verified. */
  new?: boolean;
  /** Only snapshots never verified or last verified more than this many days ago. */
  olderThanDays?: number;
}

/** The snapshots to verify, or undefined for "all" (verify then also reads unreadable manifests). */
export async function selectSnapshots(repo: Repository, sel: VerifySelection, now = new Date()): Promise<string[] | undefined> {
  const modes = [sel.names && sel.names.length > 0, sel.all, sel.new, sel.olderThanDays !== undefined].filter(Boolean).length;
  if (modes > 1) throw new UsageError('give snapshot names, --all, --new or --older-than, not several', 'choose one way to select snapshots');
  if (sel.names && sel.names.length > 0) return sel.names;
  if (!sel.new && sel.olderThanDays === undefined) return undefined;
  if (sel.olderThanDays !== undefined && !(sel.olderThanDays >= 0)) throw new UsageError('--older-than needs a number of days ≥ 0');
  const { snapshots } = await repo.listSnapshots();
  const { states } = await readSnapshotStates(repo, snapshots.map((m) => m.name));
  const cutoff = sel.olderThanDays !== undefined ? now.getTime() - sel.olderThanDays * 86_400_000 : undefined;
  return snapshots.map((m) => m.name).filter((name) => {
    const v = states.get(name)?.verification;
    if (!v) return true;
    if (sel.new) return false;
    return Date.parse(v.time) < cutoff!;
  });
}

export interface RecordResult {
  notesWritten: number;
  damageRecord: string | undefined;
}

/** Records, per verified snapshot, the result and time; and the damaged copies found. */
export async function recordVerification(repo: Repository, report: VerifyReport, readData: boolean, at = new Date()): Promise<RecordResult> {
  const damagedBy = new Map<string, number>();
  for (const d of report.damage) for (const a of d.affects) damagedBy.set(a.snapshot, (damagedBy.get(a.snapshot) ?? 0) + 1);
  let notesWritten = 0;
  for (const name of report.snapshots) {
    const damaged = damagedBy.get(name) ?? 0;
    await writeNote(repo, name, { verification: { time: at.toISOString(), ok: damaged === 0, readData, damaged } }, at);
    notesWritten++;
  }
  const copies: DamagedCopy[] = [];
  // Copies recorded by an earlier verification are not recorded again.
  const seen = new Set<string>();
  if (report.damage.some((d) => d.copy)) {
    for (const r of (await readDamageRecords(repo.store, repo.keys)).records) for (const b of r.blobs) seen.add(`${b.id}@${b.pack}`);
  }
  for (const d of report.damage) {
    if (!d.copy) continue;
    const key = `${d.copy.id}@${d.copy.pack}`;
    if (seen.has(key)) continue;
    seen.add(key);
    copies.push({ type: d.copy.type, id: d.copy.id, pack: d.copy.pack, error: d.error });
  }
  const damageRecord = await writeDamageRecord(repo.store, repo.keys, copies, at);
  return { notesWritten, damageRecord };
}
