/**
 * Single files out of image snapshots, through the real CLI: disk images built by the real tools
 * (a GPT disk with ext4, FAT32, NTFS and XFS partitions, an MBR disk with ext3, a 20 GiB mostly
 * empty disk) are backed up with `tresor backup image` into an encrypted repository, then
 * browsed, searched, read and restored with `tresor files …` and compared with the trees that
 * built them (metadata with `lstat`, archives with the system `tar`).
 *
 * Hostile: a crafted ext4 image with names "../../etc/x", "a/b" and one with a NUL, an absolute
 * symlink "etc" -> /etc next to a directory also named "etc" holding "passwd", and a directory
 * that contains itself; and a target directory holding a symlink that points outside. Nothing may
 * be written outside the target, every bad entry is reported, nothing hangs, the exit code says so.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  closeSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, readlinkSync, readSync, rmSync,
  symlinkSync, writeFileSync, writeSync, type BigIntStats,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { TarWriter } from '../src/util/tar.ts';
import { compileGlob } from '../src/util/glob.ts';
import { parseFileRef } from '../src/engine/file-browse.ts';
import { openSnapshotDisk } from '../src/engine/snapshot-device.ts';
import { packName } from '../src/repo/pack.ts';
import { pieceIds } from '../src/repo/disk-map.ts';
import { Repository } from '../src/repo/repository.ts';
import { LocalStore } from '../src/store/local.ts';
import { spawnTresor, tresor, type CliResult } from './helpers/cli.ts';
import { MountTracker } from './helpers/mounts.ts';
import { buildSampleTree, type SampleTreeOptions } from './helpers/sample-tree.ts';
import { patchFile, readFileRange, run, runWithStderr } from './helpers/tools.ts';

const MiB = 1024 * 1024;
const PASS = 'files test passphrase';
const work = mkdtempSync(join(tmpdir(), 'tresor-files-'));
const repo = join(work, 'repo');
const mounts = new MountTracker();

const trees = { main: join(work, 'tree-main'), fat: join(work, 'tree-fat'), small: join(work, 'tree-small'), hostile: join(work, 'tree-hostile') };
const TREE: SampleTreeOptions = { bigDirEntries: 300 };
const FAT_TREE: SampleTreeOptions = {
  bigDirEntries: 100, symlinks: false, hardLinks: false, specialFiles: false, owners: false, modes: false, exoticNames: false, sparse: false,
  trailingHole: false,
};
const SMALL_TREE: SampleTreeOptions = { bigDirEntries: 50, randomFileBytes: 100_000, specialFiles: false };
const snapshots = { gpt: '', mbr: '', big: '', hostile: '' };

function cli(args: string[], timeoutMs = 60_000): Promise<CliResult> {
  return tresor(['--repo', repo, ...args], { env: { TRESOR_PASSPHRASE: PASS }, timeoutMs });
}

async function cliJson(args: string[], timeoutMs?: number): Promise<any> {
  const r = await cli([...args, '--json'], timeoutMs);
  assert.equal(r.code, 0, `tresor ${args.join(' ')} exited ${r.code}\nstdout: ${r.stdout.slice(0, 4000)}\nstderr: ${r.stderr}`);
  return r.json;
}

/** Runs the CLI keeping stdout as bytes (for cat and tar streams). */
function cliBytes(args: string[], timeoutMs = 60_000): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawnTresor(['--repo', repo, ...args], { env: { TRESOR_PASSPHRASE: PASS } });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => out.push(d));
    child.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out), stderr });
    });
  });
}

// ---- building disks --------------------------------------------------------------------------

/** Copies a filesystem image into a disk image at `offset`, skipping all-zero MiBs (stays sparse). */
function writeImageAt(image: string, disk: string, offset: number): void {
  const src = openSync(image, 'r');
  const dst = openSync(disk, 'r+');
  try {
    const buf = Buffer.alloc(MiB);
    for (let at = 0; ; at += MiB) {
      const n = readSync(src, buf, 0, MiB, at);
      if (n === 0) break;
      if (buf.subarray(0, n).some((b) => b !== 0)) writeSync(dst, buf, 0, n, offset + at);
    }
  } finally {
    closeSync(src);
    closeSync(dst);
  }
}

async function partitionStarts(disk: string): Promise<number[]> {
  const table = JSON.parse(await run('sfdisk', ['--json', disk])).partitiontable;
  return table.partitions.map((p: { start: number }) => p.start * 512);
}

async function ext4Image(path: string, tree: string, size: string, extra: string[] = []): Promise<void> {
  await run('mke2fs', ['-q', '-F', '-t', 'ext4', ...extra, '-E', 'root_owner=0:0', '-d', tree, path, size]);
}

async function fatImage(path: string, tree: string): Promise<void> {
  await run('truncate', ['-s', '40M', path]);
  await run('mkfs.fat', ['-F', '32', '-s', '1', '-n', 'TRESORFAT', path]);
  await run('mcopy', ['-s', '-p', '-m', '-i', path, ...readdirSync(tree).map((n) => join(tree, n)), '::/'], { env: { TZ: 'UTC' } });
}

async function ntfsImage(path: string, tree: string, startSector: number): Promise<void> {
  await run('truncate', ['-s', '64M', path]);
  await run('mkntfs', ['-F', '-Q', '-L', 'TresorNTFS', '-p', String(startSector), path]);
  await mounts.withFuse(path, 'ntfs-3g', [], join(work, 'mnt-ntfs'), async (dir) => {
    await run('cp', ['-a', `${tree}/.`, dir]);
  });
}

