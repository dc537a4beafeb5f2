/**
 * ext2/3/4 reader against images built by the real tools (mke2fs -d, e2fsck -D, tune2fs,
 * debugfs): every file's bytes and metadata are compared with the tree the image was built from;
 * hostile images (crafted with debugfs or byte patches) must give clear errors without hanging;
 * a bounded mutation fuzz checks that every failure is a TresorError.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { FsDamageError, FsUnsupportedError } from '../src/fs/errors.ts';
import { ExtFilesystem, probeExt } from '../src/fs/ext4.ts';
import type { Filesystem } from '../src/fs/filesystem.ts';
import { TresorError } from '../src/util/errors.ts';
import { memoryDevice, openFileDevice, recordingDevice } from './helpers/block-devices.ts';
import type { FileDevice } from './helpers/block-devices.ts';
import { compareWithHostTree, summarizeFilesystem, walkFilesystem } from './helpers/fs-compare.ts';
import { bigDirEntryName, buildSampleTree } from './helpers/sample-tree.ts';
import { patchFile, readFileRange, run, runWithStderr } from './helpers/tools.ts';

const work = mkdtempSync(join(tmpdir(), 'tresor-ext4-'));
const devices: FileDevice[] = [];

async function mount(path: string): Promise<Filesystem> {
  const dev = await openFileDevice(path);
  devices.push(dev);
  const fs = await probeExt(dev);
  assert.ok(fs, `${path}: probeExt found no ext filesystem`);
  return fs;
}

/** mke2fs -d, then e2fsck -D so that multi-block directories get an htree index. */
async function buildImage(name: string, tree: string, mkfs: string[], size: string, tune: string[] = []): Promise<string> {
  const image = join(work, name);
  await run('mke2fs', ['-q', '-F', ...mkfs, '-E', 'root_owner=0:0', '-d', tree, image, size]);
  if (tune.length > 0) await run('tune2fs', [...tune, image]);
  await run('e2fsck', ['-fyD', image], { okCodes: [1] });
  await run('e2fsck', ['-fn', image]);
  return image;
}

/** debugfs exits 0 even when its command fails: treat anything but its banner on stderr as failure. */
async function debugfs(image: string, command: string, write = false, ignore?: RegExp): Promise<string> {
  const { stdout, stderr } = await runWithStderr('debugfs', [...(write ? ['-w'] : []), '-R', command, image]);
  const complaints = stderr.split('\n')
    .filter((line) => line.trim() !== '' && !/^debugfs \d/.test(line) && !(ignore && ignore.test(line)));
  if (complaints.length > 0) throw new Error(`debugfs -R "${command}" ${image}: ${complaints.join('; ')}`);
  return stdout;
}

/** htree_dump on a filesystem without metadata_csum complains about the missing checksum tail. */
const NO_CSUM_COMPLAINT = /does not have space for checksum/;

/** Runs several debugfs commands in one open (needed for journal_open/write/close sequences). */
async function debugfsScript(image: string, commands: string[]): Promise<string> {
  const script = join(work, `debugfs-${Date.now()}-${Math.random().toString(36).slice(2)}.cmd`);
  writeFileSync(script, `${commands.join('\n')}\n`);
  const { stdout, stderr } = await runWithStderr('debugfs', ['-w', '-f', script, image]);
  const complaints = stderr.split('\n').filter((line) => line.trim() !== '' && !/^debugfs \d/.test(line));
  if (complaints.length > 0) throw new Error(`debugfs -f (${commands.join('; ')}) ${image}: ${complaints.join('; ')}`);
  return stdout;
}

async function inodeLocation(image: string, path: string): Promise<number> {
  const out = await debugfs(image, `imap ${path}`);
  const m = /located at block (\d+), offset 0x([0-9a-f]+)/.exec(out);
  assert.ok(m, `imap output: ${out}`);
  const blockSize = Number(/Block size:\s+(\d+)/.exec(await run('dumpe2fs', ['-h', image]))?.[1]);
  return Number(m[1]) * blockSize + parseInt(m[2], 16);
}

