/**
 * qcow2 and raw images, checked against QEMU's own tools: every image is built by qemu-img/qemu-io
 * from deterministic pseudo-random content, read back natively and compared with
 * `qemu-img convert -O raw` and `qemu-img map`; every image the writer produces must pass
 * `qemu-img check` and `qemu-img compare`. Damaged and hostile images must fail with a
 * BadInputError, never crash or hang.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { createCipheriv, createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openQcow2 } from '../src/image/qcow2.ts';
import { createQcow2Writer } from '../src/image/qcow2-writer.ts';
import { createRawWriter, openRaw } from '../src/image/raw.ts';
import { probeImageFormat } from '../src/image/probe.ts';
import type { DiskSource, Extent } from '../src/image/disk.ts';
import { BadInputError, TresorError } from '../src/util/errors.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir = '';
/** LUKS images take QEMU seconds of key stretching: made in the background while other tests run. */
let luksImages: Promise<unknown> = Promise.resolve();

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'tresor-qcow2-'));
  const secret = ['--object', 'secret,id=sec0,data=tresor-test'];
  const exec = promisify(execFile);
  // QEMU times its key stretching by the thread's CPU clock, which here can tick too coarsely for
  // its first probe and fail with "Unable to get accurate CPU usage": a fixture problem, retried.
  const create = async (cmd: string, args: string[]): Promise<unknown> => {
    for (let attempt = 1; ; attempt++) {
      try {
        return await exec(cmd, args);
      } catch (err) {
        if (attempt >= 5 || !/accurate CPU usage/.test(String((err as { stderr?: string }).stderr ?? err))) throw err;
      }
    }
  };
  luksImages = Promise.all([
    create('qemu-img', ['create', '-q', ...secret, '-f', 'qcow2',
      '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', join(dir, 'luks.qcow2'), '1M']),
    create('qemu-img', ['create', '-q', ...secret, '-f', 'luks', '-o', 'key-secret=sec0,iter-time=10', join(dir, 'probe.luks'), '1M']),
  ]);
  luksImages.catch(() => undefined); // awaited (and reported) by the tests that need them
});

