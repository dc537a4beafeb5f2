/**
 * Restores files and directories out of a guest filesystem (usually one read lazily from a
 * snapshot) into a host directory, or into a tar stream.
 *
 * Safety first: the guest filesystem is untrusted input, the host is not.
 * - Every name is checked before use: empty, '.', '..', names containing '/' or NUL are refused
 *   (reported as errors, never escaped into something else), and a name listed twice in one
 *   directory is restored once. Host paths are only ever built as `verified parent + '/' + name`,
 *   and checked to stay under the target.
 * - A parent is "verified" when this restore created it with mkdir, or found it with lstat to be a
 *   real directory (not a symlink) under the target. Files are created with O_CREAT|O_EXCL|
 *   O_NOFOLLOW, symlinks with symlink(2), links with link(2): none of them follows a symlink at
 *   the final component, and nothing existing is ever overwritten or followed — neither what the
 *   restore itself created nor what was already in the target.
 * - Symlinks are restored as symlinks, their target text kept as is (absolute ones too); nothing
 *   here ever resolves them. Device nodes and fifos only on request; sockets never.
 * - Directory cycles and hard-linked directories are entered once; depth is bounded.
 * - A damaged entry is an error for that entry; the restore goes on and reports it at the end.
 *
 * Metadata: ownership when running as root (else reported once), modes, times (ns precision as far
 * as Node's utimes can carry it, i.e. ~1 µs), directories' modes and times after their content.
 * Sparse files stay sparse: only data extents are written, then the file is truncated to its size.
 */
import { execFile } from 'node:child_process';
import { constants as fsc } from 'node:fs';
import { chmod, lchown, link, lstat, lutimes, mkdir, open, realpath, rm, symlink, type FileHandle } from 'node:fs/promises';
import { dirname, join, sep } from 'node:path';
import { promisify } from 'node:util';
import type { DirEntry, FileStat, Filesystem } from '../fs/filesystem.ts';
import { BadInputError, ExitCode, TresorError, UsageError, isErrno } from '../util/errors.ts';
import { ByteBudget } from '../util/concurrency.ts';
import { TarWriter, type TarSink } from '../util/tar.ts';
import {
  MAX_WALK_DEPTH, type ResolvedPath, dataExtents, errorInfo, fileBytes, joinPath, readRanges, resolvePath, walkDirectory,
} from './file-browse.ts';

export interface FileRestoreOptions {
  /** Restore device nodes and fifos (otherwise they are reported as skipped). */
  devices?: boolean;
  signal?: AbortSignal;
  /** Called as file data is restored; with it, the tree is walked once first to know the total. */
  progress?: (doneBytes: number, totalBytes: number) => void;
}

export interface RestoreProblem {
  path: string;
  code: string;
  message: string;
}

export interface RestoreSummary {
  ok: boolean;
  /** The guest path restored. */
  source: string;
  /** Host directory, tar file, or '-' for stdout. */
  target: string;
  format: 'directory' | 'tar';
  files: number;
  directories: number;
  symlinks: number;
  hardlinks: number;
  specialFiles: number;
  /** Apparent size of the files restored. */
  bytes: number;
  /** Bytes of file data read and written (holes excluded). */
  dataBytes: number;
  errorCount: number;
  skippedCount: number;
  /** The first MAX_REPORTED of each. */
  errors: RestoreProblem[];
  skipped: RestoreProblem[];
  warnings: string[];
  durationMs: number;
}

const MAX_REPORTED = 1000;
const execFileAsync = promisify(execFile);

/** Why a guest name cannot be used as a host file name, or undefined when it can. */
export function unsafeNameReason(name: string): string | undefined {
  if (name === '') return 'the name is empty';
  if (name === '.' || name === '..') return `the name is ${JSON.stringify(name)}`;
  if (name.includes('/')) return 'the name contains "/"';
  if (name.includes('\0')) return 'the name contains a NUL character';
  return undefined;
}

/** What a target does with each kind of entry. `P` is the target's handle on a directory. */
interface RestoreTarget<P> {
  readonly root: P;
  /** Leaf entries restored at once (1 for a stream, which must stay in order). */
  readonly concurrency: number;
  enterDir(parent: P, name: string, st: FileStat): Promise<P>;
  leaveDir(dir: P, st: FileStat): Promise<void>;
  /** Restores a regular file; returns what a later hard link to it needs. */
  file(parent: P, name: string, ino: bigint, st: FileStat, onData: (bytes: number) => void): Promise<string>;
  hardlink(parent: P, name: string, first: string): Promise<void>;
  symlink(parent: P, name: string, target: string, st: FileStat): Promise<void>;
  special(parent: P, name: string, st: FileStat): Promise<void>;
  finish(): Promise<void>;
}

