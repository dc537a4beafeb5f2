/**
 * `tresor prune`: applies retention rules (retention.ts) to each backup group (snapshots of the
 * same type and id) and deletes the manifests of the snapshots no rule keeps, then their notes.
 * `tresor forget`: the same for snapshots named one by one. Data is freed later by garbage
 * collection (gc.ts). Protected snapshots are never deleted. Every snapshot is complete on its
 * own (a synthetic full), so deleting one never breaks another.
 *
 * Prune takes a shared lock: it runs beside backups and restores. Deleting a manifest is atomic;
 * a crash between a manifest and its notes leaves orphan notes that GC removes. A snapshot
 * protected while prune runs is re-checked just before its manifest is deleted.
 */
import { TresorError, UsageError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';
import { requireFullAccess } from './access.ts';
import { deleteNotes, readSnapshotState, readSnapshotStates } from './notes.ts';
import type { Repository } from './repository.ts';
import { type RetentionPolicy, applyRetention, policyIsEmpty, RULES } from './retention.ts';

export interface PruneOptions {
  policy: RetentionPolicy;
  /** Only this backup id (all types); otherwise `all` must be set. */
  id?: string;
  all?: boolean;
  dryRun?: boolean;
  timeZone?: 'utc' | 'local';
}

export interface PruneDecisionReport {
  name: string;
  time: string;
  action: 'keep' | 'remove';
  reason: string;
}

export interface PruneReport {
  dryRun: boolean;
  groups: Array<{ group: string; snapshots: PruneDecisionReport[] }>;
  removed: string[];
  kept: number;
  /** Snapshots that were protected meanwhile and therefore not removed. */
  skipped: string[];
  /** Manifests that could not be read: never pruned. */
  unreadable: Array<{ object: string; error: string }>;
}

export function describePolicy(p: RetentionPolicy): string {
  return RULES.filter((r) => p[r]).map((r) => `keep-${r} ${p[r]}`).join(', ');
}

export async function pruneSnapshots(repo: Repository, opts: PruneOptions): Promise<PruneReport> {
  if (!opts.all && !opts.id) throw new UsageError('prune needs --id NAME or --all', 'say which backup groups the rules apply to');
  if (opts.all && opts.id) throw new UsageError('give either --id or --all, not both');
  if (policyIsEmpty(opts.policy)) {
    throw new UsageError('no retention rule given: prune would keep everything, or with a careless default delete everything',
      'give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly');
  }
  if (!opts.dryRun) await requireFullAccess(repo, 'prune snapshots');
  const lock = await repo.lock('shared', 'prune');
  try {
    const { snapshots, damaged } = await repo.listSnapshots(opts.id ? { id: opts.id } : undefined);
    const { states } = await readSnapshotStates(repo, snapshots.map((m) => m.name));
    const groups = new Map<string, typeof snapshots>();
    for (const m of snapshots) {
      const g = `${m.type}/${m.id}`;
      let list = groups.get(g);
      if (!list) groups.set(g, (list = []));
      list.push(m);
    }
    const report: PruneReport = { dryRun: opts.dryRun === true, groups: [], removed: [], kept: 0, skipped: [], unreadable: damaged };
    const doomed: string[] = [];
    for (const [group, list] of [...groups].sort(([a], [b]) => (a < b ? -1 : 1))) {
      const decisions = applyRetention(list.map((m) => ({ name: m.name, time: new Date(m.time), protected: states.get(m.name)?.protected })), opts.policy, { timeZone: opts.timeZone });
      report.groups.push({
        group,
        snapshots: decisions.map((d) => ({ name: d.name, time: d.time.toISOString(), action: d.keep ? 'keep' : 'remove', reason: d.reason })),
      });
      for (const d of decisions) {
        if (d.keep) report.kept++;
        else doomed.push(d.name);
      }
    }
    await removeSnapshots(repo, doomed, report);
    return report;
  } finally {
    await lock.release();
  }
}

export interface ForgetReport {
  dryRun: boolean;
  /** Deleted (with dryRun: would be deleted), sorted. */
  removed: string[];
  /** Protected between the check and the deletion: not deleted. */
  skipped: string[];
}

/**
 * Deletes the named snapshots (restic `forget ID`, Proxmox Backup Server "forget"). All names are
 * checked first: one that does not exist or is protected fails the call, and then nothing is
 * deleted, so a typo in a list never leaves it half done.
 */
export async function forgetSnapshots(repo: Repository, names: string[], opts: { dryRun?: boolean } = {}): Promise<ForgetReport> {
  const unique = [...new Set(names)].sort();
  if (unique.length === 0) throw new UsageError('forget needs at least one snapshot name', 'list them with `tresor snapshots`');
  if (!opts.dryRun) await requireFullAccess(repo, 'forget snapshots');
  const lock = await repo.lock('shared', 'forget');
  try {
    await mapLimit(unique, 8, (name) => repo.readSnapshot(name)); // each must exist (no-such-snapshot)
    const { states } = await readSnapshotStates(repo, unique);
    const protectedOnes = unique.filter((name) => states.get(name)?.protected);
    if (protectedOnes.length > 0) {
      throw new TresorError('snapshot-protected', `${protectedOnes.length === 1 ? 'snapshot' : 'snapshots'} ${protectedOnes.join(', ')} ${protectedOnes.length === 1 ? 'is' : 'are'} protected; nothing was deleted`, {
        hint: 'remove the protection first (`tresor unprotect NAME`), or leave protected snapshots out',
        context: { snapshots: protectedOnes },
      });
    }
    const report: ForgetReport = { dryRun: opts.dryRun === true, removed: [], skipped: [] };
    await removeSnapshots(repo, unique, report);
    return report;
  } finally {
    await lock.release();
  }
}

/**
 * Deletes `names` into `report.removed`, or `report.skipped` when protected meanwhile; a dry run
 * only lists them as removed.
 */
async function removeSnapshots(repo: Repository, names: string[], report: { dryRun: boolean; removed: string[]; skipped: string[] }): Promise<void> {
  if (report.dryRun) {
    report.removed = [...names];
    return;
  }
  await mapLimit(names, 8, async (name) => {
    if (await removeSnapshot(repo, name)) report.removed.push(name);
    else report.skipped.push(name);
  });
  report.removed.sort();
  report.skipped.sort();
}

/**
 * Deletes one snapshot's manifest, then its notes; false when it was protected meanwhile (checked
 * again just before: protection may be set while a prune or forget runs). Deleting the manifest
 * is atomic; a crash before the notes are gone leaves orphan notes that GC removes.
 */
async function removeSnapshot(repo: Repository, name: string): Promise<boolean> {
  if ((await readSnapshotState(repo, name)).protected) return false;
  await repo.store.delete(repo.snapshotKey(name));
  await deleteNotes(repo, name);
  return true;
}
