/**
 * `tresor backup vm NAME|UUID`: agentless backup of a libvirt domain.
 *
 * Running domain: the guest agent freezes the filesystems (policy require/try/off), libvirt starts
 * a pull-mode backup job that fixes the point in time of every disk at once and atomically creates
 * a new checkpoint, the agent thaws, and Tresor reads each disk over NBD: with an incremental job
 * only the blocks the previous checkpoint's dirty bitmap marks, the rest taken from the parent
 * snapshot's disk map. Every snapshot is complete on its own.
 *
 * A wrong incremental must be impossible, so the engine only reads incrementally when every link
 * of the chain is proven: the parent snapshot is in the repository, it belongs to the same VM
 * (UUID), it recorded the checkpoint the job starts from, libvirt has that checkpoint (or it is
 * redefined from the copy kept in the parent snapshot and libvirt validates that the bitmaps are
 * really in the disk images), the disk has a bitmap in it, and its size is unchanged. Anything else
 * reads the disk whole (still deduplicated), says why in the log, and starts a fresh checkpoint.
 *
 * Shut-off domain: the disk images are exported read-only with qemu-nbd, incrementally from the
 * parent's checkpoint bitmap when the image holds it and QEMU closed it cleanly (not "in-use").
 *
 * Crash safety: nothing is committed until the manifest is; a job file in the scratch directory
 * names the process, job and checkpoint, so the next run finds what a killed run left behind,
 * aborts the libvirt job and deletes the uncommitted checkpoint.
 */
import { mkdir, readFile, rm, writeFile, chmod, chown, statfs } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import type { Hypervisor, DomainInfo, DiskInfo, CheckpointInfo, BackupJob, BlockInfo, PullBackupOptions } from '../hypervisor/types.ts';
import { readImageInfo, exportDiskImage, type DiskImageExport } from '../hypervisor/offline-disk.ts';
import { NbdDiskSource } from '../nbd/source.ts';
import type { DiskSource } from '../image/disk.ts';
import { DiskMapReader } from '../repo/disk-map.ts';
import { type DiskRecord, type SnapshotManifest, validateSourceId } from '../repo/manifest.ts';
import type { Repository } from '../repo/repository.ts';
import { TresorError, UsageError, ExitCode } from '../util/errors.ts';
import { addDiskBackupStats, backupDisk, emptyDiskBackupStats, newChunksText, type DiskBackupStats } from './disk-backup.ts';
import { SnapshotSession } from './snapshot-writer.ts';
import { RateLimitedSource, TokenBucket } from './rate-limit.ts';
import { processAlive } from '../util/process.ts';
import { HypervisorError } from '../hypervisor/errors.ts';
import { forwardUnixSocket, isRemoteSocketDir, removeRemoteSocketDir, runOverSsh, sshTargetOf, type SshForward, type SshTarget } from '../hypervisor/ssh.ts';
import { checkpointXmlWithoutParent } from '../hypervisor/checkpoint.ts';
import { describeNbdServer, planNbdServer, portCandidates, type NbdServerPlan, type VmNbdOptions } from './vm-nbd-server.ts';

export type ConsistencyPolicy = 'require' | 'try' | 'off';

export interface VmBackupOptions {
  /** Backup id (snapshot names vm/<id>/<time>); default: the domain name. */
  id?: string;
  consistency: ConsistencyPolicy;
  /** Read every disk whole even when an incremental is possible. */
  full?: boolean;
  excludeDisks?: string[];
  /** Bytes per second read from the VM's disks, all disks together. */
  bwlimit?: number;
  /**
   * Scratch (copy-before-write) files: a directory on the domain's host. This machine: default
   * /var/lib/tresor/scratch, which also holds the NBD socket and the job file. A remote host: the
   * directory must exist there; default: libvirt puts each scratch file next to its disk image.
   */
  scratchDir?: string;
  /** NBD transport (TCP and TLS for a domain on a remote host): vm-nbd-server.ts. */
  nbd?: VmNbdOptions;
  /** Local directory for the job files of remote domains' backups (default /var/lib/tresor/jobs). */
  jobDir?: string;
  /** Free space required in the scratch directory, as a fraction of the disks' size (default 0.1). */
  scratchReserve?: number;
  /** NBD connections per disk (default 4). */
  connections?: number;
  progress?: (done: number, total: number) => void;
  signal?: AbortSignal;
  tags?: Record<string, string>;
  /** Receives each job log line as it happens (the lines are also returned and stored). */
  log?: (line: string) => void;
}

export interface VmBackupResult {
  manifest: SnapshotManifest;
  log: string[];
}

export type ConsistencyLevel = 'application' | 'crash' | 'offline';

export const DEFAULT_SCRATCH_DIR = '/var/lib/tresor/scratch';
export const DEFAULT_JOB_DIR = '/var/lib/tresor/jobs';
const CHECKPOINT_PREFIX = 'tresor-';

interface JobFile {
  pid: number;
  host: string;
  domainUuid: string;
  checkpoint: string | undefined;
  started: string;
  /** --nbd-transport ssh: the socket directory on the VM's host, removed with the job. */
  remoteSocketDir?: string;
}

/** What a disk's backup will be based on. */
interface DiskPlan {
  disk: DiskInfo;
  size: number;
  /** Parent disk record to take unchanged blocks from (incremental), or undefined (full read). */
  parent: DiskRecord | undefined;
  fullReason: string | undefined;
}

