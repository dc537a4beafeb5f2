/**
 * The issue-5 benchmark: garbage collection, verification and check on a synthetic repository of
 * many snapshots of many VMs, and how their time and memory grow when the repository doubles;
 * plus sync throughput, local → local and local → S3 (Ceph radosgw, with --s3).
 *
 *   node bench/lifecycle.ts [--vms 10] [--snapshots 100] [--disk 512M] [--allocated 0.5]
 *                           [--change 0.02] [--content random|compressible] [--double]
 *                           [--sync-size 512M] [--s3] [--dir DIR] [--keep] [--json FILE]
 *
 * The repository is written through the library (not by backing up images: that would take
 * hours): per VM a disk of --disk bytes, --allocated of its chunks holding data; its first
 * snapshot stores them all, each later one rewrites --change of them. So with the defaults: 100
 * snapshots (10 per VM) of 512 MiB disks = 50 GiB logical, ~24 000 chunks referenced. With
 * --double the same is measured again for twice the snapshots (20 per VM, 100 GiB logical): the
 * referenced data grows only by the changes, so time should grow about like the referenced data,
 * not like the logical size.
 *
 * Each step is the real CLI (`tresor verify --no-record`, `check`, `prune`, `gc`, `sync`) measured
 * by GNU time: wall time, CPU time and peak RSS. The S3 lab keeps its data in RAM (2 GiB): keep
 * --sync-size well below that.
 */
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { tmpdir } from 'node:os';
import { createCipheriv } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { formatSize, parseSize } from './corpus.ts';
import { directoryBytes, hasGnuTime, runMeasured, type Measurement } from './measure.ts';
import { LocalStore } from '../src/store/local.ts';
import { Repository } from '../src/repo/repository.ts';
import { PackWriter } from '../src/repo/pack-writer.ts';
import { DiskMapWriter } from '../src/repo/disk-map.ts';
import { BlobType, ZERO_ID, computeId, encodeBlob } from '../src/repo/codec.ts';
import { MANIFEST_VERSION, snapshotName, type SnapshotManifest } from '../src/repo/manifest.ts';

const ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
// The command as users run it (bin/tresor.js: compile cache, so no TypeScript stripper in memory).
const CLI = join(ROOT, 'bin', 'tresor.js');
const PASS = 'lifecycle benchmark';

interface Options {
  vms: number;
  snapshots: number;
  disk: number;
  allocated: number;
  change: number;
  content: 'random' | 'compressible';
  double: boolean;
  syncSize: number;
  s3: boolean;
  dir: string;
  keep: boolean;
  json: string | undefined;
}

interface RepoStats {
  snapshots: number;
  logicalBytes: number;
  chunks: number;
  storedBytes: number;
  buildSeconds: number;
}

interface StepResult {
  step: string;
  wallSeconds: number;
  cpuSeconds: number | undefined;
  peakRssMiB: number | undefined;
  summary: Record<string, unknown>;
}

function options(): Options {
  const { values } = parseArgs({
    options: {
      vms: { type: 'string', default: '10' },
      snapshots: { type: 'string', default: '100' },
      disk: { type: 'string', default: '512M' },
      allocated: { type: 'string', default: '0.5' },
      change: { type: 'string', default: '0.02' },
      content: { type: 'string', default: 'random' },
      double: { type: 'boolean', default: false },
      'sync-size': { type: 'string', default: '512M' },
      s3: { type: 'boolean', default: false },
      dir: { type: 'string' },
      keep: { type: 'boolean', default: false },
      json: { type: 'string' },
    },
  });
  return {
    vms: Number(values.vms), snapshots: Number(values.snapshots), disk: parseSize(values.disk!),
    allocated: Number(values.allocated), change: Number(values.change),
    content: values.content === 'compressible' ? 'compressible' : 'random', double: values.double!,
    syncSize: parseSize(values['sync-size']!), s3: values.s3!, keep: values.keep!, json: values.json,
    dir: values.dir ?? join(process.env.TRESOR_BENCH_TMP ?? tmpdir(), `tresor-lifecycle-bench-${process.pid}`),
  };
}

/** Chunk contents: deterministic per (vm, slot, generation). */
function chunkContent(o: Options, chunkSize: number, vm: number, slot: number, gen: number): Buffer {
  const seed = Buffer.alloc(32);
  seed.writeUInt32LE(vm, 0);
  seed.writeUInt32LE(slot, 4);
  seed.writeUInt32LE(gen, 8);
  if (o.content === 'compressible') {
    const out = Buffer.allocUnsafe(chunkSize);
    for (let p = 0; p < chunkSize; p += 32) seed.copy(out, p);
    return out;
  }
  const c = createCipheriv('aes-256-ctr', seed, Buffer.alloc(16));
  return c.update(Buffer.alloc(chunkSize));
}

