/**
 * Runs `virsh -c URI ...` for the libvirt driver. Every call gets a deadline, runs with LC_ALL=C
 * (so error messages can be classified), and turns a failure into a HypervisorError naming the
 * URI, domain and operation. XML documents are handed over in private temporary files (mode
 * 0600, removed afterwards), never in argv, because argv is visible to every user of the host.
 *
 * With `sessions`, calls go to a few long-running interactive virsh processes instead of one
 * process each: a call then costs a round trip to libvirtd (~3 ms) instead of a process start
 * and a new connection (~20 ms, and ~5 ms of this process's CPU to spawn). A backup makes a few
 * dozen calls, most of them one after the other, so this is a good part of an incremental's
 * time. Each call is bracketed by marker lines on stdout and stderr (`echo [--err] --split
 * TOKEN,b|e`), which separate its output from the next call's and from the prompts virsh
 * echoes; a call failed when virsh printed an `error:` line for it. A session that misses a
 * deadline is killed (the next call starts a new one), and an idle one exits after a few seconds.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HypervisorError, classifyLibvirtError, type HypervisorErrorContext } from './errors.ts';

export interface VirshCallOptions {
  /** Names the action in errors, e.g. 'backup-begin'. */
  operation: string;
  domain?: string;
  timeoutMs?: number;
  /** Extra fields for the error context. */
  context?: Record<string, unknown>;
}

const DEFAULT_TIMEOUT_MS = 60_000;
const MAX_OUTPUT_BYTES = 64 * 1024 * 1024;

/** Most sessions one Virsh keeps; calls beyond wait for a free one. */
const MAX_SESSIONS = 3;
/** An idle session exits after this long. */
const SESSION_IDLE_MS = 5_000;

export class Virsh {
  readonly uri: string;
  private readonly binary: string;
  private readonly defaultTimeoutMs: number;
  private readonly useSessions: boolean;
  private readonly sessions: VirshSession[] = [];
  private readonly sessionWaiters: Array<() => void> = [];

  constructor(uri: string, opts: { binary?: string; timeoutMs?: number; sessions?: boolean } = {}) {
    this.uri = uri;
    this.binary = opts.binary ?? 'virsh';
    this.defaultTimeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.useSessions = opts.sessions === true;
  }

  /** Interactive virsh processes alive now (diagnostics and tests). */
  get liveSessions(): number {
    return this.sessions.filter((session) => !session.ended).length;
  }

  /** Runs one virsh command and returns its stdout; throws a classified HypervisorError. */
  run(args: string[], opts: VirshCallOptions): Promise<string> {
    const context: HypervisorErrorContext = { uri: this.uri, operation: opts.operation, ...opts.context };
    if (opts.domain !== undefined) context.domain = opts.domain;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    const line = this.useSessions ? sessionCommandLine(args) : undefined;
    if (line !== undefined) return this.runInSession(line, opts, context, timeoutMs);
    return this.runProcess(args, opts, context, timeoutMs);
  }

  private async runInSession(line: string, opts: VirshCallOptions, context: HypervisorErrorContext, timeoutMs: number): Promise<string> {
    const session = await this.acquireSession();
    try {
      const { stdout, stderr } = await session.call(line, timeoutMs, context, () => this.timeoutError(opts, context, timeoutMs));
      if (/^error: /m.test(stderr)) throw classifyLibvirtError(stderr, context);
      return stdout;
    } finally {
      this.releaseSession(session);
    }
  }

  private async acquireSession(): Promise<VirshSession> {
    for (;;) {
      for (let i = this.sessions.length - 1; i >= 0; i--) {
        if ((this.sessions[i] as VirshSession).ended) this.sessions.splice(i, 1);
      }
      const idle = this.sessions.find((session) => !session.busy);
      if (idle !== undefined) {
        idle.busy = true;
        return idle;
      }
      if (this.sessions.length < MAX_SESSIONS) {
        const session = new VirshSession(this.binary, this.uri);
        session.busy = true;
        this.sessions.push(session);
        return session;
      }
      await new Promise<void>((wake) => this.sessionWaiters.push(wake));
    }
  }

  private releaseSession(session: VirshSession): void {
    session.busy = false;
    session.idleSoon();
    this.sessionWaiters.shift()?.();
  }

