/** The repository suite on the local filesystem backend, plus what only a local disk can do. */
import { it, describe } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repositorySuite } from './repo-suite.ts';
import { LocalStore } from '../src/store/local.ts';
import { tempDir } from './helpers/tmp.ts';
import { listFiles } from './helpers/tools.ts';
import { tresor } from './helpers/cli.ts';
import { run, sha256File } from './helpers/exec.ts';
import { generateCorpus } from '../bench/corpus.ts';

let root: { path: string; cleanup(): Promise<void> };
let n = 0;

repositorySuite({
  label: 'local filesystem',
  setup: async () => {
    root = await tempDir('tresor-local-');
  },
  teardown: async () => root.cleanup(),
  newLocation: async () => join(root.path, `repo${n++}`),
  env: () => ({}),
  args: () => [],
  list: async (loc) => (await listFiles(loc)).filter((o) => !o.name.startsWith('tmp/')),
  read: (loc, name) => readFile(join(loc, name)),
  overwrite: (loc, name, data) => writeFile(join(loc, name), data),
  crashTrials: 20,
  openStore: (loc) => LocalStore.open(loc),
});

describe('local repository storage limits', () => {
  it('a full disk during backup is a clear error; nothing committed is lost; the next backup works after freeing space', async () => {
    const t = await tempDir();
    const mnt = join(t.path, 'small');
    await run('mkdir', ['-p', mnt]);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mnt]);
    try {
      const env = { TRESOR_PASSPHRASE: 'pw' };
      const loc = join(mnt, 'repo');
      assert.equal((await tresor(['--repo', loc, 'repo', 'init', '--json'], { env })).code, 0);
      const small = join(t.path, 'small.raw');
      generateCorpus(small, { size: 8 << 20, seed: 41 });
      const first = await tresor(['--repo', loc, '--json', 'backup', 'image', small, '--id', 'ok'], { env });
      assert.equal(first.code, 0, first.stdout);
      const big = join(t.path, 'big.raw');
      generateCorpus(big, { size: 96 << 20, seed: 42 });
      const full = await tresor(['--repo', loc, '--json', 'backup', 'image', big, '--id', 'big'], { env });
      assert.equal(full.code, 7, full.stdout + full.stderr);
      assert.equal(full.json.error.code, 'store-full');
      assert.match(full.json.error.message, /no space left/);
      assert.match(full.json.error.hint, /free space/);
      const list = await tresor(['--repo', loc, '--json', 'snapshots'], { env });
      assert.deepEqual(list.json.snapshots.map((s: any) => s.id), ['ok']);
      const v = await tresor(['--repo', loc, '--json', 'verify'], { env });
      assert.equal(v.code, 0, v.stdout);
      const out = join(t.path, 'ok.out');
      assert.equal((await tresor(['--repo', loc, '--json', 'restore', 'image', first.json.snapshot.name, out], { env })).code, 0);
      assert.equal(await sha256File(out), await sha256File(small));
      const again = await tresor(['--repo', loc, '--json', 'backup', 'image', small, '--id', 'ok'], { env });
      assert.equal(again.code, 0, again.stdout);
    } finally {
      await run('umount', [mnt]).catch(() => undefined);
      await t.cleanup();
    }
  });
});
