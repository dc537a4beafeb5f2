/** Unit tests of the repository building blocks: keys, codec, blob index, locks, names. */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, createHash } from 'node:crypto';
import { join } from 'node:path';
import zlib from 'node:zlib';
import { LocalStore } from '../src/store/local.ts';
import { Repository } from '../src/repo/repository.ts';
import { BlobIndex, entryLocation } from '../src/repo/blob-index.ts';
import { decodeIndexFile, decodeIndexFileViews, encodeIndexFile } from '../src/repo/index-file.ts';
import { BlobType, ZERO_ID, computeId, decodeBlob, encodeBlob, dictionaryCandidate, encodeChunk, frameContentSize, type CodecKeys } from '../src/repo/codec.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import { BASE_UNREADABLE, CodecExecutor, type DecodeItem, type DecodeResult, type StoredBase } from '../src/repo/codec-ops.ts';
import { decodePackHeader, encodePackHeader, type PackEntry } from '../src/repo/pack.ts';
import { formatRecoveryKey, generateMasterKey, parseRecoveryKey } from '../src/repo/keys.ts';
import { RepositoryLock, RepositoryLockedError } from '../src/repo/lock.ts';
import { parseSnapshotName, snapshotName, validateSourceId } from '../src/repo/manifest.ts';
import { DamageError, TresorError } from '../src/util/errors.ts';
import { tempDir } from './helpers/tmp.ts';
import { SharedArena, allSettledOrThrow, mapLimit } from '../src/util/concurrency.ts';
import { copyBytes } from '../src/util/bytes.ts';
import { PackWriter } from '../src/repo/pack-writer.ts';
import { readOneBlob } from '../src/repo/blob-batch.ts';
import type { BlobStore } from '../src/store/store.ts';
import { CONTEXT_MAX_INPUT, ZstdContext, ZstdContexts } from '../src/repo/zstd-context.ts';

const FAST_SCRYPT = { N: 1024, r: 8, p: 1 };

describe('codec', () => {
  const plain = Buffer.concat([Buffer.alloc(30000, 'a'), randomBytes(20000)]);
  for (const encrypted of [false, true]) {
    const keys: CodecKeys = { master: encrypted ? generateMasterKey() : undefined, compressionLevel: 1 };
    it(`round-trips and detects every single-bit flip (${encrypted ? 'encrypted' : 'plain'})`, () => {
      const id = computeId(keys, plain);
      const enc = encodeBlob(keys, BlobType.chunk, id, plain);
      assert.ok(enc.length < plain.length, 'compressible data is compressed');
      assert.deepEqual(decodeBlob(keys, BlobType.chunk, id, enc, { id, maxLength: plain.length, exactLength: true }, () => ({ what: 'x', context: {} })), plain);
      for (let i = 0; i < enc.length; i += Math.max(1, Math.floor(enc.length / 300))) {
        const bad = Buffer.from(enc);
        bad[i] ^= 1 << (i % 8);
        assert.throws(() => decodeBlob(keys, BlobType.chunk, id, bad, { id, maxLength: plain.length, exactLength: true }, () => ({ what: 'chunk', context: {} })), DamageError, `flip at ${i}`);
      }
      // Truncation and the wrong type or id are damage too.
      assert.throws(() => decodeBlob(keys, BlobType.chunk, id, enc.subarray(0, enc.length - 1), { id, maxLength: plain.length }, () => ({ what: 'c', context: {} })), DamageError);
      if (encrypted) {
        assert.throws(() => decodeBlob(keys, BlobType.indexPiece, id, enc, { maxLength: plain.length }, () => ({ what: 'c', context: {} })), DamageError);
        assert.throws(() => decodeBlob(keys, BlobType.chunk, ZERO_ID, enc, { maxLength: plain.length }, () => ({ what: 'c', context: {} })), DamageError);
      }
    });
  }

  it('keys chunk ids when encrypted, so a known plaintext cannot be confirmed', () => {
    const keys: CodecKeys = { master: generateMasterKey(), compressionLevel: 1 };
    assert.notDeepEqual(computeId(keys, plain), createHash('sha256').update(plain).digest());
    assert.deepEqual(computeId({ master: undefined, compressionLevel: 1 }, plain), createHash('sha256').update(plain).digest());
  });

  it('bounds decompression by the expected length (no zip bombs)', () => {
    const keys: CodecKeys = { master: undefined, compressionLevel: 1 };
    const bomb = Buffer.alloc(8 << 20);
    const enc = encodeBlob(keys, BlobType.chunk, ZERO_ID, bomb);
    assert.ok(enc.length < 4096);
    assert.throws(() => decodeBlob(keys, BlobType.chunk, ZERO_ID, enc, { maxLength: 65536 }, () => ({ what: 'bomb', context: {} })), DamageError);
  });

  it('sizes the decompression buffer from the frame header, and a header that lies is damage', () => {
    for (const n of [0, 1, 255, 256, 300, 65535, 65791, 65792, 131072, 5_000_000]) {
      const data = Buffer.alloc(n, 7);
      assert.equal(frameContentSize(zlib.zstdCompressSync(data, { pledgedSrcSize: n })), n, `pledged ${n}`);
      assert.equal(frameContentSize(zlib.zstdCompressSync(data)), n, `one-shot ${n}`);
    }
    for (const junk of [Buffer.alloc(0), Buffer.from('not a zstd frame'), Buffer.from([0x28, 0xb5, 0x2f, 0xfd])]) assert.equal(frameContentSize(junk), undefined);
    // Metadata is decoded under a generous bound (256 MiB for a manifest): the buffer follows the
    // frame's declared size, not the bound.
    const keys: CodecKeys = { master: generateMasterKey(), compressionLevel: 3 };
    for (const n of [10, 3_000_000]) {
      const manifest = Buffer.from(JSON.stringify({ text: 'x'.repeat(n) }));
      const enc = encodeBlob(keys, BlobType.manifest, ZERO_ID, manifest);
      assert.deepEqual(decodeBlob(keys, BlobType.manifest, ZERO_ID, enc, { maxLength: 256 << 20 }, () => ({ what: 'manifest', context: {} })), manifest);
    }
  });
});

