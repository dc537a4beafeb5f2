/**
 * XFS v5 reader against images built by the real tools, two ways:
 * - `mkfs.xfs -p PROTOFILE` (no loop mount): the sample tree without what a protofile cannot
 *   express (names with spaces, hard links, sticky bits, holes, times);
 * - `mkfs.xfs -i nrext64=1` filled through a kernel loop mount: the full sample tree (10 000-entry
 *   node-format directory, hard links, holes, ns times, devices) plus extras: leaf- and
 *   block-format directories, a file of 6000 extents (a two-level extent B+tree), a remote
 *   symlink, and bigtime timestamps before 1970 and after 2038.
 * Dir formats and B+tree depths are confirmed with xfs_db, so the tests know which code paths
 * they cover. Hostile copies are patched (CRCs re-sealed where the test wants the parser, not the
 * checksum, to see the damage); a bounded mutation fuzz re-seals CRCs around half its mutations.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readlinkSync, rmSync, symlinkSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cachedDevice } from '../src/fs/block-cache.ts';
import { FsDamageError, FsUnsupportedError } from '../src/fs/errors.ts';
import type { Filesystem } from '../src/fs/filesystem.ts';
import { probeXfs } from '../src/fs/xfs.ts';
import { crc32c } from '../src/util/crc32c.ts';
import { TresorError } from '../src/util/errors.ts';
import { openFileDevice } from './helpers/block-devices.ts';
import type { FileDevice } from './helpers/block-devices.ts';
import { compareWithHostTree, walkFilesystem } from './helpers/fs-compare.ts';
import { fuzzFilesystem } from './helpers/fs-fuzz.ts';
import { MountTracker } from './helpers/mounts.ts';
import { buildSampleTree } from './helpers/sample-tree.ts';
import { patchFile, readFileRange, run } from './helpers/tools.ts';

const work = mkdtempSync(join(tmpdir(), 'tresor-xfs-'));
const mounts = new MountTracker();
const devices: FileDevice[] = [];
const trees = { full: join(work, 'tree-full'), proto: join(work, 'tree-proto'), tiny: join(work, 'tree-tiny') };
const images = { proto: join(work, 'proto.img'), loop: join(work, 'loop.img'), fuzz: join(work, 'fuzz.img') };
/** Inode numbers noted while the loop image was mounted (independent of the reader). */
const inodes: Record<string, number> = {};
const FRAGMENTS = 6000;
const FRAGMENT_STRIDE = 8192;
const LONG_TARGET = `${'remote-symlink-component/'.repeat(40)}end`;
const FUTURE_S = 4_102_444_800; // 2100-01-01
const PAST_S = -315_619_200; // 1960-01-01

// ---------------------------------------------------------------------------------------------
// Building images

/** A protofile line per entry (mkfs.xfs -p): type+setuid+setgid+perm, uid, gid, then the source. */
function protoEntries(dir: string): string[] {
  const lines: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    const st = lstatSync(path);
    const mode = `${st.mode & 0o4000 ? 'u' : '-'}${st.mode & 0o2000 ? 'g' : '-'}${(st.mode & 0o777).toString(8).padStart(3, '0')}`;
    const owner = `${st.uid} ${st.gid}`;
    if (st.isDirectory()) lines.push(`${name} d${mode} ${owner}`, ...protoEntries(path), '$');
    else if (st.isFile()) lines.push(`${name} -${mode} ${owner} ${path}`);
    else if (st.isSymbolicLink()) lines.push(`${name} l${mode} ${owner} ${readlinkSync(path)}`);
    else if (st.isFIFO()) lines.push(`${name} p${mode} ${owner}`);
    else if (st.isCharacterDevice() || st.isBlockDevice()) {
      const major = (st.rdev >>> 8) & 0xfff;
      const minor = (st.rdev & 0xff) | ((st.rdev >>> 12) & 0xfff00);
      lines.push(`${name} ${st.isCharacterDevice() ? 'c' : 'b'}${mode} ${owner} ${major} ${minor}`);
    }
  }
  return lines;
}