class Tally {
  readonly summary: RestoreSummary;
  readonly #started = Date.now();

  constructor(source: string, target: string, format: RestoreSummary['format']) {
    this.summary = {
      ok: true, source, target, format, files: 0, directories: 0, symlinks: 0, hardlinks: 0, specialFiles: 0, bytes: 0, dataBytes: 0,
      errorCount: 0, skippedCount: 0, errors: [], skipped: [], warnings: [], durationMs: 0,
    };
  }

  error(path: string, err: unknown): void {
    this.summary.ok = false;
    this.summary.errorCount++;
    if (this.summary.errors.length < MAX_REPORTED) this.summary.errors.push({ path, ...errorInfo(err) });
  }

  skip(path: string, code: string, message: string): void {
    this.summary.skippedCount++;
    if (this.summary.skipped.length < MAX_REPORTED) this.summary.skipped.push({ path, code, message });
  }

  warn(message: string): void {
    if (!this.summary.warnings.includes(message) && this.summary.warnings.length < MAX_REPORTED) this.summary.warnings.push(message);
  }

  done(): RestoreSummary {
    this.summary.durationMs = Date.now() - this.#started;
    return this.summary;
  }
}

/**
 * Walks the guest tree under `source` and hands every entry to the target. Directories are
 * walked one at a time, in name order; files, symlinks and special files of a directory may be
 * restored concurrently (up to the target's `concurrency`, across the whole walk), and a
 * directory is left only once everything in it is done, so its metadata comes last.
 */
class TreeRestorer<P> {
  readonly #fs: Filesystem;
  readonly #target: RestoreTarget<P>;
  readonly #tally: Tally;
  readonly #options: FileRestoreOptions;
  readonly #visitedDirs = new Map<bigint, string>();
  /** Inode → what `target.hardlink` needs (undefined if that restore failed), for files with several names. */
  readonly #linked = new Map<bigint, Promise<string | undefined>>();
  /** Slots for concurrent leaf restores (undefined: one entry at a time, e.g. into a tar stream). */
  readonly #slots: ByteBudget | undefined;
  #done = 0;
  #total = 0;

  constructor(fs: Filesystem, target: RestoreTarget<P>, tally: Tally, options: FileRestoreOptions) {
    this.#fs = fs;
    this.#target = target;
    this.#tally = tally;
    this.#options = options;
    this.#slots = target.concurrency > 1 ? new ByteBudget(target.concurrency) : undefined;
  }

