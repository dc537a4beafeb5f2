/**
 * The benchmark's results: the record of every step, the comparisons against the peers, the
 * issue-2 targets (and in the live-VM mode the issue-3 targets), and their rendering as markdown
 * (stdout and docs/performance.md).
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { formatSize } from './corpus.ts';

const MIB = 1024 * 1024;
const REFERENCE_SIZE = 4 * 1024 * MIB;
/** Issue 2: the second backup of the 4 GiB reference corpus adds at most 60 MiB. */
const SECOND_BACKUP_LIMIT = 60 * MIB;
/** Issue 2, "Speed": peak RSS under 300 MiB whatever the image size. */
const PEAK_RSS_LIMIT = 300 * MIB;
/** Issue 3: Tresor's full backup of the running VM takes at most this share of virtnbdbackup's. */
const VM_FULL_TIME_SHARE = 0.8;
/** Issue 3 / brief: Tresor's restore takes at most this share of virtnbdrestore's. */
const VM_RESTORE_TIME_SHARE = 0.5;

export type StepStatus = 'ok' | 'failed' | 'skipped';

export interface StepRecord {
  /** peer name ('tresor', 'restic', 'borg', 'tresor@64K') or ceiling tool ('zstd', 'cp') */
  tool: string;
  label: string;
  step: string;
  status: StepStatus;
  error?: string;
  command?: string;
  wallSeconds?: number;
  userSeconds?: number;
  sysSeconds?: number;
  cpuSeconds?: number;
  peakRssBytes?: number;
  /** the disk the step processed: its size and its allocated part at that moment */
  diskBytes?: number;
  allocatedBytes?: number;
  diskMiBps?: number;
  allocatedMiBps?: number;
  /** repository size (du -sb) after the step and its growth during the step */
  repoBytes?: number;
  addedBytes?: number;
  /** size of the step's output file (zstd) */
  outputBytes?: number;
  /** restores: the restored image is byte-identical to the corpus */
  verified?: boolean;
  /** restores: allocated bytes of the restored image (how sparse the restore wrote it) */
  restoredAllocatedBytes?: number;
  /**
   * daemons the command left running (virtnbdrestore's qemu-nbd): how many, their CPU time
   * (already inside user/cpuSeconds) and how long the step waited for them after the command
   * exited (already inside wallSeconds)
   */
  helperCount?: number;
  helperCpuSeconds?: number;
  helperWaitSeconds?: number;
  /**
   * the `sync` run right after the command, until the step's output is on disk (already inside
   * wallSeconds): tools that fsync pay inside their own time, tools that leave data in the page
   * cache pay here, so every step is measured to the same point ("durable")
   */
  syncSeconds?: number;
  /** live VM: CPU seconds (user+sys) the domain's QEMU process used during the step */
  qemuCpuSeconds?: number;
  /** live VM: bytes the tool read from the VM's disk by its own account (Tresor's bytesRead, virtnbdbackup's data extents) */
  bytesRead?: number;
  /** live VM: the snapshot the step made, and the one an incremental is based on */
  snapshot?: string;
  baseSnapshot?: string;
  cacheDropped: boolean;
  /**
   * Share of the machine's CPU capacity that other processes used while the step ran (system-wide
   * CPU time from /proc/stat minus the step's own): on a shared machine this says how far to trust
   * the step's timing.
   */
  othersCpuShare?: number;
  /** othersCpuShare above BUSY_SHARE: the timing is not trustworthy */
  busyMachine?: boolean;
}

export interface TargetResult {
  target: string;
  status: 'PASS' | 'MISS' | 'n/a';
  detail: string;
}

export interface ChunkStudyRow {
  chunkSize: string;
  fullSeconds?: number;
  fullStoredBytes?: number;
  fullPeakRssBytes?: number;
  secondSeconds?: number;
  rewriteAddedBytes?: number;
  error?: string;
}