  private timeoutError(opts: VirshCallOptions, context: HypervisorErrorContext, timeoutMs: number): HypervisorError {
    return new HypervisorError('timeout', `${opts.operation}${opts.domain === undefined ? '' : ` on domain ${opts.domain}`} did not finish within ${timeoutMs} ms`, {
      context: { ...context, timeoutMs },
      hint: 'libvirtd or the guest may be hung or overloaded; check `virsh domjobinfo` and libvirtd\'s log',
    });
  }

  private runProcess(args: string[], opts: VirshCallOptions, context: HypervisorErrorContext, timeoutMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      const child = spawn(this.binary, ['-c', this.uri, ...args], {
        env: { ...process.env, LC_ALL: 'C', LANG: 'C' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const stdout: Buffer[] = [];
      const stderr: Buffer[] = [];
      let outputBytes = 0;
      let failure: HypervisorError | undefined;
      const collect = (into: Buffer[]) => (chunk: Buffer): void => {
        outputBytes += chunk.length;
        if (outputBytes > MAX_OUTPUT_BYTES) {
          failure ??= tooMuchOutput(args[0], context);
          child.kill('SIGKILL');
          return;
        }
        into.push(chunk);
      };
      child.stdout.on('data', collect(stdout));
      child.stderr.on('data', collect(stderr));
      const timer = setTimeout(() => {
        failure ??= this.timeoutError(opts, context, timeoutMs);
        child.kill('SIGKILL');
      }, timeoutMs);
      child.on('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new HypervisorError('libvirt-unreachable', err.code === 'ENOENT'
          ? `${this.binary} is not installed`
          : `cannot run ${this.binary}: ${err.message}`, {
          context,
          hint: 'install the Debian package libvirt-clients',
          cause: err,
        }));
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        if (failure !== undefined) return reject(failure);
        const err = Buffer.concat(stderr).toString('utf8');
        if (code !== 0) return reject(classifyLibvirtError(err, context));
        resolve(Buffer.concat(stdout).toString('utf8'));
      });
    });
  }

  /**
   * Writes each document to a private temporary file, calls `fn` with their paths, and removes
   * them whatever happens.
   */
  async withFiles<T>(documents: string[], fn: (paths: string[]) => Promise<T>): Promise<T> {
    const dir = await mkdtemp(join(tmpdir(), 'tresor-virsh-'));
    try {
      const paths: string[] = [];
      for (const [index, document] of documents.entries()) {
        const path = join(dir, `${index}-${randomBytes(4).toString('hex')}.xml`);
        await writeFile(path, document, { mode: 0o600 });
        paths.push(path);
      }
      return await fn(paths);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
}

function tooMuchOutput(command: string | undefined, context: HypervisorErrorContext): HypervisorError {
  return new HypervisorError('operation-failed', `virsh ${command ?? ''} printed more than ${MAX_OUTPUT_BYTES} bytes`, { context });
}

/** Arguments virsh's command parser takes literally inside single quotes (no quote, no line break). */
const PLAIN_ARG = /^[A-Za-z0-9_./:=,@+%-]+$/;

/** The command as one line for an interactive session, or undefined if an argument cannot be quoted. */
function sessionCommandLine(args: string[]): string | undefined {
  const words: string[] = [];
  for (const arg of args) {
    if (PLAIN_ARG.test(arg)) words.push(arg);
    else if (!/['\n\r\\]/.test(arg) && arg !== '') words.push(`'${arg}'`);
    else return undefined;
  }
  return words.join(' ');
}

/** One interactive `virsh -c URI` process that runs one command at a time. */
class VirshSession {
  busy = false;
  #child: ChildProcessWithoutNullStreams;
  #stdout = '';
  #stderr = '';
  #ended = false;
  #onChange: (() => void) | undefined;
  #idleTimer: NodeJS.Timeout | undefined;

  constructor(binary: string, uri: string) {
    // virsh's line editor echoes each command after its prompt, wrapped with carriage returns at
    // the terminal width unless the width is practically unlimited.
    // Not -q: quiet mode also drops command output such as "Froze 2 filesystem(s)".
    this.#child = spawn(binary, ['-c', uri], { env: { ...process.env, LC_ALL: 'C', LANG: 'C', COLUMNS: '1000000' }, stdio: ['pipe', 'pipe', 'pipe'] });
    // An idle session must not keep Tresor running; a call in progress has its own timer.
    this.#child.unref();
    for (const stream of [this.#child.stdin, this.#child.stdout, this.#child.stderr]) (stream as unknown as { unref?: () => void }).unref?.();
    this.#child.stdout.setEncoding('utf8');
    this.#child.stderr.setEncoding('utf8');
    this.#child.stdout.on('data', (text: string) => { this.#stdout += text; this.#onChange?.(); });
    this.#child.stderr.on('data', (text: string) => { this.#stderr += text; this.#onChange?.(); });
    this.#child.stdin.on('error', () => undefined); // the exit below tells
    const end = () => { this.#ended = true; this.#onChange?.(); };
    this.#child.on('exit', end);
    this.#child.on('error', end);
  }

  get ended(): boolean {
    return this.#ended;
  }

  /** Runs one command line; resolves with its stdout and stderr. */
  call(line: string, timeoutMs: number, context: HypervisorErrorContext, timeoutError: () => Error): Promise<{ stdout: string; stderr: string }> {
    clearTimeout(this.#idleTimer);
    const token = `tresor${randomBytes(6).toString('hex')}`;
    const begin = { out: `${token}\nb\n`, err: `error: ${token}\nb\n` };
    const end = { out: `${token}\ne\n`, err: `error: ${token}\ne\n` };
    const markers = (which: string) => `echo --split ${token},${which}\necho --err --split ${token},${which}\n`;
    return new Promise((resolve, reject) => {
      const finish = (err?: Error) => {
        clearTimeout(timer);
        this.#onChange = undefined;
        if (err !== undefined) reject(err);
      };
      const timer = setTimeout(() => {
        this.#ended = true;
        this.#child.kill('SIGKILL');
        finish(timeoutError());
      }, timeoutMs);
      this.#onChange = () => {
        if (this.#stdout.length + this.#stderr.length > MAX_OUTPUT_BYTES) {
          this.#ended = true;
          this.#child.kill('SIGKILL');
          return finish(tooMuchOutput(line.split(' ')[0], context));
        }
        const outEnd = this.#stdout.indexOf(end.out);
        const errEnd = this.#stderr.indexOf(end.err);
        if (outEnd >= 0 && errEnd >= 0) {
          const stdout = between(this.#stdout, begin.out, outEnd, [`echo --err --split ${token},b`, line, `echo --split ${token},e`]);
          const stderr = between(this.#stderr, begin.err, errEnd, []).replace(/^\n+/, '');
          this.#stdout = this.#stdout.slice(outEnd + end.out.length);
          this.#stderr = this.#stderr.slice(errEnd + end.err.length);
          finish();
          resolve({ stdout, stderr });
        } else if (this.#ended) {
          // virsh exits at once when it cannot connect, with the reason on stderr.
          finish(/^error: /m.test(this.#stderr) ? classifyLibvirtError(this.#stderr, context)
            : new HypervisorError('libvirt-unreachable', `virsh ended unexpectedly while running ${line.split(' ')[0]}`, {
              context, hint: 'check that libvirtd is running and reachable',
            }));
        }
      };
      if (this.#ended) return this.#onChange();
      this.#child.stdin.write(`${markers('b')}${line}\n${markers('e')}`);
    });
  }

  /** Ends the process after a while without calls. */
  idleSoon(): void {
    clearTimeout(this.#idleTimer);
    this.#idleTimer = setTimeout(() => {
      this.#ended = true;
      this.#child.stdin.end();
    }, SESSION_IDLE_MS);
    this.#idleTimer.unref();
  }
}

/**
 * The text between the begin marker and `endAt`, without the command lines an interactive virsh
 * echoes after its prompt.
 */
function between(text: string, beginMarker: string, endAt: number, echoedLines: string[]): string {
  const from = text.indexOf(beginMarker);
  let out = text.slice(from < 0 ? 0 : from + beginMarker.length, endAt);
  for (const echoed of echoedLines) {
    for (const prompt of ['virsh # ', 'virsh > ']) out = out.split(`${prompt}${echoed}\n`).join('');
  }
  // Whatever echo is left (another line editor's rendering): whole prompt lines at either end;
  // and the blank lines interactive virsh prints after the stderr marker (no command's output
  // starts with one: they would end up in stored checkpoint XML).
  return out.replace(/^(virsh [#>] [^\n]*\n|\n)+/, '').replace(/(virsh [#>] [^\n]*)$/, '');
}