export class VmBackupError extends TresorError {}

export async function backupVm(repo: Repository, hv: Hypervisor, domainRef: string, opts: VmBackupOptions): Promise<VmBackupResult> {
  const log: string[] = [];
  const say = (line: string) => {
    log.push(`${new Date().toISOString()} ${line}`);
    opts.log?.(line);
  };
  // The repository session (lock, index, codec workers) starts while libvirt is asked.
  const sessionStarting = SnapshotSession.start(repo, `backup vm ${opts.id ?? domainRef}`);
  let dom: DomainInfo, id: string, vmDir: string, parentFinding: Promise<SnapshotManifest | undefined>, nbdPlan: NbdServerPlan;
  try {
    dom = await hv.getDomain(domainRef);
    // Where a running domain's disks will be served (TLS files are read now, before any job);
    // a shut-off domain's are read with qemu-nbd instead.
    nbdPlan = dom.state === 'shutoff' ? { transport: 'unix' } : await planNbdServer(hv, opts.nbd);
    id = validateSourceId(opts.id ?? dom.name);
    // Read-only, so it need not wait for the lock: whatever it finds is only used through the
    // blob index, which loads after the lock (a parent pruned meanwhile fails loudly, never silently).
    parentFinding = findParent(repo, id, dom, say);
    parentFinding.catch(() => undefined); // awaited with the other answers
    if (hv.remoteHost === undefined) {
      const scratchRoot = opts.scratchDir ?? DEFAULT_SCRATCH_DIR;
      vmDir = join(scratchRoot, dom.uuid);
      await prepareScratchDir(scratchRoot, vmDir);
    } else {
      // The scratch directory is on the other host; only the job file lives here.
      vmDir = join(opts.jobDir ?? DEFAULT_JOB_DIR, dom.uuid);
      await mkdir(vmDir, { recursive: true, mode: 0o700 });
    }
    await cleanUpLeftovers(hv, dom, vmDir, say);
  } catch (err) {
    await sessionStarting.then((session) => session.close(), () => undefined);
    throw err;
  }

  // Independent questions to libvirt and the repository, asked at once: each libvirt call is a
  // round trip of tens of ms, which adds up to a good part of an incremental backup's time.
  const xmlAsked = hv.domainXml(dom.name);
  const disksAsked = xmlAsked.then((xml) => hv.disks(dom.name, { fromXml: xml }));
  const prefetch: Prefetched | undefined = dom.state === 'shutoff' ? undefined : {
    checkpoints: hv.checkpoints(dom.name),
    // Of every disk, excluded ones too: one that cannot answer is asked again (and fails) only if needed.
    blockInfos: disksAsked.then((all) => Promise.all(all.map((d) => hv.blockInfo(dom.name, d.target).then((info) => [d.target, info] as const, () => undefined))))
      .then((pairs) => new Map(pairs.filter((pair) => pair !== undefined))),
  };
  const answers = Promise.all([
    parentFinding,
    disksAsked,
    xmlAsked,
    dom.persistent ? hv.domainXml(dom.name, { inactive: true }) : Promise.resolve(undefined),
    prefetch?.checkpoints,
    prefetch?.blockInfos,
  ]);
  answers.catch(() => undefined); // awaited below once the session is open; no unhandled rejection before
  const session = await sessionStarting;
  try {
    const [parent, allDisks, domainXml, inactiveXml] = await answers;
    const excluded = new Set(opts.excludeDisks ?? []);
    for (const t of excluded) {
      if (!allDisks.some((d) => d.target === t)) throw new UsageError(`domain ${dom.name} has no disk ${t} to exclude`, `its disks are: ${allDisks.map((d) => d.target).join(', ')}`);
    }
    const disks = allDisks.filter((d) => !excluded.has(d.target));
    if (disks.length === 0) throw new UsageError(`nothing to back up: every disk of ${dom.name} is excluded`);
    for (const t of excluded) say(`disk ${t} excluded by request`);
    const common = { repo, hv, dom, id, opts, session, parent, disks, domainXml, inactiveXml, vmDir, nbdPlan, say, log, prefetch };
    return dom.state === 'shutoff'
      ? await backupStoppedVm(common)
      : await backupRunningVm(common);
  } finally {
    await session.close();
  }
}

/** Answers about a domain that is not shut off, asked together with the others. */
interface Prefetched {
  checkpoints: Promise<CheckpointInfo[]>;
  /** Block info of every disk of the definition that answered, by target. */
  blockInfos: Promise<Map<string, BlockInfo>>;
}

interface Common {
  /** Undefined for a shut-off domain. */
  prefetch: Prefetched | undefined;
  repo: Repository;
  hv: Hypervisor;
  dom: DomainInfo;
  id: string;
  opts: VmBackupOptions;
  session: SnapshotSession;
  parent: SnapshotManifest | undefined;
  disks: DiskInfo[];
  domainXml: string;
  inactiveXml: string | undefined;
  /** Local: the VM's scratch directory (socket, scratch files, job file); remote: its job directory. */
  vmDir: string;
  nbdPlan: NbdServerPlan;
  say: (line: string) => void;
  log: string[];
}

// ---- running domains ----------------------------------------------------------------------

