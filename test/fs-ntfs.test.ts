/**
 * NTFS reader against volumes made by mkntfs and filled through ntfs-3g (FUSE, on a loop
 * device). The volume holds the full sample tree (10 000-entry directory: a multi-level
 * $INDEX_ALLOCATION B+tree), a copy of a small tree in an LZNT1-compressed directory, and extras
 * the host tree cannot express: alternate data streams, a file with 40 hard links (its names
 * overflow into extension records through $ATTRIBUTE_LIST), reparse-point symlinks and junctions,
 * and a file written in pieces with gaps (data runs alternating with sparse runs). The volume is
 * small enough that $MFT itself is fragmented. Hostile copies have torn fixups, run lists past the device and LZNT1 garbage; a
 * bounded mutation fuzz checks that every failure is a TresorError.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cachedDevice } from '../src/fs/block-cache.ts';
import { FsDamageError } from '../src/fs/errors.ts';
import type { Filesystem } from '../src/fs/filesystem.ts';
import { lznt1Decompress, probeNtfs } from '../src/fs/ntfs.ts';
import { openFileDevice } from './helpers/block-devices.ts';
import type { FileDevice } from './helpers/block-devices.ts';
import { compareWithHostTree, walkFilesystem } from './helpers/fs-compare.ts';
import { fuzzFilesystem } from './helpers/fs-fuzz.ts';
import { MountTracker } from './helpers/mounts.ts';
import { buildSampleTree } from './helpers/sample-tree.ts';
import { patchFile, readFileRange, run } from './helpers/tools.ts';

const work = mkdtempSync(join(tmpdir(), 'tresor-ntfs-'));
const mounts = new MountTracker();
const devices: FileDevice[] = [];
const trees = { full: join(work, 'tree-full'), small: join(work, 'tree-small'), tiny: join(work, 'tree-tiny') };
const images = { main: join(work, 'ntfs.img'), fuzz: join(work, 'ntfs-fuzz.img') };
/** ntfs-3g keeps no POSIX owner or mode without a user mapping; NTFS times have 100 ns resolution. */
const NTFS_COMPARE = { mode: false, owner: false, mtimeResolutionNs: 100 };
const HARD_LINKS = 40;
const ADS = { small: 'first alternate stream', big: randomBytes(60_000) };
const PIECES = 40;
const PIECE_STRIDE = 65536;
/** Content of the file written in pieces with gaps, kept to compare. */
let piecesContent = Buffer.alloc(0);

// Reparse buffers as Windows writes them (set through ntfs-3g's system.ntfs_reparse_data).
function symlinkReparse(target: string, relative: boolean): Buffer {
  const name = Buffer.from(target, 'utf16le');
  const head = Buffer.alloc(12);
  head.writeUInt16LE(0, 0); // substitute name offset
  head.writeUInt16LE(name.length, 2);
  head.writeUInt16LE(name.length, 4); // print name offset
  head.writeUInt16LE(name.length, 6);
  head.writeUInt32LE(relative ? 1 : 0, 8);
  return reparseBuffer(0xa000000c, Buffer.concat([head, name, name]));
}

function junctionReparse(substitute: string, print: string): Buffer {
  const sub = Buffer.from(`${substitute}\0`, 'utf16le');
  const prn = Buffer.from(`${print}\0`, 'utf16le');
  const head = Buffer.alloc(8);
  head.writeUInt16LE(0, 0);
  head.writeUInt16LE(sub.length - 2, 2);
  head.writeUInt16LE(sub.length, 4);
  head.writeUInt16LE(prn.length - 2, 6);
  return reparseBuffer(0xa0000003, Buffer.concat([head, sub, prn]));
}

function reparseBuffer(tag: number, data: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32LE(tag, 0);
  head.writeUInt16LE(data.length, 4);
  return Buffer.concat([head, data]);
}

async function setXattr(path: string, name: string, value: Buffer): Promise<void> {
  await run('setfattr', ['-n', name, '-v', `0x${value.toString('hex')}`, path]);
}

