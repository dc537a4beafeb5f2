/**
 * The long crash-safety harness (`npm run torture`): many trials of a random operation — backup,
 * prune, gc or sync — each SIGKILLed at a random moment (or, one time in four, left to finish),
 * on a local repository with a sync target. After every trial: the repository (and the target
 * after a sync) verifies clean, no half snapshot is visible (a killed backup adds at most its one
 * snapshot), and every tenth trial the structure check is clean. At the end: gc and sync finish
 * what was interrupted, and the newest snapshot restores byte-identical from the target.
 *
 *   node test/torture.ts [--trials 200] [--seed 1] [--size 48M] [--keep]
 *
 * Deterministic in its choices for a given seed (timing still varies). Exits 1 at the first
 * broken invariant, printing the trial, operation, delay and the evidence.
 */
import { parseArgs } from 'node:util';
import { join } from 'node:path';
import { rm } from 'node:fs/promises';
import { spawnTresor, tresor } from './helpers/cli.ts';
import { tempDir } from './helpers/tmp.ts';
import { sha256File } from './helpers/exec.ts';
import { generateCorpus, rewriteCorpus, parseSize, Prng } from '../bench/corpus.ts';
import { Repository } from '../src/repo/repository.ts';
import { LocalStore } from '../src/store/local.ts';
import { CodecPool } from '../src/repo/codec-pool.ts';
import { verifyRepository } from '../src/repo/verify.ts';
import { checkRepository } from '../src/repo/check.ts';
import { restoreImage } from '../src/engine/image-restore.ts';

const PASS = 'torture source';
const TARGET_PASS = 'torture target';
const OPS = ['backup', 'backup', 'prune', 'gc', 'sync'] as const;