async function backupRunningVm(c: Common): Promise<VmBackupResult> {
  const { hv, dom, opts, say } = c;
  if (dom.state !== 'running' && dom.state !== 'paused') {
    throw new VmBackupError('domain-state', `domain ${dom.name} is ${dom.stateText}; it can be backed up running, paused or shut off`, {
      hint: 'wait until it is running or shut off', context: { domain: dom.name },
    });
  }
  const [infos, allCheckpoints] = await Promise.all([c.prefetch!.blockInfos, c.prefetch!.checkpoints]);
  const sizes = new Map<string, number>(await Promise.all(c.disks.map(async (d) =>
    [d.target, (infos.get(d.target) ?? await hv.blockInfo(dom.name, d.target)).capacity] as const)));
  if (hv.remoteHost === undefined) await checkScratchSpace(c.vmDir, [...sizes.values()], opts.scratchReserve ?? 0.1);
  else await checkRemoteScratchSpace(c, sizes);
  const bitmapCapable = c.disks.filter((d) => d.format === 'qcow2').map((d) => d.target);
  for (const d of c.disks) {
    if (d.format !== 'qcow2') say(`disk ${d.target} is ${d.format ?? 'of unknown format'}: it cannot carry a dirty bitmap, so it is read whole every time`);
  }
  const checkpoints = allCheckpoints.filter((cp) => cp.name.startsWith(CHECKPOINT_PREFIX));
  let plan = await planIncremental(c, checkpoints, sizes);

  // Application consistency: freeze as briefly as possible, around the job's start only.
  const consistency = await freeze(c);
  const newCheckpoint = bitmapCapable.length > 0 ? `${CHECKPOINT_PREFIX}${compactTime(new Date())}-${randomBytes(2).toString('hex')}` : undefined;
  await writeJobFile(c.vmDir, {
    pid: process.pid, host: hostname(), domainUuid: dom.uuid, checkpoint: newCheckpoint, started: new Date().toISOString(),
    ...(c.nbdPlan.transport === 'ssh' ? { remoteSocketDir: c.nbdPlan.socketDir } : {}),
  });
  let job: BackupJob | undefined;
  let pointInTime = new Date();
  let committed = false;
  let ending: Promise<unknown> | undefined;
  try {
    try {
      job = await beginJob(c, plan, newCheckpoint, bitmapCapable);
    } catch (err) {
      if (!plan.from || !isBitmapProblem(err)) throw err;
      // QEMU refuses bitmaps it cannot trust (e.g. inconsistent after a crash): read everything.
      const why = `the dirty bitmap of checkpoint ${plan.from} cannot be used (${(err as Error).message.split('\n')[0]})`;
      say(`${why}; reading every disk whole`);
      plan = fullPlan(c, sizes, why);
      job = await beginJob(c, plan, newCheckpoint, bitmapCapable);
    } finally {
      pointInTime = new Date();
      if (consistency.frozen) await thaw(c, consistency);
    }
    say(`backup job started at ${pointInTime.toISOString()} (${plan.from ? `incremental from checkpoint ${plan.from}` : 'full'}; new checkpoint ${newCheckpoint ?? 'none'}); consistency: ${consistency.level}`);
    say(describeNbdServer(c.nbdPlan, 'port' in job.nbd ? job.nbd.port : undefined));
    const results = await readDisks(c, plan, job);
    // Everything is read: the job ends while the snapshot is committed (both take a few hundred
    // ms). The data does not depend on the job's end; a job that cannot be ended is aborted by
    // the next run's clean-up.
    ending = job.finish().catch((err) => say(`could not end the libvirt backup job: ${(err as Error).message}`));
    job = undefined;
    const checkpointXml = newCheckpoint ? await hv.checkpointXml(dom.name, newCheckpoint) : undefined;
    const manifest = await c.session.commit(
      { type: 'vm', id: c.id, tags: opts.tags, source: vmSource(c, consistency, plan, newCheckpoint ? { name: newCheckpoint, xml: checkpointXml! } : undefined, c.log) },
      pointInTime, results.records, c.parent?.name ?? null, results.stats,
    );
    committed = true;
    say(`snapshot ${manifest.name} committed`);
    await ending;
    await removeOldCheckpoints(c, newCheckpoint);
    return { manifest, log: c.log };
  } finally {
    if (job) await job.finish().catch(() => undefined);
    await ending;
    if (!committed && newCheckpoint) {
      // The checkpoint marks a point no snapshot holds: an incremental from it would be wrong.
      await hv.deleteCheckpoint(dom.name, newCheckpoint).catch((err) => say(`could not delete checkpoint ${newCheckpoint}: ${(err as Error).message}`));
    }
    await removeJobFile(c.vmDir);
  }
}

interface IncrementalPlan {
  /** Checkpoint the job is incremental from, or undefined for a full job. */
  from: string | undefined;
  disks: DiskPlan[];
}

function fullPlan(c: Common, sizes: Map<string, number>, reason: string): IncrementalPlan {
  return { from: undefined, disks: c.disks.map((disk) => ({ disk, size: sizes.get(disk.target)!, parent: undefined, fullReason: reason })) };
}

