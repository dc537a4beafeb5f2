/**
 * Partition tables (sgdisk/sfdisk), LVM2 (pvcreate/vgcreate/lvcreate on loop devices) and the
 * volume discovery that ties them to the filesystem probes. Reference values come from the tools
 * themselves (`sfdisk --json`, `lvs`, `pvs`); hostile variants are byte patches of real tables.
 *
 * LVM without device-mapper: this container has no dm driver, so LVs are created with
 * `--driverloaded n -an -Zn` (metadata only, no activation). The filesystem images are then written
 * where `lvs`/`pvs` say the LV's extents are; for striped LVs the test applies the dm-stripe
 * layout (chunk k on stripe k mod n) itself.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cachedDevice } from '../src/fs/block-cache.ts';
import { FsDamageError } from '../src/fs/errors.ts';
import { probeExt } from '../src/fs/ext4.ts';
import type { BlockDevice } from '../src/fs/filesystem.ts';
import { listLogicalVolumes, parseLvmText } from '../src/fs/lvm.ts';
import { readPartitionTable, subDevice } from '../src/fs/partitions.ts';
import { openVolumes } from '../src/fs/probe.ts';
import { defaultProbes } from '../src/fs/registry.ts';
import { TresorError } from '../src/util/errors.ts';
import { memoryDevice, openFileDevice, recordingDevice } from './helpers/block-devices.ts';
import type { FileDevice } from './helpers/block-devices.ts';
import { compareWithHostTree } from './helpers/fs-compare.ts';
import { buildSampleTree } from './helpers/sample-tree.ts';
import { patchFile, readFileRange, run } from './helpers/tools.ts';

const MiB = 1024 * 1024;
const work = mkdtempSync(join(tmpdir(), 'tresor-parts-'));
const devices: FileDevice[] = [];
const loops: string[] = [];
const tree = join(work, 'tree');
const compareOptions = { mtimeResolutionNs: 1e9, extraRootNames: ['lost+found'] };
let ext4Image = '';
let ext2Image = '';

async function open(path: string): Promise<FileDevice> {
  const dev = await openFileDevice(path);
  devices.push(dev);
  return dev;
}

async function blankDisk(name: string, size: number): Promise<string> {
  const path = join(work, name);
  await run('truncate', ['-s', String(size), path]);
  return path;
}

/** Copies a filesystem image into a disk image at `offset` (like `dd conv=notrunc`). */
function writeImageAt(image: string, disk: string, offset: number): void {
  writeMapped(image, disk, (at) => ({ diskOffset: offset + at, length: Infinity }));
}

/** Copies `image` into `disk` through a mapping from image offsets to disk offsets. */
function writeMapped(image: string, disk: string, map: (at: number) => { diskOffset: number; length: number }): void {
  const src = openSync(image, 'r');
  const dst = openSync(disk, 'r+');
  try {
    const buf = Buffer.alloc(MiB);
    for (let at = 0; ; ) {
      const { diskOffset, length } = map(at);
      const n = readSync(src, buf, 0, Math.min(buf.length, length), at);
      if (n === 0) break;
      if (buf.subarray(0, n).some((b) => b !== 0)) writeSync(dst, buf, 0, n, diskOffset);
      at += n;
    }
  } finally {
    closeSync(src);
    closeSync(dst);
  }
}

interface SfdiskPartition {
  node: string;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  attrs?: string;
  bootable?: boolean;
}

async function sfdiskJson(path: string): Promise<{ sectorsize: number; partitions: SfdiskPartition[] }> {
  return JSON.parse(await run('sfdisk', ['--json', path])).partitiontable;
}

function partitionNumber(node: string): number {
  return Number(/(\d+)$/.exec(node)?.[1]);
}