after(() => {
  if (dir !== '') rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// Helpers

function run(cmd: string, args: string[], opts: { cwd?: string } = {}): string {
  try {
    return execFileSync(cmd, args, { cwd: opts.cwd ?? dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 * MiB });
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; message: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${e.message}\n${e.stderr ?? ''}${e.stdout ?? ''}`);
  }
}

function qemuImg(...args: string[]): string {
  return run('qemu-img', args);
}

function qemuIo(image: string, ...commands: string[]): void {
  const args = commands.flatMap((c) => ['-c', c]);
  const out = run('qemu-io', [...args, image]);
  // qemu-io reports command failures on stdout and still exits 0.
  assert.doesNotMatch(out, /error|failed/i, `qemu-io on ${image}: ${out}`);
}

/** Deterministic pseudo-random bytes: AES-CTR keystream of a seed. */
function prngBytes(seed: string, length: number): Buffer {
  const key = createHash('sha256').update(seed).digest().subarray(0, 16);
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  return cipher.update(Buffer.alloc(length));
}

/** Small deterministic PRNG for choices (mulberry32). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Disk content like a real guest's: runs of zeros, compressible text and random bytes, with run
 * boundaries that are not cluster aligned.
 */
function diskContent(seed: string, size: number): Buffer {
  const rand = prng(parseInt(createHash('sha256').update(seed).digest('hex').slice(0, 8), 16));
  const noise = prngBytes(seed, size);
  const out = Buffer.alloc(size);
  const words = ['alpha ', 'backup ', 'cluster ', 'disk ', 'extent ', 'qcow2 ', 'tresor ', '\n'];
  for (let pos = 0; pos < size;) {
    const runLength = Math.min(size - pos, 512 + Math.floor(rand() * 96 * KiB));
    const kind = rand();
    if (kind < 0.35) {
      // zeros: leave as is
    } else if (kind < 0.65) {
      for (let at = pos; at < pos + runLength;) {
        const word = words[Math.floor(rand() * words.length)];
        at += out.write(word, at, Math.min(word.length, pos + runLength - at), 'latin1');
      }
    } else {
      noise.copy(out, pos, pos, pos + runLength);
    }
    pos += runLength;
  }
  return out;
}

function sha256(buf: Uint8Array): string {
  return createHash('sha256').update(buf).digest('hex');
}

async function readAll(disk: DiskSource, chunk = 1 * MiB): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let pos = 0; pos < disk.size; pos += chunk) parts.push(await disk.read(pos, Math.min(chunk, disk.size - pos)));
  return Buffer.concat(parts);
}

async function collectExtents(disk: DiskSource, offset = 0, length = disk.size): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of disk.extents(offset, length)) out.push(e);
  return out;
}

type Kind = 'data' | 'zero';
interface Run { start: number; end: number; kind: Kind }

function mergeRuns(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    if (last !== undefined && last.kind === r.kind && last.end === r.start) last.end = r.end;
    else out.push({ ...r });
  }
  return out;
}

function qemuMap(image: string): Run[] {
  const entries = JSON.parse(qemuImg('map', '--output=json', image)) as Array<{ start: number; length: number; data: boolean }>;
  return mergeRuns(entries.map((e) => ({ start: e.start, end: e.start + e.length, kind: e.data ? 'data' : 'zero' })));
}

function oursAsRuns(extents: Extent[]): Run[] {
  return extents.map((e) => ({ start: e.offset, end: e.offset + e.length, kind: e.kind === 'zero' ? 'zero' : 'data' }));
}

function kindAt(runs: Run[], pos: number): Kind {
  const r = runs.find((x) => x.start <= pos && pos < x.end);
  assert.ok(r, `no run covers ${pos}`);
  return r.kind;
}

/**
 * Where QEMU sees data we must too, and where we see zeros QEMU must too (raw backing files:
 * QEMU asks the host filesystem for holes, Node cannot).
 */
function assertMapCompatible(ours: Run[], theirs: Run[]): void {
  const boundaries = new Set<number>();
  for (const r of [...ours, ...theirs]) { boundaries.add(r.start); boundaries.add(r.end); }
  const points = [...boundaries].sort((a, b) => a - b);
  for (let i = 0; i + 1 < points.length; i++) {
    const mine = kindAt(ours, points[i]);
    const qemu = kindAt(theirs, points[i]);
    if (qemu === 'data') assert.equal(mine, 'data', `QEMU sees data at ${points[i]}, we see zeros`);
  }
}

function assertExtentsWellFormed(extents: Extent[], offset: number, length: number): void {
  let pos = offset;
  for (let i = 0; i < extents.length; i++) {
    const e = extents[i];
    assert.equal(e.offset, pos, 'extents must be contiguous');
    assert.ok(e.length > 0, 'extents must not be empty');
    if (i > 0) assert.notEqual(e.kind, extents[i - 1].kind, 'neighbouring extents of one kind must be merged');
    pos += e.length;
  }
  assert.equal(pos, offset + length, 'extents must cover the range');
}

/** Writes `content` through a DiskWriter in shuffled, partly unaligned pieces, 8 in flight. */
async function writeShuffled(path: string, content: Buffer, seed: number, clusterSize: number): Promise<void> {
  const rand = prng(seed);
  const writer = await createQcow2Writer(path, content.length, { clusterSize });
  const cuts = [0];
  while (cuts[cuts.length - 1] < content.length) {
    const last = cuts[cuts.length - 1];
    const aligned = rand() < 0.6;
    const step = aligned ? clusterSize * (1 + Math.floor(rand() * 4)) : 1 + Math.floor(rand() * 3 * clusterSize);
    cuts.push(Math.min(content.length, aligned ? (Math.floor(last / clusterSize) * clusterSize + step) : last + step));
  }
  const pieces = cuts.slice(1).map((end, i) => [cuts[i], end] as const);
  for (let i = pieces.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [pieces[i], pieces[j]] = [pieces[j], pieces[i]];
  }
  let next = 0;
  await Promise.all(Array.from({ length: 8 }, async () => {
    while (next < pieces.length) {
      const [start, end] = pieces[next++];
      await writer.write(start, content.subarray(start, end));
    }
  }));
  await writer.close();
}

function assertCheckClean(image: string): void {
  const report = JSON.parse(qemuImg('check', '--output=json', image)) as Record<string, number | undefined>;
  assert.equal(report['corruptions'] ?? 0, 0, `qemu-img check: corruptions in ${image}`);
  assert.equal(report['leaks'] ?? 0, 0, `qemu-img check: leaks in ${image}`);
  assert.equal(report['check-errors'] ?? 0, 0, `qemu-img check: errors in ${image}`);
}

function writeContentFile(name: string, content: Buffer): string {
  const path = join(dir, name);
  writeFileSync(path, content);
  return path;
}

async function expectBadInput(action: () => Promise<unknown>, code?: string | RegExp): Promise<BadInputError> {
  try {
    await action();
  } catch (err) {
    assert.ok(err instanceof BadInputError, `expected a BadInputError, got ${String((err as Error)?.stack ?? err)}`);
    if (typeof code === 'string') assert.equal(err.code, code, err.message);
    if (code instanceof RegExp) assert.match(err.code, code, err.message);
    assert.ok(err.hint !== undefined && err.hint.length > 0, 'a BadInputError must say what to do');
    return err;
  }
  assert.fail('expected a BadInputError, but it succeeded');
}

/** Opens, maps and reads the whole disk (capped), closing whatever happens. */
async function openAndReadEverything(path: string, readCap = 4 * MiB): Promise<void> {
  const disk = await openQcow2(path);
  try {
    await collectExtents(disk);
    const limit = Math.min(disk.size, readCap);
    for (let pos = 0; pos < limit; pos += 256 * KiB) await disk.read(pos, Math.min(256 * KiB, limit - pos));
  } finally {
    await disk.close();
  }
}

/** The structures an image references, parsed independently of the reader under test. */
function referencedLayout(image: Buffer): { clusterSize: number; metadataEnd: number; lastDataStart: number; l2Offsets: number[]; dataEntries: number[] } {
  const clusterBits = image.readUInt32BE(20);
  const clusterSize = 2 ** clusterBits;
  const l1Size = image.readUInt32BE(36);
  const l1Offset = Number(image.readBigUInt64BE(40));
  const offsetMask = ((1n << 56n) - 1n) & ~511n;
  let metadataEnd = l1Offset + l1Size * 8;
  let lastDataStart = 0;
  const l2Offsets: number[] = [];
  const dataEntries: number[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(image.readBigUInt64BE(l1Offset + i * 8) & offsetMask);
    if (l2 === 0) continue;
    l2Offsets.push(l2);
    metadataEnd = Math.max(metadataEnd, l2 + clusterSize);
    for (let e = 0; e < clusterSize / 8; e++) {
      const entry = image.readBigUInt64BE(l2 + e * 8);
      if ((entry & (1n << 62n)) !== 0n) {
        const offsetBits = BigInt(62 - (clusterBits - 8));
        lastDataStart = Math.max(lastDataStart, Number(entry & ((1n << offsetBits) - 1n)));
      } else if ((entry & offsetMask) !== 0n && (entry & 1n) === 0n) {
        lastDataStart = Math.max(lastDataStart, Number(entry & offsetMask));
        dataEntries.push(l2 + e * 8);
      }
    }
  }
  return { clusterSize, metadataEnd, lastDataStart, l2Offsets, dataEntries };
}

// ---------------------------------------------------------------------------------------------
// Images built by QEMU

interface ImageCase {
  name: string;
  /** Builds the image in `dir`, returns its path. */
  build: () => string;
  clusterSize: number;
  /** The chain has a raw backing file: QEMU's map sees its holes, we cannot. */
  rawBacking?: boolean;
}

function fromContent(name: string, size: number, createOptions: string[], compressed = false): () => string {
  return () => {
    const source = writeContentFile(`${name}.content`, diskContent(name, size));
    const image = join(dir, `${name}.qcow2`);
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...(compressed ? ['-c'] : []), ...createOptions, source, image);
    return image;
  };
}

function writeChunk(name: string, seed: string, length: number): string {
  return writeContentFile(name, prngBytes(seed, length));
}

const imageCases: ImageCase[] = [
  { name: 'v3-64k', clusterSize: 64 * KiB, build: fromContent('v3-64k', 8 * MiB, ['-o', 'compat=1.1']) },
  { name: 'v2-64k', clusterSize: 64 * KiB, build: fromContent('v2-64k', 8 * MiB, ['-o', 'compat=0.10']) },
  { name: 'v3-512', clusterSize: 512, build: fromContent('v3-512', 2 * MiB, ['-o', 'cluster_size=512']) },
  { name: 'v3-2m', clusterSize: 2 * MiB, build: fromContent('v3-2m', 12 * MiB, ['-o', 'cluster_size=2M']) },
  { name: 'deflate', clusterSize: 64 * KiB, build: fromContent('deflate', 8 * MiB, [], true) },
  { name: 'zstd', clusterSize: 64 * KiB, build: fromContent('zstd', 8 * MiB, ['-o', 'compression_type=zstd'], true) },
  { name: 'deflate-512', clusterSize: 512, build: fromContent('deflate-512', 1 * MiB, ['-o', 'cluster_size=512'], true) },
  { name: 'zstd-2m', clusterSize: 2 * MiB, build: fromContent('zstd-2m', 10 * MiB, ['-o', 'cluster_size=2M,compression_type=zstd'], true) },
  { name: 'v2-deflate', clusterSize: 64 * KiB, build: fromContent('v2-deflate', 4 * MiB, ['-o', 'compat=0.10'], true) },
  {
    name: 'odd-size', clusterSize: 64 * KiB, build: () => {
      const image = fromContent('odd-size', 5 * MiB + 7680, [])();
      qemuIo(image, `write -P 0x5a ${5 * MiB + 4096} 3584`);
      return image;
    },
  },
  {
    name: 'zero-clusters', clusterSize: 64 * KiB, build: () => {
      const image = fromContent('zero-clusters', 8 * MiB, ['-o', 'compat=1.1'])();
      const chunk = writeChunk('zero-clusters.chunk', 'zero-clusters', 512 * KiB);
      qemuIo(image,
        `write -s ${chunk} 0 512k`,
        'write -z 0 128k', // allocated clusters, no unmap: "zero allocated"
        'write -z -u 1m 256k', // may unmap: "zero plain"
        'write -z 6m 192k', // over unallocated clusters
        'write -z 300k 10k', // inside a cluster: written as zero data
      );
      return image;
    },
  },
  {
    name: 'discard', clusterSize: 64 * KiB, build: () => {
      const image = fromContent('discard', 8 * MiB, [])();
      qemuIo(image, 'discard 2m 512k', 'discard 100k 64k', 'discard 7m 1m');
      return image;
    },
  },
  {
    name: 'chain3', clusterSize: 64 * KiB, build: () => {
      // base (4 MiB, v3) <- mid (8 MiB, v2) <- top (10 MiB, v3): each backing file is shorter.
      fromContent('chain-base', 4 * MiB, [])();
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'chain-base.qcow2', '-F', 'qcow2', 'chain-mid.qcow2', '8M');
      const a = writeChunk('chain-a', 'chain-a', 300 * KiB);
      qemuIo(join(dir, 'chain-mid.qcow2'), `write -s ${a} 1m 300k`, `write -s ${a} 3900k 300k`, 'write -P 0x33 6m 100k');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'chain-mid.qcow2', '-F', 'qcow2', 'chain-top.qcow2', '10M');
      const b = writeChunk('chain-b', 'chain-b', 200 * KiB);
      const top = join(dir, 'chain-top.qcow2');
      qemuIo(top, `write -s ${b} 1100k 200k`, 'write -z 2m 128k', 'write -z 6m 64k', `write -s ${b} 9m 200k`, 'discard 0 64k');
      return top;
    },
  },
  {
    name: 'raw-backing', clusterSize: 64 * KiB, rawBacking: true, build: () => {
      writeContentFile('raw-base.raw', diskContent('raw-base', 3 * MiB));
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'raw-base.raw', '-F', 'raw', 'raw-top.qcow2', '6M');
      const top = join(dir, 'raw-top.qcow2');
      qemuIo(top, 'write -P 0x44 512k 64k', 'write -z 1m 64k', 'write -P 0x45 2900k 300k');
      return top;
    },
  },
  {
    name: 'extended-l2', clusterSize: 64 * KiB, build: () => {
      fromContent('ext-base', 4 * MiB, [])();
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'ext-base.qcow2', '-F', 'qcow2', 'ext-top.qcow2', '4M');
      const top = join(dir, 'ext-top.qcow2');
      qemuIo(top, 'write -P 0x11 4k 2k', 'write -z 64k 8k', 'write -P 0x22 200k 100k', 'write -z -u 1m 64k', 'write -P 0x23 3m 2k');
      return top;
    },
  },
];

describe('qcow2 reader and writer against qemu-img', () => {
  for (const c of imageCases) {
    it(`${c.name}: reads, maps and round-trips like QEMU`, { timeout: 30_000 }, async () => {
      const image = c.build();
      const referencePath = join(dir, `${c.name}.reference.raw`);
      qemuImg('convert', '-O', 'raw', image, referencePath);
      const reference = readFileSync(referencePath);

      const disk = await openQcow2(image);
      try {
        assert.equal(disk.size, reference.length);
        assert.equal(disk.format, 'qcow2');
        assert.equal(sha256(await readAll(disk)), sha256(reference), 'chunked read differs from qemu-img convert');
        assert.equal(sha256(await disk.read(0, disk.size)), sha256(reference), 'one big read differs from qemu-img convert');
        const rand = prng(42);
        for (let i = 0; i < 120; i++) {
          const offset = Math.floor(rand() * disk.size);
          const length = Math.min(disk.size - offset, Math.floor(rand() * (rand() < 0.5 ? 4 * KiB : 3 * c.clusterSize + 300 * KiB)));
          const got = await disk.read(offset, length);
          assert.ok(got.equals(reference.subarray(offset, offset + length)), `read(${offset}, ${length}) differs`);
        }

        const extents = await collectExtents(disk);
        assertExtentsWellFormed(extents, 0, disk.size);
        const ours = oursAsRuns(extents);
        const theirs = qemuMap(image);
        if (c.rawBacking) assertMapCompatible(ours, theirs);
        else assert.deepEqual(ours, theirs, 'extents differ from qemu-img map');
        for (const e of extents) {
          if (e.kind === 'zero') assert.ok(reference.subarray(e.offset, e.offset + e.length).every((b) => b === 0), `zero extent at ${e.offset} holds data`);
        }
        // A sub-range starts and ends exactly where asked.
        const middle = await collectExtents(disk, 12345, Math.min(disk.size - 12345, 3 * MiB));
        assertExtentsWellFormed(middle, 12345, Math.min(disk.size - 12345, 3 * MiB));
      } finally {
        await disk.close();
      }

      const written = join(dir, `${c.name}.written.qcow2`);
      await writeShuffled(written, reference, 7, c.clusterSize);
      assertCheckClean(written);
      qemuImg('compare', '-f', 'raw', '-F', 'qcow2', referencePath, written);
      // All-zero clusters are not allocated.
      const allocated = qemuMap(written).filter((r) => r.kind === 'data').reduce((n, r) => n + r.end - r.start, 0);
      let nonZeroClusters = 0;
      for (let pos = 0; pos < reference.length; pos += c.clusterSize) {
        if (!reference.subarray(pos, pos + c.clusterSize).every((b) => b === 0)) nonZeroClusters++;
      }
      assert.ok(allocated <= nonZeroClusters * c.clusterSize, `writer allocated ${allocated} bytes for ${nonZeroClusters} non-zero clusters`);
    });
  }

  it('uses a backing resolver in place of the file named in the image', { timeout: 10_000 }, async () => {
    writeContentFile('resolver-base.raw', diskContent('resolver-base', 2 * MiB));
    const other = writeContentFile('resolver-other.raw', diskContent('resolver-other', 2 * MiB));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'resolver-base.raw', '-F', 'raw', 'resolver-top.qcow2', '2M');
    qemuIo(join(dir, 'resolver-top.qcow2'), 'write -P 0x77 64k 64k');
    const seen: string[] = [];
    const disk = await openQcow2(join(dir, 'resolver-top.qcow2'), {
      backingResolver: async (ref) => {
        seen.push(`${ref.name}:${ref.format}`);
        return openRaw(other);
      },
    });
    try {
      const expected = readFileSync(other);
      expected.fill(0x77, 64 * KiB, 128 * KiB);
      assert.deepEqual(seen, ['resolver-base.raw:raw']);
      assert.ok((await disk.read(0, disk.size)).equals(expected));
    } finally {
      await disk.close();
    }
  });

  it('probes the backing format when the image does not name it, and limits chain depth', { timeout: 10_000 }, async () => {
    const base = writeContentFile('probe-base.raw', diskContent('probe-base', 1 * MiB));
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', base, join(dir, 'probe-base.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'probe-base.qcow2', '-F', 'qcow2', 'probe-mid.qcow2', '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'probe-mid.qcow2', '-F', 'qcow2', 'probe-top.qcow2', '1M');
    // Older QEMUs wrote no backing format: turn the extension into an unknown one (ignored).
    const top = readFileSync(join(dir, 'probe-top.qcow2'));
    const at = top.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    assert.ok(at > 0 && at < 4096);
    top.writeUInt32BE(0x7e57ed00, at);
    writeFileSync(join(dir, 'probe-top.qcow2'), top);
    const disk = await openQcow2(join(dir, 'probe-top.qcow2'));
    try {
      assert.ok((await disk.read(0, disk.size)).equals(readFileSync(base)));
    } finally {
      await disk.close();
    }
    await expectBadInput(() => openQcow2(join(dir, 'probe-top.qcow2'), { maxChainDepth: 2 }), 'qcow2_backing_too_deep');
  });

  it('writes a sparse 2 TiB image in bounded memory', { timeout: 30_000 }, async () => {
    const size = 2 * 1024 * 1024 * MiB;
    const ours = join(dir, 'huge.qcow2');
    const reference = join(dir, 'huge-reference.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', reference, String(size));
    const writes: Array<[number, Buffer]> = [
      [0, prngBytes('huge-0', 1 * MiB)],
      [size - 3 * MiB - 1000, prngBytes('huge-1', 3 * MiB + 1000)], // unaligned, up to the end
      [777 * 1024 * MiB + 4097, prngBytes('huge-2', 70 * KiB)], // spans clusters, unaligned
      [1500 * 1024 * MiB, Buffer.alloc(4 * MiB)], // zeros: nothing allocated
    ];
    const before = process.memoryUsage().rss;
    const writer = await createQcow2Writer(ours, size);
    for (const [offset, data] of writes.toReversed()) await writer.write(offset, data);
    await writer.close();
    assert.ok(process.memoryUsage().rss - before < 64 * MiB, 'the writer must not allocate per virtual size');
    for (const [offset, data] of writes) {
      const chunk = writeContentFile('huge.chunk', data);
      qemuIo(reference, `write -s ${chunk} ${offset} ${data.length}`);
    }
    assertCheckClean(ours);
    qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', reference, ours);
    assert.ok(statSync(ours).size < 16 * MiB, `2 TiB sparse image takes ${statSync(ours).size} bytes`);
    const disk = await openQcow2(ours);
    try {
      assert.equal(disk.size, size);
      for (const [offset, data] of writes) assert.ok((await disk.read(offset, data.length)).equals(data));
      const dataBytes = (await collectExtents(disk)).filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0);
      assert.ok(dataBytes <= 7 * MiB, `extents report ${dataBytes} data bytes`);
    } finally {
      await disk.close();
    }
  });

  it('writes an empty disk and a tiny one', { timeout: 10_000 }, async () => {
    for (const [name, size] of [['empty', 0], ['tiny', 1000]] as const) {
      const path = join(dir, `${name}.qcow2`);
      const writer = await createQcow2Writer(path, size);
      if (size > 0) await writer.write(10, Buffer.from('hello'));
      await writer.close();
      assertCheckClean(path);
      const disk = await openQcow2(path);
      try {
        assert.equal(disk.size, Math.ceil(size / 512) * 512);
        if (size > 0) assert.equal((await disk.read(10, 5)).toString(), 'hello');
      } finally {
        await disk.close();
      }
    }
  });

  it('abort removes the image and an existing file is not overwritten', { timeout: 10_000 }, async () => {
    const path = join(dir, 'aborted.qcow2');
    const writer = await createQcow2Writer(path, 4 * MiB);
    await writer.write(0, prngBytes('abort', 64 * KiB));
    await writer.abort();
    assert.equal(existsSync(path), false);
    writeFileSync(path, 'precious');
    await expectBadInput(() => createQcow2Writer(path, MiB), 'target_exists');
    assert.equal(readFileSync(path, 'utf8'), 'precious');
    const replaced = await createQcow2Writer(path, MiB, { overwrite: true });
    await replaced.close();
    assertCheckClean(path);
  });
});

// ---------------------------------------------------------------------------------------------
// Damaged and hostile images

describe('qcow2 reader on bad input', () => {
  let sample = Buffer.alloc(0);
  let samplePath = '';

  before(() => {
    samplePath = fromContent('sample-4k', 1 * MiB, ['-o', 'cluster_size=4k'])();
    sample = readFileSync(samplePath);
  });

  function variant(name: string, mutate: (buf: Buffer) => unknown): string {
    const buf = Buffer.from(sample);
    mutate(buf);
    return writeContentFile(`${name}.qcow2`, buf);
  }

  it('rejects truncated files at many lengths', { timeout: 20_000 }, async () => {
    const layout = referencedLayout(sample);
    const rand = prng(1);
    const lengths = new Set<number>();
    for (let n = 0; n <= 128; n++) lengths.add(n);
    for (const boundary of [layout.clusterSize, layout.metadataEnd, layout.lastDataStart, sample.length, ...layout.l2Offsets]) {
      for (const delta of [-9, -1, 0, 1, 8]) lengths.add(Math.max(0, Math.min(sample.length - 1, boundary + delta)));
    }
    for (let i = 0; i < 120; i++) lengths.add(Math.floor(rand() * sample.length));
    const path = join(dir, 'truncated.qcow2');
    for (const length of [...lengths].sort((a, b) => a - b)) {
      writeFileSync(path, sample.subarray(0, length));
      const mustFail = length < layout.metadataEnd || length <= layout.lastDataStart;
      try {
        await openAndReadEverything(path);
        assert.ok(!mustFail, `truncated to ${length} bytes (metadata ends at ${layout.metadataEnd}) but read without error`);
      } catch (err) {
        assert.ok(err instanceof BadInputError, `truncated to ${length}: ${String((err as Error)?.stack ?? err)}`);
        assert.match(err.message, /truncated\.qcow2/, 'the error names the file');
      }
    }
  });

  it('rejects random garbage', { timeout: 10_000 }, async () => {
    const rand = prng(2);
    for (let i = 0; i < 40; i++) {
      const garbage = prngBytes(`garbage-${i}`, Math.floor(rand() * 200 * KiB));
      if (i % 2 === 1 && garbage.length >= 8) {
        garbage.writeUInt32BE(0x514649fb, 0);
        garbage.writeUInt32BE(2 + (i % 4 === 1 ? 1 : 0), 4);
      }
      const path = writeContentFile('garbage.bin', garbage);
      await expectBadInput(() => openAndReadEverything(path));
    }
  });

  it('rejects absurd header fields without allocating for them', { timeout: 10_000 }, async () => {
    const cases: Array<[string, (b: Buffer) => unknown]> = [
      ['huge-l1', (b) => b.writeUInt32BE(0x7fffffff, 36)],
      ['l1-past-eof', (b) => b.writeUInt32BE(0x100000, 36)],
      ['huge-size', (b) => b.writeBigUInt64BE(1n << 60n, 24)],
      ['size-beyond-l1', (b) => b.writeBigUInt64BE(1n << 45n, 24)],
      ['l1-offset-unaligned', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(40) + 8n, 40)],
      ['cluster-bits-8', (b) => b.writeUInt32BE(8, 20)],
      ['cluster-bits-22', (b) => b.writeUInt32BE(22, 20)],
      ['refcount-order-7', (b) => b.writeUInt32BE(7, 96)],
      ['header-length', (b) => b.writeUInt32BE(0xffff0000, 100)],
      ['backing-name-huge', (b) => { b.writeBigUInt64BE(512n, 8); b.writeUInt32BE(0xffffff, 16); }],
      ['version-4', (b) => b.writeUInt32BE(4, 4)],
    ];
    for (const [name, mutate] of cases) {
      const before = process.memoryUsage().rss;
      await expectBadInput(() => openAndReadEverything(variant(name, mutate)), /^qcow2_/);
      assert.ok(process.memoryUsage().rss - before < 64 * MiB, `${name}: memory grew`);
    }
  });

  it('rejects L1 and L2 entries that point past the end of the file', { timeout: 10_000 }, async () => {
    const layout = referencedLayout(sample);
    const l1Offset = Number(sample.readBigUInt64BE(40));
    const l2PastEof = variant('l2-past-eof', (b) => b.writeBigUInt64BE((1n << 63n) | (1n << 40n), l1Offset));
    await expectBadInput(() => openAndReadEverything(l2PastEof), 'qcow2_damaged');
    const dataPastEof = variant('data-past-eof', (b) => b.writeBigUInt64BE((1n << 63n) | (1n << 40n), layout.dataEntries[0]));
    const err = await expectBadInput(() => openAndReadEverything(dataPastEof), 'qcow2_damaged');
    assert.match(err.message, /beyond the end of the file/);
    const unaligned = variant('data-unaligned', (b) => b.writeBigUInt64BE((1n << 63n) | 4096n + 512n, layout.dataEntries[0]));
    await expectBadInput(() => openAndReadEverything(unaligned), 'qcow2_damaged');
    const badCompressed = variant('compressed-garbage', (b) => b.writeBigUInt64BE((1n << 62n) | (3n << 54n) | 4096n, layout.dataEntries[0]));
    await expectBadInput(() => openAndReadEverything(badCompressed), 'qcow2_damaged');
  });

  it('rejects backing-file loops and missing backing files', { timeout: 10_000 }, async () => {
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', 'loop-a.qcow2', '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-b.qcow2', '1M');
    await expectBadInput(() => openAndReadEverything(join(dir, 'loop-a.qcow2')), 'qcow2_backing_loop');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', './self.qcow2', '-F', 'qcow2', 'self.qcow2', '1M');
    await expectBadInput(() => openAndReadEverything(join(dir, 'self.qcow2')), 'qcow2_backing_loop');
    qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'nowhere.qcow2', '-F', 'qcow2', 'orphan.qcow2', '1M');
    const err = await expectBadInput(() => openAndReadEverything(join(dir, 'orphan.qcow2')), 'qcow2_backing_missing');
    assert.match(err.message, /nowhere\.qcow2/);
  });

  it('rejects images not closed cleanly or marked corrupt', { timeout: 10_000 }, async () => {
    const dirty = await expectBadInput(() => openAndReadEverything(variant('dirty', (b) => { b[79] |= 1; })), 'qcow2_dirty');
    assert.match(dirty.message, /not closed cleanly/);
    assert.match(dirty.hint ?? '', /qemu-img check -r all/);
    const corrupt = await expectBadInput(() => openAndReadEverything(variant('corrupt', (b) => { b[79] |= 2; })), 'qcow2_corrupt');
    assert.match(corrupt.hint ?? '', /qemu-img check -r all/);
  });

  it('rejects encryption, external data files and unknown features', { timeout: 15_000 }, async () => {
    await luksImages;
    const luks = await expectBadInput(() => openAndReadEverything(join(dir, 'luks.qcow2')), 'qcow2_unsupported');
    assert.match(luks.message, /encrypted \(LUKS\)/);
    const aes = await expectBadInput(() => openAndReadEverything(variant('aes', (b) => b.writeUInt32BE(1, 32))), 'qcow2_unsupported');
    assert.match(aes.message, /encrypted \(AES\)/);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'data_file=external.raw', 'external.qcow2', '1M');
    const external = await expectBadInput(() => openAndReadEverything(join(dir, 'external.qcow2')), 'qcow2_unsupported');
    assert.match(external.message, /external data file/);
    const unknown = await expectBadInput(() => openAndReadEverything(variant('unknown-feature', (b) => { b[77] |= 0x10; })), 'qcow2_unsupported');
    assert.match(unknown.message, /bit 20/);
    await expectBadInput(() => openAndReadEverything(writeContentFile('plain.raw', Buffer.alloc(4096))), 'qcow2_not_qcow2');
  });

  it('survives random byte flips in headers, tables and compressed data (3 s fuzz)', { timeout: 30_000 }, async () => {
    const plain = readFileSync(fromContent('fuzz-plain', 256 * KiB, ['-o', 'cluster_size=512'])());
    const zstd = readFileSync(fromContent('fuzz-zstd', 256 * KiB, ['-o', 'cluster_size=4k,compression_type=zstd'], true)());
    const deflate = readFileSync(fromContent('fuzz-deflate', 256 * KiB, ['-o', 'cluster_size=4k'], true)());
    const extended = readFileSync(fromContent('fuzz-ext', 256 * KiB, ['-o', 'cluster_size=16k,extended_l2=on'])());
    const targets = [plain, zstd, deflate, extended].map((image) => ({ image, area: referencedLayout(image).metadataEnd }));
    const path = join(dir, 'fuzz.qcow2');
    const rand = prng(3);
    const deadline = Date.now() + 3000;
    let rounds = 0;
    let failures = 0;
    while (Date.now() < deadline) {
      const target = targets[rounds % targets.length];
      const mutated = Buffer.from(target.image);
      const flips: number[] = [];
      for (let n = 1 + Math.floor(rand() * 4); n > 0; n--) {
        // Mostly in the metadata, sometimes anywhere (compressed streams, data).
        const at = Math.floor(rand() * (rand() < 0.8 ? target.area : mutated.length));
        mutated[at] ^= 1 << Math.floor(rand() * 8);
        flips.push(at);
      }
      writeFileSync(path, mutated);
      try {
        await openAndReadEverything(path, 1 * MiB);
      } catch (err) {
        failures++;
        assert.ok(err instanceof TresorError, `round ${rounds}, flips at ${flips.join(',')}: ${String((err as Error)?.stack ?? err)}`);
      }
      rounds++;
    }
    assert.ok(rounds > 50, `only ${rounds} fuzz rounds ran`);
    assert.ok(failures > 0, 'the fuzz never produced an error: it is not reaching the metadata');
  });
});

// ---------------------------------------------------------------------------------------------
// Raw images and format probing

describe('raw images', () => {
  it('reads a raw file as one data extent', { timeout: 10_000 }, async () => {
    const content = diskContent('raw-read', 3 * MiB + 512);
    const path = writeContentFile('plain-read.raw', content);
    const disk = await openRaw(path);
    try {
      assert.equal(disk.size, content.length);
      assert.deepEqual(await collectExtents(disk), [{ offset: 0, length: content.length, kind: 'data' }]);
      assert.ok((await disk.read(0, disk.size)).equals(content));
      assert.ok((await disk.read(12345, 99999)).equals(content.subarray(12345, 12345 + 99999)));
      await assert.rejects(disk.read(disk.size - 10, 11), TresorError);
    } finally {
      await disk.close();
    }
  });

  it('writes a sparse raw file that qemu-img sees as identical', { timeout: 10_000 }, async () => {
    const content = diskContent('raw-write', 8 * MiB);
    const reference = writeContentFile('raw-write.reference', content);
    const path = join(dir, 'raw-written.raw');
    const writer = await createRawWriter(path, content.length);
    const rand = prng(5);
    const pieces: Array<[number, number]> = [];
    for (let pos = 0; pos < content.length;) {
      const end = Math.min(content.length, pos + 1 + Math.floor(rand() * 300 * KiB));
      pieces.push([pos, end]);
      pos = end;
    }
    pieces.sort(() => rand() - 0.5);
    await Promise.all(pieces.map(([start, end]) => writer.write(start, content.subarray(start, end))));
    await writer.close();
    qemuImg('compare', '-f', 'raw', '-F', 'raw', reference, path);
    let zeroBlocks = 0;
    for (let pos = 0; pos < content.length; pos += 4096) if (content.subarray(pos, pos + 4096).every((b) => b === 0)) zeroBlocks++;
    const allocated = statSync(path).blocks * 512;
    assert.ok(allocated <= content.length - zeroBlocks * 4096 + 64 * KiB, `raw file not sparse: ${allocated} bytes allocated`);

    const aborted = join(dir, 'raw-aborted.raw');
    const w2 = await createRawWriter(aborted, MiB);
    await w2.write(0, Buffer.alloc(4096, 1));
    await w2.abort();
    assert.equal(existsSync(aborted), false);
    await expectBadInput(() => createRawWriter(path, MiB), 'target_exists');
  });

  it('sizes, reads and writes a block device (loop device)', { timeout: 20_000 }, async () => {
    const backingFile = writeContentFile('loop.img', Buffer.alloc(4 * MiB, 0xff));
    const device = run('losetup', ['--find', '--show', backingFile]).trim();
    try {
      const disk = await openRaw(device);
      try {
        assert.equal(disk.size, 4 * MiB);
        assert.equal((await disk.read(4 * MiB - 1, 1))[0], 0xff);
      } finally {
        await disk.close();
      }
      const writer = await createRawWriter(device, 3 * MiB);
      const data = prngBytes('loop', 100 * KiB);
      await writer.write(MiB + 17, data);
      await writer.close();
      run('sync', []);
      const after = readFileSync(backingFile);
      assert.ok(after.subarray(MiB + 17, MiB + 17 + data.length).equals(data));
      assert.ok(after.subarray(0, MiB + 17).every((b) => b === 0), 'unwritten ranges of a device are zeroed');
      assert.ok(after.subarray(MiB + 17 + data.length, 3 * MiB).every((b) => b === 0), 'unwritten ranges of a device are zeroed');
      assert.ok(after.subarray(3 * MiB).every((b) => b === 0xff), 'nothing beyond the disk is touched');
    } finally {
      run('losetup', ['-d', device]);
    }
  });
});

describe('probeImageFormat', () => {
  it('names the formats qemu-img writes', { timeout: 20_000 }, async () => {
    const source = writeContentFile('probe.raw', diskContent('probe', 1 * MiB));
    const expected: Array<[string, string[], string]> = [
      ['qcow2', ['-O', 'qcow2'], 'qcow2'],
      ['qcow', ['-O', 'qcow'], 'qcow'],
      ['qed', ['-O', 'qed'], 'qed'],
      ['vmdk', ['-O', 'vmdk'], 'vmdk'],
      ['vhd', ['-O', 'vpc'], 'vhd'],
      ['vhd-fixed', ['-O', 'vpc', '-o', 'subformat=fixed'], 'vhd'],
      ['vhdx', ['-O', 'vhdx'], 'vhdx'],
      ['vdi', ['-O', 'vdi'], 'vdi'],
      ['parallels', ['-O', 'parallels'], 'parallels'],
    ];
    for (const [name, args, format] of expected) {
      const path = join(dir, `probe.${name}`);
      qemuImg('convert', '-f', 'raw', ...args, source, path);
      assert.equal(await probeImageFormat(path), format, name);
    }
    await luksImages;
    assert.equal(await probeImageFormat(join(dir, 'probe.luks')), 'luks');
    assert.equal(await probeImageFormat(source), 'raw');
    const empty = writeContentFile('probe.empty', Buffer.alloc(0));
    assert.equal(await probeImageFormat(empty), 'raw');
    const copy = join(dir, 'probe.copy');
    copyFileSync(source, copy);
    truncateSync(copy, 3000);
    assert.equal(await probeImageFormat(copy), 'raw');
  });
});
