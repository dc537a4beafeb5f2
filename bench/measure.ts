/**
 * Running and measuring external commands for the benchmark: wall time, user+sys CPU time and peak
 * RSS of each command (GNU time, which reads the child's rusage from wait4), plus the helpers the
 * steps need around them (page-cache drop, repository size, file digests).
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, createReadStream, existsSync, openSync, readFileSync, readSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, constants, cpus, release, totalmem, type as osType } from 'node:os';
import { join } from 'node:path';
import { TresorError } from '../src/util/errors.ts';
import { formatSize } from './corpus.ts';

export const GNU_TIME = '/usr/bin/time';

export interface Measurement {
  wallSeconds: number;
  /** undefined when GNU time is missing (then only wall time is known) */
  userSeconds?: number;
  sysSeconds?: number;
  peakRssBytes?: number;
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface CommandSpec {
  argv: string[];
  cwd: string;
  env: NodeJS.ProcessEnv;
}

/** A command that ran but failed; carries the tail of its output so the report can say why. */
export class CommandFailedError extends TresorError {
  readonly measurement: Measurement;

  constructor(spec: CommandSpec, measurement: Measurement) {
    const tail = lastLines(measurement.stderr.trim() || measurement.stdout.trim(), 6);
    super('bench-command-failed', `\`${spec.argv.join(' ')}\` exited with ${measurement.exitCode}${tail ? `: ${tail}` : ''}`, {
      context: { cwd: spec.cwd, exitCode: measurement.exitCode },
      hint: 'see the command logs in the scratch directory (run with --keep to keep them)',
    });
    this.measurement = measurement;
  }
}

export function lastLines(text: string, count: number): string {
  return text.split('\n').slice(-count).join(' | ');
}

export function hasGnuTime(): boolean {
  if (!existsSync(GNU_TIME)) return false;
  const probe = spawnSync(GNU_TIME, ['-f', '%M', 'true'], { encoding: 'utf8' });
  return probe.status === 0 && /^\d+\s*$/.test(probe.stderr.trim().split('\n').pop() ?? '');
}

export interface RunOptions {
  /** where stdout/stderr/time output go, as LOGBASE.out / .err / .time */
  logBase: string;
  timeoutMs: number;
  useGnuTime: boolean;
  /** keep at most this many bytes of stdout in memory (the full output stays in the log file) */
  keepStdoutBytes?: number;
}

let activeGroup: number | undefined;

/** Kills the command that is running now (its whole process group), e.g. on Ctrl-C. */
export function killActiveCommand(): void {
  if (activeGroup === undefined) return;
  try { process.kill(-activeGroup, 'SIGKILL'); } catch { /* already gone */ }
}

/**
 * Runs one command to completion and measures it. The command gets its own process group so a
 * timeout kills everything it started. Never throws for a non-zero exit: the caller decides.
 */
export async function runMeasured(spec: CommandSpec, options: RunOptions): Promise<Measurement> {
  const outFile = `${options.logBase}.out`;
  const errFile = `${options.logBase}.err`;
  const timeFile = `${options.logBase}.time`;
  const argv = options.useGnuTime
    ? [GNU_TIME, '-f', '%e %U %S %M', '-o', timeFile, '--', ...spec.argv]
    : spec.argv;
  const outFd = openSync(outFile, 'w');
  const errFd = openSync(errFile, 'w');
  const started = process.hrtime.bigint();
  let exitCode: number;
  try {
    exitCode = await new Promise<number>((resolve, reject) => {
      const child = spawn(argv[0], argv.slice(1), {
        cwd: spec.cwd,
        env: spec.env,
        stdio: ['ignore', outFd, errFd],
        detached: true,
      });
      activeGroup = child.pid;
      const timer = setTimeout(() => {
        if (child.pid !== undefined) try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
      }, options.timeoutMs);
      child.on('error', (err) => { clearTimeout(timer); reject(err); });
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        resolve(code ?? (signal !== null ? 128 + signalNumber(signal) : 1));
      });
    });
  } finally {
    activeGroup = undefined;
    closeSync(outFd);
    closeSync(errFd);
  }
  const wallSeconds = Number(process.hrtime.bigint() - started) / 1e9;
  const measurement: Measurement = {
    wallSeconds,
    exitCode,
    stdout: readTail(outFile, options.keepStdoutBytes ?? 1024 * 1024),
    stderr: readTail(errFile, 64 * 1024),
  };
  if (options.useGnuTime) Object.assign(measurement, parseGnuTime(timeFile));
  return measurement;
}

/** Runs a command, throwing CommandFailedError when it exits non-zero. */
export async function runChecked(spec: CommandSpec, options: RunOptions): Promise<Measurement> {
  const measurement = await runMeasured(spec, options);
  if (measurement.exitCode !== 0) throw new CommandFailedError(spec, measurement);
  return measurement;
}