describe('codec: disk-map pieces and nodes', () => {
  it('are stored compressed where an id repeats the one before it (holes), as they are where every id differs', () => {
    const keys: CodecKeys = { master: generateMasterKey(), compressionLevel: 3 };
    const compressed = (blob: Buffer) => (blob[3]! & 1) === 1; // header flags bit 0
    const random = randomBytes(64 * 32);
    const holes = Buffer.concat([randomBytes(32 * 32), Buffer.alloc(32 * 32)]);
    // A node: piece ids, with the all-hole piece's id repeated.
    const hole = randomBytes(32);
    const node = Buffer.concat([randomBytes(8 * 32), ...Array.from({ length: 24 }, () => hole)]);
    for (const type of [BlobType.indexPiece, BlobType.mapNode]) {
      for (const [plain, expect] of [[random, false], [holes, true], [node, true]] as const) {
        const id = computeId(keys, plain);
        const enc = encodeBlob(keys, type, id, plain);
        assert.equal(compressed(enc), expect, `type ${type}, ${plain === random ? 'random ids' : 'repeated ids'}`);
        assert.deepEqual(decodeBlob(keys, type, id, enc, { id, maxLength: plain.length, exactLength: true }, () => ({ what: 'piece', context: {} })), plain);
      }
    }
    // Other metadata is still tried (and compresses).
    const text = Buffer.from('x'.repeat(4096));
    assert.equal(compressed(encodeBlob(keys, BlobType.manifest, ZERO_ID, text)), true);
  });
});

describe('codec pool', () => {
  it('reads batches in place from the arena it shares with its workers, reuses a range once the batch is encoded or dropped, and transfers what does not fit', async () => {
    const keys: CodecKeys = { master: generateMasterKey(), compressionLevel: 1 };
    const pool = new CodecPool(keys, 1);
    const decoded = (id: Uint8Array, blob: Buffer, n: number) => decodeBlob(keys, BlobType.chunk, id, blob, { maxLength: n, exactLength: true }, () => ({ what: 'x', context: {} }));
    try {
      const chunk = 64 << 10;
      for (const path of ['encode', 'drop'] as const) {
        const data = pool.batchBuffer(4 * chunk);
        assert.ok(data.buffer instanceof SharedArrayBuffer, 'an arena range');
        for (let i = 0; i < 4; i++) data.fill(0x41 + i, i * chunk, (i + 1) * chunk);
        const expected = Buffer.from(data);
        const hashed = await pool.hash(data, chunk);
        assert.equal(data.length, 4 * chunk, 'read in place, not moved');
        for (let i = 0; i < 4; i++) assert.deepEqual(hashed.ids.subarray(i * 32, i * 32 + 32), computeId(keys, expected.subarray(i * chunk, (i + 1) * chunk)));
        // While the batch is held, its range is not handed out again.
        const other = pool.batchBuffer(4 * chunk);
        assert.ok(other.buffer === data.buffer && other.byteOffset >= data.byteOffset + data.length, 'a range after the held one');
        other.fill(0x7a);
        if (path === 'encode') {
          const { blobs, release } = await pool.encode(hashed, [1, 3], BlobType.chunk);
          assert.deepEqual(decoded(hashed.ids.subarray(32, 64), blobs[0], chunk), expected.subarray(chunk, 2 * chunk));
          assert.deepEqual(decoded(hashed.ids.subarray(96, 128), blobs[1], chunk), expected.subarray(3 * chunk, 4 * chunk));
          release();
        } else {
          await pool.drop(hashed);
        }
        pool.discardBatchBuffer(other);
        // First fit: the range comes back with the old bytes still in it.
        const again = pool.batchBuffer(4 * chunk);
        assert.equal(again.byteOffset, data.byteOffset, `range reused after ${path}`);
        assert.deepEqual(again, expected);
        pool.discardBatchBuffer(again);
      }
      // A view into an arena buffer is copied; the buffer stays the caller's until discarded.
      const whole = pool.batchBuffer(2 * chunk).fill(0x55);
      const part = await pool.hash(whole.subarray(0, chunk), chunk);
      assert.deepEqual(part.ids.subarray(0, 32), computeId(keys, Buffer.alloc(chunk, 0x55)));
      await pool.drop(part);
      assert.notEqual(pool.batchBuffer(2 * chunk).byteOffset, whole.byteOffset, 'still held');
      // Larger than the arena: a buffer of its own, moved to the worker.
      const big = pool.batchBuffer(64 << 20);
      assert.ok(big.buffer instanceof ArrayBuffer);
      big.fill(0x33);
      const hashed = await pool.hash(big, 1 << 20);
      assert.equal(big.length, 0, 'transferred');
      assert.deepEqual(hashed.ids.subarray(0, 32), computeId(keys, Buffer.alloc(1 << 20, 0x33)));
      await pool.drop(hashed);
    } finally {
      await pool.close();
    }
  });
});

describe('pack writer', () => {
  it('lays each pack out in the buffer of the last pack stored, and every pack reads back', async () => {
    const t = await tempDir();
    try {
      const local = await LocalStore.open(join(t.path, 'r'), { create: true });
      const seen: ArrayBufferLike[] = [];
      const store: BlobStore = {
        location: local.location,
        parallelCreates: 1,
        create: async (name, data) => {
          if (name.startsWith('data/')) seen.push(data.buffer);
          return local.create(name, data);
        },
        read: (name, range) => local.read(name, range),
        stat: (name) => local.stat(name),
        list: (prefix) => local.list(prefix),
        delete: (name) => local.delete(name),
        close: () => local.close(),
      };
      const { repo } = await Repository.init(store, { encryption: 'none', chunkSize: 16 << 10, packSize: 64 << 10, dictionaryBytes: 0 });
      const add = async (writer: PackWriter, plain: Buffer) => {
        const id = computeId(repo.keys, plain);
        await writer.add(BlobType.chunk, id, encodeBlob(repo.keys, BlobType.chunk, id, plain), plain.length);
      };
      const blobs = Array.from({ length: 24 }, () => randomBytes(16 << 10));
      const writer = new PackWriter(repo);
      for (const plain of blobs) await add(writer, plain);
      await writer.commitIndex();
      assert.ok(seen.length >= 5, `${seen.length} packs`);
      // One upload at a time: the pack being filled, one sealed and waiting, and the one being
      // stored take turns in at most three buffers.
      assert.ok(new Set(seen).size <= 3, `${new Set(seen).size} buffers for ${seen.length} packs`);
      for (const plain of blobs) assert.deepEqual(await readOneBlob(repo, { id: computeId(repo.keys, plain), type: BlobType.chunk, what: () => 'chunk' }), plain);
    } finally {
      await t.cleanup();
    }
  });
});