  async run(source: ResolvedPath): Promise<void> {
    if (this.#options.progress) {
      for await (const info of walkDirectoryOrSelf(this.#fs, source)) if (info.type === 'file' && info.size) this.#total += info.size;
      this.#options.progress(0, this.#total);
    }
    if (source.stat.type === 'dir' && source.path === '/') {
      // The root's content goes straight into the target, whose own metadata is left alone.
      this.#visitedDirs.set(source.ino, '/');
      await this.#children(source.ino, this.#target.root, '/', 1);
    } else {
      const name = source.path.slice(source.path.lastIndexOf('/') + 1);
      const pending: Array<Promise<void>> = [];
      await this.#entry(this.#target.root, { name, ino: source.ino, type: source.stat.type }, source.path, 1, pending);
      await Promise.all(pending);
    }
    await this.#target.finish();
  }

  async #children(ino: bigint, dir: P, guestPath: string, depth: number): Promise<void> {
    let entries: DirEntry[];
    try {
      entries = (await this.#fs.readdir(ino)).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    } catch (err) {
      this.#tally.error(guestPath, err);
      return;
    }
    const seen = new Set<string>();
    const pending: Array<Promise<void>> = [];
    try {
      for (const entry of entries) {
        const path = joinPath(guestPath, entry.name);
        if (seen.has(entry.name)) {
          this.#tally.error(path, new BadInputError('fs-duplicate-name', `the directory ${guestPath} lists the name ${JSON.stringify(entry.name)} more than once: only the first is restored`));
          continue;
        }
        seen.add(entry.name);
        await this.#entry(dir, entry, path, depth, pending);
      }
    } finally {
      // Whatever happens, nothing of this directory may still be running when it is left.
      await Promise.allSettled(pending);
    }
    await Promise.all(pending);
  }

  /** Restores one entry; a leaf may be started concurrently and added to `pending`. */
  async #entry(parent: P, entry: DirEntry, path: string, depth: number, pending: Array<Promise<void>>): Promise<void> {
    if (this.#options.signal?.aborted) throw this.#options.signal.reason ?? new TresorError('interrupted', 'restore cancelled');
    const unsafe = unsafeNameReason(entry.name);
    if (unsafe) {
      this.#tally.error(path, new BadInputError('unsafe-name', `refused the guest name ${JSON.stringify(entry.name)}: ${unsafe}`, {
        hint: 'the guest filesystem holds a name that cannot exist on the host (crafted or damaged); nothing was written for it',
      }));
      return;
    }
    let st: FileStat;
    try {
      st = await this.#fs.stat(entry.ino);
    } catch (err) {
      this.#tally.error(path, err);
      return;
    }
    if (st.type === 'dir') {
      await this.#guard(path, () => this.#directory(parent, entry, st, path, depth));
      return;
    }
    if (!this.#slots) {
      await this.#guard(path, () => this.#leaf(parent, entry, st, path));
      return;
    }
    const slots = this.#slots;
    await slots.acquire(1);
    const task = this.#guard(path, () => this.#leaf(parent, entry, st, path)).finally(() => slots.release(1));
    task.catch(() => undefined); // awaited with the rest of its directory
    pending.push(task);
  }

  /** Runs one entry's restore: its failure is reported for that entry, unless the whole target is unusable. */
  async #guard(path: string, restore: () => Promise<void>): Promise<void> {
    try {
      await restore();
    } catch (err) {
      if (this.#options.signal?.aborted) throw err;
      if (err instanceof TresorError && err.code === 'target-full') throw err;
      if (isErrno(err, 'ENOSPC', 'EDQUOT', 'EROFS')) {
        // The target itself is unusable: going on would only repeat this error for every entry.
        throw new TresorError('target-full', `cannot write ${path} into the target: ${(err as Error).message}`, {
          exitCode: isErrno(err, 'EROFS') ? ExitCode.failure : ExitCode.noSpace,
          hint: 'free space on the target (or choose another --to) and run the restore again into an empty directory',
        });
      }
      this.#tally.error(path, err);
    }
  }

  async #leaf(parent: P, entry: DirEntry, st: FileStat, path: string): Promise<void> {
    switch (st.type) {
      case 'file':
        await this.#file(parent, entry, st);
        break;
      case 'symlink':
        await this.#target.symlink(parent, entry.name, await this.#fs.readlink(entry.ino), st);
        this.#tally.summary.symlinks++;
        break;
      case 'chardev':
      case 'blockdev':
      case 'fifo':
        if (!this.#options.devices) {
          this.#tally.skip(path, 'special-file', `${st.type} not restored (use --devices to restore device nodes and fifos)`);
        } else {
          await this.#target.special(parent, entry.name, st);
          this.#tally.summary.specialFiles++;
        }
        break;
      default:
        this.#tally.skip(path, 'special-file', `${st.type} not restored`);
    }
  }

  async #directory(parent: P, entry: DirEntry, st: FileStat, path: string, depth: number): Promise<void> {
    const seenAt = this.#visitedDirs.get(entry.ino);
    if (seenAt !== undefined) {
      throw new BadInputError('fs-directory-loop', `directory inode ${entry.ino} was already restored from ${seenAt} (a directory loop or a hard-linked directory): not entered again`);
    }
    if (depth > MAX_WALK_DEPTH) throw new BadInputError('fs-too-deep', `more than ${MAX_WALK_DEPTH} nested directories: not entered`);
    this.#visitedDirs.set(entry.ino, path);
    const dir = await this.#target.enterDir(parent, entry.name, st);
    this.#tally.summary.directories++;
    await this.#children(entry.ino, dir, path, depth + 1);
    await this.#target.leaveDir(dir, st);
  }

  async #file(parent: P, entry: DirEntry, st: FileStat): Promise<void> {
    const multiLinked = (st.nlink ?? 1) > 1;
    // No await between looking the inode up and registering this copy: concurrent names of one
    // inode must see each other.
    const earlier = multiLinked ? this.#linked.get(entry.ino) : undefined;
    if (earlier) {
      const first = await earlier;
      if (first !== undefined) {
        await this.#target.hardlink(parent, entry.name, first);
        this.#tally.summary.hardlinks++;
        return;
      }
    }
    let data = 0;
    const restored = this.#target.file(parent, entry.name, entry.ino, st, (n) => {
      data += n;
      this.#progress(n);
    });
    // Later names of this inode wait for this copy (and make their own if it fails).
    if (multiLinked && !earlier) this.#linked.set(entry.ino, restored.then((handle) => handle, () => undefined));
    await restored;
    this.#progress(st.size - data);
    this.#tally.summary.files++;
    this.#tally.summary.bytes += st.size;
    this.#tally.summary.dataBytes += data;
  }

  #progress(n: number): void {
    this.#done += n;
    this.#options.progress?.(this.#done, Math.max(this.#total, this.#done));
  }
}