async function planIncremental(c: Common, checkpoints: CheckpointInfo[], sizes: Map<string, number>): Promise<IncrementalPlan> {
  const { dom, parent, say } = c;
  const full = (reason: string): IncrementalPlan => {
    say(`full read: ${reason}`);
    return fullPlan(c, sizes, reason);
  };
  if (c.opts.full) return full('requested with --full');
  if (!parent) return full('no earlier snapshot of this VM in the repository');
  const recorded = parent.source.checkpoint as { name: string; xml: string } | undefined;
  if (!recorded?.name) return full(`the previous snapshot ${parent.name} recorded no checkpoint`);
  let cp = checkpoints.find((x) => x.name === recorded.name);
  if (!cp) {
    // libvirt's metadata is gone (VM moved to another host, or redefined), the bitmaps may not be.
    try {
      // Without its parent: libvirt has none of the chain here (and Tresor deleted the parent on
      // the old host once this checkpoint's backup committed).
      await c.hv.redefineCheckpoint(dom.name, checkpointXmlWithoutParent(recorded.xml), { validate: true });
      cp = (await c.hv.checkpoints(dom.name)).find((x) => x.name === recorded.name);
      say(`checkpoint ${recorded.name} was unknown to libvirt at ${c.hv.uri}; redefined it from snapshot ${parent.name} (libvirt validated its bitmaps)`);
    } catch (err) {
      return full(`checkpoint ${recorded.name} of snapshot ${parent.name} is gone and cannot be redefined (${(err as Error).message.split('\n')[0]})`);
    }
    if (!cp) return full(`checkpoint ${recorded.name} could not be redefined`);
  }
  const disks: DiskPlan[] = [];
  for (const disk of c.disks) {
    const size = sizes.get(disk.target)!;
    const prev = parent.disks.find((d) => d.name === disk.target);
    const inCheckpoint = cp.disks.find((d) => d.target === disk.target && d.checkpoint === 'bitmap');
    let reason: string | undefined;
    if (!prev) reason = `disk ${disk.target} is not in snapshot ${parent.name}`;
    else if (prev.size !== size) reason = `disk ${disk.target} was resized from ${prev.size} to ${size} bytes`;
    else if (prev.chunkSize !== c.repo.config.chunkSize) reason = `disk ${disk.target} of ${parent.name} uses another chunk size`;
    else if (!inCheckpoint) reason = `disk ${disk.target} has no bitmap in checkpoint ${cp.name}`;
    if (reason) say(`full read of ${disk.target}: ${reason}`);
    disks.push({ disk, size, parent: reason ? undefined : prev, fullReason: reason });
  }
  if (!disks.some((d) => d.parent)) return { from: undefined, disks };
  say(`incremental from checkpoint ${cp.name} of snapshot ${parent.name}`);
  return { from: cp.name, disks };
}

async function beginJob(c: Common, plan: IncrementalPlan, checkpoint: string | undefined, bitmapCapable: string[]): Promise<BackupJob> {
  const job = {
    disks: plan.disks.map((d) => ({
      target: d.disk.target,
      scratchFile: scratchFile(c, d.disk, checkpoint),
      ...(plan.from ? { backupMode: d.parent ? 'incremental' as const : 'full' as const } : {}),
    })),
    incrementalFrom: plan.from,
    checkpointName: checkpoint,
    checkpointDisks: bitmapCapable,
    definition: c.domainXml,
  };
  const server = c.nbdPlan;
  if (server.transport === 'unix') {
    await rm(join(c.vmDir, 'nbd.sock'), { force: true });
    return c.hv.beginPullBackup(c.dom.name, { ...job, socketPath: join(c.vmDir, 'nbd.sock') });
  }
  if (server.transport === 'ssh') return beginJobOverSsh(c, server.ssh, server.socketDir, job);
  const ports = portCandidates(server.ports);
  for (const [i, port] of ports.entries()) {
    try {
      return await c.hv.beginPullBackup(c.dom.name, { ...job, tcp: { address: server.address, port, tls: server.tls } });
    } catch (err) {
      if (!(err instanceof HypervisorError && err.code === 'port-in-use') || i === ports.length - 1) throw err;
      c.say(`port ${port} on ${server.address} is in use; trying ${ports[i + 1]}`);
    }
  }
  throw new Error('unreachable: no port candidates');
}

/**
 * The job's NBD server on a unix socket in a private directory on the host, which QEMU's user
 * owns, and a local socket forwarded to it over ssh. The job's finish() also ends the forward and
 * removes the directory; a job that cannot be forwarded is ended at once.
 */
async function beginJobOverSsh(c: Common, ssh: SshTarget, dir: string, job: Omit<PullBackupOptions, 'socketPath' | 'tcp'>): Promise<BackupJob> {
  const removeDir = () => removeRemoteSocketDir(ssh, dir).catch(() => undefined);
  // QEMU runs as libvirt-qemu (Debian) or qemu (Fedora), as root in some setups.
  await runOverSsh(ssh, ['sh', '-c', 'mkdir -m 700 "$1" && { chown libvirt-qemu "$1" 2>/dev/null || chown qemu "$1" 2>/dev/null || true; }', 'sh', dir],
    { operation: 'create the NBD socket directory' });
  let started: BackupJob;
  try {
    started = await c.hv.beginPullBackup(c.dom.name, { ...job, socketPath: `${dir}/nbd.sock` });
  } catch (err) {
    await removeDir();
    throw err;
  }
  let forward: SshForward;
  try {
    forward = await forwardUnixSocket(ssh, join(c.vmDir, 'nbd-forward.sock'), `${dir}/nbd.sock`);
  } catch (err) {
    await started.finish().catch(() => undefined);
    await removeDir();
    throw err;
  }
  return {
    domain: started.domain, disks: started.disks, checkpointName: started.checkpointName, incrementalFrom: started.incrementalFrom,
    nbd: { unix: join(c.vmDir, 'nbd-forward.sock') },
    socketPath: join(c.vmDir, 'nbd-forward.sock'),
    finish: async () => {
      try {
        await started.finish();
      } finally {
        await forward.close();
        await removeDir();
      }
    },
  };
}

