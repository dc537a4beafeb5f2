/**
 * `npm run bench -- --vm`: the issue-3 benchmark, backups of a running VM side by side with
 * virtnbdbackup in one run.
 *
 * The corpus (bench/corpus.ts) becomes a qcow2 v3 image (`qemu-img convert`, holes kept). Each
 * tool run gets its own libvirt domain on a fresh copy of that image, so neither tool's
 * checkpoints (Tresor's `tresor-*`, virtnbdbackup's `virtnbdbackup.N`) disturb the other:
 *
 *   1. define and start the domain: TCG, qemu64, 256 MiB, no OS (SeaBIOS finds nothing to boot
 *      and waits: `<bios rebootTimeout='-1'/>`), the image as a virtio-scsi disk `sda`;
 *   2. (Tresor) init an encrypted repository; full backup of the running VM;
 *   3. the 2 % rewrite of corpus.ts written THROUGH the running VM: every extent with HMP
 *      `qemu-io -d <disk> "write -s FILE OFF LEN"` (LAB.md §3), so QEMU's dirty bitmaps see it
 *      as guest writes; then, with the VM paused (which flushes QEMU's caches to the image), the
 *      live disk is compared with the raw corpus rewritten by rewriteCorpus: every tool sees the
 *      identical change;
 *   4. incremental backup; the VM is paused;
 *   5. restore of the incremental, compared with the paused live disk (`qemu-img compare -U`).
 *
 * Tool runs: Tresor (`backup vm --consistency off`), virtnbdbackup (`-l full`, `-l inc`,
 * uncompressed), virtnbdbackup with `-z` (lz4). virtnbdrestore restores both virtnbdbackup chains.
 * Every step also counts the CPU time of the domain's QEMU process (/proc/PID/stat): the NBD
 * export and copy-before-write work happen there, on behalf of the backup.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Virsh } from '../src/hypervisor/virsh.ts';
import { TresorError, describeError } from '../src/util/errors.ts';
import { defineTestDomain, destroyAndUndefine, qemuIoWrite } from '../test/lab/guest.ts';
import { ensureLibvirtd, SYSTEM_URI } from '../test/lab/libvirtd.ts';
import { formatSize, rewriteContents } from './corpus.ts';
import { allocatedBytes, capture, lastLines } from './measure.ts';
import type { CommandSpec, Measurement } from './measure.ts';
import { PASSPHRASE, baseEnv, parseJsonDocument, requireExecutable, tresorNode } from './peers.ts';
import type { StepRecord, VmFacts, VmRunFacts } from './report.ts';
import { VM_TOOLS } from './report.ts';
import { processCpuSeconds } from './steps.ts';
import type { HelperMatch, StepRunner } from './steps.ts';
import { processAlive } from '../src/util/process.ts';

/** The corpus disk's target in every bench domain (virtio-scsi, so HMP qemu-io can write to it). */
const DISK_TARGET = 'sda';
const DOMAIN_PREFIX = 'tresor-bench-';
/** How long the idle domain's QEMU CPU is sampled before the first step. */
const IDLE_SAMPLE_MS = 3000;
export const QCOW2_OPTIONS = 'compat=1.1,cluster_size=65536';

export interface LiveVmSetting {
  runner: StepRunner;
  scratch: string;
  /** the raw corpus, already rewritten by rewriteCorpus: what every live disk must equal after the rewrite */
  rewrittenCorpus: string;
  /** the qcow2 image of the corpus before the rewrite (copied for every tool run) */
  image: string;
  imageFacts: VmFacts['image'];
  size: number;
  /** allocated bytes of the corpus before and after the rewrite (for MiB/s of the allocated part) */
  allocatedBefore: number;
  allocatedAfter: number;
  fraction: number;
  seed: number;
  repoRoot: string;
  tresorCli: string;
  keep: boolean;
  /** which tool runs (names of VM_TOOLS) */
  tools: Set<string>;
  /**
   * Incrementals per tool, each after a rewrite of its own (the first: the reference rewrite, `seed`;
   * the others: seeds never used for the corpus). One incremental is too noisy on a shared machine.
   */
  incrementals: number;
}