async function xfsImage(path: string, tree: string): Promise<void> {
  await run('truncate', ['-s', '300M', path]);
  await run('mkfs.xfs', ['-q', '-f', '-L', 'tresor-xfs', path]);
  await mounts.withLoopMount(path, join(work, 'mnt-xfs'), async (dir) => {
    await run('cp', ['-a', `${tree}/.`, dir]);
  });
}

/** GPT: 1 ext4, 2 FAT32, 3 NTFS, 4 XFS. */
async function gptDisk(): Promise<string> {
  const disk = join(work, 'gpt.img');
  await run('truncate', ['-s', '460M', disk]);
  await run('sgdisk', ['-o', '-n', '1:2048:+40M', '-t', '1:8300', '-c', '1:linux', '-n', '2:0:+40M', '-t', '2:0700', '-c', '2:fat',
    '-n', '3:0:+64M', '-t', '3:0700', '-c', '3:windows', '-n', '4:0:+300M', '-t', '4:8300', '-c', '4:xfs', disk]);
  const starts = await partitionStarts(disk);
  const parts = [join(work, 'p1-ext4.img'), join(work, 'p2-fat.img'), join(work, 'p3-ntfs.img'), join(work, 'p4-xfs.img')];
  await Promise.all([
    ext4Image(parts[0], trees.main, '40M', ['-L', 'tresor-ext4']),
    fatImage(parts[1], trees.fat),
    ntfsImage(parts[2], trees.main, starts[2] / 512),
    xfsImage(parts[3], trees.main),
  ]);
  parts.forEach((p, i) => writeImageAt(p, disk, starts[i]));
  return disk;
}

/** MBR: one ext3 partition (indirect blocks). */
async function mbrDisk(): Promise<string> {
  const disk = join(work, 'mbr.img');
  await run('truncate', ['-s', '48M', disk]);
  await run('sh', ['-c', 'printf "label: dos\\nstart=2048, size=40M, type=83\\n" | sfdisk -q "$1"', 'sh', disk]);
  const part = join(work, 'mbr-ext3.img');
  await run('mke2fs', ['-q', '-F', '-t', 'ext3', '-b', '1024', '-L', 'tresor-ext3', '-E', 'root_owner=0:0', '-d', trees.small, part, '40M']);
  writeImageAt(part, disk, (await partitionStarts(disk))[0]);
  return disk;
}

/** 20 GiB, GPT, one ext4 partition over all of it holding the main tree; as qcow2 (sparse). */
async function bigDisk(): Promise<string> {
  const raw = join(work, 'big.img');
  await run('truncate', ['-s', '20G', raw]);
  await run('sgdisk', ['-o', '-n', '1:2048:0', '-t', '1:8300', raw]);
  await run('mke2fs', ['-q', '-F', '-t', 'ext4', '-E', `offset=${MiB},root_owner=0:0`, '-d', trees.main, raw, '20470M']);
  const qcow2 = join(work, 'big.qcow2');
  await run('qemu-img', ['convert', '-O', 'qcow2', raw, qcow2]);
  rmSync(raw);
  return qcow2;
}

/** Byte offsets of the blocks of directory `dir` in an ext image (via debugfs). */
async function dirBlockOffsets(image: string, dir: string): Promise<number[]> {
  const { stdout } = await runWithStderr('debugfs', ['-R', `blocks ${dir}`, image]);
  return stdout.trim().split(/\s+/).map((b) => Number(b) * 1024);
}

/** Replaces `from` by `to` (same length) inside the given blocks of an image. */
function patchNames(image: string, blocks: number[], from: string, to: Buffer): void {
  let patched = 0;
  for (const at of blocks) {
    const block = readFileRange(image, at, 1024);
    for (let i = block.indexOf(from); i >= 0; i = block.indexOf(from, i + 1)) {
      patchFile(image, at + i, to);
      patched++;
    }
  }
  assert.ok(patched > 0, `name ${from} found in the directory blocks`);
}

/**
 * ext4 without metadata checksums (so patched directory blocks stay readable), 1 KiB blocks:
 * root holds "../../etc/x", "a/b", "n<NUL>l", a second "..", a symlink etc -> /etc and a directory also named
 * "etc" with "passwd" in it; /sub contains itself as /sub/self.
 */
async function hostileImage(): Promise<string> {
  const t = trees.hostile;
  mkdirSync(join(t, 'sub'), { recursive: true });
  writeFileSync(join(t, 'hello.txt'), 'hello\n');
  writeFileSync(join(t, 'sub', 'inside.txt'), 'inside\n');
  writeFileSync(join(t, 'zz.zz.etc.x'), 'escape attempt\n');
  writeFileSync(join(t, 'aQb'), 'slash in the name\n');
  writeFileSync(join(t, 'nQl'), 'NUL in the name\n');
  writeFileSync(join(t, 'Q8'), 'a file named ..\n');
  symlinkSync('/etc', join(t, 'etc'));
  mkdirSync(join(t, 'Q9c'));
  writeFileSync(join(t, 'Q9c', 'passwd'), 'root::0:0:pwned:/:/bin/sh\n');
  const image = join(work, 'hostile.img');
  await ext4Image(image, t, '8M', ['-b', '1024', '-O', '^metadata_csum']);
  await run('debugfs', ['-w', '-R', 'link /sub /sub/self', image]);
  const root = await dirBlockOffsets(image, '/');
  patchNames(image, root, 'zz.zz.etc.x', Buffer.from('../../etc/x'));
  patchNames(image, root, 'aQb', Buffer.from('a/b'));
  patchNames(image, root, 'nQl', Buffer.from('n\0l'));
  patchNames(image, root, 'Q8', Buffer.from('..'));
  patchNames(image, root, 'Q9c', Buffer.from('etc'));
  return image;
}