async function fillMain(dir: string): Promise<void> {
  mkdirSync(join(dir, 'tree'));
  await run('cp', ['-a', `${trees.full}/.`, join(dir, 'tree')]);
  mkdirSync(join(dir, 'compressed'));
  await setXattr(join(dir, 'compressed'), 'system.ntfs_attrib_be', Buffer.from('00000810', 'hex'));
  await run('cp', ['-a', `${trees.small}/.`, join(dir, 'compressed')]);

  const extras = join(dir, 'extras');
  mkdirSync(extras);
  writeFileSync(join(extras, 'ads.txt'), 'main stream\n');
  await setXattr(join(extras, 'ads.txt'), 'user.stream-one', Buffer.from(ADS.small));
  await setXattr(join(extras, 'ads.txt'), 'user.big-stream', ADS.big);
  mkdirSync(join(extras, 'links'));
  writeFileSync(join(extras, 'links', 'original'), 'one file, many names\n');
  for (let i = 0; i < HARD_LINKS; i++) await run('ln', [join(extras, 'links', 'original'), join(extras, 'links', `a-rather-long-hard-link-name-${i}`)]);
  writeFileSync(join(extras, 'win-symlink'), '');
  await setXattr(join(extras, 'win-symlink'), 'system.ntfs_reparse_data', symlinkReparse('..\\tree\\hello.txt', true));
  writeFileSync(join(extras, 'win-abs-symlink'), '');
  await setXattr(join(extras, 'win-abs-symlink'), 'system.ntfs_reparse_data', symlinkReparse('\\??\\C:\\Users\\Public', false));
  mkdirSync(join(extras, 'junction'));
  await setXattr(join(extras, 'junction'), 'system.ntfs_reparse_data', junctionReparse('\\??\\C:\\Windows', 'C:\\Windows'));
  // Pieces written with gaps between them: data runs alternate with sparse runs.
  const pieces = Buffer.alloc(PIECES * PIECE_STRIDE);
  const fd = openSync(join(extras, 'pieces.bin'), 'w');
  for (let i = 0; i < PIECES; i++) {
    const piece = randomBytes(4096);
    piece.copy(pieces, i * PIECE_STRIDE);
    writeSync(fd, piece, 0, piece.length, i * PIECE_STRIDE);
  }
  closeSync(fd);
  piecesContent = pieces.subarray(0, (PIECES - 1) * PIECE_STRIDE + 4096);
}

async function fillFuzz(dir: string): Promise<void> {
  await run('cp', ['-a', `${trees.tiny}/.`, dir]);
  mkdirSync(join(dir, 'packed'));
  await setXattr(join(dir, 'packed'), 'system.ntfs_attrib_be', Buffer.from('00000810', 'hex'));
  writeFileSync(join(dir, 'packed', 'text.txt'), 'compressible text\n'.repeat(8000));
  await setXattr(join(dir, 'hello.txt'), 'user.note', Buffer.from('an alternate stream'));
}

async function buildVolume(image: string, size: string, label: string, fill: (dir: string) => Promise<void>): Promise<void> {
  await run('truncate', ['-s', size, image]);
  await run('mkntfs', ['-F', '-Q', '-L', label, image]);
  await mounts.withFuse(image, 'ntfs-3g', ['-o', 'streams_interface=xattr'], join(work, `mnt-${label}`), fill);
}

async function open(path: string): Promise<FileDevice> {
  const dev = await openFileDevice(path);
  devices.push(dev);
  return dev;
}

