/**
 * Crash trials of the lifecycle suite on the local filesystem (SIGKILL at random points of
 * backup, prune, gc and sync), and a full disk during backup and during gc.
 */
import { it, describe } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, rm, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { crashSuite, PASS } from './lifecycle-suite.ts';
import { localFixture } from './helpers/lifecycle-fixtures.ts';
import { tempDir } from './helpers/tmp.ts';
import { tresor } from './helpers/cli.ts';
import { run, sha256File } from './helpers/exec.ts';
import { generateCorpus, rewriteCorpus } from '../bench/corpus.ts';

let n = 0;

crashSuite(localFixture({ crashTrials: 20, concurrentSeconds: 15 }));

describe('lifecycle with a full disk', () => {
  it('a full disk during backup and during gc is a clear error; nothing is lost; both work once space is freed', async () => {
    const t = await tempDir();
    const mnt = join(t.path, 'small');
    await mkdir(mnt);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=48m', 'tmpfs', mnt]);
    try {
      const env = { TRESOR_PASSPHRASE: PASS };
      const loc = join(mnt, 'repo');
      const cli = (args: string[]) => tresor(['--repo', loc, '--json', ...args], { env });
      assert.equal((await cli(['repo', 'init'])).code, 0);
      const img = join(t.path, 'img.raw');
      generateCorpus(img, { size: 16 << 20, seed: 51 });
      const shas = new Map<string, string>();
      for (let i = 0; i < 3; i++) {
        if (i > 0) rewriteCorpus(img, { fraction: 0.4, seed: i });
        const b = await cli(['backup', 'image', img, '--id', 'full']);
        assert.equal(b.code, 0, b.stdout + b.stderr);
        shas.set(b.json.snapshot.name, await sha256File(img));
      }
      assert.equal((await cli(['prune', '--all', '--keep-last', '1'])).code, 0);
      // Fill the filesystem: GC needs room for its repacked packs and index.
      const filler = join(mnt, 'filler');
      await run('dd', ['if=/dev/zero', `of=${filler}`, 'bs=64k', 'status=none'], {}).catch(() => undefined);
      // Leave room for small objects (locks, notes, a GC plan) but not for packs.
      await truncate(filler, (await stat(filler)).size - (512 << 10));
      const gc = await cli(['gc']);
      assert.equal(gc.code, 7, gc.stdout + gc.stderr);
      assert.equal(gc.json.error.code, 'store-full');
      assert.match(gc.json.error.hint, /free space/);
      const kept = (await cli(['snapshots'])).json.snapshots.map((s: any) => s.name);
      assert.equal(kept.length, 1);
      rewriteCorpus(img, { fraction: 0.4, seed: 9 });
      const full = await cli(['backup', 'image', img, '--id', 'full']);
      assert.equal(full.code, 7, full.stdout + full.stderr);
      assert.equal(full.json.error.code, 'store-full');
      assert.equal((await cli(['verify'])).code, 0);
      await rm(filler);
      const gc2 = await cli(['gc']);
      assert.equal(gc2.code, 0, gc2.stdout + gc2.stderr);
      assert.equal(gc2.json.complete, true);
      assert.ok(gc2.json.deletedPacks > 0);
      const again = await cli(['backup', 'image', img, '--id', 'full']);
      assert.equal(again.code, 0, again.stdout);
      shas.set(again.json.snapshot.name, await sha256File(img));
      assert.equal((await cli(['verify'])).code, 0);
      for (const name of [kept[0], again.json.snapshot.name]) {
        const out = join(t.path, `out${n++}`);
        assert.equal((await cli(['restore', 'image', name, out])).code, 0);
        assert.equal(await sha256File(out), shas.get(name));
      }
    } finally {
      await run('umount', [mnt]).catch(() => undefined);
      await t.cleanup();
    }
  });
});