/**
 * The scratch file of a disk: in the VM's directory here; on a remote host in --scratch-dir, else
 * next to the disk's image (where libvirt puts its own default ones), named after the job's
 * checkpoint so a file some earlier job left is never reused. libvirt creates the file and
 * deletes it when the job ends.
 */
function scratchFile(c: Common, disk: DiskInfo, checkpoint: string | undefined): string {
  if (c.hv.remoteHost === undefined) return join(c.vmDir, `${disk.target}.scratch`);
  const job = checkpoint ?? `tresor-${randomBytes(4).toString('hex')}`;
  if (c.opts.scratchDir !== undefined) return join(c.opts.scratchDir, `${job}-${c.dom.uuid}-${disk.target}.scratch`);
  return `${disk.source!}.${job}.scratch`;
}

function isBitmapProblem(err: unknown): boolean {
  const text = `${(err as Error)?.message ?? ''} ${JSON.stringify((err as TresorError)?.context ?? {})}`.toLowerCase();
  return /bitmap|checkpoint|inconsistent/.test(text);
}

async function readDisks(c: Common, plan: IncrementalPlan, job: BackupJob): Promise<{ records: DiskRecord[]; stats: DiskBackupStats }> {
  const bucket = c.opts.bwlimit ? new TokenBucket(c.opts.bwlimit) : undefined;
  const total = plan.disks.reduce((n, d) => n + d.size, 0);
  let before = 0;
  const records: DiskRecord[] = [];
  const stats = emptyDiskBackupStats();
  for (const d of plan.disks) {
    const exported = job.disks.find((x) => x.target === d.disk.target)!;
    const incremental = d.parent !== undefined && exported.mode === 'incremental' && exported.dirtyBitmapContext !== undefined;
    if (d.parent && !incremental) throw new VmBackupError('incremental-mismatch', `libvirt exported disk ${d.disk.target} in ${exported.mode} mode, not incremental as planned`, { hint: 'run the backup again with --full' });
    const source = await NbdDiskSource.open(job.nbd, {
      exportName: exported.exportName, dirtyBitmap: incremental ? exported.dirtyBitmapContext : undefined, connections: c.opts.connections ?? 4,
    });
    try {
      const r = await backupOneDisk(c, d, source, bucket, (done) => c.opts.progress?.(before + done, total));
      records.push(r.record);
      addDiskBackupStats(stats, r.stats);
      c.say(`disk ${d.disk.target}: ${incremental ? 'incremental' : 'full'} read of ${r.stats.bytesRead} bytes${r.stats.trimmedBytes > 0 ? ` (${r.stats.trimmedBytes} unchanged bytes of partly changed chunks taken from the parent's)` : ''}; ${newChunksText(r.stats)}, ${r.stats.reusedChunks} reused, ${r.stats.unchangedChunks} unchanged, ${r.stats.holeChunks} holes`);
    } finally {
      await source.close();
    }
    before += d.size;
  }
  return { records, stats };
}

async function backupOneDisk(c: Common, d: DiskPlan, source: DiskSource, bucket: TokenBucket | undefined, progress: (done: number) => void) {
  if (source.size !== d.size) {
    throw new VmBackupError('size-mismatch', `disk ${d.disk.target} of ${c.dom.name} is ${source.size} bytes over NBD but ${d.size} bytes in libvirt`, { hint: 'run the backup again' });
  }
  // The incremental walks the parent's whole map in order: read ahead so its pieces come in batches.
  const parentMap = d.parent ? await DiskMapReader.open(c.repo, c.parent!.name, d.parent, { readAhead: 32 }) : undefined;
  const src = bucket ? new RateLimitedSource(source, bucket) : source;
  const { map, stats } = await backupDisk(c.repo, c.session.pool, c.session.writer, src, { parent: parentMap, progress, signal: c.opts.signal });
  const record: DiskRecord = {
    name: d.disk.target, sourceFormat: d.disk.format ?? 'unknown', ...(await map.finish()), bytesRead: stats.bytesRead,
    ...(d.parent ? { base: { snapshot: c.parent!.name } } : d.fullReason ? { base: { snapshot: '', reason: d.fullReason } } : {}),
  };
  return { record, stats };
}

/** After a commit only the new checkpoint is needed; older Tresor checkpoints only cost I/O. */
async function removeOldCheckpoints(c: Common, keep: string | undefined): Promise<void> {
  // Listed again: planning may have redefined a checkpoint that was not there before.
  const ours = (await c.hv.checkpointNames(c.dom.name)).filter((name) => name.startsWith(CHECKPOINT_PREFIX) && name !== keep);
  for (const name of ours) {
    try {
      await c.hv.deleteCheckpoint(c.dom.name, name);
    } catch {
      // A checkpoint whose bitmap is broken or gone (QEMU killed) cannot merge its bitmap into a
      // parent; its metadata is all that is left to remove.
      await c.hv.deleteCheckpoint(c.dom.name, name, { metadataOnly: true })
        .catch((err) => c.say(`could not delete old checkpoint ${name}: ${(err as Error).message}`));
    }
  }
}

// ---- consistency --------------------------------------------------------------------------

interface ConsistencyState {
  level: ConsistencyLevel;
  frozen: boolean;
  detail: string;
}

async function freeze(c: Common): Promise<ConsistencyState> {
  const policy = c.opts.consistency;
  if (policy === 'off') return { level: 'crash', frozen: false, detail: 'consistency off by request' };
  const agent = c.hv.guestAgent(c.dom.name);
  try {
    await agent.ping(5);
    const n = await agent.freeze();
    c.say(`guest agent froze ${n} filesystem(s)`);
    return { level: 'application', frozen: true, detail: `guest agent froze ${n} filesystem(s)` };
  } catch (err) {
    const why = (err as Error).message.split('\n')[0];
    // A failed freeze may have frozen some filesystems: thaw defensively.
    await agent.thaw().catch(() => undefined);
    if (policy === 'require') {
      throw new VmBackupError('freeze-failed', `cannot make ${c.dom.name} application-consistent: ${why}`, {
        hint: 'install and start qemu-guest-agent in the guest (with a virtio-serial channel org.qemu.guest_agent.0), or use --consistency try', context: { domain: c.dom.name },
      });
    }
    c.say(`guest agent freeze failed (${why}); the snapshot is crash-consistent`);
    return { level: 'crash', frozen: false, detail: `freeze failed: ${why}` };
  }
}

async function thaw(c: Common, state: ConsistencyState): Promise<void> {
  try {
    const n = await c.hv.guestAgent(c.dom.name).thaw();
    c.say(`guest agent thawed ${n} filesystem(s)`);
  } catch (err) {
    c.say(`THAW FAILED: ${(err as Error).message}; retrying`);
    await new Promise((r) => setTimeout(r, 1000));
    await c.hv.guestAgent(c.dom.name).thaw();
  }
  state.frozen = false;
}

// ---- shut-off domains ---------------------------------------------------------------------

async function backupStoppedVm(c: Common): Promise<VmBackupResult> {
  const { say } = c;
  // Its images are files on the domain's host: on another host they are read there, over ssh.
  const ssh = c.hv.remoteHost === undefined ? undefined : sshTargetOf(c.hv.uri);
  if (c.hv.remoteHost !== undefined && ssh === undefined) {
    throw new VmBackupError('remote-shutoff', `domain ${c.dom.name} on ${c.hv.remoteHost} is shut off: its images can only be read on that host, and Tresor runs commands there only over ssh (qemu+ssh://), not through ${c.hv.uri.split(':')[0]}`, {
      hint: `connect with qemu+ssh://${c.hv.remoteHost}/system (the same ssh login virsh uses), start the domain (a running domain is read over NBD/TCP), or run the backup on ${c.hv.remoteHost} itself`,
      context: { domain: c.dom.name, host: c.hv.remoteHost },
    });
  }
  if (ssh) say(`the domain is shut off on ${ssh.label}: reading its images there with qemu-img and qemu-nbd, forwarded over ssh`);
  const recorded = c.parent?.source.checkpoint as { name: string; xml: string } | undefined;
  const plans: Array<DiskPlan & { bitmap: string | undefined }> = [];
  let keepCheckpoint = recorded !== undefined && !c.opts.full;
  for (const disk of c.disks) {
    if (!disk.source || disk.sourceType === 'network') {
      throw new VmBackupError('offline-network-disk', `disk ${disk.target} of the shut-off domain ${c.dom.name} is not a local file or device`, {
        hint: 'start the domain to back it up through libvirt, or exclude the disk with --exclude-disk',
      });
    }
    const info = await readImageInfo(disk.source, { ssh });
    const prev = c.parent?.disks.find((d) => d.name === disk.target);
    const bitmap = recorded ? info.bitmaps.find((b) => b.name === recorded.name) : undefined;
    let reason: string | undefined;
    if (c.opts.full) reason = 'requested with --full';
    else if (!c.parent) reason = 'no earlier snapshot of this VM in the repository';
    else if (!recorded) reason = `the previous snapshot ${c.parent.name} recorded no checkpoint`;
    else if (!prev) reason = `disk ${disk.target} is not in snapshot ${c.parent.name}`;
    else if (prev.size !== info.virtualSize) reason = `disk ${disk.target} was resized from ${prev.size} to ${info.virtualSize} bytes`;
    else if (!bitmap) reason = `the image of ${disk.target} has no bitmap ${recorded.name}`;
    else if (bitmap.inUse) reason = `bitmap ${recorded.name} in the image of ${disk.target} is marked in use: QEMU did not close the image cleanly, so it cannot be trusted`;
    if (reason) {
      say(`full read of ${disk.target}: ${reason}`);
      if (info.format === 'qcow2') keepCheckpoint = false;
    } else {
      say(`incremental read of ${disk.target} from bitmap ${recorded!.name} in the image`);
    }
    plans.push({ disk, size: info.virtualSize, parent: reason ? undefined : prev, fullReason: reason, bitmap: reason ? undefined : recorded!.name });
  }
  const pointInTime = new Date();
  const bucket = c.opts.bwlimit ? new TokenBucket(c.opts.bwlimit) : undefined;
  const records: DiskRecord[] = [];
  const stats = emptyDiskBackupStats();
  const total = plans.reduce((n, p) => n + p.size, 0);
  let before = 0;
  for (const p of plans) {
    let exported: DiskImageExport | undefined;
    let source: NbdDiskSource | undefined;
    try {
      exported = await exportDiskImage({ image: p.disk.source!, socketPath: join(c.vmDir, `${p.disk.target}.sock`), bitmap: p.bitmap, format: p.disk.format, ssh });
      source = await NbdDiskSource.open(exported.nbd, { exportName: exported.exportName, dirtyBitmap: exported.dirtyBitmapContext, connections: c.opts.connections ?? 4 });
      const r = await backupOneDisk(c, p, source, bucket, (done) => c.opts.progress?.(before + done, total));
      records.push(r.record);
      addDiskBackupStats(stats, r.stats);
      say(`disk ${p.disk.target}: read ${r.stats.bytesRead} bytes; ${newChunksText(r.stats)}, ${r.stats.unchangedChunks} unchanged`);
    } finally {
      await source?.close().catch(() => undefined);
      await exported?.close().catch(() => undefined);
    }
    before += p.size;
  }
  // A shut-off VM gets no new checkpoint; the parent's stays valid as the base of the next
  // incremental (its bitmap holds every change since, a superset of the changes since now).
  const checkpoint = keepCheckpoint && recorded ? recorded : undefined;
  if (!checkpoint) say('no checkpoint carried forward: the next backup of the running VM reads every disk whole');
  const consistency: ConsistencyState = { level: 'offline', frozen: false, detail: 'the domain was shut off' };
  const manifest = await c.session.commit(
    { type: 'vm', id: c.id, tags: c.opts.tags, source: vmSource(c, consistency, { from: checkpoint?.name, disks: plans }, checkpoint, c.log) },
    pointInTime, records, c.parent?.name ?? null, stats,
  );
  say(`snapshot ${manifest.name} committed`);
  return { manifest, log: c.log };
}

// ---- helpers ------------------------------------------------------------------------------

function vmSource(c: Common, consistency: ConsistencyState, plan: IncrementalPlan, checkpoint: { name: string; xml: string } | undefined, log: string[]): Record<string, unknown> {
  return {
    kind: 'libvirt-domain', uri: c.hv.uri, host: hostname(), uuid: c.dom.uuid, name: c.dom.name, state: c.dom.state,
    consistency: { level: consistency.level, policy: c.opts.consistency, detail: consistency.detail },
    incremental: plan.from ? { checkpoint: plan.from, parent: c.parent?.name } : null,
    checkpoint: checkpoint ?? null,
    disks: c.disks.map((d) => ({ target: d.target, bus: d.bus, source: d.source, format: d.format })),
    excludedDisks: c.opts.excludeDisks ?? [],
    domainXml: c.domainXml, inactiveXml: c.inactiveXml ?? null,
    log: [...log],
  };
}

async function findParent(repo: Repository, id: string, dom: DomainInfo, say: (l: string) => void): Promise<SnapshotManifest | undefined> {
  const latest = await repo.latestSnapshot('vm', id);
  if (!latest) return undefined;
  if (latest.source.uuid !== dom.uuid) {
    say(`the latest snapshot ${latest.name} of id ${id} is of another VM (UUID ${String(latest.source.uuid)}); not using it as a base`);
    return undefined;
  }
  return latest;
}

function compactTime(d: Date): string {
  return d.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}Z$/, 'Z');
}