export interface CorpusFacts {
  path: string;
  size: number;
  seed: number;
  runs: number;
  holeBytes: number;
  textBytes: number;
  randomBytes: number;
  allocatedBytes: number;
  generateSeconds: number;
  rewrite?: {
    fraction: number;
    extents: number;
    bytesRewritten: number;
    seconds: number;
    allocatedBytesAfter: number;
    sha256After: string;
  };
}

/** Live-VM mode: one domain per tool run, each on a fresh copy of the same qcow2 image. */
export interface VmRunFacts {
  tool: string;
  label: string;
  domain: string;
  /** CPU share of one core the idle domain's QEMU used before the first step (TCG, no OS) */
  qemuIdleCpuShare?: number;
  /** the rewrite through the running VM (HMP qemu-io, one write per extent) */
  rewriteSeconds?: number;
  /** the live disk after the rewrite equals the raw corpus after rewriteCorpus (qemu-img compare) */
  rewriteIdentical?: boolean;
  error?: string;
}

export interface VmFacts {
  /** the qcow2 v3 image the corpus was converted to, copied for every tool run */
  image: { fileBytes: number; allocatedBytes: number; convertSeconds: number; options: string };
  domainSetup: string;
  /** the rewrite rendered to one file per extent, for qemu-io write -s */
  rewriteFiles: { count: number; bytes: number; renderSeconds: number };
  runs: VmRunFacts[];
}

export interface BenchResults {
  mode: 'peers' | 'chunk-sizes' | 'vm';
  startedAt: string;
  finishedAt: string;
  totalSeconds: number;
  scratch: string;
  options: Record<string, unknown>;
  machine: Record<string, string>;
  versions: Record<string, string>;
  configurations: Record<string, string>;
  measurement: string[];
  corpus?: CorpusFacts;
  vm?: VmFacts;
  steps: StepRecord[];
  comparisons: string[];
  targets: TargetResult[];
  chunkStudy: ChunkStudyRow[];
  repositories: Record<string, unknown>;
  failures: number;
}

// ---------------------------------------------------------------------------------------------
// Comparisons and targets
// ---------------------------------------------------------------------------------------------

function find(steps: StepRecord[], tool: string, step: string): StepRecord | undefined {
  const record = steps.find((s) => s.tool === tool && s.step === step);
  return record?.status === 'ok' ? record : undefined;
}

function ratio(a: number | undefined, b: number | undefined): string | undefined {
  if (a === undefined || b === undefined || b === 0) return undefined;
  const r = a / b;
  return `${r >= 10 ? r.toFixed(0) : r.toFixed(2)}x`;
}

/** "0.62x restic's time, 0.80x borg's" from pairs of (whose, ratio) that exist. */
function ratioList(what: string, pairs: Array<[string, string | undefined]>): string | undefined {
  const parts = pairs.filter((p): p is [string, string] => p[1] !== undefined).map(([whose, r]) => `${r} ${whose}`);
  if (parts.length === 0) return undefined;
  if (what !== '') parts[0] = `${parts[0]} ${what}`;
  return parts.join(', ');
}

const PEERS = ['restic', 'borg'];
const possessive = (tool: string) => `${tool}'s`;

