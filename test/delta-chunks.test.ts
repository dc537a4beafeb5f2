/**
 * Delta chunks (repository format §4, §5): an incremental backup stores a chunk that its source
 * marks changed only in part as a zstd frame against the parent's chunk in that slot. Through
 * the library on a local repository, with a disk source that reports changed and unchanged
 * extents like a dirty bitmap: the deltas are made and small; every reader decodes them (restore,
 * the snapshot device behind file restore and instant recovery, verify, check, sync, which sends
 * them as deltas where the target has their base); garbage
 * collection keeps a base alive after the snapshot that brought it is forgotten, also when it
 * plans while the incremental that needs the base runs; a base is a plain chunk or a delta whose
 * base is plain (two levels, never three); a damaged base is named, and so is every delta and
 * snapshot it breaks.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { LocalStore } from '../src/store/local.ts';
import { Repository } from '../src/repo/repository.ts';
import { BlobType, computeId, encodeBlob } from '../src/repo/codec.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import { DiskMapReader } from '../src/repo/disk-map.ts';
import type { SnapshotManifest } from '../src/repo/manifest.ts';
import { packName } from '../src/repo/pack.ts';
import { verifyRepository } from '../src/repo/verify.ts';
import { checkRepository } from '../src/repo/check.ts';
import { forgetSnapshots } from '../src/repo/prune.ts';
import { collectGarbage } from '../src/repo/gc.ts';
import { syncRepositories } from '../src/repo/sync.ts';
import { backupDisk } from '../src/engine/disk-backup.ts';
import { restoreImage } from '../src/engine/image-restore.ts';
import { openSnapshotDisk } from '../src/engine/snapshot-device.ts';
import { SnapshotSession } from '../src/engine/snapshot-writer.ts';
import { BLOCK, BackupHistory, BitmapSource, Prng, assertBaseOk, deltaEntries, text } from './helpers/bitmap-disk.ts';
import { tempDir } from './helpers/tmp.ts';

const PASS = 'delta chunk test passphrase';

/** A BitmapSource that records which 64 KiB blocks were read; `lie`: unchanged blocks read as garbage. */
class RecordingSource extends BitmapSource {
  readonly #read = new Set<number>();
  readonly #changed: Set<number>;
  readonly #lie: boolean;

  constructor(data: Buffer, dirty: Set<number>, lie: boolean) {
    super(data, dirty);
    this.#changed = dirty;
    this.#lie = lie;
  }

  override async read(offset: number, length: number): Promise<Buffer> {
    const out = await super.read(offset, length);
    for (let b = Math.floor(offset / BLOCK); b * BLOCK < offset + length; b++) {
      this.#read.add(b);
      if (this.#lie && !this.#changed.has(b)) {
        const from = Math.max(b * BLOCK, offset) - offset;
        out.fill(0xee, from, Math.min((b + 1) * BLOCK, offset + length) - offset);
      }
    }
    return out;
  }

