/**
 * The two-level disk map (repository format §8, disk-map.ts): pieces of slot ids listed by
 * disk-map nodes. A small repository shape (4 KiB chunks, 4 slots per piece, 3 piece ids per
 * node) gives a disk of many nodes, so every path that walks a map crosses node boundaries:
 * backup, restore, a second backup that shares unchanged nodes, verify naming a damaged node and
 * every snapshot it affects, garbage collection keeping nodes, and version-1 manifests (piece ids
 * listed in the manifest) still restoring and verifying.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { LocalStore } from '../src/store/local.ts';
import type { BlobStore } from '../src/store/store.ts';
import { Repository } from '../src/repo/repository.ts';
import { BlobType } from '../src/repo/codec.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import { DiskMapReader, pieceIds } from '../src/repo/disk-map.ts';
import type { SnapshotManifest } from '../src/repo/manifest.ts';
import { packName } from '../src/repo/pack.ts';
import { verifyRepository } from '../src/repo/verify.ts';
import { backupImage } from '../src/engine/image-backup.ts';
import { restoreImage } from '../src/engine/image-restore.ts';
import { tresorOk } from './helpers/cli.ts';
import { BLOCK, BackupHistory, BitmapSource } from './helpers/bitmap-disk.ts';
import { backupDisk } from '../src/engine/disk-backup.ts';
import { SnapshotSession } from '../src/engine/snapshot-writer.ts';
import { writeDamageRecord } from '../src/repo/damage-records.ts';
import { forgetSnapshots } from '../src/repo/prune.ts';
import { collectGarbage } from '../src/repo/gc.ts';
import { tempDir } from './helpers/tmp.ts';

const PASS = 'disk-map test passphrase';
const CHUNK = 4096;
const SLOTS = 203; // 51 pieces of 4 slots (the last one 3), 17 nodes of 3 pieces
const SIZE = SLOTS * CHUNK - 1000; // the last slot is short

describe('two-level disk maps', { timeout: 120_000 }, () => {
  let tmp: { path: string; cleanup(): Promise<void> };
  let dir: string;
  let store: LocalStore;
  let repo: Repository;
  const image = () => join(dir, 'disk.raw');

  before(async () => {
    tmp = await tempDir('tresor-disk-map-');
    dir = tmp.path;
    store = await LocalStore.open(join(dir, 'repo'), { create: true });
    ({ repo } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: { N: 1024, r: 8, p: 1 }, chunkSize: CHUNK, pieceSlots: 4, nodeIds: 3 }));
    // Data with holes: every fifth slot left zero, the rest random.
    const disk = Buffer.alloc(SIZE);
    for (let s = 0; s < SLOTS; s++) if (s % 5 !== 0) randomBytes(Math.min(CHUNK, SIZE - s * CHUNK)).copy(disk, s * CHUNK);
    writeFileSync(image(), disk);
  });
  after(async () => {
    await store?.close();
    await tmp?.cleanup();
  });

  const restoreAndCompare = async (snapshot: string, expected: Buffer): Promise<void> => {
    const out = join(dir, `restored-${Math.random().toString(36).slice(2)}.raw`);
    await restoreImage(repo, snapshot, out, { format: 'raw' });
    assert.ok(readFileSync(out).equals(expected), `${snapshot} restores byte-identical`);
  };

  const verify = async () => {
    const lock = await repo.lock('shared', 'test verify');
    const pool = new CodecPool(repo.keys, 1);
    try {
      repo.invalidateIndex();
      return await verifyRepository(repo, pool);
    } finally {
      await pool.close();
      await lock.release();
    }
  };

  let first: SnapshotManifest;
  let second: SnapshotManifest;

  it('a backup lists nodes, not pieces, and restores byte-identical', async () => {
    first = await backupImage(repo, image(), { id: 'd' });
    assert.equal(first.version, 2);
    const disk = first.disks[0];
    assert.equal(disk.pieces, undefined, 'no piece list in a version-2 manifest');
    assert.equal(disk.nodeIds, 3);
    assert.equal(disk.nodes?.length, 17);
    const stored = JSON.parse(JSON.stringify(first)) as SnapshotManifest;
    assert.equal(stored.disks[0].pieces, undefined);
    const lock = await repo.lock('shared', 'test');
    try {
      assert.equal((await pieceIds(repo, first.name, disk)).length, 51);
    } finally {
      await lock.release();
    }
    await restoreAndCompare(first.name, readFileSync(image()));
  });

  it('a second backup shares every node its change did not touch', async () => {
    const disk = readFileSync(image());
    randomBytes(100).copy(disk, 7 * CHUNK + 5); // slot 7: piece 1, node 0
    writeFileSync(image(), disk);
    await new Promise((r) => setTimeout(r, 1100)); // snapshot names have one-second resolution
    second = await backupImage(repo, image(), { id: 'd' });
    const a = first.disks[0].nodes!;
    const b = second.disks[0].nodes!;
    assert.notEqual(a[0], b[0], 'the node over the change is new');
    assert.deepEqual(a.slice(1), b.slice(1), 'every other node is shared');
    await restoreAndCompare(second.name, disk);
  });

  it('a scan with read-ahead loads each piece once, also for readers lagging a few pieces behind', async () => {
    // Count every piece a ranged read brings, through a repository over a store that looks.
    const lock = await repo.lock('shared', 'test scan');
    try {
      const index = await repo.index();
      const ids = await pieceIds(repo, first.name, first.disks[0]);
      const where = new Map<string, Array<{ offset: number; end: number }>>();
      for (const id of ids) {
        const loc = index.get(Buffer.from(id, 'hex'))!;
        const list = where.get(packName(loc.packId)) ?? [];
        list.push({ offset: loc.offset, end: loc.offset + loc.length });
        where.set(packName(loc.packId), list);
      }
      let loaded = 0;
      const looking: BlobStore = {
        location: store.location,
        create: (name, data) => store.create(name, data),
        read: (name, range) => {
          for (const x of where.get(name) ?? []) if (range === undefined || (x.offset >= range.offset && x.end <= range.offset + range.length)) loaded++;
          return store.read(name, range);
        },
        stat: (name) => store.stat(name),
        list: (prefix) => store.list(prefix),
        delete: (name) => store.delete(name),
        close: async () => undefined,
      };
      const seen = await Repository.open(looking, async () => PASS);
      const reader = await DiskMapReader.open(seen, first.name, first.disks[0], { readAhead: 4 });
      // Pieces in order, each followed by one two behind it (a batch still waiting for its data).
      for (let p = 0; p < ids.length; p++) {
        assert.equal((await reader.piece(p)).length, Math.min(4, SLOTS - p * 4) * 32);
        if (p >= 2) assert.equal((await reader.piece(p - 2)).length, 4 * 32);
      }
      assert.equal(loaded, ids.length, 'every piece once');
    } finally {
      await lock.release();
    }
  });

  it('verify names a damaged node and every snapshot whose map it holds', async () => {
    assert.equal((await verify()).ok, true);
    const node = first.disks[0].nodes![5]; // shared by both snapshots
    const lock = await repo.lock('shared', 'test');
    const loc = (await repo.index()).get(Buffer.from(node, 'hex'))!;
    await lock.release();
    assert.equal(loc.type, BlobType.mapNode);
    const path = join(dir, 'repo', packName(loc.packId));
    const original = readFileSync(path);
    const bad = Buffer.from(original);
    bad[loc.offset + (loc.length >> 1)] ^= 0x20;
    writeFileSync(path, bad);
    try {
      const report = await verify();
      assert.equal(report.ok, false);
      const damage = report.damage.find((d) => d.object === `disk-map node ${node}`);
      assert.ok(damage, `the node is named: ${JSON.stringify(report.damage)}`);
      assert.deepEqual(damage.affects.map((x) => x.snapshot).sort(), [first.name, second.name].sort());
      assert.ok(damage.copy && damage.copy.type === BlobType.mapNode, 'it can be healed from a copy');
      await assert.rejects(restoreImage(repo, first.name, join(dir, 'never.raw'), { format: 'raw' }), /disk-map node 5 of disk disk0/);
    } finally {
      writeFileSync(path, original);
    }
    assert.equal((await verify()).ok, true);
  });

  it('a version-1 manifest (piece ids in the manifest) still restores and verifies', async () => {
    const lock = await repo.lock('shared', 'test');
    let v1: SnapshotManifest;
    try {
      const pieces = await pieceIds(repo, first.name, first.disks[0]);
      const { nodes: _nodes, nodeIds: _nodeIds, ...disk } = first.disks[0];
      v1 = { ...first, version: 1, name: first.name.replace(/T(\d{6})Z$/, 'T000001Z'), disks: [{ ...disk, pieces }] };
      assert.equal((await repo.commitSnapshot(v1)).created, true);
    } finally {
      await lock.release();
    }
    // The version-1 copy lists the first snapshot's pieces: it must restore what the first does.
    const firstContent = join(dir, 'first.raw');
    await restoreImage(repo, first.name, firstContent, { format: 'raw' });
    await restoreAndCompare(v1.name, readFileSync(firstContent));
    assert.equal((await verify()).ok, true);
  });

  it('garbage collection keeps the nodes of live snapshots and drops the others', async () => {
    const env = { TRESOR_PASSPHRASE: PASS };
    const loc = join(dir, 'repo');
    await tresorOk(['--repo', loc, '--json', 'prune', '--all', '--keep-last', '1'], { env });
    // Any garbage at all makes a pack worth rewriting: the first snapshot's own node must go.
    const gc = await tresorOk(['--repo', loc, '--json', 'gc', '--repack-threshold', '0.001'], { env });
    assert.equal(gc.complete, true);
    const lock = await repo.lock('shared', 'test');
    try {
      repo.invalidateIndex();
      const index = await repo.index();
      const { snapshots } = await repo.listSnapshots();
      assert.deepEqual(snapshots.map((m) => m.name), [second.name]);
      const kept = snapshots[0];
      for (const n of kept.disks[0].nodes!) assert.ok(index.has(Buffer.from(n, 'hex')), 'a live node stays');
      assert.ok(!index.has(Buffer.from(first.disks[0].nodes![0], 'hex')), 'the first snapshot\'s own node is gone');
    } finally {
      await lock.release();
    }
    assert.equal((await verify()).ok, true);
  });
});

describe('an incremental\'s disk map', { timeout: 120_000 }, () => {
  // 4 KiB chunks, 4 slots per piece: a 64 KiB dirty block (BitmapSource) is 16 slots, 4 pieces.
  const slots = 256;
  let tmp: { path: string; cleanup(): Promise<void> };
  let store: LocalStore;
  let repo: Repository;
  const history = new BackupHistory('reuse');
  let disk: Buffer;

  before(async () => {
    tmp = await tempDir('tresor-map-reuse-');
    store = await LocalStore.open(join(tmp.path, 'repo'), { create: true });
    ({ repo } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: { N: 1024, r: 8, p: 1 }, chunkSize: CHUNK, pieceSlots: 4, nodeIds: 16 }));
    // Random slots with a hole every seventh slot.
    disk = Buffer.alloc(slots * CHUNK);
    for (let s = 0; s < slots; s++) if (s % 7 !== 3) randomBytes(CHUNK).copy(disk, s * CHUNK);
    await history.backup(repo, new BitmapSource(disk), undefined);
  });
  after(async () => {
    await store?.close();
    await tmp?.cleanup();
  });

  /** An incremental from the last snapshot; returns its manifest and how many pieces it took by id. */
  const incremental = async (data: Buffer, dirtyBlocks: number[]): Promise<{ manifest: SnapshotManifest; reusedPieces: number }> => {
    const parent = history.snaps.at(-1)!;
    const session = await SnapshotSession.start(repo, 'map reuse test');
    try {
      const parentMap = await DiskMapReader.open(repo, parent.name, parent.disks[0]);
      const made = await backupDisk(repo, session.pool, session.writer, new BitmapSource(data, new Set(dirtyBlocks)), { parent: parentMap });
      const record = { name: 'disk0', sourceFormat: 'raw', ...(await made.map.finish()) };
      const manifest = await session.commit({ type: 'image', id: 'reuse', source: { kind: 'image-file', path: 'memory', format: 'raw' } },
        new Date(Date.now() + history.snaps.length * 1000), [record], parent.name, made.stats);
      history.snaps.push(manifest);
      return { manifest, reusedPieces: made.map.reusedPieces };
    } finally {
      await session.close();
    }
  };

  const pieceList = async (m: SnapshotManifest): Promise<string[]> => {
    const lock = await repo.lock('shared', 'test');
    try {
      return await pieceIds(repo, m.name, m.disks[0]);
    } finally {
      await lock.release();
    }
  };

  const restoresAs = async (m: SnapshotManifest, expected: Buffer): Promise<void> => {
    const out = join(tmp.path, `restored-${Math.random().toString(36).slice(2)}.raw`);
    await restoreImage(repo, m.name, out, { format: 'raw' });
    assert.ok(readFileSync(out).equals(expected), `${m.name} restores byte-identical`);
  };

  it('takes every piece its change did not touch from the parent by id, without storing it', async () => {
    const parent = history.snaps.at(-1)!;
    const changed = Buffer.from(disk);
    randomBytes(1000).copy(changed, 2 * BLOCK + 5 * CHUNK + 17); // block 2: slots 32-47, pieces 8-11; slot 37 (piece 9) changes
    const { manifest, reusedPieces } = await incremental(changed, [2]);
    const before = await pieceList(parent);
    const now = await pieceList(manifest);
    assert.equal(now.length, slots / 4);
    // Pieces 8-11 were read again (their block is dirty) and hashed; only piece 9 differs.
    assert.equal(reusedPieces, slots / 4 - 4);
    assert.deepEqual(now.map((id, p) => id === before[p] ? '=' : p), before.map((_, p) => p === 9 ? 9 : '='));
    assert.equal(manifest.disks[0].dataChunks, parent.disks[0].dataChunks);
    assert.equal(manifest.disks[0].dataBytes, parent.disks[0].dataBytes);
    await restoresAs(manifest, changed);
    disk = changed;
  });

  it('does not take a piece that holds a chunk it may not reuse, nor one whose own blob it may not reuse', async () => {
    const parent = history.snaps.at(-1)!;
    const before = await pieceList(parent);
    const lock = await repo.lock('shared', 'test');
    const chunkInPiece20 = Buffer.alloc(32);
    const piece40 = Buffer.from(before[40], 'hex');
    const damagedPack = new Map<string, string>();
    try {
      const index = await repo.index();
      const map = await DiskMapReader.open(repo, parent.name, parent.disks[0]);
      (await map.ids(81, 1)).copy(chunkInPiece20); // slot 81: piece 20
      // As verify records a damaged copy: neither copy may be reused by a backup from now on.
      const copies = [chunkInPiece20, piece40].map((id) => {
        const loc = index.get(id)!;
        damagedPack.set(id.toString('hex'), loc.packId.toString('hex'));
        return { type: loc.type, id: id.toString('hex'), pack: loc.packId.toString('hex'), error: 'test: said to be damaged' };
      });
      await writeDamageRecord(repo.store, repo.keys, copies);
    } finally {
      await lock.release();
    }
    repo.invalidateIndex();
    const { manifest, reusedPieces } = await incremental(disk, []);
    // Slot 81 is read again (same bytes, same chunk: piece 20 is then the same piece, found in
    // the index); piece 40 is stored again. Every other piece is the parent's, taken by id.
    assert.equal(reusedPieces, slots / 4 - 2);
    assert.deepEqual(await pieceList(manifest), before);
    const lock2 = await repo.lock('shared', 'test');
    try {
      repo.invalidateIndex();
      const index = await repo.index();
      // A copy other than the damaged one now exists (the index prefers it).
      for (const id of [chunkInPiece20, piece40]) {
        assert.notEqual(index.get(id)!.packId.toString('hex'), damagedPack.get(id.toString('hex')), `${id.toString('hex')} was stored again`);
      }
    } finally {
      await lock2.release();
    }
    await restoresAs(manifest, disk);
  });

  it('a garbage collection planned while the incremental runs keeps the parent\'s pieces it took by id', async () => {
    const parent = history.snaps.at(-1)!;
    const session = await SnapshotSession.start(repo, 'map reuse test (gc race)');
    const pool = new CodecPool(repo.keys, 1);
    let made: SnapshotManifest;
    try {
      const parentMap = await DiskMapReader.open(repo, parent.name, parent.disks[0]);
      const r = await backupDisk(repo, session.pool, session.writer, new BitmapSource(disk, new Set()), { parent: parentMap });
      assert.equal(r.map.reusedPieces, slots / 4, 'every piece taken by id');
      const record = { name: 'disk0', sourceFormat: 'raw', ...(await r.map.finish()) };
      // Meanwhile every earlier snapshot is forgotten and a collection plans: nothing committed
      // references the pieces any more.
      await forgetSnapshots(repo, history.snaps.map((m) => m.name));
      const pending = await collectGarbage(repo, { pool, maxWaitMs: 0, pollMs: 10, repackThreshold: 0.01 });
      assert.equal(pending.complete, false, 'the collection waits for the running backup');
      made = await session.commit({ type: 'image', id: 'reuse', source: { kind: 'image-file', path: 'memory', format: 'raw' } },
        new Date(Date.now() + 60_000), [record], parent.name, r.stats);
    } finally {
      await session.close();
    }
    try {
      const done = await collectGarbage(repo, { pool, maxWaitMs: 5000, pollMs: 10 });
      assert.equal(done.complete, true);
      assert.ok(done.rescuedBlobs >= slots / 4, `the pieces are rescued (${done.rescuedBlobs} rescued)`);
      await restoresAs(made, disk);
      const lock = await repo.lock('shared', 'test verify');
      try {
        repo.invalidateIndex();
        const report = await verifyRepository(repo, pool);
        assert.equal(report.ok, true, JSON.stringify(report.damage));
      } finally {
        await lock.release();
      }
    } finally {
      await pool.close();
    }
  });
});
