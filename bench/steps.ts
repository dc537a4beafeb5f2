/**
 * One measured step of the benchmark and the runner that records it: the command's wall time,
 * CPU time and peak RSS (bench/measure.ts), repository growth, and how busy the rest of the
 * machine was meanwhile ("busy machine" contention accounting). In the live-VM mode a step can
 * also name a QEMU process whose CPU time is counted for the step: the work the hypervisor does
 * for a backup (NBD export, copy-before-write) belongs to that backup. And a step can name helper
 * daemons its command starts and leaves behind (virtnbdrestore's `qemu-nbd --fork`, which still
 * flushes the restored image after virtnbdrestore exits): the step lasts until they are gone, and
 * their CPU time and memory count as the step's. Every step ends with `sync`, inside its wall
 * time: a step is done when its output is durable, whether the tool fsyncs or not.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, readdirSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { describeError } from '../src/util/errors.ts';
import { formatSize } from './corpus.ts';
import { CommandFailedError, directoryBytes, runChecked } from './measure.ts';
import type { CacheDropper, CommandSpec, Measurement } from './measure.ts';
import type { StepRecord } from './report.ts';

export interface StepPlan {
  tool: string;
  label: string;
  step: string;
  /** builds the measured command; may throw (e.g. nothing to restore) */
  command: () => CommandSpec;
  /** repository to size before and after the step */
  repoDir?: string;
  /** the disk the step processes, for MiB/s */
  disk?: { size: number; allocated: number };
  /** a QEMU process working for the step: its CPU time is recorded and not counted as contention */
  qemuPid?: number;
  /** daemons the command leaves running whose work is part of the step (see HelperWatcher) */
  helpers?: HelperMatch;
  /** checks and extra figures once the command succeeded; a throw fails the step */
  after?: (measurement: Measurement) => Promise<Partial<StepRecord>> | Partial<StepRecord>;
}

const MIB = 1024 * 1024;
/** Other processes using more than this share of the CPUs during a step make its timing suspect. */
export const BUSY_SHARE = 0.15;
/** /proc/stat counts in USER_HZ, 100 on every Linux architecture Node runs on. */
const USER_HZ = 100;

/** CPU seconds all processes have used since boot (every state but idle and iowait). */
export function systemCpuSeconds(): number | undefined {
  try {
    const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is already inside user)
    const [user, nice, system, , , irq, softirq, steal] = fields;
    return (user + nice + system + irq + softirq + (steal ?? 0)) / USER_HZ;
  } catch {
    return undefined;
  }
}

/**
 * CPU seconds (utime + stime, all threads) one process has used, from /proc/PID/stat; undefined
 * when it is gone. The command name (field 2) may hold spaces and parentheses, so the fields are
 * counted from the last ')'.
 */
export function processCpuSeconds(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // after the name: state(3) ppid(4) ... utime(14) stime(15) → indexes 11 and 12 here
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    return Number.isFinite(utime) && Number.isFinite(stime) ? (utime + stime) / USER_HZ : undefined;
  } catch {
    return undefined;
  }
}

/** Peak resident set (VmHWM) of a process in bytes; undefined when it is gone. */
function processPeakRss(pid: number): number | undefined {
  try {
    const match = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match === null ? undefined : Number(match[1]) * 1024;
  } catch {
    return undefined;
  }
}

/** Which processes are a step's helpers: this executable, with this argument on its command line. */
export interface HelperMatch {
  executable: string;
  argument: string;
}

/** How often /proc is scanned for new helpers while the command runs, and how often known ones are sampled at the end. */
const HELPER_SCAN_MS = 100;
const HELPER_POLL_MS = 20;

/**
 * Follows daemons a command starts that outlive it (found by command line in /proc): samples their
 * CPU time and peak RSS until they exit. A daemon is not a waited-for child of the command, so GNU
 * time sees none of it. The last sample before a helper exits is at most HELPER_SCAN_MS old while
 * the command runs and HELPER_POLL_MS old after it exited.
 */
class HelperWatcher {
  private readonly match: HelperMatch;
  private readonly last = new Map<number, { cpu: number; rss: number }>();
  private timer: NodeJS.Timeout | undefined;

