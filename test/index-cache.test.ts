/**
 * The local index cache (repo/index-cache.ts): a second process gets the same blob index from
 * the cache plus the index files written since as from the index files; a cache that does not
 * authenticate, or is another repository's, is ignored and replaced; after garbage collection
 * supersedes index files the index comes from the files again; verification always reads the
 * files and still finds a damaged index file that the cache holds.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFile, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LocalStore } from '../src/store/local.ts';
import type { BlobStore } from '../src/store/store.ts';
import { Repository } from '../src/repo/repository.ts';
import type { BlobIndex } from '../src/repo/blob-index.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import { indexCachePath } from '../src/repo/index-cache.ts';
import { verifyRepository } from '../src/repo/verify.ts';
import { forgetSnapshots } from '../src/repo/prune.ts';
import { collectGarbage } from '../src/repo/gc.ts';
import { backupImage } from '../src/engine/image-backup.ts';
import { restoreImage } from '../src/engine/image-restore.ts';
import type { SnapshotManifest } from '../src/repo/manifest.ts';
import { tempDir } from './helpers/tmp.ts';

const PASS = 'index cache test passphrase';
const CHUNK = 4096;
const FAST_SCRYPT = { N: 1024, r: 8, p: 1 };

/** Every entry of an index, as sorted text: two indexes are the same when these are. */
function dump(index: BlobIndex): string {
  return [...index.entries()]
    .map(([id, l]) => `${id.toString('hex')} ${l.packId.toString('hex')} ${l.type} ${l.offset} ${l.length} ${l.rawLength} ${l.base?.toString('hex') ?? '-'}`)
    .sort().join('\n');
}

