/**
 * `tresor files volumes|ls|find|cat|restore`: single files out of image snapshots, read lazily
 * from the repository. References are `SNAPSHOT[:DISK[:PART]]`, with `:/PATH` appended where a
 * command takes a path (see src/engine/file-browse.ts).
 *
 * Output: --json prints arrays of entries (volumes, ls, find) or one summary document (cat with
 * --output, restore). Exit codes: 0 when everything was read; 1 when some entries could not be
 * read or restored (they are listed, the rest was done); the usual codes for errors that stop
 * the command (usage 2, damaged repository 3, not found 5, bad input 8).
 */
import type { Command } from 'commander';
import { CodecPool } from '../../repo/codec-pool.ts';
import type { Repository } from '../../repo/repository.ts';
import {
  SnapshotBrowser, catFile, findByName, listPath, listVolumes, parseFileRef, type EntryInfo, type FileRef, type OpenedFilesystem,
} from '../../engine/file-browse.ts';
import { createOutputFile, restoreToDirectory, restoreToTar, type RestoreSummary } from '../../engine/file-restore.ts';
import { ExitCode, TresorError, UsageError, describeError } from '../../util/errors.ts';
import { openRepository, type GlobalOptions } from '../context.ts';
import { Progress, formatBytes, formatDuration, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function registerFilesCommands(program: Command, env: CommandEnv): void {
  const files = program.command('files').description('browse, search and restore single files inside image snapshots');

  files.command('volumes <ref>')
    .description('list the disks, partitions, logical volumes and filesystems of a snapshot (REF = SNAPSHOT[:DISK])')
    .action(async (refText: string) => {
      const g = env.globals();
      const ref = parseFileRef(refText, 'none');
      await withBrowser(g, `files volumes ${ref.snapshot}`, {}, async (browser) => {
        const volumes = await listVolumes(browser, ref);
        printResult(g, volumes, () => volumes.map((v) => {
          const fs = v.filesystem ? `${v.filesystem.type}${v.filesystem.label ? ` "${v.filesystem.label}"` : ''} ${formatBytes(v.filesystem.size)}` : v.error ? `unreadable: ${v.error}` : 'no known filesystem';
          return `${v.ref.padEnd(48)} ${formatBytes(v.size).padStart(10)}  ${fs}${v.name ? `  (${v.name})` : ''}${v.warnings ? `  warning: ${v.warnings.join('; ')}` : ''}`;
        }).join('\n') || 'no volumes');
      });
    });

  files.command('ls <ref> [path]')
    .description('list a directory (or describe a file) inside a snapshot')
    .option('-l, --long', 'type, mode, owner, size, modification time, link target', false)
    .option('-R, --recursive', 'list subdirectories recursively', false)
    .action(async (refText: string, pathArg: string | undefined, o: { long: boolean; recursive: boolean }) => {
      const g = env.globals();
      const ref = parseFileRef(refText, 'optional');
      const path = pathOf(ref, pathArg) ?? '/';
      await withBrowser(g, `files ls ${ref.snapshot}`, {}, async (browser) => {
        const opened = await browser.filesystem(ref);
        const out = new EntryPrinter(g, o.long, o.recursive);
        for await (const entry of listPath(opened.fs, path, { recursive: o.recursive })) await out.entry(entry);
        await out.end();
        if (out.errors > 0) process.exitCode = ExitCode.failure;
      });
    });

  files.command('find <refs...>')
    .description('search snapshots for names matching a pattern (every filesystem unless the reference names one)')
    .requiredOption('--name <glob>', 'shell pattern for the name: * ? [a-z] [!a-z]')
    .option('--path <dir>', 'search under this directory only', '/')
    .action(async (refTexts: string[], o: { name: string; path: string }) => {
      const g = env.globals();
      const refs = refTexts.map((t) => parseFileRef(t, 'none'));
      await withBrowser(g, 'files find', {}, async (browser) => {
        const out = new EntryPrinter(g, true, true, true);
        for (const ref of refs) {
          const { found, problems } = await browser.filesystems(ref);
          for (const p of problems) await out.entry({ path: '/', name: '', type: 'unknown', ino: '0', ref: p.ref, error: { code: 'volume-unreadable', message: p.error } });
          for (const opened of found) await findIn(opened, o.name, o.path, out);
        }
        await out.end();
        if (out.errors > 0) process.exitCode = ExitCode.failure;
      });
    });

  files.command('cat <refpath>')
    .description('write one file of a snapshot to stdout (REFPATH = SNAPSHOT[:DISK[:PART]]:/PATH)')
    .option('-o, --output <file>', 'write to this new file instead of stdout (needed with --json)')
    .action(async (refText: string, o: { output?: string }) => {
      const g = env.globals();
      const ref = parseFileRef(refText, 'required');
      if (g.json && o.output === undefined) throw new UsageError('--json needs --output FILE: stdout carries the JSON document', 'add -o FILE');
      const started = Date.now();
      await withBrowser(g, `files cat ${ref.snapshot}`, {}, async (browser) => {
        const opened = await browser.filesystem(ref);
        const file = o.output === undefined ? undefined : await createOutputFile(o.output);
        let result;
        try {
          result = await catFile(opened.fs, ref.path as string, file ? file.sink : writeStdout);
          await file?.close();
        } catch (err) {
          await file?.abort();
          throw err;
        }
        if (o.output !== undefined) {
          printResult(g, { ok: true, ref: opened.ref, path: result.path, size: result.size, bytesWritten: result.bytesWritten, output: o.output, durationMs: Date.now() - started, stats: browser.stats },
            () => `wrote ${result.path} (${formatBytes(result.size)}) to ${o.output}; read ${formatBytes(browser.stats.bytesFetched)} from the repository`);
        }
      });
    });

  files.command('restore <ref> [path]')
    .description('restore a file or directory of a snapshot into a directory, or as a tar archive')
    .requiredOption('--to <target>', 'directory to restore into (created if missing); with --tar: a new .tar file, or - for stdout')
    .option('--tar', 'write a tar archive (pax format, sparse files kept sparse) instead of files', false)
    .option('--devices', 'also restore device nodes and fifos', false)
    .action(async (refText: string, pathArg: string | undefined, o: { to: string; tar: boolean; devices: boolean }) => {
      const g = env.globals();
      const ref = parseFileRef(refText, 'optional');
      const path = pathOf(ref, pathArg);
      if (path === undefined) throw new UsageError('which path should be restored?', 'give it after the reference (use / for the whole filesystem), e.g. `tresor files restore SNAP /home --to DIR`');
      const toStdout = o.tar && o.to === '-';
      if (toStdout && g.json) throw new UsageError('--json and --tar --to - both want stdout', 'write the archive to a file: --to FILE.tar');
      const showProgress = !g.json && !g.quiet && process.stderr.isTTY === true;
      await withBrowser(g, `files restore ${ref.snapshot}`, { pool: true }, async (browser) => {
        const opened = await browser.filesystem(ref);
        const progress = new Progress(`restore ${path}`, g);
        const options = { devices: o.devices, signal: env.signal, progress: showProgress ? (d: number, t: number) => progress.update(d, t) : undefined };
        let summary: RestoreSummary & { archiveBytes?: number };
        if (!o.tar) {
          summary = await restoreToDirectory(opened.fs, path, o.to, options);
        } else if (toStdout) {
          summary = await restoreToTar(opened.fs, path, writeStdout, '-', options);
        } else {
          const file = await createOutputFile(o.to);
          try {
            summary = await restoreToTar(opened.fs, path, file.sink, o.to, options);
            await file.close();
          } catch (err) {
            await file.abort();
            throw err;
          }
        }
        progress.finish();
        const doc = { ...summary, ref: opened.ref, stats: browser.stats };
        if (toStdout) {
          if (!g.quiet || !summary.ok) process.stderr.write(`${restoreText(doc)}\n`);
        } else {
          printResult(g, doc, () => restoreText(doc));
        }
        if (!summary.ok) process.exitCode = ExitCode.failure;
      });
    });
}

/** The path from `REF:/PATH` or from the separate argument (not both). */
function pathOf(ref: FileRef, pathArg: string | undefined): string | undefined {
  if (ref.path !== undefined && pathArg !== undefined) throw new UsageError('the path is given twice (in the reference and as an argument)', 'give it once');
  const path = ref.path ?? pathArg;
  if (path !== undefined && !path.startsWith('/')) throw new UsageError(`paths inside snapshots are absolute: ${JSON.stringify(path)}`, `write /${path}`);
  return path;
}

/** Opens the repository with a shared lock (so nothing it reads is pruned meanwhile). */
async function withBrowser(g: GlobalOptions, operation: string, opts: { pool?: boolean }, body: (browser: SnapshotBrowser, repo: Repository) => Promise<void>): Promise<void> {
  const repo = await openRepository(g);
  const lock = await repo.lock('shared', operation);
  const pool = opts.pool ? new CodecPool(repo.keys) : undefined;
  const browser = new SnapshotBrowser(repo, { pool });
  try {
    await body(browser, repo);
  } finally {
    await browser.close();
    await pool?.close();
    await lock.release();
  }
}

async function findIn(opened: OpenedFilesystem, pattern: string, path: string, out: EntryPrinter): Promise<void> {
  try {
    for await (const entry of findByName(opened.fs, pattern, path)) await out.entry({ ...entry, ref: opened.ref });
  } catch (err) {
    // A filesystem that cannot be searched at all is one error; the other filesystems go on.
    await out.entry({ path, name: '', type: 'unknown', ino: '0', ref: opened.ref, error: { code: err instanceof TresorError ? err.code : 'error', message: describeError(err) } });
  }
}

// ---- output ----------------------------------------------------------------------------------

let stdoutBroken: Error | undefined;
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  stdoutBroken = err.code === 'EPIPE'
    ? new TresorError('broken-pipe', 'the reader of the output went away', { exitCode: ExitCode.interrupted })
    : err;
});