const trees = {
  full: join(work, 'tree-full'),
  small: join(work, 'tree-small'),
  smallNoTail: join(work, 'tree-small-no-tail'),
  tiny: join(work, 'tree-tiny'),
};
const images: Record<string, string> = {};

before(async () => {
  buildSampleTree(trees.full);
  buildSampleTree(trees.small, { bigDirEntries: 1500 });
  buildSampleTree(trees.smallNoTail, { bigDirEntries: 1500, trailingHole: false });
  buildSampleTree(trees.tiny, { bigDirEntries: 120, randomFileBytes: 64 * 1024, sparse: false, trailingHole: false });
  writeFileSync(join(trees.tiny, 'zz.zz.etc.x'), 'escape attempt\n');
  // The images are independent: build them two at a time (mke2fs -d is single-threaded).
  const jobs: Array<() => Promise<void>> = [
    async () => {
      images.ext4 = await buildImage('ext4-csum.img', trees.full,
        ['-t', 'ext4', '-O', 'metadata_csum,64bit', '-b', '1024', '-N', '16384', '-L', 'tresor-e4'], '96M');
    },
    async () => {
      images.inline = await buildImage('ext4-inline.img', trees.smallNoTail, ['-t', 'ext4', '-O', 'inline_data,metadata_csum,64bit', '-b', '4096'], '96M');
      images.ext3 = await buildImage('ext3.img', trees.small, ['-t', 'ext3', '-b', '1024'], '96M', ['-E', 'hash_alg=tea']);
      images.ext2 = await buildImage('ext2.img', trees.small,
        ['-t', 'ext2', '-b', '1024', '-I', '128', '-O', 'meta_bg,^resize_inode', '-g', '1024'], '96M', ['-E', 'hash_alg=legacy']);
      images.bigalloc = await buildImage('ext4-bigalloc.img', trees.smallNoTail,
        ['-t', 'ext4', '-b', '1024', '-O', 'bigalloc,inline_data', '-C', '16384'], '128M');
      images.hostile = await buildImage('hostile-base.img', trees.tiny, ['-t', 'ext4', '-O', 'metadata_csum,64bit', '-b', '4096'], '16M');
      images.plain = await buildImage('plain.img', trees.tiny, ['-t', 'ext4', '-O', '^metadata_csum', '-b', '1024'], '8M');
      images.fuzzExt3 = await buildImage('fuzz-ext3.img', trees.tiny, ['-t', 'ext3', '-b', '1024'], '8M');
    },
  ];
  await Promise.all(jobs.map((job) => job()));
});

after(async () => {
  for (const dev of devices) await dev.close();
  rmSync(work, { recursive: true, force: true });
});

const compareOptions = { mtimeResolutionNs: 1e9, extraRootNames: ['lost+found'] };

