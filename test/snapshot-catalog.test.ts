/**
 * The local snapshot catalog (repo/snapshot-catalog.ts): a filtered listing reads only the
 * manifests it selects once the catalog knows the others; what it returns is always the
 * repository's own, checked manifests; pruned snapshots drop out; a catalog that was tampered
 * with, or belongs to another repository, is ignored and rebuilt; and no catalog means the same
 * answers as before.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, readdir, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LocalStore } from '../src/store/local.ts';
import type { BlobStore } from '../src/store/store.ts';
import { Repository } from '../src/repo/repository.ts';
import { CATALOG_MAX_AGE_MS, SWEEP_EVERY_MS, SWEPT_MARKER } from '../src/repo/snapshot-catalog.ts';
import type { SnapshotManifest } from '../src/repo/manifest.ts';
import { tempDir } from './helpers/tmp.ts';

const PASS = 'catalog test passphrase';

/** Counts reads of snapshot manifests. */
function counting(store: BlobStore): { store: BlobStore; reads: () => number } {
  let reads = 0;
  const wrapped: BlobStore = {
    location: store.location,
    create: (name, data) => store.create(name, data),
    read: (name, range) => {
      if (name.startsWith('snapshots/')) reads++;
      return store.read(name, range);
    },
    stat: (name) => store.stat(name),
    list: (prefix) => store.list(prefix),
    delete: (name) => store.delete(name),
    close: () => store.close(),
  };
  return { store: wrapped, reads: () => { const n = reads; reads = 0; return n; } };
}

function manifest(id: string, hour: number): SnapshotManifest {
  const time = new Date(Date.UTC(2026, 10, 1, hour)).toISOString();
  return {
    format: 'tresor-snapshot', version: 2, name: `vm/${id}/${time.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}`, type: 'vm', id, time,
    parent: null, tags: {}, source: {}, disks: [], stats: { bytesRead: 0, newChunks: 0, reusedChunks: 0, holeChunks: 0, unchangedChunks: 0, addedBytes: 0, durationMs: 0 },
  } as unknown as SnapshotManifest;
}

