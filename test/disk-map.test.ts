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