async function* walkDirectoryOrSelf(fs: Filesystem, source: ResolvedPath) {
  if (source.stat.type === 'dir') yield* walkDirectory(fs, source.ino, source.path, true);
  else yield { type: source.stat.type, size: source.stat.size };
}

function toSeconds(ns: bigint): number {
  return Number(ns / 1_000_000_000n) + Number(ns % 1_000_000_000n) / 1e9;
}

// ---- into a host directory -------------------------------------------------------------------

const OPEN_NEW_FILE = fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW;

class DirectoryTarget implements RestoreTarget<string> {
  readonly root: string;
  /** Several files in flight overlap repository fetches with the (thread-pool) syscalls of others. */
  readonly concurrency = 4;
  readonly #fs: Filesystem;
  readonly #tally: Tally;
  readonly #asRoot = process.getuid?.() === 0;
  /** Directories whose mode and times are set at the end, after their content. */
  readonly #dirs: Array<{ path: string; st: FileStat }> = [];

  constructor(root: string, fs: Filesystem, tally: Tally) {
    this.root = root;
    this.#fs = fs;
    this.#tally = tally;
    if (!this.#asRoot) tally.warn('ownership not restored: only root can give files to other users');
  }

  /** `parent/name`, checked to be a direct child of `parent` and under the target. */
  #child(parent: string, name: string): string {
    const path = join(parent, name);
    if (unsafeNameReason(name) || dirname(path) !== parent || !(path.startsWith(this.root + sep) || (this.root === sep && path.startsWith(sep)))) {
      throw new BadInputError('unsafe-path', `refused to create ${JSON.stringify(path)}: it would not be a direct child of ${parent} inside ${this.root}`);
    }
    return path;
  }

  async enterDir(parent: string, name: string): Promise<string> {
    const path = this.#child(parent, name);
    try {
      await mkdir(path, { mode: 0o700 });
    } catch (err) {
      if (!isErrno(err, 'EEXIST')) throw err;
      const existing = await lstat(path);
      if (!existing.isDirectory() || existing.isSymbolicLink()) {
        throw new TresorError('target-exists', `${path} already exists and is not a directory: not replaced, nothing restored under it`, {
          hint: 'restore into an empty directory (--to), or move the existing entry away',
        });
      }
      this.#tally.warn(`restored into directories that already existed (e.g. ${path})`);
    }
    return path;
  }

  async leaveDir(path: string, st: FileStat): Promise<void> {
    this.#dirs.push({ path, st });
  }