  constructor(match: HelperMatch) {
    this.match = match;
    this.timer = setInterval(() => this.scan(), HELPER_SCAN_MS);
  }

  /** Finds matching processes and samples them; returns how many are alive. */
  private scan(): number {
    let alive = 0;
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      let argv: string[];
      try {
        argv = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      } catch {
        continue;
      }
      if (argv[0]?.split('/').pop() !== this.match.executable || !argv.some((a) => a.includes(this.match.argument))) continue;
      if (this.sample(Number(entry))) alive++;
    }
    return alive;
  }

  private sample(pid: number): boolean {
    const cpu = processCpuSeconds(pid);
    if (cpu === undefined) return false;
    const rss = processPeakRss(pid) ?? 0;
    this.last.set(pid, { cpu, rss: Math.max(rss, this.last.get(pid)?.rss ?? 0) });
    return true;
  }

  /** Waits until no helper is left (at most timeoutMs); returns their figures and the wait. */
  async finish(timeoutMs: number): Promise<{ cpuSeconds: number; peakRssBytes: number; waitSeconds: number; count: number }> {
    this.stop();
    const started = performance.now();
    while (performance.now() - started < timeoutMs) {
      let alive = 0;
      for (const pid of this.last.keys()) if (this.sample(pid)) alive++;
      // A rescan catches a helper that appeared after the last periodic scan.
      if (alive === 0 && this.scan() === 0) break;
      await new Promise((resolve) => setTimeout(resolve, HELPER_POLL_MS));
    }
    let cpuSeconds = 0;
    let peakRssBytes = 0;
    for (const { cpu, rss } of this.last.values()) {
      cpuSeconds += cpu;
      peakRssBytes = Math.max(peakRssBytes, rss);
    }
    return { cpuSeconds, peakRssBytes, waitSeconds: (performance.now() - started) / 1000, count: this.last.size };
  }

  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
  }
}

