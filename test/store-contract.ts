/**
 * The BlobStore contract (the comment at the top of src/store/store.ts) as a reusable node:test
 * suite: every backend, and every wrapper around one, must pass it unchanged.
 *
 * `open` is called once for the suite; each test works under its own name prefix, so the tests
 * do not see each other's blobs. After the last test the store is closed, then `cleanup` runs.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { TresorError } from '../src/util/errors.ts';
import { BlobNotFoundError, StoreError, type BlobInfo, type BlobStore, type ReadRange } from '../src/store/store.ts';

export interface OpenedStore {
  store: BlobStore;
  cleanup(): Promise<void>;
}

async function listAll(store: BlobStore, prefix: string): Promise<BlobInfo[]> {
  const out: BlobInfo[] = [];
  for await (const info of store.list(prefix)) out.push(info);
  return out;
}

/** name → size, failing on a name listed twice. */
function asMap(infos: BlobInfo[]): Map<string, number> {
  const map = new Map<string, number>();
  for (const { name, size } of infos) {
    assert.ok(!map.has(name), `list yielded ${name} twice`);
    map.set(name, size);
  }
  return map;
}

/** Runs `fn` over `items` with at most `width` calls in flight. */
async function inParallel<T>(items: T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
}

function isStoreErrorNotMissing(err: unknown): boolean {
  return err instanceof StoreError && !(err instanceof BlobNotFoundError);
}

const BAD_NAMES = [
  '', '/abs', 'trailing/', 'a//b', '.', '..', '../escape', 'a/../b', 'a/./b', 'a/.', './a',
  'with space', 'tab\tname', 'new\nline', 'back\\slash', 'ümlaut', 'nul\0byte', 'q?mark', 'star*', `${'x'.repeat(1025)}`,
];

