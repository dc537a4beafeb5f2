/**
 * Browsing files inside image snapshots: `SNAPSHOT[:DISK[:PART]][:PATH]` references, volumes and
 * filesystems of a snapshot's disks (read lazily through snapshot-device.ts), path resolution,
 * listings (ls, ls -R), search by name (find) and streaming one file's bytes (cat).
 *
 * The guest filesystem is untrusted. Path resolution happens entirely inside it: '..' pops the
 * directory stack that was actually walked, symlinks in intermediate components are expanded
 * inside the guest filesystem (absolute targets from its root) with at most 40 expansions, and the
 * final component is not followed (unless the path ends in '/'). Nothing here touches the host's
 * filesystem. Walks keep a set of the directories entered, so a directory that contains itself
 * (or a hard-linked directory) is reported once and never entered again; an entry that cannot be
 * read is reported with its error and the walk goes on.
 */
import type { CodecPool } from '../repo/codec-pool.ts';
import type { SnapshotManifest } from '../repo/manifest.ts';
import type { Repository } from '../repo/repository.ts';
import type { DirEntry, FileStat, FileType, Filesystem } from '../fs/filesystem.ts';
import { openVolumes, type Volume } from '../fs/probe.ts';
import { defaultProbes } from '../fs/registry.ts';
import { BadInputError, NotFoundError, TresorError, UsageError, describeError } from '../util/errors.ts';
import { compileGlob } from '../util/glob.ts';
import { openSnapshotDisk, pickDisk, type SnapshotDisk, type SnapshotDiskStats } from './snapshot-device.ts';

// ---- references ------------------------------------------------------------------------------

export interface FileRef {
  snapshot: string;
  disk?: string;
  part?: string;
  /** Absolute path inside the filesystem, when the reference carries one (`…:/etc/hosts`). */
  path?: string;
}

/**
 * Parses `SNAPSHOT[:DISK[:PART]][:PATH]`. Snapshot names contain no ':'; disk names and volume
 * names ('1', 'lvm/vg0/root') do not start with '/'; a path always does, and may itself contain ':'.
 */
export function parseFileRef(text: string, pathRule: 'none' | 'optional' | 'required'): FileRef {
  const colon = text.indexOf(':');
  const ref: FileRef = { snapshot: colon < 0 ? text : text.slice(0, colon) };
  let rest = colon < 0 ? undefined : text.slice(colon + 1);
  for (const field of ['disk', 'part'] as const) {
    if (rest === undefined || rest.startsWith('/')) break;
    const next = rest.indexOf(':');
    ref[field] = next < 0 ? rest : rest.slice(0, next);
    rest = next < 0 ? undefined : rest.slice(next + 1);
    if (ref[field] === '') throw badRef(text, `the ${field} name is empty`);
  }
  if (rest !== undefined) {
    if (!rest.startsWith('/')) throw badRef(text, `${JSON.stringify(rest)} is neither a disk, a volume nor an absolute path`);
    ref.path = rest;
  }
  if (ref.snapshot === '') throw badRef(text, 'the snapshot name is empty');
  if (pathRule === 'none' && ref.path !== undefined) throw badRef(text, 'this command takes no path in the reference');
  if (pathRule === 'required' && ref.path === undefined) throw badRef(text, 'a path is needed, e.g. SNAPSHOT:/etc/hosts or SNAPSHOT:vda:1:/etc/hosts');
  return ref;
}

function badRef(text: string, why: string): UsageError {
  return new UsageError(`invalid reference ${JSON.stringify(text)}: ${why}`,
    'write SNAPSHOT[:DISK[:PART]][:/PATH], e.g. vm/web1/20261122T101500Z:vda:2:/etc/hosts; `tresor files volumes SNAPSHOT` lists disks and volumes');
}

export function formatRef(snapshot: string, disk: string, part: string): string {
  return `${snapshot}:${disk}:${part}`;
}

// ---- volumes and filesystems -----------------------------------------------------------------

export interface OpenOptions {
  pool?: CodecPool;
  cacheBytes?: number;
}

/** The disks of one snapshot opened so far, with their volumes; closes them all at the end. */
export class SnapshotBrowser {
  readonly #repo: Repository;
  readonly #options: OpenOptions;
  readonly #manifests = new Map<string, Promise<SnapshotManifest>>();
  readonly #disks = new Map<string, Promise<{ disk: SnapshotDisk; volumes: Volume[] }>>();
  readonly #opened: SnapshotDisk[] = [];

