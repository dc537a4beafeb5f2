/**
 * `npm run bench -- --files`: the issue-4 benchmark, single files out of an image snapshot.
 *
 *   1. build a directory tree deterministically from a seed: 100 000 small files (1000
 *      directories × 100 files of 0–8 KiB, three in four log text, one in four random bytes)
 *      plus one 2 MiB random file nine directories deep;
 *   2. build the disk: a 20 GiB sparse raw file, GPT (sgdisk) with one partition filling it, and
 *      `mke2fs -t ext4 -d TREE -E offset=…` writing the filesystem straight into the partition —
 *      so the disk stays mostly unallocated;
 *   3. `tresor repo init` (encrypted) and `tresor backup image DISK --id files-bench`;
 *   4. Tresor, straight from the snapshot: `tresor files cat SNAP:disk0:1:/…/payload.bin -o OUT
 *      --json` (the issue-4 targets: under 1 s, under 32 MiB read from the repository; the output
 *      is compared with the original) and `tresor files ls SNAP:disk0:1 / -R --json` of the whole
 *      tree (every entry counted); `tresor --version` for Node's start-up; the same two operations
 *      in-process (this file's `probe` command, through the same engine functions as the CLI)
 *      for a breakdown by phase and for every byte read from the repository — key slots, blob
 *      index, manifest and lock included, which the CLI's `bytesFetched` leaves out;
 *   5. the baseline the issue asks for: `tresor restore image SNAP disk.raw` of the whole disk,
 *      then `debugfs -R "dump -p PATH OUT" 'disk.raw?offset=N'` for the file (e2fsprogs' I/O
 *      option, no copy of the partition), and for the listing a read-only loop mount of the
 *      partition and `find -printf` of every entry's type, mode, links, owner, size and mtime (what
 *      `files ls -R --json` prints).
 *
 * Every measured step runs cold (page cache dropped before it: bench/steps.ts). Results: markdown
 * on stdout, bench/out/results-<time>-files.json, and with --write-doc the "File-level restore"
 * section of docs/performance.md (between its own markers; every other section stays).
 *
 * Also runnable on its own: `node bench/files.ts [options]` (the same as `npm run bench -- --files`)
 * and `node bench/files.ts probe cat|ls REPO REF [PATH]` (the in-process measurement; passphrase
 * from TRESOR_PASSPHRASE).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync,
} from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { SnapshotBrowser, catFile, listPath, parseFileRef } from '../src/engine/file-browse.ts';
import { Repository } from '../src/repo/repository.ts';
import { LocalStore } from '../src/store/local.ts';
import type { BlobStore, ReadRange } from '../src/store/store.ts';
import { TresorError, UsageError, describeError } from '../src/util/errors.ts';
import { LogText, Prng, RandomBytes, formatSize, parseSize } from './corpus.ts';
import { CommandFailedError, allocatedBytes, capture, createCacheDropper, hasGnuTime, killActiveCommand, machineFacts, runChecked, sha256File } from './measure.ts';
import type { CommandSpec, Measurement } from './measure.ts';
import { PASSPHRASE, baseEnv, parseJsonDocument, tresorCliPath, tresorNode, tresorVersion } from './peers.ts';
import { replaceSection } from './report.ts';
import type { StepRecord, TargetResult } from './report.ts';
import { BUSY_SHARE, StepRunner, systemCpuSeconds } from './steps.ts';

const MIB = 1024 * 1024;
const REPO_ROOT = dirname(dirname(fileURLToPath(import.meta.url)));
/** Issue 4: one 2 MiB file out of the snapshot of a 20 GiB disk in under 1 s … */
const CAT_WALL_LIMIT_SECONDS = 1;
/** … reading under 32 MiB from the repository. */
const CAT_READ_LIMIT = 32 * MIB;
const REFERENCE = { diskSize: 20 * 1024 * MIB, dirs: 1000, filesPerDir: 100 };
const PAYLOAD_BYTES = 2 * MIB;
const MAX_SMALL_FILE = 8 * 1024;
const PAYLOAD_DIRS = ['home', 'alice', 'projects', 'archive', '2024', 'q3', 'reports', 'final', 'attachments'];
const PAYLOAD_NAME = 'payload-2MiB.bin';
const DIRS_PER_GROUP = 100;
/** The partition (and the filesystem) starts 1 MiB into the disk, as partitioning tools align it. */
const PARTITION_START_SECTOR = 2048;
const BACKUP_ID = 'files-bench';
/** Warm repetitions of the quick commands (after one unrecorded warm-up run): the median is reported. */
const WARM_RUNS = 5;
/**
 * Fixed identities and clock: the GUIDs, the filesystem UUID, its directory hash seed and the times
 * mke2fs sets itself do not vary between runs. What still may: inode change times (mke2fs copies
 * them from the host tree, where they cannot be set) and inode order (the host's readdir order).
 */
const DISK_GUID = '5452534f-5200-4000-8000-000000000001';
const PARTITION_GUID = '5452534f-5200-4000-8000-000000000002';
const FS_UUID = '5452534f-5200-4000-8000-000000000003';
const FS_HASH_SEED = '5452534f-5200-4000-8000-000000000004';
const FIXED_EPOCH = 1767225600; // 2026-01-01T00:00:00Z
/** Streams of the seeded generators (distinct from bench/corpus.ts's). */
const STREAM = { layout: 101, text: 102, random: 103, payload: 104 } as const;

export const FILES_MARKERS = { start: '<!-- bench:files:start -->', end: '<!-- bench:files:end -->' };
const FILES_HEADING = '## File-level restore (issue 4): figures';

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

interface FilesOptions {
  dir: string;
  seed: number;
  diskSize: number;
  dirs: number;
  filesPerDir: number;
  keep: boolean;
  writeDoc: boolean;
  stepTimeoutMs: number;
  tresorCli: string;
  report: string | undefined;
}

const USAGE = `usage: npm run bench -- --files [options]     (or: node bench/files.ts [options])
  --disk-size SIZE     disk size (default 20G; the filesystem fills it)
  --dirs N             directories of small files (default 1000)
  --files-per-dir N    small files per directory (default 100)
  --dir DIR            scratch parent directory (default /var/tmp/tresor-bench)
  --seed N             tree seed (default 1)
  --step-timeout MIN   kill a step after MIN minutes (default 30)
  --tresor-cli PATH    the Tresor CLI to measure (default bin/tresor.js, run with Node 24)
  --keep               keep the scratch directory (tree, disk, repository, restored disk, logs)
  --write-doc          rewrite the "File-level restore" figures of docs/performance.md
  --report FILE        no run: print (and with --write-doc, record) an earlier results JSON`;

