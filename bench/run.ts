/**
 * `npm run bench`: the issue-2 benchmark. One run, one scratch directory, one corpus file that
 * every tool reads:
 *
 *   1. generate the reference corpus (bench/corpus.ts);
 *   2. ceilings on it: `zstd -1 -T2` (and `zstd -d` back), `cp --sparse=always`;
 *   3. each backup tool (Tresor, restic, borg): init, full backup;
 *   4. rewrite 2 % of the corpus, once;
 *   5. each tool: second backup; then each tool: restore of the second backup, checked
 *      byte-identical against the rewritten corpus.
 *
 * Running phase by phase (instead of tool by tool, which would need the corpus generated again
 * for each tool) gives every tool exactly the same input file; the page cache is dropped before
 * every measured step.
 * Results: a markdown report on stdout, bench/out/results-<time>.json, and with --write-doc the
 * figures section of docs/performance.md.
 *
 * `--chunk-sizes 64K,128K,...` instead runs the chunk-size study: one Tresor repository per chunk
 * size, full backup, rewrite, second backup.
 *
 * `--vm` instead runs the issue-3 benchmark of a running VM (bench/vm.ts): the corpus as the qcow2
 * disk of a libvirt domain, Tresor and virtnbdbackup (plain and -z) each on a fresh domain: full
 * backup, the 2 % rewrite through the running VM, incremental, restore; plus restic's full backup
 * of the raw corpus file for the "stored smaller than restic" target.
 */