async function protoImage(image: string, tree: string): Promise<void> {
  const proto = join(work, `${image.split('/').pop()}.proto`);
  writeFileSync(proto, ['/dev/null', '0 0', 'd--755 0 0', ...protoEntries(tree), '$', ''].join('\n'));
  await run('truncate', ['-s', '320M', image]);
  await run('mkfs.xfs', ['-q', '-f', '-p', proto, image]);
}

async function fillLoopImage(dir: string): Promise<void> {
  await run('cp', ['-a', `${trees.full}/.`, dir]);
  const extras = join(dir, 'extras');
  mkdirSync(extras);
  for (const [name, count] of [['leafdir', 300], ['blockdir', 40]] as const) {
    mkdirSync(join(extras, name));
    for (let i = 0; i < count; i++) writeFileSync(join(extras, name, `file-${i}-${'x'.repeat(i % 17)}`), `${i}\n`);
  }
  // Pieces with gaps between them: one extent each, far more than the inode holds.
  const fd = openSync(join(extras, 'fragmented.bin'), 'w');
  for (let i = 0; i < FRAGMENTS; i++) writeSync(fd, Buffer.alloc(4096, i % 251), 0, 4096, i * FRAGMENT_STRIDE);
  closeSync(fd);
  symlinkSync(LONG_TARGET, join(extras, 'remote-symlink'));
  writeFileSync(join(extras, 'future.txt'), 'bigtime\n');
  utimesSync(join(extras, 'future.txt'), FUTURE_S, FUTURE_S);
  writeFileSync(join(extras, 'past.txt'), 'before the epoch\n');
  await run('touch', ['-d', `@${PAST_S}`, join(extras, 'past.txt')]); // utimes() from Node rejects times before 1970
  await run('sync', ['-f', join(dir, 'extras')]);
  for (const path of ['big', 'sub', 'extras/leafdir', 'extras/blockdir', 'extras/fragmented.bin', 'hello.txt', 'deep', 'deep/level-01', 'deep/level-01/level-02']) {
    inodes[path] = lstatSync(join(dir, path)).ino;
  }
}

async function loopImage(image: string): Promise<void> {
  await run('truncate', ['-s', '320M', image]);
  await run('mkfs.xfs', ['-q', '-f', '-i', 'nrext64=1', '-L', 'tresor-xfs', image]);
  await mounts.withLoopMount(image, join(work, 'mnt'), fillLoopImage);
}

async function xfsDb(image: string, ...commands: string[]): Promise<string> {
  return run('xfs_db', ['-r', ...commands.flatMap((c) => ['-c', c]), image]);
}

/** Byte offset of an inode, as xfs_db locates it (checked: magic "IN" and the inode's own number). */
async function inodeOffset(image: string, ino: number): Promise<number> {
  const out = await xfsDb(image, `convert inode ${ino} daddr`);
  const m = /\((\d+)\)/.exec(out);
  assert.ok(m, `xfs_db convert: ${out}`);
  const at = Number(m[1]) * 512;
  const core = readFileRange(image, at, 176);
  assert.equal(core.readUInt16BE(0), 0x494e, `inode ${ino} at byte ${at}`);
  assert.equal(core.readBigUInt64BE(152), BigInt(ino));
  return at;
}

/** Byte offset of a filesystem block given as xfs_db prints it: "startblock N (AG/AGBLOCK)". */
function blockOffset(image: string, bmap: string): number {
  const m = /startblock \d+ \((\d+)\/(\d+)\)/.exec(bmap);
  assert.ok(m, `xfs_db bmap: ${bmap}`);
  const sb = readFileRange(image, 0, 512);
  return (Number(m[1]) * sb.readUInt32BE(84) + Number(m[2])) * sb.readUInt32BE(4);
}