before(async () => {
  buildSampleTree(trees.main, TREE);
  buildSampleTree(trees.fat, FAT_TREE);
  buildSampleTree(trees.small, SMALL_TREE);
  const [gpt, mbr, big, hostile] = await Promise.all([gptDisk(), mbrDisk(), bigDisk(), hostileImage()]);
  const init = await tresor(['--repo', repo, 'repo', 'init', '--json'], { env: { TRESOR_PASSPHRASE: PASS } });
  assert.equal(init.code, 0, init.stderr);
  for (const [key, image] of [['gpt', gpt], ['mbr', mbr], ['big', big], ['hostile', hostile]] as const) {
    snapshots[key] = (await cliJson(['backup', 'image', image, '--id', key], 120_000)).snapshot.name;
  }
  for (const image of [gpt, mbr, big, hostile]) rmSync(image);
});

after(async () => {
  try {
    await mounts.releaseAll();
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});

// ---- comparing with the host trees -----------------------------------------------------------

interface HostEntry {
  type: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtimeNs: bigint;
  target?: string;
}

function hostType(st: BigIntStats): string {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFIFO()) return 'fifo';
  if (st.isCharacterDevice()) return 'chardev';
  if (st.isBlockDevice()) return 'blockdev';
  return 'socket';
}

/** Path ('/a/b') → metadata of everything under `root`. */
function hostTree(root: string): Map<string, HostEntry> {
  const out = new Map<string, HostEntry>();
  const visit = (dir: string, rel: string) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      const st = lstatSync(path, { bigint: true });
      const type = hostType(st);
      const entry: HostEntry = { type, size: Number(st.size), mode: Number(st.mode) & 0o7777, uid: Number(st.uid), gid: Number(st.gid), mtimeNs: st.mtimeNs };
      if (type === 'symlink') entry.target = readlinkSync(path);
      out.set(`${rel}/${name}`, entry);
      if (type === 'dir') visit(path, `${rel}/${name}`);
    }
  };
  visit(root, '');
  return out;
}

interface Keeps {
  mode: boolean;
  owner: boolean;
  /** mtime resolution in ns. */
  mtimeNs: number;
}

function truncTime(ns: bigint, resolution: number): bigint {
  const r = BigInt(resolution);
  return ns - (((ns % r) + r) % r);
}

/** `files ls -l -R --json` output against the tree that built the filesystem. */
function compareListing(label: string, listing: any[], tree: string, keeps: Keeps, extraRoot: string[] = []): void {
  const host = hostTree(tree);
  const listed = new Map<string, any>(listing.filter((e) => !extraRoot.some((x) => e.path === `/${x}` || e.path.startsWith(`/${x}/`))).map((e) => [e.path, e]));
  assert.deepEqual([...listed.keys()].sort(), [...host.keys()].sort(), `${label}: the same paths`);
  for (const [path, h] of host) {
    const e = listed.get(path);
    assert.equal(e.error, undefined, `${label} ${path}: no error`);
    assert.equal(e.type, h.type, `${label} ${path}: type`);
    if (h.type === 'file' || h.type === 'symlink') assert.equal(e.size, h.size, `${label} ${path}: size`);
    if (h.type === 'symlink') assert.equal(e.target, h.target, `${label} ${path}: target`);
    if (keeps.mode) assert.equal(e.mode.toString(8), h.mode.toString(8), `${label} ${path}: mode`);
    if (keeps.owner) assert.deepEqual([e.uid, e.gid], [h.uid, h.gid], `${label} ${path}: owner`);
    if (keeps.mtimeNs > 0) assert.equal(BigInt(e.mtimeNs), truncTime(h.mtimeNs, keeps.mtimeNs), `${label} ${path}: mtime`);
  }
}

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** A restored (or extracted) tree against its source: metadata, bytes, links, holes. */
function compareRestored(label: string, source: string, restored: string, keeps: Keeps & { skipTypes?: string[] }): void {
  const src = hostTree(source);
  const dst = hostTree(restored);
  const skip = new Set(keeps.skipTypes ?? []);
  const expected = [...src.entries()].filter(([, e]) => !skip.has(e.type)).map(([p]) => p).sort();
  assert.deepEqual([...dst.keys()].sort(), expected, `${label}: the same paths`);
  const linkGroups = new Map<bigint, string[]>();
  for (const path of expected) {
    const s = src.get(path) as HostEntry;
    const d = dst.get(path) as HostEntry;
    assert.equal(d.type, s.type, `${label} ${path}: type`);
    if (keeps.mode && s.type !== 'symlink') assert.equal(d.mode.toString(8), s.mode.toString(8), `${label} ${path}: mode`);
    if (keeps.owner) assert.deepEqual([d.uid, d.gid], [s.uid, s.gid], `${label} ${path}: owner`);
    // Node's utimes carries times as doubles: exact to about a microsecond.
    const want = truncTime(s.mtimeNs, keeps.mtimeNs);
    const diff = d.mtimeNs > want ? d.mtimeNs - want : want - d.mtimeNs;
    assert.ok(diff < 2000n, `${label} ${path}: mtime ${d.mtimeNs} vs ${want}`);
    if (s.type === 'symlink') assert.equal(d.target, s.target, `${label} ${path}: symlink target`);
    if (s.type === 'file') {
      assert.equal(d.size, s.size, `${label} ${path}: size`);
      assert.equal(sha256(join(restored, path)), sha256(join(source, path)), `${label} ${path}: bytes`);
      const srcStat = lstatSync(join(source, path));
      const dstStat = lstatSync(join(restored, path));
      if (srcStat.blocks * 512 < srcStat.size) assert.ok(dstStat.blocks * 512 < dstStat.size, `${label} ${path}: stays sparse (${dstStat.blocks} blocks)`);
      if (srcStat.nlink > 1) {
        const group = linkGroups.get(BigInt(srcStat.ino)) ?? [];
        group.push(path);
        linkGroups.set(BigInt(srcStat.ino), group);
      }
    }
  }
  assert.ok(linkGroups.size > 0, `${label}: the tree has hard links`);
  for (const group of linkGroups.values()) {
    const inodes = new Set(group.map((p) => lstatSync(join(restored, p)).ino));
    assert.equal(inodes.size, 1, `${label}: ${group.join(', ')} are one file`);
    assert.equal(lstatSync(join(restored, group[0])).nlink, group.length, `${label}: link count`);
  }
}

