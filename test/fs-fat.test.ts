/**
 * FAT12/16/32 (with VFAT long names) and exFAT readers against images built by the real tools:
 * mkfs.fat + mcopy (mtools, LC_ALL=C.UTF-8, TZ=UTC) for FAT; mkfs.exfat (exfatprogs) filled
 * through exfat-fuse on a loop device for exFAT. Every file's bytes, names and mtime are compared
 * with the tree that built the image (FAT keeps no owner or mode; mtime to 2 s on FAT, 1 s as
 * exfat-fuse writes it). Hostile images are patched copies; a bounded mutation fuzz checks that
 * every failure is a TresorError and that no walk hangs.
 */
import assert from 'node:assert/strict';
import { closeSync, copyFileSync, mkdtempSync, openSync, readdirSync, rmSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FsDamageError } from '../src/fs/errors.ts';
import { probeExfat } from '../src/fs/exfat.ts';
import { probeFat } from '../src/fs/fat.ts';
import type { FatVolume } from '../src/fs/fat.ts';
import type { Filesystem } from '../src/fs/filesystem.ts';
import { openVolumes } from '../src/fs/probe.ts';
import { defaultProbes } from '../src/fs/registry.ts';
import { openFileDevice } from './helpers/block-devices.ts';
import type { FileDevice } from './helpers/block-devices.ts';
import { compareWithHostTree, walkFilesystem } from './helpers/fs-compare.ts';
import { fuzzFilesystem } from './helpers/fs-fuzz.ts';
import { MountTracker } from './helpers/mounts.ts';
import { buildSampleTree } from './helpers/sample-tree.ts';
import type { SampleTreeOptions } from './helpers/sample-tree.ts';
import { patchFile, readFileRange, run } from './helpers/tools.ts';

const work = mkdtempSync(join(tmpdir(), 'tresor-fat-'));
const mounts = new MountTracker();
const devices: FileDevice[] = [];

/** What FAT can hold: no links, special files, owners or modes, no names with ':' or astral characters. */
const FAT_TREE: SampleTreeOptions = {
  bigDirEntries: 300, symlinks: false, hardLinks: false, specialFiles: false, owners: false, modes: false,
  exoticNames: false, sparse: false,
};
const TINY_TREE: SampleTreeOptions = { ...FAT_TREE, bigDirEntries: 40, randomFileBytes: 100_000, trailingHole: false };
const FAT_COMPARE = { mode: false, owner: false, hardLinks: false, nlink: false, holes: false, rdev: false };

const trees = { fat: join(work, 'tree-fat'), tiny: join(work, 'tree-tiny'), exfat: join(work, 'tree-exfat') };
const images = { fat32: '', fat16: '', fat12: '', exfat: '' };
/** Interleaved files written through exfat-fuse, so that they are FAT-chained, not contiguous. */
const INTERLEAVED = ['interleaved-a.bin', 'interleaved-b.bin'];

async function open(path: string): Promise<FileDevice> {
  const dev = await openFileDevice(path);
  devices.push(dev);
  return dev;
}

async function openFat(path: string): Promise<FatVolume> {
  const fs = await probeFat(await open(path));
  assert.ok(fs, `${path}: probeFat found no FAT filesystem`);
  return fs;
}

async function openExfat(path: string): Promise<Filesystem> {
  const fs = await probeExfat(await open(path));
  assert.ok(fs, `${path}: probeExfat found no exFAT filesystem`);
  return fs;
}

async function mtoolsImage(name: string, size: string, mkfsArgs: string[], tree: string): Promise<string> {
  const image = join(work, name);
  await run('truncate', ['-s', size, image]);
  await run('mkfs.fat', [...mkfsArgs, image]);
  const entries = readdirSync(tree).map((n) => join(tree, n));
  await run('mcopy', ['-s', '-p', '-m', '-i', image, ...entries, '::/'], { env: { TZ: 'UTC' } });
  return image;
}