  blocksRead(): number[] {
    return [...this.#read].sort((a, b) => a - b);
  }
}
const CHUNK = 128 << 10;
const SLOTS = 48;
const SIZE = SLOTS * CHUNK;

describe('delta chunks', { timeout: 180_000 }, () => {
  let tmp: { path: string; cleanup(): Promise<void> };
  let store: LocalStore;
  let repo: Repository;
  let pool: CodecPool;
  const history = new BackupHistory('delta');
  const { snaps, stats, disks } = history;

  const backup = (source: BitmapSource, parent: SnapshotManifest | undefined) => history.backup(repo, source, parent);

  /** Rewrites `bytes` at `offset` in each of `slots`; returns the new disk and its dirty 64 KiB blocks. */
  const rewrite = (from: Buffer, slots: number[], offset: number, bytes: number, prng: Prng): { data: Buffer; dirty: Set<number> } => {
    const data = Buffer.from(from);
    const dirty = new Set<number>();
    for (const s of slots) {
      const at = s * CHUNK + offset;
      (s % 2 === 0 ? text(prng, bytes) : randomBytes(bytes)).copy(data, at);
      for (let b = Math.floor(at / BLOCK); b * BLOCK < at + bytes; b++) dirty.add(b);
    }
    return { data, dirty };
  };

  const restoresAs = async (r: Repository, snapshot: string, expected: Buffer): Promise<void> => {
    const out = join(tmp.path, `restored-${Math.random().toString(36).slice(2)}.raw`);
    await restoreImage(r, snapshot, out, { format: 'raw' });
    assert.ok(readFileSync(out).equals(expected), `${snapshot} restores byte-identical`);
  };

  /** Syncs everything into a new repository with another key, then hands it to `check`. */
  const syncToNewRepository = async (name: string, check: (target: Repository, targetPool: CodecPool) => Promise<void>): Promise<void> => {
    const targetStore = await LocalStore.open(join(tmp.path, name), { create: true });
    try {
      const { repo: target } = await Repository.init(targetStore, { encryption: 'aes-256-gcm', passphrase: 'other', scrypt: { N: 1024, r: 8, p: 1 }, dictionaryBytes: 0 });
      const targetPool = new CodecPool(target.keys);
      try {
        await syncRepositories(repo, target, { sourcePool: pool, targetPool });
        await check(target, targetPool);
      } finally {
        await targetPool.close();
      }
    } finally {
      await targetStore.close();
    }
  };

  before(async () => {
    tmp = await tempDir('tresor-delta-');
    store = await LocalStore.open(join(tmp.path, 'repo'), { create: true });
    ({ repo } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: { N: 1024, r: 8, p: 1 }, packSize: 1 << 20, dictionaryBytes: 0 }));
    pool = new CodecPool(repo.keys);
    // Even slots text, odd slots random; slot 7 left as a hole.
    const prng = new Prng(7);
    const disk = Buffer.alloc(SIZE);
    for (let s = 0; s < SLOTS; s++) if (s !== 7) (s % 2 === 0 ? text(prng, CHUNK) : randomBytes(CHUNK)).copy(disk, s * CHUNK);
    await backup(new BitmapSource(disk), undefined);
  });
  after(async () => {
    await pool?.close();
    await store?.close();
    await tmp?.cleanup();
  });

  it('stores chunks changed in part as small deltas against the parent, and each snapshot restores exactly', async () => {
    assert.equal(repo.config.version, 3, 'new repositories are version 3 (may hold delta chunks, two levels deep)');
    const prng = new Prng(11);
    // 4 KiB into slots 2..21 (one 64 KiB block of two each): partial; slots 30, 31 rewritten whole.
    const partialSlots = Array.from({ length: 20 }, (_, i) => i + 2).filter((s) => s !== 7);
    const partial = rewrite(disks[0], partialSlots, 70_000, 4096, prng);
    const whole = rewrite(partial.data, [30, 31], 0, CHUNK, prng);
    // Slot 7 was a hole: a partial write there has no base and is stored plain.
    const hole = rewrite(whole.data, [7], 4096, 4096, prng);
    const dirty = new Set([...partial.dirty, ...whole.dirty, ...hole.dirty]);
    // The second half of slot 40 discarded (reads as zeros): changed in part as well.
    await backup(new BitmapSource(hole.data, dirty, new Set([40 * 2 + 1])), snaps[0]);

    const s = stats[1];
    assert.equal(s.newChunks, partialSlots.length + 4, 'every rewritten slot is a new chunk');
    assert.equal(s.deltaChunks, partialSlots.length + 1, 'exactly the partly rewritten chunks with a parent chunk became deltas');
    const deltas = await deltaEntries(repo);
    assert.equal(deltas.length, partialSlots.length + 1);
    for (const d of deltas) {
      assert.equal(d.loc.type, BlobType.deltaChunk);
      assert.equal(d.baseLoc?.type, BlobType.chunk, 'a base is a plain chunk (the full backup made no deltas)');
      // 4 KiB of new data (random in half of them): a delta is far below a compressed 128 KiB chunk.
      assert.ok(d.loc.length < 6000, `delta chunk ${d.id.toString('hex')} is ${d.loc.length} bytes`);
    }
    await restoresAs(repo, snaps[0].name, disks[0]);
    await restoresAs(repo, snaps[1].name, disks[1]);
  });

