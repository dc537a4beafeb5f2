/**
 * Test helpers for filesystem readers (any Filesystem: ext4, XFS, NTFS, FAT...):
 * - compareWithHostTree(): walks a host directory (the tree an image was built from) and checks
 *   that the Filesystem holds exactly the same entries, bytes and metadata;
 * - walkFilesystem(): reads a whole Filesystem defensively (cycle detection, per-entry errors),
 *   for hostile-image and fuzz tests.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, lstatSync, openSync, readdirSync, readlinkSync, readSync } from 'node:fs';
import type { BigIntStats } from 'node:fs';
import { join } from 'node:path';
import type { DirEntry, FileType, Filesystem } from '../../src/fs/filesystem.ts';

export interface CompareOptions {
  /** Compare permission bits (incl. setuid/setgid/sticky). */
  mode?: boolean;
  /** Compare uid/gid. */
  owner?: boolean;
  /** mtime granularity the filesystem keeps, in ns (1 = exact, 1e9 = seconds, 2e9 = FAT); 0 = skip. */
  mtimeResolutionNs?: number;
  /** Compare directory mtimes too (tools that copy trees do not always keep them). */
  dirMtimes?: boolean;
  /** Hard links must map to one inode. */
  hardLinks?: boolean;
  /** Compare the link count. */
  nlink?: boolean;
  /** Files that are sparse on the host must have holes in extents(). */
  holes?: boolean;
  /** Device numbers of char/block devices. */
  rdev?: boolean;
  /** Names in the image root that the host tree lacks (e.g. 'lost+found'). */
  extraRootNames?: string[];
  /** Look every entry up by name too (exercises lookup / hashed directories). */
  lookups?: boolean;
  /** The directory of the Filesystem that corresponds to `hostDir` (default: its root). */
  root?: bigint;
}

export interface CompareResult {
  entries: number;
  files: number;
  bytes: number;
}

function hostType(st: BigIntStats): FileType {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFIFO()) return 'fifo';
  if (st.isCharacterDevice()) return 'chardev';
  if (st.isBlockDevice()) return 'blockdev';
  if (st.isSocket()) return 'socket';
  return 'unknown';
}