async function exfatImage(name: string, tree: string): Promise<string> {
  const image = join(work, name);
  await run('truncate', ['-s', '128M', image]);
  await run('mkfs.exfat', ['-L', 'TresorEx', image]);
  await mounts.withFuse(image, 'mount.exfat-fuse', [], join(work, 'mnt-exfat'), async (dir) => {
    // Two files grown in turns end up fragmented: they need FAT chains.
    const hostFds = INTERLEAVED.map((n) => openSync(join(tree, n), 'w'));
    const fuseFds = INTERLEAVED.map((n) => openSync(join(dir, n), 'w'));
    for (let round = 0; round < 24; round++) {
      for (let f = 0; f < INTERLEAVED.length; f++) {
        const chunk = randomBytes(40_000 + round * 97);
        writeSync(hostFds[f], chunk);
        writeSync(fuseFds[f], chunk);
      }
    }
    [...hostFds, ...fuseFds].forEach((fd) => closeSync(fd));
    for (const n of INTERLEAVED) {
      utimesSync(join(tree, n), 1_600_000_000, 1_600_000_000);
      utimesSync(join(dir, n), 1_600_000_000, 1_600_000_000);
    }
    const rest = readdirSync(tree).filter((n) => !INTERLEAVED.includes(n)).map((n) => join(tree, n));
    await run('cp', ['-r', '--preserve=timestamps', ...rest, dir]);
  });
  return image;
}

/** The fields of a FAT boot sector the hostile tests need to patch FAT entries. */
function fatLayout(image: string): { fatOffset: number; fatBytes: number; fats: number; bits: 16 | 32 } {
  const b = readFileRange(image, 0, 512);
  const sector = b.readUInt16LE(11);
  const fat16 = b.readUInt16LE(22);
  return {
    fatOffset: b.readUInt16LE(14) * sector,
    fatBytes: (fat16 || b.readUInt32LE(36)) * sector,
    fats: b[16],
    bits: fat16 ? 16 : 32,
  };
}

/** Writes FAT entry `cluster` = `value` in every FAT copy. */
function setFatEntry(image: string, cluster: number, value: number): void {
  const layout = fatLayout(image);
  const size = layout.bits / 8;
  const bytes = Buffer.alloc(size);
  if (size === 4) bytes.writeUInt32LE(value);
  else bytes.writeUInt16LE(value);
  for (let i = 0; i < layout.fats; i++) patchFile(image, layout.fatOffset + i * layout.fatBytes + cluster * size, bytes);
}