describe('snapshot catalog', () => {
  let tmp: { path: string; cleanup(): Promise<void> };
  let base: LocalStore;
  const cache = () => join(tmp.path, 'cache');
  const open = async (withCatalog = true) => {
    const c = counting(base);
    const repo = await Repository.open(c.store, async () => PASS);
    if (withCatalog) await repo.useSnapshotCatalog(cache());
    return { repo, reads: c.reads };
  };

  before(async () => {
    tmp = await tempDir('tresor-catalog-');
    base = await LocalStore.open(join(tmp.path, 'repo'), { create: true });
    const { repo } = await Repository.init(base, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: { N: 1024, r: 8, p: 1 } });
    for (let h = 0; h < 4; h++) for (const id of ['web', 'db', 'mail']) await repo.commitSnapshot(manifest(id, h));
  });
  after(async () => {
    await tmp?.cleanup();
  });

  it('reads every manifest once, then only the selected ones; answers match a listing without catalog', async () => {
    const { repo, reads } = await open();
    const first = await repo.listSnapshots({ type: 'vm', id: 'db' });
    assert.equal(reads(), 12, 'the first listing learns every manifest');
    assert.deepEqual(first.snapshots.map((m) => m.name), (await (await open(false)).repo.listSnapshots({ id: 'db' })).snapshots.map((m) => m.name));
    assert.equal(first.snapshots.length, 4);
    // A fresh process: the catalog comes from disk.
    const again = await open();
    assert.equal((await again.repo.latestSnapshot('vm', 'db'))?.name, first.snapshots.at(-1)?.name);
    assert.equal(again.reads(), 1, 'the latest: only the newest manifest of the id is read');
    assert.equal((await again.repo.listSnapshots({ type: 'vm', id: 'db' })).snapshots.length, 4);
    assert.equal(again.reads(), 4, 'only the selected manifests are read');
    // A new snapshot is learnt on the next listing; an unfiltered listing reads everything.
    await again.repo.commitSnapshot(manifest('web', 9));
    assert.equal((await again.repo.listSnapshots({ id: 'db' })).snapshots.length, 4);
    assert.equal(again.reads(), 5, 'the 4 selected and the 1 unknown');
    assert.equal((await again.repo.listSnapshots()).snapshots.length, 13);
    assert.equal(again.reads(), 13);
  });

  it('the latest snapshot: a newer one the catalog does not know wins; a pruned or damaged newest gives the one before', async () => {
    const { repo, reads } = await open();
    await repo.listSnapshots();
    reads();
    const newer = manifest('mail', 20);
    await repo.commitSnapshot(newer);
    assert.equal((await repo.latestSnapshot('vm', 'mail'))?.name, newer.name);
    assert.equal(reads(), 1, 'the unknown one, which is the newest');
    const older = manifest('mail', 15); // committed later, older point in time
    await repo.commitSnapshot(older);
    assert.equal((await repo.latestSnapshot('vm', 'mail'))?.name, newer.name);
    assert.equal(reads(), 2, 'the unknown one and the newest known one');
    await base.delete(repo.snapshotKey(newer.name));
    assert.equal((await repo.latestSnapshot('vm', 'mail'))?.name, older.name, 'pruned: the one before');
    // A damaged newest manifest does not count, as in a listing: the one before it.
    const damaged = manifest('mail', 22);
    await repo.commitSnapshot(damaged);
    await repo.latestSnapshot('vm', 'mail'); // the catalog learns it
    const key = repo.snapshotKey(damaged.name);
    const bytes = Buffer.from(await base.read(key));
    bytes[bytes.length - 5] ^= 0xff;
    await base.delete(key);
    await base.create(key, bytes);
    assert.equal((await repo.latestSnapshot('vm', 'mail'))?.name, older.name, 'damaged: the one before');
    const listed = await repo.listSnapshots({ id: 'mail' });
    assert.equal(listed.snapshots.at(-1)?.name, older.name, 'the same answer as a listing');
    assert.equal(listed.damaged.length, 1);
    for (const m of [older, damaged]) await base.delete(repo.snapshotKey(m.name));
  });

  it('forgets pruned snapshots, and ignores a catalog that fails its MAC or names another repository', async () => {
    const { repo, reads } = await open();
    const dbs = (await repo.listSnapshots({ id: 'db' })).snapshots;
    reads();
    await base.delete(repo.snapshotKey(dbs.at(-1)!.name));
    assert.deepEqual((await repo.listSnapshots({ id: 'db' })).snapshots.map((m) => m.name), dbs.slice(0, -1).map((m) => m.name));
    const file = join(cache(), `${repo.config.id}.json`);
    const saved = JSON.parse(await readFile(file, 'utf8'));
    assert.equal(Object.keys(saved.entries).length, 12, 'the pruned snapshot left the catalog');

    // Relabel a 'web' manifest as 'db' without the key: the MAC fails, the catalog is rebuilt,
    // and the listing is still right (every manifest read again).
    const webKey = Object.keys(saved.entries).find((k) => saved.entries[k].id === 'web')!;
    await writeFile(file, JSON.stringify({ ...saved, entries: { ...saved.entries, [webKey]: { ...saved.entries[webKey], id: 'db' } } }));
    const tampered = await open();
    assert.equal((await tampered.repo.listSnapshots({ id: 'db' })).snapshots.length, 3);
    assert.equal(tampered.reads(), 12);
    // Another repository's catalog under this id's name: ignored too.
    await writeFile(file, JSON.stringify({ ...saved, repository: 'another' }));
    const foreign = await open();
    assert.equal((await foreign.repo.listSnapshots({ id: 'mail' })).snapshots.length, 4);
    assert.equal(foreign.reads(), 12);
    // Rebuilt: the next process reads only what it selects.
    const healed = await open();
    assert.equal((await healed.repo.listSnapshots({ id: 'mail' })).snapshots.length, 4);
    assert.equal(healed.reads(), 4);
  });

  it('removes other repositories\' catalogs untouched for 30 days when it saves, and keeps its own fresh', async () => {
    const dir = cache();
    const day = 24 * 3600 * 1000;
    const aged = async (name: string, ageMs: number) => {
      await writeFile(join(dir, name), '{}');
      const t = (Date.now() - ageMs) / 1000;
      await utimes(join(dir, name), t, t);
    };
    await aged('gone-repository.json', CATALOG_MAX_AGE_MS + day);
    await aged('recent-repository.json', CATALOG_MAX_AGE_MS - day);
    await aged('dead-writer.json.123.abcd.tmp', 2 * 3600 * 1000);
    await aged('not-a-catalog.txt', 10 * CATALOG_MAX_AGE_MS);
    // Our own catalog, idle for longer than the limit: opening it refreshes its time.
    const own = (await readdir(dir)).find((f) => f.endsWith('.json') && !f.includes('repository'))!;
    const idle = (Date.now() - CATALOG_MAX_AGE_MS - day) / 1000;
    await utimes(join(dir, own), idle, idle);
    const s = await open();
    assert.ok(Date.now() - (await stat(join(dir, own))).mtimeMs < day, 'a catalog in use is kept young');
    // A sweep less than a day ago: a save does not sweep again.
    await aged(SWEPT_MARKER, SWEEP_EVERY_MS - 3600 * 1000);
    await s.repo.commitSnapshot(manifest('web', 10));
    await s.repo.listSnapshots({ id: 'web' });
    assert.ok((await readdir(dir)).includes('gone-repository.json'), 'swept less than a day ago: not again');
    // A day later, a new snapshot makes the catalog save; the save sweeps the directory.
    await aged(SWEPT_MARKER, SWEEP_EVERY_MS + 3600 * 1000);
    const added = manifest('web', 11);
    await s.repo.commitSnapshot(added);
    assert.ok((await s.repo.listSnapshots({ id: 'web' })).snapshots.some((m) => m.name === added.name));
    assert.deepEqual((await readdir(dir)).sort(), [own, SWEPT_MARKER, 'not-a-catalog.txt', 'recent-repository.json'].sort());
    assert.ok(Date.now() - (await stat(join(dir, SWEPT_MARKER))).mtimeMs < 60_000, 'the sweep is recorded');
  });
});