describe('ext4 reader on images built by mke2fs -d', { timeout: 120_000 }, () => {
  it('ext4 with metadata_csum, 64bit, 1 KiB blocks and a two-level htree: every file matches', async () => {
    const dump = await debugfs(images.ext4, 'htree_dump /big');
    assert.match(dump, /Indirect levels: 1/, 'big/ has a two-level hashed index');
    const fs = await mount(images.ext4);
    assert.equal(fs.type, 'ext4');
    assert.equal(fs.label, 'tresor-e4');
    const uuid = /Filesystem UUID:\s+(\S+)/.exec(await run('dumpe2fs', ['-h', images.ext4]))?.[1];
    assert.equal(fs.uuid, uuid);
    const result = await compareWithHostTree(fs, trees.full, compareOptions);
    assert.ok(result.entries > 10_000, `compared ${result.entries} entries`);
    const big = await fs.lookup(fs.rootIno, 'big');
    assert.ok(big);
    assert.equal((await fs.readdir(big.ino)).length, 10_000);
    assert.equal(await fs.lookup(big.ino, 'entry-99999'), undefined, 'absent name in an htree directory');
    assert.equal((await fs.lookup(big.ino, '..'))?.ino, fs.rootIno);
  });

  it('ext4 with 4 KiB blocks and inline_data (inline files, directories and symlinks)', async () => {
    const hello = await debugfs(images.inline, 'stat /hello.txt');
    assert.match(hello, /Flags: 0x10000000/, 'small files are stored inline');
    assert.match(await debugfs(images.inline, 'stat /sub'), /Flags: 0x10000000/, 'small directories are inline');
    const fs = await mount(images.inline);
    await compareWithHostTree(fs, trees.smallNoTail, compareOptions);
    const sub = await fs.lookup(fs.rootIno, 'sub');
    assert.ok(sub);
    assert.equal((await fs.lookup(sub.ino, '..'))?.ino, fs.rootIno, '.. of an inline directory');
  });

  it('ext3: indirect blocks up to triple-indirect, TEA-hashed htree', async () => {
    assert.match(await debugfs(images.ext3, 'stat /sparse-far.bin'), /\(TIND\)/, 'sparse-far.bin uses a triple-indirect block');
    assert.match(await debugfs(images.ext3, 'htree_dump /big', false, NO_CSUM_COMPLAINT), /Hash Version: 2/, 'TEA hash');
    const fs = await mount(images.ext3);
    assert.equal(fs.type, 'ext3');
    await compareWithHostTree(fs, trees.small, compareOptions);
    const far = await fs.lookup(fs.rootIno, 'sparse-far.bin');
    assert.ok(far);
    const extents = await fs.extents(far.ino);
    assert.deepEqual(extents.filter((e) => !e.hole).map((e) => e.offset), [66 * 1024 * 1024]);
  });

  it('ext2 with 128-byte inodes, the legacy hash and meta_bg (96 groups in 3 meta groups)', async () => {
    assert.match(await debugfs(images.ext2, 'htree_dump /big', false, NO_CSUM_COMPLAINT), /Hash Version: 0/, 'legacy hash');
    assert.match(await run('dumpe2fs', ['-h', images.ext2]), /meta_bg/);
    const fs = await mount(images.ext2);
    assert.equal(fs.type, 'ext2');
    await compareWithHostTree(fs, trees.small, compareOptions);
    const st = await fs.stat(fs.rootIno);
    assert.equal(st.birthtimeNs, undefined, '128-byte inodes have no creation time');
  });

  it('ext4 bigalloc with 1 KiB blocks (first data block 0, clusters of 16 blocks)', async () => {
    assert.match(await run('dumpe2fs', ['-h', images.bigalloc]), /First block:\s+0/);
    const fs = await mount(images.bigalloc);
    await compareWithHostTree(fs, trees.smallNoTail, compareOptions);
  });

  it('nanosecond timestamps and the epoch extension bits of the extra fields', async () => {
    const image = join(work, 'ns.img');
    copyFileSync(images.hostile, image);
    // mtime_extra: 2 epoch bits (1 => +2^32 s) and 30 bits of nanoseconds.
    await debugfs(image, `sif /hello.txt mtime_extra ${(123456789 * 4 + 1) >>> 0}`, true);
    await debugfs(image, 'sif /hello.txt crtime 1000', true);
    await debugfs(image, `sif /hello.txt crtime_extra ${999 * 4}`, true);
    const fs = await mount(image);
    const hello = await fs.lookup(fs.rootIno, 'hello.txt');
    assert.ok(hello);
    const st = await fs.stat(hello.ino);
    assert.equal(st.mtimeNs, (1234567890n + 2n ** 32n) * 1_000_000_000n + 123456789n);
    assert.equal(st.birthtimeNs, 1000n * 1_000_000_000n + 999n);
  });

  it('reads lazily: one file out of the big image touches a small part of it', async () => {
    const dev = await openFileDevice(images.ext4);
    devices.push(dev);
    const recorder = recordingDevice(dev);
    const fs = await probeExt(recorder);
    assert.ok(fs);
    const big = await fs.lookup(fs.rootIno, 'big');
    assert.ok(big);
    const entry = await fs.lookup(big.ino, bigDirEntryName(5000));
    assert.ok(entry, 'htree lookup of one name');
    const random = await fs.lookup(fs.rootIno, 'random.bin');
    assert.ok(random);
    await fs.read(random.ino, 0, 2 * 1024 * 1024);
    assert.ok(recorder.bytesRead < 4 * 1024 * 1024, `read ${recorder.bytesRead} bytes of a ${dev.size}-byte image`);
  });
});

