/**
 * Compression dictionaries (repository format §4): a backup samples a piece of a chunk that
 * compressed well, stores it as a plain chunk, and stores the compressible chunks after it as
 * delta chunks against it. Through the library on a local repository with the default settings:
 * text becomes dictionary deltas and random data never does; a new dictionary follows after each
 * span; an incremental uses parent bases and dictionaries side by side; every reader decodes them
 * (restore, the snapshot device, verify, check, sync, which sends each dictionary once); garbage
 * collection keeps a dictionary exactly while a delta needs it; a damaged dictionary is named
 * with the deltas and snapshots it breaks, and once recorded the next backup heals them; `repo
 * info` counts dictionaries and `repo init --dictionary-size` sets or refuses their size.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { LocalStore } from '../src/store/local.ts';
import { Repository } from '../src/repo/repository.ts';
import { BlobType, computeId, encodeBlob, encodeChunk } from '../src/repo/codec.ts';
import { deltaBasesOf, newBaseCache } from '../src/repo/blob-batch.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import type { SnapshotManifest } from '../src/repo/manifest.ts';
import { packName } from '../src/repo/pack.ts';
import { verifyRepository } from '../src/repo/verify.ts';
import { recordVerification } from '../src/repo/verify-records.ts';
import { checkRepository } from '../src/repo/check.ts';
import { forgetSnapshots } from '../src/repo/prune.ts';
import { collectGarbage } from '../src/repo/gc.ts';
import { syncRepositories } from '../src/repo/sync.ts';
import { restoreImage } from '../src/engine/image-restore.ts';
import { openSnapshotDisk } from '../src/engine/snapshot-device.ts';
import { BLOCK, BackupHistory, BitmapSource, Prng, assertBaseOk, deltaEntries, text, type DeltaEntry } from './helpers/bitmap-disk.ts';
import { tempDir } from './helpers/tmp.ts';
import { tresor, tresorOk } from './helpers/cli.ts';

const PASS = 'dictionary test passphrase';
const CHUNK = 128 << 10;
const SLOTS = 256;
const SPAN = 2 << 20; // a new dictionary after every 2 MiB read (the default is 64 MiB)

describe('compression dictionaries', { timeout: 180_000 }, () => {
  let tmp: { path: string; cleanup(): Promise<void> };
  let store: LocalStore;
  let repo: Repository;
  let pool: CodecPool;
  const history = new BackupHistory('dict');
  const { snaps, stats, disks } = history;
  /** Slots holding text in the first disk (the rest: random, and a hole at slot 5). */
  const textSlots = new Set<number>();

  const backup = (source: BitmapSource, parent: SnapshotManifest | undefined) => history.backup(repo, source, parent, { dictionarySpan: SPAN });

  const restoresAs = async (r: Repository, snapshot: string, expected: Buffer): Promise<void> => {
    const out = join(tmp.path, `restored-${Math.random().toString(36).slice(2)}.raw`);
    await restoreImage(r, snapshot, out, { format: 'raw' });
    assert.ok(readFileSync(out).equals(expected), `${snapshot} restores byte-identical`);
  };

  /** The dictionaries: bases of 32 KiB (a parent chunk is a whole chunk). */
  const dictionaries = async (r: Repository) => {
    const all = new Map<string, { id: Buffer; loc: NonNullable<DeltaEntry['baseLoc']> }>();
    for (const d of await deltaEntries(r)) if (d.baseLoc && d.baseLoc.rawLength === 32 << 10) all.set(d.base.toString('hex'), { id: d.base, loc: d.baseLoc });
    return [...all.values()];
  };

  /** A dictionary's plaintext: the last 32 KiB of one of the chunks of `disk`. */
  const dictionaryPlain = (disk: Buffer, id: Buffer): Buffer => {
    for (let k = 0; k < disk.length / CHUNK; k++) {
      const piece = disk.subarray((k + 1) * CHUNK - (32 << 10), (k + 1) * CHUNK);
      if (computeId(repo.keys, piece).equals(id)) return piece;
    }
    throw new Error(`dictionary ${id.toString('hex')} is no piece of the disk`);
  };

  /** Stored length of slot `k` of `disk` encoded as a delta against `dict` (at `level`, or the dictionary setting). */
  const encodedAgainst = (disk: Buffer, k: number, dict: Buffer, level?: number): number => {
    const plain = disk.subarray(k * CHUNK, (k + 1) * CHUNK);
    const made = encodeChunk(repo.keys, computeId(repo.keys, plain), plain, undefined, level, { id: computeId(repo.keys, dict), plain: dict });
    assert.equal(made.type, BlobType.deltaChunk);
    return made.blob.length;
  };

  before(async () => {
    tmp = await tempDir('tresor-dict-');
    store = await LocalStore.open(join(tmp.path, 'repo'), { create: true });
    ({ repo } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: PASS, scrypt: { N: 1024, r: 8, p: 1 }, packSize: 1 << 20 }));
    pool = new CodecPool(repo.keys);
    // Runs of 1-4 text or random chunks; slot 5 a hole.
    const prng = new Prng(3);
    const disk = Buffer.alloc(SLOTS * CHUNK);
    for (let s = 0; s < SLOTS;) {
      const run = 1 + Math.floor(prng.next() * 4);
      const isText = prng.next() < 0.6;
      for (let k = s; k < Math.min(SLOTS, s + run); k++) {
        if (k === 5) continue;
        if (isText) textSlots.add(k);
        (isText ? text(prng, CHUNK) : randomBytes(CHUNK)).copy(disk, k * CHUNK);
      }
      s += run;
    }
    await backup(new BitmapSource(disk), undefined);
  });
  after(async () => {
    await pool?.close();
    await store?.close();
    await tmp?.cleanup();
  });

  it('a full backup stores text against dictionaries sampled from the disk, random data plain; it restores exactly', async () => {
    assert.equal(repo.config.compression.dictionaryBytes, 32 << 10, 'new repositories sample 32 KiB dictionaries');
    const s = stats[0];
    assert.ok(s.dictionaries >= 2, `a new dictionary after each ${SPAN} bytes read (${s.dictionaries} taken)`);
    // The batches in flight when the first one proposes (8 MiB) are encoded before any dictionary
    // exists; after that every text chunk is a delta.
    assert.ok(s.dictionaryChunks >= textSlots.size * 0.6, `${s.dictionaryChunks} of ${textSlots.size} text chunks against a dictionary`);
    assert.equal(s.deltaChunks, 0, 'no parent, no parent deltas');
    const index = await repo.index();
    const dicts = await dictionaries(repo);
    // (One taken when every later batch was already encoded serves none.)
    assert.ok(dicts.length >= 2 && dicts.length <= s.dictionaries, `${dicts.length} of ${s.dictionaries} dictionaries in use`);
    let deltaBytes = 0;
    let level1Bytes = 0;
    for (const d of await deltaEntries(repo)) {
      assert.equal(d.baseLoc?.type, BlobType.chunk, 'a dictionary is a plain chunk');
      // Only text: the slot of the delta holds text.
      const slot = [...textSlots].find((k) => computeId(repo.keys, disks[0].subarray(k * CHUNK, (k + 1) * CHUNK)).equals(d.id));
      assert.ok(slot !== undefined, `delta chunk ${d.id.toString('hex')} holds text`);
      deltaBytes += d.loc.length;
      // zstd is deterministic: made at the dictionary setting (double-fast).
      assert.equal(d.loc.length, encodedAgainst(disks[0], slot, dictionaryPlain(disks[0], d.base)));
      const plain = disks[0].subarray(slot * CHUNK, (slot + 1) * CHUNK);
      level1Bytes += encodeBlob({ ...repo.keys, compressionLevel: 1, compressionStrategy: undefined, compressionTuning: undefined }, BlobType.chunk, d.id, plain).length;
    }
    // zstd's fast level without a dictionary stores the same chunks larger.
    assert.ok(deltaBytes < level1Bytes, `dictionary deltas ${deltaBytes} bytes < ${level1Bytes} at level 1`);
    // A dictionary is the last 32 KiB of a text chunk of this disk.
    for (const dict of dicts) {
      const from = [...textSlots].some((k) => computeId(repo.keys, disks[0].subarray((k + 1) * CHUNK - (32 << 10), (k + 1) * CHUNK)).equals(dict.id));
      assert.ok(from, `dictionary ${dict.id.toString('hex')} is a piece of a text chunk`);
      assert.equal(index.get(dict.id)?.type, BlobType.chunk);
    }
    await restoresAs(repo, snaps[0].name, disks[0]);
    // `repo info` counts them (and `repo init` makes them by default, or not at all).
    const env = { TRESOR_PASSPHRASE: PASS };
    const info = await tresorOk(['--repo', join(tmp.path, 'repo'), '--json', 'repo', 'info'], { env });
    assert.equal(info.dictionaries, dicts.length);
    assert.equal(info.compression.dictionaryBytes, 32 << 10);
    const off = await tresorOk(['--repo', join(tmp.path, 'off'), '--json', 'repo', 'init', '--dictionary-size', '0'], { env });
    assert.equal(off.ok, true);
    assert.equal((await tresorOk(['--repo', join(tmp.path, 'off'), '--json', 'repo', 'info'], { env })).compression.dictionaryBytes, undefined);
    const bad = await tresor(['--repo', join(tmp.path, 'bad'), '--json', 'repo', 'init', '--dictionary-size', '100K'], { env });
    assert.notEqual(bad.code, 0);
    assert.match(bad.json.error.message, /dictionary size 102400 is not 0 or a multiple of 4 KiB/);
  });

  it('an incremental makes parent deltas of chunks changed in part and dictionary deltas of new text', async () => {
    const prng = new Prng(5);
    const data = Buffer.from(disks[0]);
    const dirty = new Set<number>();
    const index = await repo.index();
    const parentType = (k: number) => index.get(computeId(repo.keys, disks[0].subarray(k * CHUNK, (k + 1) * CHUNK)))!.type;
    const randomSlots = Array.from({ length: SLOTS }, (_, k) => k).filter((k) => !textSlots.has(k) && k !== 5);
    // 4 KiB of text into the second half of six random slots (plain parents) and of six text
    // slots whose parent chunk is a dictionary delta: all parent deltas (the latter two levels).
    const partial = randomSlots.slice(0, 6);
    const overDelta = [...textSlots].filter((k) => parentType(k) === BlobType.deltaChunk).slice(0, 6);
    assert.equal(overDelta.length, 6);
    for (const k of [...partial, ...overDelta]) {
      text(prng, 4096).copy(data, k * CHUNK + 70_000);
      dirty.add(Math.floor((k * CHUNK + 70_000) / BLOCK));
    }
    // Every other random slot gets new text: more than the 8 MiB read at once, so the later reads
    // come after an earlier batch took the incremental's dictionary.
    const whole = randomSlots.slice(6);
    assert.ok(whole.length * CHUNK > 9 << 20);
    for (const k of whole) {
      text(prng, CHUNK).copy(data, k * CHUNK);
      dirty.add(2 * k).add(2 * k + 1);
    }
    await backup(new BitmapSource(data, dirty), snaps[0]);
    const s = stats[1];
    assert.equal(s.newChunks, partial.length + overDelta.length + whole.length);
    assert.equal(s.deltaChunks, partial.length + overDelta.length, 'the partly changed chunks are deltas against their parent chunks');
    // A new text chunk brings the incremental's dictionary; those encoded after it use it.
    assert.ok(s.dictionaries >= 1 && s.dictionaryChunks >= 8, `${s.dictionaryChunks} of ${whole.length} new text chunks against a dictionary`);
    for (const d of await deltaEntries(repo)) assertBaseOk(d);
    for (const k of overDelta) {
      const loc = (await repo.index()).get(computeId(repo.keys, data.subarray(k * CHUNK, (k + 1) * CHUNK)))!;
      assert.equal(loc.type, BlobType.deltaChunk);
      assert.ok(loc.length < 8000, `slot ${k}: a 4 KiB change over a dictionary delta costs ${loc.length} bytes`);
    }
    // The incremental's new text is compressed against its dictionary at the incremental level (1).
    assert.equal(repo.config.compression.incrementalLevel, 1);
    const fresh = await repo.index();
    let checked = 0;
    for (const k of whole) {
      const loc = fresh.get(computeId(repo.keys, data.subarray(k * CHUNK, (k + 1) * CHUNK)))!;
      if (loc.type !== BlobType.deltaChunk) continue;
      assert.equal(loc.length, encodedAgainst(data, k, dictionaryPlain(data, loc.base!), 1), `slot ${k}`);
      checked++;
    }
    assert.equal(checked, s.dictionaryChunks);
    await restoresAs(repo, snaps[1].name, disks[1]);
  });

  it('the snapshot device reads dictionary deltas; with a base cache each dictionary is fetched once', async () => {
    const device = await openSnapshotDisk(repo, snaps[0].name);
    try {
      const got = await device.device.read(0, SLOTS * CHUNK);
      assert.ok(got.equals(disks[0]), 'the whole disk reads back');
    } finally {
      await device.close();
    }
    // Readers (restore, snapshot device, verify, GC, sync) keep a cache across their reads.
    const entries = (await deltaEntries(repo)).filter((e) => e.baseLoc?.rawLength === 32 << 10);
    const cache = newBaseCache();
    let fetches = 0;
    const what = (id: Buffer) => `chunk ${id.toString('hex')}`;
    for (const half of [entries.slice(0, entries.length >> 1), entries.slice(entries.length >> 1)]) {
      const baseOf = await deltaBasesOf(repo, half.map((e) => e.loc), what, { cache, onFetch: () => { fetches++; } });
      for (const e of half) assert.ok(!(baseOf(e.loc) instanceof Error) && baseOf(e.loc) !== undefined, 'every base is found');
    }
    // (Neighbouring dictionaries may come in one ranged read.)
    assert.ok(fetches >= 1 && fetches <= (await dictionaries(repo)).length, `${fetches} reads: one per dictionary at most, not per delta or per call`);
    fetches = 0;
    await deltaBasesOf(repo, entries.map((e) => e.loc), what, { cache, onFetch: () => { fetches++; } });
    assert.equal(fetches, 0, 'all of them cached');
  });

  it('verify and check pass; sync sends each dictionary once and the deltas as deltas, into a repository with another key', async () => {
    assert.deepEqual((await verifyRepository(repo, pool)).damage, []);
    assert.equal((await checkRepository(repo, pool)).ok, true);
    const targetStore = await LocalStore.open(join(tmp.path, 'target'), { create: true });
    try {
      const { repo: target } = await Repository.init(targetStore, { encryption: 'aes-256-gcm', passphrase: 'other', scrypt: { N: 1024, r: 8, p: 1 } });
      const targetPool = new CodecPool(target.keys);
      try {
        await syncRepositories(repo, target, { sourcePool: pool, targetPool });
        const source = await deltaEntries(repo);
        const copied = await deltaEntries(target);
        assert.equal(copied.length, source.length, 'every delta travels as a delta');
        assert.equal((await dictionaries(target)).length, (await dictionaries(repo)).length, 'every dictionary is sent (once)');
        for (const d of copied) assertBaseOk(d);
        for (const [k, s] of snaps.entries()) await restoresAs(target, s.name, disks[k]);
        assert.deepEqual((await verifyRepository(target, targetPool)).damage, []);
      } finally {
        await targetPool.close();
      }
    } finally {
      await targetStore.close();
    }
  });

  it('garbage collection keeps a dictionary while a delta needs it, and removes it after', async () => {
    const firstDicts = await dictionaries(repo);
    await forgetSnapshots(repo, [snaps[0].name]);
    const report = await collectGarbage(repo, { pool, maxWaitMs: 0, pollMs: 10, repackThreshold: 0.01 });
    assert.equal(report.missingBlobs, 0);
    for (const d of await deltaEntries(repo)) assertBaseOk(d, `base ${d.base.toString('hex')} (and its own) survived`);
    await restoresAs(repo, snaps[1].name, disks[1]);
    assert.deepEqual((await verifyRepository(repo, pool)).damage, []);
    // The incremental kept most of the full backup's chunks, so their dictionaries live on.
    assert.ok((await dictionaries(repo)).length > 0);
    await forgetSnapshots(repo, [snaps[1].name]);
    await collectGarbage(repo, { pool, maxWaitMs: 0, pollMs: 10, repackThreshold: 0.01 });
    repo.invalidateIndex();
    const index = await repo.index();
    for (const d of firstDicts) assert.equal(index.get(d.id), undefined, `dictionary ${d.id.toString('hex')} is gone with its last delta`);
    assert.equal(index.size, 0, 'nothing is left');
  });

  it('a damaged dictionary is named, with the deltas and snapshots it breaks', async () => {
    const prng = new Prng(9);
    const disk = Buffer.alloc(128 * CHUNK);
    for (let k = 0; k < 128; k++) text(prng, CHUNK).copy(disk, k * CHUNK);
    const made = await backup(new BitmapSource(disk), undefined);
    const [dict] = await dictionaries(repo);
    assert.ok(dict, 'the backup took a dictionary');
    const path = join(tmp.path, 'repo', packName(dict.loc.packId));
    const bytes = readFileSync(path);
    bytes[dict.loc.offset + Math.floor(dict.loc.length / 2)] ^= 0x40;
    writeFileSync(path, bytes);
    const report = await verifyRepository(repo, pool);
    assert.equal(report.ok, false);
    assert.ok(report.damage.some((d) => d.object.startsWith('chunk') && d.object.includes(dict.id.toString('hex'))), 'the dictionary is named');
    // Exactly the deltas made against it.
    const against = (await deltaEntries(repo)).filter((d) => d.base.equals(dict.id)).map((d) => d.id.toString('hex')).sort();
    const deltas = report.damage.filter((d) => d.object.startsWith('delta chunk'));
    assert.ok(against.length > 0);
    assert.deepEqual(deltas.map((d) => /^delta chunk ([0-9a-f]{64})/.exec(d.object)![1]).sort(), against);
    for (const d of deltas) assert.deepEqual(d.affects.map((a) => a.snapshot), [made.name]);
    await assert.rejects(restoreImage(repo, made.name, join(tmp.path, 'broken.raw'), { format: 'raw' }),
      (err: Error) => /delta chunk .* cannot be decoded/.test(err.message) && err.message.includes(dict.id.toString('hex')));
    // Recorded, the damage heals with the next backup of the same data: the broken deltas are
    // stored again (against a new dictionary), and the old snapshot restores from the new copies.
    await recordVerification(repo, report, true);
    repo.invalidateIndex();
    await repo.index();
    assert.ok(repo.avoids(dict.id), 'the damaged dictionary is recorded: no writer uses it again');
    await backup(new BitmapSource(disk), undefined);
    repo.invalidateIndex();
    const index = await repo.index();
    for (const hex of against) {
      const loc = index.get(Buffer.from(hex, 'hex'))!;
      assert.ok(loc.base === undefined || !loc.base.equals(dict.id), `chunk ${hex} has a fresh copy that does not need the damaged dictionary`);
    }
    await restoresAs(repo, made.name, disk);
    repo.invalidateIndex();
    const healed = await verifyRepository(repo, pool);
    assert.deepEqual(healed.damage.filter((d) => d.affects.some((a) => a.snapshot === made.name)), [], 'the old snapshot verifies clean');
  });
});