  it('an incremental stores its plain new chunks at the repository\'s incremental level (1 by default), a full backup at the main setting', async () => {
    assert.equal(repo.config.compression.incrementalLevel, 1);
    const index = await repo.index();
    const level1 = { ...repo.keys, compressionLevel: 1, compressionStrategy: undefined, compressionTuning: undefined };
    const stored = (disk: Buffer, slot: number) => {
      const plain = disk.subarray(slot * CHUNK, (slot + 1) * CHUNK);
      const id = computeId(repo.keys, plain);
      return { id, length: index.get(id)!.length, main: encodeBlob(repo.keys, BlobType.chunk, id, plain).length, fast: encodeBlob(level1, BlobType.chunk, id, plain).length };
    };
    // Slot 30 holds text, rewritten whole by the incremental (zstd is deterministic: equal settings, equal sizes).
    const full = stored(disks[0], 30);
    const incremental = stored(disks[1], 30);
    assert.ok(full.main < full.fast, `the main setting compresses text better (${full.main} < ${full.fast})`);
    assert.equal(full.length, full.main, 'the full backup used the main setting');
    assert.equal(incremental.length, incremental.fast, 'the incremental used level 1');
  });

  it('reads deltas through the snapshot device (file restore, instant recovery)', async () => {
    const device = await openSnapshotDisk(repo, snaps[1].name);
    try {
      for (const slot of [2, 3, 7, 21, 30]) {
        const got = await device.device.read(slot * CHUNK + 60_000, 20_000);
        assert.ok(got.equals(disks[1].subarray(slot * CHUNK + 60_000, slot * CHUNK + 80_000)), `slot ${slot} reads back`);
      }
    } finally {
      await device.close();
    }
  });

  it('makes deltas against parents that are deltas of plain chunks (two levels), never deeper', async () => {
    const prng = new Prng(13);
    // Slots 2-4 are deltas against the full backup's chunks: their changes become second-level deltas.
    const again = rewrite(disks[1], [2, 3, 4], 10_000, 4096, prng);
    await backup(new BitmapSource(again.data, again.dirty), snaps[1]);
    assert.equal(stats[2].newChunks, 3);
    assert.equal(stats[2].deltaChunks, 3, 'against the parents, which are deltas of plain chunks');
    // Their parents are now second-level deltas: a third level is never made.
    const third = rewrite(disks[2], [2, 3, 4], 30_000, 4096, prng);
    await backup(new BitmapSource(third.data, third.dirty), snaps[2]);
    assert.equal(stats[3].newChunks, 3);
    assert.equal(stats[3].deltaChunks, 0, 'the parents are second-level deltas: stored plain');
    for (const d of await deltaEntries(repo)) assertBaseOk(d);
    await restoresAs(repo, snaps[2].name, disks[2]);
    await restoresAs(repo, snaps[3].name, disks[3]);
  });

  it('sync sends deltas as deltas against the target\'s copy of their base, into a repository with another key', async () => {
    await syncToNewRepository('target', async (target, targetPool) => {
      const sourceDeltas = await deltaEntries(repo);
      const targetDeltas = await deltaEntries(target);
      // Oldest first: the full snapshot's chunks (the bases) are there before the deltas.
      assert.equal(targetDeltas.length, sourceDeltas.length);
      for (const d of targetDeltas) assertBaseOk(d);
      for (const s of snaps) await restoresAs(target, s.name, disks[snaps.indexOf(s)]);
      assert.deepEqual((await verifyRepository(target, targetPool)).damage, []);
    });
  });