// ---- tests -----------------------------------------------------------------------------------

describe('tresor files: volumes, ls, find, cat', { timeout: 300_000 }, () => {
  it('volumes lists every partition with its filesystem; a reference without PART is refused with the list', async () => {
    const volumes = await cliJson(['files', 'volumes', snapshots.gpt]);
    assert.deepEqual(volumes.map((v: any) => [v.ref, v.filesystem?.type, v.filesystem?.label, v.name]), [
      [`${snapshots.gpt}:disk0:1`, 'ext4', 'tresor-ext4', 'linux'],
      [`${snapshots.gpt}:disk0:2`, 'vfat', 'TRESORFAT', 'fat'],
      [`${snapshots.gpt}:disk0:3`, 'ntfs', 'TresorNTFS', 'windows'],
      [`${snapshots.gpt}:disk0:4`, 'xfs', 'tresor-xfs', 'xfs'],
    ]);
    assert.equal(volumes[0].size, 40 * MiB);
    const human = await cli(['files', 'volumes', snapshots.mbr]);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /:disk0:1 .*ext3 "tresor-ext3"/);

    const ambiguous = await cli(['files', 'ls', snapshots.gpt]);
    assert.equal(ambiguous.code, 2, ambiguous.stderr);
    assert.match(ambiguous.stderr, /holds 4 filesystems/);
    assert.match(ambiguous.stderr, new RegExp(`${snapshots.gpt}:disk0:3 \\(ntfs "TresorNTFS"\\)`));
    const missing = await cli(['files', 'ls', `${snapshots.gpt}:disk0:9`, '--json']);
    assert.equal(missing.code, 5);
    assert.equal(missing.json.error.code, 'no-such-volume');
    const noDisk = await cli(['files', 'ls', `${snapshots.gpt}:vdz`]);
    assert.equal(noDisk.code, 5);
    assert.match(noDisk.stderr, /its disks are: disk0/);
  });

  it('ls -l -R of each filesystem matches the tree that built it', async () => {
    const cases: Array<[string, string, Keeps, string[]]> = [
      ['1', trees.main, { mode: true, owner: true, mtimeNs: 1e9 }, ['lost+found']],
      ['2', trees.fat, { mode: false, owner: false, mtimeNs: 2e9 }, []],
      ['3', trees.main, { mode: false, owner: false, mtimeNs: 100 }, []],
      ['4', trees.main, { mode: true, owner: true, mtimeNs: 1 }, []],
    ];
    for (const [part, tree, keeps, extra] of cases) {
      const listing = await cliJson(['files', 'ls', `${snapshots.gpt}:disk0:${part}`, '-l', '-R']);
      compareListing(`partition ${part}`, listing, tree, keeps, extra);
    }
    // MBR disk: the only filesystem is the default; a path in the reference or as an argument.
    const small = await cliJson(['files', 'ls', `${snapshots.mbr}:/`, '-R']);
    compareListing('mbr ext3', small, trees.small, { mode: true, owner: true, mtimeNs: 1e9 }, ['lost+found']);
    const sub = await cliJson(['files', 'ls', snapshots.mbr, '/sub']);
    assert.deepEqual(sub.map((e: any) => e.path), ['/sub/file.txt', '/sub/hardlink-c', '/sub/link-up']);
    // Not a directory: the entry itself; a symlink is not followed; a trailing slash follows it.
    const link = await cliJson(['files', 'ls', `${snapshots.mbr}:/link-to-dir`]);
    assert.deepEqual(link.map((e: any) => [e.type, e.target]), [['symlink', 'sub']]);
    const through = await cliJson(['files', 'ls', `${snapshots.mbr}:/link-to-dir/`]);
    assert.deepEqual(through.map((e: any) => e.name), ['file.txt', 'hardlink-c', 'link-up']);
    const human = await cli(['files', 'ls', `${snapshots.gpt}:disk0:1:/`, '-l']);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /^-rwsr-xr-x +1 0 +0 +10 \d{4}-\d\d-\d\d \d\d:\d\d:\d\d setuid-file$/m);
    assert.match(human.stdout, /^lrwxrwxrwx +1 0 +0 +11 .* link-absolute -> \/etc\/passwd$/m);
    assert.match(human.stdout, /^crw-r--r-- +1 0 +0 +1, 3 .* char-device$/m);
    const gone = await cli(['files', 'ls', `${snapshots.mbr}:/no/such/dir`]);
    assert.equal(gone.code, 5);
    assert.match(gone.stderr, /\/no does not exist/);
  });

  it('find --name over several snapshots and every filesystem', async () => {
    const found = await cliJson(['files', 'find', snapshots.gpt, snapshots.mbr, '--name', '*.bin']);
    const byRef = new Map<string, string[]>();
    for (const e of found) {
      assert.equal(e.error, undefined, `${e.ref}:${e.path}: ${e.error?.message}`);
      byRef.set(e.ref, [...(byRef.get(e.ref) ?? []), e.path]);
    }
    const bins = (tree: string) => [...hostTree(tree).keys()].filter((p) => p.endsWith('.bin')).sort();
    assert.deepEqual(byRef.get(`${snapshots.gpt}:disk0:1`)?.sort(), bins(trees.main));
    assert.deepEqual(byRef.get(`${snapshots.gpt}:disk0:2`)?.sort(), bins(trees.fat));
    assert.deepEqual(byRef.get(`${snapshots.gpt}:disk0:3`)?.sort(), bins(trees.main));
    assert.deepEqual(byRef.get(`${snapshots.gpt}:disk0:4`)?.sort(), bins(trees.main));
    assert.deepEqual(byRef.get(`${snapshots.mbr}:disk0:1`)?.sort(), bins(trees.small));
    const classes = await cliJson(['files', 'find', `${snapshots.gpt}:disk0:4`, '--name', 'entry-0000[0-2]*', '--path', '/big']);
    assert.deepEqual(classes.map((e: any) => e.name).sort(), ['entry-00000-é', 'entry-00001-', 'entry-00002--']);
    const human = await cli(['files', 'find', `${snapshots.mbr}:disk0:1`, '--name', 'bottom.txt']);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /:disk0:1:\/deep\/level-01\/.*\/level-20\/bottom\.txt$/m);
  });

  it('cat of the 2 MiB random file (and a sparse one) is byte-identical, from every filesystem', async () => {
    const random = readFileSync(join(trees.main, 'random.bin'));
    for (const part of ['1', '3', '4']) {
      const r = await cliBytes(['files', 'cat', `${snapshots.gpt}:disk0:${part}:/random.bin`]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(r.stdout.equals(random), `partition ${part}: same bytes`);
    }
    const fat = await cliBytes(['files', 'cat', `${snapshots.gpt}:disk0:2:/random.bin`]);
    assert.ok(fat.stdout.equals(readFileSync(join(trees.fat, 'random.bin'))));
    const sparse = await cliBytes(['files', 'cat', `${snapshots.gpt}:disk0:1:/sparse.bin`]);
    assert.ok(sparse.stdout.equals(readFileSync(join(trees.main, 'sparse.bin'))));
    const dir = await cli(['files', 'cat', `${snapshots.gpt}:disk0:1:/sub`]);
    assert.equal(dir.code, 8);
    assert.match(dir.stderr, /is a dir, not a regular file/);
    const link = await cli(['files', 'cat', `${snapshots.gpt}:disk0:1:/link-relative`]);
    assert.match(link.stderr, /symbolic link to "sub\/file.txt"/);
    const noPath = await cli(['files', 'cat', snapshots.mbr]);
    assert.equal(noPath.code, 2);
  });

  it('is lazy: the 2 MiB file out of a 20 GiB disk reads < 32 MiB from the repository', async () => {
    const volumes = await cliJson(['files', 'volumes', snapshots.big]);
    assert.deepEqual(volumes.map((v: any) => [v.part, v.filesystem?.type, v.diskSize]), [['1', 'ext4', 20 * 1024 * MiB]]);
    const out = join(work, 'lazy-random.bin');
    const started = Date.now();
    const r = await cliJson(['files', 'cat', `${snapshots.big}:/random.bin`, '-o', out]);
    const wall = Date.now() - started;
    assert.ok(readFileSync(out).equals(readFileSync(join(trees.main, 'random.bin'))));
    assert.ok(r.stats.bytesFetched < 32 * MiB, `fetched ${r.stats.bytesFetched} bytes`);
    assert.ok(r.stats.bytesFetched >= 2 * MiB, 'at least the file itself');
    console.log(`# lazy cat: ${r.stats.bytesFetched} bytes fetched in ${r.stats.storeReads} reads (${r.stats.indexPiecesLoaded} index pieces), ${r.durationMs} ms in the command, ${wall} ms wall`);
    const exists = await cli(['files', 'cat', `${snapshots.big}:/random.bin`, '-o', out]);
    assert.equal(exists.code, 2, 'an existing output file is not overwritten');
  });
});