/** The step name of incremental `n` (1-based): the first keeps the plain name the targets use. */
export function incrementalStep(n: number): string {
  return n === 1 ? 'incremental backup' : `incremental backup ${n}`;
}

/** Seed of the rewrite before incremental `n` (> 1): far from any corpus or reference seed. */
function extraRewriteSeed(seed: number, n: number): number {
  return seed + 1000 * n;
}

type Level = 'full' | 'incremental';

/** One tool as the live-VM mode drives it. */
interface VmTool {
  readonly name: string;
  readonly label: string;
  /** backup destination, sized before and after every step */
  readonly repoDir: string;
  readonly configuration: string;
  preflight(): void;
  init(): CommandSpec | undefined;
  backup(level: Level, domain: string): CommandSpec;
  /** checks and figures from the backup's output; throws when the backup is not what was asked */
  afterBackup(level: Level, measurement: Measurement): Partial<StepRecord>;
  restore(targetDir: string): CommandSpec;
  /** daemons the restore leaves running that still work for it after it exits */
  restoreHelpers(): HelperMatch | undefined;
  /** the restored disk image below targetDir and its format */
  restoredImage(targetDir: string): { path: string; format: string } | undefined;
}

class BenchVmError extends TresorError {}

// ---------------------------------------------------------------------------------------------
// The image and the rewrite
// ---------------------------------------------------------------------------------------------

/**
 * Converts the raw corpus to a qcow2 v3 image (persistent dirty bitmaps need v3; 64 KiB clusters
 * are the bitmap granularity). qemu-img skips all-zero ranges, so the corpus's holes stay holes.
 */
export function convertToQcow2(raw: string, image: string): VmFacts['image'] {
  assertNoBootSignature(raw);
  const started = performance.now();
  const result = spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', QCOW2_OPTIONS, raw, image], { encoding: 'utf8' });
  if (result.status !== 0) {
    throw new BenchVmError('bench-convert-failed', `qemu-img convert of ${raw} failed: ${result.stderr.trim() || result.error?.message}`, {
      hint: 'is qemu-utils installed and is there space in the scratch directory?',
    });
  }
  chmodSync(image, 0o644);
  return {
    fileBytes: statSync(image).size,
    allocatedBytes: allocatedBytes(image),
    convertSeconds: (performance.now() - started) / 1000,
    options: QCOW2_OPTIONS,
  };
}

/**
 * The bench domains have no OS: SeaBIOS reads the disk's first sector and, finding no boot
 * signature, waits forever. A corpus whose first sector happened to end in 55 AA would make it
 * execute random bytes, which might write anywhere: refuse such a corpus (try another seed).
 */
function assertNoBootSignature(raw: string): void {
  const sector = Buffer.alloc(512);
  const fd = openSync(raw, 'r');
  try {
    readSync(fd, sector, 0, 512, 0);
  } finally {
    closeSync(fd);
  }
  if (sector[510] === 0x55 && sector[511] === 0xaa) {
    throw new BenchVmError('bench-bootable-corpus', `the corpus ${raw} has a boot signature in its first sector: SeaBIOS would run it`, {
      hint: 'use another --seed',
    });
  }
}

interface RewriteWrite {
  offset: number;
  length: number;
  file: string;
}

/** Writes every extent's new bytes to its own file (readable by the qemu user) for qemu-io write -s. */
function renderRewrite(dir: string, size: number, fraction: number, seed: number): { writes: RewriteWrite[]; facts: VmFacts['rewriteFiles'] } {
  const started = performance.now();
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  chmodSync(dir, 0o755);
  const writes: RewriteWrite[] = [];
  let bytes = 0;
  for (const { extent, bytes: content } of rewriteContents(size, { fraction, seed })) {
    const file = join(dir, `extent-${String(writes.length).padStart(5, '0')}.bin`);
    writeFileSync(file, content, { mode: 0o644 });
    writes.push({ offset: extent.offset, length: extent.length, file });
    bytes += extent.length;
  }
  return { writes, facts: { count: writes.length, bytes, renderSeconds: (performance.now() - started) / 1000 } };
}