describe('copyBytes', () => {
  it('copies between plain and shared memory, at an offset, and refuses to overrun', () => {
    const source = randomBytes(100_000);
    for (const make of [(n: number) => Buffer.alloc(n), (n: number) => Buffer.from(new SharedArrayBuffer(n)), (n: number) => new Uint8Array(new SharedArrayBuffer(n + 8), 8, n)]) {
      const target = make(200_000);
      copyBytes(target, 1234, source);
      assert.deepEqual(Buffer.from(target.subarray(1234, 1234 + source.length)), source);
      assert.equal(target[1233], 0);
      assert.equal(target[1234 + source.length], 0);
      const shared = Buffer.from(new SharedArrayBuffer(source.length));
      copyBytes(shared, 0, source);
      const back = Buffer.alloc(source.length);
      copyBytes(back, 0, shared);
      assert.deepEqual(back, source);
      assert.throws(() => copyBytes(shared, 1, source), RangeError);
    }
  });
});

describe('allSettledOrThrow', () => {
  it('rejects with the first rejection only once every promise has settled', async () => {
    let lateDone = false;
    const late = new Promise<void>((resolve) => setTimeout(() => { lateDone = true; resolve(); }, 50));
    const early = Promise.reject(new Error('first'));
    const second = new Promise<void>((_, reject) => setTimeout(() => reject(new Error('second')), 10));
    await assert.rejects(allSettledOrThrow([late, early, second]), /first/);
    assert.equal(lateDone, true, 'waited for the slow one');
    await allSettledOrThrow([Promise.resolve(1), late]);
  });
});

