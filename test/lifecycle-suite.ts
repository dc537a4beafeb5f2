/**
 * The repository lifecycle suite (issue 5), through the real CLI against a real backend: local
 * directories (lifecycle-local.test.ts) and Ceph radosgw S3 (lifecycle-s3.test.ts) pass the
 * same tests — prune and protection, garbage collection (also while backups run, and resumed
 * after waiting or a crash), verification records, self-healing, sync to a repository with another
 * key, structure check, append-only keys, and SIGKILL at random points of backup, prune, GC and
 * sync.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { rm } from 'node:fs/promises';
import { tresor, spawnTresor, type CliResult } from './helpers/cli.ts';
import { tempDir } from './helpers/tmp.ts';
import { sha256File } from './helpers/exec.ts';
import { generateCorpus, rewriteCorpus, Prng } from '../bench/corpus.ts';
import { DEFAULTS, Repository } from '../src/repo/repository.ts';
import { packName } from '../src/repo/pack.ts';
import { pieceIds } from '../src/repo/disk-map.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import { verifyRepository } from '../src/repo/verify.ts';
import { checkRepository } from '../src/repo/check.ts';
import { restoreImage } from '../src/engine/image-restore.ts';
import type { BackendFixture } from './repo-suite.ts';

/** A repository backend for the lifecycle tests: the repository suite's, plus deletion behind Tresor's back. */
export interface LifecycleFixture extends BackendFixture {
  /** Deletes an object behind Tresor's back. */
  remove(location: string, name: string): Promise<void>;
  /** SIGKILL trials (backup, prune, gc, sync in turn); at least 30 over both backends. */
  crashTrials: number;
  /** How long GC runs beside a backup loop. */
  concurrentSeconds: number;
  /**
   * Run only the tests whose outcome depends on the backend (prune, GC, sync, crashes), not
   * those of pure repository logic (verification records, self-healing, check, append-only
   * keys), which the local run covers: keeps a slow backend's file under its time budget.
   */
  backendSensitiveOnly?: boolean;
}

export const PASS = 'correct horse battery staple';
export const TARGET_PASS = 'a different passphrase for the off-site copy';

/** Everything but the crash trials (crashSuite), which get a file of their own for time. */
export function lifecycleSuite(fx: LifecycleFixture): void {
  describe(`repository lifecycle on ${fx.label}`, { concurrency: false }, () => suiteBody(fx, 'main'));
}

/** SIGKILL at random points of backup, prune, gc and sync. */
export function crashSuite(fx: LifecycleFixture): void {
  describe(`repository lifecycle crash trials on ${fx.label}`, { concurrency: false }, () => suiteBody(fx, 'crash'));
}

