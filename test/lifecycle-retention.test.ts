/**
 * Retention rule semantics (src/repo/retention.ts) on synthetic snapshot times: table-driven
 * cases from the restic and Proxmox Backup Server documentation, and a comparison with the real
 * `restic forget --dry-run` (Debian's restic) on the same times — equal wherever the two tools
 * agree (single-rule policies), and the documented difference where they do not.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { applyRetention, isoWeek, type RetentionPolicy } from '../src/repo/retention.ts';
import { tempDir } from './helpers/tmp.ts';
import { run } from './helpers/exec.ts';

const t = (iso: string) => new Date(iso.endsWith('Z') ? iso : `${iso}Z`);
const snaps = (times: string[], protectedTimes: string[] = []) => times.map((x) => ({ name: x, time: t(x), protected: protectedTimes.includes(x) }));
const kept = (times: string[], policy: RetentionPolicy, protectedTimes: string[] = []) =>
  applyRetention(snaps(times, protectedTimes), policy).filter((d) => d.keep).map((d) => d.name).sort();

/** restic's documented example (doc/060_forget.rst): one backup every Sunday for 12 weeks. */
const SUNDAYS = ['2019-09-01T11:00:00', '2019-09-08T11:00:00', '2019-09-15T11:00:00', '2019-09-22T11:00:00', '2019-09-29T11:00:00',
  '2019-10-06T11:00:00', '2019-10-13T11:00:00', '2019-10-20T11:00:00', '2019-10-27T11:00:00', '2019-11-03T11:00:00',
  '2019-11-10T11:00:00', '2019-11-17T11:00:00'];

/** The Sundays plus several per day, per week, across a month end and an ISO year boundary. */
const MIXED = [...SUNDAYS, '2019-11-17T08:00:00', '2019-11-16T23:30:00', '2019-10-31T22:00:00', '2019-11-01T01:00:00',
  '2019-12-31T23:00:00', '2020-01-05T10:00:00', '2020-01-06T10:00:00'];

describe('retention rules (PBS semantics)', () => {
  const table: Array<{ what: string; times: string[]; policy: RetentionPolicy; keep: string[]; protectedTimes?: string[] }> = [
    {
      what: 'restic doc: 12 Sundays, --keep-daily 4 keeps the last four Sundays',
      times: SUNDAYS, policy: { daily: 4 },
      keep: ['2019-10-27T11:00:00', '2019-11-03T11:00:00', '2019-11-10T11:00:00', '2019-11-17T11:00:00'],
    },
    { what: 'keep-last 3', times: SUNDAYS, policy: { last: 3 }, keep: SUNDAYS.slice(-3) },
    {
      what: 'several snapshots a day: only the newest of each day counts',
      times: ['2026-01-01T00:00:00', '2026-01-01T06:00:00', '2026-01-01T18:00:00', '2026-01-02T06:00:00', '2026-01-02T18:00:00', '2026-01-03T06:00:00', '2026-01-03T18:00:00'],
      policy: { daily: 2 }, keep: ['2026-01-02T18:00:00', '2026-01-03T18:00:00'],
    },
    {
      what: 'a later rule skips periods an earlier rule covered and looks only at older snapshots',
      times: ['2026-01-01T18:00:00', '2026-01-02T18:00:00', '2026-01-03T06:00:00', '2026-01-03T18:00:00'],
      policy: { last: 1, daily: 2 }, keep: ['2026-01-01T18:00:00', '2026-01-02T18:00:00', '2026-01-03T18:00:00'],
    },
    {
      what: 'periods without snapshots do not count',
      times: ['2026-03-01T12:00:00', '2026-03-02T12:00:00', '2026-03-09T12:00:00', '2026-03-10T12:00:00'],
      policy: { daily: 3 }, keep: ['2026-03-02T12:00:00', '2026-03-09T12:00:00', '2026-03-10T12:00:00'],
    },
    {
      what: 'ISO weeks: 2019-12-31 and 2020-01-05 are one week (2020-W01), 2020-01-06 the next',
      times: ['2019-12-31T23:00:00', '2020-01-05T10:00:00', '2020-01-06T10:00:00'],
      policy: { weekly: 2 }, keep: ['2020-01-05T10:00:00', '2020-01-06T10:00:00'],
    },
    {
      what: 'months and years: 2019 is covered by the monthly of December, so the yearly rule finds nothing older to keep',
      times: MIXED, policy: { monthly: 2, yearly: 1 },
      keep: ['2019-12-31T23:00:00', '2020-01-06T10:00:00'],
    },
    {
      what: 'months and years: with one monthly, the yearly rule keeps the newest of 2019',
      times: MIXED, policy: { monthly: 1, yearly: 2 },
      keep: ['2019-12-31T23:00:00', '2020-01-06T10:00:00'],
    },
    {
      what: 'protected snapshots are kept and count for no rule',
      times: SUNDAYS, policy: { last: 2 }, protectedTimes: ['2019-11-17T11:00:00', '2019-09-01T11:00:00'],
      keep: ['2019-09-01T11:00:00', '2019-11-03T11:00:00', '2019-11-10T11:00:00', '2019-11-17T11:00:00'],
    },
  ];
  for (const c of table) {
    it(c.what, () => {
      assert.deepEqual(kept(c.times, c.policy, c.protectedTimes), [...c.keep].sort());
    });
  }

  it('restic doc: a daily backup for 100 years with --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75', () => {
    // restic keeps 7 + 4 + (12 or 11) + (75 or 74): its rules overlap. Here each rule takes only
    // periods no earlier rule covered, so exactly 7 + 5 + 12 + 75.
    const times: string[] = [];
    for (let d = Date.UTC(1925, 0, 1); d < Date.UTC(2025, 0, 1); d += 86_400_000) times.push(new Date(d).toISOString().slice(0, 19));
    const decisions = applyRetention(snaps(times), { daily: 7, weekly: 5, monthly: 12, yearly: 75 });
    const by = (r: string) => decisions.filter((d) => d.reason === r).length;
    assert.deepEqual([by('keep-daily'), by('keep-weekly'), by('keep-monthly'), by('keep-yearly')], [7, 5, 12, 75]);
    assert.equal(decisions.filter((d) => d.keep).length, 99);
    // The dailies are the last 7 days; the weeklies are Sundays before them.
    assert.equal(decisions[0].name, '2024-12-31T00:00:00');
    for (const d of decisions.filter((x) => x.reason === 'keep-weekly')) assert.equal(d.time.getUTCDay(), 0, d.name);
  });

  it('an empty policy keeps everything; negative counts are refused', () => {
    assert.equal(kept(SUNDAYS, {}).length, SUNDAYS.length);
    assert.throws(() => applyRetention(snaps(SUNDAYS), { daily: -1 }), /whole number/);
  });

  it('ISO week numbers match the calendar', () => {
    assert.deepEqual(isoWeek(2020, 11, 31), { year: 2020, week: 53 });
    assert.deepEqual(isoWeek(2021, 0, 3), { year: 2020, week: 53 });
    assert.deepEqual(isoWeek(2021, 0, 4), { year: 2021, week: 1 });
    assert.deepEqual(isoWeek(2019, 11, 30), { year: 2020, week: 1 });
  });
});