describe('local index cache', { timeout: 120_000 }, () => {
  let tmp: { path: string; cleanup(): Promise<void> };
  let store: LocalStore;
  const cache = () => join(tmp.path, 'cache');
  const snaps: Array<{ manifest: SnapshotManifest; image: Buffer }> = [];
  let repositoryId = '';

  /** The repository as a new process opens it (with the cache unless `withCache` is false). */
  const open = async (withCache = true): Promise<Repository> => {
    const repo = await Repository.open(store, async () => PASS);
    if (withCache) repo.useIndexCache(cache());
    return repo;
  };
  const fromFiles = async (): Promise<{ dump: string; files: string[] }> => {
    const repo = await open(false);
    return { dump: dump(await repo.index()), files: [...repo.indexFiles].sort() };
  };
  const backup = async (repo: Repository, n: number): Promise<void> => {
    // Shares most chunks with the snapshot before (deduplicated), changes some, adds some.
    const image = Buffer.concat([snaps.at(-1)?.image.subarray(0, 40 * CHUNK) ?? randomBytes(40 * CHUNK), randomBytes(10 * CHUNK + 123)]);
    const file = join(tmp.path, `disk-${n}.raw`);
    await writeFile(file, image);
    snaps.push({ manifest: await backupImage(repo, file, { id: 'disk' }), image });
  };
  const restoresAs = async (repo: Repository, snap: { manifest: SnapshotManifest; image: Buffer }): Promise<void> => {
    const out = join(tmp.path, `restored-${randomBytes(4).toString('hex')}.raw`);
    await restoreImage(repo, snap.manifest.name, out, { format: 'raw' });
    assert.ok((await readFile(out)).equals(snap.image), `${snap.manifest.name} restores byte-identical`);
  };
  const verify = async (repo: Repository) => {
    const pool = new CodecPool(repo.keys, 1);
    const lock = await repo.lock('shared', 'test verify');
    try {
      return await verifyRepository(repo, pool);
    } finally {
      await lock.release();
      await pool.close();
    }
  };

  before(async () => {
    tmp = await tempDir('tresor-index-cache-');
    store = await LocalStore.open(join(tmp.path, 'repo'), { create: true });
    const { repo } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: FAST_SCRYPT, chunkSize: CHUNK });
    repositoryId = repo.config.id;
    for (let n = 0; n < 3; n++) await backup(await open(false), n);
  });
  after(async () => {
    await store?.close();
    await tmp?.cleanup();
  });

  it('a second process loads the index from the cache plus the files written since: the same index as from the files', async () => {
    const first = await open();
    const files = await fromFiles();
    assert.equal(dump(await first.index()), files.dump);
    assert.deepEqual(first.indexLoadedFrom, { cache: false, filesRead: files.files.length }, 'no cache yet: every file is read');
    await first.indexCacheWrite;
    const path = indexCachePath(cache(), repositoryId);
    assert.equal((await stat(path)).mode & 0o777, 0o600);

    const second = await open();
    assert.equal(dump(await second.index()), files.dump);
    assert.deepEqual(second.indexLoadedFrom, { cache: true, filesRead: 0 });
    assert.deepEqual([...second.indexFiles].sort(), files.files);

    // A backup through a cached index writes an index file of its own; the next load reads
    // only that one file, and the result is the index from the files.
    await backup(second, 3);
    const third = await open();
    const after = await fromFiles();
    assert.equal(after.files.length, files.files.length + 1);
    assert.equal(dump(await third.index()), after.dump);
    assert.deepEqual(third.indexLoadedFrom, { cache: true, filesRead: 1 });
    assert.deepEqual([...third.indexFiles].sort(), after.files);
    await restoresAs(third, snaps.at(-1)!);
    await restoresAs(third, snaps[0]);
    // `fresh` loads from the files even when the index came from the cache.
    await third.index({ fresh: true });
    assert.deepEqual(third.indexLoadedFrom, { cache: false, filesRead: after.files.length });
    await third.indexCacheWrite;

    // An index file the cache came from is gone without a file superseding it (a repository
    // put back from an older copy): the cache is not used.
    const newest = after.files.find((f) => !files.files.includes(f))!;
    const kept = await readFile(join(tmp.path, 'repo', newest));
    await store.delete(newest);
    try {
      const rolledBack = await open();
      assert.equal(dump(await rolledBack.index()), (await fromFiles()).dump);
      assert.equal(rolledBack.indexLoadedFrom?.cache, false, 'a cache from files no longer listed is not used');
    } finally {
      await writeFile(join(tmp.path, 'repo', newest), kept);
    }
  });

  it('a load that a fresh one overtakes does not become the index, nor report on it', async () => {
    // The first (cached) load lists the index files only after the fresh one has finished.
    let delay = true;
    const slowFirst: BlobStore = {
      location: store.location,
      create: (name, data) => store.create(name, data),
      read: (name, range) => store.read(name, range),
      stat: (name) => store.stat(name),
      list: (prefix) => {
        if (prefix !== 'index/' || !delay) return store.list(prefix);
        delay = false;
        return (async function* () {
          await new Promise((resolve) => setTimeout(resolve, 300));
          yield* store.list(prefix);
        })();
      },
      delete: (name) => store.delete(name),
      close: () => store.close(),
    };
    const repo = await Repository.open(slowFirst, async () => PASS);
    repo.useIndexCache(cache());
    const first = repo.index();
    const fresh = await repo.index({ fresh: true });
    assert.deepEqual(repo.indexLoadedFrom?.cache, false);
    const overtaken = await first;
    assert.notEqual(overtaken, fresh, 'two loads ran');
    assert.equal(await repo.index(), fresh, 'the fresh load stays the index');
    assert.equal(repo.indexLoadedFrom?.cache, false, 'the overtaken load does not report');
    assert.deepEqual([...repo.indexFiles].sort(), (await fromFiles()).files);
  });

  it('a cache that does not authenticate, or is another repository\'s, is ignored and replaced', async () => {
    const warm = await open();
    await warm.index();
    await warm.indexCacheWrite;
    const path = indexCachePath(cache(), repositoryId);
    const good = await readFile(path);
    const files = await fromFiles();
    for (const at of [3, 9, 30, Math.floor(good.length / 2), good.length - 1]) {
      const bad = Buffer.from(good);
      bad[at] ^= 0x10;
      await writeFile(path, bad);
      const repo = await open();
      assert.equal(dump(await repo.index()), files.dump, `byte ${at} flipped: the index still comes out right`);
      assert.equal(repo.indexLoadedFrom?.cache, false, `byte ${at} flipped: the cache is not used`);
      await repo.indexCacheWrite;
      assert.ok((await readFile(path)).length > 0 && !(await readFile(path)).equals(bad), 'and it is replaced');
    }
    await writeFile(path, good.subarray(0, good.length >> 1));
    const truncated = await open();
    assert.equal(dump(await truncated.index()), files.dump);
    assert.equal(truncated.indexLoadedFrom?.cache, false, 'a truncated cache is not used');
    await truncated.indexCacheWrite;

    // Another repository (here: an unencrypted one, whose caches carry a checksum) never takes
    // this repository's cache, and its own works.
    const otherStore = await LocalStore.open(join(tmp.path, 'other'), { create: true });
    try {
      const { repo: other } = await Repository.init(otherStore, { encryption: 'none', chunkSize: CHUNK });
      const image = join(tmp.path, 'other.raw');
      await writeFile(image, randomBytes(20 * CHUNK));
      await backupImage(other, image, { id: 'other' });
      await copyFile(path, indexCachePath(cache(), other.config.id));
      const openOther = async () => {
        const r = await Repository.open(otherStore, async () => '');
        r.useIndexCache(cache());
        return r;
      };
      const o1 = await openOther();
      const expected = dump(await (await Repository.open(otherStore, async () => '')).index());
      assert.equal(dump(await o1.index()), expected);
      assert.equal(o1.indexLoadedFrom?.cache, false, 'another repository\'s cache is not used');
      await o1.indexCacheWrite;
      const o2 = await openOther();
      assert.equal(dump(await o2.index()), expected);
      assert.equal(o2.indexLoadedFrom?.cache, true, 'an unencrypted repository\'s own cache is used');
      const sum = await readFile(indexCachePath(cache(), other.config.id));
      sum[sum.length - 40] ^= 1;
      await writeFile(indexCachePath(cache(), other.config.id), sum);
      const o3 = await openOther();
      assert.equal(dump(await o3.index()), expected);
      assert.equal(o3.indexLoadedFrom?.cache, false, 'a cache whose checksum fails is not used');
    } finally {
      await otherStore.close();
    }
    assert.deepEqual((await readdir(cache())).filter((n) => n.endsWith('.tmp')), [], 'no temporary files are left');
  });

  it('after garbage collection supersedes index files the index comes from the files; verification always reads them', async () => {
    const warm = await open();
    await warm.index();
    await warm.indexCacheWrite;
    // Forget the first snapshot and collect: its chunks go, the packs that held them are
    // repacked, and a new index file supersedes the old ones.
    // What a collection that died after writing its new index file but before deleting the old
    // ones leaves: kept to put back below.
    const before = new Map<string, Buffer>();
    for (const name of await readdir(join(tmp.path, 'repo', 'index'))) before.set(`index/${name}`, await readFile(join(tmp.path, 'repo', 'index', name)));
    const cacheBefore = await readFile(indexCachePath(cache(), repositoryId));
    const gcRepo = await open();
    await forgetSnapshots(gcRepo, [snaps[0].manifest.name]);
    const pool = new CodecPool(gcRepo.keys, 1);
    try {
      const report = await collectGarbage(gcRepo, { pool, maxWaitMs: 0, pollMs: 10, repackThreshold: 0.01 });
      assert.equal(report.complete, true);
      assert.ok(report.deletedPacks > 0, 'packs were rewritten');
    } finally {
      await pool.close();
    }
    await gcRepo.indexCacheWrite;
    const files = await fromFiles();
    const repo = await open();
    assert.equal(dump(await repo.index()), files.dump);
    await restoresAs(repo, snaps.at(-1)!);
    await restoresAs(repo, snaps[1]);

    // The superseded files back, and the cache from before the collection: every file the cache
    // came from is listed again, but the new file supersedes some of them.
    const gone = [...before.keys()].filter((name) => !files.files.includes(name));
    assert.ok(gone.length > 0, 'the collection deleted superseded index files');
    for (const name of gone) await writeFile(join(tmp.path, 'repo', name), before.get(name)!);
    await writeFile(indexCachePath(cache(), repositoryId), cacheBefore);
    const resurrected = await open();
    assert.equal(dump(await resurrected.index()), (await fromFiles()).dump);
    assert.equal(resurrected.indexLoadedFrom?.cache, false, 'a cache some listed file supersedes is not used');
    await restoresAs(resurrected, snaps[1]);
    await resurrected.indexCacheWrite;
    // The cache written then skips the superseded files that are still listed.
    const skipping = await open();
    assert.equal(dump(await skipping.index()), (await fromFiles()).dump);
    assert.deepEqual(skipping.indexLoadedFrom, { cache: true, filesRead: 0 });
    for (const name of gone) await store.delete(name);

    // A damaged index file that the cache holds: a backup's load does not read it, but
    // verification reads every file and reports it.
    const cached = await open();
    await cached.index();
    assert.equal(cached.indexLoadedFrom?.cache, true);
    const victim = [...cached.indexFiles].sort()[0];
    const bytes = await readFile(join(tmp.path, 'repo', victim));
    bytes[bytes.length >> 1] ^= 0x01;
    await writeFile(join(tmp.path, 'repo', victim), bytes);
    const report = await verify(cached);
    assert.equal(cached.indexLoadedFrom?.cache, false, 'verification loads the index from the files');
    assert.ok(report.damage.some((d) => d.kind === 'index-file' && d.object === victim), `the damaged index file is reported: ${JSON.stringify(report.damage)}`);
    // A process with a cache that this damage makes wrong to write: the damaged load is not cached.
    const after = await open();
    await after.index({ fresh: true });
    assert.equal(after.indexCacheWrite, undefined, 'an index loaded with a damaged file is not cached');
  });
});