/** Compares every entry under `hostDir` with the Filesystem, both ways (no missing, no extra). */
export async function compareWithHostTree(fs: Filesystem, hostDir: string, options: CompareOptions = {}): Promise<CompareResult> {
  const opt: Required<CompareOptions> = {
    mode: true, owner: true, mtimeResolutionNs: 1, dirMtimes: true, hardLinks: true, nlink: true, holes: true, rdev: true,
    extraRootNames: [], lookups: true, root: fs.rootIno, ...options,
  };
  const result: CompareResult = { entries: 0, files: 0, bytes: 0 };
  const hostInoToFsIno = new Map<bigint, bigint>();
  const fsInoToHostIno = new Map<bigint, bigint>();
  const visitedDirs = new Set<bigint>();

  const compareDir = async (hostPath: string, fsIno: bigint, rel: string, isRoot: boolean) => {
    assert.ok(!visitedDirs.has(fsIno), `${rel}: directory inode ${fsIno} visited twice`);
    visitedDirs.add(fsIno);
    const hostNames = readdirSync(hostPath).sort();
    const fsEntries = await fs.readdir(fsIno);
    const byName = new Map<string, DirEntry>();
    for (const e of fsEntries) {
      assert.ok(!byName.has(e.name), `${rel}: name "${e.name}" listed twice`);
      byName.set(e.name, e);
    }
    const fsNames = [...byName.keys()].filter((n) => !(isRoot && opt.extraRootNames.includes(n))).sort();
    assert.deepEqual(fsNames, hostNames, `${rel}: directory listing differs`);
    for (const name of hostNames) {
      const entry = byName.get(name) as DirEntry;
      const childRel = rel === '/' ? `/${name}` : `${rel}/${name}`;
      if (opt.lookups) {
        const looked = await fs.lookup(fsIno, name);
        assert.ok(looked, `${childRel}: lookup found nothing`);
        assert.equal(looked.ino, entry.ino, `${childRel}: lookup and readdir disagree on the inode`);
      }
      await compareEntry(join(hostPath, name), entry, childRel);
    }
  };

  const compareEntry = async (hostPath: string, entry: DirEntry, rel: string) => {
    result.entries++;
    const host = lstatSync(hostPath, { bigint: true });
    const st = await fs.stat(entry.ino);
    const type = hostType(host);
    assert.equal(st.type, type, `${rel}: type`);
    assert.equal(entry.type, type, `${rel}: directory entry type`);
    if (opt.mode) assert.equal((st.mode ?? -1).toString(8), (Number(host.mode) & 0o7777).toString(8), `${rel}: mode`);
    if (opt.owner) {
      assert.equal(st.uid, Number(host.uid), `${rel}: uid`);
      assert.equal(st.gid, Number(host.gid), `${rel}: gid`);
    }
    if (opt.mtimeResolutionNs > 0 && (type !== 'dir' || opt.dirMtimes)) {
      const res = BigInt(opt.mtimeResolutionNs);
      const expected = host.mtimeNs - (((host.mtimeNs % res) + res) % res);
      assert.equal(st.mtimeNs, expected, `${rel}: mtime`);
    }
    if (opt.hardLinks && type !== 'dir') {
      const known = hostInoToFsIno.get(host.ino);
      if (known !== undefined) assert.equal(st.ino, known, `${rel}: hard link should share inode ${known}`);
      hostInoToFsIno.set(host.ino, st.ino);
      const hostSide = fsInoToHostIno.get(st.ino);
      if (hostSide !== undefined) assert.equal(hostSide, host.ino, `${rel}: distinct files share inode ${st.ino}`);
      fsInoToHostIno.set(st.ino, host.ino);
      if (opt.nlink) assert.equal(st.nlink, Number(host.nlink), `${rel}: link count`);
    }
    if (type === 'file') {
      result.files++;
      assert.equal(st.size, Number(host.size), `${rel}: size`);
      await compareFileData(fs, entry.ino, hostPath, rel, Number(host.size));
      result.bytes += Number(host.size);
      await checkExtents(fs, entry.ino, rel, Number(host.size), opt.holes && Number(host.blocks) * 512 < Number(host.size));
    } else if (type === 'symlink') {
      const target = readlinkSync(hostPath);
      assert.equal(await fs.readlink(entry.ino), target, `${rel}: symlink target`);
      assert.equal(st.size, Buffer.byteLength(target), `${rel}: symlink size`);
    } else if ((type === 'chardev' || type === 'blockdev') && opt.rdev) {
      const rdev = Number(host.rdev);
      assert.deepEqual(st.rdev, { major: (rdev >>> 8) & 0xfff, minor: (rdev & 0xff) | ((rdev >>> 12) & 0xfff00) }, `${rel}: rdev`);
    } else if (type === 'dir') {
      await compareDir(hostPath, entry.ino, rel, false);
    }
  };

  const rootStat = await fs.stat(opt.root);
  assert.equal(rootStat.type, 'dir', 'root is a directory');
  await compareDir(hostDir, opt.root, '/', true);
  return result;
}

async function compareFileData(fs: Filesystem, ino: bigint, hostPath: string, rel: string, size: number): Promise<void> {
  const piece = 1024 * 1024;
  const fd = openSync(hostPath, 'r');
  try {
    const want = Buffer.alloc(Math.min(piece, size));
    for (let offset = 0; offset < size; offset += piece) {
      const n = readSync(fd, want, 0, want.length, offset);
      const got = await fs.read(ino, offset, want.length);
      assert.equal(got.length, n, `${rel}: read length at ${offset}`);
      if (!got.equals(want.subarray(0, n))) assert.fail(`${rel}: bytes differ in [${offset}, ${offset + n})`);
    }
  } finally {
    closeSync(fd);
  }
  const past = await fs.read(ino, size, 10);
  assert.equal(past.length, 0, `${rel}: read at EOF returns nothing`);
}

/** extents() must cover [0, size) in order; sparse host files must keep some hole. */
async function checkExtents(fs: Filesystem, ino: bigint, rel: string, size: number, expectHoles: boolean): Promise<void> {
  const extents = await fs.extents(ino);
  let cursor = 0;
  for (const e of extents) {
    assert.equal(e.offset, cursor, `${rel}: extents are contiguous`);
    assert.ok(e.length > 0, `${rel}: extents are non-empty`);
    cursor += e.length;
  }
  assert.equal(cursor, size, `${rel}: extents cover the file`);
  if (expectHoles) assert.ok(extents.some((e) => e.hole), `${rel}: sparse file lost its holes`);
  for (const e of extents.filter((x) => x.hole).slice(0, 8)) {
    const data = await fs.read(ino, e.offset, Math.min(e.length, 1024 * 1024));
    assert.ok(data.every((b) => b === 0), `${rel}: hole at ${e.offset} reads as zeros`);
  }
}