async function prepareScratchDir(root: string, vmDir: string): Promise<void> {
  await mkdir(root, { recursive: true, mode: 0o755 });
  await mkdir(vmDir, { recursive: true, mode: 0o700 });
  // QEMU runs as libvirt-qemu and must create the NBD socket (and write scratch files) here.
  const uid = await userId('libvirt-qemu');
  if (uid !== undefined) {
    await chown(vmDir, uid, -1);
    await chmod(vmDir, 0o700);
  } else {
    await chmod(vmDir, 0o1777);
  }
}

async function userId(name: string): Promise<number | undefined> {
  // /etc/passwd holds system users such as libvirt-qemu; `id` (NSS) only for the others.
  const passwd = await readFile('/etc/passwd', 'utf8').catch(() => '');
  const entry = passwd.split('\n').find((line) => line.startsWith(`${name}:`));
  const uid = entry === undefined ? Number.NaN : Number(entry.split(':')[2]);
  if (Number.isSafeInteger(uid)) return uid;
  return new Promise((resolve) => {
    execFile('id', ['-u', name], (err, stdout) => resolve(err ? undefined : Number(stdout.trim())));
  });
}

async function checkScratchSpace(dir: string, sizes: number[], reserve: number): Promise<void> {
  const st = await statfs(dir);
  requireScratchSpace(dir, st.bavail * st.bsize, sizes, reserve, undefined);
}