function suiteBody(fx: LifecycleFixture, part: 'main' | 'crash'): void {
  const none = (() => undefined) as unknown as typeof it;
  const mainIt = part === 'main' ? it : none;
  const logicIt = part === 'main' && !fx.backendSensitiveOnly ? it : none;
  const crashIt = part === 'crash' ? it : none;
  let dir: { path: string; cleanup(): Promise<void> };
  let n = 0;
  const env = (extra: Record<string, string | undefined> = {}) => ({ TRESOR_PASSPHRASE: PASS, TRESOR_SYNC_PASSPHRASE: TARGET_PASS, ...fx.env(), ...extra });
  const cli = (loc: string, args: string[], extra: Record<string, string | undefined> = {}): Promise<CliResult> =>
    tresor(['--repo', loc, ...fx.args(), '--json', ...args], { env: env(extra) });
  const ok = async (loc: string, args: string[], extra: Record<string, string | undefined> = {}) => {
    const r = await cli(loc, args, extra);
    assert.equal(r.code, 0, `tresor ${args.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
    return r.json;
  };
  const init = async (extra: string[] = [], pass = PASS) => {
    const loc = await fx.newLocation();
    await ok(loc, ['repo', 'init', ...extra], { TRESOR_PASSPHRASE: pass });
    return loc;
  };
  const localRepo = async (pass = PASS) => {
    const loc = join(dir.path, `local${n++}`);
    const r = await tresor(['--repo', loc, '--json', 'repo', 'init'], { env: { TRESOR_PASSPHRASE: pass } });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    return loc;
  };
  const localCli = (loc: string, args: string[], extra: Record<string, string | undefined> = {}) =>
    tresor(['--repo', loc, ...fx.args(), '--json', ...args], { env: env(extra) });
  const localOk = async (loc: string, args: string[]) => {
    const r = await localCli(loc, args);
    assert.equal(r.code, 0, `tresor ${args.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
    return r.json;
  };
  const image = (size = 16 << 20, seed = 1) => {
    const f = join(dir.path, `img${n++}.raw`);
    generateCorpus(f, { size, seed });
    return f;
  };
  // Assertions go through the library in this process (one process start and key derivation
  // less per check); the operations under test go through the CLI.
  const opened = new Map<string, { repo: Repository; pool: CodecPool }>();
  const open = async (loc: string, pass: string) => {
    let o = opened.get(loc);
    if (!o) {
      const repo = await Repository.open(await fx.openStore(loc), async () => pass);
      o = { repo, pool: new CodecPool(repo.keys, 1) };
      opened.set(loc, o);
    }
    o.repo.invalidateIndex(); // other processes changed it
    return o;
  };
  const api = async (loc: string, pass = PASS): Promise<Repository> => (await open(loc, pass)).repo;
  const names = async (loc: string, pass = PASS): Promise<string[]> => (await (await api(loc, pass)).listSnapshots()).snapshots.map((m) => m.name);
  const restoresTo = async (loc: string, snapshot: string, sha: string, pass = PASS) => {
    const out = join(dir.path, `out${n++}.raw`);
    await restoreImage(await api(loc, pass), snapshot, out, { format: 'raw' });
    assert.equal(await sha256File(out), sha, `${snapshot} restores to the data backed up`);
    await rm(out);
  };
  const verifyClean = async (loc: string, pass = PASS, what = '') => {
    const { repo, pool } = await open(loc, pass);
    const v = await verifyRepository(repo, pool);
    assert.equal(v.ok, true, `${what} verify: ${JSON.stringify(v.damage).slice(0, 3000)}`);
  };
  const checkClean = async (loc: string, pass = PASS) => {
    const { repo, pool } = await open(loc, pass);
    const c = await checkRepository(repo, pool);
    assert.equal(c.ok, true, `check: ${JSON.stringify({ damage: c.damage, issues: c.issues }).slice(0, 3000)}`);
    return c;
  };
  const backup = async (loc: string, img: string, id = 'vm1') => (await ok(loc, ['backup', 'image', img, '--id', id])).snapshot;
  /** `count` backups of `img`, 30 % of it rewritten before each but the first (seeds from `seed`). */
  const backupSeries = async (loc: string, img: string, count: number, seed: number) => {
    const shas: string[] = [];
    const snaps: string[] = [];
    for (let i = 0; i < count; i++) {
      if (i > 0) rewriteCorpus(img, { fraction: 0.3, seed: seed + i });
      shas.push(await sha256File(img));
      snaps.push((await backup(loc, img)).name);
    }
    return { shas, snaps };
  };
  const packs = async (loc: string) => (await fx.list(loc)).filter((o) => o.name.startsWith('data/'));
  const localSyncOk = async (src: string, dst: string) => {
    const r = await cli(src, ['sync', '--to', dst, ...toArgs()]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    return r.json;
  };
  /** --to-s3-endpoint for a sync target on the fixture's backend. */
  const toArgs = () => {
    const at = fx.args().indexOf('--s3-endpoint');
    return at >= 0 ? ['--to-s3-endpoint', fx.args()[at + 1]] : [];
  };

  before(async () => {
    dir = await tempDir('tresor-lifecycle-');
    await fx.setup();
  });
  after(async () => {
    for (const o of opened.values()) {
      await o.pool.close();
      await o.repo.store.close();
    }
    await fx.teardown();
    await dir.cleanup();
  });

  mainIt('prune keeps what the rules say and never a protected snapshot; gc frees the data; what remains restores', async () => {
    const loc = await init();
    const img = image();
    const { shas, snaps } = await backupSeries(loc, img, 4, 10);
    const dry = await ok(loc, ['prune', '--all', '--keep-last', '2', '--dry-run']);
    assert.deepEqual(dry.groups[0].snapshots.map((s: any) => [s.name, s.action, s.reason]), [
      [snaps[3], 'keep', 'keep-last'], [snaps[2], 'keep', 'keep-last'], [snaps[1], 'remove', 'remove'], [snaps[0], 'remove', 'remove'],
    ]);
    assert.deepEqual(await names(loc), snaps, 'a dry run deletes nothing');
    const refused = await cli(loc, ['prune', '--all']);
    assert.equal(refused.code, 2, 'an empty policy is refused');
    await ok(loc, ['protect', snaps[0]]);
    const pruned = await ok(loc, ['prune', '--id', 'vm1', '--keep-last', '1']);
    assert.deepEqual([...pruned.removed].sort(), [snaps[1], snaps[2]].sort());
    assert.equal(pruned.groups[0].snapshots.find((s: any) => s.name === snaps[0]).reason, 'protected');
    const listed = (await ok(loc, ['snapshots'])).snapshots;
    assert.deepEqual(listed.map((s: any) => [s.name, s.protected]), [[snaps[0], true], [snaps[3], false]]);
    const before = (await packs(loc)).reduce((s, p) => s + p.size, 0);
    const gc = await ok(loc, ['gc']);
    assert.equal(gc.complete, true);
    assert.ok(gc.deletedPacks > 0 && gc.freedBytes > 0, JSON.stringify(gc));
    const after = (await packs(loc)).reduce((s, p) => s + p.size, 0);
    assert.ok(after < before, `packs hold ${after} bytes after gc, ${before} before`);
    await verifyClean(loc);
    await restoresTo(loc, snaps[0], shas[0]);
    await restoresTo(loc, snaps[3], shas[3]);
    await ok(loc, ['unprotect', snaps[0]]);
    assert.deepEqual((await ok(loc, ['prune', '--all', '--keep-last', '1'])).removed, [snaps[0]]);
    assert.equal((await ok(loc, ['gc'])).complete, true);
    await verifyClean(loc);
    const c = await checkClean(loc);
    assert.equal(c.notes.filter((x: any) => x.kind === 'unindexed-pack' || x.kind === 'gc-pending').length, 0, JSON.stringify(c.notes));
    await restoresTo(loc, snaps[3], shas[3]);
  });

  logicIt('forget deletes the named snapshots, all or none; the others restore, also after gc', async () => {
    const loc = await init();
    const img = image(8 << 20, 4);
    const { shas, snaps } = await backupSeries(loc, img, 4, 40);
    await ok(loc, ['protect', snaps[2]]);
    // One protected or unknown name fails the call, and nothing is deleted.
    const protectedOne = await cli(loc, ['forget', snaps[0], snaps[2]]);
    assert.equal(protectedOne.code, 1, protectedOne.stdout);
    assert.equal(protectedOne.json.error.code, 'snapshot-protected');
    assert.match(protectedOne.json.error.message, new RegExp(`${snaps[2]} is protected; nothing was deleted`));
    assert.match(protectedOne.json.error.hint, /tresor unprotect/);
    const unknown = await cli(loc, ['forget', snaps[0], 'image/vm1/20200101T000000Z']);
    assert.equal(unknown.code, 5, unknown.stdout);
    assert.equal(unknown.json.error.code, 'no-such-snapshot');
    assert.equal((await cli(loc, ['forget'])).code, 2, 'no name is a usage error');
    const dry = await ok(loc, ['forget', snaps[1], snaps[0], '--dry-run']);
    assert.deepEqual(dry.removed, [snaps[0], snaps[1]].sort());
    assert.deepEqual(await names(loc), snaps, 'refused calls and a dry run delete nothing');
    // The first (full) and the third's parent go: every snapshot stands on its own.
    const forgot = await ok(loc, ['forget', snaps[0], snaps[1], snaps[0]]);
    assert.deepEqual(forgot.removed, [snaps[0], snaps[1]].sort());
    assert.deepEqual(await names(loc), [snaps[2], snaps[3]]);
    const gc = await ok(loc, ['gc']);
    assert.ok(gc.complete && gc.deletedPacks + gc.repackedPacks > 0, JSON.stringify(gc));
    await verifyClean(loc);
    await restoresTo(loc, snaps[2], shas[2]);
    await restoresTo(loc, snaps[3], shas[3]);
    // A backup after the latest snapshot is forgotten is complete, and restores.
    assert.deepEqual((await ok(loc, ['forget', snaps[3]])).removed, [snaps[3]]);
    rewriteCorpus(img, { fraction: 0.3, seed: 50 });
    const next = await backup(loc, img);
    await restoresTo(loc, next.name, await sha256File(img));
    await verifyClean(loc);
  });

  mainIt('gc runs safely while backups run: every snapshot restores afterwards', async () => {
    const loc = await init();
    const img = image(12 << 20, 2);
    const expected = new Map<string, string>();
    const first = await backup(loc, img);
    expected.set(first.name, await sha256File(img));
    let stop = false;
    let backups = 0;
    const loop = (async () => {
      for (let i = 0; !stop; i++) {
        rewriteCorpus(img, { fraction: 0.2, seed: 100 + i });
        const sha = await sha256File(img);
        const r = await cli(loc, ['backup', 'image', img, '--id', 'vm1']);
        assert.equal(r.code, 0, `backup beside gc: ${r.stdout}${r.stderr}`);
        expected.set(r.json.snapshot.name, sha);
        backups++;
      }
    })();
    // A monotonic clock (the wall clock of a VM can step), and at least two GC runs beside two
    // backups however slow the storage is (bounded at 4× the planned time).
    const started = performance.now();
    const elapsed = () => performance.now() - started;
    let gcs = 0;
    let freed = 0;
    try {
      while (elapsed() < fx.concurrentSeconds * 1000 || ((gcs < 2 || backups < 2) && elapsed() < 4 * fx.concurrentSeconds * 1000)) {
        await ok(loc, ['prune', '--all', '--keep-last', '3']);
        const gc = await ok(loc, ['gc', '--max-wait', '60']);
        assert.equal(gc.complete, true, JSON.stringify(gc));
        freed += gc.deletedPacks;
        gcs++;
      }
    } finally {
      stop = true;
      await loop;
    }
    assert.ok(gcs >= 2 && backups >= 2, `${gcs} gc runs beside ${backups} backups`);
    assert.ok(freed > 0, 'gc deleted packs while backups ran');
    await verifyClean(loc);
    for (const s of await names(loc)) await restoresTo(loc, s, expected.get(s)!);
    assert.equal((await ok(loc, ['gc'])).complete, true);
    await verifyClean(loc);
  });

  mainIt('gc waits for operations that started before it; a later run (also after SIGKILL) finishes the job', async () => {
    const loc = await init();
    const img = image(8 << 20, 3);
    const shaA = await sha256File(img);
    const a = await backup(loc, img);
    rewriteCorpus(img, { fraction: 0.5, seed: 7 });
    const shaB = await sha256File(img);
    const b = await backup(loc, img);
    await ok(loc, ['prune', '--all', '--keep-last', '1']);
    const holder = await SharedLockHolder.start(loc, fx.args(), env());
    let gcChild: ChildProcess | undefined;
    try {
      const pending = await ok(loc, ['gc', '--max-wait', '1']);
      assert.equal(pending.complete, false);
      assert.equal(pending.waitingFor.length, 1);
      assert.match(pending.waitingFor[0].operation, /long-running backup/);
      // The repository is sound meanwhile; backups of condemned data store fresh copies.
      await verifyClean(loc);
      generateCorpus(img, { size: 8 << 20, seed: 3 });
      const again = await backup(loc, img, 'vm2');
      assert.ok(again.stats.newChunks > 0, 'data condemned by the pending gc is stored again, not deduplicated');
      // A gc killed while it waits: the next one resumes the same plan.
      gcChild = spawnTresor(['--repo', loc, ...fx.args(), '--json', 'gc', '--max-wait', '60'], { env: env() });
      await sleep(1500);
      gcChild.kill('SIGKILL');
      await new Promise((r) => gcChild!.on('close', r));
    } finally {
      await holder.stop();
    }
    const done = await ok(loc, ['gc']);
    assert.equal(done.resumed, true);
    assert.equal(done.complete, true);
    assert.ok(done.deletedPacks > 0);
    await verifyClean(loc);
    const c = await checkClean(loc);
    assert.equal(c.notes.filter((x: any) => x.kind === 'gc-pending').length, 0);
    await restoresTo(loc, b.name, shaB);
    const again = (await ok(loc, ['snapshots', '--id', 'vm2'])).snapshots[0].name;
    await restoresTo(loc, again, shaA);
    assert.ok(!(await names(loc)).includes(a.name));
  });

  logicIt('verification is recorded per snapshot (--new, --older-than) and shown by tresor snapshots', async () => {
    const loc = await init();
    const img = image(4 << 20, 4);
    await backup(loc, img);
    rewriteCorpus(img, { fraction: 0.3, seed: 1 });
    await backup(loc, img);
    const unverified = (await ok(loc, ['snapshots'])).snapshots;
    assert.ok(unverified.every((s: any) => s.verified === null));
    assert.equal((await ok(loc, ['verify', '--new'])).snapshots.length, 2);
    rewriteCorpus(img, { fraction: 0.3, seed: 2 });
    const third = await backup(loc, img);
    assert.deepEqual((await ok(loc, ['verify', '--new'])).snapshots, [third.name]);
    assert.deepEqual((await ok(loc, ['verify', '--older-than', '1'])).snapshots, []);
    assert.equal((await ok(loc, ['verify', '--older-than', '0', '--no-read-data'])).snapshots.length, 3);
    const listed = (await ok(loc, ['snapshots'])).snapshots;
    for (const s of listed) {
      assert.equal(s.verified.ok, true);
      assert.equal(s.verified.readData, false, 'the newest record (structure only) wins');
      assert.ok(Date.now() - Date.parse(s.verified.time) < 120_000);
    }
    assert.equal((await cli(loc, ['verify', '--new', '--all'])).code, 2);
  });

  logicIt('self-healing: a damaged chunk and index piece are found, the next backup stores them again, verify is clean and the snapshots restore', async () => {
    const loc = await init();
    const img = image(16 << 20, 5);
    const sha = await sha256File(img);
    const s = await backup(loc, img);
    const store = await fx.openStore(loc);
    let chunkPack: string;
    let piecePack: string;
    try {
      const repo = await Repository.open(store, async () => PASS);
      const index = await repo.index();
      const manifest = await repo.readSnapshot(s.name);
      const [firstPiece] = await pieceIds(repo, s.name, manifest.disks[0]);
      const pieceLoc = index.get(Buffer.from(firstPiece, 'hex'))!;
      piecePack = packName(pieceLoc.packId);
      const piece = await repo.readBlob(Buffer.from(firstPiece, 'hex'), 2, () => 'piece');
      let slot = 40;
      while (piece.subarray(slot * 32, slot * 32 + 32).every((b) => b === 0)) slot++;
      const chunkId = piece.subarray(slot * 32, slot * 32 + 32);
      const chunkLoc = index.get(chunkId)!;
      chunkPack = packName(chunkLoc.packId);
      const damage = async (pack: string, at: number) => {
        const data = Buffer.from(await fx.read(loc, pack));
        data[at] ^= 0x20;
        await fx.overwrite(loc, pack, data);
      };
      await damage(chunkPack, chunkLoc.offset + (chunkLoc.length >> 1));
      await damage(piecePack, pieceLoc.offset + (pieceLoc.length >> 1));
    } finally {
      await store.close();
    }
    const v = await cli(loc, ['verify']);
    assert.equal(v.code, 3, v.stdout);
    assert.deepEqual(v.json.damage.map((d: any) => d.kind).sort(), ['index-piece']);
    assert.match(v.json.recorded.damageRecord, /^damaged\//);
    assert.equal((await ok(loc, ['snapshots'])).snapshots[0].verified.ok, false);
    // With the piece healed the chunk damage becomes visible; it heals the same way.
    const healed1 = await backup(loc, img);
    assert.ok(healed1.stats.newChunks === 0 && healed1.stats.addedBytes > 0, JSON.stringify(healed1.stats));
    const v2 = await cli(loc, ['verify']);
    assert.equal(v2.code, 3, v2.stdout);
    assert.deepEqual(v2.json.damage.map((d: any) => d.kind), ['chunk']);
    assert.equal((await cli(loc, ['restore', 'image', s.name, join(dir.path, `bad${n++}.raw`)])).code, 3);
    const healed2 = await backup(loc, img);
    assert.equal(healed2.stats.newChunks, 1, 'exactly the damaged chunk is stored again');
    await verifyClean(loc);
    await restoresTo(loc, s.name, sha);
    const c = await checkClean(loc);
    assert.ok(c.notes.some((x: any) => x.kind === 'damage-record'));
    const gc = await ok(loc, ['gc']);
    assert.ok(gc.damageRecordsDeleted >= 1, JSON.stringify(gc));
    const c2 = await checkClean(loc);
    assert.ok(!c2.notes.some((x: any) => x.kind === 'damage-record' || x.kind === 'duplicate-blobs'), JSON.stringify(c2.notes));
    await verifyClean(loc);
    await restoresTo(loc, s.name, sha);
  });

  mainIt('sync copies snapshots to a repository with another key, sending only missing chunks; its retention is its own; resumable', async () => {
    const src = await localRepo();
    const dst = await init([], TARGET_PASS);
    const img = image(16 << 20, 6);
    await localOk(src, ['backup', 'image', img, '--id', 'web']);
    rewriteCorpus(img, { fraction: 0.1, seed: 1 });
    const s2 = (await localOk(src, ['backup', 'image', img, '--id', 'web'])).snapshot.name;
    const sync = () => localCli(src, ['sync', '--to', dst, ...toArgs()]);
    const r1 = await sync();
    assert.equal(r1.code, 0, r1.stdout + r1.stderr);
    assert.equal(r1.json.copied.length, 2);
    assert.ok(r1.json.chunksAlreadyThere > 0, 'the second snapshot reuses the first one\'s chunks');
    await verifyClean(dst, TARGET_PASS, 'target');
    await restoresTo(dst, s2, await sha256File(img), TARGET_PASS);
    // Another key: the target's objects do not decrypt with the source's passphrase.
    assert.equal((await cli(dst, ['snapshots'], { TRESOR_PASSPHRASE: PASS })).code, 6);

    rewriteCorpus(img, { fraction: 0.05, seed: 2 });
    const s3 = (await localOk(src, ['backup', 'image', img, '--id', 'web'])).snapshot;
    const r2 = await sync();
    assert.equal(r2.code, 0, r2.stdout);
    assert.deepEqual(r2.json.copied, [s3.name]);
    assert.ok(r2.json.chunksSent <= s3.stats.newChunks + 1, `sent ${r2.json.chunksSent} chunks for ${s3.stats.newChunks} new ones`);

    // The target prunes on its own; pruned snapshots are not copied again.
    await ok(dst, ['prune', '--all', '--keep-last', '1'], { TRESOR_PASSPHRASE: TARGET_PASS });
    assert.equal((await ok(dst, ['gc'], { TRESOR_PASSPHRASE: TARGET_PASS })).complete, true);
    const r3 = await sync();
    assert.equal(r3.json.copied.length, 0);
    assert.equal(r3.json.skipped.length, 3);
    assert.deepEqual(await names(dst, TARGET_PASS), [s3.name]);

    // Resumable: kill a sync that is sending, then the next one does not send it again.
    const bigImg = image(64 << 20, 66);
    const big = (await localOk(src, ['backup', 'image', bigImg, '--id', 'web'])).snapshot;
    const packsBefore = (await packs(dst)).length;
    const child = spawnTresor(['--repo', src, ...fx.args(), '--json', 'sync', '--to', dst, ...toArgs()], { env: env() });
    const closed = new Promise((r) => child.on('close', r));
    for (let i = 0; i < 400 && (await packs(dst)).length < packsBefore + 1; i++) await sleep(25);
    child.kill('SIGKILL');
    await closed;
    assert.ok((await packs(dst)).length > packsBefore, 'the killed sync had sent packs');
    assert.ok(!(await names(dst, TARGET_PASS)).includes(big.name), 'the sync was killed before it finished');
    await verifyClean(dst, TARGET_PASS, 'target after a killed sync');
    const r4 = await sync();
    assert.equal(r4.code, 0, r4.stdout);
    assert.ok(r4.json.adoptedPacks >= 1, JSON.stringify(r4.json));
    assert.ok(r4.json.chunksSent < big.stats.newChunks, `resumed sync sent ${r4.json.chunksSent} of ${big.stats.newChunks} new chunks`);
    await verifyClean(dst, TARGET_PASS, 'target after resuming');
    await restoresTo(dst, big.name, await sha256File(bigImg), TARGET_PASS);
    await rm(bigImg);

    // Chunks are copied as they are: another chunk size is refused clearly.
    const other = await init(['--chunk-size', DEFAULTS.chunkSize === 65536 ? '128K' : '64K'], TARGET_PASS);
    const bad = await localCli(src, ['sync', '--to', other, ...toArgs()]);
    assert.equal(bad.code, 1);
    assert.equal(bad.json.error.code, 'chunk-size-mismatch');
    assert.match(bad.json.error.hint, new RegExp(`--chunk-size ${DEFAULTS.chunkSize}\\b`));
  });

  logicIt('check finds orphaned, missing and inconsistent data without reading chunks; --read-data reads them', async () => {
    const loc = await init();
    const img = image(12 << 20, 8);
    const s = await backup(loc, img);
    const c0 = await checkClean(loc);
    assert.equal(c0.bytesRead, 0);
    const [big] = (await packs(loc)).sort((x, y) => y.size - x.size);
    // An orphan: a pack no index names.
    const orphanName = packName(randomBytes(32));
    await fx.overwrite(loc, orphanName, await fx.read(loc, big.name));
    const c1 = await checkClean(loc);
    assert.ok(c1.notes.some((x: any) => x.kind === 'unindexed-pack' && x.object === orphanName), JSON.stringify(c1.notes));
    // Damage inside a chunk: invisible to the structure check, found with --read-data.
    const original = await fx.read(loc, big.name);
    const damaged = Buffer.from(original);
    damaged[damaged.length >> 1] ^= 1;
    await fx.overwrite(loc, big.name, damaged);
    await checkClean(loc);
    const rd = await cli(loc, ['check', '--read-data']);
    assert.equal(rd.code, 3, rd.stdout);
    assert.ok(rd.json.bytesRead > 0);
    assert.ok(rd.json.damage.some((d: any) => d.kind === 'chunk' && d.affects.some((a: any) => a.snapshot === s.name)), JSON.stringify(rd.json.damage).slice(0, 2000));
    await fx.overwrite(loc, big.name, original);
    // An index that disagrees with a pack header.
    const store = await fx.openStore(loc);
    try {
      const repo = await Repository.open(store, async () => PASS);
      const index = await repo.index();
      const [id, l] = [...index.entries()].find(([, x]) => packName(x.packId) === big.name)!;
      await repo.writeIndexFile([{ packId: l.packId, entries: [{ id, type: l.type, offset: l.offset + 1, length: l.length, rawLength: l.rawLength, ...(l.base !== undefined ? { base: l.base } : {}) }] }]);
    } finally {
      await store.close();
    }
    const c2 = await cli(loc, ['check']);
    assert.equal(c2.code, 3, c2.stdout);
    assert.ok(c2.json.issues.some((x: any) => x.kind === 'index-mismatch' && x.object === big.name), JSON.stringify(c2.json.issues));
    // A missing pack.
    await fx.remove(loc, big.name);
    const c3 = await cli(loc, ['check']);
    assert.equal(c3.code, 3);
    assert.ok(c3.json.damage.some((d: any) => d.kind === 'missing-pack' && d.affects.some((a: any) => a.snapshot === s.name)), JSON.stringify(c3.json.damage).slice(0, 2000));
  });

  logicIt('an append-only key can back up and verify but never delete', async () => {
    const loc = await init();
    await ok(loc, ['key', 'add-append-only', '--label', 'hypervisor host'], { TRESOR_NEW_PASSPHRASE: 'append only' });
    const ao = { TRESOR_PASSPHRASE: 'append only' };
    const img = image(4 << 20, 9);
    const s = (await ok(loc, ['backup', 'image', img, '--id', 'h1'], ao)).snapshot.name;
    rewriteCorpus(img, { fraction: 0.5, seed: 1 });
    await ok(loc, ['backup', 'image', img, '--id', 'h1'], ao);
    await ok(loc, ['verify'], ao);
    await ok(loc, ['protect', s], ao);
    await ok(loc, ['prune', '--all', '--keep-last', '1', '--dry-run'], ao);
    const slots = await ok(loc, ['key', 'list']);
    const full = slots.find((k: any) => k.kind === 'passphrase' && k.current).name;
    for (const args of [['prune', '--all', '--keep-last', '1'], ['forget', s], ['gc'], ['unprotect', s], ['key', 'remove', full], ['unlock', '--all']]) {
      const r = await cli(loc, args, ao);
      assert.equal(r.code, 6, `${args.join(' ')}: ${r.stdout}${r.stderr}`);
      assert.equal(r.json.error.code, 'append-only');
      assert.match(r.json.error.hint, /full passphrase/);
    }
    const add = await cli(loc, ['key', 'add'], { ...ao, TRESOR_NEW_PASSPHRASE: 'escalate' });
    assert.equal(add.code, 6, 'an append-only key cannot add a full key');
    assert.equal((await names(loc)).length, 2);
    await ok(loc, ['unprotect', s]);
    assert.equal((await ok(loc, ['prune', '--all', '--keep-last', '1'])).removed.length, 1);
  });

  crashIt('survives SIGKILL at random points of backup, prune, gc and sync: verifies clean, no half snapshot, the next operation works', async (ctx) => {
    const loc = await init();
    const target = await init([], TARGET_PASS);
    const img = image(24 << 20, 10);
    for (let i = 0; i < 2; i++) {
      rewriteCorpus(img, { fraction: 0.3, seed: 200 + i });
      await backup(loc, img);
    }
    const trials = Number(process.env.TRESOR_CRASH_TRIALS ?? fx.crashTrials);
    const ops = ['backup', 'prune', 'gc', 'sync'] as const;
    const rng = new Prng(Number(process.env.TRESOR_CRASH_SEED ?? 5), 1);
    let killed = 0;
    const killedByOp: Record<string, number> = {};
    for (let t = 0; t < trials; t++) {
      const op = ops[t % ops.length];
      const before = await names(loc);
      if (op === 'prune' && before.length < 3) {
        rewriteCorpus(img, { fraction: 0.3, seed: 300 + t });
        await backup(loc, img);
        before.push('(extra)');
      }
      if (op === 'backup') rewriteCorpus(img, { fraction: 0.3, seed: 400 + t });
      const args = op === 'backup' ? ['backup', 'image', img, '--id', 'vm1']
        : op === 'prune' ? ['prune', '--all', '--keep-last', '2']
          : op === 'gc' ? ['gc', '--max-wait', '5']
            : ['sync', '--to', target, ...toArgs()];
      const delay = 100 + Math.floor(rng.nextU32() % 1400);
      const child = spawnTresor(['--repo', loc, ...fx.args(), '--json', ...args], { env: env() });
      let out = '';
      child.stdout!.on('data', (d) => (out += d));
      child.stderr!.on('data', (d) => (out += d));
      const code = await new Promise<number | null>((resolve) => {
        const timer = setTimeout(() => child.kill('SIGKILL'), delay);
        child.on('close', (c) => {
          clearTimeout(timer);
          resolve(c);
        });
      });
      if (code === null) {
        killed++;
        killedByOp[op] = (killedByOp[op] ?? 0) + 1;
      }
      else assert.equal(code, 0, `trial ${t} (${op}): ${out}`);
      const afterNames = await names(loc);
      if (op === 'backup') {
        assert.ok(afterNames.length === before.length || afterNames.length === before.length + 1, `trial ${t}: ${before.length} → ${afterNames.length} snapshots`);
        if (code === 0) assert.equal(afterNames.length, before.length + 1);
      }
      await verifyClean(loc, PASS, `trial ${t} (${op}, killed after ${delay} ms: ${code === null})`);
      if (op === 'sync') await verifyClean(target, TARGET_PASS, `trial ${t} target`);
    }
    ctx.diagnostic(`${killed} of ${trials} operations killed midway: ${JSON.stringify(killedByOp)}`);
    assert.ok(killed >= trials / 3, `only ${killed} of ${trials} operations were killed midway`);
    // The next operations work and finish what was interrupted.
    rewriteCorpus(img, { fraction: 0.2, seed: 999 });
    const last = await backup(loc, img);
    assert.equal((await ok(loc, ['gc'])).complete, true);
    const s = await localSyncOk(loc, target);
    assert.ok(s.copied.includes(last.name));
    await verifyClean(loc);
    await verifyClean(target, TARGET_PASS);
    await checkClean(loc);
    await checkClean(target, TARGET_PASS);
    await restoresTo(target, last.name, await sha256File(img), TARGET_PASS);
  });

}

/** A separate live process holding a shared lock, like a long backup. */
export class SharedLockHolder {
  readonly #child: ChildProcess;

  private constructor(child: ChildProcess) {
    this.#child = child;
  }

  static async start(location: string, args: string[], env: Record<string, string>): Promise<SharedLockHolder> {
    const endpointAt = args.indexOf('--s3-endpoint');
    const endpoint = endpointAt >= 0 ? args[endpointAt + 1] : '';
    const child = spawn(process.execPath, [fileURLToPath(new URL('./helpers/hold-shared-lock.ts', import.meta.url)), location, endpoint], {
      env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (d: Buffer) => {
        if (d.toString().includes('locked')) resolve();
      });
      child.on('exit', (code) => reject(new Error(`lock holder exited with ${code}`)));
    });
    return new SharedLockHolder(child);
  }

  async stop(): Promise<void> {
    const done = new Promise((r) => this.#child.on('exit', r));
    this.#child.stdin!.end();
    await done;
  }
}