describe('mapLimit', () => {
  it('keeps order and the limit; after a failure starts nothing more, waits for what runs, then throws the first failure', async () => {
    let running = 0;
    let most = 0;
    const tick = () => new Promise((r) => setTimeout(r, 5));
    const doubled = await mapLimit([1, 2, 3, 4, 5, 6, 7], 3, async (x) => {
      most = Math.max(most, ++running);
      await tick();
      running--;
      return x * 2;
    });
    assert.deepEqual(doubled, [2, 4, 6, 8, 10, 12, 14]);
    assert.equal(most, 3);

    const started: number[] = [];
    const finished: number[] = [];
    const failing = mapLimit([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 3, async (x) => {
      started.push(x);
      if (x === 1) throw new Error('first');
      if (x === 2) {
        await tick();
        throw new Error('second');
      }
      await tick();
      await tick();
      finished.push(x);
      return x;
    });
    await assert.rejects(failing, /first/);
    // 0 and 2 were in flight when 1 failed: both settled before the call did; nothing after 2 started.
    assert.deepEqual(started, [0, 1, 2]);
    assert.deepEqual(finished, [0]);
    await tick();
    await tick();
    await tick();
    assert.deepEqual(started, [0, 1, 2], 'nothing starts after the call has settled');
  });
});

describe('shared arena', () => {
  it('hands out aligned first-fit ranges, merges what comes back, and refuses a range that is not in use', () => {
    const arena = new SharedArena(64 << 10, 4096);
    const a = arena.allocate(5000)!;
    const b = arena.allocate(4096)!;
    const c = arena.allocate(1)!;
    assert.deepEqual([a, b, c], [0, 8192, 12288]);
    assert.equal(arena.allocate(64 << 10), undefined, 'no room');
    arena.free(b, 4096);
    assert.equal(arena.allocate(8192), 16384, 'the gap of 4 KiB is too small');
    arena.free(a, 5000);
    assert.equal(arena.allocate(12288), 0, 'the two freed ranges merged');
    arena.free(0, 12288);
    arena.free(c, 1);
    assert.throws(() => arena.free(c, 1), /not in use/, 'freed twice');
    assert.throws(() => arena.free(60 << 10, 8192), /not in use/, 'past the end');
    arena.free(16384, 8192);
    assert.equal(arena.freeBytes, 64 << 10);
    assert.equal(arena.allocate(64 << 10), 0, 'one range again');
  });
});

describe('pack headers', () => {
  it('round-trip; entries that do not tile the data, or of a type packs never hold, are named damage', () => {
    const entries = [
      { type: BlobType.chunk, id: randomBytes(32), offset: 0, length: 100, rawLength: 128 },
      { type: BlobType.mapNode, id: randomBytes(32), offset: 100, length: 50, rawLength: 64 },
      { type: BlobType.indexPiece, id: randomBytes(32), offset: 150, length: 10, rawLength: 12 },
    ];
    assert.deepEqual(decodePackHeader(encodePackHeader(entries), 160, 'p'), entries);
    const damage = (header: Buffer, headerOffset: number, pattern: RegExp) => assert.throws(() => decodePackHeader(header, headerOffset, 'data/ab/abcd'),
      (err: unknown) => err instanceof DamageError && err.code === 'damaged-pack' && pattern.test(err.message) && /pack data\/ab\/abcd/.test(err.message));
    damage(encodePackHeader(entries), 170, /entries end at 160 but the header starts at 170/);
    damage(encodePackHeader([entries[1], entries[0]]), 160, /entry 0 at 100\+50 is out of place/);
    for (const type of [0, BlobType.packHeader, BlobType.manifest, BlobType.meta, 200]) {
      damage(encodePackHeader([entries[0], { ...entries[1], type: type as typeof BlobType.chunk }]), 150, new RegExp(`entry 1 has blob type ${type}, which packs never hold`));
    }
    const truncated = encodePackHeader(entries).subarray(0, 8 + 45 * 2);
    damage(truncated, 160, /too short for 3 entries/);
    // A delta chunk's entry carries its base (77 bytes); cut short or naming itself, it is damage.
    const delta = { type: BlobType.deltaChunk, id: randomBytes(32), offset: 160, length: 40, rawLength: 128, base: entries[0].id };
    const withDelta = [...entries, delta];
    const encoded = encodePackHeader(withDelta);
    assert.equal(encoded.length, 8 + 45 * 3 + 77);
    assert.deepEqual(decodePackHeader(encoded, 200, 'p'), withDelta);
    damage(encoded.subarray(0, encoded.length - 1), 200, /truncated entry at byte 143/);
    damage(encodePackHeader([...entries, { ...delta, base: delta.id }]), 200, /names itself as its base/);
    assert.throws(() => encodePackHeader([...entries, { ...delta, base: undefined }]), /has no base id/);
  });
});

describe('blob index', () => {
  it('holds hundreds of thousands of ids through growth and finds exactly them', () => {
    const index = new BlobIndex(16);
    const packs = [randomBytes(32), randomBytes(32)];
    const ids: Buffer[] = [];
    for (let i = 0; i < 200_000; i++) {
      const id = randomBytes(32);
      ids.push(id);
      index.add(id, { packId: packs[i % 2], type: BlobType.chunk, offset: i, length: i % 65536, rawLength: 65536 });
    }
    assert.equal(index.size, 200_000);
    for (let i = 0; i < ids.length; i += 997) {
      const loc = index.get(ids[i])!;
      assert.equal(loc.offset, i);
      assert.deepEqual(loc.packId, packs[i % 2]);
    }
    for (let i = 0; i < 1000; i++) assert.equal(index.has(randomBytes(32)), false);
    // Same first word, different id: no false hit.
    const twin = Buffer.from(ids[0]);
    twin[31] ^= 1;
    assert.equal(index.has(twin), false);
  });

  it('keeps delta chunks\' bases through growth and replacement, and lists exactly them', () => {
    const index = new BlobIndex(16);
    const pack = randomBytes(32);
    const bases = new Map<string, Buffer>();
    for (let i = 0; i < 20_000; i++) {
      const id = randomBytes(32);
      const base = i % 7 === 0 ? randomBytes(32) : undefined;
      if (base) bases.set(id.toString('hex'), base);
      index.add(id, { packId: pack, type: base ? BlobType.deltaChunk : BlobType.chunk, offset: i, length: 1, rawLength: 1, ...(base ? { base } : {}) });
    }
    const listed = new Map([...index.deltaBases()].map(([id, base]) => [id.toString('hex'), base]));
    assert.deepEqual(listed, bases);
    for (const [hex, base] of bases) assert.deepEqual(index.get(Buffer.from(hex, 'hex'))!.base, base);
    // Slot-level access (verify) gives the same as get().
    for (const [hex, base] of [...bases].slice(0, 50)) {
      const id = Buffer.from(hex, 'hex');
      const slot = index.slotOf(id);
      assert.ok(slot >= 0);
      assert.deepEqual(index.idAt(slot), id);
      assert.deepEqual(index.baseIdAt(slot), base);
      assert.deepEqual(index.locationAt(slot), index.get(id));
      assert.equal(index.packNumberAt(slot), 0);
    }
    assert.equal(index.slotOf(randomBytes(32)), -1);
    // Replaced by a plain copy: no base any more.
    const [first] = bases.keys();
    index.add(Buffer.from(first, 'hex'), { packId: pack, type: BlobType.chunk, offset: 0, length: 1, rawLength: 1 }, true);
    assert.equal(index.get(Buffer.from(first, 'hex'))!.base, undefined);
    assert.equal([...index.deltaBases()].length, bases.size - 1);
  });

  it('index files read in place give the same index as their entry objects; damage is named', () => {
    const keys: CodecKeys = { master: generateMasterKey(), compressionLevel: 1 };
    const entry = (i: number, base?: Buffer): PackEntry => ({
      type: base ? BlobType.deltaChunk : i % 3 === 0 ? BlobType.indexPiece : BlobType.chunk, id: randomBytes(32), offset: i * 100, length: 90 + (i % 7), rawLength: 65536 + i,
      ...(base ? { base } : {}),
    });
    const packs = Array.from({ length: 40 }, (_, p) => ({
      packId: randomBytes(32), entries: Array.from({ length: 300 }, (_, i) => entry(p * 300 + i, i % 4 === 1 ? randomBytes(32) : undefined)),
    }));
    // The same blob in two packs: the first location is kept either way.
    packs[7].entries[5] = { ...packs[3].entries[9], offset: 123_456 };
    const file = encodeIndexFile(keys, { supersedes: [randomBytes(32)], packs });
    const views = decodeIndexFileViews(keys, file.name, file.data);
    const inPlace = new BlobIndex(16);
    for (const v of views.packs) inPlace.addPackEntries(v);
    const objects = new BlobIndex(16);
    for (const p of decodeIndexFile(keys, file.name, file.data).packs) for (const e of p.entries) objects.add(e.id, entryLocation(p.packId, e));
    assert.equal(inPlace.size, 40 * 300 - 1);
    assert.equal(objects.size, inPlace.size);
    for (const [id, loc] of objects.entries()) assert.deepEqual(inPlace.get(id), loc);
    assert.equal(inPlace.get(packs[3].entries[9].id)!.offset, packs[3].entries[9].offset);
    assert.equal([...inPlace.deltaBases()].length, [...objects.deltaBases()].length);
    // A delta entry naming itself as its base is refused when the file is read.
    const selfish = { packId: randomBytes(32), entries: [entry(1)] };
    selfish.entries[0] = { ...selfish.entries[0], type: BlobType.deltaChunk, base: selfish.entries[0].id };
    const bad = encodeIndexFile(keys, { supersedes: [], packs: [selfish] });
    assert.throws(() => decodeIndexFileViews(keys, bad.name, bad.data), (err: unknown) => err instanceof DamageError && /names itself as its base/.test(err.message));
  });
});

describe('repository config', () => {
  it('sets the incremental compression level with the default setting, or as asked; a repository without it uses the main level', async () => {
    const tmp = await tempDir('tresor-config-');
    try {
      const levels: Array<[Parameters<typeof Repository.init>[1], number | undefined]> = [
        [{ encryption: 'none' }, 1],
        [{ encryption: 'none', compressionLevel: 5 }, undefined],
        [{ encryption: 'none', compressionLevel: 5, incrementalCompressionLevel: 2 }, 2],
      ];
      for (const [i, [opts, expected]] of levels.entries()) {
        const store = await LocalStore.open(join(tmp.path, `r${i}`), { create: true });
        const { repo } = await Repository.init(store, opts);
        assert.equal(repo.config.compression.incrementalLevel, expected);
        const reopened = await Repository.open(store, async () => '');
        assert.equal(reopened.incrementalCompressionLevel, expected);
        await store.close();
      }
    } finally {
      await tmp.cleanup();
    }
  });

  it('samples 32 KiB dictionaries with the default setting, others as asked or none; refuses sizes it cannot use', async () => {
    const tmp = await tempDir('tresor-config-');
    try {
      const cases: Array<[Parameters<typeof Repository.init>[1], number | undefined]> = [
        [{ encryption: 'none' }, 32 << 10],
        [{ encryption: 'none', dictionaryBytes: 0 }, undefined],
        [{ encryption: 'none', compressionLevel: 5 }, undefined],
        [{ encryption: 'none', compressionLevel: 5, dictionaryBytes: 16 << 10 }, 16 << 10],
        [{ encryption: 'none', compressionLevel: 0, dictionaryBytes: 16 << 10 }, undefined], // no compression, no dictionaries
        [{ encryption: 'none', chunkSize: 16 << 10 }, 8 << 10], // at most half a chunk
        [{ encryption: 'none', chunkSize: 4 << 10 }, undefined],
      ];
      for (const [i, [opts, expected]] of cases.entries()) {
        const store = await LocalStore.open(join(tmp.path, `d${i}`), { create: true });
        await Repository.init(store, opts);
        assert.equal((await Repository.open(store, async () => '')).dictionaryBytes, expected, JSON.stringify(opts));
        await store.close();
      }
      for (const bad of [1000, 5000, 128 << 10, 256 << 10]) {
        const store = await LocalStore.open(join(tmp.path, `bad${bad}`), { create: true });
        await assert.rejects(Repository.init(store, { encryption: 'none', dictionaryBytes: bad }), /dictionary size/);
        await store.close();
      }
      // A config with a size no writer may use is damage, not a setting.
      const store = await LocalStore.open(join(tmp.path, 'd0'));
      const config = JSON.parse((await store.read('config')).toString());
      config.compression.dictionaryBytes = 300 << 10;
      await store.delete('config');
      await store.create('config', Buffer.from(JSON.stringify(config)));
      await assert.rejects(Repository.open(store, async () => ''), /invalid values/);
      await store.close();
    } finally {
      await tmp.cleanup();
    }
  });
});

describe('zstd contexts kept across calls', () => {
  const C = zlib.constants;
  const text = (seed: number, n: number): Buffer => {
    const words = ['alpha', 'beta', 'gamma', 'delta', 'error', 'warn', 'info', String(seed)];
    let out = '';
    for (let i = 0; out.length < n; i++) out += `${words[(i * 7 + seed) % words.length]} ${i % 97} `;
    return Buffer.from(out.slice(0, n));
  };
  const params = { [C.ZSTD_c_compressionLevel]: 1, [C.ZSTD_c_strategy]: 2, [C.ZSTD_c_hashLog]: 14, [C.ZSTD_c_chainLog]: 14, [C.ZSTD_c_checksumFlag]: 0, [C.ZSTD_c_contentSizeFlag]: 1 };
  const reference = (data: Buffer, dictionary?: Buffer): Buffer => zlib.zstdCompressSync(data, {
    ...(dictionary ? { dictionary } : {}), chunkSize: data.length + 64, pledgedSrcSize: data.length, params,
  });
  const inputs = [text(1, 131072), randomBytes(131072), text(2, 4096), Buffer.alloc(0), Buffer.alloc(70000), Buffer.concat([randomBytes(60000), text(3, 71072)]), text(4, 131072)];

  for (const withDictionary of [false, true]) {
    it(`writes the same frames as zstdCompressSync with pledgedSrcSize, call after call (${withDictionary ? 'dictionary' : 'no dictionary'})`, () => {
      const dictionary = withDictionary ? text(9, 32768) : undefined;
      const context = new ZstdContext(params, dictionary);
      for (let round = 0; round < 3; round++) {
        for (const input of inputs) {
          const frame = Buffer.from(context.compress(input));
          assert.deepEqual(frame, reference(input, dictionary), `round ${round}, ${input.length} bytes`);
          assert.deepEqual(zlib.zstdDecompressSync(frame, dictionary ? { dictionary } : {}), input);
          if (input.length > 0) assert.equal(frameContentSize(frame), input.length, 'the frame declares its size');
        }
      }
      context.close();
    });
  }

  it('returns a view of one output buffer, and a buffer of its own for inputs above the limit', () => {
    const context = new ZstdContext(params);
    const a = context.compress(text(5, 131072));
    const b = context.compress(text(6, 131072));
    assert.equal(a.buffer, b.buffer, 'one output buffer for both');
    const big = text(7, CONTEXT_MAX_INPUT + 1);
    const c = context.compress(big);
    assert.notEqual(c.buffer, b.buffer);
    assert.deepEqual(zlib.zstdDecompressSync(c), big);
    context.close();
  });

  it('keeps a context per parameters and replaces it when the dictionary changes', () => {
    const contexts = new ZstdContexts(2);
    const d1 = text(11, 32768);
    const d2 = text(12, 32768);
    const input = text(13, 131072);
    const f1 = Buffer.from(contexts.compress(input, params, { key: 'd1', bytes: d1 }));
    const f2 = Buffer.from(contexts.compress(input, params, { key: 'd2', bytes: d2 }));
    assert.deepEqual(f1, reference(input, d1));
    assert.deepEqual(f2, reference(input, d2));
    assert.deepEqual(Buffer.from(contexts.compress(input, params)), reference(input));
    // A third parameter set evicts the oldest; every frame stays right.
    const level3 = { ...params, [C.ZSTD_c_compressionLevel]: 3, [C.ZSTD_c_strategy]: 4 };
    assert.deepEqual(zlib.zstdDecompressSync(contexts.compress(input, level3)), input);
    assert.deepEqual(Buffer.from(contexts.compress(input, params, { key: 'd1', bytes: d1 })), f1);
  });
});

describe('compression dictionaries (codec)', () => {
  for (const encrypted of [true, false]) {
    it(`a compressible chunk is a delta against the dictionary; incompressible data and unusable dictionaries are not (${encrypted ? 'encrypted' : 'unencrypted'})`, () => {
      const keys: CodecKeys = { master: encrypted ? generateMasterKey() : undefined, compressionLevel: 3 };
      const line = (i: number) => `2026-11-23T05:${String(i % 60).padStart(2, '0')}:00Z web-0${i % 4} GET /api/orders/${(i * 7919) % 100000} 200 ${(i * 31) % 5000}\n`;
      const textOf = (from: number, n: number) => Buffer.from(Array.from({ length: n }, (_, i) => line(from + i)).join('')).subarray(0, 128 << 10);
      const chunk = textOf(0, 4000);
      const dictPlain = textOf(50_000, 1000).subarray(0, 32 << 10);
      const dictionary = { id: computeId(keys, dictPlain), plain: dictPlain };
      const id = computeId(keys, chunk);
      const made = encodeChunk(keys, id, chunk, undefined, undefined, dictionary);
      assert.equal(made.type, BlobType.deltaChunk);
      assert.ok(made.base !== undefined && Buffer.from(made.base).equals(dictionary.id), 'the result names the dictionary as its base');
      assert.ok(made.ratio !== undefined && made.ratio < 0.5);
      const expect = { id, maxLength: chunk.length, exactLength: true };
      const label = () => ({ what: 'delta chunk x', context: {} });
      assert.ok(decodeBlob(keys, made.type, id, made.blob, expect, label, dictionary).equals(chunk));
      assert.throws(() => decodeBlob(keys, made.type, id, made.blob, expect, label), /cannot be decoded without its base/);
      // A chunk given a parent base never falls back to the dictionary (its caller records that base).
      const parent = Buffer.from(chunk);
      parent.fill(0x41, 0, 64 << 10);
      const withBase = encodeChunk(keys, id, chunk, { id: computeId(keys, parent), plain: parent }, undefined, dictionary);
      assert.ok(withBase.type === BlobType.chunk || Buffer.from(withBase.base!).equals(computeId(keys, parent)));
      // Random data is sampled as incompressible: plain.
      const noise = randomBytes(128 << 10);
      assert.equal(encodeChunk(keys, computeId(keys, noise), noise, undefined, undefined, dictionary).type, BlobType.chunk);
      // A dictionary that starts like a zstd dictionary would be parsed as one: never used, never proposed.
      const magic = Buffer.from(dictPlain);
      magic.set([0x37, 0xa4, 0x30, 0xec], 0);
      assert.equal(encodeChunk(keys, id, chunk, undefined, undefined, { id: computeId(keys, magic), plain: magic }).type, BlobType.chunk);
      const tailMagic = Buffer.from(chunk);
      tailMagic.set([0x37, 0xa4, 0x30, 0xec], chunk.length - (32 << 10));
      assert.equal(dictionaryCandidate(tailMagic, 0.2, 32 << 10), undefined);
      assert.ok(Buffer.from(dictionaryCandidate(chunk, 0.2, 32 << 10)!).equals(chunk.subarray(chunk.length - (32 << 10))));
      assert.equal(dictionaryCandidate(chunk, 0.9, 32 << 10), undefined, 'data that compresses poorly is no dictionary');
      // A chunk identical to the dictionary is never a delta against itself.
      assert.equal(encodeChunk(keys, dictionary.id, dictPlain, undefined, undefined, dictionary).type, BlobType.chunk);
    });
  }
});

describe('delta chunks (codec)', () => {
  // Random: every byte of the chunk outside the change can only come from the base.
  const base = randomBytes(128 << 10);
  const chunk = Buffer.from(base);
  randomBytes(4096).copy(chunk, 70_000);
  for (const encrypted of [true, false]) {
    it(`decode only against their own base (${encrypted ? 'encrypted' : 'unencrypted'})`, () => {
      const keys: CodecKeys = { master: encrypted ? generateMasterKey() : undefined, compressionLevel: 3 };
      const id = computeId(keys, chunk);
      const baseId = computeId(keys, base);
      const { type, blob } = encodeChunk(keys, id, chunk, { id: baseId, plain: base });
      assert.equal(type, BlobType.deltaChunk);
      assert.ok(blob.length < 6000, `a 4 KiB change costs ${blob.length} bytes`);
      const expect = { id, maxLength: chunk.length, exactLength: true };
      const label = () => ({ what: 'delta chunk x', context: {} });
      assert.ok(decodeBlob(keys, type, id, blob, expect, label, { id: baseId, plain: base }).equals(chunk));
      // Encrypted, the base's id is bound (AAD): the same bytes under another id fail. Unencrypted
      // only the bytes matter, and the identity check proves the result.
      if (encrypted) assert.throws(() => decodeBlob(keys, type, id, blob, expect, label, { id: randomBytes(32), plain: base }), /authentication failed/);
      else assert.ok(decodeBlob(keys, type, id, blob, expect, label, { id: randomBytes(32), plain: base }).equals(chunk));
      // Other bytes as the base fail either way (identity).

      const other = Buffer.from(base);
      other[70_000 + 5000] ^= 1;
      assert.throws(() => decodeBlob(keys, type, id, blob, expect, label, { id: baseId, plain: other }), DamageError);
      assert.throws(() => decodeBlob(keys, type, id, blob, expect, label), /cannot be decoded without its base/);
      // As a plain chunk the same bytes are no chunk of this id's delta: the type is bound too (AAD / identity).
      if (encrypted) assert.throws(() => decodeBlob(keys, BlobType.chunk, id, blob, expect, label), /authentication failed/);
      // Without a base, or where the base does not help, a plain chunk.
      assert.equal(encodeChunk(keys, id, chunk, undefined).type, BlobType.chunk);
      const noise = randomBytes(128 << 10);
      assert.equal(encodeChunk(keys, computeId(keys, noise), noise, { id: baseId, plain: base }).type, BlobType.chunk);
      assert.throws(() => encodeBlob(keys, BlobType.deltaChunk, id, chunk), /made by encodeChunk/);
      // A base that starts like a zstd dictionary would be parsed as one: never a base.
      const magic = Buffer.from(base);
      magic.set([0x37, 0xa4, 0x30, 0xec], 0);
      const like = Buffer.from(magic);
      like[100_000] ^= 1;
      assert.equal(encodeChunk(keys, computeId(keys, like), like, { id: computeId(keys, magic), plain: magic }).type, BlobType.chunk);
    });
  }
});

describe('delta chunks with stored bases (codec executor)', () => {
  // Three levels of data: a dictionary-like plain chunk, a base that is a delta of it (two
  // levels), and a chunk that is a delta of that base.
  const inner = randomBytes(128 << 10);
  const base = Buffer.from(inner);
  randomBytes(8192).copy(base, 20_000);
  const chunk = Buffer.from(base);
  randomBytes(4096).copy(chunk, 90_000);
  const label = (what: string) => () => ({ what, context: {} });
  for (const encrypted of [true, false]) {
    it(`decode a delta's stored base in the worker (plain or two-level), shared by a request's items; a damaged base fails only its deltas (${encrypted ? 'encrypted' : 'unencrypted'})`, () => {
      const keys: CodecKeys = { master: encrypted ? generateMasterKey() : undefined, compressionLevel: 3 };
      const innerId = computeId(keys, inner);
      const baseId = computeId(keys, base);
      const id = computeId(keys, chunk);
      const baseBlob = encodeChunk(keys, baseId, base, { id: innerId, plain: inner });
      assert.equal(baseBlob.type, BlobType.deltaChunk);
      const deltaBlob = encodeChunk(keys, id, chunk, { id: baseId, plain: base });
      assert.equal(deltaBlob.type, BlobType.deltaChunk);
      const innerBlob = encodeBlob(keys, BlobType.chunk, innerId, inner);
      const storedBase = (stored: Uint8Array, type = baseBlob.type, withInner = true): StoredBase => ({
        id: baseId, type, stored, rawLength: base.length, label: `chunk ${baseId.toString('hex')} in data/xx`, ...(withInner ? { base: { id: innerId, plain: inner } } : {}),
      });
      const item = (sb: StoredBase): DecodeItem => ({ type: deltaBlob.type, id, stored: Buffer.from(deltaBlob.blob), rawLength: chunk.length, label: 'delta chunk x', storedBase: sb });
      const exec = new CodecExecutor(keys);
      const decode = (items: DecodeItem[], flags: { trustBaseAead?: boolean } = {}) => exec.handle({ op: 'decode', req: 1, items, ...flags }).message.results as DecodeResult[];
      // Two items share one stored base (as a message would carry them: one object).
      const shared = storedBase(Buffer.from(baseBlob.blob));
      const [a, b] = decode([item(shared), item(shared)]);
      assert.ok(a.ok && Buffer.from(a.plain).equals(chunk) && b.ok && Buffer.from(b.plain).equals(chunk));
      // A plain base (one level) decodes too.
      const plainBase = encodeBlob(keys, BlobType.chunk, baseId, base);
      const [c] = decode([item(storedBase(plainBase, BlobType.chunk, false))]);
      assert.ok(c.ok && Buffer.from(c.plain).equals(chunk));
      // Damaged: named by the base's label, with its own code, and the other items unharmed.
      const bad = Buffer.from(baseBlob.blob);
      bad[Math.floor(bad.length / 2)] ^= 0x10;
      const [d, e] = decode([item(storedBase(bad)), { type: BlobType.chunk, id: innerId, stored: Buffer.from(innerBlob), rawLength: inner.length, label: 'chunk y' }]);
      assert.ok(!d.ok && d.code === BASE_UNREADABLE && /^its base cannot be read: .*chunk [0-9a-f]{64} in data\/xx/.test(d.message), JSON.stringify(d));
      assert.ok(e.ok && Buffer.from(e.plain).equals(inner));
      // A two-level base without its own base cannot be decoded.
      const [f] = decode([item(storedBase(Buffer.from(baseBlob.blob), baseBlob.type, false))]);
      assert.ok(!f.ok && f.code === BASE_UNREADABLE);
      // trustBaseAead: a base sealed under its id but holding other bytes (a writer's bug, not
      // damage) passes as a base only where the AES-GCM tag is trusted for it; it never passes
      // unencrypted, and the delta's own identity check still catches the wrong result.
      const liar = encodeChunk(keys, baseId, inner, undefined);
      // (Each request gets bytes of its own: the executor frees what a request brought.)
      const trusting = decode([item(storedBase(Buffer.from(liar.blob), liar.type, false))], { trustBaseAead: true })[0];
      const checking = decode([item(storedBase(Buffer.from(liar.blob), liar.type, false))])[0];
      assert.ok(!checking.ok && checking.code === BASE_UNREADABLE && /does not match its identifier/.test(checking.message), JSON.stringify(checking));
      assert.ok(!trusting.ok, 'the delta decoded against the wrong bytes fails its own check');
      if (encrypted) assert.notEqual(trusting.code, BASE_UNREADABLE, 'with trustBaseAead the base itself was accepted');
      else assert.equal(trusting.code, BASE_UNREADABLE, 'unencrypted there is no tag to trust');
    });
  }
});

describe('keys', () => {
  it('recovery keys print and parse back, tolerating dashes, case and look-alike letters', () => {
    const secret = randomBytes(32);
    const text = formatRecoveryKey(secret);
    assert.match(text, /^([0-9A-Z]{4}-){12}[0-9A-Z]{4}$/);
    assert.deepEqual(parseRecoveryKey(text.toLowerCase().replace(/-/g, ' ')), secret);
    assert.throws(() => parseRecoveryKey(text.slice(0, -4)), TresorError);
    assert.throws(() => parseRecoveryKey(`${text.slice(0, -1)}U`), TresorError);
  });

  it('opens with any passphrase slot or the recovery key; removing a passphrase keeps the data readable', async () => {
    const t = await tempDir();
    try {
      const store = await LocalStore.open(join(t.path, 'r'), { create: true });
      const { repo, recoveryKey } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: 'one', scrypt: FAST_SCRYPT });
      const second = await repo.addPassphrase('two');
      const first = repo.keySlot!.slice(5);
      for (const secret of ['one', 'two', recoveryKey!]) {
        const r = await Repository.open(store, async () => secret);
        assert.equal(r.config.id, repo.config.id);
        assert.deepEqual(r.keys.master!.encKey, repo.keys.master!.encKey);
      }
      await assert.rejects(Repository.open(store, async () => 'three'), { code: 'wrong-passphrase' });
      await repo.removeKeySlot(first);
      await assert.rejects(Repository.open(store, async () => 'one'), { code: 'wrong-passphrase' });
      assert.equal((await Repository.open(store, async () => 'two')).keySlot, `keys/${second}`);
      await assert.rejects(repo.removeKeySlot(second), /last passphrase slot/);
    } finally {
      await t.cleanup();
    }
  });

  it('refuses a key slot copied from another repository', async () => {
    const t = await tempDir();
    try {
      const a = await LocalStore.open(join(t.path, 'a'), { create: true });
      const b = await LocalStore.open(join(t.path, 'b'), { create: true });
      await Repository.init(a, { encryption: 'aes-256-gcm', passphrase: 'pw', scrypt: FAST_SCRYPT });
      const { repo: rb } = await Repository.init(b, { encryption: 'aes-256-gcm', passphrase: 'other', scrypt: FAST_SCRYPT });
      for await (const k of a.list('keys/')) await b.create(`keys/${'f'.repeat(16)}`, await a.read(k.name)).catch(() => false);
      await assert.rejects(Repository.open(b, async () => 'pw'), { code: 'wrong-passphrase' });
      assert.ok(rb);
    } finally {
      await t.cleanup();
    }
  });
});