// ---------------------------------------------------------------------------------------------
// Domains
// ---------------------------------------------------------------------------------------------

/** Domains this process defined and has not removed yet (for cleanup on interrupt). */
const liveDomains = new Set<string>();

function domainName(tool: string): string {
  return `${DOMAIN_PREFIX}${process.pid}-${tool}`;
}

export const DOMAIN_SETUP = "libvirt domain type='qemu' (TCG), cpu qemu64, 1 vCPU, 256 MiB, q35, no OS "
  + "(SeaBIOS, <bios rebootTimeout='-1'/>), the corpus qcow2 as virtio-scsi disk sda, no guest agent; "
  + 'one domain per tool run on a fresh copy of the image';

async function defineDomain(virsh: Virsh, name: string, image: string, consoleLog: string): Promise<void> {
  liveDomains.add(name);
  await defineTestDomain(virsh, {
    name,
    disks: [{ path: image, bus: 'scsi', target: DISK_TARGET, format: 'qcow2' }],
    guest: undefined,
    consoleLog,
    agent: false,
    agentChannel: false,
    kvm: false,
  });
}

/** The domain's QEMU process id, from the pid file libvirt writes when it starts the domain. */
async function qemuPidOf(name: string): Promise<number> {
  const file = `/run/libvirt/qemu/${name}.pid`;
  for (let attempt = 0; attempt < 50; attempt++) {
    const pid = Number(readFileSafe(file).trim());
    if (Number.isInteger(pid) && pid > 0 && existsSync(`/proc/${pid}`)) return pid;
    await sleep(100);
  }
  throw new BenchVmError('bench-no-qemu-pid', `cannot find the QEMU process of ${name} (${file})`, { hint: 'is the domain running?' });
}

function readFileSafe(path: string): string {
  try { return readFileSync(path, 'utf8'); } catch { return ''; }
}

/** Removes domains of earlier bench runs whose process is gone (a killed run leaves them). */
async function sweepStaleDomains(virsh: Virsh): Promise<void> {
  const names = (await virsh.run(['list', '--all', '--name'], { operation: 'list' })).split('\n').map((n) => n.trim());
  for (const name of names) {
    const match = new RegExp(`^${DOMAIN_PREFIX}(\\d+)-`).exec(name);
    if (match === null || Number(match[1]) === process.pid || processAlive(Number(match[1]))) continue;
    await destroyAndUndefine(virsh, name).catch(() => undefined);
  }
}


/**
 * Synchronous last-resort cleanup (Ctrl-C): stops this run's domains, and undefines them (with
 * their checkpoint metadata) unless they are to be kept.
 */
export function removeDomainsNow(keep: boolean): void {
  for (const name of liveDomains) {
    spawnSync('virsh', ['-c', SYSTEM_URI, 'destroy', name], { stdio: 'ignore', timeout: 30_000 });
    if (!keep) spawnSync('virsh', ['-c', SYSTEM_URI, 'undefine', name, '--checkpoints-metadata', '--snapshots-metadata'], { stdio: 'ignore', timeout: 30_000 });
  }
  liveDomains.clear();
}

/**
 * `qemu-img compare -U`: true when both images have the same content (exit 0), false when they
 * differ (1); an error otherwise. -U reads an image a running QEMU holds locked.
 */
function imagesIdentical(a: { path: string; format: string }, b: { path: string; format: string }): { identical: boolean; output: string } {
  const result = spawnSync('qemu-img', ['compare', '-U', '-f', a.format, '-F', b.format, a.path, b.path], { encoding: 'utf8' });
  const output = `${result.stdout}${result.stderr}`.trim();
  if (result.status === 0) return { identical: true, output };
  if (result.status === 1) return { identical: false, output };
  throw new BenchVmError('bench-compare-failed', `qemu-img compare ${a.path} ${b.path} failed: ${output || result.error?.message}`, {
    hint: 'is qemu-utils installed?',
  });
}

