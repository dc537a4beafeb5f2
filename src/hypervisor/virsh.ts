/**
 * Runs `virsh -c URI ...` for the libvirt driver. Every call gets a deadline, runs with LC_ALL=C
 * (so error messages can be classified), and turns a failure into a HypervisorError naming the
 * URI, domain and operation. XML documents are handed over in private temporary files (mode
 * 0600, removed afterwards), never in argv, because argv is visible to every user of the host.
 */
import { spawn } from 'node:child_process';
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

export class Virsh {
  readonly uri: string;
  private readonly binary: string;
  private readonly defaultTimeoutMs: number;

  constructor(uri: string, opts: { binary?: string; timeoutMs?: number } = {}) {
    this.uri = uri;
    this.binary = opts.binary ?? 'virsh';
    this.defaultTimeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  /** Runs one virsh command and returns its stdout; throws a classified HypervisorError. */
  run(args: string[], opts: VirshCallOptions): Promise<string> {
    const context: HypervisorErrorContext = { uri: this.uri, operation: opts.operation, ...opts.context };
    if (opts.domain !== undefined) context.domain = opts.domain;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
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
          failure ??= new HypervisorError('operation-failed', `virsh ${args[0]} printed more than ${MAX_OUTPUT_BYTES} bytes`, { context });
          child.kill('SIGKILL');
          return;
        }
        into.push(chunk);
      };
      child.stdout.on('data', collect(stdout));
      child.stderr.on('data', collect(stderr));
      const timer = setTimeout(() => {
        failure ??= new HypervisorError('timeout', `${opts.operation}${opts.domain === undefined ? '' : ` on domain ${opts.domain}`} did not finish within ${timeoutMs} ms`, {
          context: { ...context, timeoutMs },
          hint: 'libvirtd or the guest may be hung or overloaded; check `virsh domjobinfo` and libvirtd\'s log',
        });
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