describe('locks', () => {
  it('shared locks coexist, exclusive excludes, stale locks of dead processes are ignored', async () => {
    const t = await tempDir();
    try {
      const store = await LocalStore.open(join(t.path, 'r'), { create: true });
      const { repo } = await Repository.init(store, { encryption: 'none' });
      const s1 = await repo.lock('shared', 'backup 1');
      const s2 = await repo.lock('shared', 'backup 2');
      await assert.rejects(repo.lock('exclusive', 'gc'), (err: unknown) => err instanceof RepositoryLockedError && /backup \d/.test((err as Error).message));
      await s1.release();
      await s2.release();
      const ex = await repo.lock('exclusive', 'gc');
      await assert.rejects(repo.lock('shared', 'backup 3'), RepositoryLockedError);
      await ex.release();
      // A lock left by a process that no longer exists on this host is stale.
      const { encodeBlob: enc } = await import('../src/repo/codec.ts');
      const name = `locks/${'ab'.repeat(16)}`;
      const ctx = Buffer.from(name.slice(6).padEnd(64, '0'), 'hex');
      const os = await import('node:os');
      await store.create(name, enc(repo.keys, BlobType.lock, ctx, Buffer.from(JSON.stringify({ kind: 'exclusive', operation: 'dead gc', host: os.hostname(), pid: 2 ** 22 + 12345, time: new Date().toISOString() }))));
      const l = await RepositoryLock.acquire(store, repo.keys, 'shared', 'after crash');
      await l.release();
      assert.equal(await store.stat(name), undefined, 'the stale lock was removed');
    } finally {
      await t.cleanup();
    }
  });
});