// ---------------------------------------------------------------------------------------------
// CRC re-sealing, for hostile images and the fuzzer

/** Recomputes the little-endian CRC32c at `crcAt` of the `length` bytes at `offset` of a file. */
function resealFile(image: string, offset: number, length: number, crcAt: number): void {
  const buf = readFileRange(image, offset, length);
  buf.writeUInt32LE(0, crcAt);
  const crc = Buffer.alloc(4);
  crc.writeUInt32LE(crc32c(buf));
  patchFile(image, offset + crcAt, crc);
}

/** The CRC-protected structure a byte of an XFS image belongs to, as the fuzzer sees it. */
async function resealAround(read: (offset: number, length: number) => Promise<Buffer>, at: number, inodeSize: number, blockSize: number): Promise<Array<[number, number]>> {
  const candidates: Array<{ offset: number; length: number; crcAt: number; test: (b: Buffer) => boolean }> = [
    { offset: 0, length: 512, crcAt: 224, test: (b) => b.readUInt32BE(0) === 0x58465342 && at < 512 },
    { offset: at - (at % inodeSize), length: inodeSize, crcAt: 100, test: (b) => b.readUInt16BE(0) === 0x494e },
    { offset: at - (at % blockSize), length: blockSize, crcAt: 4, test: (b) => [0x58444233, 0x58444433, 0x58534c4d].includes(b.readUInt32BE(0)) },
    { offset: at - (at % blockSize), length: blockSize, crcAt: 12, test: (b) => [0x3df1, 0x3dff, 0x3ebe].includes(b.readUInt16BE(8)) },
    { offset: at - (at % blockSize), length: blockSize, crcAt: 64, test: (b) => b.readUInt32BE(0) === 0x424d4133 },
  ];
  for (const c of candidates) {
    const buf = await read(c.offset, c.length);
    if (!c.test(buf)) continue;
    buf.writeUInt32LE(0, c.crcAt);
    const crc = crc32c(buf);
    return [0, 1, 2, 3].map((i) => [c.offset + c.crcAt + i, (crc >>> (8 * i)) & 0xff]);
  }
  return [];
}

// ---------------------------------------------------------------------------------------------

async function open(path: string): Promise<FileDevice> {
  const dev = await openFileDevice(path);
  devices.push(dev);
  return dev;
}

async function mountXfs(path: string): Promise<Filesystem> {
  const fs = await probeXfs(cachedDevice(await open(path)));
  assert.ok(fs, `${path}: probeXfs found no XFS`);
  return fs;
}

async function resolve(fs: Filesystem, path: string): Promise<bigint> {
  let ino = fs.rootIno;
  for (const part of path.split('/').filter(Boolean)) {
    const entry = await fs.lookup(ino, part);
    assert.ok(entry, `${path}: '${part}' not found`);
    ino = entry.ino;
  }
  return ino;
}

function hostileCopy(source: string, name: string): string {
  const copy = join(work, name);
  copyFileSync(source, copy);
  return copy;
}

before(async () => {
  buildSampleTree(trees.full);
  // The protofile tree: no whitespace in names, no sticky bit; hard links become separate files.
  buildSampleTree(trees.proto, { bigDirEntries: 2000 });
  for (const name of readdirSync(trees.proto)) if (/\s/.test(name) || name === 'sticky-dir') rmSync(join(trees.proto, name), { recursive: true });
  buildSampleTree(trees.tiny, { bigDirEntries: 120, randomFileBytes: 20_000, sparse: false, trailingHole: false });
  for (const name of readdirSync(trees.tiny)) if (/\s/.test(name) || name === 'sticky-dir') rmSync(join(trees.tiny, name), { recursive: true });
  await protoImage(images.proto, trees.proto);
  await protoImage(images.fuzz, trees.tiny);
  await loopImage(images.loop);
});