function imageFormat(path: string): string {
  const info = parseJsonDocument(capture(['qemu-img', 'info', '-U', '--output=json', path])) as { format?: string } | undefined;
  return info?.format ?? 'raw';
}

// ---------------------------------------------------------------------------------------------
// The tools
// ---------------------------------------------------------------------------------------------

interface ToolSetting {
  scratch: string;
  repoRoot: string;
  tresorCli: string;
}

/** A directory QEMU (running as libvirt-qemu) can create sockets and scratch files in. */
function sharedDir(path: string): string {
  mkdirSync(path, { recursive: true });
  chmodSync(path, 0o1777);
  return path;
}

interface TresorBackupDocument {
  snapshot?: {
    name?: string;
    stats?: { bytesRead?: number };
    disks?: Array<{ name?: string; bytesRead?: number; base?: { snapshot?: string; reason?: string } }>;
  };
}

class TresorVmTool implements VmTool {
  readonly name = VM_TOOLS.tresor;
  readonly label = 'Tresor';
  readonly repoDir: string;
  readonly configuration = 'repo init --encryption aes-256-gcm (default chunk size); backup vm DOMAIN --connect qemu:///system '
    + '--scratch-dir DIR --consistency off --json (first with --full); restore image SNAPSHOT OUT --disk sda (sparse raw)';
  private readonly setting: ToolSetting;
  private readonly scratchDir: string;
  private readonly snapshots = new Map<Level, string>();

  constructor(setting: ToolSetting) {
    this.setting = setting;
    this.repoDir = join(setting.scratch, 'repos', 'tresor-vm');
    this.scratchDir = join(setting.scratch, 'vm', 'tresor-scratch');
  }

  preflight(): void {
    if (!existsSync(this.setting.tresorCli)) {
      throw new BenchVmError('bench-tool-missing', `the Tresor CLI ${this.setting.tresorCli} does not exist`, { hint: 'pass --tresor-cli' });
    }
  }

  private command(args: string[]): CommandSpec {
    const cli = this.setting.tresorCli;
    const viaNode = /\.[cm]?[jt]s$/.test(cli);
    return {
      argv: viaNode ? [tresorNode(this.setting.repoRoot), cli, ...args] : [cli, ...args],
      cwd: this.setting.repoRoot,
      env: { ...baseEnv(), TRESOR_REPO: this.repoDir, TRESOR_PASSPHRASE: PASSPHRASE },
    };
  }

  init(): CommandSpec {
    return this.command(['repo', 'init', '--repo', this.repoDir, '--encryption', 'aes-256-gcm']);
  }

  backup(level: Level, domain: string): CommandSpec {
    mkdirSync(this.scratchDir, { recursive: true });
    return this.command(['backup', 'vm', domain, '--connect', SYSTEM_URI, '--scratch-dir', this.scratchDir,
      '--consistency', 'off', '--json', ...(level === 'full' ? ['--full'] : [])]);
  }

  afterBackup(level: Level, measurement: Measurement): Partial<StepRecord> {
    const document = parseJsonDocument(measurement.stdout) as TresorBackupDocument | undefined;
    const snapshot = document?.snapshot;
    const name = snapshot?.name;
    const disk = snapshot?.disks?.find((d) => d.name === DISK_TARGET);
    if (name === undefined || disk === undefined) {
      throw new BenchVmError('bench-no-snapshot', `tresor backup vm --json named no snapshot with disk ${DISK_TARGET}`, {
        hint: 'see the step log', context: { stdout: measurement.stdout.slice(0, 500) },
      });
    }
    // Each incremental must build on the backup just before it (the full one, or the last incremental).
    const previous = this.snapshots.get('incremental') ?? this.snapshots.get('full');
    this.snapshots.set(level, name);
    const base = disk.base?.snapshot;
    if (level === 'incremental' && (base === undefined || base === '' || base !== previous)) {
      throw new BenchVmError('bench-not-incremental', `the backup ${name} is not incremental from ${previous ?? 'the full backup'}`
        + (disk.base?.reason ? `: ${disk.base.reason}` : ''), { hint: 'see the job log in the step output' });
    }
    return { snapshot: name, baseSnapshot: base, bytesRead: disk.bytesRead ?? snapshot?.stats?.bytesRead };
  }

