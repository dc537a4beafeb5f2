/**
 * Unit tests of the lifecycle building blocks: id sets and maps, GC plan encoding, metadata
 * objects bound to their names (a note replayed under another name is refused), snapshot notes
 * (newest wins, field by field) and the lock kinds.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { IdMap, IdSet } from '../src/repo/id-set.ts';
import { decodePlan, encodePlan, type GcPlan } from '../src/repo/gc-plan.ts';
import { decodeMetaObject, encodeMetaObject, nameTime, parseNameTime } from '../src/repo/meta-object.ts';
import { generateMasterKey } from '../src/repo/keys.ts';
import type { CodecKeys } from '../src/repo/codec.ts';
import { LocalStore } from '../src/store/local.ts';
import { Repository } from '../src/repo/repository.ts';
import { readSnapshotState, writeNote, listNotes, readSnapshotStates } from '../src/repo/notes.ts';
import { RepositoryLock, RepositoryLockedError } from '../src/repo/lock.ts';
import { tempDir } from './helpers/tmp.ts';

const keys: CodecKeys = { master: generateMasterKey(), compressionLevel: 1 };

describe('id sets and maps', () => {
  it('hold many ids across growth, and nothing else', () => {
    const set = new IdSet();
    const map = new IdMap();
    const ids = Array.from({ length: 5000 }, (_, i) => createHash('sha256').update(String(i)).digest());
    for (const id of ids) {
      assert.equal(set.add(id), true);
      map.set(id, createHash('sha256').update(id).digest());
    }
    assert.equal(set.add(ids[7]), false);
    assert.equal(set.size, 5000);
    assert.equal(map.size, 5000);
    for (const id of ids) {
      assert.ok(set.has(id));
      assert.deepEqual(map.get(id), createHash('sha256').update(id).digest());
    }
    for (let i = 0; i < 1000; i++) {
      const other = randomBytes(32);
      assert.equal(set.has(other), false);
      assert.equal(map.get(other), undefined);
    }
    assert.equal([...set].length, 5000);
    assert.equal([...map.entries()].length, 5000);
  });
});

describe('garbage collection plans', () => {
  const plan: GcPlan = {
    header: {
      format: 'tresor-gc-plan', version: 1, id: 'ab'.repeat(16), created: new Date().toISOString(), host: 'h',
      indexFiles: [`index/${'11'.repeat(32)}`], planIndexFiles: [`index/${'22'.repeat(32)}`], deletePacks: ['33'.repeat(32)],
      repackedPacks: [], unindexedPacks: ['44'.repeat(32)], stats: { garbageBlobs: 1, garbageBytes: 2, repackedBlobs: 0, repackedBytes: 0 },
    },
    condemned: [randomBytes(32), randomBytes(32)],
    seenManifests: ['55'.repeat(32)],
  };

  it('round-trip', () => {
    const { name, data } = encodePlan(keys, plan);
    assert.equal(name, `gc/${'ab'.repeat(16)}/plan`);
    assert.deepEqual(decodePlan(keys, name, data), plan);
  });

  it('a plan is bound to its name and authenticated', () => {
    const { name, data } = encodePlan(keys, plan);
    assert.throws(() => decodePlan(keys, `gc/${'cd'.repeat(16)}/plan`, data), /damaged|authentication/);
    const bad = Buffer.from(data);
    bad[bad.length >> 1] ^= 1;
    assert.throws(() => decodePlan(keys, name, bad), /authentication/);
  });
});

describe('metadata objects', () => {
  it('are bound to their object name: a copy under another name does not decode', () => {
    const a = 'notes/aa/20260101T000000000Z-0000000000000000';
    const data = encodeMetaObject(keys, a, Buffer.from('{"set":{"protected":false}}'));
    assert.equal(decodeMetaObject(keys, a, data, 1024).toString(), '{"set":{"protected":false}}');
    assert.throws(() => decodeMetaObject(keys, 'notes/aa/20270101T000000000Z-0000000000000000', data, 1024), /authentication/);
  });

  it('name times sort as text and parse back', () => {
    const d = new Date('2026-11-22T10:15:00.123Z');
    assert.equal(nameTime(d), '20261122T101500123Z');
    assert.deepEqual(parseNameTime(nameTime(d)), d);
    assert.ok(nameTime(new Date('2026-11-22T10:15:00.124Z')) > nameTime(d));
  });
});

describe('snapshot notes and locks on a repository', () => {
  let dir: { path: string; cleanup(): Promise<void> };
  let repo: Repository;
  before(async () => {
    dir = await tempDir();
    const store = await LocalStore.open(join(dir.path, 'r'), { create: true });
    repo = (await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: 'p', scrypt: { N: 1024, r: 8, p: 1 } })).repo;
  });
  after(async () => dir.cleanup());

  it('newest note wins field by field; a replayed note is ignored and reported', async () => {
    const s = 'vm/a/20260101T000000Z';
    await writeNote(repo, s, { protected: true }, new Date('2026-01-01T01:00:00Z'));
    await writeNote(repo, s, { verification: { time: '2026-01-02T00:00:00.000Z', ok: true, readData: true, damaged: 0 } }, new Date('2026-01-02T00:00:00Z'));
    let state = await readSnapshotState(repo, s);
    assert.deepEqual(state, { protected: true, verification: { time: '2026-01-02T00:00:00.000Z', ok: true, readData: true, damaged: 0 } });
    const old = await writeNote(repo, s, { protected: false }, new Date('2026-01-01T00:30:00Z'));
    state = await readSnapshotState(repo, s);
    assert.equal(state.protected, true, 'an older note does not override a newer one');
    // An attacker without the key copies the old "unprotect" note under a newer time.
    const replayed = old.replace('20260101T003000000Z', '20260103T000000000Z');
    await repo.store.create(replayed, await repo.store.read(old));
    const { states, damaged } = await readSnapshotStates(repo, [s], await listNotes(repo));
    assert.equal(states.get(s)!.protected, true);
    assert.deepEqual(damaged.map((d) => d.object), [replayed]);
  });

  it('a maintenance lock coexists with shared locks and excludes another maintenance or an exclusive one', async () => {
    const shared = await RepositoryLock.acquire(repo.store, repo.keys, 'shared', 'backup');
    const gc = await RepositoryLock.acquire(repo.store, repo.keys, 'maintenance', 'gc');
    assert.ok(gc.info.started);
    await assert.rejects(RepositoryLock.acquire(repo.store, repo.keys, 'maintenance', 'gc 2'), RepositoryLockedError);
    await assert.rejects(RepositoryLock.acquire(repo.store, repo.keys, 'exclusive', 'key remove'), RepositoryLockedError);
    const shared2 = await RepositoryLock.acquire(repo.store, repo.keys, 'shared', 'restore');
    await Promise.all([shared.release(), gc.release(), shared2.release()]);
  });
});
