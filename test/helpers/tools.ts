/**
 * Running the real tools (mkfs.ext4, debugfs, sgdisk, lvm...) from tests: a missing tool or a
 * failing command throws with its stderr, so the test fails loudly instead of skipping.
 */
import { execFile } from 'node:child_process';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';

export interface RunOptions {
  env?: Record<string, string>;
  /** Exit codes that count as success (e2fsck returns 1 after fixing/optimising). */
  okCodes?: number[];
  timeoutMs?: number;
}

export function run(cmd: string, args: string[], options: RunOptions = {}): Promise<string> {
  return runWithStderr(cmd, args, options).then((r) => r.stdout);
}

export function runWithStderr(cmd: string, args: string[], options: RunOptions = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, {
      env: { ...process.env, LC_ALL: 'C.UTF-8', LVM_SUPPRESS_FD_WARNINGS: '1', ...options.env },
      maxBuffer: 64 * 1024 * 1024,
      timeout: options.timeoutMs ?? 120_000,
    }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      if (error && !(options.okCodes ?? []).includes(code)) {
        reject(new Error(`${cmd} ${args.join(' ')} failed (${error.code ?? error.message}): ${stderr || stdout}`));
      } else {
        resolve({ stdout, stderr });
      }
    });
  });
}

/** Overwrites bytes of a file in place. */
export function patchFile(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function readFileRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    closeSync(fd);
  }
}

/**
 * Every regular file below `dir`, with its path relative to `base` and its size. Tests list
 * repositories while Tresor processes write them: a file or directory that disappears between
 * the listing and its stat (a temporary file renamed or removed) is skipped, not an error.
 */
export async function listFiles(dir: string, base = dir): Promise<Array<{ name: string; size: number }>> {
  const out: Array<{ name: string; size: number }> = [];
  const gone = (err: unknown) => (err as NodeJS.ErrnoException).code === 'ENOENT';
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch (err) {
    if (gone(err) && dir !== base) return out;
    throw err;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) {
      out.push(...await listFiles(p, base));
    } else if (e.isFile()) {
      try {
        out.push({ name: relative(base, p), size: (await stat(p)).size });
      } catch (err) {
        if (!gone(err)) throw err;
      }
    }
  }
  return out;
}