export function compareTresor(steps: StepRecord[], tool = 'tresor'): string[] {
  const lines: string[] = [];
  const ceilings: Record<string, Array<[string, string]>> = {
    'full backup': [['zstd', 'compress'], ['cp', 'sparse copy']],
    'second backup': [],
    restore: [['zstd', 'decompress'], ['cp', 'sparse copy']],
  };
  for (const step of ['full backup', 'second backup', 'restore']) {
    const own = steps.find((s) => s.tool === tool && s.step === step);
    if (own === undefined) continue;
    if (own.status !== 'ok') {
      lines.push(`Tresor ${step}: ${own.status}${own.error ? ` (${own.error})` : ''}`);
      continue;
    }
    const time = ratioList('time', [
      ...PEERS.map((peer): [string, string | undefined] => [possessive(peer), ratio(own.wallSeconds, find(steps, peer, step)?.wallSeconds)]),
      ...ceilings[step].map(([tool, ceilingStep]): [string, string | undefined] => {
        const ceiling = find(steps, tool, ceilingStep);
        return [possessive(ceiling?.label ?? tool), ratio(own.wallSeconds, ceiling?.wallSeconds)];
      }),
    ]);
    let size: string | undefined;
    if (step === 'full backup') {
      size = ratioList('size', [
        ...PEERS.map((peer): [string, string | undefined] => [possessive(peer), ratio(own.repoBytes, find(steps, peer, step)?.repoBytes)]),
        ['the zstd -1 file', ratio(own.repoBytes, find(steps, 'zstd', 'compress')?.outputBytes)],
      ]);
      if (size !== undefined) size = `stored ${size}`;
    } else if (step === 'second backup') {
      const versus = ratioList('', PEERS.map((peer): [string, string | undefined] =>
        [possessive(peer), ratio(own.addedBytes, find(steps, peer, step)?.addedBytes)]));
      size = `added ${formatSize(own.addedBytes ?? 0)}${versus === undefined ? '' : ` (${versus})`}`;
    }
    const rss = ratioList('peak RSS', PEERS.map((peer): [string, string | undefined] =>
      [possessive(peer), ratio(own.peakRssBytes, find(steps, peer, step)?.peakRssBytes)]));
    const parts = [time, size, rss].filter((p) => p !== undefined);
    lines.push(`Tresor ${step}: ${parts.length > 0 ? parts.join('; ') : 'no peer result to compare with'}`);
  }
  return lines;
}

export function checkTargets(steps: StepRecord[], diskSize: number): TargetResult[] {
  const targets: TargetResult[] = [];
  const tresor = (step: string) => steps.find((s) => s.tool === 'tresor' && s.step === step);
  const add = (target: string, own: StepRecord | undefined, other: StepRecord | undefined,
    pass: (own: StepRecord, other: StepRecord) => boolean, detail: (own: StepRecord, other: StepRecord) => string,
    timed = true) => {
    if (own?.status !== 'ok') {
      targets.push({ target, status: 'MISS', detail: `Tresor step ${own === undefined ? 'not run' : own.status}` });
    } else if (other?.status !== 'ok') {
      targets.push({ target, status: 'n/a', detail: 'no successful restic result to compare with' });
    } else {
      const busy = timed && (own.busyMachine === true || other.busyMachine === true) ? ' (busy machine: repeat on a quiet one)' : '';
      targets.push({ target, status: pass(own, other) ? 'PASS' : 'MISS', detail: `${detail(own, other)}${busy}` });
    }
  };
  const restic = (step: string) => steps.find((s) => s.tool === 'restic' && s.step === step);
  add('full backup faster than restic', tresor('full backup'), restic('full backup'),
    (o, r) => (o.wallSeconds ?? Infinity) < (r.wallSeconds ?? 0),
    (o, r) => `${seconds(o.wallSeconds)} vs ${seconds(r.wallSeconds)}`);
  add('full backup stored smaller than restic', tresor('full backup'), restic('full backup'),
    (o, r) => (o.repoBytes ?? Infinity) < (r.repoBytes ?? 0),
    (o, r) => `${formatSize(o.repoBytes ?? 0)} vs ${formatSize(r.repoBytes ?? 0)}`, false);

  const limit = Math.round(SECOND_BACKUP_LIMIT * (diskSize / REFERENCE_SIZE));
  const scaled = diskSize === REFERENCE_SIZE ? '' : ` (60 MiB scaled to the ${formatSize(diskSize)} corpus)`;
  const second = tresor('second backup');
  const limitName = `second backup adds at most ${formatSize(limit)}${scaled}`;
  if (second?.status !== 'ok' || second.addedBytes === undefined) {
    targets.push({ target: limitName, status: 'MISS', detail: `Tresor step ${second?.status ?? 'not run'}` });
  } else {
    targets.push({ target: limitName, status: second.addedBytes <= limit ? 'PASS' : 'MISS', detail: `added ${formatSize(second.addedBytes)}` });
  }

  add('restore faster than restic', tresor('restore'), restic('restore'),
    (o, r) => (o.wallSeconds ?? Infinity) < (r.wallSeconds ?? 0) && o.verified === true,
    (o, r) => `${seconds(o.wallSeconds)} vs ${seconds(r.wallSeconds)}${o.verified === true ? '' : ', restored image NOT identical'}`);

  const tresorSteps = steps.filter((s) => s.tool === 'tresor' && s.status === 'ok' && s.peakRssBytes !== undefined);
  if (tresorSteps.length === 0) {
    targets.push({ target: 'peak RSS under 300 MiB in every Tresor step', status: 'n/a', detail: 'no measured Tresor step' });
  } else {
    const worst = tresorSteps.reduce((a, b) => ((a.peakRssBytes ?? 0) >= (b.peakRssBytes ?? 0) ? a : b));
    targets.push({
      target: 'peak RSS under 300 MiB in every Tresor step',
      status: (worst.peakRssBytes ?? 0) < PEAK_RSS_LIMIT ? 'PASS' : 'MISS',
      detail: `highest: ${formatSize(worst.peakRssBytes ?? 0)} (${worst.step})`,
    });
  }
  return targets;
}