class InvariantBroken extends Error {}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      trials: { type: 'string', default: '200' },
      seed: { type: 'string', default: '1' },
      size: { type: 'string', default: '48M' },
      keep: { type: 'boolean', default: false },
    },
  });
  const trials = Number(values.trials);
  const seed = Number(values.seed);
  const rng = new Prng(seed, 7);
  const dir = await tempDir('tresor-torture-');
  const src = join(dir.path, 'source');
  const dst = join(dir.path, 'target');
  const img = join(dir.path, 'disk.raw');
  const env = { TRESOR_PASSPHRASE: PASS, TRESOR_SYNC_PASSPHRASE: TARGET_PASS };
  const pools: CodecPool[] = [];
  const stores: LocalStore[] = [];
  const open = async (loc: string, pass: string) => {
    const store = await LocalStore.open(loc);
    stores.push(store);
    const repo = await Repository.open(store, async () => pass);
    const pool = new CodecPool(repo.keys, 1);
    pools.push(pool);
    return { repo, pool };
  };
  const run = async (loc: string, args: string[], pass = PASS) => {
    const r = await tresor(['--repo', loc, '--json', ...args], { env: { ...env, TRESOR_PASSPHRASE: pass } });
    if (r.code !== 0) throw new InvariantBroken(`tresor ${args.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
    return r.json;
  };
  const started = Date.now();
  try {
    await run(src, ['repo', 'init']);
    await run(dst, ['repo', 'init'], TARGET_PASS);
    generateCorpus(img, { size: parseSize(values.size!), seed });
    await run(src, ['backup', 'image', img, '--id', 'vm']);
    const source = await open(src, PASS);
    const target = await open(dst, TARGET_PASS);
    const names = async () => {
      source.repo.invalidateIndex();
      return (await source.repo.listSnapshots()).snapshots.map((m) => m.name);
    };
    const verify = async (what: 'source' | 'target') => {
      const { repo, pool } = what === 'source' ? source : target;
      repo.invalidateIndex();
      const v = await verifyRepository(repo, pool);
      if (!v.ok) throw new InvariantBroken(`${what} does not verify clean: ${JSON.stringify(v.damage).slice(0, 4000)}`);
    };
    const counts = { killed: 0, finished: 0, byOp: {} as Record<string, number> };
    for (let t = 1; t <= trials; t++) {
      const op = OPS[rng.nextU32() % OPS.length];
      const kill = rng.nextU32() % 4 !== 0;
      // Process start-up takes ~0.5 s, the operations ~0.2-2 s on the default disk size.
      const delay = 100 + (rng.nextU32() % 1000);
      const before = await names();
      let args: string[];
      if (op === 'backup') {
        rewriteCorpus(img, { fraction: 0.05 + (rng.nextU32() % 40) / 100, seed: seed * 100_000 + t });
        args = ['backup', 'image', img, '--id', 'vm'];
      } else if (op === 'prune') {
        args = ['prune', '--all', '--keep-last', String(1 + (rng.nextU32() % 4))];
      } else if (op === 'gc') {
        args = ['gc', '--max-wait', '5'];
      } else {
        args = ['sync', '--to', dst];
      }
      const child = spawnTresor(['--repo', src, '--json', ...args], { env });
      let out = '';
      child.stdout!.on('data', (d) => (out += d));
      child.stderr!.on('data', (d) => (out += d));
      const code = await new Promise<number | null>((resolve) => {
        const timer = kill ? setTimeout(() => child.kill('SIGKILL'), delay) : undefined;
        child.on('close', (c) => {
          if (timer) clearTimeout(timer);
          resolve(c);
        });
      });
      const label = `trial ${t}/${trials}: ${op}${code === null ? ` killed after ${delay} ms` : ' finished'}`;
      try {
        if (code === null) counts.killed++;
        else if (code !== 0) throw new InvariantBroken(`exited ${code}: ${out}`);
        else counts.finished++;
        counts.byOp[op] = (counts.byOp[op] ?? 0) + 1;
        const after = await names();
        if (op === 'backup') {
          const added = after.filter((n) => !before.includes(n));
          if (added.length > 1 || after.length < before.length || (code === 0 && added.length !== 1)) {
            throw new InvariantBroken(`snapshots went from ${before.length} to ${after.length} (${added.join(', ')})`);
          }
        }
        await verify('source');
        if (op === 'sync') await verify('target');
        if (t % 10 === 0) {
          source.repo.invalidateIndex();
          const c = await checkRepository(source.repo, source.pool);
          if (!c.ok) throw new InvariantBroken(`check: ${JSON.stringify({ damage: c.damage, issues: c.issues }).slice(0, 4000)}`);
        }
      } catch (err) {
        process.stderr.write(`FAILED ${label} (seed ${seed}, kept in ${dir.path}): ${(err as Error).message}\n`);
        values.keep = true;
        return 1;
      }
      process.stdout.write(`${label}: ok (${(await names()).length} snapshots)\n`);
    }
    // The next operations finish whatever was interrupted.
    rewriteCorpus(img, { fraction: 0.1, seed: 424242 });
    const last = (await run(src, ['backup', 'image', img, '--id', 'vm'])).snapshot.name;
    const gc = await run(src, ['gc', '--max-wait', '60']);
    if (!gc.complete) throw new InvariantBroken(`final gc did not complete: ${JSON.stringify(gc)}`);
    await run(src, ['sync', '--to', dst]);
    await verify('source');
    await verify('target');
    for (const { repo, pool } of [source, target]) {
      repo.invalidateIndex();
      const c = await checkRepository(repo, pool);
      if (!c.ok) throw new InvariantBroken(`final check: ${JSON.stringify({ damage: c.damage, issues: c.issues }).slice(0, 4000)}`);
    }
    const out = join(dir.path, 'restored.raw');
    target.repo.invalidateIndex();
    await restoreImage(target.repo, last, out, { format: 'raw' });
    if ((await sha256File(out)) !== (await sha256File(img))) throw new InvariantBroken(`${last} restored from the target differs from the disk`);
    await rm(out);
    process.stdout.write(`torture: ${trials} trials (${counts.killed} killed, ${counts.finished} finished; ${JSON.stringify(counts.byOp)}) in ${Math.round((Date.now() - started) / 1000)} s: every invariant held\n`);
    return 0;
  } catch (err) {
    process.stderr.write(`torture FAILED (seed ${seed}, kept in ${dir.path}): ${(err as Error).message}\n`);
    values.keep = true;
    return 1;
  } finally {
    await Promise.all(pools.map((p) => p.close()));
    await Promise.all(stores.map((s) => s.close()));
    if (!values.keep) await dir.cleanup();
  }
}

process.exitCode = await main();