export function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`;
}

export class StepRunner {
  readonly steps: StepRecord[] = [];
  private readonly logDir: string;
  private readonly cache: CacheDropper;
  private readonly useGnuTime: boolean;
  private readonly timeoutMs: number;
  private readonly started = performance.now();

  constructor(scratch: string, cache: CacheDropper, useGnuTime: boolean, timeoutMs: number) {
    this.logDir = join(scratch, 'logs');
    mkdirSync(this.logDir, { recursive: true });
    this.cache = cache;
    this.useGnuTime = useGnuTime;
    this.timeoutMs = timeoutMs;
  }

  /** Where the steps' command logs go (other log files of a run may go there too). */
  get logDirectory(): string {
    return this.logDir;
  }

  progress(message: string): void {
    const elapsed = ((performance.now() - this.started) / 1000).toFixed(0).padStart(5);
    process.stderr.write(`[${elapsed} s] ${message}\n`);
  }

  skip(tool: string, label: string, step: string, reason: string): void {
    this.steps.push({ tool, label, step, status: 'skipped', error: reason, cacheDropped: false });
    this.progress(`${label} ${step}: skipped (${reason})`);
  }

  /** Runs one measured step; never throws: a failure is recorded and the run goes on. */
  async run(plan: StepPlan): Promise<StepRecord> {
    const record: StepRecord = { tool: plan.tool, label: plan.label, step: plan.step, status: 'failed', cacheDropped: false };
    this.steps.push(record);
    this.progress(`${plan.label} ${plan.step} ...`);
    try {
      const spec = plan.command();
      record.command = spec.argv.map(shellQuote).join(' ');
      const before = plan.repoDir === undefined ? undefined : directoryBytes(plan.repoDir);
      record.cacheDropped = this.cache.drop();
      const cpuBefore = systemCpuSeconds();
      const qemuBefore = plan.qemuPid === undefined ? undefined : processCpuSeconds(plan.qemuPid);
      const helpers = plan.helpers === undefined ? undefined : new HelperWatcher(plan.helpers);
      let measurement: Measurement;
      try {
        measurement = await runChecked(spec, {
          logBase: join(this.logDir, `${plan.tool}-${plan.step}`.replace(/[^\w@.-]+/g, '-')),
          timeoutMs: this.timeoutMs,
          useGnuTime: this.useGnuTime,
        });
      } catch (err) {
        helpers?.stop();
        if (err instanceof CommandFailedError) this.recordTimes(record, err.measurement, plan);
        throw err;
      }
      if (helpers !== undefined) measurement = withHelpers(record, measurement, await helpers.finish(this.timeoutMs));
      measurement = withSync(record, measurement);
      const qemuAfter = plan.qemuPid === undefined ? undefined : processCpuSeconds(plan.qemuPid);
      if (qemuBefore !== undefined && qemuAfter !== undefined) record.qemuCpuSeconds = qemuAfter - qemuBefore;
      this.recordTimes(record, measurement, plan);
      this.recordContention(record, cpuBefore, systemCpuSeconds());
      if (plan.repoDir !== undefined && before !== undefined) {
        record.repoBytes = directoryBytes(plan.repoDir);
        record.addedBytes = record.repoBytes - before;
      }
      if (plan.after !== undefined) Object.assign(record, await plan.after(measurement));
      record.status = 'ok';
      this.progress(`${plan.label} ${plan.step}: ${record.wallSeconds?.toFixed(2)} s`
        + (record.qemuCpuSeconds !== undefined ? `, qemu CPU ${record.qemuCpuSeconds.toFixed(1)} s` : '')
        + (record.repoBytes !== undefined ? `, repository ${formatSize(record.repoBytes)}` : ''));
    } catch (err) {
      record.error = describeError(err);
      this.progress(`${plan.label} ${plan.step}: FAILED: ${record.error}`);
    }
    return record;
  }

  private recordContention(record: StepRecord, cpuBefore: number | undefined, cpuAfter: number | undefined): void {
    if (cpuBefore === undefined || cpuAfter === undefined || record.cpuSeconds === undefined) return;
    const capacity = (record.wallSeconds ?? 0) * availableParallelism();
    if (capacity <= 0) return;
    // The step's QEMU works for the step: not "other processes".
    const own = record.cpuSeconds + (record.qemuCpuSeconds ?? 0);
    const others = Math.max(0, cpuAfter - cpuBefore - own);
    record.othersCpuShare = others / capacity;
    record.busyMachine = record.othersCpuShare > BUSY_SHARE;
  }

  private recordTimes(record: StepRecord, m: Measurement, plan: StepPlan): void {
    record.wallSeconds = m.wallSeconds;
    record.userSeconds = m.userSeconds;
    record.sysSeconds = m.sysSeconds;
    record.cpuSeconds = m.userSeconds !== undefined && m.sysSeconds !== undefined ? m.userSeconds + m.sysSeconds : undefined;
    record.peakRssBytes = m.peakRssBytes;
    if (plan.disk !== undefined && m.wallSeconds > 0) {
      record.diskBytes = plan.disk.size;
      record.allocatedBytes = plan.disk.allocated;
      record.diskMiBps = plan.disk.size / MIB / m.wallSeconds;
      record.allocatedMiBps = plan.disk.allocated / MIB / m.wallSeconds;
    }
  }
}

/** The step lasts until its output is durable: `sync` runs and its time joins the wall time. */
function withSync(record: StepRecord, m: Measurement): Measurement {
  const started = performance.now();
  spawnSync('sync');
  record.syncSeconds = (performance.now() - started) / 1000;
  return { ...m, wallSeconds: m.wallSeconds + record.syncSeconds };
}

/** The step lasts until its helpers are gone; their CPU adds to the command's, their memory competes for the peak. */
function withHelpers(record: StepRecord, m: Measurement, h: { cpuSeconds: number; peakRssBytes: number; waitSeconds: number; count: number }): Measurement {
  record.helperCpuSeconds = h.cpuSeconds;
  record.helperWaitSeconds = h.waitSeconds;
  record.helperCount = h.count;
  return {
    ...m,
    wallSeconds: m.wallSeconds + h.waitSeconds,
    userSeconds: m.userSeconds === undefined ? undefined : m.userSeconds + h.cpuSeconds,
    peakRssBytes: m.peakRssBytes === undefined ? undefined : Math.max(m.peakRssBytes, h.peakRssBytes),
  };
}