describe('retention compared with restic forget', () => {
  let dir: { path: string; cleanup(): Promise<void> };
  let env: Record<string, string>;
  const restic = async (args: string[]) => {
    const { execFile } = await import('node:child_process');
    return new Promise<string>((resolve, reject) => {
      execFile('restic', args, { env: { ...process.env, ...env }, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`restic ${args.join(' ')}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'restic is not installed (Debian package restic)' : stderr}`));
        else resolve(stdout);
      });
    });
  };
  const resticKeeps = async (policy: RetentionPolicy): Promise<string[]> => {
    const flags = Object.entries(policy).flatMap(([k, v]) => [`--keep-${k}`, String(v)]);
    const groups = JSON.parse(await restic(['forget', '--dry-run', '--json', '--host', 'tresor-test', ...flags])) as Array<{ keep: Array<{ time: string }> }>;
    return groups.flatMap((g) => g.keep.map((s) => s.time.replace(/Z$/, '').replace(/\.\d+$/, ''))).sort();
  };

  before(async () => {
    dir = await tempDir('tresor-restic-');
    env = { RESTIC_PASSWORD: 'retention-test', RESTIC_REPOSITORY: join(dir.path, 'repo'), TZ: 'UTC', RESTIC_CACHE_DIR: join(dir.path, 'cache') };
    await run('restic', ['version']);
    await mkdir(join(dir.path, 'data'));
    await writeFile(join(dir.path, 'data', 'f'), 'x');
    await restic(['init', '-q']);
    for (const time of MIXED) await restic(['backup', '-q', '--host', 'tresor-test', '--time', time.replace('T', ' '), join(dir.path, 'data')]);
  });
  after(async () => dir?.cleanup());

  for (const policy of [{ last: 5 }, { hourly: 4 }, { daily: 4 }, { weekly: 3 }, { monthly: 3 }, { yearly: 2 }, { last: 1, yearly: 2 }] as RetentionPolicy[]) {
    it(`agrees on ${JSON.stringify(policy)}`, async () => {
      assert.deepEqual(kept(MIXED, policy), await resticKeeps(policy));
    });
  }

  it('differs where restic documents overlapping rules: --keep-daily 2 --keep-weekly 2', async () => {
    const ours = kept(MIXED, { daily: 2, weekly: 2 });
    const theirs = await resticKeeps({ daily: 2, weekly: 2 });
    // restic: the two newest days are also the two newest weeks, so it keeps 2. Here the weekly
    // rule takes the two newest weeks not covered by the dailies.
    assert.deepEqual(theirs, ['2020-01-05T10:00:00', '2020-01-06T10:00:00']);
    assert.deepEqual(ours, ['2019-11-10T11:00:00', '2019-11-17T11:00:00', '2020-01-05T10:00:00', '2020-01-06T10:00:00']);
  });

  it('differs on --keep-last 1 --keep-daily 4: the day of the last snapshot is covered, four older days follow', async () => {
    assert.deepEqual(await resticKeeps({ last: 1, daily: 4 }), ['2019-11-17T11:00:00', '2019-12-31T23:00:00', '2020-01-05T10:00:00', '2020-01-06T10:00:00']);
    assert.deepEqual(kept(MIXED, { last: 1, daily: 4 }), ['2019-11-16T23:30:00', '2019-11-17T11:00:00', '2019-12-31T23:00:00', '2020-01-05T10:00:00', '2020-01-06T10:00:00']);
  });
});