describe('tresor files restore', { timeout: 300_000 }, () => {
  it('into a directory: bytes, owners, modes, times, symlinks, hard links, sparse files; devices only on request', async () => {
    const target = join(work, 'restore-ext4');
    const summary = await cliJson(['files', 'restore', `${snapshots.gpt}:disk0:1`, '/', '--to', target]);
    assert.equal(summary.ok, true);
    assert.deepEqual(summary.errors, []);
    assert.deepEqual(summary.skipped.map((s: any) => s.path).sort(), ['/block-device', '/char-device', '/fifo']);
    assert.ok(summary.hardlinks === 2 && summary.symlinks === 6, `${summary.hardlinks} hard links, ${summary.symlinks} symlinks`);
    rmSync(join(target, 'lost+found'), { recursive: true });
    compareRestored('ext4 restore', trees.main, target, { mode: true, owner: true, mtimeNs: 1e9, skipTypes: ['fifo', 'chardev', 'blockdev'] });

    // XFS keeps nanoseconds; a directory restored as dir/NAME.
    const xfsTarget = join(work, 'restore-xfs');
    const sub = await cliJson(['files', 'restore', `${snapshots.gpt}:disk0:4:/deep`, '--to', xfsTarget]);
    assert.equal(sub.ok, true);
    assert.deepEqual(readdirSync(xfsTarget), ['deep']);
    const bottom = lstatSync(join(xfsTarget, 'deep', ...Array.from({ length: 20 }, (_, i) => `level-${String(i + 1).padStart(2, '0')}`), 'bottom.txt'));
    assert.equal(bottom.size, 14);
    const srcDeep = lstatSync(join(trees.main, 'deep'), { bigint: true });
    const gotDeep = lstatSync(join(xfsTarget, 'deep'), { bigint: true });
    assert.ok(srcDeep.mtimeNs - gotDeep.mtimeNs < 2000n && gotDeep.mtimeNs - srcDeep.mtimeNs < 2000n, 'directory mtime set after its content');

    const devices = join(work, 'restore-devices');
    for (const name of ['/fifo', '/char-device', '/block-device']) {
      const r = await cliJson(['files', 'restore', `${snapshots.gpt}:disk0:4`, name, '--to', devices, '--devices']);
      assert.equal(r.specialFiles, 1, name);
    }
    assert.ok(lstatSync(join(devices, 'fifo')).isFIFO());
    assert.equal(lstatSync(join(devices, 'char-device')).rdev, lstatSync(join(trees.main, 'char-device')).rdev);
    assert.ok(lstatSync(join(devices, 'block-device')).isBlockDevice());

    const again = await cli(['files', 'restore', `${snapshots.gpt}:disk0:4`, '/hello.txt', '--to', devices]);
    assert.equal(again.code, 0);
    const twice = await cli(['files', 'restore', `${snapshots.gpt}:disk0:4`, '/hello.txt', '--to', devices, '--json']);
    assert.equal(twice.code, 1, 'an existing file is not overwritten');
    assert.equal(twice.json.errors[0].code, 'target-exists');
  });

  it('as tar: the system tar lists and extracts it to the same tree (long and unicode names, sparse files, links)', async () => {
    const archive = join(work, 'ext4.tar');
    const summary = await cliJson(['files', 'restore', `${snapshots.gpt}:disk0:4:/`, '--to', archive, '--tar']);
    assert.equal(summary.ok, true);
    const listing = await run('tar', ['-tvf', archive]);
    assert.match(listing, /^hrw-r--r-- 0\/0 +0 .* hardlink-b link to hardlink-a$/m);
    assert.match(listing, / link-long -> \.\.\/(long-target-component\/){6}end$/m);
    assert.match(listing, / 日本語のファイル\.txt$/m);
    assert.match(listing, / deep\/level-01\/.*\/level-20\/bottom\.txt$/m);
    assert.ok(!/GNUSparseFile/.test(listing), 'sparse files are listed under their real names');
    const extracted = join(work, 'tar-extracted');
    mkdirSync(extracted);
    await run('tar', ['-xf', archive, '-C', extracted, '--numeric-owner']);
    compareRestored('tar of xfs', trees.main, extracted, { mode: true, owner: true, mtimeNs: 1, skipTypes: ['fifo', 'chardev', 'blockdev'] });
    assert.ok(summary.archiveBytes < 12 * MiB, `sparse files stay sparse in the archive (${summary.archiveBytes} bytes)`);

    const piped = await cliBytes(['files', 'restore', `${snapshots.mbr}:/sub`, '--tar', '--to', '-']);
    assert.equal(piped.code, 0, piped.stderr);
    writeFileSync(join(work, 'piped.tar'), piped.stdout);
    assert.deepEqual((await run('tar', ['-tf', join(work, 'piped.tar')])).trim().split('\n'), ['sub/', 'sub/file.txt', 'sub/hardlink-c', 'sub/link-up']);
    assert.match(piped.stderr, /restored \/sub .* 2 files/);
  });

  it('the tar writer: big ids, negative and nanosecond times, names past 100 bytes', async () => {
    const chunks: Buffer[] = [];
    const tar = new TarWriter(async (c) => void chunks.push(Buffer.from(c)));
    const long = `${'d'.repeat(120)}/${'ü'.repeat(80)}`;
    await tar.add({ path: long, type: 'file', mode: 0o640, uid: 3_000_000, gid: 7, mtimeNs: -1_500_000_000n, size: 3 }, (async function* () {
      yield Buffer.from('abc');
    })());
    await tar.add({ path: 'ns', type: 'symlink', mode: 0o777, uid: 0, gid: 0, mtimeNs: 1_234_567_890_123_456_789n, linkTarget: `/${'t'.repeat(150)}` });
    await assert.rejects(tar.add({ path: '../x', type: 'file', mode: 0o644, uid: 0, gid: 0, mtimeNs: 0n, size: 0 }), /refusing path/);
    await assert.rejects(tar.add({ path: 'short', type: 'file', mode: 0o644, uid: 0, gid: 0, mtimeNs: 0n, size: 10 }, (async function* () {
      yield Buffer.from('abc');
    })()), /data ended after 3 of 10 bytes/);
    await tar.finish();
    const file = join(work, 'unit.tar');
    writeFileSync(file, Buffer.concat(chunks));
    const listing = await run('tar', ['--list', '--verbose', '--numeric-owner', '--full-time', '-f', file], { env: { TZ: 'UTC' } });
    const lines = listing.trim().split('\n');
    // -1.5 s is written as "mtime=-1.500000000", as GNU tar writes it; GNU tar 1.34 lists such
    // times one second late (its own archives too), so both renderings are accepted.
    assert.match(lines[0], new RegExp(`^-rw-r----- 3000000/7 +3 1969-12-31 23:59:5[89](\\.50*)? ${long}$`));
    assert.ok(Buffer.concat(chunks).includes('mtime=-1.500000000\n'));
    assert.match(lines[1], /^lrwxrwxrwx 0\/0 +0 2009-02-13 23:31:30(\.123456789)? ns -> \/t{150}$/);
    assert.match(lines[2], /^-rw-r--r-- 0\/0 +10 .* short$/, 'a short file is padded: the archive stays readable');
  });

  it('hostile image: bad names, a symlink/directory name clash and a self-containing directory stay inside the target', async () => {
    const jail = join(work, 'jail');
    const target = join(jail, 'target');
    mkdirSync(jail);
    writeFileSync(join(jail, 'canary'), 'untouched\n');
    const passwdBefore = sha256('/etc/passwd');
    const listBefore = readdirSync(jail).sort();
    const workBefore = readdirSync(work).sort();

    const ls = await cli(['files', 'ls', snapshots.hostile, '-R', '--json'], 30_000);
    assert.equal(ls.code, 1, 'ls reports the damage in its exit code');
    const loop = ls.json.find((e: any) => e.path === '/sub/self');
    assert.equal(loop.error.code, 'fs-directory-loop');
    assert.ok(ls.json.some((e: any) => e.name === '../../etc/x') && ls.json.some((e: any) => e.name === 'n\u0000l'));

    const r = await cli(['files', 'restore', snapshots.hostile, '/', '--to', target, '--json'], 30_000);
    assert.equal(r.code, 1, r.stderr);
    const s = r.json;
    assert.equal(s.ok, false);
    const errors = new Map<string, string>(s.errors.map((e: any) => [e.path, e.code]));
    assert.equal(errors.get('/../../etc/x'), 'unsafe-name');
    assert.equal(errors.get('/a/b'), 'unsafe-name');
    assert.equal(errors.get('/n\u0000l'), 'unsafe-name');
    assert.equal(errors.get('/etc'), 'fs-duplicate-name');
    assert.equal(errors.get('/sub/self'), 'fs-directory-loop');
    // The ext4 reader leaves '.' and '..' out of listings wherever they are; if one ever shows up, it is refused.
    const dotdot = ls.json.some((e: any) => e.name === '..');
    if (dotdot) assert.equal(errors.get('/..'), 'unsafe-name');
    assert.equal(s.errorCount, dotdot ? 6 : 5);

    assert.deepEqual(readdirSync(jail).sort(), listBefore.concat('target').sort(), 'nothing new next to the target');
    assert.equal(readFileSync(join(jail, 'canary'), 'utf8'), 'untouched\n');
    assert.deepEqual(readdirSync(work).sort(), workBefore.concat('jail').filter((v, i, a) => a.indexOf(v) === i).sort());
    assert.equal(sha256('/etc/passwd'), passwdBefore);
    assert.ok(!existsSync('/etc/x') && !existsSync(join(work, 'etc')));
    const restored = readdirSync(target).sort();
    assert.ok(restored.includes('etc') && restored.includes('hello.txt') && restored.includes('sub'), restored.join(','));
    const etc = lstatSync(join(target, 'etc'));
    if (etc.isSymbolicLink()) assert.equal(readlinkSync(join(target, 'etc')), '/etc', 'kept as a symlink, never followed');
    assert.deepEqual(readdirSync(join(target, 'sub')), ['inside.txt']);

    // A symlink already in the target that points outside: never followed, nothing written through it.
    const outside = join(jail, 'outside');
    mkdirSync(outside);
    const second = join(jail, 'second');
    mkdirSync(second);
    symlinkSync(outside, join(second, 'sub'));
    symlinkSync(join(jail, 'canary'), join(second, 'hello.txt'));
    const r2 = await cli(['files', 'restore', snapshots.hostile, '/', '--to', second, '--json'], 30_000);
    assert.equal(r2.code, 1);
    const codes = new Map<string, string>(r2.json.errors.map((e: any) => [e.path, e.code]));
    assert.equal(codes.get('/sub'), 'target-exists');
    assert.equal(codes.get('/hello.txt'), 'target-exists');
    assert.deepEqual(readdirSync(outside), [], 'nothing written through the existing symlink');
    assert.equal(readFileSync(join(jail, 'canary'), 'utf8'), 'untouched\n');

    // As tar: the archive holds only safe, unique names.
    const tar = await cliBytes(['files', 'restore', snapshots.hostile, '/', '--tar', '--to', '-'], 30_000);
    assert.equal(tar.code, 1);
    writeFileSync(join(work, 'hostile.tar'), tar.stdout);
    const names = (await run('tar', ['-tf', join(work, 'hostile.tar')])).trim().split('\n');
    assert.equal(new Set(names).size, names.length, 'no name twice');
    assert.ok(names.every((n) => !n.startsWith('/') && !n.split('/').includes('..')), names.join(','));
    assert.match(tar.stderr, /[56] entries could not be restored/);
  });
});