  restore(targetDir: string): CommandSpec {
    const snapshot = this.snapshots.get('incremental');
    if (snapshot === undefined) throw new BenchVmError('bench-no-snapshot', 'no incremental Tresor snapshot to restore', { hint: 'the incremental backup failed' });
    return this.command(['restore', 'image', snapshot, join(targetDir, 'restored.raw'), '--disk', DISK_TARGET]);
  }

  restoreHelpers(): undefined {
    return undefined;
  }

  restoredImage(targetDir: string): { path: string; format: string } | undefined {
    const path = join(targetDir, 'restored.raw');
    return existsSync(path) ? { path, format: 'raw' } : undefined;
  }
}

class VirtnbdbackupTool implements VmTool {
  readonly name: string;
  readonly label: string;
  readonly repoDir: string;
  readonly configuration: string;
  private readonly setting: ToolSetting;
  private readonly compress: boolean;
  private readonly workDir: string;

  constructor(setting: ToolSetting, compress: boolean) {
    this.setting = setting;
    this.compress = compress;
    this.name = compress ? VM_TOOLS.virtnbdLz4 : VM_TOOLS.virtnbd;
    this.label = compress ? 'virtnbdbackup -z (lz4)' : 'virtnbdbackup';
    this.repoDir = join(setting.scratch, 'repos', this.name);
    this.workDir = join(setting.scratch, 'vm', `${this.name}-work`);
    this.configuration = `virtnbdbackup -d DOMAIN -l full|inc -o DIR -S SCRATCH -f SOCKET -n${compress ? ' -z (lz4, its default level)' : ' (stream format, uncompressed)'}; `
      + 'virtnbdrestore -i DIR -o OUTDIR -n (the whole chain into a qcow2); no guest agent, so no freeze (as Tresor with --consistency off)';
  }

  preflight(): void {
    requireExecutable('virtnbdbackup', 'apt-get install virtnbdbackup');
    requireExecutable('virtnbdrestore', 'apt-get install virtnbdbackup');
  }

  init(): undefined {
    return undefined;
  }

  backup(level: Level, domain: string): CommandSpec {
    const work = sharedDir(this.workDir);
    const argv = ['virtnbdbackup', '-d', domain, '-U', SYSTEM_URI, '-l', level === 'full' ? 'full' : 'inc', '-o', this.repoDir,
      '-S', work, '-f', join(work, 'backup.sock'), '-n'];
    if (this.compress) argv.push('-z');
    return { argv, cwd: this.setting.scratch, env: baseEnv() };
  }

  afterBackup(_level: Level, measurement: Measurement): Partial<StepRecord> {
    // virtnbdbackup logs "<n> bytes of data extents to backup" per disk.
    const match = /(\d+) bytes of data extents to backup/.exec(`${measurement.stderr}\n${measurement.stdout}`);
    return match === null ? {} : { bytesRead: Number(match[1]) };
  }

  restore(targetDir: string): CommandSpec {
    const work = sharedDir(this.workDir);
    return {
      argv: ['virtnbdrestore', '-U', SYSTEM_URI, '-i', this.repoDir, '-o', targetDir, '-n', '-f', join(work, 'restore.sock'),
        '-L', join(work, 'virtnbdrestore.log')],
      cwd: this.setting.scratch,
      env: baseEnv(),
    };
  }

  /**
   * virtnbdrestore writes through `qemu-nbd --fork` and exits after disconnecting, while the
   * daemon still flushes the qcow2 image and exits only then: the restore is done when it is gone.
   */
  restoreHelpers(): HelperMatch {
    return { executable: 'qemu-nbd', argument: join(this.workDir, 'restore.sock') };
  }