// ---------------------------------------------------------------------------------------------

export interface WalkReport {
  entries: number;
  errors: Array<{ path: string; error: unknown }>;
}

/**
 * Reads everything reachable from the root: stat, readdir, lookup, readlink, extents and up to
 * `maxBytesPerFile` bytes of every file. A directory reached twice (a cycle or a hard-linked
 * directory) is recorded as an error and not entered again; every other failure is recorded for
 * its entry and the walk goes on.
 */
export async function walkFilesystem(fs: Filesystem, options: { maxBytesPerFile?: number; maxEntries?: number } = {}): Promise<WalkReport> {
  const maxBytes = options.maxBytesPerFile ?? 1024 * 1024;
  const maxEntries = options.maxEntries ?? 200_000;
  const report: WalkReport = { entries: 0, errors: [] };
  const seenDirs = new Set<bigint>();
  const stack: Array<{ ino: bigint; path: string }> = [{ ino: fs.rootIno, path: '/' }];
  const attempt = async (path: string, fn: () => Promise<void>) => {
    try {
      await fn();
    } catch (error) {
      report.errors.push({ path, error });
    }
  };
  while (stack.length > 0 && report.entries < maxEntries) {
    const dir = stack.pop() as { ino: bigint; path: string };
    if (seenDirs.has(dir.ino)) {
      report.errors.push({ path: dir.path, error: new Error(`directory inode ${dir.ino} reached twice (cycle)`) });
      continue;
    }
    seenDirs.add(dir.ino);
    let entries: DirEntry[] = [];
    await attempt(dir.path, async () => {
      entries = await fs.readdir(dir.ino);
    });
    for (const entry of entries) {
      report.entries++;
      const path = dir.path === '/' ? `/${entry.name}` : `${dir.path}/${entry.name}`;
      await attempt(path, async () => {
        await fs.lookup(dir.ino, entry.name);
        const st = await fs.stat(entry.ino);
        if (st.type === 'dir') {
          stack.push({ ino: entry.ino, path });
        } else if (st.type === 'symlink') {
          await fs.readlink(entry.ino);
        } else if (st.type === 'file') {
          await fs.extents(entry.ino);
          await fs.read(entry.ino, 0, Math.min(maxBytes, st.size));
        }
      });
    }
  }
  return report;
}

export interface EntrySummary {
  type: FileType;
  size: number;
  mode?: number;
  uid?: number;
  gid?: number;
  mtimeNs?: string;
  nlink?: number;
  /** SHA-256 of a file's bytes, or a symlink's target. */
  content?: string;
}

/** Path → metadata and content digest of everything reachable, for comparing two readers' views. */
export async function summarizeFilesystem(fs: Filesystem): Promise<Map<string, EntrySummary>> {
  const summary = new Map<string, EntrySummary>();
  const visit = async (dirIno: bigint, dirPath: string, depth: number) => {
    assert.ok(depth < 256, `${dirPath}: too deep`);
    for (const entry of await fs.readdir(dirIno)) {
      const path = `${dirPath}/${entry.name}`;
      const st = await fs.stat(entry.ino);
      const item: EntrySummary = {
        type: st.type, size: st.size, mode: st.mode, uid: st.uid, gid: st.gid, mtimeNs: st.mtimeNs?.toString(), nlink: st.nlink,
      };
      if (st.type === 'file') {
        const hash = createHash('sha256');
        for (let offset = 0; offset < st.size; offset += 1024 * 1024) hash.update(await fs.read(entry.ino, offset, 1024 * 1024));
        item.content = hash.digest('hex');
      } else if (st.type === 'symlink') {
        item.content = await fs.readlink(entry.ino);
      }
      summary.set(path, item);
      if (st.type === 'dir') await visit(entry.ino, path, depth + 1);
    }
  };
  await visit(fs.rootIno, '', 0);
  return summary;
}