function signalNumber(signal: NodeJS.Signals): number {
  return constants.signals[signal] ?? 0;
}

/**
 * GNU time writes "Command exited with non-zero status N" (or "terminated by signal") before the
 * format line when the child failed; the figures are always on the last line.
 */
function parseGnuTime(file: string): Partial<Measurement> {
  if (!existsSync(file)) return {};
  const last = readFileSync(file, 'utf8').trim().split('\n').pop() ?? '';
  const fields = last.trim().split(/\s+/).map(Number);
  if (fields.length !== 4 || fields.some((f) => !Number.isFinite(f))) return {};
  const [, user, sys, rssKiB] = fields;
  return { userSeconds: user, sysSeconds: sys, peakRssBytes: rssKiB * 1024 };
}

function readTail(file: string, maxBytes: number): string {
  const size = statSync(file).size;
  const fd = openSync(file, 'r');
  try {
    const length = Math.min(size, maxBytes);
    const buffer = Buffer.alloc(length);
    let read = 0;
    while (read < length) {
      const n = readSync(fd, buffer, read, length - read, size - length + read);
      if (n === 0) break;
      read += n;
    }
    return buffer.subarray(0, read).toString('utf8');
  } finally {
    closeSync(fd);
  }
}

/** A quick command whose output we want (versions, du); empty string when it fails. */
export function capture(argv: string[], env: NodeJS.ProcessEnv = process.env): string {
  const result = spawnSync(argv[0], argv.slice(1), { encoding: 'utf8', env, timeout: 60_000 });
  if (result.status !== 0) return '';
  return `${result.stdout}${result.stdout.trim() === '' ? result.stderr : ''}`.trim();
}

/** Apparent size of a directory tree in bytes (`du -sb`), 0 when it does not exist. */
export function directoryBytes(path: string): number {
  if (!existsSync(path)) return 0;
  const result = spawnSync('du', ['-sb', path], { encoding: 'utf8' });
  if (result.status === 0) return Number(result.stdout.split(/\s/)[0]);
  // du fails when a file vanishes mid-walk; walk ourselves then.
  return walkBytes(path);
}

function walkBytes(path: string): number {
  const stat = statSync(path, { throwIfNoEntry: false });
  if (stat === undefined) return 0;
  if (!stat.isDirectory()) return stat.size;
  let total = stat.size;
  for (const name of readdirSync(path)) total += walkBytes(join(path, name));
  return total;
}

/** Bytes actually allocated on disk (st_blocks × 512): the data part of a sparse image. */
export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

export interface CacheDropper {
  readonly works: boolean;
  readonly note: string;
  drop(): boolean;
}

/**
 * Drops the page cache (after `sync`) so every step reads from disk as a cold run would. In a
 * container /proc/sys is often read-only: then the cache stays and that is recorded.
 */
export function createCacheDropper(): CacheDropper {
  const tryDrop = (): string | undefined => {
    spawnSync('sync');
    try {
      writeFileSync('/proc/sys/vm/drop_caches', '3\n');
      return undefined;
    } catch (err) {
      return err instanceof Error ? err.message : String(err);
    }
  };
  const failure = tryDrop();
  return {
    works: failure === undefined,
    note: failure === undefined
      ? 'page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every measured step'
      : `page cache NOT dropped between steps (${failure}): later steps may read from cache`,
    drop: () => failure === undefined && tryDrop() === undefined,
  };
}

/** SHA-256 of a file, streamed. */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) {
    hash.update(chunk as Buffer);
  }
  return hash.digest('hex');
}

/** First regular file called `name` below `dir` (restic and borg restore into path trees). */
export function findFile(dir: string, name: string): string | undefined {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isFile() && entry.name === name) return path;
    if (entry.isDirectory()) {
      const found = findFile(path, name);
      if (found !== undefined) return found;
    }
  }
  return undefined;
}

/** The machine a run measured: CPU, memory, system, and the scratch directory's filesystem. */
export function machineFacts(scratch: string): Record<string, string> {
  const osRelease = existsSync('/etc/os-release') ? readFileSync('/etc/os-release', 'utf8') : '';
  const pretty = /^PRETTY_NAME="?([^"\n]*)"?/m.exec(osRelease)?.[1] ?? 'unknown';
  return {
    cpu: `${cpus()[0]?.model ?? 'unknown'} × ${availableParallelism()} cores`,
    memory: formatSize(totalmem()),
    system: `${pretty}, ${osType()} ${release()}`,
    'scratch filesystem': capture(['findmnt', '-n', '-T', scratch, '-o', 'SOURCE,FSTYPE']).replace(/\s+/g, ' ') || 'unknown',
  };
}