  restoredImage(targetDir: string): { path: string; format: string } | undefined {
    if (!existsSync(targetDir)) return undefined;
    const file = readdirSync(targetDir).find((name) => !/\.(xml|log|json)$/.test(name) && statSync(join(targetDir, name)).isFile());
    if (file === undefined) return undefined;
    const path = join(targetDir, file);
    return { path, format: imageFormat(path) };
  }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

export function vmToolConfigurations(setting: ToolSetting, tools: Set<string>): Record<string, string> {
  return Object.fromEntries(createTools(setting, tools).map((t) => [t.label, t.configuration]));
}

function createTools(setting: ToolSetting, tools: Set<string>): VmTool[] {
  return [
    ...(tools.has(VM_TOOLS.tresor) ? [new TresorVmTool(setting)] : []),
    ...(tools.has(VM_TOOLS.virtnbd) ? [new VirtnbdbackupTool(setting, false)] : []),
    ...(tools.has(VM_TOOLS.virtnbdLz4) ? [new VirtnbdbackupTool(setting, true)] : []),
  ];
}

/** Runs every tool's live-VM steps, one domain after the other; never throws for a tool's failure. */
export async function runLiveVm(setting: LiveVmSetting): Promise<VmFacts> {
  const { runner } = setting;
  const vmDir = join(setting.scratch, 'vm');
  mkdirSync(vmDir, { recursive: true });
  chmodSync(vmDir, 0o755);
  await ensureLibvirtd();
  const virsh = new Virsh(SYSTEM_URI);
  await sweepStaleDomains(virsh);

  const rendered = renderRewrite(join(vmDir, 'rewrite'), setting.size, setting.fraction, setting.seed);
  runner.progress(`rewrite rendered: ${rendered.facts.count} extent files, ${formatSize(rendered.facts.bytes)}, in ${rendered.facts.renderSeconds.toFixed(1)} s`);
  // Further rewrites for the further incrementals (the same for every tool).
  const extra: RewriteWrite[][] = [];
  for (let n = 2; n <= setting.incrementals; n++) {
    extra.push(renderRewrite(join(vmDir, `rewrite-${n}`), setting.size, setting.fraction, extraRewriteSeed(setting.seed, n)).writes);
  }
  const facts: VmFacts = { image: setting.imageFacts, domainSetup: DOMAIN_SETUP, rewriteFiles: rendered.facts, runs: [] };
  const toolSetting: ToolSetting = { scratch: setting.scratch, repoRoot: setting.repoRoot, tresorCli: setting.tresorCli };
  const runs = createTools(toolSetting, setting.tools).map((tool) => new ToolRun(setting, virsh, tool));
  facts.runs.push(...runs.map((r) => r.facts));
  // The tools take turns step by step (each round starting with the next tool), all domains
  // running: a shared machine's speed drifts by tens of percent within minutes, and a tool that
  // ran all its steps in a slow phase would be compared unfairly with one that ran in a fast one.
  const rounds: Array<(r: ToolRun) => Promise<void>> = [
    (r) => r.start(),
    (r) => r.fullBackup(),
    (r) => r.rewrite(rendered.writes, true),
    (r) => r.incremental(1),
    ...extra.flatMap((writes, k) => [(r: ToolRun) => r.rewrite(writes, false), (r: ToolRun) => r.incremental(k + 2)]),
    (r) => r.restore(),
  ];
  try {
    for (const [n, step] of rounds.entries()) {
      for (let k = 0; k < runs.length; k++) {
        const r = runs[(n + k) % runs.length];
        if (r.stopped) continue;
        try {
          await step(r);
        } catch (err) {
          r.abort(describeError(err));
        }
      }
    }
  } finally {
    for (const r of runs) await r.finish();
    rmSync(join(vmDir, 'rewrite'), { recursive: true, force: true });
    for (let n = 2; n <= setting.incrementals; n++) rmSync(join(vmDir, `rewrite-${n}`), { recursive: true, force: true });
  }
  return facts;
}

const STEPS = ['full backup', 'incremental backup', 'restore'] as const;

/** One tool's run on its own domain, driven phase by phase (runLiveVm interleaves the tools). */
class ToolRun {
  readonly facts: VmRunFacts;
  /** No further step runs (a step failed, or the run was aborted). */
  stopped = false;
  readonly #setting: LiveVmSetting;
  readonly #virsh: Virsh;
  readonly #tool: VmTool;
  readonly #image: string;
  #qemuPid = 0;
  #defined = false;