describe('journal replay of crash-consistent images', { timeout: 60_000 }, () => {
  const BLOCK = 4096;

  function changedBlocks(a: Buffer, b: Buffer): number[] {
    const changed: number[] = [];
    for (let i = 0; i * BLOCK < a.length; i++) {
      if (!a.subarray(i * BLOCK, (i + 1) * BLOCK).equals(b.subarray(i * BLOCK, (i + 1) * BLOCK))) changed.push(i);
    }
    return changed;
  }

  it('replays plain and v3-checksummed journals as e2fsprogs does, honours revokes, ignores torn transactions', async () => {
    // The "newest state": a copy changed by debugfs. Its changed blocks go into the base image's
    // journal only, as a guest would leave them when the snapshot is taken before checkpointing.
    const base = join(work, 'journal-base.img');
    const modified = join(work, 'journal-modified.img');
    copyFileSync(images.hostile, base);
    copyFileSync(images.hostile, modified);
    writeFileSync(join(work, 'new-file'), 'brand new file\n');
    await debugfsScript(modified, ['sif /hello.txt mode 0100600', `write ${join(work, 'new-file')} new.txt`,
      'unlink /sub/file.txt', 'mkdir /new-dir']);
    const changed = changedBlocks(readFileSync(base), readFileSync(modified));
    assert.ok(changed.length >= 4, `debugfs changed ${changed.length} blocks`);
    const modifiedBytes = readFileSync(modified);
    writeFileSync(join(work, 'changed-blocks'), Buffer.concat(changed.map((b) => modifiedBytes.subarray(b * BLOCK, (b + 1) * BLOCK))));
    writeFileSync(join(work, 'garbage'), randomBytes(BLOCK));
    const linesBlock = Number((await debugfs(base, 'blocks /lines.txt')).trim().split(/\s+/)[0]);
    const linesText = readFileSync(join(trees.tiny, 'lines.txt'));

    for (const checksums of [false, true]) {
      const image = join(work, `journal-${checksums ? 'v3' : 'plain'}.img`);
      copyFileSync(base, image);
      await debugfsScript(image, [
        checksums ? 'jo -c' : 'jo', `jw -b ${changed.join(',')} ${join(work, 'changed-blocks')}`, 'jc',
        'jo', `jw -b ${linesBlock} ${join(work, 'garbage')}`, 'jc',
        'jo', `jw -r ${linesBlock}`, 'jc',
      ]);
      assert.match(await run('dumpe2fs', ['-h', image]), /needs_recovery/);
      const replayedByE2fsprogs = join(work, `journal-${checksums ? 'v3' : 'plain'}-replayed.img`);
      copyFileSync(image, replayedByE2fsprogs);
      await debugfs(replayedByE2fsprogs, 'jr', true);

      const fs = await mount(image) as ExtFilesystem;
      assert.equal(fs.needsRecovery, true);
      assert.ok(fs.journalBlocks >= changed.length, `${fs.journalBlocks} blocks from the journal`);
      assert.deepEqual(fs.warnings, []);
      const reference = await mount(replayedByE2fsprogs) as ExtFilesystem;
      assert.equal(reference.needsRecovery, false);
      assert.deepEqual(await summarizeFilesystem(fs), await summarizeFilesystem(reference));

      const hello = await fs.lookup(fs.rootIno, 'hello.txt');
      assert.equal((await fs.stat(hello!.ino)).mode, 0o600);
      const created = await fs.lookup(fs.rootIno, 'new.txt');
      assert.equal((await fs.read(created!.ino, 0, 100)).toString(), 'brand new file\n');
      const sub = await fs.lookup(fs.rootIno, 'sub');
      assert.equal(await fs.lookup(sub!.ino, 'file.txt'), undefined);
      const lines = await fs.lookup(fs.rootIno, 'lines.txt');
      assert.deepEqual(await fs.read(lines!.ino, 0, linesText.length), linesText, 'the revoked garbage block is not applied');
    }

    // Tear the last transaction (the revoke): its commit block no longer has the magic, so the
    // garbage written by the transaction before it now wins, for e2fsprogs and for us.
    const torn = join(work, 'journal-torn.img');
    copyFileSync(join(work, 'journal-v3.img'), torn);
    const commits = [...(await debugfs(torn, 'logdump')).matchAll(/type 2 \(commit block\) at block (\d+)/g)].map((m) => Number(m[1]));
    assert.equal(commits.length, 3);
    const physical = Number((await debugfs(torn, `bmap <8> ${commits[2]}`)).trim());
    patchFile(torn, physical * BLOCK, Buffer.alloc(4));
    const tornReplayed = join(work, 'journal-torn-replayed.img');
    copyFileSync(torn, tornReplayed);
    await debugfs(tornReplayed, 'jr', true);
    const fs = await mount(torn);
    assert.deepEqual(await summarizeFilesystem(fs), await summarizeFilesystem(await mount(tornReplayed)));
    const lines = await fs.lookup(fs.rootIno, 'lines.txt');
    assert.deepEqual(await fs.read(lines!.ino, 0, BLOCK), readFileSync(join(work, 'garbage')));
  });
});