async function mountNtfs(path: string): Promise<Filesystem> {
  const fs = await probeNtfs(cachedDevice(await open(path)));
  assert.ok(fs, `${path}: probeNtfs found no NTFS`);
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

/** Runs (VCN, LCN, length) of an attribute as ntfsinfo prints them; LCN -1 is a hole. */
async function ntfsinfoRuns(image: string, args: string[], attribute: string): Promise<Array<{ lcn: number; length: number }>> {
  const out = await run('ntfsinfo', ['-v', ...args, image]);
  const section = out.split('Dumping attribute ').find((s) => s.startsWith(attribute));
  assert.ok(section, `ntfsinfo shows ${attribute}`);
  const runs = [...section.matchAll(/^\s+0x[0-9a-f]+\s+(0x[0-9a-f]+|<HOLE>)\s+(0x[0-9a-f]+)\s*$/gm)];
  return runs.map((m) => ({ lcn: m[1] === '<HOLE>' ? -1 : Number(m[1]), length: Number(m[2]) }));
}

function clusterSize(image: string): number {
  const boot = readFileRange(image, 0, 512);
  return boot.readUInt16LE(11) * boot[13];
}

/** Byte offset of MFT record `record`, through $MFT's own run list (as ntfsinfo reads it). */
async function mftRecordOffset(image: string, record: number): Promise<number> {
  const cs = clusterSize(image);
  let vcnBytes = 0;
  for (const r of await ntfsinfoRuns(image, ['-i', '0'], '$DATA')) {
    if (record * 1024 < vcnBytes + r.length * cs) return r.lcn * cs + (record * 1024 - vcnBytes);
    vcnBytes += r.length * cs;
  }
  throw new Error(`record ${record} is beyond $MFT`);
}

function hostileCopy(name: string): string {
  const copy = join(work, name);
  copyFileSync(images.main, copy);
  return copy;
}

before(async () => {
  buildSampleTree(trees.full);
  buildSampleTree(trees.small, { bigDirEntries: 60, randomFileBytes: 256 * 1024, specialFiles: false });
  buildSampleTree(trees.tiny, { bigDirEntries: 60, randomFileBytes: 20_000, sparse: false, trailingHole: false, specialFiles: false });
  await buildVolume(images.main, '64M', 'TresorNTFS', fillMain);
  await buildVolume(images.fuzz, '8M', 'fuzz', fillFuzz);
});

after(async () => {
  for (const dev of devices) await dev.close();
  try {
    await mounts.releaseAll();
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});

describe('NTFS reader on a volume filled through ntfs-3g', { timeout: 90_000 }, () => {
  it('the full tree matches: names, bytes, holes, mtimes, hard links, Interix symlinks, FIFOs and devices', async () => {
    const mft = await ntfsinfoRuns(images.main, ['-i', '0'], '$DATA');
    assert.ok(mft.length > 1, `$MFT is fragmented (${mft.length} runs), so its own run list is exercised`);
    const fs = await mountNtfs(images.main);
    assert.equal(fs.type, 'ntfs');
    assert.equal(fs.label, 'TresorNTFS');
    const id = Object.fromEntries((await run('blkid', ['-p', '-o', 'export', images.main])).trim().split('\n').map((l) => l.split('=', 2)));
    assert.equal(fs.uuid, id.UUID);
    const tree = await resolve(fs, 'tree');
    const result = await compareWithHostTree(fs, trees.full, { ...NTFS_COMPARE, root: tree });
    assert.ok(result.entries > 10_000, `compared ${result.entries} entries`);
    const big = await resolve(fs, 'tree/big');
    assert.equal((await fs.readdir(big)).length, 10_000);
    assert.equal(await fs.lookup(big, 'entry-99999'), undefined, 'absent name in a B+tree directory');
    // Names are found ignoring case, as Windows resolves them (exact matches win).
    assert.equal((await fs.lookup(tree, 'HELLO.TXT'))?.ino, await resolve(fs, 'tree/hello.txt'));
    const names = (await fs.readdir(fs.rootIno)).map((e) => e.name).sort();
    assert.deepEqual(names, ['compressed', 'extras', 'tree'], 'system files ($MFT, ...) are hidden');
    assert.equal(await fs.lookup(fs.rootIno, '$MFT'), undefined, 'and not found by lookup either');
  });

  it('a compressed directory: LZNT1 files (with sparse units) read back exactly', async () => {
    const fs = await mountNtfs(images.main);
    const compressed = await resolve(fs, 'compressed');
    await compareWithHostTree(fs, trees.small, { ...NTFS_COMPARE, root: compressed });
    const lines = await fs.stat(await resolve(fs, 'compressed/lines.txt'));
    assert.equal((lines.attributes ?? 0) & 0x800, 0x800, 'lines.txt is compressed');
    const runs = await ntfsinfoRuns(images.main, ['-F', '/compressed/lines.txt'], '$DATA');
    assert.ok(runs.some((r) => r.lcn === -1), 'compression units end in sparse runs: the data really is LZNT1');
  });

  it('alternate data streams are listed and read by name', async () => {
    const fs = await mountNtfs(images.main);
    const ino = await resolve(fs, 'extras/ads.txt');
    const st = await fs.stat(ino);
    assert.deepEqual([...(st.streams ?? [])].sort(), ['big-stream', 'stream-one']);
    assert.equal(st.size, 12);
    assert.equal((await fs.read(ino, 0, 100)).toString(), 'main stream\n');
    assert.equal((await fs.read(ino, 0, 100, 'stream-one')).toString(), ADS.small);
    assert.ok((await fs.read(ino, 0, 100_000, 'big-stream')).equals(ADS.big), 'non-resident stream');
    assert.ok((await fs.read(ino, 50_000, 20_000, 'big-stream')).equals(ADS.big.subarray(50_000)), 'read at an offset, short at its end');
    await assert.rejects(fs.read(ino, 0, 10, 'missing'), /no data stream named 'missing'/);
  });

  it('40 hard links: one record, names in extension records through $ATTRIBUTE_LIST', async () => {
    const info = await run('ntfsinfo', ['-F', '/extras/links/original', images.main]);
    assert.match(info, /\$ATTRIBUTE_LIST/, 'ntfs-3g moved the names into extension records');
    const fs = await mountNtfs(images.main);
    const dir = await resolve(fs, 'extras/links');
    const entries = await fs.readdir(dir);
    assert.equal(entries.length, HARD_LINKS + 1);
    const inos = new Set(entries.map((e) => e.ino));
    assert.equal(inos.size, 1, 'every name is the same MFT record');
    const st = await fs.stat(entries[0].ino);
    assert.equal(st.nlink, HARD_LINKS + 1);
    assert.equal((await fs.read(entries[0].ino, 0, 100)).toString(), 'one file, many names\n');
  });

  it('reparse-point symlinks and junctions read as symlinks', async () => {
    const fs = await mountNtfs(images.main);
    const relative = await resolve(fs, 'extras/win-symlink');
    assert.equal((await fs.stat(relative)).type, 'symlink');
    assert.equal(await fs.readlink(relative), '../tree/hello.txt', 'relative targets get / separators');
    assert.equal(await fs.readlink(await resolve(fs, 'extras/win-abs-symlink')), 'C:\\Users\\Public');
    const junction = await resolve(fs, 'extras/junction');
    const listed = (await fs.readdir(await resolve(fs, 'extras'))).find((e) => e.name === 'junction');
    assert.equal(listed?.type, 'symlink');
    assert.equal((await fs.stat(junction)).type, 'symlink');
    assert.equal(await fs.readlink(junction), 'C:\\Windows');
    await assert.rejects(fs.readlink(await resolve(fs, 'extras/ads.txt')), /not a symbolic link/);
  });

  it('a file of many runs (data alternating with sparse runs) reads back exactly, holes as holes', async () => {
    const runs = await ntfsinfoRuns(images.main, ['-F', '/extras/pieces.bin'], '$DATA');
    assert.ok(runs.length >= 2 * PIECES - 1, `pieces.bin has ${runs.length} runs`);
    const fs = await mountNtfs(images.main);
    const ino = await resolve(fs, 'extras/pieces.bin');
    assert.equal((await fs.stat(ino)).size, piecesContent.length);
    assert.ok((await fs.read(ino, 0, piecesContent.length + 100)).equals(piecesContent));
    assert.ok((await fs.read(ino, 12345, 99_999)).equals(piecesContent.subarray(12345, 12345 + 99_999)), 'at an offset');
    const data = (await fs.extents(ino)).filter((e) => !e.hole);
    assert.equal(data.length, PIECES, 'one data extent per piece');
    assert.ok(data.every((e, i) => e.offset === i * PIECE_STRIDE && e.length === 4096), JSON.stringify(data.slice(0, 3)));
  });
});

describe('hostile NTFS volumes: clear errors, no hang', { timeout: 60_000 }, () => {
  it('an MFT record with a torn update sequence is reported', async () => {
    const clean = await mountNtfs(images.main);
    const hello = await resolve(clean, 'tree/hello.txt');
    const image = hostileCopy('fixup.img');
    patchFile(image, (await mftRecordOffset(image, Number(hello))) + 510, Buffer.from([0xde, 0xad]));
    const fs = await mountNtfs(image);
    await assert.rejects(fs.stat(hello), (err: unknown) => err instanceof FsDamageError && /update sequence mismatch/.test(err.message));
    const report = await walkFilesystem(fs, { maxBytesPerFile: 4096, maxEntries: 2000 });
    assert.deepEqual(report.errors.map((e) => e.path), ['/tree/hello.txt'], 'the walk reports the entry and goes on');
    assert.ok(report.entries >= 2000);
  });

  it('a run list that points past the device is reported', async () => {
    const clean = await mountNtfs(images.main);
    const random = await resolve(clean, 'tree/random.bin');
    const image = hostileCopy('runlist.img');
    const recordAt = await mftRecordOffset(image, Number(random));
    const record = readFileRange(image, recordAt, 1024);
    // Walk the attributes to the unnamed $DATA and make its first run's LCN huge.
    let at = record.readUInt16LE(20);
    while (record.readUInt32LE(at) !== 0x80) at += record.readUInt32LE(at + 4);
    const runs = at + record.readUInt16LE(at + 32);
    const header = record[runs];
    const lcnAt = runs + 1 + (header & 0x0f);
    const lcnSize = header >> 4;
    const huge = Buffer.alloc(lcnSize, 0xff);
    huge[lcnSize - 1] = 0x3f; // positive, far beyond the volume
    patchFile(image, recordAt + lcnAt, huge);
    const fs = await mountNtfs(image);
    await assert.rejects(fs.read(random, 0, 4096), (err: unknown) => err instanceof FsDamageError && /outside the volume/.test(err.message));
  });

  it('LZNT1 garbage in a compressed file is reported, not decoded into memory it does not own', async () => {
    const image = hostileCopy('lznt1.img');
    const runs = await ntfsinfoRuns(image, ['-F', '/compressed/lines.txt'], '$DATA');
    // First chunk: compressed, 16 bytes, starting with a back-reference before any byte exists.
    patchFile(image, runs[0].lcn * clusterSize(image), Buffer.from([0x0f, 0xb0, 0x01, 0xff, 0xff, 0x41, 0x42]));
    const fs = await mountNtfs(image);
    const ino = await resolve(fs, 'compressed/lines.txt');
    await assert.rejects(fs.read(ino, 0, 1000), (err: unknown) => err instanceof FsDamageError && /LZNT1 back-reference/.test(err.message));
    const out = Buffer.alloc(4096);
    assert.throws(() => lznt1Decompress(Buffer.from([0xff, 0xbf, 0x00]), out, { fs: 'ntfs', structure: 'test' }), /overruns/);
  });

  it('a torn index block of a large directory is reported for that directory only', async () => {
    const image = hostileCopy('indx.img');
    const runs = await ntfsinfoRuns(image, ['-F', '/tree/big'], '$INDEX_ALLOCATION');
    patchFile(image, runs[0].lcn * clusterSize(image) + 510, Buffer.from([0x00, 0x00]));
    const fs = await mountNtfs(image);
    const big = await resolve(fs, 'tree/big');
    await assert.rejects(fs.readdir(big), (err: unknown) => err instanceof FsDamageError && /update sequence mismatch/.test(err.message));
    assert.ok((await fs.readdir(await resolve(fs, 'tree/sub'))).length > 0, 'other directories still list');
  });

  it('a boot sector with an impossible geometry is damage; other bytes are not NTFS', async () => {
    const image = join(work, 'boot.img');
    writeFileSync(image, readFileRange(images.fuzz, 0, 1 << 20));
    patchFile(image, 64, Buffer.from([0x7f])); // 127 clusters per MFT record
    await assert.rejects(probeNtfs(await open(image)), FsDamageError);
    const junk = join(work, 'junk.img');
    writeFileSync(junk, randomBytes(65536));
    assert.equal(await probeNtfs(await open(junk)), undefined);
  });
});

describe('NTFS mutation fuzz (bounded time)', { timeout: 60_000 }, () => {
  it('every failure is a TresorError and every walk ends', async () => {
    const { failures } = await fuzzFilesystem({ probe: (dev) => probeNtfs(dev), device: await open(images.fuzz), budgetMs: 3000, minRuns: 5 });
    assert.ok(failures > 0, 'some mutations were detected');
  });
});