function parseFilesOptions(argv: string[]): FilesOptions {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        'disk-size': { type: 'string', default: '20G' },
        dirs: { type: 'string', default: String(REFERENCE.dirs) },
        'files-per-dir': { type: 'string', default: String(REFERENCE.filesPerDir) },
        dir: { type: 'string', default: '/var/tmp/tresor-bench' },
        seed: { type: 'string', default: '1' },
        'step-timeout': { type: 'string', default: '30' },
        'tresor-cli': { type: 'string', default: tresorCliPath(REPO_ROOT) },
        keep: { type: 'boolean', default: false },
        'write-doc': { type: 'boolean', default: false },
        report: { type: 'string' },
        help: { type: 'boolean', default: false },
      },
    }));
  } catch (err) {
    if (err instanceof TypeError && String((err as NodeJS.ErrnoException).code).startsWith('ERR_PARSE_ARGS')) {
      throw new UsageError(err.message, USAGE);
    }
    throw err;
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const diskSize = parseSize(values['disk-size']);
  const dirs = Number(values.dirs);
  const filesPerDir = Number(values['files-per-dir']);
  const seed = Number(values.seed);
  const stepTimeout = Number(values['step-timeout']);
  if (!(diskSize >= 256 * MIB) || diskSize % MIB !== 0) throw new UsageError(`--disk-size ${values['disk-size']} is not a whole number of MiB of at least 256M`, USAGE);
  if (!Number.isInteger(dirs) || dirs < 1 || dirs > 100_000) throw new UsageError(`--dirs ${values.dirs} is not an integer in 1..100000`, USAGE);
  if (!Number.isInteger(filesPerDir) || filesPerDir < 1 || filesPerDir > 100_000) throw new UsageError(`--files-per-dir ${values['files-per-dir']} is not an integer in 1..100000`, USAGE);
  if (!Number.isInteger(seed)) throw new UsageError(`--seed ${values.seed} is not an integer`, USAGE);
  if (!(stepTimeout > 0)) throw new UsageError(`--step-timeout ${values['step-timeout']} is not a positive number`, USAGE);
  return {
    dir: values.dir, seed, diskSize, dirs, filesPerDir, keep: values.keep, writeDoc: values['write-doc'],
    stepTimeoutMs: stepTimeout * 60_000, tresorCli: resolve(values['tresor-cli']), report: values.report,
  };
}

// ---------------------------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------------------------

export interface TreeFacts {
  root: string;
  seed: number;
  dirs: number;
  filesPerDir: number;
  smallFiles: number;
  textFiles: number;
  randomFiles: number;
  smallFileBytes: number;
  /** every directory below the root (groups, leaf directories, the payload's chain) */
  directories: number;
  /** entries below the root: what `ls -R /` of the filesystem lists, lost+found not included */
  entries: number;
  /** the 2 MiB file: its path inside the filesystem, its copy in the tree, its digest */
  payloadPath: string;
  payloadHostPath: string;
  payloadSha256: string;
  seconds: number;
}

/** Path (inside the filesystem) of small file `file` of leaf directory `dir`. */
function smallFilePath(dir: number, file: number, random: boolean): string {
  const group = Math.floor(dir / DIRS_PER_GROUP);
  return `/data/g${String(group).padStart(2, '0')}/d${String(dir).padStart(4, '0')}/f${String(file).padStart(4, '0')}.${random ? 'bin' : 'log'}`;
}

/** Exactly `length` bytes of log lines (the last line cut, as a truncated log would be). */
function textBytes(text: LogText, length: number): Buffer {
  const lines: string[] = [];
  let have = 0;
  while (have < length) {
    const line = text.nextLine();
    lines.push(line);
    have += line.length;
  }
  return Buffer.from(lines.join('').slice(0, length), 'latin1');
}

/**
 * Writes the tree below `root` (which must not exist): same seed, same names, sizes, contents and
 * modification times. Small files are 0..8 KiB (uniform), one in four random bytes (already
 * compressed data), the others log text.
 */
export function buildTree(root: string, options: { seed: number; dirs: number; filesPerDir: number }): TreeFacts {
  const started = performance.now();
  if (existsSync(root)) throw new UsageError(`${root} already exists`, 'the tree is built into a new directory');
  const layout = new Prng(options.seed, STREAM.layout);
  const text = new LogText(options.seed, STREAM.text);
  const random = new RandomBytes(options.seed, STREAM.random);
  const facts: TreeFacts = {
    root, seed: options.seed, dirs: options.dirs, filesPerDir: options.filesPerDir, smallFiles: 0, textFiles: 0, randomFiles: 0,
    smallFileBytes: 0, directories: 0, entries: 0, payloadPath: '', payloadHostPath: '', payloadSha256: '', seconds: 0,
  };
  const createdDirs: string[] = [];
  const makeDir = (path: string) => {
    mkdirSync(join(root, path));
    createdDirs.push(path);
  };
  mkdirSync(root);
  makeDir('/data');
  let mtime = FIXED_EPOCH;
  for (let dir = 0; dir < options.dirs; dir++) {
    if (dir % DIRS_PER_GROUP === 0) makeDir(dirname(dirname(smallFilePath(dir, 0, false))));
    makeDir(dirname(smallFilePath(dir, 0, false)));
    for (let file = 0; file < options.filesPerDir; file++) {
      const size = layout.below(MAX_SMALL_FILE + 1);
      const isRandom = layout.below(4) === 0;
      let data: Buffer;
      if (isRandom) {
        data = Buffer.alloc(size);
        random.fill(data);
        facts.randomFiles++;
      } else {
        data = textBytes(text, size);
        facts.textFiles++;
      }
      const path = join(root, smallFilePath(dir, file, isRandom));
      writeFileSync(path, data);
      utimesSync(path, mtime, mtime);
      mtime += 37;
      facts.smallFiles++;
      facts.smallFileBytes += size;
    }
  }
  let chain = '';
  for (const name of PAYLOAD_DIRS) {
    chain = `${chain}/${name}`;
    makeDir(chain);
  }
  facts.payloadPath = `${chain}/${PAYLOAD_NAME}`;
  facts.payloadHostPath = join(root, facts.payloadPath);
  const payload = Buffer.alloc(PAYLOAD_BYTES);
  new RandomBytes(options.seed, STREAM.payload).fill(payload);
  writeFileSync(facts.payloadHostPath, payload);
  utimesSync(facts.payloadHostPath, FIXED_EPOCH, FIXED_EPOCH);
  facts.payloadSha256 = createHash('sha256').update(payload).digest('hex');
  // Directories last, deepest first: creating entries changes their parents' times.
  for (const path of createdDirs.reverse()) utimesSync(join(root, path), FIXED_EPOCH, FIXED_EPOCH);
  utimesSync(root, FIXED_EPOCH, FIXED_EPOCH);
  facts.directories = createdDirs.length;
  facts.entries = facts.directories + facts.smallFiles + 1;
  facts.seconds = (performance.now() - started) / 1000;
  return facts;
}

// ---------------------------------------------------------------------------------------------
// The disk
// ---------------------------------------------------------------------------------------------

export interface DiskFacts {
  path: string;
  size: number;
  partitionOffset: number;
  partitionBytes: number;
  fsBlocks: number;
  allocatedBytes: number;
  /** mkfs.ext4 -d: the only slow part of building the disk */
  mkfsSeconds?: number;
}

class BenchToolError extends TresorError {
  constructor(argv: string[], detail: string) {
    super('bench-tool-failed', `\`${argv.join(' ')}\` failed: ${detail}`, {
      hint: 'see the message; the tools come from Debian packages gdisk, fdisk, e2fsprogs, mount (util-linux)',
      context: { command: argv[0] },
    });
  }
}

/** Runs a quick setup command (not measured); throws with its stderr when it fails. */
function runTool(argv: string[], env: NodeJS.ProcessEnv = process.env): string {
  try {
    return execFileSync(argv[0], argv.slice(1), { encoding: 'utf8', env, stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 * MIB });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new BenchToolError(argv, (e.stderr ?? '').trim() || e.message);
  }
}