describe('the snapshot device (API)', { timeout: 60_000 }, () => {
  it('holes cost no chunk reads; concurrent reads of one chunk share a fetch; repeated reads hit the cache', async () => {
    const store = await LocalStore.open(repo);
    try {
      const r = await Repository.open(store, async () => PASS);
      const disk = await openSnapshotDisk(r, snapshots.big);
      assert.equal(disk.device.size, 20 * 1024 * MiB);
      const hole = await disk.device.read(19 * 1024 * MiB + 12345, 3 * MiB);
      assert.ok(hole.every((b) => b === 0));
      // Opening reads the disk map's nodes (3 for 20 GiB), then one index piece: no chunk.
      assert.equal(disk.disk.nodes?.length, 3);
      assert.deepEqual([disk.stats.storeReads, disk.stats.indexPiecesLoaded, disk.stats.chunksDecoded], [4, 1, 0], 'the map nodes and one index piece');
      // The GPT header: data. Two concurrent reads in one chunk, then a third from the cache.
      const [a, b] = await Promise.all([disk.device.read(512, 92), disk.device.read(1024, 512)]);
      assert.equal(a.toString('latin1', 0, 8), 'EFI PART');
      assert.equal(b.length, 512);
      assert.equal(disk.stats.chunksDecoded, 1, 'one fetch for both');
      await disk.device.read(0, 512);
      assert.equal(disk.stats.chunksDecoded, 1);
      assert.equal(disk.stats.cacheHits, 2);
      await assert.rejects(disk.device.read(disk.device.size - 10, 20), /outside the disk/);
      await disk.close();
    } finally {
      await store.close();
    }
  });
});