describe('ext4 reader on hostile images', { timeout: 60_000 }, () => {
  async function hostileCopy(name: string): Promise<string> {
    const image = join(work, name);
    copyFileSync(images.hostile, image);
    return image;
  }

  it('a directory that contains itself: reported as a cycle by the walker, no hang', async () => {
    const image = await hostileCopy('self.img');
    await debugfs(image, 'link /sub /sub/self', true);
    const fs = await mount(image);
    const sub = await fs.lookup(fs.rootIno, 'sub');
    assert.ok(sub);
    assert.equal((await fs.lookup(sub.ino, 'self'))?.ino, sub.ino);
    const report = await walkFilesystem(fs);
    assert.ok(report.errors.some((e) => e.path === '/sub/self' && /cycle/.test(String(e.error))), 'cycle reported');
    assert.ok(report.entries > 100, 'the rest of the tree is still walked');
  });

  it('an extent that overlaps the inode table, and one past the end of the device', async () => {
    const image = await hostileCopy('extents.img');
    const dump = await run('dumpe2fs', [image]);
    const inodeTable = Number(/Inode table at (\d+)-/.exec(dump)?.[1]);
    const blockCount = Number(/Block count:\s+(\d+)/.exec(dump)?.[1]);
    // i_block words 3-5 are the first extent of the root node: logical, length|start_hi, start_lo.
    await debugfs(image, `sif /hello.txt block[5] ${inodeTable + 2}`, true);
    await debugfs(image, `sif /lines.txt block[5] ${blockCount + 10}`, true);
    const fs = await mount(image);
    const hello = await fs.lookup(fs.rootIno, 'hello.txt');
    const lines = await fs.lookup(fs.rootIno, 'lines.txt');
    assert.ok(hello && lines);
    await assert.rejects(fs.read(hello.ino, 0, 100), (err: unknown) => err instanceof FsDamageError && /overlaps filesystem metadata/.test(err.message));
    await assert.rejects(fs.extents(lines.ino), (err: unknown) => err instanceof FsDamageError && /outside the filesystem/.test(err.message));
    const report = await walkFilesystem(fs);
    assert.deepEqual(report.errors.map((e) => e.path).sort(), ['/hello.txt', '/lines.txt']);
  });

  it('an unwritten (uninitialised) extent reads as zeros and is a hole in extents()', async () => {
    const image = await hostileCopy('unwritten.img');
    // i_block word 4 = ee_len | ee_start_hi << 16; ee_len > 32768 marks the extent unwritten.
    await debugfs(image, `sif /random.bin block[4] ${32768 + 16}`, true);
    const fs = await mount(image);
    const random = await fs.lookup(fs.rootIno, 'random.bin');
    assert.ok(random);
    assert.deepEqual(await fs.extents(random.ino), [{ offset: 0, length: 64 * 1024, hole: true }]);
    assert.ok((await fs.read(random.ino, 0, 64 * 1024)).every((b) => b === 0));
  });

  it('a name "../../etc/x" is returned verbatim (the reader does not interpret names)', async () => {
    const image = join(work, 'dotdot.img');
    copyFileSync(images.plain, image);
    const bytes = readFileSync(image);
    let at = bytes.indexOf('zz.zz.etc.x');
    assert.ok(at > 0, 'marker name found in the image');
    while (at >= 0) {
      patchFile(image, at, Buffer.from('../../etc/x'));
      at = bytes.indexOf('zz.zz.etc.x', at + 1);
    }
    const fs = await mount(image);
    const names = (await fs.readdir(fs.rootIno)).map((e) => e.name);
    assert.ok(names.includes('../../etc/x'));
    const entry = await fs.lookup(fs.rootIno, '../../etc/x');
    assert.ok(entry);
    assert.equal((await fs.read(entry.ino, 0, 100)).toString(), 'escape attempt\n');
  });

  it('absurd and huge claimed file sizes', async () => {
    const image = await hostileCopy('sizes.img');
    await debugfs(image, 'sif /hello.txt size_hi 0xffffffff', true);
    await debugfs(image, 'sif /lines.txt size_hi 0x100', true);
    const fs = await mount(image);
    const hello = await fs.lookup(fs.rootIno, 'hello.txt');
    const lines = await fs.lookup(fs.rootIno, 'lines.txt');
    assert.ok(hello && lines);
    await assert.rejects(fs.stat(hello.ino), (err: unknown) => err instanceof FsDamageError && /absurd/.test(err.message));
    const st = await fs.stat(lines.ino);
    assert.equal(st.size, 0x100 * 2 ** 32 + statSync(join(trees.tiny, 'lines.txt')).size);
    const started = Date.now();
    const extents = await fs.extents(lines.ino);
    assert.equal(extents[extents.length - 1].hole, true);
    assert.equal(extents[extents.length - 1].offset + extents[extents.length - 1].length, st.size);
    const tail = await fs.read(lines.ino, st.size - 100, 1000);
    assert.equal(tail.length, 100);
    assert.ok(tail.every((b) => b === 0));
    assert.ok(Date.now() - started < 2000, 'a 1 TiB sparse file is mapped without walking it');
  });

  it('checksum mismatches in an inode and a directory block are FsDamageErrors for that structure', async () => {
    const image = await hostileCopy('csum.img');
    const inodeAt = await inodeLocation(image, '/hello.txt');
    const atime = readFileRange(image, inodeAt + 8, 1);
    patchFile(image, inodeAt + 8, Buffer.from([atime[0] ^ 0xff]));
    const subBlocks = (await debugfs(image, 'blocks /big')).trim().split(/\s+/).map(Number);
    const dirBlock = readFileRange(image, subBlocks[0] * 4096, 4096);
    const nameAt = dirBlock.indexOf('entry-');
    patchFile(image, subBlocks[0] * 4096 + nameAt, Buffer.from('X'));
    const fs = await mount(image);
    const hello = await fs.lookup(fs.rootIno, 'hello.txt');
    const big = await fs.lookup(fs.rootIno, 'big');
    assert.ok(hello && big);
    await assert.rejects(fs.stat(hello.ino), (err: unknown) => err instanceof FsDamageError && err.structure === 'inode'
      && /checksum mismatch/.test(err.message) && err.ino === hello.ino);
    await assert.rejects(fs.readdir(big.ino), (err: unknown) => err instanceof FsDamageError && /checksum mismatch/.test(err.message));
  });

  it('an unknown INCOMPAT feature is refused with a clear error', async () => {
    const image = await hostileCopy('feature.img');
    const features = readFileRange(image, 1024 + 0x60, 4).readUInt32LE(0);
    await debugfs(image, `ssv feature_incompat ${(0x8000000 | features) >>> 0}`, true);
    const dev = await openFileDevice(image);
    devices.push(dev);
    await assert.rejects(probeExt(dev), (err: unknown) => err instanceof FsUnsupportedError && /incompatible feature/.test(err.message));
  });

  it('a superblock that is not ext is not claimed', async () => {
    assert.equal(await probeExt(memoryDevice(Buffer.alloc(1024 * 1024))), undefined);
  });
});