  async file(parent: string, name: string, ino: bigint, st: FileStat, onData: (n: number) => void): Promise<string> {
    const path = this.#child(parent, name);
    const extents = await dataExtents(this.#fs, ino, st.size);
    let handle: FileHandle;
    try {
      handle = await open(path, OPEN_NEW_FILE, 0o600);
    } catch (err) {
      throw isErrno(err, 'EEXIST', 'ELOOP')
        ? new TresorError('target-exists', `${path} already exists: not overwritten`, { hint: 'restore into an empty directory (--to), or move the existing file away' })
        : err;
    }
    try {
      for await (const piece of readRanges(this.#fs, ino, extents)) {
        await writeAll(handle, piece.data, piece.offset);
        onData(piece.data.length);
      }
      await handle.truncate(st.size);
      if (this.#asRoot) await this.#owner(() => handle.chown(st.uid ?? 0, st.gid ?? 0), path, st);
      await handle.chmod(st.mode ?? 0o644);
      await this.#times(() => handle.utimes(toSeconds(st.atimeNs ?? st.mtimeNs ?? 0n), toSeconds(st.mtimeNs ?? 0n)), path, st);
      await handle.close();
    } catch (err) {
      await handle.close().catch(() => undefined);
      // A partial file would pass for a restored one: remove it (it is ours, created with O_EXCL).
      await rm(path, { force: true }).catch(() => undefined);
      throw err;
    }
    return path;
  }

  async hardlink(parent: string, name: string, first: string): Promise<void> {
    await link(first, this.#child(parent, name));
  }

  async symlink(parent: string, name: string, target: string, st: FileStat): Promise<void> {
    const path = this.#child(parent, name);
    if (target.includes('\0')) throw new BadInputError('unsafe-symlink', `the symlink target ${JSON.stringify(target)} contains a NUL character`);
    await symlink(target, path);
    if (this.#asRoot) await this.#owner(() => lchown(path, st.uid ?? 0, st.gid ?? 0), path, st);
    await this.#times(() => lutimes(path, toSeconds(st.atimeNs ?? st.mtimeNs ?? 0n), toSeconds(st.mtimeNs ?? 0n)), path, st);
  }

  async special(parent: string, name: string, st: FileStat): Promise<void> {
    const path = this.#child(parent, name);
    const mode = ((st.mode ?? 0o644) & 0o7777).toString(8);
    const kind = st.type === 'fifo' ? ['p'] : [st.type === 'chardev' ? 'c' : 'b', String(st.rdev?.major ?? 0), String(st.rdev?.minor ?? 0)];
    // Node has no mknod(2); coreutils' mknod creates the node without following anything.
    await execFileAsync('mknod', ['-m', mode, '--', path, ...kind]);
    if (this.#asRoot) await this.#owner(() => lchown(path, st.uid ?? 0, st.gid ?? 0), path, st);
    await this.#times(() => lutimes(path, toSeconds(st.atimeNs ?? st.mtimeNs ?? 0n), toSeconds(st.mtimeNs ?? 0n)), path, st);
  }

  /** Directory modes and times, deepest first, once nothing more is written into them. */
  async finish(): Promise<void> {
    for (const { path, st } of this.#dirs.reverse()) {
      try {
        const now = await lstat(path);
        if (!now.isDirectory() || now.isSymbolicLink()) throw new TresorError('target-changed', `${path} is no longer a directory: its metadata was not set`);
        if (this.#asRoot) await this.#owner(() => lchown(path, st.uid ?? 0, st.gid ?? 0), path, st);
        await chmod(path, st.mode ?? 0o755);
        await this.#times(() => lutimes(path, toSeconds(st.atimeNs ?? st.mtimeNs ?? 0n), toSeconds(st.mtimeNs ?? 0n)), path, st);
      } catch (err) {
        this.#tally.error(path, err);
      }
    }
  }

  async #owner(apply: () => Promise<void>, path: string, st: FileStat): Promise<void> {
    if (st.uid === undefined && st.gid === undefined) return;
    try {
      await apply();
    } catch (err) {
      this.#tally.warn(`ownership could not be set on some entries (e.g. ${path}: ${(err as Error).message})`);
    }
  }

  async #times(apply: () => Promise<void>, path: string, st: FileStat): Promise<void> {
    if (st.mtimeNs === undefined) return;
    try {
      await apply();
    } catch (err) {
      this.#tally.warn(`times could not be set on some entries (e.g. ${path}: ${(err as Error).message})`);
    }
  }
}

async function writeAll(handle: FileHandle, data: Buffer, position: number): Promise<void> {
  for (let done = 0; done < data.length;) {
    const { bytesWritten } = await handle.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

/**
 * Restores `path` of `fs` into the host directory `dir` (created if missing): a directory as
 * dir/NAME with everything under it ('/' as the content of dir itself), anything else as dir/NAME.
 */
export async function restoreToDirectory(fs: Filesystem, path: string, dir: string, options: FileRestoreOptions = {}): Promise<RestoreSummary> {
  const source = await resolvePath(fs, path);
  let root: string;
  try {
    await mkdir(dir, { recursive: true });
    root = await realpath(dir);
    if (!(await lstat(root)).isDirectory()) throw new Error('not a directory');
  } catch (err) {
    throw new UsageError(`cannot restore into ${dir}: ${(err as Error).message}`, 'give --to an existing directory, or a new one that can be created');
  }
  const tally = new Tally(source.path, root, 'directory');
  await new TreeRestorer(fs, new DirectoryTarget(root, fs, tally), tally, options).run(source);
  return tally.done();
}

// ---- into a tar stream -----------------------------------------------------------------------

class TarTarget implements RestoreTarget<string> {
  readonly root = '';
  readonly concurrency = 1;
  readonly #fs: Filesystem;
  readonly #tar: TarWriter;

  constructor(fs: Filesystem, sink: TarSink) {
    this.#fs = fs;
    this.#tar = new TarWriter(sink);
  }

  get bytesWritten(): number {
    return this.#tar.bytesWritten;
  }

  #path(parent: string, name: string): string {
    if (unsafeNameReason(name)) throw new BadInputError('unsafe-path', `refused the name ${JSON.stringify(name)} in the archive`);
    return parent === '' ? name : `${parent}/${name}`;
  }

  #common(st: FileStat, defaultMode: number) {
    return { mode: st.mode ?? defaultMode, uid: st.uid ?? 0, gid: st.gid ?? 0, mtimeNs: st.mtimeNs ?? 0n };
  }

  async enterDir(parent: string, name: string, st: FileStat): Promise<string> {
    const path = this.#path(parent, name);
    await this.#tar.add({ path, type: 'dir', ...this.#common(st, 0o755) });
    return path;
  }

  async leaveDir(): Promise<void> {}

  async file(parent: string, name: string, ino: bigint, st: FileStat, onData: (n: number) => void): Promise<string> {
    const path = this.#path(parent, name);
    // The map first: a damaged one fails the entry before its header is written.
    const extents = await dataExtents(this.#fs, ino, st.size);
    const dataBytes = extents.reduce((n, e) => n + e.length, 0);
    const sparse = dataBytes < st.size;
    const fs = this.#fs;
    const data = sparse
      ? (async function* () {
        for await (const piece of readRanges(fs, ino, extents)) {
          onData(piece.data.length);
          yield piece.data;
        }
      })()
      : (async function* () {
        for await (const chunk of fileBytes(fs, ino, st.size)) {
          onData(chunk.length);
          yield chunk;
        }
      })();
    await this.#tar.add({ path, type: 'file', ...this.#common(st, 0o644), size: st.size, dataSegments: sparse ? extents : undefined }, data);
    return path;
  }

  async hardlink(parent: string, name: string, first: string): Promise<void> {
    await this.#tar.add({ path: this.#path(parent, name), type: 'hardlink', mode: 0o644, uid: 0, gid: 0, mtimeNs: 0n, linkTarget: first });
  }

  async symlink(parent: string, name: string, target: string, st: FileStat): Promise<void> {
    if (target.includes('\0')) throw new BadInputError('unsafe-symlink', `the symlink target ${JSON.stringify(target)} contains a NUL character`);
    await this.#tar.add({ path: this.#path(parent, name), type: 'symlink', ...this.#common(st, 0o777), linkTarget: target });
  }

  async special(parent: string, name: string, st: FileStat): Promise<void> {
    const type = st.type === 'fifo' ? 'fifo' : st.type === 'chardev' ? 'chardev' : 'blockdev';
    await this.#tar.add({ path: this.#path(parent, name), type, ...this.#common(st, 0o644), device: st.rdev });
  }

  async finish(): Promise<void> {
    await this.#tar.finish();
  }
}

/**
 * Writes `path` of `fs` as a tar stream to `sink` (names relative: NAME/..., or the root's
 * content for '/'). A file that fails half-way is padded with zeros to keep the archive well
 * formed, and reported as an error.
 */
export async function restoreToTar(fs: Filesystem, path: string, sink: TarSink, targetName: string, options: FileRestoreOptions = {}): Promise<RestoreSummary & { archiveBytes: number }> {
  const source = await resolvePath(fs, path);
  const tally = new Tally(source.path, targetName, 'tar');
  const target = new TarTarget(fs, sink);
  await new TreeRestorer(fs, target, tally, options).run(source);
  return { ...tally.done(), archiveBytes: target.bytesWritten };
}

/** A sink writing a new file (never an existing one), for archives and `cat -o`: `close` makes it durable. */
export async function createOutputFile(path: string): Promise<{ sink: TarSink; close(): Promise<void>; abort(): Promise<void> }> {
  let handle: FileHandle;
  try {
    handle = await open(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
  } catch (err) {
    if (isErrno(err, 'EEXIST')) throw new UsageError(`${path} already exists: not overwritten`, 'choose a new file name for the archive');
    throw err;
  }
  let position = 0;
  return {
    sink: async (chunk) => {
      await writeAll(handle, chunk, position);
      position += chunk.length;
    },
    close: async () => {
      await handle.sync();
      await handle.close();
    },
    abort: async () => {
      await handle.close().catch(() => undefined);
      await rm(path, { force: true });
    },
  };
}
