/**
 * The repository behaviour suite, run through the real CLI against a real backend: local
 * directories (repo-local.test.ts) and Ceph radosgw S3 (repo-s3.test.ts) pass the same tests.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, writeFile, truncate, copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { tresor, tresorOk, spawnTresor } from './helpers/cli.ts';
import { tempDir } from './helpers/tmp.ts';
import { run, sha256File } from './helpers/exec.ts';
import { generateCorpus, rewriteCorpus } from '../bench/corpus.ts';
import type { BlobStore } from '../src/store/store.ts';
import { Repository } from '../src/repo/repository.ts';
import { packName } from '../src/repo/pack.ts';
import { pieceIds } from '../src/repo/disk-map.ts';

export interface BackendFixture {
  label: string;
  setup(): Promise<void>;
  teardown(): Promise<void>;
  /** A fresh, empty repository location (path or s3://bucket/prefix). */
  newLocation(): Promise<string>;
  /** Extra CLI environment (credentials) and arguments (endpoint). */
  env: () => Record<string, string>;
  args: () => string[];
  list(location: string): Promise<Array<{ name: string; size: number }>>;
  read(location: string, name: string): Promise<Buffer>;
  /** Replaces an object's bytes behind Tresor's back (to simulate damage). */
  overwrite(location: string, name: string, data: Buffer): Promise<void>;
  /** Opens the store directly (for tests that inspect the repository through the API). */
  openStore(location: string): Promise<BlobStore>;
  /** SIGKILL trials of the crash test (at least 20 in the whole suite). */
  crashTrials: number;
}

const PASS = 'correct horse battery staple';