/** The scratch rule for both kinds of host: `reserve` of the disks' size, at most 64 GiB. */
function requireScratchSpace(dir: string, free: number, sizes: number[], reserve: number, host: string | undefined): void {
  const need = Math.min(sizes.reduce((a, b) => a + b, 0) * reserve, 64 << 30);
  if (free < need) {
    const where = host === undefined ? dir : `${dir} on ${host}`;
    throw new VmBackupError('scratch-space', `the scratch directory ${where} has ${free} bytes free; the backup needs at least ${Math.ceil(need)} (${Math.round(reserve * 100)} % of the disks) for data the guest overwrites while it runs`, {
      hint: `free space there, point --scratch-dir at a larger filesystem${host === undefined ? '' : ' on that host'}, or lower --scratch-reserve if the guest writes little`,
      exitCode: ExitCode.noSpace, context: { dir, free, need },
    });
  }
}

/**
 * The remote counterpart of checkScratchSpace: free space of each scratch directory on the
 * domain's host, through libvirt (its figure counts blocks reserved for root as free).
 */
async function checkRemoteScratchSpace(c: Common, sizes: Map<string, number>): Promise<void> {
  const reserve = c.opts.scratchReserve ?? 0.1;
  const byDir = new Map<string, number[]>();
  for (const d of c.disks) {
    let dir = c.opts.scratchDir;
    if (dir === undefined) {
      if (d.sourceType !== 'file' || !d.source) {
        throw new VmBackupError('scratch-dir-needed', `disk ${d.target} of ${c.dom.name} is not a file on ${c.hv.remoteHost}, so libvirt has no place next to it for the scratch file`, {
          hint: 'name a directory on that host with --scratch-dir', context: { domain: c.dom.name, disk: d.target },
        });
      }
      dir = dirname(d.source);
    }
    byDir.set(dir, [...(byDir.get(dir) ?? []), sizes.get(d.target)!]);
  }
  for (const [dir, dirSizes] of byDir) {
    let free: number;
    try {
      free = await c.hv.freeSpace(dir);
    } catch (err) {
      throw new VmBackupError('scratch-space', `cannot find the free space of the scratch directory ${dir} on ${c.hv.remoteHost}: ${(err as Error).message.split('\n')[0]}`, {
        hint: 'the directory must exist on that host; name another with --scratch-dir', context: { dir }, cause: err,
      });
    }
    requireScratchSpace(dir, free, dirSizes, reserve, c.hv.remoteHost);
  }
}