describe('a damaged chunk under a file', { timeout: 60_000 }, () => {
  it('cat fails with a damage error naming the disk offset; listings still work', async () => {
    // Find, through the API, the chunk holding the start of /random.bin of the MBR disk.
    const store = await LocalStore.open(repo);
    const r = await Repository.open(store, async () => PASS);
    const disk = await openSnapshotDisk(r, snapshots.mbr);
    const head = readFileSync(join(trees.small, 'random.bin')).subarray(0, 4096);
    const { chunkSize } = disk.disk;
    let slot = -1;
    for (let s = 0; s * chunkSize < disk.disk.size && slot < 0; s++) {
      const data = await disk.device.read(s * chunkSize, Math.min(chunkSize, disk.disk.size - s * chunkSize));
      if (data.includes(head)) slot = s;
    }
    assert.ok(slot >= 0, 'the file is found in the disk');
    await disk.close();
    const pieces = r.config.pieceSlots;
    const piece = await r.readBlob(Buffer.from((await pieceIds(r, snapshots.mbr, disk.disk))[Math.floor(slot / pieces)], 'hex'), 2, () => 'piece');
    const id = piece.subarray((slot % pieces) * 32, (slot % pieces) * 32 + 32);
    const loc = await r.locate(id, () => 'chunk');
    const pack = join(repo, packName(loc.packId));
    const at = loc.offset + Math.floor(loc.length / 2);
    patchFile(pack, at, Buffer.from([readFileRange(pack, at, 1)[0] ^ 0x40]));
    await store.close();

    const cat = await cli(['files', 'cat', `${snapshots.mbr}:/random.bin`]);
    assert.equal(cat.code, 3, cat.stderr);
    assert.match(cat.stderr, new RegExp(`damaged.*disk disk0 at offset ${slot * chunkSize}`));
    assert.match(cat.stderr, /tresor verify/);
    // The listing goes on; an entry whose metadata shares the damaged chunk (a slow symlink's
    // target block, say) is reported as damaged, with the exit code saying so.
    const ls = await cli(['files', 'ls', `${snapshots.mbr}:/`, '--json']);
    const damaged = ls.json.filter((e: any) => e.error);
    assert.equal(ls.code, damaged.length > 0 ? 1 : 0);
    assert.ok(damaged.every((e: any) => e.error.code === 'damaged-chunk'), JSON.stringify(damaged));
    assert.ok(ls.json.length > 20, 'the rest of the directory is listed');
    const random = ls.json.find((e: any) => e.name === 'random.bin');
    assert.equal(random.size, 100_000);
  });
});

