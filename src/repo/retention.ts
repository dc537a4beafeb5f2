/**
 * Retention rules: which snapshots of one backup group (same type and id) to keep.
 *
 * The rules are those of Proxmox Backup Server's prune (pbs-datastore prune.rs; the PBS
 * documentation: "The retention options are processed in the order given above. Each option only
 * covers backups within its time period. The next option does not take care of already covered
 * backups. It will only consider older backups."), evaluated newest first:
 *
 *  keep-last N     the N newest snapshots;
 *  keep-hourly N   for the N newest hours that have snapshots not yet decided, the newest
 *                  snapshot of each hour; then likewise keep-daily, keep-weekly (ISO weeks,
 *                  Monday to Sunday), keep-monthly, keep-yearly.
 *
 * Precisely, per rule: periods that already contain a kept snapshot are skipped (they count for
 * nothing); among the undecided snapshots, newest first, the first of each new period is kept
 * and the others of that period are marked for removal (later rules do not look at them again);
 * the rule stops after N periods. Periods without snapshots do not count. What no rule keeps is
 * removed; protected snapshots are never removed and count for no rule.
 *
 * Differences from restic's `forget` (doc/060_forget.rst, internal/restic/snapshot_policy.go):
 * restic evaluates every rule over all snapshots independently and ORs the results, so the
 * newest daily is also a weekly, monthly and yearly there ("--keep-daily 7 --keep-weekly 5" keeps
 * 7 + 4 snapshots of a daily series, here 7 + 5), and restic (0.17+) additionally keeps the
 * oldest snapshot while a rule has counts left. Both agree on single-rule policies.
 *
 * Calendar periods are taken in UTC by default (snapshot names are UTC), or in the local time
 * zone of the process with `timeZone: 'local'` (what restic and PBS do).
 */

export interface RetentionPolicy {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
}

export const RULES = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;
export type RuleName = (typeof RULES)[number];

export interface RetentionInput {
  /** Unique key (the snapshot name). */
  name: string;
  time: Date;
  protected?: boolean;
}

export interface RetentionDecision {
  name: string;
  time: Date;
  keep: boolean;
  /** Why: `keep-daily`, `protected`, or `remove`. */
  reason: `keep-${RuleName}` | 'protected' | 'remove';
}

export function policyIsEmpty(p: RetentionPolicy): boolean {
  return RULES.every((r) => !p[r]);
}

function pad(n: number, width = 2): string {
  return String(n).padStart(width, '0');
}

/** ISO 8601 week-numbering year and week of a calendar date. */
export function isoWeek(year: number, month: number, day: number): { year: number; week: number } {
  const d = new Date(Date.UTC(year, month, day));
  const dow = d.getUTCDay() || 7; // Monday 1 … Sunday 7
  d.setUTCDate(d.getUTCDate() + 4 - dow); // the Thursday of this week decides the year
  const y = d.getUTCFullYear();
  const week = Math.ceil(((d.getTime() - Date.UTC(y, 0, 1)) / 86_400_000 + 1) / 7);
  return { year: y, week };
}

type PeriodOf = (t: Date, index: number) => string;

function periodFunctions(timeZone: 'utc' | 'local'): Record<RuleName, PeriodOf> {
  const parts = (t: Date) => timeZone === 'utc'
    ? { y: t.getUTCFullYear(), m: t.getUTCMonth(), d: t.getUTCDate(), h: t.getUTCHours() }
    : { y: t.getFullYear(), m: t.getMonth(), d: t.getDate(), h: t.getHours() };
  return {
    last: (_t, i) => `#${i}`,
    hourly: (t) => { const p = parts(t); return `${p.y}-${pad(p.m + 1)}-${pad(p.d)}T${pad(p.h)}`; },
    daily: (t) => { const p = parts(t); return `${p.y}-${pad(p.m + 1)}-${pad(p.d)}`; },
    weekly: (t) => { const p = parts(t); const w = isoWeek(p.y, p.m, p.d); return `${w.year}-W${pad(w.week)}`; },
    monthly: (t) => { const p = parts(t); return `${p.y}-${pad(p.m + 1)}`; },
    yearly: (t) => String(parts(t).y),
  };
}

/**
 * Decides, for one group of snapshots, which to keep. Returns one decision per input, newest
 * first. An empty policy keeps everything (a caller that means "delete all" must say so).
 */
export function applyRetention(snapshots: RetentionInput[], policy: RetentionPolicy, opts: { timeZone?: 'utc' | 'local' } = {}): RetentionDecision[] {
  for (const r of RULES) {
    const n = policy[r];
    if (n !== undefined && (!Number.isSafeInteger(n) || n < 0)) throw new RangeError(`keep-${r} must be a whole number ≥ 0, not ${n}`);
  }
  const list = [...snapshots].sort((a, b) => b.time.getTime() - a.time.getTime() || (a.name < b.name ? 1 : a.name > b.name ? -1 : 0));
  const mark = new Map<string, RetentionDecision['reason']>();
  for (const s of list) if (s.protected) mark.set(s.name, 'protected');
  if (policyIsEmpty(policy)) {
    return list.map((s) => ({ name: s.name, time: s.time, keep: true, reason: mark.get(s.name) ?? 'keep-last' }));
  }
  const periodOf = periodFunctions(opts.timeZone ?? 'utc');
  for (const rule of RULES) {
    const keep = policy[rule] ?? 0;
    if (keep <= 0) continue;
    const period = periodOf[rule];
    // Periods already covered by a snapshot kept by an earlier rule count for nothing.
    const covered = new Set<string>();
    list.forEach((s, i) => {
      const m = mark.get(s.name);
      if (m !== undefined && m !== 'remove' && m !== 'protected') covered.add(period(s.time, i));
    });
    const chosen = new Set<string>();
    for (let i = 0; i < list.length; i++) {
      const s = list[i];
      if (mark.has(s.name)) continue;
      const p = period(s.time, i);
      if (covered.has(p)) continue;
      if (!chosen.has(p)) {
        if (chosen.size >= keep) break;
        chosen.add(p);
        mark.set(s.name, `keep-${rule}`);
      } else {
        mark.set(s.name, 'remove');
      }
    }
  }
  return list.map((s) => {
    const reason = mark.get(s.name) ?? 'remove';
    return { name: s.name, time: s.time, keep: reason !== 'remove', reason };
  });
}