before(async () => {
  buildSampleTree(tree, { bigDirEntries: 300, randomFileBytes: 256 * 1024, trailingHole: false });
  ext4Image = join(work, 'fs-ext4.img');
  ext2Image = join(work, 'fs-ext2.img');
  await run('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'in-partition', '-E', 'root_owner=0:0', '-d', tree, ext4Image, '14M']);
  await run('mke2fs', ['-q', '-F', '-t', 'ext2', '-L', 'second', '-E', 'root_owner=0:0', '-d', tree, ext2Image, '14M']);
});

after(async () => {
  for (const dev of devices) await dev.close();
  for (const loop of loops) await run('losetup', ['-d', loop]).catch(() => undefined);
  rmSync(work, { recursive: true, force: true });
});

describe('partition tables', { timeout: 60_000 }, () => {
  it('GPT from sgdisk: entries match sfdisk --json, filesystems found in partitions 1 and 5', async () => {
    const disk = await blankDisk('gpt.img', 64 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+16M', '-t', '1:8300', '-c', '1:linux data', '-A', '1:set:2',
      '-n', '2:0:+8M', '-t', '2:ef00', '-c', '2:EFI system', '-n', '5:0:+16M', '-t', '5:8300', '-c', '5:über-name', disk]);
    const reference = await sfdiskJson(disk);
    writeImageAt(ext4Image, disk, reference.partitions[0].start * 512);
    writeImageAt(ext2Image, disk, reference.partitions[2].start * 512);
    const dev = await open(disk);
    const table = await readPartitionTable(dev);
    assert.equal(table.scheme, 'gpt');
    assert.deepEqual(table.warnings, []);
    assert.deepEqual(table.partitions.map((p) => ({
      index: p.index, start: p.offset / 512, size: p.size / 512, type: p.typeId, uuid: p.uuid, name: p.name, bootable: p.bootable,
    })), reference.partitions.map((p) => ({
      index: partitionNumber(p.node), start: p.start, size: p.size, type: p.type.toLowerCase(), uuid: p.uuid?.toLowerCase(),
      name: p.name, bootable: p.attrs === 'LegacyBIOSBootable',
    })));
    const volumes = await openVolumes(dev, defaultProbes);
    assert.deepEqual(volumes.map((v) => [v.part, v.fs?.type, v.fs?.label, v.error]), [
      ['1', 'ext4', 'in-partition', undefined],
      ['2', undefined, undefined, undefined],
      ['5', 'ext2', 'second', undefined],
    ]);
    await compareWithHostTree(volumes[0].fs!, tree, compareOptions);
  });

  it('MBR from sfdisk with an extended partition holding logical partitions 5-7', async () => {
    const disk = await blankDisk('mbr.img', 64 * MiB);
    const script = [
      'label: dos',
      'mbr.img1 : start=2048, size=16M, type=83, bootable',
      'mbr.img2 : start=34816, size=40M, type=5',
      'mbr.img5 : size=16M, type=83',
      'mbr.img6 : size=8M, type=8e',
      'mbr.img7 : size=4M, type=7',
      'mbr.img3 : start=116736, type=c',
    ].join('\n');
    await run('sh', ['-c', `printf '%s\\n' "$1" | sfdisk -q "$2"`, 'sh', script, disk]);
    const reference = await sfdiskJson(disk);
    const logical5 = reference.partitions.find((p) => p.node.endsWith('5')) as SfdiskPartition;
    writeImageAt(ext4Image, disk, logical5.start * 512);
    const dev = await open(disk);
    const table = await readPartitionTable(dev);
    assert.equal(table.scheme, 'mbr');
    assert.deepEqual(table.warnings, []);
    const expected = reference.partitions
      .filter((p) => !['5', 'f', '85'].includes(p.type))
      .map((p) => ({ index: partitionNumber(p.node), start: p.start, size: p.size, type: p.type.padStart(2, '0'), bootable: p.bootable === true }))
      .sort((a, b) => a.index - b.index);
    assert.deepEqual(table.partitions.map((p) => ({ index: p.index, start: p.offset / 512, size: p.size / 512, type: p.typeId, bootable: p.bootable })), expected);
    const volumes = await openVolumes(dev, defaultProbes);
    const five = volumes.find((v) => v.part === '5');
    assert.equal(five?.fs?.label, 'in-partition');
    await compareWithHostTree(five!.fs!, tree, compareOptions);
  });

  it('GPT on a 4096-byte-sector disk (sgdisk on a 4Kn loop device)', async () => {
    const disk = await blankDisk('gpt4k.img', 64 * MiB);
    const loop = (await run('losetup', ['-f', '--show', '-b', '4096', disk])).trim();
    loops.push(loop);
    await run('sgdisk', ['-o', '-n', '1:0:+16M', '-t', '1:8300', '-n', '2:0:+16M', '-t', '2:8e00', loop]);
    const reference = await sfdiskJson(loop);
    assert.equal(reference.sectorsize, 4096);
    await run('losetup', ['-d', loop]);
    loops.pop();
    writeImageAt(ext4Image, disk, reference.partitions[0].start * 4096);
    const dev = await open(disk);
    const table = await readPartitionTable(dev);
    assert.equal(table.sectorSize, 4096);
    assert.deepEqual(table.partitions.map((p) => [p.index, p.offset, p.size]),
      reference.partitions.map((p) => [partitionNumber(p.node), p.start * 4096, p.size * 4096]));
    const volumes = await openVolumes(dev, defaultProbes);
    assert.equal(volumes[0].fs?.label, 'in-partition');
  });

  it('GPT with a damaged primary header or entry array falls back to the backup; both damaged is an error', async () => {
    const disk = await blankDisk('gpt-damaged.img', 32 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+8M', '-t', '1:8300', '-n', '2:0:+8M', disk]);
    const expected = (await readPartitionTable(await open(disk))).partitions;
    const flip = (offset: number) => patchFile(disk, offset, Buffer.from([readFileRange(disk, offset, 1)[0] ^ 0x55]));

    flip(512 + 40); // first usable LBA: header CRC32 now wrong
    let table = await readPartitionTable(await open(disk));
    assert.deepEqual(table.partitions, expected);
    assert.match(table.warnings.join(), /primary GPT is damaged \(header CRC32 mismatch.*backup GPT/);
    flip(512 + 40);

    flip(1024 + 200); // inside the primary entry array
    table = await readPartitionTable(await open(disk));
    assert.deepEqual(table.partitions, expected);
    assert.match(table.warnings.join(), /partition entry array CRC32 mismatch/);

    flip(32 * MiB - 512 + 16); // backup header CRC
    const dev = await open(disk);
    await assert.rejects(readPartitionTable(dev), (err: unknown) => err instanceof FsDamageError && /both GPT copies are damaged/.test(err.message));
    const volumes = await openVolumes(dev, defaultProbes);
    assert.equal(volumes.length, 1);
    assert.match(volumes[0].error ?? '', /both GPT copies are damaged/);
  });

  it('an EBR chain that loops back ends with a warning, each partition listed once', async () => {
    const disk = await blankDisk('ebr-loop.img', 64 * MiB);
    const script = ['label: dos', 'x1 : start=2048, size=60M, type=5', 'x5 : size=8M, type=83', 'x6 : size=8M, type=83', 'x7 : size=8M, type=83'].join('\n');
    await run('sh', ['-c', `printf '%s\\n' "$1" | sfdisk -q "$2"`, 'sh', script, disk]);
    const before = await readPartitionTable(await open(disk));
    assert.deepEqual(before.partitions.map((p) => p.index), [5, 6, 7]);
    // Follow the EBR links as written by sfdisk, then point the last link back at the second EBR.
    const extStart = 2048;
    const ebrs = [extStart];
    for (;;) {
      const ebr = readFileRange(disk, ebrs[ebrs.length - 1] * 512, 512);
      const next = ebr.readUInt32LE(446 + 16 + 8);
      if (ebr[446 + 16 + 4] === 0 || next === 0) break;
      ebrs.push(extStart + next);
    }
    assert.equal(ebrs.length, 3);
    const link = Buffer.alloc(16);
    link[4] = 0x05;
    link.writeUInt32LE(ebrs[1] - extStart, 8);
    link.writeUInt32LE(1, 12);
    patchFile(disk, ebrs[2] * 512 + 446 + 16, link);
    const started = Date.now();
    const table = await readPartitionTable(await open(disk));
    assert.ok(Date.now() - started < 2000);
    assert.deepEqual(table.partitions.map((p) => p.index), [5, 6, 7]);
    assert.match(table.warnings.join(), /loops back/);
  });

  it('a whole-disk filesystem is volume "0"; an FAT/NTFS-like boot sector is not taken for an MBR', async () => {
    const dev = await open(ext4Image);
    assert.equal((await readPartitionTable(dev)).scheme, 'none');
    const volumes = await openVolumes(dev, defaultProbes);
    assert.deepEqual(volumes.map((v) => [v.part, v.fs?.type]), [['0', 'ext4']]);
    const vbr = Buffer.alloc(4096);
    vbr[0] = 0xeb;
    vbr.write('NTFS    ', 3, 'latin1');
    vbr.writeUInt16LE(0xaa55, 510);
    vbr.fill(0x11, 446, 510); // garbage where MBR entries would be
    assert.equal((await readPartitionTable(memoryDevice(vbr))).scheme, 'none');
  });

  it('subDevice is bounds-checked', async () => {
    const dev = memoryDevice(Buffer.alloc(4096));
    assert.throws(() => subDevice(dev, 1024, 4096), TresorError);
    const part = subDevice(dev, 1024, 1024);
    await assert.rejects(part.read(1000, 100), TresorError);
    assert.equal((await part.read(0, 1024)).length, 1024);
  });
});

describe('block cache', () => {
  it('serves repeated reads from memory, coalesces misses and shares in-flight reads', async () => {
    const data = randomBytes(1024 * 1024);
    const inner = recordingDevice(memoryDevice(data));
    const cache = cachedDevice(inner, { blockSize: 4096, maxBytes: 128 * 1024 });
    assert.deepEqual(await cache.read(100, 50), data.subarray(100, 150));
    assert.deepEqual(await cache.read(200, 50), data.subarray(200, 250));
    assert.equal(inner.reads.length, 1, 'second read hits the cache');
    await cache.read(3 * 4096, 4096);
    assert.deepEqual(await cache.read(0, 5 * 4096), data.subarray(0, 5 * 4096));
    assert.deepEqual(inner.reads.slice(1), [{ offset: 3 * 4096, length: 4096 }, { offset: 4096, length: 2 * 4096 }, { offset: 4 * 4096, length: 4096 }]);
    const before = inner.reads.length;
    const [a, b] = await Promise.all([cache.read(40 * 4096, 10), cache.read(40 * 4096 + 20, 10)]);
    assert.deepEqual([a, b], [data.subarray(40 * 4096, 40 * 4096 + 10), data.subarray(40 * 4096 + 20, 40 * 4096 + 30)]);
    assert.equal(inner.reads.length, before + 1, 'concurrent reads of one block share a fetch');
    for (let i = 100; i < 140; i++) await cache.read(i * 4096, 1);
    await cache.read(0, 1);
    assert.equal(inner.reads[inner.reads.length - 1].offset, 0, 'least recently used blocks are evicted');
    await assert.rejects(cache.read(data.length - 1, 2), TresorError);
  });
});

// ---------------------------------------------------------------------------------------------

describe('LVM2 (pvcreate/vgcreate/lvcreate, no device-mapper)', { timeout: 90_000 }, () => {
  const suffix = randomBytes(4).toString('hex');
  const lvmConfig = 'backup { backup = 0 archive = 0 } global { use_lvmlockd = 0 }';

  async function attach(path: string, offset = 0, size?: number): Promise<string> {
    const args = ['-f', '--show'];
    if (offset) args.push('-o', String(offset));
    if (size) args.push('--sizelimit', String(size));
    const loop = (await run('losetup', [...args, path])).trim();
    loops.push(loop);
    return loop;
  }

  async function detach(loop: string): Promise<void> {
    await run('losetup', ['-d', loop]);
    loops.splice(loops.indexOf(loop), 1);
  }

  function lvm(pvLoops: string[], command: string, args: string[]): Promise<string> {
    return run(command, ['--devices', pvLoops.join(','), '--config', lvmConfig, ...args]);
  }

  const noActivation = ['--driverloaded', 'n', '-an', '-Zn', '-y'];

  /** Where each segment of an LV lives, per `lvs --segments` (sizes in bytes). */
  async function segments(pvLoops: string[], vg: string, lv: string) {
    const out = await lvm(pvLoops, 'lvs', ['--segments', '--noheadings', '--units', 'b', '--nosuffix', '--separator', '|',
      '-o', 'seg_start,seg_size,stripes,stripe_size,seg_pe_ranges', `${vg}/${lv}`]);
    return out.trim().split('\n').map((line) => {
      const [start, size, stripes, stripeSize, ranges] = line.trim().split('|');
      return {
        start: Number(start), size: Number(size), stripes: Number(stripes), stripeSize: Number(stripeSize),
        ranges: ranges.trim().split(/\s+/).map((r) => {
          const m = /^(\S+):(\d+)-(\d+)$/.exec(r);
          assert.ok(m, `PE range ${r}`);
          return { pv: m[1], firstPe: Number(m[2]), lastPe: Number(m[3]) };
        }),
      };
    });
  }

  async function peLayout(pvLoops: string[], vg: string): Promise<{ extent: number; peStart: Map<string, number> }> {
    const extent = Number((await lvm(pvLoops, 'vgs', ['--noheadings', '--units', 'b', '--nosuffix', '-o', 'vg_extent_size', vg])).trim());
    const peStart = new Map<string, number>();
    for (const line of (await lvm(pvLoops, 'pvs', ['--noheadings', '--units', 'b', '--nosuffix', '--separator', '|', '-o', 'pv_name,pe_start'])).trim().split('\n')) {
      const [name, start] = line.trim().split('|');
      peStart.set(name, Number(start));
    }
    return { extent, peStart };
  }

  it('a volume group in a GPT partition: linear LVs (one with two segments) hold filesystems', async () => {
    const vg = `tresorvg${suffix}`;
    const disk = await blankDisk('lvm-gpt.img', 96 * MiB);
    await run('sgdisk', ['-o', '-n', '1:2048:+16M', '-t', '1:8300', '-n', '2:0:0', '-t', '2:8e00', disk]);
    const reference = await sfdiskJson(disk);
    writeImageAt(ext2Image, disk, reference.partitions[0].start * 512);
    const pvOffset = reference.partitions[1].start * 512;
    const loop = await attach(disk, pvOffset, reference.partitions[1].size * 512);
    try {
      await lvm([loop], 'pvcreate', ['-y', loop]);
      await lvm([loop], 'vgcreate', ['-s', '1M', vg, loop]);
      await lvm([loop], 'lvcreate', [...noActivation, '-L', '8M', '-n', 'root', vg]);
      await lvm([loop], 'lvcreate', [...noActivation, '-L', '4M', '-n', 'spacer', vg]);
      await lvm([loop], 'lvextend', ['--driverloaded', 'n', '-L', '16M', `${vg}/root`]);
      const lvsOut = await lvm([loop], 'lvs', ['--noheadings', '-o', 'lv_name,seg_count', vg]);
      assert.match(lvsOut, /root\s+2/, 'root has two segments');
      const layout = await peLayout([loop], vg);
      const segs = await segments([loop], vg, 'root');
      writeMapped(ext4Image, disk, (at) => {
        const seg = segs.find((s) => at >= s.start && at < s.start + s.size);
        assert.ok(seg, `LV offset ${at} is mapped`);
        const pvByte = (layout.peStart.get(seg.ranges[0].pv) as number) + seg.ranges[0].firstPe * layout.extent + (at - seg.start);
        return { diskOffset: pvOffset + pvByte, length: seg.start + seg.size - at };
      });
    } finally {
      await detach(loop);
    }
    const dev = await open(disk);
    const volumes = await openVolumes(dev, defaultProbes);
    assert.deepEqual(volumes.map((v) => [v.part, v.fs?.type, v.size, v.error]), [
      ['1', 'ext2', 16 * MiB, undefined],
      [`lvm/${vg}/root`, 'ext4', 16 * MiB, undefined],
      [`lvm/${vg}/spacer`, undefined, 4 * MiB, undefined],
    ]);
    await compareWithHostTree(volumes[1].fs!, tree, compareOptions);
  });

  it('a striped LV over two PVs (two disks); a missing PV is a clear error for that LV only', async () => {
    const vg = `tresorst${suffix}`;
    const disks = [await blankDisk('pv-a.img', 48 * MiB), await blankDisk('pv-b.img', 48 * MiB)];
    const pvLoops = [await attach(disks[0]), await attach(disks[1])];
    try {
      await lvm(pvLoops, 'pvcreate', ['-y', ...pvLoops]);
      await lvm(pvLoops, 'vgcreate', ['-s', '1M', vg, ...pvLoops]);
      await lvm(pvLoops, 'lvcreate', [...noActivation, '-i', '2', '-I', '64k', '-L', '16M', '-n', 'striped', vg]);
      await lvm(pvLoops, 'lvcreate', [...noActivation, '-L', '16M', '-n', 'alone', vg, pvLoops[0]]);
      const layout = await peLayout(pvLoops, vg);
      const [seg] = await segments(pvLoops, vg, 'striped');
      assert.equal(seg.stripes, 2);
      assert.equal(seg.stripeSize, 64 * 1024);
      // dm-stripe: chunk k of the segment is chunk floor(k/n) of stripe k mod n.
      const stripeDisk = (pv: string) => disks[pvLoops.indexOf(pv)];
      for (let chunk = 0; chunk * seg.stripeSize < seg.size; chunk++) {
        const range = seg.ranges[chunk % seg.stripes];
        const pvByte = (layout.peStart.get(range.pv) as number) + range.firstPe * layout.extent
          + Math.floor(chunk / seg.stripes) * seg.stripeSize;
        const piece = readFileRange(ext4Image, chunk * seg.stripeSize, seg.stripeSize);
        patchFile(stripeDisk(range.pv), pvByte, piece);
      }
      const [alone] = await segments(pvLoops, vg, 'alone');
      writeImageAt(ext2Image, disks[0], (layout.peStart.get(alone.ranges[0].pv) as number) + alone.ranges[0].firstPe * layout.extent);
      assert.match(await lvm(pvLoops, 'vgs', ['--noheadings', '-o', 'vg_name,pv_count,lv_count', vg]), new RegExp(`${vg}\\s+2\\s+2`));
    } finally {
      for (const loop of [...pvLoops]) await detach(loop);
    }
    const pvs: BlockDevice[] = [await open(disks[0]), await open(disks[1])];
    const lvs = await listLogicalVolumes(pvs);
    assert.deepEqual(lvs.map((lv) => [lv.vg, lv.name, lv.size, lv.error]).sort(), [
      [vg, 'alone', 16 * MiB, undefined],
      [vg, 'striped', 16 * MiB, undefined],
    ]);
    const striped = lvs.find((lv) => lv.name === 'striped')!;
    const fs = await probeExt(striped.device);
    assert.equal(fs?.label, 'in-partition');
    await compareWithHostTree(fs!, tree, compareOptions);

    const volumes = await openVolumes(pvs[0], defaultProbes);
    const byPart = new Map(volumes.map((v) => [v.part, v]));
    assert.equal(byPart.get(`lvm/${vg}/alone`)?.fs?.label, 'second');
    assert.match(byPart.get(`lvm/${vg}/striped`)?.error ?? '', /needs physical volume\(s\) pv1 .* not given/);
    await assert.rejects(byPart.get(`lvm/${vg}/striped`)!.device.read(0, 512), TresorError);
  });

  it('the metadata text parser refuses malformed and hostile text', () => {
    const ok = parseLvmText('vg { id = "a\\"b" seqno = 3 list = ["x", 1, -2] # comment\n sub { k = 1 } }\nversion = 1\n');
    const vgSection = ok.get('vg') as Map<string, unknown>;
    assert.equal(vgSection.get('id'), 'a"b');
    assert.deepEqual(vgSection.get('list'), ['x', 1, -2]);
    for (const bad of ['vg { id = "unterminated }', 'a = [1, 2', '{ }', 'x = 99999999999999999999', 'a { b = }',
      `${'a { '.repeat(100)}${'} '.repeat(100)}`, `x = ${'['.repeat(100)}`]) {
      assert.throws(() => parseLvmText(bad), FsDamageError, bad.slice(0, 40));
    }
  });
});