/** A small deterministic PRNG for which slots hold data and which change. */
function mulberry(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function buildRepository(o: Options, location: string, perVm: number): Promise<RepoStats> {
  const started = performance.now();
  const store = await LocalStore.open(location, { create: true });
  const { repo } = await Repository.init(store, { encryption: 'aes-256-gcm', passphrase: PASS });
  const chunkSize = repo.config.chunkSize;
  const slots = Math.ceil(o.disk / chunkSize);
  const stats: RepoStats = { snapshots: 0, logicalBytes: 0, chunks: 0, storedBytes: 0, buildSeconds: 0 };
  const day = 86_400_000;
  const t0 = Date.UTC(2026, 0, 1);
  for (let vm = 0; vm < o.vms; vm++) {
    const rnd = mulberry(1000 + vm);
    const allocated = new Uint8Array(slots);
    for (let i = 0; i < slots; i++) allocated[i] = rnd() < o.allocated ? 1 : 0;
    const gen = new Uint32Array(slots);
    const ids: Array<Buffer | undefined> = new Array(slots);
    let parent: string | null = null;
    for (let s = 0; s < perVm; s++) {
      const writer = new PackWriter(repo);
      const map = new DiskMapWriter(repo, writer, o.disk, chunkSize, repo.config.pieceSlots);
      for (let i = 0; i < slots; i++) {
        if (!allocated[i]) {
          map.set(i, ZERO_ID);
          continue;
        }
        if (s === 0 || rnd() < o.change) {
          gen[i]++;
          const plain = chunkContent(o, Math.min(chunkSize, o.disk - i * chunkSize), vm, i, gen[i]);
          const id = computeId(repo.keys, plain);
          ids[i] = id;
          if (writer.claim(id)) {
            await writer.add(BlobType.chunk, id, encodeBlob(repo.keys, BlobType.chunk, id, plain), plain.length);
            stats.chunks++;
          }
        }
        map.set(i, ids[i]!);
      }
      const disk = { name: 'vda', sourceFormat: 'raw', ...(await map.finish()) };
      await writer.commitIndex();
      const time = new Date(t0 + s * day + vm * 60_000);
      const name = snapshotName('vm', `vm${vm}`, time);
      const m: SnapshotManifest = {
        format: 'tresor-snapshot', version: MANIFEST_VERSION, name, type: 'vm', id: `vm${vm}`, time: time.toISOString(),
        started: time.toISOString(), finished: time.toISOString(), parent, host: 'bench', tool: { name: 'tresor', version: 'bench' },
        source: { kind: 'synthetic' }, disks: [disk],
        stats: { bytesRead: 0, newChunks: 0, newChunkBytes: 0, addedBytes: writer.stats.bytes, reusedChunks: 0, durationMs: 0 }, tags: {},
      };
      await repo.commitSnapshot(m);
      parent = name;
      stats.snapshots++;
      stats.logicalBytes += o.disk;
    }
    process.stderr.write(`  built vm${vm}: ${perVm} snapshots\n`);
  }
  await store.close();
  stats.storedBytes = directoryBytes(join(location, 'data'));
  stats.buildSeconds = (performance.now() - started) / 1000;
  return stats;
}

async function step(o: Options, name: string, args: string[], env: Record<string, string> = {}): Promise<StepResult> {
  const logBase = join(o.dir, `log-${name.replace(/[^a-z0-9]+/gi, '-')}`);
  const m: Measurement = await runMeasured(
    { argv: [process.execPath, CLI, '--json', ...args], cwd: ROOT, env: { ...process.env, TRESOR_PASSPHRASE: PASS, ...env } },
    { logBase, timeoutMs: 3 * 3600_000, useGnuTime: hasGnuTime() },
  );
  if (m.exitCode !== 0) throw new Error(`${name}: tresor ${args.join(' ')} exited ${m.exitCode}: ${m.stdout.slice(-2000)}${m.stderr.slice(-2000)}`);
  let summary: Record<string, unknown> = {};
  try {
    const j = JSON.parse(m.stdout) as Record<string, unknown>;
    for (const k of ['ok', 'complete', 'blobsChecked', 'bytesRead', 'deletedPacks', 'repackedPacks', 'freedBytes', 'liveBlobs', 'condemnedBlobs', 'chunksSent', 'bytesSent', 'packs', 'kept']) {
      if (k in j) summary[k] = j[k];
    }
    if (Array.isArray(j.removed)) summary.removed = j.removed.length;
    if (Array.isArray(j.copied)) summary.copied = j.copied.length;
  } catch {
    summary = {};
  }
  const r: StepResult = {
    step: name, wallSeconds: m.wallSeconds, cpuSeconds: m.userSeconds === undefined ? undefined : m.userSeconds + (m.sysSeconds ?? 0),
    peakRssMiB: m.peakRssBytes === undefined ? undefined : Math.round(m.peakRssBytes / 1048576), summary,
  };
  process.stderr.write(`  ${name}: ${r.wallSeconds.toFixed(1)} s, peak RSS ${r.peakRssMiB ?? '?'} MiB ${JSON.stringify(summary)}\n`);
  return r;
}

async function lifecycleScale(o: Options, scale: number): Promise<{ scale: number; repo: RepoStats; steps: StepResult[] }> {
  const perVm = Math.max(1, Math.round((o.snapshots / o.vms) * scale));
  const location = join(o.dir, `repo-x${scale}`);
  process.stderr.write(`building ${o.vms} VMs × ${perVm} snapshots of ${formatSize(o.disk)} (${o.content})\n`);
  const repo = await buildRepository(o, location, perVm);
  const steps: StepResult[] = [];
  steps.push(await step(o, 'verify', ['--repo', location, 'verify', '--no-record']));
  steps.push(await step(o, 'check', ['--repo', location, 'check']));
  steps.push(await step(o, 'prune', ['--repo', location, 'prune', '--all', '--keep-last', String(Math.max(1, Math.floor(perVm / 2)))]));
  steps.push(await step(o, 'gc', ['--repo', location, 'gc']));
  steps.push(await step(o, 'verify after gc', ['--repo', location, 'verify', '--no-record']));
  if (!o.keep) rmSync(location, { recursive: true, force: true });
  return { scale, repo, steps };
}

async function syncThroughput(o: Options): Promise<StepResult[]> {
  const source = join(o.dir, 'sync-source');
  const one: Options = { ...o, vms: 1, disk: o.syncSize, allocated: 1, content: 'random' };
  process.stderr.write(`building a sync source: one ${formatSize(o.syncSize)} disk of random data\n`);
  await buildRepository(one, source, 1);
  const results: StepResult[] = [];
  const local = join(o.dir, 'sync-target');
  await step(o, 'init local target', ['--repo', local, 'repo', 'init'], { TRESOR_PASSPHRASE: 'target' });
  results.push(await step(o, 'sync local → local', ['--repo', source, 'sync', '--to', local], { TRESOR_SYNC_PASSPHRASE: 'target' }));
  if (o.s3) {
    const { startCeph } = await import('../test/lab/ceph.ts');
    const lab = await startCeph();
    try {
      await lab.createBucket('bench');
      const s3env = { AWS_ACCESS_KEY_ID: lab.accessKeyId, AWS_SECRET_ACCESS_KEY: lab.secretAccessKey, AWS_REGION: lab.region };
      const target = 's3://bench/sync';
      await step(o, 'init S3 target', ['--repo', target, '--s3-endpoint', lab.endpoint, 'repo', 'init'], { ...s3env, TRESOR_PASSPHRASE: 'target' });
      results.push(await step(o, 'sync local → S3', ['--repo', source, 'sync', '--to', target, '--to-s3-endpoint', lab.endpoint], { ...s3env, TRESOR_SYNC_PASSPHRASE: 'target' }));
      results.push(await step(o, 'sync again (nothing new)', ['--repo', source, 'sync', '--to', target, '--to-s3-endpoint', lab.endpoint], { ...s3env, TRESOR_SYNC_PASSPHRASE: 'target' }));
    } finally {
      await lab.stop();
    }
  }
  for (const r of results) r.summary.MiBPerSecond = Number((o.syncSize / 1048576 / r.wallSeconds).toFixed(1));
  return results;
}

function render(o: Options, scales: Array<{ scale: number; repo: RepoStats; steps: StepResult[] }>, sync: StepResult[]): string {
  const lines = [
    `## Lifecycle benchmark (${new Date().toISOString()})`, '',
    `${o.vms} VMs, disks of ${formatSize(o.disk)} with ${Math.round(o.allocated * 100)} % allocated, ${Math.round(o.change * 100)} % of the data rewritten per snapshot, ${o.content} content.`, '',
    '| repository | snapshots | logical | chunks | stored | step | wall s | CPU s | peak RSS MiB | result |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const s of scales) {
    for (const st of s.steps) {
      lines.push(`| ×${s.scale} | ${s.repo.snapshots} | ${formatSize(s.repo.logicalBytes)} | ${s.repo.chunks} | ${formatSize(s.repo.storedBytes)} | ${st.step} | ${st.wallSeconds.toFixed(1)} | ${st.cpuSeconds?.toFixed(1) ?? '?'} | ${st.peakRssMiB ?? '?'} | ${JSON.stringify(st.summary)} |`);
    }
  }
  if (sync.length > 0) {
    lines.push('', `Sync of one ${formatSize(o.syncSize)} disk of random data:`, '', '| step | wall s | MiB/s | peak RSS MiB |', '|---|---|---|---|');
    for (const st of sync) lines.push(`| ${st.step} | ${st.wallSeconds.toFixed(1)} | ${st.summary.MiBPerSecond} | ${st.peakRssMiB ?? '?'} |`);
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  const o = options();
  mkdirSync(o.dir, { recursive: true });
  try {
    const scales = [await lifecycleScale(o, 1)];
    if (o.double) scales.push(await lifecycleScale(o, 2));
    const sync = await syncThroughput(o);
    const report = render(o, scales, sync);
    process.stdout.write(`${report}\n`);
    if (o.json) writeFileSync(o.json, JSON.stringify({ options: o, scales, sync }, null, 2));
  } finally {
    if (!o.keep) rmSync(o.dir, { recursive: true, force: true });
  }
}

await main();