/** A sparse disk file of `size` bytes with a GPT holding one Linux partition from 1 MiB to the end. */
function partitionDisk(path: string, size: number): { offset: number; bytes: number } {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
  // Fixed GUIDs: the same disk bytes on every run (sgdisk draws random ones otherwise).
  runTool(['sgdisk', '-o', '-U', DISK_GUID, '-n', `1:${PARTITION_START_SECTOR}:0`, '-t', '1:8300', '-u', `1:${PARTITION_GUID}`, '-c', '1:files', path]);
  const table = JSON.parse(runTool(['sfdisk', '--json', path])) as { partitiontable: { sectorsize?: number; partitions: Array<{ start: number; size: number }> } };
  const sector = table.partitiontable.sectorsize ?? 512;
  const partition = table.partitiontable.partitions[0];
  if (partition === undefined) throw new BenchToolError(['sfdisk', '--json', path], 'no partition after sgdisk -n 1');
  return { offset: partition.start * sector, bytes: partition.size * sector };
}

/** The mke2fs command that writes the tree as ext4 into the partition, in place in the disk file. */
function mkfsCommand(disk: string, tree: string, partition: { offset: number; bytes: number }): { spec: CommandSpec; fsBlocks: number } {
  const fsBlocks = Math.floor(partition.bytes / 4096);
  return {
    fsBlocks,
    spec: {
      argv: ['mke2fs', '-q', '-F', '-t', 'ext4', '-b', '4096', '-L', 'files-bench', '-U', FS_UUID,
        '-E', `offset=${partition.offset},root_owner=0:0,hash_seed=${FS_HASH_SEED}`, '-d', tree, disk, String(fsBlocks)],
      cwd: dirname(disk),
      // e2fsprogs' own switch for a fixed clock (superblock and inode times it sets itself)
      env: { ...process.env, E2FSPROGS_FAKE_TIME: String(FIXED_EPOCH), LC_ALL: 'C' },
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The in-process probe: the CLI's code path, phase by phase, counting every repository read
// ---------------------------------------------------------------------------------------------

interface ProbePhase {
  phase: string;
  ms: number;
  /** bytes and reads the store served during the phase */
  bytesRead: number;
  reads: number;
}

export interface ProbeReport {
  mode: 'cat' | 'ls';
  /** from process start to the first phase: Node's start-up and loading the modules */
  startupMs: number;
  phases: ProbePhase[];
  /** every store read, by the top-level prefix of the blob name (config, keys, index, snapshots, packs, locks) */
  readsByPrefix: Record<string, { bytes: number; reads: number }>;
  totalBytesRead: number;
  totalReads: number;
  /** the engine's own account (SnapshotBrowser.stats: index pieces + chunks) */
  stats: Record<string, number>;
  entries?: number;
  entryErrors?: number;
  fileBytes?: number;
  fileSha256?: string;
}

/** A BlobStore that counts what is read through it, by blob-name prefix. */
class CountingStore implements BlobStore {
  readonly location: string;
  readonly byPrefix: Record<string, { bytes: number; reads: number }> = {};
  bytes = 0;
  reads = 0;
  readonly #inner: BlobStore;

  constructor(inner: BlobStore) {
    this.#inner = inner;
    this.location = inner.location;
  }

  async read(name: string, range?: ReadRange): Promise<Buffer> {
    const data = await this.#inner.read(name, range);
    const prefix = name.includes('/') ? name.slice(0, name.indexOf('/')) : name;
    const entry = (this.byPrefix[prefix] ??= { bytes: 0, reads: 0 });
    entry.bytes += data.length;
    entry.reads++;
    this.bytes += data.length;
    this.reads++;
    return data;
  }

  create(name: string, data: Uint8Array): Promise<boolean> { return this.#inner.create(name, data); }
  stat(name: string) { return this.#inner.stat(name); }
  list(prefix: string) { return this.#inner.list(prefix); }
  delete(name: string): Promise<void> { return this.#inner.delete(name); }
  close(): Promise<void> { return this.#inner.close(); }
}

/**
 * `files cat REF:/PATH` (to a hash instead of a file) or `files ls REF / -R` in this process, as
 * src/cli/commands/files.ts does them, timing each phase and counting every repository read.
 */
export async function probe(mode: 'cat' | 'ls', repoDir: string, refText: string, passphrase: string): Promise<ProbeReport> {
  const startupMs = performance.now();
  const store = new CountingStore(await LocalStore.open(repoDir));
  const phases: ProbePhase[] = [];
  let mark = { at: performance.now(), bytes: 0, reads: 0 };
  const phase = (name: string) => {
    const now = performance.now();
    phases.push({ phase: name, ms: now - mark.at, bytesRead: store.bytes - mark.bytes, reads: store.reads - mark.reads });
    mark = { at: now, bytes: store.bytes, reads: store.reads };
  };
  const repo = await Repository.open(store, async () => passphrase);
  phase('open repository: config, key slots, scrypt');
  const lock = await repo.lock('shared', `bench probe ${mode}`);
  phase('shared lock');
  const browser = new SnapshotBrowser(repo, {});
  const report: ProbeReport = { mode, startupMs, phases, readsByPrefix: store.byPrefix, totalBytesRead: 0, totalReads: 0, stats: {} };
  try {
    await repo.index();
    phase('blob index');
    const ref = parseFileRef(refText, mode === 'cat' ? 'required' : 'optional');
    const opened = await browser.filesystem(ref);
    phase('manifest, partition table, filesystem');
    if (mode === 'cat') {
      const hash = createHash('sha256');
      const result = await catFile(opened.fs, ref.path as string, async (chunk) => { hash.update(chunk); });
      report.fileBytes = result.bytesWritten;
      report.fileSha256 = hash.digest('hex');
      phase('resolve path, read the file');
    } else {
      let entries = 0;
      let errors = 0;
      for await (const entry of listPath(opened.fs, ref.path ?? '/', { recursive: true })) {
        entries++;
        if (entry.error) errors++;
      }
      report.entries = entries;
      report.entryErrors = errors;
      phase('walk every directory, stat every entry');
    }
    report.stats = { ...browser.stats };
  } finally {
    await browser.close();
    await lock.release();
    await store.close();
  }
  report.totalBytesRead = store.bytes;
  report.totalReads = store.reads;
  return report;
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

export interface FilesResults {
  mode: 'files';
  startedAt: string;
  finishedAt: string;
  totalSeconds: number;
  scratch: string;
  options: Record<string, unknown>;
  machine: Record<string, string>;
  versions: Record<string, string>;
  measurement: string[];
  tree?: TreeFacts;
  disk?: DiskFacts;
  snapshot?: string;
  /** the Tresor CLI's own figures (its --json documents) */
  cat?: { bytesFetched?: number; storeReads?: number; durationMs?: number; identical?: boolean };
  list?: { entries?: number; errors?: number; expected?: number };
  probes: { cat?: ProbeReport; ls?: ProbeReport };
  /** warm repetitions: every run's wall time, by step name (the step record holds the median run) */
  warm: Record<string, number[]>;
  baseline: { restoredAllocatedBytes?: number; dumpIdentical?: boolean; findEntries?: number; notes: string[] };
  steps: StepRecord[];
  targets: TargetResult[];
  failures: number;
}

interface Context {
  runner: StepRunner;
  scratch: string;
  options: FilesOptions;
  results: FilesResults;
  repoDir: string;
  useGnuTime: boolean;
}

const TOOL = { build: 'build', tresor: 'tresor', baseline: 'baseline' } as const;

function tresorCommand(ctx: Context, args: string[]): CommandSpec {
  const cli = ctx.options.tresorCli;
  const viaNode = /\.[cm]?[jt]s$/.test(cli);
  return {
    argv: viaNode ? [tresorNode(REPO_ROOT), cli, ...args] : [cli, ...args],
    cwd: REPO_ROOT,
    // TRESOR_CACHE_DIR: bin/tresor.js keeps Node's compile cache there; the run's first command fills it
    env: { ...baseEnv(), TRESOR_REPO: ctx.repoDir, TRESOR_PASSPHRASE: PASSPHRASE, TRESOR_CACHE_DIR: join(ctx.scratch, 'cache', 'tresor') },
  };
}

/** Where StepRunner put a step's stdout (bench/steps.ts names logs `<tool>-<step>`). */
function stepStdoutFile(runner: StepRunner, tool: string, step: string): string {
  return join(runner.logDirectory, `${`${tool}-${step}`.replace(/[^\w@.-]+/g, '-')}.out`);
}

function countJsonEntries(file: string): { entries: number; errors: number } {
  const document = JSON.parse(readFileSync(file, 'utf8')) as Array<{ error?: unknown }>;
  if (!Array.isArray(document)) throw new TresorError('bench-bad-listing', `${file} is not a JSON array of entries`);
  return { entries: document.length, errors: document.filter((e) => e.error !== undefined).length };
}

function countLines(file: string): number {
  const text = readFileSync(file, 'utf8');
  return text === '' ? 0 : text.split('\n').filter((l) => l !== '').length;
}

async function buildPhase(ctx: Context): Promise<DiskFacts | undefined> {
  const { runner, scratch, options, results } = ctx;
  runner.progress(`building the tree: ${options.dirs} directories × ${options.filesPerDir} files + one 2 MiB file (seed ${options.seed})`);
  const tree = buildTree(join(scratch, 'tree'), { seed: options.seed, dirs: options.dirs, filesPerDir: options.filesPerDir });
  results.tree = tree;
  runner.progress(`tree built in ${tree.seconds.toFixed(1)} s: ${tree.smallFiles} small files (${formatSize(tree.smallFileBytes)}), ${tree.directories} directories`);

  const diskPath = join(scratch, 'disk', 'disk.raw');
  mkdirSync(dirname(diskPath), { recursive: true });
  const partition = partitionDisk(diskPath, options.diskSize);
  const { spec, fsBlocks } = mkfsCommand(diskPath, tree.root, partition);
  const mkfs = await runner.run({
    tool: TOOL.build, label: 'mkfs.ext4 -d', step: 'build filesystem', command: () => spec,
    after: () => ({ allocatedBytes: allocatedBytes(diskPath), diskBytes: options.diskSize }),
  });
  if (mkfs.status !== 'ok') return undefined;
  const disk: DiskFacts = {
    path: diskPath, size: options.diskSize, partitionOffset: partition.offset, partitionBytes: partition.bytes, fsBlocks,
    allocatedBytes: allocatedBytes(diskPath), mkfsSeconds: mkfs.wallSeconds,
  };
  results.disk = disk;
  runner.progress(`disk ${formatSize(disk.size)}, ${formatSize(disk.allocatedBytes)} allocated; filesystem at ${partition.offset}`);
  return disk;
}

async function backupPhase(ctx: Context, disk: DiskFacts): Promise<string | undefined> {
  const { runner, repoDir } = ctx;
  mkdirSync(dirname(repoDir), { recursive: true });
  const init = await runner.run({
    tool: TOOL.tresor, label: 'Tresor', step: 'repo init', repoDir,
    command: () => tresorCommand(ctx, ['repo', 'init', '--repo', repoDir, '--encryption', 'aes-256-gcm']),
  });
  if (init.status !== 'ok') return undefined;
  let snapshot: string | undefined;
  const backup = await runner.run({
    tool: TOOL.tresor, label: 'Tresor', step: 'backup image', repoDir, disk: { size: disk.size, allocated: disk.allocatedBytes },
    command: () => tresorCommand(ctx, ['backup', 'image', disk.path, '--id', BACKUP_ID, '--json']),
    after: (m) => {
      const doc = parseJsonDocument(m.stdout) as { snapshot?: { name?: string } } | undefined;
      snapshot = doc?.snapshot?.name;
      if (snapshot === undefined) throw new TresorError('bench-no-snapshot-name', 'tresor backup image --json named no snapshot (.snapshot.name)');
      return {};
    },
  });
  if (backup.status !== 'ok') return undefined;
  ctx.results.snapshot = snapshot;
  return snapshot;
}

interface WarmPlan {
  label: string;
  step: string;
  command: () => CommandSpec;
  /** before every run (e.g. remove the output file the command must create) */
  before?: () => void;
}

/**
 * Runs a quick command WARM_RUNS times with the page cache as the previous run left it (after
 * one unrecorded warm-up), and records the median run as a step: the steady state of a command
 * used again and again, next to the cold figure the measured step gives.
 */
async function warmMedian(ctx: Context, plan: WarmPlan): Promise<StepRecord> {
  const record: StepRecord = { tool: TOOL.tresor, label: plan.label, step: plan.step, status: 'failed', cacheDropped: false };
  ctx.runner.steps.push(record);
  ctx.runner.progress(`${plan.label} ${plan.step} ...`);
  const runs: Measurement[] = [];
  let cpuBefore: number | undefined;
  try {
    const spec = plan.command();
    record.command = spec.argv.join(' ');
    for (let i = 0; i <= WARM_RUNS; i++) {
      plan.before?.();
      if (i === 1) cpuBefore = systemCpuSeconds();
      const logBase = join(ctx.runner.logDirectory, `warm-${plan.step}-${i}`.replace(/[^\w@.-]+/g, '-'));
      const m = await runChecked(spec, { logBase, timeoutMs: ctx.options.stepTimeoutMs, useGnuTime: ctx.useGnuTime });
      if (i > 0) runs.push(m);
    }
  } catch (err) {
    record.error = describeError(err);
    if (err instanceof CommandFailedError) record.wallSeconds = err.measurement.wallSeconds;
    ctx.runner.progress(`${plan.label} ${plan.step}: FAILED: ${record.error}`);
    return record;
  }
  const sorted = [...runs].sort((a, b) => a.wallSeconds - b.wallSeconds);
  const median = sorted[Math.floor(sorted.length / 2)];
  Object.assign(record, {
    status: 'ok', wallSeconds: median.wallSeconds, userSeconds: median.userSeconds, sysSeconds: median.sysSeconds,
    cpuSeconds: median.userSeconds !== undefined && median.sysSeconds !== undefined ? median.userSeconds + median.sysSeconds : undefined,
    peakRssBytes: median.peakRssBytes,
  });
  ctx.results.warm[plan.step] = runs.map((m) => m.wallSeconds);
  recordWarmContention(record, runs, cpuBefore, systemCpuSeconds());
  ctx.runner.progress(`${plan.label} ${plan.step}: median ${median.wallSeconds.toFixed(2)} s of ${runs.length}`);
  return record;
}

/** As StepRunner does for one command: the share of the CPUs others used during the recorded runs. */
function recordWarmContention(record: StepRecord, runs: Measurement[], cpuBefore: number | undefined, cpuAfter: number | undefined): void {
  const own = runs.reduce((sum, m) => sum + (m.userSeconds ?? NaN) + (m.sysSeconds ?? NaN), 0);
  const capacity = runs.reduce((sum, m) => sum + m.wallSeconds, 0) * availableParallelism();
  if (cpuBefore === undefined || cpuAfter === undefined || !Number.isFinite(own) || capacity <= 0) return;
  record.othersCpuShare = Math.max(0, cpuAfter - cpuBefore - own) / capacity;
  record.busyMachine = record.othersCpuShare > BUSY_SHARE;
}

/** The warm repetitions of `--version` and `files cat`. */
async function warmPhase(ctx: Context, catArgs: string[], catOut: string): Promise<void> {
  const removeOutput = () => rmSync(catOut, { force: true });
  await warmMedian(ctx, { label: 'Tresor', step: 'tresor --version, warm', command: () => tresorCommand(ctx, ['--version']) });
  await warmMedian(ctx, { label: 'Tresor', step: 'files cat (2 MiB file), warm', before: removeOutput, command: () => tresorCommand(ctx, catArgs) });
  removeOutput();
}

/** The filesystem's reference `SNAP:DISK:PART` as `files volumes` names it (not measured). */
function filesystemRef(ctx: Context, snapshot: string): string {
  const spec = tresorCommand(ctx, ['files', 'volumes', snapshot, '--json']);
  const volumes = parseJsonDocument(runTool(spec.argv, spec.env)) as Array<{ ref: string; filesystem?: { type: string } }> | undefined;
  const ext4 = volumes?.find((v) => v.filesystem?.type === 'ext4');
  if (ext4 === undefined) throw new TresorError('bench-no-filesystem', `tresor files volumes ${snapshot} found no ext4 filesystem`, { context: { volumes } });
  return ext4.ref;
}

async function tresorPhase(ctx: Context, snapshot: string, tree: TreeFacts): Promise<void> {
  const { runner, scratch, results } = ctx;
  const fsRef = filesystemRef(ctx, snapshot);
  const out = join(scratch, 'out');
  mkdirSync(out, { recursive: true });

  await runner.run({ tool: TOOL.tresor, label: 'Tresor', step: 'tresor --version (Node start-up)', command: () => tresorCommand(ctx, ['--version']) });

  const catOut = join(out, 'tresor-cat.bin');
  await runner.run({
    tool: TOOL.tresor, label: 'Tresor', step: 'files cat (2 MiB file)',
    command: () => tresorCommand(ctx, ['files', 'cat', `${fsRef}:${tree.payloadPath}`, '-o', catOut, '--json']),
    after: async (m) => {
      const doc = parseJsonDocument(m.stdout) as { durationMs?: number; stats?: { bytesFetched?: number; storeReads?: number } } | undefined;
      const identical = (await sha256File(catOut)) === tree.payloadSha256;
      results.cat = { bytesFetched: doc?.stats?.bytesFetched, storeReads: doc?.stats?.storeReads, durationMs: doc?.durationMs, identical };
      if (!identical) throw new TresorError('bench-cat-differs', 'the file tresor files cat wrote differs from the original');
      return { verified: true };
    },
  });
  rmSync(catOut, { force: true });
  await warmPhase(ctx, ['files', 'cat', `${fsRef}:${tree.payloadPath}`, '-o', catOut, '--json'], catOut);

  const lsStep = 'files ls -R (whole tree)';
  await runner.run({
    tool: TOOL.tresor, label: 'Tresor', step: lsStep,
    command: () => tresorCommand(ctx, ['files', 'ls', fsRef, '/', '-R', '--json']),
    after: () => {
      const { entries, errors } = countJsonEntries(stepStdoutFile(runner, TOOL.tresor, lsStep));
      // ls -R / also lists lost+found, which mke2fs creates
      results.list = { entries, errors, expected: tree.entries + 1 };
      if (errors > 0 || entries !== tree.entries + 1) {
        throw new TresorError('bench-listing-differs', `files ls -R listed ${entries} entries (${errors} with errors); the tree has ${tree.entries} plus lost+found`);
      }
      return {};
    },
  });

  for (const mode of ['cat', 'ls'] as const) {
    const ref = mode === 'cat' ? `${fsRef}:${tree.payloadPath}` : fsRef;
    await runner.run({
      tool: TOOL.tresor, label: 'Tresor (in-process probe)', step: `probe ${mode}`,
      command: () => ({ ...tresorCommand(ctx, []), argv: [tresorNode(REPO_ROOT), fileURLToPath(import.meta.url), 'probe', mode, ctx.repoDir, ref] }),
      after: (m) => {
        const report = parseJsonDocument(m.stdout) as ProbeReport | undefined;
        if (report === undefined) throw new TresorError('bench-probe-output', `the ${mode} probe printed no JSON report`);
        results.probes[mode] = report;
        if (mode === 'cat' && report.fileSha256 !== tree.payloadSha256) throw new TresorError('bench-cat-differs', 'the probe read a file that differs from the original');
        return {};
      },
    });
  }
}

async function baselinePhase(ctx: Context, snapshot: string, disk: DiskFacts, tree: TreeFacts): Promise<void> {
  const { runner, scratch, results } = ctx;
  const restoreDir = join(scratch, 'restore');
  mkdirSync(restoreDir, { recursive: true });
  const restored = join(restoreDir, 'disk.raw');
  const restore = await runner.run({
    tool: TOOL.baseline, label: 'Tresor', step: 'restore image (whole disk)', disk: { size: disk.size, allocated: disk.allocatedBytes },
    command: () => tresorCommand(ctx, ['restore', 'image', snapshot, restored]),
    after: () => {
      const size = statSync(restored).size;
      if (size !== disk.size) throw new TresorError('bench-restore-size', `the restored disk has ${size} bytes, the original ${disk.size}`);
      results.baseline.restoredAllocatedBytes = allocatedBytes(restored);
      return { restoredAllocatedBytes: results.baseline.restoredAllocatedBytes };
    },
  });
  if (restore.status !== 'ok') return;

  // e2fsprogs' unix I/O manager takes the partition offset after '?': no copy, no loop device.
  const image = `${restored}?offset=${disk.partitionOffset}`;
  const dumped = join(scratch, 'out', 'debugfs-dump.bin');
  await runner.run({
    tool: TOOL.baseline, label: 'debugfs', step: 'dump (2 MiB file)',
    command: () => ({ argv: ['debugfs', '-R', `dump -p ${tree.payloadPath} ${dumped}`, image], cwd: scratch, env: process.env }),
    after: async () => {
      // debugfs reports a failed dump on stderr and still exits 0
      results.baseline.dumpIdentical = existsSync(dumped) && (await sha256File(dumped)) === tree.payloadSha256;
      if (!results.baseline.dumpIdentical) throw new TresorError('bench-dump-differs', 'debugfs dump wrote no file or one that differs from the original');
      return { verified: true };
    },
  });
  rmSync(dumped, { force: true });

  const mountPoint = join(scratch, 'mnt');
  mkdirSync(mountPoint, { recursive: true });
  const mount = await runner.run({
    tool: TOOL.baseline, label: 'mount', step: 'loop mount (read-only)',
    command: () => ({
      argv: ['mount', '-t', 'ext4', '-o', `ro,loop,offset=${disk.partitionOffset},sizelimit=${disk.partitionBytes}`, restored, mountPoint],
      cwd: scratch, env: process.env,
    }),
  });
  if (mount.status !== 'ok') {
    results.baseline.notes.push(`no loop mount here (${mount.error ?? 'failed'}): the listing baseline was not measured`);
    return;
  }
  try {
    const findStep = 'find -printf (whole tree)';
    await runner.run({
      tool: TOOL.baseline, label: 'find', step: findStep,
      command: () => ({ argv: ['find', mountPoint, '-mindepth', '1', '-printf', '%y %m %n %U %G %s %T@ %P\\n'], cwd: scratch, env: process.env }),
      after: () => {
        results.baseline.findEntries = countLines(stepStdoutFile(runner, TOOL.baseline, findStep));
        if (results.baseline.findEntries !== tree.entries + 1) {
          throw new TresorError('bench-listing-differs', `find listed ${results.baseline.findEntries} entries; the tree has ${tree.entries} plus lost+found`);
        }
        return {};
      },
    });
  } finally {
    unmount(mountPoint, results.baseline.notes);
  }
}

function unmount(mountPoint: string, notes: string[]): void {
  const result = capture(['umount', mountPoint]);
  // capture returns '' on success and on failure alike: check the mount table instead
  if (capture(['findmnt', '-n', mountPoint]) !== '') notes.push(`could not unmount ${mountPoint}${result ? `: ${result}` : ''}`);
}

// ---------------------------------------------------------------------------------------------
// Targets and report
// ---------------------------------------------------------------------------------------------

function step(results: FilesResults, name: string): StepRecord | undefined {
  return results.steps.find((s) => s.step === name);
}

export function checkFilesTargets(results: FilesResults): TargetResult[] {
  const targets: TargetResult[] = [];
  const cat = step(results, 'files cat (2 MiB file)');
  const wallTarget = `one 2 MiB file out of the ${formatSize(results.disk?.size ?? REFERENCE.diskSize)} disk's snapshot in under ${CAT_WALL_LIMIT_SECONDS} s (CLI wall, cold cache)`;
  const readTarget = `… reading under ${formatSize(CAT_READ_LIMIT)} from the repository`;
  if (cat?.status !== 'ok' || cat.wallSeconds === undefined) {
    const why = `Tresor step ${cat === undefined ? 'not run' : `${cat.status}${cat.error ? `: ${cat.error}` : ''}`}`;
    return [{ target: wallTarget, status: 'MISS', detail: why }, { target: readTarget, status: 'MISS', detail: why }];
  }
  const busy = cat.busyMachine === true ? ' (busy machine: repeat on a quiet one)' : '';
  const startup = step(results, 'tresor --version (Node start-up)');
  targets.push({
    target: wallTarget,
    status: cat.wallSeconds < CAT_WALL_LIMIT_SECONDS ? 'PASS' : 'MISS',
    detail: `${seconds(cat.wallSeconds)}`
      + (results.cat?.durationMs !== undefined ? `; the command's own figure (repository open to file written) ${(results.cat.durationMs / 1000).toFixed(2)} s` : '')
      + (startup?.wallSeconds !== undefined ? `; Node start-up alone (tresor --version) ${seconds(startup.wallSeconds)}` : '')
      + warmDetail(results)
      + busy,
  });
  const fetched = results.cat?.bytesFetched;
  const total = results.probes.cat?.totalBytesRead;
  const worst = Math.max(fetched ?? 0, total ?? 0);
  targets.push({
    target: readTarget,
    status: fetched === undefined && total === undefined ? 'n/a' : worst < CAT_READ_LIMIT ? 'PASS' : 'MISS',
    detail: `CLI bytesFetched ${fetched === undefined ? '–' : formatSize(fetched)} (index pieces + chunks)`
      + `; every repository read of the same operation ${total === undefined ? '–' : formatSize(total)} (in-process probe: key slots, blob index, manifest, lock included)`,
  });
  return targets;
}

/** "; warm (median of 5): 0.45 s" when the warm repetitions succeeded. */
function warmDetail(results: FilesResults): string {
  const warm = step(results, 'files cat (2 MiB file), warm');
  return warm?.status === 'ok' ? `; warm (median of ${WARM_RUNS}): ${seconds(warm.wallSeconds)}` : '';
}

function seconds(value: number | undefined): string {
  return value === undefined ? '–' : `${value.toFixed(value < 10 ? 2 : 1)} s`;
}

function mib(bytes: number | undefined): string {
  return bytes === undefined ? '–' : (bytes / MIB).toFixed(1);
}

function cell(text: string): string {
  return text.replace(/\|/g, '\\|').replace(/\n/g, ' ');
}

/** Bytes the step read from the repository, where known. */
function stepBytesRead(results: FilesResults, s: StepRecord): number | undefined {
  if (s.step === 'files cat (2 MiB file)') return results.cat?.bytesFetched;
  if (s.step === 'probe cat') return results.probes.cat?.totalBytesRead;
  if (s.step === 'probe ls') return results.probes.ls?.totalBytesRead;
  return undefined;
}

function stepNote(results: FilesResults, s: StepRecord): string {
  const notes: string[] = [];
  if (s.status !== 'ok') notes.push(`${s.status.toUpperCase()}: ${s.error ?? ''}`);
  if (s.step === 'build filesystem' && s.allocatedBytes !== undefined) notes.push(`disk ${formatSize(s.allocatedBytes)} allocated afterwards`);
  if (s.step === 'files cat (2 MiB file)' && results.cat?.identical === true) notes.push('identical to the original');
  if (s.step === 'files cat (2 MiB file)' && results.cat?.durationMs !== undefined) notes.push(`command's own figure ${results.cat.durationMs} ms`);
  if (s.step === 'files ls -R (whole tree)' && results.list?.entries !== undefined) notes.push(`${results.list.entries} entries`);
  if (s.step === 'probe cat' || s.step === 'probe ls') {
    const p = results.probes[s.step === 'probe cat' ? 'cat' : 'ls'];
    if (p !== undefined) notes.push(`engine bytesFetched ${formatSize(p.stats.bytesFetched ?? 0)}${p.entries !== undefined ? `, ${p.entries} entries` : ''}`);
  }
  if (s.step === 'restore image (whole disk)' && s.restoredAllocatedBytes !== undefined) notes.push(`sparse: ${formatSize(s.restoredAllocatedBytes)} allocated`);
  if (s.step === 'dump (2 MiB file)' && results.baseline.dumpIdentical === true) notes.push('identical to the original');
  if (s.step === 'find -printf (whole tree)' && results.baseline.findEntries !== undefined) notes.push(`${results.baseline.findEntries} entries`);
  const warm = results.warm[s.step];
  if (warm !== undefined && warm.length > 0) {
    notes.push(`warm: median of ${warm.length} runs (${Math.min(...warm).toFixed(2)}–${Math.max(...warm).toFixed(2)} s)`);
  } else if (s.status === 'ok' && !s.cacheDropped) {
    notes.push('warm cache');
  }
  if (s.busyMachine === true) notes.push(`busy machine (others used ${((s.othersCpuShare ?? 0) * 100).toFixed(0)} % of the CPUs)`);
  return notes.join('; ');
}

function stepsTable(results: FilesResults): string {
  const rows = [
    '| tool | step | wall | CPU user+sys s | peak RSS MiB | read from repository MiB | repository MiB | note |',
    '|---|---|---:|---:|---:|---:|---:|---|',
  ];
  for (const s of results.steps) {
    const cpu = s.cpuSeconds === undefined ? '–' : s.cpuSeconds.toFixed(2);
    rows.push(`| ${s.label} | ${s.step} | ${seconds(s.wallSeconds)} | ${cpu} | ${mib(s.peakRssBytes)} | ${mib(stepBytesRead(results, s))} | `
      + `${mib(s.repoBytes)} | ${cell(stepNote(results, s).slice(0, 300))} |`);
  }
  return rows.join('\n');
}

function probeTable(report: ProbeReport): string {
  const rows = [
    `In-process \`${report.mode}\` (Node start-up and module loading before the first phase: ${report.startupMs.toFixed(0)} ms):`,
    '',
    '| phase | ms | read from repository | reads |',
    '|---|---:|---:|---:|',
  ];
  for (const p of report.phases) rows.push(`| ${p.phase} | ${p.ms.toFixed(0)} | ${formatSize(p.bytesRead)} | ${p.reads} |`);
  const prefixes = Object.entries(report.readsByPrefix).map(([k, v]) => `${k}/ ${formatSize(v.bytes)} in ${v.reads}`).join(', ');
  rows.push('', `Repository reads by kind: ${prefixes}; engine stats: ${Object.entries(report.stats).map(([k, v]) => `${k} ${v}`).join(', ')}.`);
  return rows.join('\n');
}

function times(ratio: number): string {
  return `${ratio >= 10 ? ratio.toFixed(0) : ratio.toFixed(1)}x`;
}

/** Sums of the two ways to the same result: Tresor straight from the snapshot vs restore + extract. */
function comparisons(results: FilesResults): string[] {
  const wall = (name: string) => step(results, name)?.status === 'ok' ? step(results, name)?.wallSeconds : undefined;
  const lines: string[] = [];
  const restore = wall('restore image (whole disk)');
  const cat = wall('files cat (2 MiB file)');
  const dump = wall('dump (2 MiB file)');
  if (cat !== undefined && restore !== undefined && dump !== undefined) {
    lines.push(`one file: Tresor ${seconds(cat)} vs restore + debugfs dump ${seconds(restore + dump)} (${times((restore + dump) / cat)}), `
      + `which also needs ${formatSize(results.disk?.size ?? 0)} of free space (sparse: ${formatSize(results.baseline.restoredAllocatedBytes ?? 0)} written)`);
  }
  const ls = wall('files ls -R (whole tree)');
  const mount = wall('loop mount (read-only)');
  const find = wall('find -printf (whole tree)');
  if (ls !== undefined && restore !== undefined && mount !== undefined && find !== undefined) {
    lines.push(`listing: Tresor ${seconds(ls)} vs restore + mount + find ${seconds(restore + mount + find)} (${times((restore + mount + find) / ls)}); `
      + `find alone on the restored disk ${seconds(find)}`);
  }
  return lines;
}

function keyValueTable(title: string, entries: Record<string, string>): string {
  const lines = [`| ${title} | |`, '|---|---|'];
  for (const [k, v] of Object.entries(entries)) lines.push(`| ${k} | ${cell(v)} |`);
  return lines.join('\n');
}

const PROCEDURE = `\`npm run bench -- --files\` (bench/files.ts) builds a directory tree from a seed — 100 000 small
files (1000 directories × 100 files of 0–8 KiB, three in four log text, one in four random bytes)
and one 2 MiB random file nine directories deep —, writes it with \`mke2fs -t ext4 -d TREE -E offset=…\`
into the only partition (GPT) of a 20 GiB sparse raw disk, and backs the disk up with \`tresor backup
image\` into an encrypted repository. Then, each step with a cold page cache: \`tresor files cat
SNAP:disk0:1:/…/payload-2MiB.bin -o OUT --json\` (compared with the original) and \`tresor files ls
SNAP:disk0:1 / -R --json\` (every entry counted); \`tresor --version\` for Node's start-up (the
compile cache of bin/tresor.js lives in the scratch directory, filled by the run's first command);
warm repetitions (median of ${WARM_RUNS}) of the two quick commands; the same cat and ls in-process
(\`node bench/files.ts probe\`), timed by phase and counting every byte read from the repository.
The baseline is what the issue compares with: \`tresor restore image\` of the whole disk, then
\`debugfs -R "dump -p PATH OUT" 'disk.raw?offset=1048576'\` for the file, and for the listing a
read-only loop mount of the restored partition and \`find -printf\` of every entry's type, mode,
links, owner, size and mtime (what \`files ls -R --json\` prints). restic is not compared: it keeps a
raw disk image as one opaque file and cannot read files inside it.`;

export function renderFilesFigures(results: FilesResults): string {
  const parts: string[] = [];
  parts.push(PROCEDURE);
  parts.push(`Run of ${results.startedAt} (${seconds(results.totalSeconds)} in all), mode: files.`);
  const t = results.tree;
  const d = results.disk;
  if (t !== undefined) {
    const reference = t.dirs === REFERENCE.dirs && t.filesPerDir === REFERENCE.filesPerDir && d?.size === REFERENCE.diskSize
      ? '' : ' **Not the reference size (1000 × 100 files, 20 GiB): a smoke run.**';
    parts.push(`Tree (seed ${t.seed}): ${t.smallFiles} small files in ${t.dirs} directories of ${t.filesPerDir} (0–8 KiB each, `
      + `${t.textFiles} log text, ${t.randomFiles} random; ${formatSize(t.smallFileBytes)} in all), ${t.directories} directories, `
      + `and \`${t.payloadPath}\` (2 MiB random); built in ${seconds(t.seconds)}.`
      + (d !== undefined ? ` Disk: ${formatSize(d.size)} raw, GPT, one ext4 partition at ${d.partitionOffset} filling it (${d.fsBlocks} blocks of 4 KiB), `
        + `built by \`mke2fs -t ext4 -d TREE -E offset=…\` in ${seconds(d.mkfsSeconds)}; ${formatSize(d.allocatedBytes)} allocated `
        + `(${((d.allocatedBytes / d.size) * 100).toFixed(1)} % of the disk).` : '')
      + reference);
  }
  parts.push(keyValueTable('machine', results.machine));
  parts.push(keyValueTable('tool', results.versions));
  parts.push(`Measurement:\n\n${results.measurement.map((m) => `- ${m}`).join('\n')}`);
  parts.push(stepsTable(results));
  const compared = comparisons(results);
  if (compared.length > 0) parts.push(`Comparisons:\n\n${compared.map((c) => `- ${c}`).join('\n')}`);
  if (results.targets.length > 0) parts.push(`Issue-4 targets:\n\n${results.targets.map((x) => `- **${x.status}** ${x.target}: ${x.detail}`).join('\n')}`);
  for (const report of [results.probes.cat, results.probes.ls]) if (report !== undefined) parts.push(probeTable(report));
  if (results.baseline.notes.length > 0) parts.push(`Notes:\n\n${results.baseline.notes.map((n) => `- ${n}`).join('\n')}`);
  return parts.join('\n\n');
}

export function writeFilesDoc(path: string, results: FilesResults): void {
  const document = existsSync(path) ? readFileSync(path, 'utf8') : '# Performance\n';
  writeFileSync(path, replaceSection(document, FILES_MARKERS, FILES_HEADING, renderFilesFigures(results)));
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------


function toolVersions(): Record<string, string> {
  const debian = (pkg: string) => capture(['dpkg-query', '-W', '-f', '${Version}', pkg]) || 'not installed';
  return {
    Tresor: tresorVersion(REPO_ROOT),
    'Node.js (Tresor)': capture([tresorNode(REPO_ROOT), '--version']),
    e2fsprogs: `${capture(['mke2fs', '-V']).split('\n')[0] ?? ''} (Debian e2fsprogs ${debian('e2fsprogs')})`,
    gdisk: `Debian gdisk ${debian('gdisk')}`,
    'mount, find': `Debian mount ${debian('mount')}, findutils ${debian('findutils')}`,
    'GNU time': existsSync('/usr/bin/time') ? `/usr/bin/time (Debian time ${debian('time')})` : 'not installed',
  };
}

function basicIsoTime(date: Date): string {
  return date.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

function reportOnly(file: string, toDoc: boolean): number {
  const results = JSON.parse(readFileSync(file, 'utf8')) as FilesResults;
  results.warm ??= {};
  if (results.mode !== 'files') throw new UsageError(`${file} holds a ${String(results.mode)} run, not a --files run`, 'give a results-*-files.json file');
  console.log(`## File-level restore benchmark results\n\n${renderFilesFigures(results)}\n`);
  if (toDoc) writeFilesDoc(join(REPO_ROOT, 'docs', 'performance.md'), results);
  return 0;
}

/** `npm run bench -- --files [options]`: the whole run; the exit code is 1 when any step failed. */
export async function runFilesBenchmark(argv: string[]): Promise<number> {
  const options = parseFilesOptions(argv);
  if (options.report !== undefined) return reportOnly(options.report, options.writeDoc);
  const startedAt = new Date();
  const scratch = join(options.dir, `files-${basicIsoTime(startedAt)}`);
  mkdirSync(scratch, { recursive: true });
  const mountPoint = join(scratch, 'mnt');
  const cleanUp = () => {
    if (existsSync(mountPoint)) capture(['umount', mountPoint]);
    if (!options.keep) rmSync(scratch, { recursive: true, force: true });
  };
  const onInterrupt = () => {
    killActiveCommand();
    cleanUp();
    process.stderr.write(`\ninterrupted${options.keep ? `; scratch kept in ${scratch}` : ''}\n`);
    process.exit(130);
  };
  process.on('SIGINT', onInterrupt);
  process.on('SIGTERM', onInterrupt);

  const useGnuTime = hasGnuTime();
  const cache = createCacheDropper();
  const runner = new StepRunner(scratch, cache, useGnuTime, options.stepTimeoutMs);
  const results: FilesResults = {
    mode: 'files', startedAt: startedAt.toISOString(), finishedAt: '', totalSeconds: 0, scratch,
    options: { ...options }, machine: machineFacts(scratch), versions: toolVersions(),
    measurement: [
      'wall time: spawn to exit of each command (Node start-up, repository open with scrypt, and the work)',
      useGnuTime
        ? 'CPU time (user+sys) and peak RSS: GNU time (/usr/bin/time, rusage from wait4); peak RSS is the largest single process of the command'
        : 'CPU time and peak RSS NOT measured: /usr/bin/time (Debian package `time`) is missing',
      cache.note,
      'read from repository: for `files cat`, the CLI\'s own `stats.bytesFetched` (index pieces and chunks of the disk); for the probes, every byte '
        + 'read from the repository directory by the same operation in-process (key slots, blob index, manifest, lock, index pieces, chunks)',
      '`files ls -R --json` prints no statistics: its bytes read are the `probe ls` figure (same engine functions: SnapshotBrowser, listPath)',
      'baseline: the whole disk restored with `tresor restore image` (sparse raw), then debugfs on it with the `?offset=` I/O option, '
        + 'and a read-only loop mount for `find -printf` (type, mode, links, owner, size, mtime of every entry: what `files ls -R --json` gives)',
      `contention: CPU time used by all processes during a step (/proc/stat) minus the step's own; steps where others used more than ${BUSY_SHARE * 100} % of the CPUs are marked "busy machine"`,
    ],
    probes: {}, warm: {}, baseline: { notes: [] }, steps: runner.steps, targets: [], failures: 0,
  };
  if (!useGnuTime) runner.progress('WARNING: /usr/bin/time missing (apt-get install time): CPU time and peak RSS will not be measured');
  if (!cache.works) runner.progress(`WARNING: ${cache.note}`);
  const ctx: Context = { runner, scratch, options, results, repoDir: join(scratch, 'repo'), useGnuTime };

  try {
    runner.progress(`scratch directory ${scratch}`);
    const disk = await buildPhase(ctx);
    const tree = results.tree;
    const snapshot = disk === undefined ? undefined : await backupPhase(ctx, disk);
    if (disk !== undefined && tree !== undefined && snapshot !== undefined) {
      await tresorPhase(ctx, snapshot, tree);
      await baselinePhase(ctx, snapshot, disk, tree);
    }
  } catch (err) {
    runner.progress(`run aborted: ${describeError(err)}`);
    results.baseline.notes.push(`run aborted: ${describeError(err)}`);
    results.failures++;
  } finally {
    process.off('SIGINT', onInterrupt);
    process.off('SIGTERM', onInterrupt);
  }

  const finishedAt = new Date();
  results.finishedAt = finishedAt.toISOString();
  results.totalSeconds = (finishedAt.getTime() - startedAt.getTime()) / 1000;
  results.failures += runner.steps.filter((s) => s.status !== 'ok').length;
  results.targets = checkFilesTargets(results);

  const outDir = join(REPO_ROOT, 'bench', 'out');
  mkdirSync(outDir, { recursive: true });
  const resultsFile = join(outDir, `results-${basicIsoTime(startedAt)}-files.json`);
  writeFileSync(resultsFile, `${JSON.stringify(results, null, 2)}\n`);
  console.log(`## File-level restore benchmark results\n\n${renderFilesFigures(results)}\n`);
  runner.progress(`results written to ${resultsFile}`);
  if (options.writeDoc) {
    const doc = join(REPO_ROOT, 'docs', 'performance.md');
    writeFilesDoc(doc, results);
    runner.progress(`figures written to ${doc}`);
  }
  cleanUp();
  if (options.keep) runner.progress(`scratch directory kept: ${scratch}`);
  return results.failures > 0 ? 1 : 0;
}

async function probeMain(args: string[]): Promise<void> {
  const [mode, repoDir, ref] = args;
  if ((mode !== 'cat' && mode !== 'ls') || repoDir === undefined || ref === undefined) {
    throw new UsageError('usage: node bench/files.ts probe cat|ls REPO REF (REF = SNAP:DISK:PART, with :/PATH for cat)');
  }
  const passphrase = process.env.TRESOR_PASSPHRASE;
  if (!passphrase) throw new UsageError('set TRESOR_PASSPHRASE');
  console.log(JSON.stringify(await probe(mode, repoDir, ref, passphrase), null, 2));
}

if (import.meta.main) {
  const args = process.argv.slice(2);
  try {
    process.exitCode = args[0] === 'probe' ? (await probeMain(args.slice(1)), 0) : await runFilesBenchmark(args);
  } catch (err) {
    console.error(describeError(err));
    if (err instanceof UsageError && err.hint !== undefined) console.error(err.hint);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  }
}