export function repositorySuite(fx: BackendFixture): void {
  describe(`repository on ${fx.label}`, { concurrency: false }, () => {
    let dir: { path: string; cleanup(): Promise<void> };
    const cli = (loc: string, args: string[], env: Record<string, string | undefined> = {}, timeoutMs?: number) =>
      tresor(['--repo', loc, ...fx.args(), '--json', ...args], { env: { TRESOR_PASSPHRASE: PASS, ...fx.env(), ...env }, timeoutMs });
    const ok = async (loc: string, args: string[], env: Record<string, string | undefined> = {}) => {
      const r = await cli(loc, args, env);
      assert.equal(r.code, 0, `tresor ${args.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
      return r.json;
    };
    const init = async (extra: string[] = []) => {
      const loc = await fx.newLocation();
      await ok(loc, ['repo', 'init', ...extra]);
      return loc;
    };
    const snapshots = async (loc: string): Promise<string[]> => (await ok(loc, ['snapshots'])).snapshots.map((s: { name: string }) => s.name);

    before(async () => {
      dir = await tempDir();
      await fx.setup();
    });
    after(async () => {
      await fx.teardown();
      await dir.cleanup();
    });

    it('round-trips raw images byte-identical to qemu-img convert, as raw and qcow2', async () => {
      const loc = await init();
      const img = join(dir.path, 'rt.raw');
      generateCorpus(img, { size: 48 << 20, seed: 11 });
      // A size that is not a multiple of the chunk size, with a partial last chunk.
      await truncate(img, (48 << 20) + 12288);
      const b = await ok(loc, ['backup', 'image', img, '--id', 'rt']);
      const snap = b.snapshot.name;
      assert.match(snap, /^image\/rt\/\d{8}T\d{6}Z$/);
      const ref = join(dir.path, 'rt.ref');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', img, ref]);
      const outRaw = join(dir.path, 'rt.out.raw');
      await ok(loc, ['restore', 'image', snap, outRaw]);
      assert.equal(await sha256File(outRaw), await sha256File(ref));
      const outQ = join(dir.path, 'rt.out.qcow2');
      await ok(loc, ['restore', 'image', snap, outQ, '--format', 'qcow2']);
      await run('qemu-img', ['check', outQ]);
      await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', outQ, ref]);
    });

    it('round-trips qcow2 images: compressed and zero clusters and a backing chain', async () => {
      const loc = await init();
      const base = join(dir.path, 'base.raw');
      generateCorpus(base, { size: 24 << 20, seed: 12 });
      const baseQ = join(dir.path, 'base.qcow2');
      await run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', base, baseQ]);
      const top = join(dir.path, 'top.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', '-F', 'qcow2', '-b', baseQ, top]);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -z 8M 2M', '-c', 'write -P 0x11 20M 64k', top]);
      const ref = join(dir.path, 'top.ref');
      await run('qemu-img', ['convert', '-O', 'raw', top, ref]);
      for (const [name, file] of [['base', baseQ], ['top', top]] as const) {
        const b = await ok(loc, ['backup', 'image', file, '--id', name]);
        assert.equal(b.snapshot.disks[0].sourceFormat, 'qcow2');
        const out = join(dir.path, `${name}.out`);
        await ok(loc, ['restore', 'image', b.snapshot.name, out]);
        const expected = name === 'top' ? ref : join(dir.path, 'base.ref');
        if (name === 'base') await run('qemu-img', ['convert', '-O', 'raw', baseQ, expected]);
        assert.equal(await sha256File(out), await sha256File(expected), `${name} restores identical`);
      }
    });

    it('deduplicates: the same image adds almost nothing, a scattered 2% rewrite adds about the changed data', async () => {
      const loc = await init();
      const img = join(dir.path, 'dd.raw');
      generateCorpus(img, { size: 64 << 20, seed: 13 });
      const first = await ok(loc, ['backup', 'image', img, '--id', 'dd']);
      const again = await ok(loc, ['backup', 'image', img, '--id', 'dd']);
      assert.equal(again.snapshot.stats.newChunks, 0);
      assert.ok(again.snapshot.stats.addedBytes < 8192, `same image added ${again.snapshot.stats.addedBytes} bytes`);
      const rw = rewriteCorpus(img, { fraction: 0.02, seed: 5 });
      const third = await ok(loc, ['backup', 'image', img, '--id', 'dd']);
      // The chunks the rewrite touched, at the repository's chunk size.
      const chunkSize: number = (await ok(loc, ['repo', 'info'])).chunkSize;
      const touched = new Set<number>();
      for (const e of rw.extents) for (let o = e.offset; o < e.offset + e.length; o += 4096) touched.add(Math.floor(o / chunkSize));
      assert.ok(third.snapshot.stats.newChunks >= touched.size * 0.9 && third.snapshot.stats.newChunks <= touched.size + 2,
        `${third.snapshot.stats.newChunks} new chunks for ${touched.size} touched`);
      // Random content does not compress: added ≤ the touched chunks' bytes plus index.
      assert.ok(third.snapshot.stats.addedBytes <= touched.size * chunkSize * 1.05 + (256 << 10),
        `added ${third.snapshot.stats.addedBytes} for ${touched.size} touched chunks of ${chunkSize}`);
      assert.ok(first.snapshot.stats.addedBytes > 10 * third.snapshot.stats.addedBytes);
      const out = join(dir.path, 'dd.out');
      await ok(loc, ['restore', 'image', third.snapshot.name, out]);
      assert.equal(await sha256File(out), await sha256File(img));
    });

    it('encryption: no plaintext and no plaintext hash anywhere; a wrong passphrase is a clear error', async () => {
      const loc = await init();
      const img = join(dir.path, 'secret.raw');
      const canary = 'TRESOR-CANARY-plaintext-that-must-never-be-stored-in-clear ';
      const chunk = Buffer.alloc(65536);
      for (let o = 0; o < chunk.length; o += canary.length) chunk.write(canary, o);
      const body = Buffer.alloc(4 << 20);
      for (let i = 0; i < 64; i++) {
        const c = Buffer.from(chunk);
        c.writeUInt32LE(i, 0); // 64 distinct chunks
        c.copy(body, i * 65536);
      }
      await writeFile(img, body);
      const b = await ok(loc, ['backup', 'image', img, '--id', 'secretvm']);
      const hashes: Buffer[] = [];
      for (let i = 0; i < 64; i++) hashes.push(createHash('sha256').update(body.subarray(i * 65536, (i + 1) * 65536)).digest());
      const needles = [Buffer.from('TRESOR-CANARY'), Buffer.from('secretvm'), Buffer.from(PASS), ...hashes, ...hashes.map((h) => Buffer.from(h.toString('hex')))];
      for (const o of await fx.list(loc)) {
        for (const n of needles.slice(0, 3)) assert.ok(!o.name.includes(n.toString()), `object name ${o.name} leaks`);
        const data = await fx.read(loc, o.name);
        for (const n of needles) assert.equal(data.indexOf(n), -1, `${o.name} contains ${n.length === 32 ? 'a plaintext chunk hash' : JSON.stringify(n.toString().slice(0, 20))}`);
      }
      const wrong = await cli(loc, ['snapshots'], { TRESOR_PASSPHRASE: 'not the passphrase' });
      assert.equal(wrong.code, 6);
      assert.equal(wrong.json.error.code, 'wrong-passphrase');
      assert.match(wrong.json.error.hint, /passphrase/);
      const none = await cli(loc, ['snapshots'], { TRESOR_PASSPHRASE: undefined });
      assert.equal(none.code, 6);
      assert.match(none.json.error.hint, /TRESOR_PASSPHRASE/);
      // The recovery key printed at init opens it too.
      const loc2 = await fx.newLocation();
      const created = await ok(loc2, ['repo', 'init']);
      assert.match(created.recoveryKey, /^([0-9A-Z]{4}-){12}[0-9A-Z]{4}$/);
      assert.equal((await ok(loc2, ['snapshots'], { TRESOR_PASSPHRASE: created.recoveryKey })).snapshots.length, 0);
      assert.equal(b.snapshot.name.startsWith('image/secretvm/'), true);
    });

    it('corruption in a chunk, an index piece, an index file or a manifest is found, named, and only affected snapshots refuse to restore', async () => {
      const loc = await init();
      const imgA = join(dir.path, 'ca.raw');
      const imgB = join(dir.path, 'cb.raw');
      generateCorpus(imgA, { size: 16 << 20, seed: 21 });
      generateCorpus(imgB, { size: 16 << 20, seed: 22 });
      const before0 = new Set((await fx.list(loc)).map((o) => o.name));
      const a = (await ok(loc, ['backup', 'image', imgA, '--id', 'a'])).snapshot.name;
      const afterA = await fx.list(loc);
      const aObjects = afterA.filter((o) => !before0.has(o.name));
      const b = (await ok(loc, ['backup', 'image', imgB, '--id', 'b'])).snapshot.name;
      assert.equal((await ok(loc, ['verify'])).ok, true);
      const outB = join(dir.path, 'cb.out');

      // 1. A chunk: flip one byte inside the first blob of a pack written by A's backup.
      // The largest pack: full of chunks (index pieces are written last, into the last pack).
      const packA = aObjects.filter((o) => o.name.startsWith('data/')).sort((x, y) => y.size - x.size)[0];
      const original = await fx.read(loc, packA.name);
      const damaged = Buffer.from(original);
      damaged[damaged.length >> 1] ^= 0x01; // mid-pack: inside a chunk (index pieces are small)
      await fx.overwrite(loc, packA.name, damaged);
      const v = await cli(loc, ['verify']);
      assert.equal(v.code, 3, v.stdout);
      const chunkDamage = v.json.damage.filter((d: any) => d.kind === 'chunk');
      assert.equal(chunkDamage.length, 1, JSON.stringify(v.json.damage));
      assert.match(chunkDamage[0].object, /^chunk [0-9a-f]{64} in data\//);
      assert.deepEqual(chunkDamage[0].affects.map((x: any) => x.snapshot), [a]);
      assert.equal(typeof chunkDamage[0].affects[0].offsets[0], 'number');
      const rA = await cli(loc, ['restore', 'image', a, join(dir.path, 'ca.out')]);
      assert.equal(rA.code, 3);
      assert.match(rA.json.error.message, new RegExp(`snapshot ${a.replace(/\//g, '\\/')} cannot be restored`));
      await ok(loc, ['restore', 'image', b, outB]);
      assert.equal(await sha256File(outB), await sha256File(imgB));
      await fx.overwrite(loc, packA.name, original);
      assert.equal((await ok(loc, ['verify'])).ok, true);

      // 1b. An index piece (part of the disk map) of A.
      const store = await fx.openStore(loc);
      const repo = await Repository.open(store, async () => PASS);
      const manifest = await repo.readSnapshot(a);
      const [firstPiece] = await pieceIds(repo, a, manifest.disks[0]);
      const pieceLoc = (await repo.index()).get(Buffer.from(firstPiece, 'hex'))!;
      const piecePack = packName(pieceLoc.packId);
      const pp = await fx.read(loc, piecePack);
      const ppBad = Buffer.from(pp);
      ppBad[pieceLoc.offset + (pieceLoc.length >> 1)] ^= 0x10;
      await fx.overwrite(loc, piecePack, ppBad);
      const vp = await cli(loc, ['verify']);
      assert.equal(vp.code, 3);
      const pieceDamage = vp.json.damage.filter((d: any) => d.kind === 'index-piece');
      assert.equal(pieceDamage.length, 1, JSON.stringify(vp.json.damage));
      assert.deepEqual(pieceDamage[0].affects.map((x: any) => x.snapshot), [a]);
      const rp = await cli(loc, ['restore', 'image', a, join(dir.path, 'cap.out')]);
      assert.equal(rp.code, 3);
      assert.match(rp.json.error.message, /index piece 0 of disk disk0 in snapshot/);
      await ok(loc, ['restore', 'image', b, outB, '--force']);
      await fx.overwrite(loc, piecePack, pp);
      await store.close();

      // 2. The manifest of A.
      const manifestA = aObjects.find((o) => o.name.startsWith('snapshots/'))!;
      const m = await fx.read(loc, manifestA.name);
      const mBad = Buffer.from(m);
      mBad[mBad.length - 5] ^= 0x80;
      await fx.overwrite(loc, manifestA.name, mBad);
      const vm = await cli(loc, ['verify']);
      assert.equal(vm.code, 3);
      assert.ok(vm.json.damage.some((d: any) => d.kind === 'manifest' && d.object === manifestA.name));
      const rm = await cli(loc, ['restore', 'image', a, join(dir.path, 'ca2.out')]);
      assert.equal(rm.code, 3);
      assert.match(rm.json.error.message, /manifest of snapshot .* is damaged/);
      await ok(loc, ['restore', 'image', b, outB, '--force']);
      await fx.overwrite(loc, manifestA.name, m);

      // 3. An index file: the packs are self-describing, so data stays reachable, but verify reports it.
      const indexA = aObjects.find((o) => o.name.startsWith('index/'))!;
      const ix = await fx.read(loc, indexA.name);
      const ixBad = Buffer.from(ix);
      ixBad[ixBad.length >> 1] ^= 0x04;
      await fx.overwrite(loc, indexA.name, ixBad);
      const vi = await cli(loc, ['verify']);
      assert.equal(vi.code, 3);
      assert.ok(vi.json.damage.some((d: any) => d.kind === 'index-file' && d.object === indexA.name));
      await ok(loc, ['restore', 'image', a, join(dir.path, 'ca3.out')]);
      assert.equal(await sha256File(join(dir.path, 'ca3.out')), await sha256File(imgA));
      await fx.overwrite(loc, indexA.name, ix);
      assert.equal((await ok(loc, ['verify'])).ok, true);
    });

    it('survives SIGKILL at random moments of a backup: verifies clean, no partial snapshot, next backup works', async () => {
      const loc = await init();
      const img = join(dir.path, 'crash.raw');
      generateCorpus(img, { size: 96 << 20, seed: 31 });
      // Kill moments spread over how long a backup takes here (process start included), so the
      // kills land midway whatever the machine's (and Tresor's) speed.
      const started = performance.now();
      await ok(loc, ['backup', 'image', img, '--id', 'crash']);
      const span = Math.max(300, performance.now() - started);
      let committed = (await snapshots(loc)).length;
      const trials = Number(process.env.TRESOR_CRASH_TRIALS ?? fx.crashTrials);
      let killedMidway = 0;
      for (let t = 0; t < trials; t++) {
        // New content each trial so there is real work to interrupt.
        rewriteCorpus(img, { fraction: 0.25, seed: 100 + t });
        const child = spawnTresor(['--repo', loc, ...fx.args(), '--json', 'backup', 'image', img, '--id', 'crash'], { env: { TRESOR_PASSPHRASE: PASS, ...fx.env() } });
        let out = '';
        child.stdout!.on('data', (d) => (out += d));
        const exited = new Promise<number | null>((res) => child.on('close', (c) => res(c)));
        const delay = Math.round(150 + ((t * 7919) % 1000) / 1000 * (span - 150));
        const timer = setTimeout(() => child.kill('SIGKILL'), delay);
        const code = await exited;
        clearTimeout(timer);
        if (code !== null) assert.equal(code, 0, out);
        const names = await snapshots(loc);
        if (code === 0) {
          committed++;
        } else if (names.length === committed + 1) {
          // Killed after its manifest was created: a complete snapshot (verify below proves it).
          committed++;
        } else {
          killedMidway++;
        }
        assert.equal(names.length, committed, `trial ${t}: ${names.length} snapshots visible, ${committed} committed`);
        const v = await cli(loc, ['verify']);
        assert.equal(v.code, 0, `trial ${t}: verify after kill at ${delay} ms: ${v.stdout}`);
      }
      assert.ok(killedMidway >= trials / 2, `only ${killedMidway} of ${trials} backups were killed midway`);
      const last = await ok(loc, ['backup', 'image', img, '--id', 'crash']);
      const out = join(dir.path, 'crash.out');
      await ok(loc, ['restore', 'image', last.snapshot.name, out]);
      assert.equal(await sha256File(out), await sha256File(img));
    });

    it('bad input: garbage and truncated qcow2, missing file, locked repository → clear errors, nothing corrupted', async () => {
      const loc = await init();
      const good = join(dir.path, 'good.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', good, '8M']);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 1M', good]);
      const base = await ok(loc, ['backup', 'image', good, '--id', 'bad']);
      const trunc = join(dir.path, 'trunc.qcow2');
      await copyFile(good, trunc);
      await truncate(trunc, 200);
      const garbage = join(dir.path, 'garbage.qcow2');
      const g = Buffer.alloc(1 << 20, 0x41);
      (await readFile(good)).copy(g, 0, 0, 8); // qcow2 magic and version, then junk
      await writeFile(garbage, g);
      for (const f of [trunc, garbage]) {
        const r = await cli(loc, ['backup', 'image', f, '--id', 'bad']);
        assert.equal(r.code, 8, `${f}: ${r.stdout}${r.stderr}`);
        assert.ok(r.json.error.message.includes(f), r.json.error.message);
        assert.ok(r.json.error.hint);
      }
      const missing = await cli(loc, ['backup', 'image', join(dir.path, 'nope.qcow2'), '--id', 'bad']);
      assert.notEqual(missing.code, 0);
      assert.match(missing.json.error.message, /nope\.qcow2/);
      assert.deepEqual(await snapshots(loc), [base.snapshot.name]);
      // Someone else holds an exclusive lock (a live process on this host).
      const { LockHolder } = await import('./helpers/lock-holder.ts');
      const holder = await LockHolder.start(loc, fx.args(), { TRESOR_PASSPHRASE: PASS, ...fx.env() });
      try {
        const r = await cli(loc, ['backup', 'image', good, '--id', 'bad']);
        assert.equal(r.code, 4, r.stdout);
        assert.match(r.json.error.message, /locked by/);
        assert.ok(r.json.error.hint);
      } finally {
        await holder.stop();
      }
      await ok(loc, ['backup', 'image', good, '--id', 'bad']);
      assert.equal((await ok(loc, ['verify'])).ok, true);
      const flag = await tresor(['--repo', loc, '--passphrase', 'x', 'snapshots']);
      assert.equal(flag.code, 2);
      assert.match(flag.stderr, /never accepted on the command line/);
    });
  });
}