  constructor(repo: Repository, options: OpenOptions = {}) {
    this.#repo = repo;
    this.#options = options;
  }

  /** Bytes fetched etc., summed over every disk opened. */
  get stats(): SnapshotDiskStats {
    const sum: SnapshotDiskStats = { bytesFetched: 0, storeReads: 0, chunksDecoded: 0, indexPiecesLoaded: 0, cacheHits: 0 };
    for (const d of this.#opened) for (const k of Object.keys(sum) as Array<keyof SnapshotDiskStats>) sum[k] += d.stats[k];
    return sum;
  }

  /** The names of the disks a reference addresses: the one it names, else all. */
  manifest(snapshot: string): Promise<SnapshotManifest> {
    let m = this.#manifests.get(snapshot);
    if (!m) {
      m = this.#repo.readSnapshot(snapshot);
      m.catch(() => this.#manifests.delete(snapshot));
      this.#manifests.set(snapshot, m);
    }
    return m;
  }

  async diskNames(ref: FileRef): Promise<string[]> {
    const manifest = await this.manifest(ref.snapshot);
    if (ref.disk !== undefined) return [pickDisk(manifest, ref.disk).name];
    return manifest.disks.map((d) => d.name);
  }

  async volumes(snapshot: string, diskName?: string): Promise<{ disk: SnapshotDisk; volumes: Volume[] }> {
    const manifest = await this.manifest(snapshot);
    const name = pickDisk(manifest, diskName).name;
    const key = `${snapshot}\0${name}`;
    let opened = this.#disks.get(key);
    if (!opened) {
      opened = (async () => {
        const disk = await openSnapshotDisk(this.#repo, snapshot, name, { ...this.#options, manifest });
        this.#opened.push(disk);
        return { disk, volumes: await openVolumes(disk.device, defaultProbes) };
      })();
      this.#disks.set(key, opened);
    }
    return opened;
  }

  /** The one filesystem a reference names (see `pickVolume` for the defaults). */
  async filesystem(ref: FileRef): Promise<OpenedFilesystem> {
    const { disk, volumes } = await this.volumes(ref.snapshot, ref.disk);
    const volume = pickVolume(ref, disk.disk.name, volumes);
    return { ref: formatRef(disk.manifest.name, disk.disk.name, volume.part), snapshot: disk.manifest.name, disk: disk.disk.name, part: volume.part, fs: volume.fs as Filesystem };
  }

  /** Every readable filesystem a reference covers (all disks / all volumes unless named). */
  async filesystems(ref: FileRef): Promise<{ found: OpenedFilesystem[]; problems: Array<{ ref: string; error: string }> }> {
    const found: OpenedFilesystem[] = [];
    const problems: Array<{ ref: string; error: string }> = [];
    for (const diskName of await this.diskNames(ref)) {
      const { disk, volumes } = await this.volumes(ref.snapshot, diskName);
      if (ref.part !== undefined) {
        found.push(await this.filesystem({ ...ref, disk: diskName }));
        continue;
      }
      for (const v of volumes) {
        const name = formatRef(disk.manifest.name, diskName, v.part);
        if (v.fs) found.push({ ref: name, snapshot: disk.manifest.name, disk: diskName, part: v.part, fs: v.fs });
        else if (v.error) problems.push({ ref: name, error: v.error });
      }
    }
    return { found, problems };
  }

  async close(): Promise<void> {
    await Promise.all(this.#opened.map((d) => d.close()));
  }
}

export interface OpenedFilesystem {
  /** Canonical `SNAPSHOT:DISK:PART`. */
  ref: string;
  snapshot: string;
  disk: string;
  part: string;
  fs: Filesystem;
}

/**
 * The volume a reference names; without PART, the only volume holding a filesystem. Anything
 * else is an error that lists the volumes, so the user knows what to type.
 */
export function pickVolume(ref: FileRef, diskName: string, volumes: Volume[]): Volume {
  const listing = () => volumes.map((v) => `${formatRef(ref.snapshot, diskName, v.part)} (${describeVolume(v)})`).join(', ') || 'none';
  if (ref.part !== undefined) {
    const v = volumes.find((x) => x.part === ref.part);
    if (!v) {
      throw new NotFoundError('no-such-volume', `disk ${diskName} of snapshot ${ref.snapshot} has no volume ${ref.part}`, {
        hint: `its volumes are: ${listing()}`, context: { snapshot: ref.snapshot, disk: diskName, part: ref.part },
      });
    }
    if (!v.fs) {
      throw new BadInputError('no-filesystem', `volume ${formatRef(ref.snapshot, diskName, v.part)} holds no filesystem Tresor can read${v.error ? `: ${v.error}` : ''}`, {
        hint: `its volumes are: ${listing()}; restore the whole disk with \`tresor restore image\` to inspect it with other tools`,
        context: { snapshot: ref.snapshot, disk: diskName, part: v.part },
      });
    }
    return v;
  }
  const withFs = volumes.filter((v) => v.fs);
  if (withFs.length === 1) return withFs[0];
  if (withFs.length === 0) {
    throw new BadInputError('no-filesystem', `disk ${diskName} of snapshot ${ref.snapshot} holds no filesystem Tresor can read`, {
      hint: `its volumes are: ${listing()}`, context: { snapshot: ref.snapshot, disk: diskName },
    });
  }
  throw new UsageError(`disk ${diskName} of snapshot ${ref.snapshot} holds ${withFs.length} filesystems: say which one`,
    `add the volume to the reference: ${withFs.map((v) => `${formatRef(ref.snapshot, diskName, v.part)} (${describeVolume(v)})`).join(', ')}`);
}

export function describeVolume(v: Volume): string {
  if (v.fs) return `${v.fs.type}${v.fs.label ? ` "${v.fs.label}"` : ''}`;
  return v.error ? `unreadable: ${v.error}` : 'no known filesystem';
}

export interface VolumeInfo {
  ref: string;
  disk: string;
  diskSize: number;
  part: string;
  offset: number;
  size: number;
  typeId?: string;
  name?: string;
  filesystem?: { type: string; label?: string; uuid?: string; size: number };
  error?: string;
  warnings?: string[];
}

/** Disks, partitions / logical volumes and filesystems of a snapshot (or of the disk named). */
export async function listVolumes(browser: SnapshotBrowser, ref: FileRef): Promise<VolumeInfo[]> {
  const out: VolumeInfo[] = [];
  for (const diskName of await browser.diskNames(ref)) {
    const { disk, volumes } = await browser.volumes(ref.snapshot, diskName);
    for (const v of volumes) {
      if (ref.part !== undefined && v.part !== ref.part) continue;
      const info: VolumeInfo = {
        ref: formatRef(disk.manifest.name, diskName, v.part), disk: diskName, diskSize: disk.disk.size,
        part: v.part, offset: v.offset, size: v.size,
      };
      if (v.typeId !== undefined) info.typeId = v.typeId;
      if (v.name !== undefined) info.name = v.name;
      if (v.fs) info.filesystem = { type: v.fs.type, label: v.fs.label, uuid: v.fs.uuid, size: v.fs.sizeBytes };
      if (v.error !== undefined) info.error = v.error;
      if (v.warnings?.length) info.warnings = v.warnings;
      out.push(info);
    }
  }
  return out;
}

// ---- path resolution -------------------------------------------------------------------------

/** Symlink expansions allowed while resolving one path (Linux: ELOOP after 40). */
export const MAX_SYMLINK_EXPANSIONS = 40;

export interface ResolvedPath {
  ino: bigint;
  stat: FileStat;
  /** The canonical path that was walked ('/' for the root). */
  path: string;
}

/**
 * Resolves an absolute path inside `fs`, component by component with `lookup`. See the module
 * comment for the rules; `followFinal` also expands a symlink in the last component.
 */
export async function resolvePath(fs: Filesystem, path: string, options: { followFinal?: boolean } = {}): Promise<ResolvedPath> {
  const queue = path.split('/').filter((c) => c !== '' && c !== '.');
  const followFinal = options.followFinal === true || (path.endsWith('/') && queue.length > 0);
  const walked: Array<{ ino: bigint; name: string; stat: FileStat }> = [];
  let expansions = 0;
  const here = () => `/${walked.map((w) => w.name).join('/')}`;
  while (queue.length > 0) {
    const name = queue.shift() as string;
    if (name === '..') {
      walked.pop();
      continue;
    }
    const dir = walked.at(-1);
    const dirIno = dir?.ino ?? fs.rootIno;
    if (dir && dir.stat.type !== 'dir') {
      throw new BadInputError('fs-not-a-directory', `${here()} is not a directory (it is a ${dir.stat.type}), so it has no entry ${JSON.stringify(name)}`, {
        hint: 'check the path with `tresor files ls`', context: { path },
      });
    }
    const entry = await fs.lookup(dirIno, name);
    if (!entry) {
      throw new NotFoundError('fs-path-not-found', `${joinPath(here(), name)} does not exist in the ${fs.type} filesystem`, {
        hint: 'list the directory with `tresor files ls`, or search with `tresor files find --name`', context: { path },
      });
    }
    const stat = await fs.stat(entry.ino);
    if (stat.type === 'symlink' && (queue.length > 0 || followFinal)) {
      if (++expansions > MAX_SYMLINK_EXPANSIONS) {
        throw new BadInputError('fs-symlink-loop', `too many levels of symbolic links while resolving ${path} (more than ${MAX_SYMLINK_EXPANSIONS})`, {
          hint: 'the guest filesystem has a symlink loop; address the files by a path without symlinks', context: { path },
        });
      }
      const target = await fs.readlink(entry.ino);
      if (target.startsWith('/')) walked.length = 0;
      queue.unshift(...target.split('/').filter((c) => c !== '' && c !== '.'));
      continue;
    }
    walked.push({ ino: entry.ino, name, stat });
  }
  const last = walked.at(-1);
  if (!last) return { ino: fs.rootIno, stat: await fs.stat(fs.rootIno), path: '/' };
  if (followFinal && last.stat.type !== 'dir') {
    throw new BadInputError('fs-not-a-directory', `${here()} is not a directory (it is a ${last.stat.type})`, { context: { path } });
  }
  return { ino: last.ino, stat: last.stat, path: here() };
}

export function joinPath(dir: string, name: string): string {
  return dir === '/' ? `/${name}` : `${dir}/${name}`;
}

// ---- entries and walks -----------------------------------------------------------------------

export interface EntryInfo {
  /** Path inside the filesystem (names as stored: they may contain anything but '/' sensibly). */
  path: string;
  name: string;
  type: FileType;
  ino: string;
  size?: number;
  mode?: number;
  uid?: number;
  gid?: number;
  nlink?: number;
  /** ISO 8601 (ms) and the exact value in ns since the epoch, as a decimal string. */
  mtime?: string;
  mtimeNs?: string;
  /** Symlink target. */
  target?: string;
  rdev?: { major: number; minor: number };
  streams?: string[];
  /** Filesystem that holds it (`SNAPSHOT:DISK:PART`), in multi-filesystem listings (find). */
  ref?: string;
  error?: { code: string; message: string };
}

export function errorInfo(err: unknown): { code: string; message: string } {
  return { code: err instanceof TresorError ? err.code : 'error', message: describeError(err) };
}

function isoTime(ns: bigint): string | undefined {
  const ms = Number(ns / 1_000_000n);
  const d = new Date(ms);
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString();
}

export function statInfo(path: string, name: string, ino: bigint, st: FileStat): EntryInfo {
  const info: EntryInfo = { path, name, type: st.type, ino: ino.toString(), size: st.size };
  if (st.mode !== undefined) info.mode = st.mode;
  if (st.uid !== undefined) info.uid = st.uid;
  if (st.gid !== undefined) info.gid = st.gid;
  if (st.nlink !== undefined) info.nlink = st.nlink;
  if (st.mtimeNs !== undefined) {
    info.mtimeNs = st.mtimeNs.toString();
    const iso = isoTime(st.mtimeNs);
    if (iso) info.mtime = iso;
  }
  if (st.rdev) info.rdev = st.rdev;
  if (st.streams?.length) info.streams = st.streams;
  return info;
}

/** Stat (and readlink) of one directory entry; a failure is reported in `error`, not thrown. */
export async function describeEntry(fs: Filesystem, entry: DirEntry, path: string): Promise<EntryInfo> {
  let st: FileStat;
  try {
    st = await fs.stat(entry.ino);
  } catch (err) {
    return { path, name: entry.name, type: entry.type, ino: entry.ino.toString(), error: errorInfo(err) };
  }
  const info = statInfo(path, entry.name, entry.ino, st);
  if (st.type === 'symlink') {
    try {
      info.target = await fs.readlink(entry.ino);
    } catch (err) {
      info.error = errorInfo(err);
    }
  }
  return info;
}

/** Deepest directory nesting a walk enters (far beyond any real tree; host paths end at 4 KiB). */
export const MAX_WALK_DEPTH = 2048;

interface Frame {
  path: string;
  entries: DirEntry[];
  next: number;
}

async function sortedDir(fs: Filesystem, ino: bigint): Promise<DirEntry[]> {
  const entries = await fs.readdir(ino);
  return entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * Everything under directory `ino` (at `path`), in sorted pre-order: each entry, then (when
 * `recursive`) what it contains. A directory already entered (a cycle, a hard-linked
 * directory) and one that cannot be read carry an `error` and are not entered.
 */
export async function* walkDirectory(fs: Filesystem, ino: bigint, path: string, recursive: boolean): AsyncGenerator<EntryInfo> {
  const visited = new Map<bigint, string>([[ino, path]]);
  const stack: Frame[] = [{ path, entries: await sortedDir(fs, ino), next: 0 }];
  while (stack.length > 0) {
    const top = stack[stack.length - 1];
    if (top.next >= top.entries.length) {
      stack.pop();
      continue;
    }
    const entry = top.entries[top.next++];
    const info = await describeEntry(fs, entry, joinPath(top.path, entry.name));
    let children: DirEntry[] | undefined;
    if (recursive && info.type === 'dir' && !info.error) {
      const seenAt = visited.get(entry.ino);
      if (seenAt !== undefined) {
        info.error = { code: 'fs-directory-loop', message: `directory inode ${entry.ino} was already listed at ${seenAt} (a directory loop or a hard-linked directory): not entered again` };
      } else if (stack.length >= MAX_WALK_DEPTH) {
        info.error = { code: 'fs-too-deep', message: `more than ${MAX_WALK_DEPTH} nested directories: not entered` };
      } else {
        visited.set(entry.ino, info.path);
        try {
          children = await sortedDir(fs, entry.ino);
        } catch (err) {
          info.error = errorInfo(err);
        }
      }
    }
    yield info;
    if (children) stack.push({ path: info.path, entries: children, next: 0 });
  }
}

/** `ls`: a directory's entries (recursively with -R), or the entry itself when not a directory. */
export async function* listPath(fs: Filesystem, path: string, options: { recursive: boolean }): AsyncGenerator<EntryInfo> {
  const resolved = await resolvePath(fs, path);
  if (resolved.stat.type !== 'dir') {
    const name = resolved.path.slice(resolved.path.lastIndexOf('/') + 1);
    yield await describeEntry(fs, { name, ino: resolved.ino, type: resolved.stat.type }, resolved.path);
    return;
  }
  yield* walkDirectory(fs, resolved.ino, resolved.path, options.recursive);
}

/** `find --name GLOB`: matching entries under `path`, plus every entry that could not be read. */
export async function* findByName(fs: Filesystem, pattern: string, path = '/'): AsyncGenerator<EntryInfo> {
  const glob = compileGlob(pattern);
  const resolved = await resolvePath(fs, path);
  if (resolved.stat.type !== 'dir') {
    throw new BadInputError('fs-not-a-directory', `${resolved.path} is not a directory`, { hint: 'find searches under a directory' });
  }
  for await (const info of walkDirectory(fs, resolved.ino, resolved.path, true)) {
    if (info.error || glob.matches(info.name)) yield info;
  }
}

// ---- file data -------------------------------------------------------------------------------

/** Bytes of one read while streaming file data. */
export const DATA_PIECE = 1 << 20;

export interface DataPiece {
  offset: number;
  data: Buffer;
}

/**
 * The data extents of a file, checked against the contract (ascending, non-overlapping, within
 * the size): a reader bug or a damaged map must not make a restore write outside the file.
 */
export async function dataExtents(fs: Filesystem, ino: bigint, size: number): Promise<Array<{ offset: number; length: number }>> {
  const out: Array<{ offset: number; length: number }> = [];
  let cursor = 0;
  for (const e of await fs.extents(ino)) {
    if (!Number.isSafeInteger(e.offset) || !Number.isSafeInteger(e.length) || e.offset < cursor || e.length < 0 || e.offset + e.length > size) {
      throw new BadInputError('fs-bad-extents', `${fs.type}: inode ${ino}: the data map has an extent ${e.offset}+${e.length} that overlaps another or lies outside the file (${size} bytes)`, {
        context: { ino: ino.toString(), offset: e.offset, length: e.length, size },
        hint: 'the guest filesystem is damaged here: check it with its own tools on a restored copy of the disk',
      });
    }
    cursor = e.offset + e.length;
    if (e.hole || e.length === 0) continue;
    const prev = out.at(-1);
    if (prev && prev.offset + prev.length === e.offset) prev.length += e.length;
    else out.push({ offset: e.offset, length: e.length });
  }
  return out;
}

/**
 * Reads the given ranges of a file in pieces of DATA_PIECE bytes, keeping one read ahead of the
 * consumer so fetching from the repository overlaps with writing.
 */
export async function* readRanges(fs: Filesystem, ino: bigint, ranges: Array<{ offset: number; length: number }>): AsyncGenerator<DataPiece> {
  const pieces: Array<{ offset: number; length: number }> = [];
  for (const r of ranges) {
    for (let at = r.offset; at < r.offset + r.length; at += DATA_PIECE) pieces.push({ offset: at, length: Math.min(DATA_PIECE, r.offset + r.length - at) });
  }
  const start = (i: number) => {
    const p = fs.read(ino, pieces[i].offset, pieces[i].length);
    p.catch(() => undefined); // awaited in turn below
    return p;
  };
  let ahead = pieces.length > 0 ? start(0) : undefined;
  for (let i = 0; i < pieces.length; i++) {
    const data = await (ahead as Promise<Buffer>);
    ahead = i + 1 < pieces.length ? start(i + 1) : undefined;
    if (data.length !== pieces[i].length) {
      throw new BadInputError('fs-short-read', `${fs.type}: inode ${ino}: read ${data.length} of ${pieces[i].length} bytes at ${pieces[i].offset} inside the file`, {
        context: { ino: ino.toString(), offset: pieces[i].offset },
      });
    }
    yield { offset: pieces[i].offset, data };
  }
}

/** A whole file's bytes in order, holes as zeros, never materialising more than one piece. */
export async function* fileBytes(fs: Filesystem, ino: bigint, size: number): AsyncGenerator<Buffer> {
  const zeros = Buffer.alloc(Math.min(DATA_PIECE, size));
  let cursor = 0;
  const emitZeros = function* (upTo: number) {
    while (cursor < upTo) {
      const n = Math.min(zeros.length, upTo - cursor);
      cursor += n;
      yield zeros.subarray(0, n);
    }
  };
  for await (const piece of readRanges(fs, ino, await dataExtents(fs, ino, size))) {
    yield* emitZeros(piece.offset);
    cursor += piece.data.length;
    yield piece.data;
  }
  yield* emitZeros(size);
}

export interface CatResult {
  path: string;
  size: number;
  bytesWritten: number;
}

/** Streams a regular file to `write`. Symlinks are not followed: the error names the target. */
export async function catFile(fs: Filesystem, path: string, write: (chunk: Buffer) => Promise<void>): Promise<CatResult> {
  const resolved = await resolvePath(fs, path);
  if (resolved.stat.type === 'symlink') {
    const target = await fs.readlink(resolved.ino);
    throw new BadInputError('fs-is-symlink', `${resolved.path} is a symbolic link to ${JSON.stringify(target)}`, {
      hint: 'symlinks are not followed inside snapshots: cat the target path instead', context: { path: resolved.path, target },
    });
  }
  if (resolved.stat.type !== 'file') {
    throw new BadInputError('fs-not-a-file', `${resolved.path} is a ${resolved.stat.type}, not a regular file`, {
      hint: resolved.stat.type === 'dir' ? 'list it with `tresor files ls`, or restore it with `tresor files restore`' : 'only regular files have contents to print',
      context: { path: resolved.path },
    });
  }
  let bytesWritten = 0;
  for await (const chunk of fileBytes(fs, resolved.ino, resolved.stat.size)) {
    await write(chunk);
    bytesWritten += chunk.length;
  }
  return { path: resolved.path, size: resolved.stat.size, bytesWritten };
}