  it('verify and check pass; garbage collection keeps bases after the snapshot that brought them is forgotten', async () => {
    assert.equal((await verifyRepository(repo, pool)).ok, true);
    assert.equal((await checkRepository(repo, pool)).ok, true);
    await forgetSnapshots(repo, [snaps[0].name]);
    const report = await collectGarbage(repo, { pool, maxWaitMs: 0, pollMs: 10, repackThreshold: 0.01 });
    assert.equal(report.missingBlobs, 0);
    const deltas = await deltaEntries(repo);
    assert.ok(deltas.length > 0);
    for (const d of deltas) assertBaseOk(d, `base ${d.base.toString('hex')} (and its own) survived garbage collection`);
    await restoresAs(repo, snaps[1].name, disks[1]);
    await restoresAs(repo, snaps[2].name, disks[2]);
    await restoresAs(repo, snaps[3].name, disks[3]);
    const verified = await verifyRepository(repo, pool);
    assert.deepEqual(verified.damage, []);
  });

  it('sync stores a delta plain when its base never reaches the target (its snapshot was forgotten first)', async () => {
    await syncToNewRepository('target2', async (target) => {
      // The first incremental's deltas lost their bases' snapshot: they arrive plain, and the
      // second-level deltas made on them arrive as first-level deltas against those copies.
      const source = await deltaEntries(repo);
      const copied = await deltaEntries(target);
      assert.equal(source.filter((d) => d.baseLoc?.type === BlobType.deltaChunk).length, 3);
      assert.equal(copied.length, 3);
      for (const d of copied) assert.equal(d.baseLoc?.type, BlobType.chunk);
      for (const k of [1, 2, 3]) await restoresAs(target, snaps[k].name, disks[k]);
    });
  });