after(async () => {
  for (const dev of devices) await dev.close();
  try {
    await mounts.releaseAll();
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});

describe('XFS reader on images built by mkfs.xfs', { timeout: 90_000 }, () => {
  it('protofile image: names, bytes, modes, owners, symlinks and devices match', async () => {
    const fs = await mountXfs(images.proto);
    assert.equal(fs.type, 'xfs');
    const uuid = /UUID = (\S+)/.exec(await xfsDb(images.proto, 'uuid'))?.[1];
    assert.equal(fs.uuid, uuid);
    // mkfs.xfs -p keeps neither times nor holes, and hard links became separate files.
    const result = await compareWithHostTree(fs, trees.proto, { mtimeResolutionNs: 0, holes: false, hardLinks: false });
    assert.ok(result.entries > 2000, `compared ${result.entries} entries`);
  });

  it('loop-mounted image: the full tree matches, hard links, holes and ns times included', async () => {
    const fs = await mountXfs(images.loop);
    assert.equal(fs.label, 'tresor-xfs');
    const result = await compareWithHostTree(fs, trees.full, { extraRootNames: ['extras'] });
    assert.ok(result.entries > 10_000, `compared ${result.entries} entries`);
    assert.equal(await resolve(fs, 'hello.txt'), BigInt(inodes['hello.txt']), 'inode numbers are the kernel\'s');
  });

  it('short-form, block, leaf and node directories list and look up', async () => {
    const fs = await mountXfs(images.loop);
    const leafMagic = async (path: string) => {
      const out = await xfsDb(images.loop, `inode ${inodes[path]}`, 'dblock 8388608', 'print');
      return /magic = (0x[0-9a-f]+)/.exec(out)?.[1];
    };
    assert.match(await xfsDb(images.loop, `inode ${inodes.sub}`, 'print core.format'), /local/);
    assert.match(await xfsDb(images.loop, `inode ${inodes['extras/blockdir']}`, 'dblock 0', 'print'), /magic = 0x58444233/, 'XDB3');
    assert.equal(await leafMagic('extras/leafdir'), '0x3df1', 'leaf1 block');
    assert.equal(await leafMagic('big'), '0x3ebe', 'da node block');
    for (const [path, count, probe] of [['sub', 3, 'file.txt'], ['extras/blockdir', 40, 'file-39-xxxxx'], ['extras/leafdir', 300, 'file-299-xxxxxxxxxx'], ['big', 10_000, 'entry-09999']] as const) {
      const dir = await resolve(fs, path);
      const entries = await fs.readdir(dir);
      assert.equal(entries.length, count, path);
      for (const e of entries.filter((_, i) => i % 97 === 0)) assert.equal((await fs.lookup(dir, e.name))?.ino, e.ino, `${path}/${e.name}`);
      assert.equal(await fs.lookup(dir, `${probe}-absent`), undefined);
      if (path !== 'big') assert.ok(await fs.lookup(dir, probe), `${path}/${probe}`);
    }
  });

  it('a file of 6000 extents (two-level extent B+tree) reads back exactly with its holes', async () => {
    const info = await xfsDb(images.loop, `inode ${inodes['extras/fragmented.bin']}`, 'print core.format core.nextents u3.bmbt.level');
    assert.match(info, /core.format = 3 \(btree\)/);
    assert.match(info, /u3.bmbt.level = 2/, info);
    const fs = await mountXfs(images.loop);
    const ino = await resolve(fs, 'extras/fragmented.bin');
    const extents = await fs.extents(ino);
    const data = extents.filter((e) => !e.hole);
    assert.equal(data.length, FRAGMENTS);
    assert.ok(data.every((e, i) => e.offset === i * FRAGMENT_STRIDE && e.length === 4096));
    for (const i of [0, 1, 250, 251, 2999, FRAGMENTS - 1]) {
      const piece = await fs.read(ino, i * FRAGMENT_STRIDE - (i ? 100 : 0), 4196);
      const expected = Buffer.concat([Buffer.alloc(i ? 100 : 0), Buffer.alloc(4096, i % 251), Buffer.alloc(i ? 0 : 100)]);
      assert.ok(piece.equals(expected.subarray(0, piece.length)), `piece ${i}`);
    }
  });

  it('remote symlinks, bigtime timestamps and large extent counters (nrext64)', async () => {
    assert.match(await xfsDb(images.loop, 'version'), /BIGTIME/);
    assert.match(await xfsDb(images.loop, 'version'), /NREXT64/);
    const fs = await mountXfs(images.loop);
    const link = await resolve(fs, 'extras/remote-symlink');
    assert.equal(await fs.readlink(link), LONG_TARGET);
    assert.equal((await fs.stat(link)).size, LONG_TARGET.length);
    assert.equal((await fs.stat(await resolve(fs, 'extras/future.txt'))).mtimeNs, BigInt(FUTURE_S) * 1_000_000_000n);
    assert.equal((await fs.stat(await resolve(fs, 'extras/past.txt'))).mtimeNs, BigInt(PAST_S) * 1_000_000_000n);
    const st = await fs.stat(await resolve(fs, 'extras/future.txt'));
    assert.ok(st.birthtimeNs !== undefined && st.ctimeNs !== undefined, 'v3 inodes carry a creation time');
  });
});

describe('hostile XFS images: clear errors, no hang', { timeout: 60_000 }, () => {
  it('an inode whose CRC does not match is reported', async () => {
    const image = hostileCopy(images.loop, 'crc.img');
    const at = await inodeOffset(image, inodes['hello.txt']);
    patchFile(image, at + 8, Buffer.from([0x12])); // uid, without re-sealing
    const fs = await mountXfs(image);
    await assert.rejects(fs.stat(BigInt(inodes['hello.txt'])), (err: unknown) => err instanceof FsDamageError && /inode CRC mismatch/.test(err.message));
  });

  it('a directory that lists itself is reported; a longer cycle is caught by the walker; nothing hangs', async () => {
    const image = hostileCopy(images.loop, 'cycle.img');
    // Short-form directory "sub": header count, i8count, 4-byte parent; entries name length,
    // offset(2), name, ftype, 4-byte inode. Point its first entry at "sub" itself.
    const subAt = await inodeOffset(image, inodes.sub);
    const fork = readFileRange(image, subAt + 176, 64);
    const entryIno = subAt + 176 + 6 + 3 + fork[6] + 1;
    const self = Buffer.alloc(4);
    self.writeUInt32BE(inodes.sub);
    patchFile(image, entryIno, self);
    resealFile(image, subAt, 512, 100);
    // deep/level-01/level-02 (short-form) gets an entry pointing back up to deep.
    const levelAt = await inodeOffset(image, inodes['deep/level-01/level-02']);
    const levelFork = readFileRange(image, levelAt + 176, 64);
    const up = Buffer.alloc(4);
    up.writeUInt32BE(inodes.deep);
    patchFile(image, levelAt + 176 + 6 + 3 + levelFork[6] + 1, up);
    resealFile(image, levelAt, 512, 100);

    const fs = await mountXfs(image);
    await assert.rejects(fs.readdir(BigInt(inodes.sub)), (err: unknown) => err instanceof FsDamageError && /lists itself/.test(err.message));
    const report = await walkFilesystem(fs, { maxBytesPerFile: 0 });
    const paths = report.errors.map((e) => `${e.path}: ${String(e.error)}`);
    assert.ok(paths.some((p) => p.startsWith('/sub:') && /itself/.test(p)), paths.join('\n'));
    assert.ok(paths.some((p) => /reached twice/.test(p)), paths.join('\n'));
    assert.ok(report.entries > 10_000, 'the rest of the tree is still walked');
  });

  it('an extent pointing outside the filesystem and a bad directory block CRC are reported', async () => {
    const image = hostileCopy(images.loop, 'extent.img');
    const fileAt = await inodeOffset(image, inodes['hello.txt']);
    const rec = readFileRange(image, fileAt + 176, 16);
    rec[7] |= 0x01; // a high start-block bit: far beyond the AGs
    rec[8] = 0xff;
    patchFile(image, fileAt + 176, rec);
    resealFile(image, fileAt, 512, 100);
    const dirBlock = blockOffset(image, await xfsDb(image, `inode ${inodes['extras/blockdir']}`, 'bmap'));
    assert.equal(readFileRange(image, dirBlock, 4).toString('latin1'), 'XDB3');
    patchFile(image, dirBlock + 100, Buffer.from([0xee]));
    const fs = await mountXfs(image);
    await assert.rejects(fs.read(BigInt(inodes['hello.txt']), 0, 100), (err: unknown) => err instanceof FsDamageError && /outside the filesystem/.test(err.message));
    await assert.rejects(fs.readdir(BigInt(inodes['extras/blockdir'])), (err: unknown) => err instanceof FsDamageError && /CRC mismatch/.test(err.message));
  });

  it('an extent B+tree node that points to itself is reported', async () => {
    const image = hostileCopy(images.loop, 'bmbt.img');
    const blockSize = readFileRange(image, 0, 512).readUInt32BE(4);
    const info = await xfsDb(image, `inode ${inodes['extras/fragmented.bin']}`, 'print u3.bmbt.ptrs[1]');
    const node = Number(/= (\d+)/.exec(info)?.[1]);
    const sb = readFileRange(image, 0, 512);
    const agBlockLog = sb[124];
    const nodeAt = (Math.floor(node / 2 ** agBlockLog) * sb.readUInt32BE(84) + (node % 2 ** agBlockLog)) * blockSize;
    const header = readFileRange(image, nodeAt, 72);
    assert.equal(header.readUInt32BE(0), 0x424d4133, 'BMA3 node');
    const maxrecs = Math.floor((blockSize - 72) / 16);
    const self = Buffer.alloc(8);
    self.writeBigUInt64BE(BigInt(node));
    patchFile(image, nodeAt + 72 + maxrecs * 8, self);
    resealFile(image, nodeAt, blockSize, 64);
    const fs = await mountXfs(image);
    await assert.rejects(fs.extents(BigInt(inodes['extras/fragmented.bin'])), (err: unknown) => err instanceof FsDamageError);
  });

  it('an unknown incompatible feature stops the reader with a clear error', async () => {
    const image = hostileCopy(images.fuzz, 'feature.img');
    const sb = readFileRange(image, 0, 512);
    sb.writeUInt32BE((sb.readUInt32BE(216) | 0x80000000) >>> 0, 216);
    patchFile(image, 0, sb);
    resealFile(image, 0, 512, 224);
    await assert.rejects(probeXfs(await open(image)), (err: unknown) => err instanceof FsUnsupportedError && /unknown incompatible features 0x80000000/.test(err.message));
    patchFile(image, 300, randomBytes(8)); // now the superblock CRC fails too
    await assert.rejects(probeXfs(await open(image)), (err: unknown) => err instanceof TresorError && /superblock CRC/.test(err.message));
  });
});

describe('XFS mutation fuzz (bounded time)', { timeout: 60_000 }, () => {
  it('every failure is a TresorError and every walk ends (CRCs re-sealed around half the mutations)', async () => {
    const sb = readFileRange(images.fuzz, 0, 512);
    const { failures } = await fuzzFilesystem({
      probe: (dev) => probeXfs(dev),
      device: await open(images.fuzz),
      budgetMs: 3000,
      minRuns: 5,
      reseal: (read, at) => resealAround(read, at, sb.readUInt16BE(104), sb.readUInt32BE(4)),
    });
    assert.ok(failures > 0, 'some mutations were detected');
  });
});