// ---------------------------------------------------------------------------------------------
// Live VM (issue 3): comparisons and targets
// ---------------------------------------------------------------------------------------------

/** Tool names of the live-VM mode. */
export const VM_TOOLS = { tresor: 'tresor', virtnbd: 'virtnbdbackup', virtnbdLz4: 'virtnbdbackup-lz4', restic: 'restic' } as const;

/** CPU of the step's command plus its QEMU's: the whole cost of a live backup on the host. */
export function totalCpuSeconds(step: StepRecord): number | undefined {
  if (step.cpuSeconds === undefined) return undefined;
  return step.cpuSeconds + (step.qemuCpuSeconds ?? 0);
}

export function compareVm(steps: StepRecord[]): string[] {
  const lines: string[] = [];
  const others: Array<[string, string]> = [[VM_TOOLS.virtnbd, "virtnbdbackup's"], [VM_TOOLS.virtnbdLz4, "virtnbdbackup -z's"]];
  for (const step of ['full backup', 'incremental backup', 'restore']) {
    const own = steps.find((s) => s.tool === VM_TOOLS.tresor && s.step === step);
    if (own === undefined) continue;
    if (own.status !== 'ok') {
      lines.push(`Tresor ${step}: ${own.status}${own.error ? ` (${own.error})` : ''}`);
      continue;
    }
    const pairs = (value: (s: StepRecord) => number | undefined) => others.map(([tool, whose]): [string, string | undefined] =>
      [whose, ratio(value(own), (() => { const o = find(steps, tool, step); return o === undefined ? undefined : value(o); })())]);
    const parts = [
      ratioList('time', pairs((s) => s.wallSeconds)),
      ratioList('CPU (tool + qemu)', pairs(totalCpuSeconds)),
      ratioList('peak RSS', pairs((s) => s.peakRssBytes)),
    ];
    if (step === 'full backup') {
      const stored = ratioList('size', [
        ["restic's (of the raw corpus file)", ratio(own.repoBytes, find(steps, VM_TOOLS.restic, 'full backup')?.repoBytes)],
        ...pairs((s) => s.repoBytes),
      ]);
      parts.push(stored === undefined ? undefined : `stored ${stored}`);
    } else if (step === 'incremental backup') {
      const added = ratioList('', pairs((s) => s.addedBytes));
      parts.push(`added ${formatSize(own.addedBytes ?? 0)}${added === undefined ? '' : ` (${added})`}`
        + (own.bytesRead !== undefined ? `, read ${formatSize(own.bytesRead)} from the VM` : ''));
    }
    const present = parts.filter((p) => p !== undefined);
    lines.push(`Tresor ${step}: ${present.length > 0 ? present.join('; ') : 'no peer result to compare with'}`);
  }
  return lines;
}