  it('a garbage collection planned while an incremental with deltas runs keeps the bases it needs', async () => {
    // Slots 2-4 of the newest snapshot are plain chunks (the third level was refused): a 4 KiB change in each makes three deltas on them.
    const parent = snaps[3];
    const change = rewrite(disks[3], [2, 3, 4], 20_000, 4096, new Prng(17));
    const session = await SnapshotSession.start(repo, 'delta test (gc race)');
    let made: SnapshotManifest;
    try {
      const parentMap = await DiskMapReader.open(repo, parent.name, parent.disks[0]);
      const r = await backupDisk(repo, session.pool, session.writer, new BitmapSource(change.data, change.dirty), { parent: parentMap });
      assert.equal(r.stats.deltaChunks, 3);
      const disk = { name: 'disk0', sourceFormat: 'raw', ...(await r.map.finish()) };
      // Meanwhile the parent is forgotten and a gc plans: the bases are referenced by nothing committed.
      await forgetSnapshots(repo, [parent.name]);
      const pending = await collectGarbage(repo, { pool, maxWaitMs: 0, pollMs: 10, repackThreshold: 0.01 });
      assert.equal(pending.complete, false, 'the gc waits for the running backup');
      made = await session.commit({ type: 'image', id: 'delta', source: { kind: 'image-file', path: 'memory', format: 'raw' } },
        new Date(Date.now() + 60_000), [disk], parent.name, r.stats);
    } finally {
      await session.close();
    }
    const done = await collectGarbage(repo, { pool, maxWaitMs: 5000, pollMs: 10 });
    assert.equal(done.complete, true);
    assert.ok(done.rescuedBlobs >= 3, `the bases are rescued (${done.rescuedBlobs} rescued)`);
    for (const d of await deltaEntries(repo)) assertBaseOk(d, `base ${d.base.toString('hex')} is still there`);
    await restoresAs(repo, made.name, change.data);
    snaps.push(made);
    disks.push(change.data);
  });
  it('reads only the changed blocks of a partly changed chunk: the rest comes from the parent\'s chunk, or from the source when that cannot be read', async () => {
    const dir = await tempDir('tresor-trim-');
    const trimStore = await LocalStore.open(join(dir.path, 'repo'), { create: true });
    try {
      const { repo: r } = await Repository.init(trimStore, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: { N: 1024, r: 8, p: 1 }, dictionaryBytes: 0 });
      const h = new BackupHistory('trim');
      const prng = new Prng(21);
      const d0 = Buffer.alloc(SIZE);
      for (let s = 0; s < SLOTS; s++) (s % 2 === 0 ? text(prng, CHUNK) : randomBytes(CHUNK)).copy(d0, s * CHUNK);
      await h.backup(r, new BitmapSource(d0), undefined);
      // Changed: 4 KiB in the second block of slot 3; blocks 41..44 (slot 20's second half
      // through slot 22's first half), one run whose ends are unchanged halves.
      const d1 = Buffer.from(d0);
      randomBytes(4096).copy(d1, 3 * CHUNK + 70_000);
      randomBytes(4 * BLOCK).copy(d1, 41 * BLOCK);
      const dirty1 = new Set([7, 41, 42, 43, 44]);
      // A source that answers garbage for unchanged blocks: reading one would show in the restore.
      const lying = new RecordingSource(d1, dirty1, true);
      await h.backup(r, lying, h.snaps[0]);
      assert.deepEqual(lying.blocksRead(), [7, 41, 42, 43, 44], 'only the changed blocks were read');
      assert.equal(h.stats[1].trimmedBytes, 3 * BLOCK, 'three unchanged halves came from the parent\'s chunks');
      assert.equal(h.stats[1].bytesRead, 5 * BLOCK);
      assert.equal(h.stats[1].deltaChunks, 3);
      await restoresAs(r, h.snaps[1].name, d1);

      // The parent's chunk of slot 3 damaged: its unchanged block is read from the source instead.
      const index = await r.index();
      const map = await DiskMapReader.open(r, h.snaps[1].name, h.snaps[1].disks[0]);
      const loc = index.get((await map.ids(3, 1)).subarray(0, 32))!;
      const path = join(dir.path, 'repo', packName(loc.packId));
      const bytes = readFileSync(path);
      bytes[loc.offset + Math.floor(loc.length / 2)] ^= 0x40;
      writeFileSync(path, bytes);
      const d2 = Buffer.from(d1);
      randomBytes(4096).copy(d2, 3 * CHUNK + 80_000);
      const honest = new RecordingSource(d2, new Set([7]), false);
      await h.backup(r, honest, h.snaps[1]);
      assert.deepEqual(honest.blocksRead(), [6, 7], 'the unchanged block whose base is damaged was read from the source');
      assert.equal(h.stats[2].trimmedBytes, 0);
      assert.equal(h.stats[2].deltaChunks, 0, 'without a readable base the chunk is stored whole');
      await restoresAs(r, h.snaps[2].name, d2);
    } finally {
      await trimStore.close();
      await dir.cleanup();
    }
  });

  it('a damaged base is named, with every delta it breaks and the snapshots they hold', async () => {
    const victim = (await deltaEntries(repo)).find((d) => d.baseLoc?.type === BlobType.chunk)!;
    const baseLoc = victim.baseLoc!;
    const path = join(tmp.path, 'repo', packName(baseLoc.packId));
    const bytes = readFileSync(path);
    bytes[baseLoc.offset + Math.floor(baseLoc.length / 2)] ^= 0x40;
    writeFileSync(path, bytes);
    const report = await verifyRepository(repo, pool);
    assert.equal(report.ok, false);
    const base = report.damage.find((d) => d.object.includes(victim.base.toString('hex')) && d.object.startsWith('chunk'));
    assert.ok(base, `the base is named: ${JSON.stringify(report.damage.map((d) => d.object))}`);
    const delta = report.damage.find((d) => d.object.startsWith(`delta chunk ${victim.id.toString('hex')}`));
    assert.ok(delta, 'the delta made against it is named');
    assert.match(delta.error, /its base cannot be read/);
    // With the snapshots that hold the delta (the one that made it, and later ones that kept the slot).
    const broken = delta.affects.map((a) => a.snapshot);
    assert.ok(broken.length > 0 && broken.every((name) => snaps.some((s) => s.name === name)), `affects ${broken.join(', ')}`);
    await assert.rejects(restoreImage(repo, broken[0], join(tmp.path, 'broken.raw'), { format: 'raw' }),
      (err: Error) => /delta chunk .* cannot be decoded/.test(err.message) && err.message.includes(victim.base.toString('hex')));
  });
});