describe('references and patterns', () => {
  it('parses SNAPSHOT[:DISK[:PART]][:/PATH]', () => {
    assert.deepEqual(parseFileRef('vm/web1/20261122T101500Z', 'optional'), { snapshot: 'vm/web1/20261122T101500Z' });
    assert.deepEqual(parseFileRef('vm/a/T:vda:lvm/vg0/root:/etc/a:b', 'optional'), { snapshot: 'vm/a/T', disk: 'vda', part: 'lvm/vg0/root', path: '/etc/a:b' });
    assert.deepEqual(parseFileRef('s:/x', 'required'), { snapshot: 's', path: '/x' });
    assert.deepEqual(parseFileRef('s:vda:/', 'required'), { snapshot: 's', disk: 'vda', path: '/' });
    assert.throws(() => parseFileRef('s:vda:2:3', 'optional'), /neither a disk/);
    assert.throws(() => parseFileRef('s:vda', 'required'), /a path is needed/);
    assert.throws(() => parseFileRef('s::2', 'optional'), /disk name is empty/);
  });

  it('globs: * ? classes, escapes, no exponential backtracking', () => {
    const m = (p: string, n: string) => compileGlob(p).matches(n);
    assert.ok(m('*.bin', 'random.bin') && !m('*.bin', 'random.bin.txt') && m('*', '.hidden'));
    assert.ok(m('a?c', 'abc') && !m('a?c', 'ac') && m('a?c', 'a😀c'));
    assert.ok(m('[a-c]x', 'bx') && !m('[!a-c]x', 'bx') && m('[^a-c]x', 'dx') && m('[]]', ']'));
    assert.ok(m('\\*', '*') && !m('\\*', 'a') && m('[', '[') && m('a[b', 'a[b'));
    const started = Date.now();
    assert.ok(!m(`${'*a'.repeat(30)}b`, 'a'.repeat(5000)));
    assert.ok(Date.now() - started < 1000);
  });
});