/** The socket directory a killed --nbd-transport ssh run left on the host, removed over ssh when there is a way. */
async function removeLeftoverSocketDir(hv: Hypervisor, dir: string, say: (l: string) => void): Promise<void> {
  const ssh = sshTargetOf(hv.uri);
  if (!isRemoteSocketDir(dir)) {
    say(`the job file names ${JSON.stringify(dir)} as its socket directory, which Tresor would not have made: left alone`);
  } else if (ssh === undefined) {
    say(`its NBD socket directory ${dir} on ${hv.remoteHost ?? 'the host'} is left: remove it there (this connection is not over ssh)`);
  } else {
    await removeRemoteSocketDir(ssh, dir);
    say(`removed its NBD socket directory ${dir} on ${ssh.label}`);
  }
}

async function writeJobFile(vmDir: string, job: JobFile): Promise<void> {
  await writeFile(join(vmDir, 'job.json'), JSON.stringify(job));
}

async function removeJobFile(vmDir: string): Promise<void> {
  await rm(join(vmDir, 'job.json'), { force: true });
}

/**
 * A run killed mid-backup leaves a libvirt job, an uncommitted checkpoint and scratch files. If
 * the job file's process is gone, abort the job and delete the checkpoint; if it still runs,
 * refuse (one backup of a VM at a time).
 */
async function cleanUpLeftovers(hv: Hypervisor, dom: DomainInfo, vmDir: string, say: (l: string) => void): Promise<void> {
  let job: JobFile | undefined;
  try {
    job = JSON.parse(await readFile(join(vmDir, 'job.json'), 'utf8')) as JobFile;
  } catch {
    job = undefined;
  }
  if (job) {
    if (job.host === hostname() && processAlive(job.pid)) {
      throw new VmBackupError('backup-running', `a backup of ${dom.name} is already running (pid ${job.pid}, since ${job.started})`, {
        hint: 'wait for it to finish', exitCode: ExitCode.locked,
      });
    }
    say(`cleaning up after an interrupted backup (pid ${job.pid}, started ${job.started})`);
    if (dom.state !== 'shutoff') {
      if (await hv.abortBackup(dom.name).catch(() => false)) say('aborted its leftover libvirt backup job');
    }
    if (job.checkpoint) {
      const exists = (await hv.checkpoints(dom.name).catch(() => [])).some((cp) => cp.name === job!.checkpoint);
      if (exists) {
        await hv.deleteCheckpoint(dom.name, job.checkpoint);
        say(`deleted its uncommitted checkpoint ${job.checkpoint}`);
      }
    }
    if (job.remoteSocketDir !== undefined) await removeLeftoverSocketDir(hv, job.remoteSocketDir, say);
    await removeJobFile(vmDir);
  }
  // Scratch files of a dead job are removed by libvirt when the job ends; remove what remains.
  for (const f of ['nbd.sock']) await rm(join(vmDir, f), { force: true });
}