import { mkdirSync, rmSync, statSync, writeFileSync, readFileSync, existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { UsageError, describeError } from '../src/util/errors.ts';
import { formatSize, generateCorpus, parseSize, rewriteCorpus, BLOCK } from './corpus.ts';
import { allocatedBytes, capture, createCacheDropper, hasGnuTime, killActiveCommand, machineFacts, sha256File } from './measure.ts';
import { BUSY_SHARE, StepRunner } from './steps.ts';
import { BorgPeer, ResticPeer, TresorPeer, tresorCliPath, tresorNode, tresorVersion } from './peers.ts';
import type { BackupLabel, Peer, PeerSetting } from './peers.ts';
import { VM_TOOLS, checkTargets, checkVmTargets, compareTresor, compareVm, renderFigures, writeDoc } from './report.ts';
import type { BenchResults, ChunkStudyRow, StepRecord } from './report.ts';
import { convertToQcow2, removeDomainsNow, runLiveVm, vmToolConfigurations } from './vm.ts';
import { runFilesBenchmark } from './files.ts';

const REPO_ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
const ALL_TOOLS = ['zstd', 'cp', 'tresor', 'restic', 'borg'];
const ALL_VM_TOOLS: string[] = [VM_TOOLS.tresor, VM_TOOLS.virtnbd, VM_TOOLS.virtnbdLz4, VM_TOOLS.restic];
const REFERENCE_SIZE = 4 * 1024 * 1024 * 1024;

interface Options {
  dir: string;
  size: number;
  seed: number;
  fraction: number;
  keep: boolean;
  writeDoc: boolean;
  tools: Set<string>;
  chunkSizes: string[] | undefined;
  /** the live-VM benchmark (issue 3) instead of the image one */
  vm: boolean;
  /** live VM: incrementals per tool, each after a fresh 2 % rewrite (the first is the reference one) */
  vmIncrementals: number;
  stepTimeoutMs: number;
  tresorCli: string;
  /** re-render an earlier results file instead of running */
  report: string | undefined;
}

const USAGE = `usage: node bench/run.ts [options]
  --size SIZE          corpus size (default 4G; e.g. 256M for a smoke run; multiple of 64K)
  --dir DIR            scratch parent directory (default /var/tmp/tresor-bench)
  --seed N             corpus seed (default 1)
  --fraction F         rewritten fraction (default 0.02)
  --tools LIST         subset of ${ALL_TOOLS.join(',')} (default: all);
                       with --vm: of ${ALL_VM_TOOLS.join(',')}
  --chunk-sizes LIST   chunk-size study instead, e.g. 64K,128K,256K,1M (Tresor only)
  --vm                 live-VM benchmark instead (issue 3): the corpus as the disk of a running
                       libvirt domain; Tresor vs virtnbdbackup (and -z); needs root and libvirt
  --vm-incrementals N  with --vm: incrementals per tool, each after its own rewrite (default 3;
                       the wall-time target compares medians, the added bytes the first)
  --files              file-level restore benchmark instead (issue 4, bench/files.ts;
                       its options: --files --help)
  --step-timeout MIN   kill a step after MIN minutes (default 60)
  --tresor-cli PATH    the Tresor CLI to measure (default bin/tresor.js, run with Node 24;
                       a path not ending in .ts/.js is executed directly)
  --keep               keep the scratch directory (repositories, corpus, logs)
  --write-doc          rewrite the figures section of docs/performance.md
  --report FILE        no run: print (and with --write-doc, record) an earlier results JSON`;

function parseOptions(argv: string[]): Options {
  try {
    return readOptions(argv);
  } catch (err) {
    // node:util parseArgs reports unknown or malformed options as ERR_PARSE_ARGS_* errors
    if (err instanceof TypeError && String((err as NodeJS.ErrnoException).code).startsWith('ERR_PARSE_ARGS')) {
      throw new UsageError(err.message, USAGE);
    }
    throw err;
  }
}

function readOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '4G' },
      dir: { type: 'string', default: '/var/tmp/tresor-bench' },
      seed: { type: 'string', default: '1' },
      fraction: { type: 'string', default: '0.02' },
      tools: { type: 'string' },
      'chunk-sizes': { type: 'string' },
      vm: { type: 'boolean', default: false },
      'vm-incrementals': { type: 'string', default: '3' },
      'step-timeout': { type: 'string', default: '60' },
      'tresor-cli': { type: 'string', default: tresorCliPath(REPO_ROOT) },
      keep: { type: 'boolean', default: false },
      'write-doc': { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
      report: { type: 'string' },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const size = parseSize(values.size);
  if (size <= 0 || size % BLOCK !== 0) throw new UsageError(`--size ${values.size} is not a positive multiple of 64 KiB`, USAGE);
  const known = values.vm ? ALL_VM_TOOLS : ALL_TOOLS;
  const tools = new Set((values.tools ?? known.join(',')).split(',').map((t) => t.trim()).filter((t) => t !== ''));
  for (const tool of tools) {
    if (!known.includes(tool)) throw new UsageError(`unknown tool "${tool}" in --tools${values.vm ? ' with --vm' : ''}`, USAGE);
  }
  const chunkSizes = values['chunk-sizes']?.split(',').map((s) => s.trim()).filter((s) => s !== '');
  if (values.vm && chunkSizes !== undefined) throw new UsageError('--vm and --chunk-sizes are separate runs', USAGE);
  for (const chunkSize of chunkSizes ?? []) parseSize(chunkSize);
  const seed = Number(values.seed);
  const fraction = Number(values.fraction);
  const stepTimeout = Number(values['step-timeout']);
  if (!Number.isInteger(seed)) throw new UsageError(`--seed ${values.seed} is not an integer`, USAGE);
  if (!(fraction >= 0 && fraction <= 0.5)) throw new UsageError(`--fraction ${values.fraction} is outside [0, 0.5]`, USAGE);
  if (!(stepTimeout > 0)) throw new UsageError(`--step-timeout ${values['step-timeout']} is not a positive number`, USAGE);
  const vmIncrementals = Number(values['vm-incrementals']);
  if (!(Number.isInteger(vmIncrementals) && vmIncrementals >= 1 && vmIncrementals <= 9)) throw new UsageError(`--vm-incrementals ${values['vm-incrementals']} is not an integer from 1 to 9`, USAGE);
  return {
    dir: values.dir,
    size,
    seed,
    fraction,
    keep: values.keep,
    writeDoc: values['write-doc'],
    tools,
    chunkSizes: chunkSizes !== undefined && chunkSizes.length > 0 ? chunkSizes : undefined,
    vm: values.vm,
    vmIncrementals,
    stepTimeoutMs: stepTimeout * 60_000,
    tresorCli: resolve(values['tresor-cli']),
    report: values.report,
  };
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

interface RunState {
  runner: StepRunner;
  scratch: string;
  corpusPath: string;
  size: number;
  /** peers that cannot go on, with the reason */
  broken: Map<string, string>;
}

function disk(state: RunState): { size: number; allocated: number } {
  return { size: state.size, allocated: allocatedBytes(state.corpusPath) };
}

async function runCeilings(state: RunState, tools: Set<string>): Promise<void> {
  const { runner, scratch, corpusPath } = state;
  const work = join(scratch, 'ceiling');
  mkdirSync(work, { recursive: true });
  const compressed = join(work, 'disk.raw.zst');
  if (tools.has('zstd')) {
    const compress = await runner.run({
      tool: 'zstd', label: 'zstd -1 -T2', step: 'compress', disk: disk(state),
      command: () => ({ argv: ['zstd', '-1', '-T2', '-q', '-f', corpusPath, '-o', compressed], cwd: work, env: process.env }),
      after: () => ({ outputBytes: statSync(compressed).size }),
    });
    if (compress.status === 'ok') {
      const decompressed = join(work, 'decompressed.raw');
      await runner.run({
        tool: 'zstd', label: 'zstd -d', step: 'decompress', disk: disk(state),
        // zstd writes sparse output files by default, as the restores below do
        command: () => ({ argv: ['zstd', '-d', '-q', '-f', compressed, '-o', decompressed], cwd: work, env: process.env }),
      });
      rmSync(decompressed, { force: true });
    }
    rmSync(compressed, { force: true });
  }
  if (tools.has('cp')) {
    const copy = join(work, 'copy.raw');
    await runner.run({
      tool: 'cp', label: 'cp --sparse=always', step: 'sparse copy', disk: disk(state),
      command: () => ({ argv: ['cp', '--sparse=always', corpusPath, copy], cwd: work, env: process.env }),
    });
    rmSync(copy, { force: true });
  }
  rmSync(work, { recursive: true, force: true });
}

async function runInits(state: RunState, peers: Peer[]): Promise<void> {
  for (const peer of peers) {
    try {
      peer.preflight();
    } catch (err) {
      state.broken.set(peer.name, describeError(err));
      state.runner.skip(peer.name, peer.label, 'init', describeError(err));
      continue;
    }
    mkdirSync(dirname(peer.repoDir), { recursive: true });
    const record = await state.runner.run({
      tool: peer.name, label: peer.label, step: 'init', repoDir: peer.repoDir, command: () => peer.init(),
    });
    if (record.status !== 'ok') state.broken.set(peer.name, `init failed: ${record.error ?? ''}`);
  }
}

async function runBackups(state: RunState, peers: Peer[], label: BackupLabel): Promise<void> {
  const step = `${label} backup`;
  for (const peer of peers) {
    const broken = state.broken.get(peer.name);
    if (broken !== undefined) {
      state.runner.skip(peer.name, peer.label, step, broken);
      continue;
    }
    await state.runner.run({
      tool: peer.name, label: peer.label, step, repoDir: peer.repoDir, disk: disk(state),
      command: () => peer.backup(label),
      after: (m) => { peer.afterBackup(label, m); return {}; },
    });
  }
}

async function runRestores(state: RunState, peers: Peer[], label: BackupLabel, expectedSha256: string): Promise<void> {
  for (const peer of peers) {
    const broken = state.broken.get(peer.name);
    const backup = state.runner.steps.find((s) => s.tool === peer.name && s.step === `${label} backup`);
    if (broken !== undefined || backup?.status !== 'ok') {
      state.runner.skip(peer.name, peer.label, 'restore', broken ?? `the ${label} backup failed`);
      continue;
    }
    const target = join(state.scratch, 'restore', peer.name);
    rmSync(target, { recursive: true, force: true });
    mkdirSync(target, { recursive: true });
    await state.runner.run({
      tool: peer.name, label: peer.label, step: 'restore', disk: disk(state),
      command: () => peer.restore(label, target),
      after: async () => {
        const restored = peer.restoredFile(target);
        if (restored === undefined) throw new Error(`the restore produced no disk image below ${target}`);
        const restoredSize = statSync(restored).size;
        if (restoredSize !== state.size) {
          throw new Error(`restored image is ${restoredSize} bytes, the corpus ${state.size}`);
        }
        const verified = (await sha256File(restored)) === expectedSha256;
        if (!verified) throw new Error('restored image differs from the rewritten corpus (SHA-256)');
        return { verified, restoredAllocatedBytes: allocatedBytes(restored) };
      },
    });
    rmSync(target, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Facts about the machine and the tools
// ---------------------------------------------------------------------------------------------

function firstLine(text: string): string {
  return text.split('\n')[0].trim();
}


function toolVersions(): Record<string, string> {
  const debian = (pkg: string) => capture(['dpkg-query', '-W', '-f', '${Version}', pkg]);
  const withPackage = (version: string, pkg: string) => {
    const deb = debian(pkg);
    return `${version || 'not installed'}${deb ? ` (Debian ${pkg} ${deb})` : ''}`;
  };
  return {
    Tresor: tresorVersion(REPO_ROOT),
    'Node.js (Tresor)': capture([tresorNode(REPO_ROOT), '--version']),
    restic: withPackage(firstLine(capture(['restic', 'version'])), 'restic'),
    borg: withPackage(firstLine(capture(['borg', '--version'])), 'borgbackup'),
    zstd: withPackage(firstLine(capture(['zstd', '--version'])).replace(/^\*+\s*|\s*\*+$/g, ''), 'zstd'),
    cp: withPackage(firstLine(capture(['cp', '--version'])), 'coreutils'),
    'GNU time': withPackage(existsSync('/usr/bin/time') ? '/usr/bin/time' : '', 'time'),
  };
}

/** The live-VM mode's tools: Tresor, restic, the hypervisor stack and virtnbdbackup. */
function vmToolVersions(): Record<string, string> {
  const debian = (pkg: string) => capture(['dpkg-query', '-W', '-f', '${Version}', pkg]) || 'not installed';
  const { Tresor, 'Node.js (Tresor)': node, restic, 'GNU time': gnuTime } = toolVersions();
  return {
    Tresor,
    'Node.js (Tresor)': node,
    restic,
    'GNU time': gnuTime,
    virtnbdbackup: `${capture(['virtnbdbackup', '--version']) || 'not installed'} (Debian virtnbdbackup ${debian('virtnbdbackup')})`,
    QEMU: `${firstLine(capture(['qemu-system-x86_64', '--version']))} (Debian qemu-system-x86 ${debian('qemu-system-x86')})`,
    libvirt: `${firstLine(capture(['libvirtd', '--version']))} (Debian libvirt-daemon ${debian('libvirt-daemon')})`,
    'qemu-img': `${firstLine(capture(['qemu-img', '--version']))} (Debian qemu-utils ${debian('qemu-utils')})`,
  };
}

function basicIsoTime(date: Date): string {
  return date.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

function chunkStudyRows(steps: StepRecord[], chunkSizes: string[]): ChunkStudyRow[] {
  return chunkSizes.map((chunkSize) => {
    const tool = `tresor@${chunkSize}`;
    const full = steps.find((s) => s.tool === tool && s.step === 'full backup');
    const second = steps.find((s) => s.tool === tool && s.step === 'second backup');
    const failed = steps.find((s) => s.tool === tool && s.status !== 'ok');
    return {
      chunkSize,
      fullSeconds: full?.status === 'ok' ? full.wallSeconds : undefined,
      fullStoredBytes: full?.status === 'ok' ? full.repoBytes : undefined,
      fullPeakRssBytes: full?.status === 'ok' ? full.peakRssBytes : undefined,
      secondSeconds: second?.status === 'ok' ? second.wallSeconds : undefined,
      rewriteAddedBytes: second?.status === 'ok' ? second.addedBytes : undefined,
      error: failed === undefined ? undefined : `${failed.step}: ${failed.error ?? failed.status}`,
    };
  });
}

function writeFiguresDoc(results: BenchResults): void {
  const doc = join(REPO_ROOT, 'docs', 'performance.md');
  if (results.corpus !== undefined && results.corpus.size !== REFERENCE_SIZE) {
    process.stderr.write(`WARNING: writing figures of a ${formatSize(results.corpus.size)} smoke run into ${doc}\n`);
  }
  writeDoc(doc, results);
  process.stderr.write(`figures written to ${doc}\n`);
}

/** --report: render an earlier run again, e.g. to put a quiet run's figures into the doc. */
function reportOnly(file: string, toDoc: boolean): number {
  const results = JSON.parse(readFileSync(file, 'utf8')) as BenchResults;
  console.log(`## Benchmark results\n\n${renderFigures(results)}\n`);
  if (toDoc) writeFiguresDoc(results);
  return 0;
}

async function main(): Promise<number> {
  // `--files`: the issue-4 file-level restore benchmark, with options of its own (bench/files.ts)
  if (process.argv.includes('--files')) return runFilesBenchmark(process.argv.slice(2).filter((arg) => arg !== '--files'));
  const options = parseOptions(process.argv.slice(2));
  if (options.report !== undefined) return reportOnly(options.report, options.writeDoc);
  const startedAt = new Date();
  const scratch = join(options.dir, `run-${basicIsoTime(startedAt)}`);
  mkdirSync(scratch, { recursive: true });
  const corpusDir = join(scratch, 'corpus');
  mkdirSync(corpusDir, { recursive: true });
  const corpusPath = join(corpusDir, 'disk.raw');

  const onInterrupt = () => {
    killActiveCommand();
    removeDomainsNow(options.keep);
    if (!options.keep) rmSync(scratch, { recursive: true, force: true });
    process.stderr.write(`\ninterrupted${options.keep ? `; scratch kept in ${scratch}` : ''}\n`);
    process.exit(130);
  };
  process.on('SIGINT', onInterrupt);
  process.on('SIGTERM', onInterrupt);

  const useGnuTime = hasGnuTime();
  const cache = createCacheDropper();
  const runner = new StepRunner(scratch, cache, useGnuTime, options.stepTimeoutMs);
  const setting: PeerSetting = { scratch, corpusPath, repoRoot: REPO_ROOT, tresorCli: options.tresorCli };
  const chunkMode = options.chunkSizes !== undefined;
  const peers: Peer[] = chunkMode
    ? (options.chunkSizes ?? []).map((size) => new TresorPeer(setting, size))
    : options.vm
      ? (options.tools.has(VM_TOOLS.restic) ? [new ResticPeer(setting)] : [])
      : [
      ...(options.tools.has('tresor') ? [new TresorPeer(setting)] : []),
      ...(options.tools.has('restic') ? [new ResticPeer(setting)] : []),
      ...(options.tools.has('borg') ? [new BorgPeer(setting)] : []),
      ];
  const state: RunState = { runner, scratch, corpusPath, size: options.size, broken: new Map() };

  const results: BenchResults = {
    mode: chunkMode ? 'chunk-sizes' : options.vm ? 'vm' : 'peers',
    startedAt: startedAt.toISOString(),
    finishedAt: '',
    totalSeconds: 0,
    scratch,
    options: { ...options, tools: [...options.tools] },
    machine: machineFacts(scratch),
    versions: options.vm ? vmToolVersions() : toolVersions(),
    configurations: {
      ...(options.vm ? vmToolConfigurations({ scratch, repoRoot: REPO_ROOT, tresorCli: options.tresorCli }, options.tools) : {}),
      ...Object.fromEntries(peers.map((p) => [p.label, p.configuration])),
    },
    measurement: [
      'wall time: spawn to exit of each command, plus a `sync` right after it, so every step ends with its output durable (tools that fsync pay inside their own time, the others in the sync); MiB/s = disk size (or its allocated part at that moment) / wall time',
      useGnuTime
        ? 'CPU time (user+sys) and peak RSS: GNU time (/usr/bin/time, rusage from wait4); peak RSS is the largest single process of the command'
        : 'CPU time and peak RSS NOT measured: /usr/bin/time (Debian package `time`) is missing',
      cache.note,
      'repository size: du -sb of the repository directory after the step (restic and borg caches live outside it, in the scratch directory)',
      `contention: CPU time used by all processes during a step (/proc/stat) minus the step's own${options.vm ? " (and its domain's QEMU's)" : ''}; steps where others used more than ${BUSY_SHARE * 100} % of the CPUs are marked "busy machine"`,
      ...(options.vm ? [
        "qemu CPU: utime+stime of the domain's QEMU process (/proc/PID/stat, all threads) before and after the step: the NBD export and copy-before-write work done for the backup",
        "virtnbdrestore writes through a `qemu-nbd --fork` daemon that flushes the image and exits only after virtnbdrestore has: the restore step lasts until that daemon is gone, and its CPU time (sampled from /proc every 20-100 ms) and peak RSS count as the step's",
        'read from VM: bytes the tool read from the disk by its own account (Tresor: bytesRead of the --json snapshot; virtnbdbackup: "bytes of data extents to backup" in its log)',
        'backup destination size: du -sb of the repository (Tresor, restic) or of the output directory (virtnbdbackup: data files, checkpoint XML, VM config, logs)',
      ] : []),
    ],
    steps: runner.steps,
    comparisons: [],
    targets: [],
    chunkStudy: [],
    repositories: {},
    failures: 0,
  };
  if (!useGnuTime) runner.progress('WARNING: /usr/bin/time missing (apt-get install time): CPU time and peak RSS will not be measured');
  if (!cache.works) runner.progress(`WARNING: ${cache.note}`);

  try {
    runner.progress(`scratch directory ${scratch}; generating a ${formatSize(options.size)} corpus (seed ${options.seed})`);
    const generateStart = performance.now();
    const layout = generateCorpus(corpusPath, { size: options.size, seed: options.seed });
    results.corpus = {
      path: corpusPath,
      size: layout.size,
      seed: layout.seed,
      runs: layout.runs.length,
      holeBytes: layout.bytes.hole,
      textBytes: layout.bytes.text,
      randomBytes: layout.bytes.random,
      allocatedBytes: allocatedBytes(corpusPath),
      generateSeconds: (performance.now() - generateStart) / 1000,
    };
    runner.progress(`corpus generated in ${results.corpus.generateSeconds.toFixed(1)} s`);

    if (options.vm) {
      await runVmPhases(state, options, peers, results);
    } else {
      await runImagePhases(state, options, peers, results, chunkMode);
    }
  } catch (err) {
    runner.progress(`run aborted: ${describeError(err)}`);
    results.repositories.aborted = describeError(err);
    results.failures++;
  } finally {
    process.off('SIGINT', onInterrupt);
    process.off('SIGTERM', onInterrupt);
  }

  const finishedAt = new Date();
  results.finishedAt = finishedAt.toISOString();
  results.totalSeconds = (finishedAt.getTime() - startedAt.getTime()) / 1000;
  results.failures += runner.steps.filter((s) => s.status !== 'ok').length;
  if (chunkMode) {
    results.chunkStudy = chunkStudyRows(runner.steps, options.chunkSizes ?? []);
  } else if (options.vm) {
    results.comparisons = compareVm(runner.steps);
    results.targets = options.tools.has(VM_TOOLS.tresor) ? checkVmTargets(runner.steps) : [];
  } else {
    results.comparisons = compareTresor(runner.steps);
    results.targets = options.tools.has('tresor') ? checkTargets(runner.steps, options.size) : [];
  }

  const outDir = join(REPO_ROOT, 'bench', 'out');
  mkdirSync(outDir, { recursive: true });
  const suffix = chunkMode ? '-chunk-sizes' : options.vm ? '-vm' : '';
  const resultsFile = join(outDir, `results-${basicIsoTime(startedAt)}${suffix}.json`);
  writeFileSync(resultsFile, `${JSON.stringify(results, null, 2)}\n`);

  console.log(`## Benchmark results\n\n${renderFigures(results)}\n`);
  runner.progress(`results written to ${resultsFile}`);
  if (options.writeDoc) writeFiguresDoc(results);
  if (options.keep) runner.progress(`scratch directory kept: ${scratch}`);
  else rmSync(scratch, { recursive: true, force: true });
  return results.failures > 0 ? 1 : 0;
}

/** The image benchmark (issue 2) and the chunk-size study, phase by phase (see the top). */
async function runImagePhases(state: RunState, options: Options, peers: Peer[], results: BenchResults, chunkMode: boolean): Promise<void> {
  const { runner, corpusPath } = state;
  if (results.corpus === undefined) return;
  if (!chunkMode) await runCeilings(state, options.tools);
  await runInits(state, peers);
  await runBackups(state, peers, 'full');

  const rewrite = await rewriteAndRecord(corpusPath, options, !chunkMode);
  results.corpus.rewrite = rewrite;
  runner.progress(`rewrote ${rewrite.extents} extents (${formatSize(rewrite.bytesRewritten)}) in ${rewrite.seconds.toFixed(1)} s`);
  const { sha256After } = rewrite;

  await runBackups(state, peers, 'second');
  if (!chunkMode) await runRestores(state, peers, 'second', sha256After);

  describeRepositories(state, peers, results);
}

/** Rewrites the corpus in place (the 2 % rewrite) and describes what changed; the digest only when asked. */
async function rewriteAndRecord(corpusPath: string, options: Options, withDigest: boolean): Promise<NonNullable<NonNullable<BenchResults['corpus']>['rewrite']>> {
  const started = performance.now();
  const rewrite = rewriteCorpus(corpusPath, { fraction: options.fraction, seed: options.seed });
  const seconds = (performance.now() - started) / 1000;
  return {
    fraction: options.fraction,
    extents: rewrite.extents.length,
    bytesRewritten: rewrite.bytesRewritten,
    seconds,
    allocatedBytesAfter: allocatedBytes(corpusPath),
    sha256After: withDigest ? await sha256File(corpusPath) : '',
  };
}

function describeRepositories(state: RunState, peers: Peer[], results: BenchResults): void {
  for (const peer of peers) {
    if (!state.broken.has(peer.name)) {
      try { results.repositories[peer.name] = peer.describeRepository(); } catch (err) { results.repositories[peer.name] = describeError(err); }
    }
  }
}

/**
 * The live-VM benchmark (issue 3): the corpus becomes a qcow2 image before anything changes it;
 * restic backs up the raw corpus file (its stored size is a target); then the raw corpus is
 * rewritten in place — the reference every live disk must equal after the rewrite through its VM —
 * and bench/vm.ts runs each tool on its own domain.
 */
async function runVmPhases(state: RunState, options: Options, peers: Peer[], results: BenchResults): Promise<void> {
  const { runner, corpusPath, scratch } = state;
  if (results.corpus === undefined) return;
  const image = join(scratch, 'corpus', 'disk.qcow2');
  const imageFacts = convertToQcow2(corpusPath, image);
  runner.progress(`corpus converted to qcow2 in ${imageFacts.convertSeconds.toFixed(1)} s: ${formatSize(imageFacts.allocatedBytes)} allocated`);

  await runInits(state, peers);
  await runBackups(state, peers, 'full');

  const allocatedBefore = results.corpus.allocatedBytes;
  const rewrite = await rewriteAndRecord(corpusPath, options, false);
  results.corpus.rewrite = rewrite;
  runner.progress(`reference: raw corpus rewritten (${rewrite.extents} extents, ${formatSize(rewrite.bytesRewritten)})`);

  results.vm = await runLiveVm({
    runner, scratch, rewrittenCorpus: corpusPath, image, imageFacts, size: state.size,
    allocatedBefore, allocatedAfter: results.corpus.rewrite.allocatedBytesAfter,
    fraction: options.fraction, seed: options.seed, repoRoot: REPO_ROOT, tresorCli: options.tresorCli,
    keep: options.keep, tools: options.tools, incrementals: options.vmIncrementals,
  });
  describeRepositories(state, peers, results);
}

try {
  process.exitCode = await main();
} catch (err) {
  console.error(describeError(err));
  if (err instanceof UsageError && err.hint !== undefined) console.error(err.hint);
  process.exitCode = err instanceof UsageError ? 2 : 1;
}