/** Writes to stdout, waiting when the pipe is full (a 2 GB cat must not sit in memory). */
function writeStdout(chunk: Buffer | string): Promise<void> {
  if (stdoutBroken) return Promise.reject(stdoutBroken);
  return new Promise((resolve, reject) => {
    const ok = process.stdout.write(chunk);
    if (ok) return resolve();
    const onDrain = () => {
      process.stdout.off('error', onError);
      resolve();
    };
    const onError = (err: Error) => {
      process.stdout.off('drain', onDrain);
      reject(stdoutBroken ?? err);
    };
    process.stdout.once('drain', onDrain);
    process.stdout.once('error', onError);
  });
}

/** Names come from an untrusted guest: control characters are shown escaped on a terminal. */
export function printableName(text: string): string {
  return text.replace(/[\x00-\x1f\x7f-\x9f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

const TYPE_CHAR: Record<string, string> = { file: '-', dir: 'd', symlink: 'l', chardev: 'c', blockdev: 'b', fifo: 'p', socket: 's', unknown: '?' };

export function modeString(type: string, mode: number | undefined): string {
  if (mode === undefined) return `${TYPE_CHAR[type] ?? '?'}?????????`;
  const bit = (mask: number, ch: string) => (mode & mask ? ch : '-');
  const special = (exec: number, flag: number, set: string, unset: string) => (mode & flag ? (mode & exec ? set : unset) : bit(exec, 'x'));
  return (TYPE_CHAR[type] ?? '?')
    + bit(0o400, 'r') + bit(0o200, 'w') + special(0o100, 0o4000, 's', 'S')
    + bit(0o040, 'r') + bit(0o020, 'w') + special(0o010, 0o2000, 's', 'S')
    + bit(0o004, 'r') + bit(0o002, 'w') + special(0o001, 0o1000, 't', 'T');
}

/** Streams entries: a JSON array with --json, else lines (errors on stderr). */
class EntryPrinter {
  errors = 0;
  readonly #g: GlobalOptions;
  readonly #long: boolean;
  readonly #fullPaths: boolean;
  readonly #withRef: boolean;
  #first = true;

  constructor(g: GlobalOptions, long: boolean, fullPaths: boolean, withRef = false) {
    this.#g = g;
    this.#long = long;
    this.#fullPaths = fullPaths;
    this.#withRef = withRef;
  }

  async entry(e: EntryInfo): Promise<void> {
    if (e.error) this.errors++;
    if (this.#g.json) {
      // The array opens with its first entry, so an error before any entry is one clean JSON document.
      await writeStdout(`${this.#first ? '[\n' : ',\n'}${JSON.stringify(e)}`);
      this.#first = false;
      return;
    }
    const where = `${this.#withRef && e.ref ? `${e.ref}:` : ''}${printableName(this.#fullPaths ? e.path : e.name)}`;
    if (e.error) {
      process.stderr.write(`tresor: ${where}: ${e.error.message}\n`);
      if (e.type !== 'dir' || e.size === undefined) return;
    }
    if (this.#g.quiet) return;
    if (!this.#long) {
      await writeStdout(`${where}\n`);
      return;
    }
    const owner = `${e.uid ?? '-'} ${e.gid ?? '-'}`;
    const size = e.rdev ? `${e.rdev.major}, ${e.rdev.minor}` : String(e.size ?? '?');
    const time = e.mtime ? e.mtime.replace('T', ' ').replace(/\.\d+Z$/, '') : '-';
    const link = e.target !== undefined ? ` -> ${printableName(e.target)}` : '';
    await writeStdout(`${modeString(e.type, e.mode)} ${String(e.nlink ?? 1).padStart(3)} ${owner.padEnd(11)} ${size.padStart(10)} ${time} ${where}${link}\n`);
  }

  async end(): Promise<void> {
    if (this.#g.json) await writeStdout(this.#first ? '[]\n' : '\n]\n');
  }
}

function restoreText(s: RestoreSummary & { ref: string; archiveBytes?: number; stats: { bytesFetched: number } }): string {
  const lines = [
    `restored ${s.source} of ${s.ref} to ${s.target}${s.format === 'tar' ? ` (tar, ${formatBytes(s.archiveBytes ?? 0)})` : ''}: `
      + `${s.files} files (${formatBytes(s.bytes)}), ${s.directories} directories, ${s.symlinks} symlinks, ${s.hardlinks} hard links, ${s.specialFiles} special files`
      + ` in ${formatDuration(s.durationMs)}; read ${formatBytes(s.stats.bytesFetched)} from the repository`,
  ];
  for (const w of s.warnings) lines.push(`warning: ${w}`);
  for (const k of s.skipped.slice(0, 20)) lines.push(`skipped ${printableName(k.path)}: ${k.message}`);
  if (s.skippedCount > 20) lines.push(`... and ${s.skippedCount - 20} more skipped`);
  for (const e of s.errors.slice(0, 50)) lines.push(`ERROR ${printableName(e.path)}: ${printableName(e.message)}`);
  if (s.errorCount > 50) lines.push(`... and ${s.errorCount - 50} more errors (see --json)`);
  if (!s.ok) lines.push(`${s.errorCount} entr${s.errorCount === 1 ? 'y' : 'ies'} could not be restored; everything else was`);
  return lines.join('\n');
}