  constructor(setting: LiveVmSetting, virsh: Virsh, tool: VmTool) {
    this.#setting = setting;
    this.#virsh = virsh;
    this.#tool = tool;
    this.#image = join(setting.scratch, 'vm', `${tool.name}.qcow2`);
    this.facts = { tool: tool.name, label: tool.label, domain: domainName(tool.name) };
  }

  get #live(): { path: string; format: string } {
    return { path: this.#image, format: 'qcow2' };
  }

  /** Records the steps from `from` on as skipped, and runs no more. */
  #skipRest(from: (typeof STEPS)[number], reason: string): void {
    for (const step of STEPS.slice(STEPS.indexOf(from))) this.#setting.runner.skip(this.#tool.name, this.#tool.label, step, reason);
    this.stopped = true;
  }

  /** A step threw: the steps it never reached count as failures of the run (and its exit status). */
  abort(error: string): void {
    const { runner } = this.#setting;
    this.facts.error = error;
    runner.progress(`${this.#tool.label}: run aborted: ${error}`);
    for (const step of STEPS) {
      if (!runner.steps.some((s) => s.tool === this.#tool.name && s.step === step)) runner.skip(this.#tool.name, this.#tool.label, step, `run aborted: ${error}`);
    }
    this.stopped = true;
  }

  async start(): Promise<void> {
    const { runner } = this.#setting;
    const tool = this.#tool;
    try {
      tool.preflight();
    } catch (err) {
      return this.#skipRest('full backup', describeError(err));
    }
    const vmDir = join(this.#setting.scratch, 'vm');
    const copy = spawnSync('cp', ['--sparse=always', this.#setting.image, this.#image], { encoding: 'utf8' });
    if (copy.status !== 0) throw new BenchVmError('bench-copy-failed', `cp ${this.#setting.image} ${this.#image}: ${copy.stderr.trim()}`);
    const consoleDir = sharedDir(join(vmDir, 'console'));
    this.#defined = true;
    await defineDomain(this.#virsh, this.facts.domain, this.#image, join(consoleDir, `${tool.name}.log`));
    await this.#virsh.run(['start', this.facts.domain], { operation: 'start', domain: this.facts.domain });
    this.#qemuPid = await qemuPidOf(this.facts.domain);
    this.facts.qemuIdleCpuShare = await idleCpuShare(this.#qemuPid);
    runner.progress(`${tool.label}: domain ${this.facts.domain} running (qemu pid ${this.#qemuPid}, idle at ${(this.facts.qemuIdleCpuShare ?? 0) * 100 | 0} % of a core)`);
    const init = tool.init();
    if (init !== undefined) {
      mkdirSync(join(this.#setting.scratch, 'repos'), { recursive: true });
      const record = await runner.run({ tool: tool.name, label: tool.label, step: 'init', repoDir: tool.repoDir, command: () => init });
      if (record.status !== 'ok') this.#skipRest('full backup', `init failed: ${record.error ?? ''}`);
    }
  }

  async fullBackup(): Promise<void> {
    const tool = this.#tool;
    const full = await this.#setting.runner.run({
      tool: tool.name, label: tool.label, step: 'full backup', repoDir: tool.repoDir, qemuPid: this.#qemuPid,
      disk: { size: this.#setting.size, allocated: this.#setting.allocatedBefore },
      command: () => tool.backup('full', this.facts.domain),
      after: (m) => tool.afterBackup('full', m),
    });
    if (full.status !== 'ok') this.#skipRest('incremental backup', 'the full backup failed');
  }

  /** Writes a rewrite through the VM; the reference one (`check`) is compared with the rewritten corpus. */
  async rewrite(writes: RewriteWrite[], check: boolean): Promise<void> {
    const { runner } = this.#setting;
    const domain = this.facts.domain;
    const started = performance.now();
    for (const write of writes) await qemuIoWrite(this.#virsh, domain, DISK_TARGET, write);
    if (!check) return;
    this.facts.rewriteSeconds = (performance.now() - started) / 1000;
    // Pausing flushes QEMU's qcow2 caches into the image, so qemu-img reads what the guest sees.
    await this.#virsh.run(['suspend', domain], { operation: 'suspend', domain });
    const same = imagesIdentical(this.#live, { path: this.#setting.rewrittenCorpus, format: 'raw' });
    this.facts.rewriteIdentical = same.identical;
    await this.#virsh.run(['resume', domain], { operation: 'resume', domain });
    runner.progress(`${this.#tool.label}: ${writes.length} extents rewritten through the VM in ${this.facts.rewriteSeconds.toFixed(1)} s; `
      + `live disk ${same.identical ? 'equals' : 'DIFFERS FROM'} the rewritten corpus`);
    if (!same.identical) this.#skipRest('incremental backup', `the rewrite through the VM differs from the corpus rewrite: ${lastLines(same.output, 2)}`);
  }

  async incremental(n: number): Promise<void> {
    const tool = this.#tool;
    const record = await this.#setting.runner.run({
      tool: tool.name, label: tool.label, step: incrementalStep(n), repoDir: tool.repoDir, qemuPid: this.#qemuPid,
      disk: { size: this.#setting.size, allocated: this.#setting.allocatedAfter },
      command: () => tool.backup('incremental', this.facts.domain),
      after: (m) => tool.afterBackup('incremental', m),
    });
    if (record.status !== 'ok') this.#skipRest('restore', n === 1 ? 'the incremental backup failed' : `incremental ${n} failed`);
  }

  /** Restores the last incremental and compares it with the paused live disk. */
  async restore(): Promise<void> {
    const tool = this.#tool;
    const domain = this.facts.domain;
    await this.#virsh.run(['suspend', domain], { operation: 'suspend', domain });
    const target = join(this.#setting.scratch, 'restore', tool.name);
    rmSync(target, { recursive: true, force: true });
    mkdirSync(target, { recursive: true });
    await this.#setting.runner.run({
      tool: tool.name, label: tool.label, step: 'restore', disk: { size: this.#setting.size, allocated: this.#setting.allocatedAfter },
      helpers: tool.restoreHelpers(),
      command: () => tool.restore(target),
      after: () => {
        const restored = tool.restoredImage(target);
        if (restored === undefined) throw new BenchVmError('bench-no-restored-image', `the restore produced no disk image in ${target}`);
        const compared = imagesIdentical(restored, this.#live);
        if (!compared.identical) throw new BenchVmError('bench-restore-differs', `the restored image differs from the live disk: ${lastLines(compared.output, 2)}`);
        return { verified: true, restoredAllocatedBytes: allocatedBytes(restored.path) };
      },
    });
    rmSync(target, { recursive: true, force: true });
  }

  /** Removes the domain (with --keep: stops it) and its image. */
  async finish(): Promise<void> {
    if (!this.#defined) return;
    await finishDomain(this.#virsh, this.facts.domain, this.#setting.keep).catch((err: unknown) => this.#setting.runner.progress(`cleanup of ${this.facts.domain}: ${describeError(err)}`));
    if (!this.#setting.keep) rmSync(this.#image, { force: true });
  }
}

/** With --keep the domain stays defined (with its checkpoints) but stopped; else it goes. */
async function finishDomain(virsh: Virsh, name: string, keep: boolean): Promise<void> {
  if (keep) {
    await virsh.run(['destroy', name], { operation: 'destroy', domain: name }).catch(() => undefined);
    liveDomains.delete(name);
    return;
  }
  await destroyAndUndefine(virsh, name);
  liveDomains.delete(name);
}

/** CPU share of one core the domain's QEMU uses while nothing happens (TCG idle loop). */
async function idleCpuShare(pid: number): Promise<number | undefined> {
  const before = processCpuSeconds(pid);
  await sleep(IDLE_SAMPLE_MS);
  const after = processCpuSeconds(pid);
  return before === undefined || after === undefined ? undefined : (after - before) / (IDLE_SAMPLE_MS / 1000);
}
