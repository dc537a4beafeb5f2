/** Runs the real `tresor` CLI as a child process, as users and scripts do. */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../bin/tresor.js', import.meta.url));

let cacheDir: string | undefined;

/**
 * The CLI's environment for tests: its cache directory (snapshot catalogs) is one temporary
 * directory per test process, removed when the process exits, so the suite leaves nothing in
 * the user's ~/.cache. Node's compile cache is shared by all test processes and runs instead
 * (NODE_COMPILE_CACHE, which bin/tresor.js keeps): it holds only this code's compiled form, and a
 * cold one would cost every test file ~0.3 s per CLI start until it warms.
 */
function cacheEnv(): Record<string, string> {
  if (cacheDir === undefined) {
    cacheDir = mkdtempSync(join(tmpdir(), 'tresor-test-cache-'));
    const created = cacheDir;
    process.on('exit', () => rmSync(created, { recursive: true, force: true }));
  }
  const compileCache = join(tmpdir(), 'tresor-test-compile-cache');
  mkdirSync(compileCache, { recursive: true });
  return { TRESOR_CACHE_DIR: cacheDir, NODE_COMPILE_CACHE: compileCache };
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Parsed stdout when it is JSON. */
  json: any;
}

export interface CliOptions {
  env?: Record<string, string | undefined>;
  timeoutMs?: number;
  cwd?: string;
}

export function spawnTresor(args: string[], opts: CliOptions = {}): ChildProcess {
  return spawn(process.execPath, [CLI, ...args], {
    env: { ...process.env, TRESOR_PASSPHRASE: undefined, TRESOR_REPO: undefined, ...cacheEnv(), ...opts.env } as NodeJS.ProcessEnv,
    cwd: opts.cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

export function tresor(args: string[], opts: CliOptions = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawnTresor(args, opts);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 300_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      let json: any;
      try {
        json = JSON.parse(stdout);
      } catch {
        json = undefined;
      }
      resolve({ code, signal, stdout, stderr, json });
    });
  });
}

/** Runs and asserts exit code 0, returning the parsed JSON (the command must get --json). */
export async function tresorOk(args: string[], opts: CliOptions = {}): Promise<any> {
  const r = await tresor(args, opts);
  if (r.code !== 0) throw new Error(`tresor ${args.join(' ')} exited ${r.code}${r.signal ? ` (${r.signal})` : ''}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r.json;
}