export function storeContract(label: string, open: () => Promise<OpenedStore>): void {
  describe(`BlobStore contract: ${label}`, () => {
    let opened: OpenedStore | undefined;
    let store: BlobStore;

    before(async () => {
      opened = await open();
      store = opened.store;
    });

    after(async () => {
      if (opened === undefined) return;
      try {
        await opened.store.close();
      } finally {
        await opened.cleanup();
      }
    });

    it('has a location to show to people', () => {
      assert.equal(typeof store.location, 'string');
      assert.ok(store.location.length > 0);
    });

    it('create stores a new blob and resolves true; an existing name resolves false and keeps the first bytes', async () => {
      const first = randomBytes(777);
      assert.equal(await store.stat('create/blob'), undefined);
      assert.equal(await store.create('create/blob', first), true);
      assert.deepEqual(await store.read('create/blob'), first);
      assert.equal(await store.create('create/blob', randomBytes(12)), false, 'different bytes');
      assert.equal(await store.create('create/blob', first), false, 'same bytes');
      assert.equal(await store.create('create/blob', new Uint8Array(0)), false, 'empty data');
      assert.deepEqual(await store.read('create/blob'), first, 'the first blob is never overwritten');
      assert.deepEqual(await store.stat('create/blob'), { name: 'create/blob', size: 777 });
    });

    it('create takes any Uint8Array view, and empty blobs', async () => {
      const backing = randomBytes(4096);
      const view = new Uint8Array(backing.buffer, backing.byteOffset + 1000, 300);
      assert.equal(await store.create('views/sub', view), true);
      const back = await store.read('views/sub');
      assert.ok(Buffer.isBuffer(back), 'read returns a Buffer');
      assert.deepEqual(back, backing.subarray(1000, 1300));

      assert.equal(await store.create('views/empty', new Uint8Array(0)), true);
      assert.deepEqual(await store.stat('views/empty'), { name: 'views/empty', size: 0 });
      assert.equal((await store.read('views/empty')).length, 0);
      assert.equal((await store.read('views/empty', { offset: 0, length: 0 })).length, 0);
      await assert.rejects(store.read('views/empty', { offset: 0, length: 1 }), isStoreErrorNotMissing);
      assert.equal(await store.create('views/empty', randomBytes(5)), false);
      assert.equal((await store.stat('views/empty'))?.size, 0);
    });

    it('16 concurrent creates of one name: exactly one resolves true, and its bytes are stored', async () => {
      await Promise.all(['race/a', 'race/b', 'race/c'].map(async (name) => {
        const payloads = Array.from({ length: 16 }, (_, i) => Buffer.from(`${name} writer ${i} ${randomBytes(8).toString('hex')}`));
        const results = await Promise.all(payloads.map((p) => store.create(name, p)));
        const winners = results.flatMap((won, i) => (won ? [i] : []));
        assert.equal(winners.length, 1, `${name}: ${winners.length} creates resolved true`);
        assert.deepEqual(await store.read(name), payloads[winners[0]]);
      }));
    });

    it('read returns the whole blob or exactly the range asked for, zero-length and end ranges included', async () => {
      const data = randomBytes(1000);
      assert.equal(await store.create('ranges/blob', data), true);
      assert.deepEqual(await store.read('ranges/blob'), data);
      const ranges: ReadRange[] = [
        { offset: 0, length: 1000 }, { offset: 0, length: 1 }, { offset: 999, length: 1 },
        { offset: 500, length: 500 }, { offset: 123, length: 456 },
        { offset: 0, length: 0 }, { offset: 500, length: 0 }, { offset: 1000, length: 0 },
      ];
      for (const r of ranges) {
        const got = await store.read('ranges/blob', r);
        assert.ok(Buffer.isBuffer(got));
        assert.deepEqual(got, data.subarray(r.offset, r.offset + r.length), `range ${r.offset}+${r.length}`);
      }
    });

    it('a range that ends past the end is a StoreError (short read), not a missing blob', async () => {
      assert.equal(await store.create('short/blob', randomBytes(1000)), true);
      for (const r of [{ offset: 990, length: 20 }, { offset: 999, length: 2 }, { offset: 1000, length: 1 }, { offset: 5000, length: 10 }, { offset: 1001, length: 0 }]) {
        await assert.rejects(store.read('short/blob', r), isStoreErrorNotMissing, `range ${r.offset}+${r.length}`);
      }
      for (const r of [{ offset: -1, length: 1 }, { offset: 0, length: -1 }, { offset: 1.5, length: 1 }, { offset: Number.NaN, length: 1 }]) {
        await assert.rejects(async () => store.read('short/blob', r), StoreError, `range ${r.offset}+${r.length}`);
      }
    });

    it('a missing blob: read throws BlobNotFoundError, stat says undefined, delete succeeds', async () => {
      for (const range of [undefined, { offset: 0, length: 10 }, { offset: 0, length: 0 }]) {
        await assert.rejects(store.read('missing/never-created', range), BlobNotFoundError);
      }
      assert.equal(await store.stat('missing/never-created'), undefined);
      await store.delete('missing/never-created');
      await store.delete('never-created-dir/deeper/blob');
    });

    it('a name that is a path prefix of another blob is not a blob, and false always means "exists"', async () => {
      assert.equal(await store.create('nested/parent/child', randomBytes(10)), true);
      assert.equal(await store.stat('nested/parent'), undefined);
      for (const range of [undefined, { offset: 0, length: 4 }, { offset: 0, length: 0 }]) {
        await assert.rejects(store.read('nested/parent', range), BlobNotFoundError, `range ${JSON.stringify(range)}`);
        await assert.rejects(store.read('nested/parent/child/grandchild', range), BlobNotFoundError, `range ${JSON.stringify(range)}`);
      }
      assert.equal(await store.stat('nested/parent/child/grandchild'), undefined);
      // A backend may be unable to store both names (a filesystem cannot), but must not claim one
      // exists when it does not: create either stores it or throws.
      for (const name of ['nested/parent', 'nested/parent/child/grandchild']) {
        let created: boolean | undefined;
        try {
          created = await store.create(name, Buffer.from('x'));
        } catch (err) {
          assert.ok(err instanceof TresorError, `create ${name} threw ${String(err)}`);
          continue;
        }
        assert.equal(created, true, `create ${name} resolved false although stat said the blob does not exist`);
        assert.deepEqual(await store.read(name), Buffer.from('x'));
      }
    });

    it('stat gives the name and size of a blob', async () => {
      for (const size of [0, 1, 4095, 4096, 70_000]) {
        const name = `stat/size-${size}`;
        assert.equal(await store.create(name, randomBytes(size)), true);
        assert.deepEqual(await store.stat(name), { name, size });
      }
    });

    it('list yields every blob whose name starts with the prefix, once, with its size', async () => {
      const blobs: Record<string, number> = {
        'ls/a/1': 1, 'ls/a/2': 2, 'ls/ab': 3, 'ls/b/1': 4, 'ls/c': 5, 'ls/a/deep/er/x': 6, 'lsx/other': 7,
      };
      await Promise.all(Object.entries(blobs).map(async ([name, size]) => assert.equal(await store.create(name, randomBytes(size)), true)));
      const expect = (prefix: string) => new Map(Object.entries(blobs).filter(([n]) => n.startsWith(prefix)));
      for (const prefix of ['ls/a', 'ls/a/', 'ls/', 'ls', 'ls/b/1', 'ls/a/deep/', 'ls/zzz', 'ls/zzz/', 'ls/a/1/']) {
        assert.deepEqual(asMap(await listAll(store, prefix)), expect(prefix), `list(${JSON.stringify(prefix)})`);
      }
      const everything = asMap(await listAll(store, ''));
      for (const [name, size] of Object.entries(blobs)) assert.equal(everything.get(name), size, `list('') has ${name}`);
    });

    it('list pages through more than 1000 blobs', async () => {
      const names = Array.from({ length: 1100 }, (_, i) => `paged/blob-${String(i).padStart(5, '0')}`);
      await inParallel(names, 64, async (name) => {
        assert.equal(await store.create(name, randomBytes(Number(name.slice(-5)) % 7)), true);
      });
      const listed = asMap(await listAll(store, 'paged/'));
      assert.equal(listed.size, names.length);
      for (const name of names) assert.equal(listed.get(name), Number(name.slice(-5)) % 7, name);
    });

    it('delete removes a blob; deleting again is fine; the name can then be created anew', async () => {
      assert.equal(await store.create('del/blob', Buffer.from('old')), true);
      assert.equal(await store.create('del/keep', Buffer.from('keep')), true);
      await store.delete('del/blob');
      assert.equal(await store.stat('del/blob'), undefined);
      await assert.rejects(store.read('del/blob'), BlobNotFoundError);
      assert.deepEqual([...asMap(await listAll(store, 'del/')).keys()], ['del/keep']);
      await store.delete('del/blob');
      assert.equal(await store.create('del/blob', Buffer.from('new')), true);
      assert.deepEqual(await store.read('del/blob'), Buffer.from('new'));
    });

    it('invalid names are rejected by every operation', async () => {
      const isBadName = (err: unknown) => err instanceof TresorError && err.code === 'bad-blob-name';
      for (const name of BAD_NAMES) {
        const shown = JSON.stringify(name.slice(0, 40));
        await assert.rejects(async () => store.create(name, Buffer.from('x')), isBadName, `create ${shown}`);
        await assert.rejects(async () => store.read(name), isBadName, `read ${shown}`);
        await assert.rejects(async () => store.read(name, { offset: 0, length: 0 }), isBadName, `read range ${shown}`);
        await assert.rejects(async () => store.stat(name), isBadName, `stat ${shown}`);
        await assert.rejects(async () => store.delete(name), isBadName, `delete ${shown}`);
      }
      for (const prefix of ['../', 'a/../', '/x/', 'a//']) {
        await assert.rejects(async () => listAll(store, prefix), isBadName, `list ${JSON.stringify(prefix)}`);
      }
    });

    it('a 16 MiB blob round-trips, and concurrent readers see all of it or nothing', async () => {
      const big = randomBytes(16 << 20);
      const creating = store.create('big/blob', big);
      let done = false;
      void creating.finally(() => { done = true; }).catch(() => undefined);
      let partialLooks = 0;
      while (!done) {
        try {
          const seen = await store.read('big/blob');
          if (!seen.equals(big)) partialLooks++;
        } catch (err) {
          if (!(err instanceof BlobNotFoundError)) throw err;
        }
      }
      assert.equal(await creating, true);
      assert.equal(partialLooks, 0, 'a reader saw a partially written blob');
      assert.deepEqual(await store.stat('big/blob'), { name: 'big/blob', size: big.length });
      assert.ok((await store.read('big/blob')).equals(big));
      const tailRange = { offset: big.length - (1 << 20) - 3, length: (1 << 20) + 3 };
      assert.ok((await store.read('big/blob', tailRange)).equals(big.subarray(tailRange.offset)));
    });
  });
}