function median(values: number[]): number {
  if (values.length === 0) return Infinity;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export function checkVmTargets(steps: StepRecord[]): TargetResult[] {
  const targets: TargetResult[] = [];
  const step = (tool: string, name: string) => steps.find((s) => s.tool === tool && s.step === name);
  const add = (target: string, own: StepRecord | undefined, other: StepRecord | undefined, otherName: string,
    pass: (own: StepRecord, other: StepRecord) => boolean, detail: (own: StepRecord, other: StepRecord) => string, timed = true) => {
    if (own?.status !== 'ok') {
      targets.push({ target, status: 'MISS', detail: `Tresor step ${own === undefined ? 'not run' : own.status}${own?.error ? `: ${own.error}` : ''}` });
    } else if (other?.status !== 'ok') {
      targets.push({ target, status: 'n/a', detail: `no successful ${otherName} result to compare with` });
    } else {
      const busy = timed && (own.busyMachine === true || other.busyMachine === true) ? ' (busy machine: repeat on a quiet one)' : '';
      targets.push({ target, status: pass(own, other) ? 'PASS' : 'MISS', detail: `${detail(own, other)}${busy}` });
    }
  };
  const wall = (s: StepRecord) => s.wallSeconds ?? Infinity;
  add(`full backup of the running VM: wall ≤ ${VM_FULL_TIME_SHARE} × virtnbdbackup's`,
    step(VM_TOOLS.tresor, 'full backup'), step(VM_TOOLS.virtnbd, 'full backup'), 'virtnbdbackup',
    (o, v) => wall(o) <= VM_FULL_TIME_SHARE * wall(v),
    (o, v) => `${seconds(o.wallSeconds)} vs ${seconds(v.wallSeconds)} (${ratio(o.wallSeconds, v.wallSeconds) ?? '–'})`);
  add("full backup stored smaller than restic's (restic on the raw corpus file, same run)",
    step(VM_TOOLS.tresor, 'full backup'), step(VM_TOOLS.restic, 'full backup'), 'restic',
    (o, r) => (o.repoBytes ?? Infinity) < (r.repoBytes ?? 0),
    (o, r) => `${formatSize(o.repoBytes ?? 0)} vs ${formatSize(r.repoBytes ?? 0)}`, false);
  // Wall time: the median over every incremental of the run (each after its own rewrite; the
  // first is the reference rewrite), since one incremental of a few seconds is at the mercy of a
  // shared machine's moments.
  const incrementalWalls = (tool: string) => steps.filter((s) => s.tool === tool && /^incremental backup( \d+)?$/.test(s.step) && s.status === 'ok')
    .map((s) => s.wallSeconds ?? Infinity);
  const ownWalls = incrementalWalls(VM_TOOLS.tresor);
  const peerWalls = incrementalWalls(VM_TOOLS.virtnbd);
  const each = (walls: number[]) => walls.map((w) => w.toFixed(2)).join(', ');
  add(`incremental after the 2 % rewrite: wall ≤ virtnbdbackup's incremental${ownWalls.length > 1 ? ` (median of ${ownWalls.length} rewrites)` : ''}`,
    step(VM_TOOLS.tresor, 'incremental backup'), step(VM_TOOLS.virtnbd, 'incremental backup'), 'virtnbdbackup',
    () => median(ownWalls) <= median(peerWalls),
    () => `${seconds(median(ownWalls))} vs ${seconds(median(peerWalls))} (${ratio(median(ownWalls), median(peerWalls)) ?? '–'})`
      + (ownWalls.length > 1 || peerWalls.length > 1 ? `; each: ${each(ownWalls)} s vs ${each(peerWalls)} s` : ''));
  add('incremental adds no more bytes than virtnbdbackup -z (lz4)',
    step(VM_TOOLS.tresor, 'incremental backup'), step(VM_TOOLS.virtnbdLz4, 'incremental backup'), 'virtnbdbackup -z',
    (o, v) => (o.addedBytes ?? Infinity) <= (v.addedBytes ?? 0),
    (o, v) => `${formatSize(o.addedBytes ?? 0)} vs ${formatSize(v.addedBytes ?? 0)}`, false);
  add(`restore of the incremental: ≤ ${VM_RESTORE_TIME_SHARE} × virtnbdrestore's time`,
    step(VM_TOOLS.tresor, 'restore'), step(VM_TOOLS.virtnbd, 'restore'), 'virtnbdrestore',
    (o, v) => wall(o) <= VM_RESTORE_TIME_SHARE * wall(v) && o.verified === true,
    (o, v) => `${seconds(o.wallSeconds)} vs ${seconds(v.wallSeconds)} (${ratio(o.wallSeconds, v.wallSeconds) ?? '–'})`
      + `${o.verified === true ? '' : ', restored image NOT identical'}`);

  const measured = steps.filter((s) => s.tool === VM_TOOLS.tresor && s.status === 'ok' && s.peakRssBytes !== undefined);
  if (measured.length === 0) {
    targets.push({ target: 'peak RSS under 300 MiB in every Tresor step (brief)', status: 'n/a', detail: 'no measured Tresor step' });
  } else {
    const worst = measured.reduce((a, b) => ((a.peakRssBytes ?? 0) >= (b.peakRssBytes ?? 0) ? a : b));
    targets.push({
      target: 'peak RSS under 300 MiB in every Tresor step (brief)',
      status: (worst.peakRssBytes ?? 0) < PEAK_RSS_LIMIT ? 'PASS' : 'MISS',
      detail: `highest: ${formatSize(worst.peakRssBytes ?? 0)} (${worst.step})`,
    });
  }
  return targets;
}

// ---------------------------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------------------------

function seconds(value: number | undefined): string {
  return value === undefined ? '–' : `${value.toFixed(value < 10 ? 2 : 1)} s`;
}

function num(value: number | undefined, digits = 1): string {
  return value === undefined ? '–' : value.toFixed(digits);
}

function mib(bytes: number | undefined): string {
  return bytes === undefined ? '–' : (bytes / MIB).toFixed(1);
}

function escapeCell(text: string): string {
  return text.replace(/\|/g, '\\|').replace(/\n/g, ' ');
}

/** With `vm`, two more columns: the QEMU process's CPU time and the bytes read from the VM. */
export function stepTable(steps: StepRecord[], vm = false): string {
  const rows = vm
    ? [
      '| tool | step | wall | MiB/s (disk) | MiB/s (allocated) | CPU user+sys s | qemu CPU s | peak RSS MiB | read from VM MiB | repo/output MiB | added MiB | note |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|',
    ]
    : [
      '| tool | step | wall | MiB/s (disk) | MiB/s (allocated) | CPU user+sys s | peak RSS MiB | repo/output MiB | added MiB | note |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---|',
    ];
  for (const s of steps) {
    const stored = s.outputBytes ?? s.repoBytes;
    let note = '';
    if (s.status !== 'ok') note = `${s.status.toUpperCase()}: ${s.error ?? ''}`;
    else if (s.verified === true) note = `restored image identical, ${formatSize(s.restoredAllocatedBytes ?? 0)} allocated`;
    else if (s.verified === false) note = 'restored image DIFFERS';
    if (!s.cacheDropped && s.status === 'ok') note = `${note}${note ? '; ' : ''}warm cache`;
    if (s.busyMachine === true) {
      note = `${note}${note ? '; ' : ''}busy machine (others used ${((s.othersCpuShare ?? 0) * 100).toFixed(0)} % of the CPUs)`;
    }
    const vmCells = vm ? [num(s.qemuCpuSeconds), mib(s.peakRssBytes), mib(s.bytesRead)] : [mib(s.peakRssBytes)];
    rows.push(`| ${s.label} | ${s.step} | ${seconds(s.wallSeconds)} | ${num(s.diskMiBps, 0)} | ${num(s.allocatedMiBps, 0)} | `
      + `${num(s.cpuSeconds)} | ${vmCells.join(' | ')} | ${mib(stored)} | ${mib(s.addedBytes)} | ${escapeCell(note.slice(0, 300))} |`);
  }
  return rows.join('\n');
}

export function chunkStudyTable(rows: ChunkStudyRow[]): string {
  const lines = [
    '| chunk size | full backup | stored after full MiB | peak RSS MiB | second backup | added by the 2 % rewrite MiB | note |',
    '|---|---:|---:|---:|---:|---:|---|',
  ];
  for (const r of rows) {
    lines.push(`| ${r.chunkSize} | ${seconds(r.fullSeconds)} | ${mib(r.fullStoredBytes)} | ${mib(r.fullPeakRssBytes)} | `
      + `${seconds(r.secondSeconds)} | ${mib(r.rewriteAddedBytes)} | ${escapeCell((r.error ?? '').slice(0, 300))} |`);
  }
  return lines.join('\n');
}

function corpusLine(results: BenchResults): string {
  const c = results.corpus;
  if (c === undefined) return 'corpus: not generated';
  const reference = c.size === REFERENCE_SIZE ? 'the reference corpus' : '**a smaller corpus than the 4 GiB reference: a smoke run**';
  let line = `Corpus: ${formatSize(c.size)} raw disk (${reference}), seed ${c.seed}, ${c.runs} runs — `
    + `${formatSize(c.holeBytes)} unallocated, ${formatSize(c.textBytes)} log text, ${formatSize(c.randomBytes)} random `
    + `(${formatSize(c.allocatedBytes)} allocated); generated in ${seconds(c.generateSeconds)}.`;
  if (c.rewrite !== undefined) {
    line += ` Rewrite: ${c.rewrite.extents} extents, ${formatSize(c.rewrite.bytesRewritten)} `
      + `(${(c.rewrite.fraction * 100).toFixed(1)} %), ${formatSize(c.rewrite.allocatedBytesAfter)} allocated afterwards.`;
  }
  return line;
}

function vmLines(vm: VmFacts): string {
  const lines = [
    `Disk: the corpus converted to qcow2 (${vm.image.options}) in ${seconds(vm.image.convertSeconds)}: `
      + `${formatSize(vm.image.fileBytes)} file, ${formatSize(vm.image.allocatedBytes)} allocated; a fresh copy of it per tool run.`,
    `Domain: ${vm.domainSetup}.`,
    `Rewrite: ${vm.rewriteFiles.count} extents (${formatSize(vm.rewriteFiles.bytes)}) rendered in ${seconds(vm.rewriteFiles.renderSeconds)}, `
      + 'each written through the running VM with HMP `qemu-io -d <disk> "write -s FILE OFF LEN"`.',
    '',
    '| tool run | domain | idle qemu CPU | rewrite through the VM | live disk = rewritten corpus | note |',
    '|---|---|---:|---:|---|---|',
  ];
  for (const r of vm.runs) {
    const idle = r.qemuIdleCpuShare === undefined ? '–' : `${(r.qemuIdleCpuShare * 100).toFixed(1)} % of a core`;
    const identical = r.rewriteIdentical === undefined ? '–' : r.rewriteIdentical ? 'yes' : '**NO**';
    lines.push(`| ${r.label} | ${r.domain} | ${idle} | ${seconds(r.rewriteSeconds)} | ${identical} | ${escapeCell((r.error ?? '').slice(0, 300))} |`);
  }
  return lines.join('\n');
}

function keyValueTable(title: string, entries: Record<string, string>): string {
  const lines = [`| ${title} | |`, '|---|---|'];
  for (const [k, v] of Object.entries(entries)) lines.push(`| ${k} | ${escapeCell(v)} |`);
  return lines.join('\n');
}

/** The figures: what stdout shows and what --write-doc puts into docs/performance.md. */
export function renderFigures(results: BenchResults): string {
  const parts: string[] = [];
  parts.push(`Run of ${results.startedAt} (${seconds(results.totalSeconds)} in all), mode: ${results.mode}.`);
  parts.push(corpusLine(results));
  parts.push(keyValueTable('machine', results.machine));
  parts.push(keyValueTable('tool', results.versions));
  parts.push(`Configurations:\n\n${Object.entries(results.configurations).map(([k, v]) => `- ${k}: ${v}`).join('\n')}`);
  parts.push(`Measurement:\n\n${results.measurement.map((m) => `- ${m}`).join('\n')}`);
  if (results.mode === 'vm') {
    if (results.vm !== undefined) parts.push(vmLines(results.vm));
    parts.push(stepTable(results.steps, true));
    if (results.comparisons.length > 0) parts.push(`Comparisons:\n\n${results.comparisons.map((c) => `- ${c}`).join('\n')}`);
    if (results.targets.length > 0) {
      parts.push(`Issue-3 targets:\n\n${results.targets.map((t) => `- **${t.status}** ${t.target}: ${t.detail}`).join('\n')}`);
    }
  } else if (results.mode === 'peers') {
    parts.push(stepTable(results.steps));
    if (results.comparisons.length > 0) parts.push(`Comparisons:\n\n${results.comparisons.map((c) => `- ${c}`).join('\n')}`);
    if (results.targets.length > 0) {
      parts.push(`Issue-2 targets:\n\n${results.targets.map((t) => `- **${t.status}** ${t.target}: ${t.detail}`).join('\n')}`);
    }
  } else {
    parts.push(chunkStudyTable(results.chunkStudy));
    parts.push(stepTable(results.steps));
  }
  return parts.join('\n\n');
}

// ---------------------------------------------------------------------------------------------
// docs/performance.md
// ---------------------------------------------------------------------------------------------

export const FIGURES_MARKERS = { start: '<!-- bench:figures:start -->', end: '<!-- bench:figures:end -->' };
export const CHUNK_MARKERS = { start: '<!-- bench:chunk-sizes:start -->', end: '<!-- bench:chunk-sizes:end -->' };
export const VM_MARKERS = { start: '<!-- bench:vm:start -->', end: '<!-- bench:vm:end -->' };

/** Replaces what lies between the two markers (they stay); appends the section when absent. */
export function replaceSection(document: string, markers: { start: string; end: string }, heading: string, body: string): string {
  const start = document.indexOf(markers.start);
  const end = document.indexOf(markers.end);
  const block = `${markers.start}\n${body.trim()}\n${markers.end}`;
  if (start >= 0 && end > start) return document.slice(0, start) + block + document.slice(end + markers.end.length);
  return `${document.trimEnd()}\n\n${heading}\n\n${block}\n`;
}

export function writeDoc(path: string, results: BenchResults): void {
  const document = existsSync(path) ? readFileSync(path, 'utf8') : '# Performance\n';
  const updated = results.mode === 'peers'
    ? replaceSection(document, FIGURES_MARKERS, '## Figures', renderFigures(results))
    : results.mode === 'vm'
      ? replaceSection(document, VM_MARKERS, '## Live VM backup: figures', renderFigures(results))
      : replaceSection(document, CHUNK_MARKERS, '## Chunk-size study', renderFigures(results));
  writeFileSync(path, updated);
}