describe('ext4 reader mutation fuzz', { timeout: 60_000 }, () => {
  /**
   * Mutates bytes the reader actually parsed in a clean walk (metadata, not file contents) and
   * walks the whole tree again. Every failure must be a TresorError; every walk must end. At
   * least `minRuns` mutations, more while `budgetMs` lasts (helpers/fs-fuzz.ts FuzzOptions.minRuns).
   */
  async function fuzz(image: string, budgetMs: number, minRuns: number): Promise<{ runs: number; failures: number }> {
    const pristine = readFileSync(image);
    const recorder = recordingDevice(memoryDevice(pristine));
    const cleanFs = await probeExt(recorder);
    assert.ok(cleanFs);
    const clean = await walkFilesystem(cleanFs, { maxBytesPerFile: 4096 });
    assert.deepEqual(clean.errors, [], 'the unmutated image walks cleanly');
    const targets = recorder.reads.filter((r) => r.length <= 65536);
    let seed = 12345;
    const random = (n: number) => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    const deadline = Date.now() + budgetMs;
    let runs = 0;
    let failures = 0;
    while (runs < minRuns || Date.now() < deadline) {
      const data = Buffer.from(pristine);
      const mutations: string[] = [];
      for (let i = 0, n = 1 + random(8); i < n; i++) {
        const target = targets[random(targets.length)];
        const at = target.offset + random(target.length);
        const value = random(4) === 0 ? [0, 0xff, 0x80, 1][random(4)] : random(256);
        data[at] = value;
        mutations.push(`${at}=${value}`);
      }
      runs++;
      const outcome = await Promise.race([
        (async () => {
          try {
            const fs = await probeExt(memoryDevice(data));
            if (!fs) return [];
            return (await walkFilesystem(fs, { maxBytesPerFile: 65536, maxEntries: 5000 })).errors.map((e) => e.error);
          } catch (err) {
            return [err];
          }
        })(),
        new Promise<'hang'>((resolve) => setTimeout(() => resolve('hang'), 5000).unref()),
      ]);
      assert.notEqual(outcome, 'hang', `walk did not finish after mutations ${mutations.join(' ')}`);
      for (const err of outcome as unknown[]) {
        if (!(err instanceof TresorError) && !String(err).includes('reached twice (cycle)')) {
          assert.fail(`mutations ${mutations.join(' ')} raised a non-Tresor error: ${(err as Error)?.stack ?? err}`);
        }
      }
      if ((outcome as unknown[]).length > 0) failures++;
    }
    return { runs, failures };
  }

  it('ext4 without metadata checksums (the parser sees the garbage)', async () => {
    const { failures } = await fuzz(images.plain, 1500, 10);
    assert.ok(failures > 0, 'some mutations were detected');
  });

  it('ext3 with indirect blocks', async () => {
    await fuzz(images.fuzzExt3, 1000, 5);
  });

  it('ext4 with metadata_csum', async () => {
    await fuzz(images.hostile, 500, 2);
  });
});