describe('snapshot names', () => {
  it('are <type>/<id>/<basic ISO 8601 UTC> and round-trip', () => {
    const d = new Date(Date.UTC(2026, 10, 22, 10, 15, 0, 456));
    assert.equal(snapshotName('vm', 'web1', d), 'vm/web1/20261122T101500Z');
    const p = parseSnapshotName('vm/web1/20261122T101500Z');
    assert.equal(p.type, 'vm');
    assert.equal(p.id, 'web1');
    assert.equal(p.time.toISOString(), '2026-11-22T10:15:00.000Z');
    for (const bad of ['vm/web1', 'vm/web 1/20261122T101500Z', 'xx/web1/20261122T101500Z', 'vm/../20261122T101500Z', 'vm/web1/2026-11-22T10:15:00Z']) {
      assert.throws(() => parseSnapshotName(bad), TresorError, bad);
    }
    for (const bad of ['', '../x', 'a/b', 'a:b', '.hidden', 'x'.repeat(129)]) assert.throws(() => validateSourceId(bad), TresorError, bad);
  });
});

describe('garbage collection on demand (util/gc.ts)', () => {
  it('gives every thread gc() and leaves --expose-gc cleared, also for workers starting together', async () => {
    // In a process of its own: V8's flags are the process's.
    const gcModule = new URL('../src/util/gc.ts', import.meta.url).href;
    const script = `
      import { Worker } from 'node:worker_threads';
      import { runInNewContext } from 'node:vm';
      import { exposeGc } from ${JSON.stringify(gcModule)};
      const results = { main: typeof exposeGc() };
      results.workers = await Promise.all(Array.from({ length: 4 }, () => new Promise((resolve, reject) => {
        const w = new Worker(\`import { exposeGc } from ${JSON.stringify(gcModule)};
          import { parentPort } from 'node:worker_threads';
          const gc = exposeGc();
          gc?.({ type: 'minor', execution: 'sync' });
          parentPort.postMessage(typeof gc);\`, { eval: true });
        w.once('message', (m) => { resolve(m); void w.terminate(); });
        w.once('error', reject);
      })));
      results.flagLeftSet = runInNewContext('typeof gc') !== 'undefined';
      console.log(JSON.stringify(results));
    `;
    const { execFileSync } = await import('node:child_process');
    const out = JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' }));
    assert.deepEqual(out, { main: 'function', workers: ['function', 'function', 'function', 'function'], flagLeftSet: false });
  });
});