/** A FAT file number is the byte offset of its 8.3 entry: its first cluster and size live there. */
function direntCluster(image: string, ino: bigint): number {
  const entry = readFileRange(image, Number(ino), 32);
  return entry.readUInt16LE(20) * 0x10000 + entry.readUInt16LE(26);
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

async function blkid(image: string): Promise<Record<string, string>> {
  const out = await run('blkid', ['-p', '-o', 'export', image]);
  return Object.fromEntries(out.trim().split('\n').map((line) => line.split('=', 2) as [string, string]));
}

before(async () => {
  buildSampleTree(trees.fat, FAT_TREE);
  buildSampleTree(trees.tiny, TINY_TREE);
  buildSampleTree(trees.exfat, FAT_TREE);
  images.fat32 = await mtoolsImage('fat32.img', '64M', ['-F', '32', '-s', '1', '-n', 'TRESOR32'], trees.fat);
  // Attributes are set through mtools too: read-only + hidden on one file.
  await run('mattrib', ['-i', images.fat32, '+r', '+h', '::/lines.txt']);
  images.fat16 = await mtoolsImage('fat16.img', '16M', ['-F', '16', '-n', 'TRESOR16'], trees.tiny);
  images.fat12 = await mtoolsImage('fat12.img', '4M', ['-F', '12', '-s', '2', '-n', 'TRESOR12'], trees.tiny);
  images.exfat = await exfatImage('exfat.img', trees.exfat);
});

after(async () => {
  for (const dev of devices) await dev.close();
  try {
    await mounts.releaseAll();
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});

describe('FAT reader on images built by mkfs.fat + mcopy', { timeout: 60_000 }, () => {
  it('FAT32: every file, long name and mtime matches; label and serial match blkid', async () => {
    const fs = await openFat(images.fat32);
    assert.equal(fs.type, 'vfat');
    assert.equal(fs.variant, 'FAT32');
    const id = await blkid(images.fat32);
    assert.equal(fs.uuid, id.UUID);
    assert.equal(fs.label, id.LABEL);
    const result = await compareWithHostTree(fs, trees.fat, { ...FAT_COMPARE, mtimeResolutionNs: 2e9 });
    assert.ok(result.entries > 300, `compared ${result.entries} entries`);
    const big = await resolve(fs, 'big');
    assert.equal((await fs.readdir(big)).length, 300);
  });

  it('FAT16 and FAT12: the fixed root directory, 12-bit entries and multi-cluster directories', async () => {
    for (const [image, variant] of [[images.fat16, 'FAT16'], [images.fat12, 'FAT12']] as const) {
      const fs = await openFat(image);
      assert.equal(fs.variant, variant);
      assert.equal(fs.label, (await blkid(image)).LABEL);
      await compareWithHostTree(fs, trees.tiny, { ...FAT_COMPARE, mtimeResolutionNs: 2e9 });
    }
  });

  it('lookups ignore case and accept 8.3 aliases; attributes and times are decoded', async () => {
    const fs = await openFat(images.fat32);
    const hello = await resolve(fs, 'hello.txt');
    assert.equal((await fs.lookup(fs.rootIno, 'HELLO.TXT'))?.ino, hello);
    const alias = (await run('mshortname', ['-i', images.fat32, '::/name with spaces.txt'])).trim().replace('::/', '');
    assert.match(alias, /~1\./, `mtools made the 8.3 alias ${alias}`);
    assert.equal((await fs.lookup(fs.rootIno, alias))?.ino, await resolve(fs, 'name with spaces.txt'));
    assert.equal(await fs.lookup(fs.rootIno, 'no-such-file'), undefined);
    const lines = await fs.stat(await resolve(fs, 'lines.txt'));
    assert.equal((lines.attributes ?? 0) & 0x03, 0x03, 'read-only and hidden');
    assert.equal(lines.mode, undefined, 'FAT has no POSIX mode');
    // mcopy -m stamps the creation time and the access date with the source mtime too.
    assert.equal(lines.mtimeNs, 946684800n * 1_000_000_000n);
    assert.equal(lines.birthtimeNs, lines.mtimeNs);
    assert.equal(lines.atimeNs, lines.mtimeNs);
    assert.deepEqual(await fs.extents(hello), [{ offset: 0, length: 13, hole: false }]);
    await assert.rejects(fs.readlink(hello), /not a symbolic link/);
    await assert.rejects(fs.read(hello, 0, 10, 'stream'), /no data stream/);
  });

  it('is found by the default probes of openVolumes', async () => {
    const volumes = await openVolumes(await open(images.fat16), defaultProbes);
    assert.equal(volumes.length, 1);
    assert.equal(volumes[0].fs?.type, 'vfat', volumes[0].error);
    const exfat = await openVolumes(await open(images.exfat), defaultProbes);
    assert.equal(exfat[0].fs?.type, 'exfat', exfat[0].error);
  });
});

describe('exFAT reader on an image filled through exfat-fuse', { timeout: 60_000 }, () => {
  it('every file matches, contiguous (NoFatChain) and FAT-chained alike; label and serial match blkid', async () => {
    const fs = await openExfat(images.exfat);
    assert.equal(fs.type, 'exfat');
    const id = await blkid(images.exfat);
    assert.equal(fs.uuid, id.UUID);
    assert.equal(fs.label, 'TresorEx');
    await compareWithHostTree(fs, trees.exfat, { ...FAT_COMPARE, mtimeResolutionNs: 1e9 });
    // The stream extension entry follows the file entry: bit 1 of its flags is NoFatChain.
    const flags = async (name: string) => readFileRange(images.exfat, Number(await resolve(fs, name) & ((1n << 60n) - 1n)) + 33, 1)[0];
    assert.equal((await flags('random.bin')) & 2, 2, 'random.bin is contiguous (NoFatChain)');
    for (const name of INTERLEAVED) assert.equal((await flags(name)) & 2, 0, `${name} is FAT-chained`);
  });

  it('lookups ignore case through the volume up-case table', async () => {
    const fs = await openExfat(images.exfat);
    const greek = await resolve(fs, 'Ελληνικά κατάλογος');
    assert.equal((await fs.lookup(fs.rootIno, 'ΕΛΛΗΝΙΚΆ ΚΑΤΆΛΟΓΟΣ'))?.ino, greek);
    assert.equal((await fs.lookup(fs.rootIno, 'HELLO.TXT'))?.ino, await resolve(fs, 'hello.txt'));
    assert.equal(await fs.lookup(fs.rootIno, 'hello.txt.missing'), undefined);
    const hello = await fs.stat(await resolve(fs, 'hello.txt'));
    assert.equal(hello.mtimeNs, 1234567890n * 1_000_000_000n);
  });

  it('timestamps: 10 ms increments and recorded UTC offsets are applied; FAT takes the guest offset as an option', async () => {
    const image = hostileCopy(images.exfat, 'exfat-times.img');
    const clean = await openExfat(images.exfat);
    const hello = await resolve(clean, 'hello.txt');
    const at = Number(hello & ((1n << 60n) - 1n));
    const set = readFileRange(image, at, 32 * (readFileRange(image, at, 2)[1] + 1));
    set[21] = 150; // modified: +1.5 s
    set[23] = 0x80 | 0x7c; // modified: recorded offset of -4 x 15 min (UTC-1h)
    let sum = 0;
    for (let i = 0; i < set.length; i++) if (i !== 2 && i !== 3) sum = ((((sum & 1) << 15) | (sum >>> 1)) + set[i]) & 0xffff;
    set.writeUInt16LE(sum, 2);
    patchFile(image, at, set);
    const fs = await openExfat(image);
    const base = 1234567890n * 1_000_000_000n; // what exfat-fuse stored, as UTC
    assert.equal((await fs.stat(hello)).mtimeNs, base + 1_500_000_000n + 3600n * 1_000_000_000n);

    const fat = await probeFat(await open(images.fat32), { utcOffsetMinutes: 120 });
    assert.ok(fat);
    const lines = await fat.stat(await resolve(fat, 'lines.txt'));
    assert.equal(lines.mtimeNs, (946684800n - 7200n) * 1_000_000_000n, 'a guest clock at UTC+2 wrote 02:00 local');
  });

  it('a damaged main boot region falls back to the backup; both damaged is an error', async () => {
    const image = hostileCopy(images.exfat, 'exfat-boot.img');
    patchFile(image, 200, Buffer.from('garbage'));
    const fs = await openExfat(image);
    assert.equal(fs.label, 'TresorEx');
    patchFile(image, 12 * 512 + 200, Buffer.from('garbage'));
    await assert.rejects(probeExfat(await open(image)), (err: unknown) => err instanceof FsDamageError && /boot regions/.test(err.message));
  });
});

describe('hostile FAT and exFAT images: clear errors, no hang', { timeout: 60_000 }, () => {
  it('a FAT chain that loops back is reported', async () => {
    const image = hostileCopy(images.fat32, 'loop.img');
    const ino = await resolve(await openFat(images.fat32), 'random.bin');
    const first = direntCluster(image, ino);
    setFatEntry(image, first + 3, first + 1);
    const fs = await openFat(image);
    await assert.rejects(fs.read(ino, 0, 2 * 1024 * 1024), (err: unknown) => err instanceof FsDamageError && /loops/.test(err.message));
  });

  it('a directory cluster that points to itself is reported', async () => {
    const image = hostileCopy(images.fat32, 'dirloop.img');
    const big = await resolve(await openFat(images.fat32), 'big');
    const cluster = direntCluster(image, big);
    setFatEntry(image, cluster, cluster);
    const fs = await openFat(image);
    await assert.rejects(fs.readdir(big), (err: unknown) => err instanceof FsDamageError && /loops/.test(err.message));
  });

  it('a directory whose entry points at its own parent cluster is a cycle, reported without hanging', async () => {
    const image = hostileCopy(images.fat32, 'cycle.img');
    const clean = await openFat(images.fat32);
    const deep = await resolve(clean, 'deep');
    const level1 = await resolve(clean, 'deep/level-01');
    // deep/level-01 now starts at deep's own cluster: it contains itself.
    const deepCluster = direntCluster(image, deep);
    const patch = Buffer.alloc(2);
    patch.writeUInt16LE(deepCluster >>> 16);
    patchFile(image, Number(level1) + 20, patch);
    patch.writeUInt16LE(deepCluster & 0xffff);
    patchFile(image, Number(level1) + 26, patch);
    const fs = await openFat(image);
    await assert.rejects(fs.readdir(level1), /directory cycle/);
    const report = await walkFilesystem(fs);
    assert.ok(report.errors.some((e) => e.path === '/deep/level-01' && /cycle/.test(String(e.error))), JSON.stringify(report.errors.map((e) => e.path)));
  });

  it('a size beyond the cluster chain, and clusters outside the data area, are reported', async () => {
    const image = hostileCopy(images.fat16, 'size.img');
    const clean = await openFat(images.fat16);
    const hello = await resolve(clean, 'hello.txt');
    const random = await resolve(clean, 'random.bin');
    const huge = Buffer.alloc(4);
    huge.writeUInt32LE(0xfff00000);
    patchFile(image, Number(hello) + 28, huge);
    patchFile(image, Number(random) + 26, Buffer.from([0xf0, 0xff]));
    const fs = await openFat(image);
    assert.equal((await fs.stat(hello)).size, 0xfff00000);
    await assert.rejects(fs.read(hello, 0, 1 << 20), /cluster chain ends after 1 clusters/);
    await assert.rejects(fs.read(random, 0, 10), /outside the data area/);
  });

  it('random bytes are not FAT; an implausible FAT geometry is damage', async () => {
    const junk = join(work, 'junk.img');
    writeFileSync(junk, randomBytes(1 << 20));
    assert.equal(await probeFat(await open(junk)), undefined);
    assert.equal(await probeExfat(await open(junk)), undefined);
    const image = hostileCopy(images.fat16, 'geometry.img');
    patchFile(image, 14, Buffer.from([0xff, 0xff])); // reserved sectors past the end of the volume
    await assert.rejects(probeFat(await open(image)), FsDamageError);
  });

  it('exFAT: an entry set with a bad checksum is listed and reported on stat; a looping chain is reported', async () => {
    const image = hostileCopy(images.exfat, 'exfat-hostile.img');
    const clean = await openExfat(images.exfat);
    const hello = await resolve(clean, 'hello.txt');
    const helloEntry = Number(hello & ((1n << 60n) - 1n));
    patchFile(image, helloEntry + 8, Buffer.from([0x12, 0x34])); // create time: the set checksum no longer matches
    const chained = await resolve(clean, INTERLEAVED[0]);
    const stream = readFileRange(image, Number(chained & ((1n << 60n) - 1n)) + 32, 32);
    const first = stream.readUInt32LE(20);
    const boot = readFileRange(image, 0, 512);
    const fatOffset = boot.readUInt32LE(80) * 2 ** boot[108];
    const loop = Buffer.alloc(4);
    loop.writeUInt32LE(first);
    patchFile(image, fatOffset + first * 4, loop); // the chain's first cluster points to itself
    const fs = await openExfat(image);
    const listed = (await fs.readdir(fs.rootIno)).find((e) => e.ino === hello);
    assert.ok(listed, 'the damaged entry is still listed');
    await assert.rejects(fs.stat(hello), (err: unknown) => err instanceof FsDamageError && /checksum/.test(err.message));
    await assert.rejects(fs.read(chained, 0, 1 << 20), (err: unknown) => err instanceof FsDamageError && /loops/.test(err.message));
  });
});

describe('FAT and exFAT mutation fuzz (bounded time)', { timeout: 60_000 }, () => {
  it('FAT12, FAT16 and FAT32: every failure is a TresorError', async () => {
    for (const image of [images.fat12, images.fat16, images.fat32]) {
      const { failures } = await fuzzFilesystem({ probe: (dev) => probeFat(dev), device: await open(image), budgetMs: 1000, minRuns: 5 });
      assert.ok(failures > 0, `${image}: some mutations were detected`);
    }
  });

  it('exFAT: every failure is a TresorError', async () => {
    const { failures } = await fuzzFilesystem({ probe: (dev) => probeExfat(dev), device: await open(images.exfat), budgetMs: 3000, minRuns: 5 });
    assert.ok(failures > 0, 'some mutations were detected');
  });
});

