/**
 * The libvirt driver: the Hypervisor interface (types.ts) implemented by running `virsh`.
 *
 * Why virsh and not libvirt's RPC protocol:
 * - Every libvirt feature, now and later, with libvirt's own semantics: backup-begin with a
 *   checkpoint, checkpoint redefine/validate, agent commands, migration, events. The RPC protocol
 *   is XDR over a socket, but the hard parts are around it: the ssh transport (virsh runs
 *   `nc`/`virt-ssh-helper` on the remote side), SASL/GSSAPI and TLS authentication, keepalive,
 *   and procedure numbers and argument layouts that change between versions. virsh already speaks
 *   all of it for every URI form (qemu:///system, qemu+ssh://, qemu+tcp://, qemu+tls://,
 *   qemu+unix:///system?socket=...) with the user's libvirt client configuration.
 * - Robustness: every call has a deadline and a classified error (errors.ts); a virsh that
 *   misses one is killed, so a hung connection cannot wedge Tresor.
 * - Cost: a virsh process per call costs ~20 ms (start, connect, authenticate), and a backup
 *   makes a few dozen calls, mostly one after the other: a good part of an incremental backup's
 *   time. So calls go to a few long-running interactive virsh processes (virsh.ts), ~2–3 ms
 *   each. Data never goes through libvirt: disks are read over NBD.
 * - Secrets never go in argv (visible to every user): documents are passed in 0600 temporary
 *   files, and credentials stay in libvirt's own auth configuration.
 *
 * Open a connection with `openLibvirt(uri)`, which checks that libvirt and QEMU are recent enough
 * for pull-mode backups with checkpoints (libvirt ≥ 7.6, QEMU ≥ 6.1).
 */
import { randomBytes } from 'node:crypto';
import type { NbdTarget } from '../nbd/client.ts';
import { parseActiveBackupXml, parseJobStats, pullBackupXml } from './backup-job.ts';
import { checkpointCreateXml, parseCheckpointXml, validateCheckpointName } from './checkpoint.ts';
import { parseDomainDisks } from './domain-xml.ts';
import { HypervisorError } from './errors.ts';
import { watchVirshEvents } from './events.ts';
import { LibvirtGuestAgent } from './guest-agent.ts';
import type {
  BackupJob, BackupJobDisk, BlockInfo, CheckpointInfo, DiskInfo, DomainInfo, DomainRef, DomainState, EventWatch, GuestAgent,
  Hypervisor, HypervisorEvent, JobInfo, PullBackupOptions,
} from './types.ts';
import { Virsh } from './virsh.ts';

export { HypervisorError, type HypervisorErrorCode } from './errors.ts';
export type * from './types.ts';
export { exportDiskImage, readImageInfo, type DiskImageExport, type DiskImageExportOptions, type ImageBitmap, type ImageInfo } from './offline-disk.ts';

export const MIN_LIBVIRT_VERSION = [7, 6, 0] as const;
export const MIN_QEMU_VERSION = [6, 1, 0] as const;

export interface LibvirtVersions {
  /** The daemon's libvirt version (the library's for a local connection). */
  libvirt: string;
  hypervisor: string | undefined;
}

export interface OpenLibvirtOptions {
  /** Default deadline per virsh call (default 60 s). */
  timeoutMs?: number;
  /** virsh binary (default: `virsh` from PATH). */
  virshPath?: string;
}

/** Connects to libvirt at `uri`, checks versions, and returns the driver. */
export async function openLibvirt(uri: string, opts: OpenLibvirtOptions = {}): Promise<LibvirtHypervisor> {
  const hypervisor = new LibvirtHypervisor(uri, opts);
  const versions = await hypervisor.versions();
  requireVersion('libvirt', versions.libvirt, MIN_LIBVIRT_VERSION, uri);
  if (versions.hypervisor !== undefined && /^QEMU /.test(versions.hypervisor)) {
    requireVersion('QEMU', versions.hypervisor.slice(5), MIN_QEMU_VERSION, uri);
  }
  return hypervisor;
}

/**
 * The host a libvirt URI names when it is another machine (qemu+ssh://host/system,
 * qemu+tcp://host/system, qemu://host/system), else undefined (qemu:///system,
 * qemu+unix:///system?socket=...: this machine).
 */
export function remoteHostOf(uri: string): string | undefined {
  const match = /^[a-z0-9+]+:\/\/(?:[^@/?]*@)?(\[[^\]]+\]|[^/:?]+)/i.exec(uri);
  if (match === null) return undefined;
  const host = (match[1] as string).replace(/^\[(.*)\]$/, '$1');
  return host === '' ? undefined : host;
}

function parsePoolTarget(xml: string): string | undefined {
  return /<target>\s*<path>([^<]+)<\/path>/.exec(xml)?.[1]?.trim().replace(/\/+$/, '');
}

function parsePoolAvailable(info: string, context: { uri: string; operation: string; dir: string }): number {
  const available = /^Available:\s*(\d+)/m.exec(info)?.[1];
  if (available === undefined) throw new HypervisorError('operation-failed', `libvirt reported no free space for ${context.dir}`, { context: { ...context, info } });
  return Number(available);
}

function requireVersion(what: string, version: string, minimum: readonly number[], uri: string): void {
  const parts = version.split('.').map((part) => Number.parseInt(part, 10) || 0);
  for (let i = 0; i < minimum.length; i++) {
    const have = parts[i] ?? 0;
    const need = minimum[i] as number;
    if (have > need) return;
    if (have < need) {
      throw new HypervisorError('libvirt-too-old', `${what} ${version} at ${uri} is too old for pull-mode backups with checkpoints (need ${minimum.join('.')} or newer)`, {
        context: { uri, operation: 'connect', version },
        hint: `upgrade ${what} on that host (Debian 12 ships libvirt 9.0 and QEMU 7.2)`,
      });
    }
  }
}

const DOMAIN_STATES: Record<string, DomainState> = {
  'running': 'running', 'idle': 'running', 'blocked': 'running', 'paused': 'paused', 'in shutdown': 'shutting-down',
  'shut off': 'shutoff', 'crashed': 'crashed', 'pmsuspended': 'pmsuspended',
};
/** Parallel virsh calls when listing many domains. */
const LIST_CONCURRENCY = 4;

export class LibvirtHypervisor implements Hypervisor {
  readonly uri: string;
  readonly remoteHost: string | undefined;
  private readonly virsh: Virsh;

  constructor(uri: string, opts: OpenLibvirtOptions = {}) {
    this.uri = uri;
    this.remoteHost = remoteHostOf(uri);
    this.virsh = new Virsh(uri, { binary: opts.virshPath, timeoutMs: opts.timeoutMs, sessions: true });
  }

  /**
   * Free bytes of the filesystem holding `dir` on the domains' host, through libvirt's storage
   * pools (the only remote statvfs libvirt offers): an active directory pool with that target
   * answers; otherwise a transient directory pool is started on it for the question (it creates
   * nothing, and fails when the directory does not exist).
   */
  async freeSpace(dir: string): Promise<number> {
    const context = { uri: this.uri, operation: 'free space', dir };
    const names = (await this.virsh.run(['pool-list', '--name'], { operation: 'pool-list' })).split('\n').map((l) => l.trim()).filter((l) => l !== '');
    for (const name of names) {
      const xml = await this.virsh.run(['pool-dumpxml', name], { operation: 'pool-dumpxml', context: { pool: name } }).catch(() => '');
      if (parsePoolTarget(xml) === dir.replace(/\/+$/, '')) return parsePoolAvailable(await this.virsh.run(['pool-info', name, '--bytes'], { operation: 'pool-info', context: { pool: name } }), context);
    }
    const probe = `tresor-space-${randomBytes(4).toString('hex')}`;
    await this.virsh.run(['pool-create-as', probe, 'dir', '--target', dir], { operation: 'pool-create-as', context: { dir } });
    try {
      return parsePoolAvailable(await this.virsh.run(['pool-info', probe, '--bytes'], { operation: 'pool-info', context: { pool: probe } }), context);
    } finally {
      await this.virsh.run(['pool-destroy', probe], { operation: 'pool-destroy', context: { pool: probe } }).catch(() => undefined);
    }
  }

  async versions(): Promise<LibvirtVersions> {
    const out = await this.virsh.run(['version'], { operation: 'connect' });
    const daemon = /Running against daemon:\s*(\S+)/.exec(out)?.[1];
    const library = /Using library: libvirt\s+(\S+)/.exec(out)?.[1];
    const hypervisor = /Running hypervisor:\s*(.+)/.exec(out)?.[1]?.trim();
    return { libvirt: daemon ?? library ?? '0', hypervisor };
  }

  async listDomains(): Promise<DomainInfo[]> {
    const out = await this.virsh.run(['list', '--all', '--uuid'], { operation: 'list domains' });
    const uuids = out.split('\n').map((line) => line.trim()).filter((line) => line !== '');
    const domains: DomainInfo[] = [];
    for (let i = 0; i < uuids.length; i += LIST_CONCURRENCY) {
      const batch = await Promise.all(uuids.slice(i, i + LIST_CONCURRENCY).map((uuid) => this.getDomain(uuid).catch((err: unknown) => {
        // A domain undefined between the two calls is simply gone.
        if (err instanceof HypervisorError && err.code === 'domain-not-found') return undefined;
        throw err;
      })));
      for (const domain of batch) if (domain !== undefined) domains.push(domain);
    }
    return domains.sort((a, b) => a.name.localeCompare(b.name));
  }

  async getDomain(domain: DomainRef): Promise<DomainInfo> {
    const out = await this.virsh.run(['dominfo', domain], { operation: 'dominfo', domain });
    const field = (name: string): string => {
      const match = new RegExp(`^${name}:[ \\t]*(.*)$`, 'm').exec(out);
      if (!match) throw new HypervisorError('operation-failed', `virsh dominfo ${domain} printed no ${name}`, { context: { uri: this.uri, domain, operation: 'dominfo' } });
      return (match[1] as string).trim();
    };
    const stateText = field('State');
    return {
      name: field('Name'),
      uuid: field('UUID'),
      state: DOMAIN_STATES[stateText] ?? 'other',
      stateText,
      persistent: field('Persistent') === 'yes',
    };
  }

  domainXml(domain: DomainRef, opts: { inactive?: boolean } = {}): Promise<string> {
    return this.virsh.run(['dumpxml', domain, ...(opts.inactive === true ? ['--inactive'] : [])], { operation: 'dumpxml', domain });
  }

  async disks(domain: DomainRef, opts: { fromXml?: string } = {}): Promise<DiskInfo[]> {
    return parseDomainDisks(opts.fromXml ?? await this.domainXml(domain));
  }

  async blockInfo(domain: DomainRef, target: string): Promise<BlockInfo> {
    const out = await this.virsh.run(['domblkinfo', domain, target], { operation: 'domblkinfo', domain, context: { disk: target } });
    const value = (name: string): number => {
      const match = new RegExp(`^${name}:\\s*(\\d+)`, 'm').exec(out);
      if (!match) throw new HypervisorError('operation-failed', `virsh domblkinfo ${domain} ${target} printed no ${name}`, { context: { uri: this.uri, domain, operation: 'domblkinfo' } });
      return Number(match[1]);
    };
    return { capacity: value('Capacity'), allocation: value('Allocation'), physical: value('Physical') };
  }

  async checkpoints(domain: DomainRef, opts: { sizes?: boolean } = {}): Promise<CheckpointInfo[]> {
    const names = await this.checkpointNames(domain);
    const describe = async (name: string): Promise<CheckpointInfo> => {
      const info = parseCheckpointXml(await this.checkpointXml(domain, name));
      if (opts.sizes === true) {
        const sized = parseCheckpointXml(await this.virsh.run(['checkpoint-dumpxml', domain, name, '--no-domain', '--size'], { operation: 'checkpoint-dumpxml', domain }));
        info.disks = sized.disks;
      }
      return info;
    };
    const infos: CheckpointInfo[] = [];
    for (let i = 0; i < names.length; i += LIST_CONCURRENCY) {
      infos.push(...await Promise.all(names.slice(i, i + LIST_CONCURRENCY).map(describe)));
    }
    return infos;
  }

  async checkpointNames(domain: DomainRef): Promise<string[]> {
    const out = await this.virsh.run(['checkpoint-list', domain, '--name', '--topological'], { operation: 'checkpoint-list', domain });
    return out.split('\n').map((line) => line.trim()).filter((line) => line !== '');
  }

  checkpointXml(domain: DomainRef, name: string): Promise<string> {
    return this.virsh.run(['checkpoint-dumpxml', domain, name], { operation: 'checkpoint-dumpxml', domain, context: { checkpoint: name } });
  }

  async redefineCheckpoint(domain: DomainRef, xml: string, opts: { validate?: boolean } = {}): Promise<void> {
    const checkpoint = parseCheckpointXml(xml).name;
    await this.virsh.withFiles([xml], async ([file]) => {
      const args = ['checkpoint-create', domain, file as string, '--redefine', ...(opts.validate === true ? ['--redefine-validate'] : [])];
      await this.virsh.run(args, { operation: 'checkpoint-redefine', domain, context: { checkpoint } });
    });
  }

  async deleteCheckpoint(domain: DomainRef, name: string, opts: { metadataOnly?: boolean } = {}): Promise<void> {
    const args = ['checkpoint-delete', domain, name, ...(opts.metadataOnly === true ? ['--metadata'] : [])];
    await this.virsh.run(args, { operation: 'checkpoint-delete', domain, context: { checkpoint: name } });
  }

  async beginPullBackup(domain: DomainRef, opts: PullBackupOptions): Promise<BackupJob> {
    const context = { uri: this.uri, domain, operation: 'backup-begin' };
    if (opts.disks.length === 0) {
      throw new HypervisorError('disk-not-found', 'a backup needs at least one disk', { context, hint: 'name the disks to back up (all excluded?)' });
    }
    if (opts.checkpointName !== undefined) validateCheckpointName(opts.checkpointName);
    // libvirt waits 30 s for its job lock before refusing a second job: find out at once.
    const [allDisks, active] = await Promise.all([this.disks(domain, { fromXml: opts.definition }), this.jobInfo(domain)]);
    for (const disk of opts.disks) {
      if (!allDisks.some((candidate) => candidate.target === disk.target)) {
        throw new HypervisorError('disk-not-found', `domain ${domain} has no disk ${disk.target} (it has ${allDisks.map((d) => d.target).join(', ') || 'none'})`, {
          context, hint: 'use the target names `disks()` reports (vda, sda...); the definition may have changed since',
        });
      }
    }
    if (active !== undefined) {
      throw new HypervisorError('backup-job-running', `domain ${domain} already has a ${active.kind} job running`, {
        context: { ...context, job: active.kind },
        hint: active.kind === 'backup'
          ? `abort the leftover backup job first (Hypervisor.abortBackup, or virsh -c '${this.uri}' domjobabort ${domain})`
          : 'wait until the other job (e.g. a migration) has finished',
      });
    }
    const targets = allDisks.map((disk) => disk.target);
    const documents = [pullBackupXml(opts, targets)];
    if (opts.checkpointName !== undefined) {
      documents.push(checkpointCreateXml(opts.checkpointName, opts.checkpointDisks ?? opts.disks.map((disk) => disk.target), targets));
    }
    await this.virsh.withFiles(documents, (files) => this.virsh.run(['backup-begin', domain, ...files], {
      operation: 'backup-begin', domain,
      context: { ...(opts.tcp ? { nbd: `${opts.tcp.address}:${opts.tcp.port}`, tls: opts.tcp.tls !== undefined } : { socketPath: opts.socketPath }), incrementalFrom: opts.incrementalFrom, checkpoint: opts.checkpointName },
    }));
    try {
      return await this.describeBackup(domain, opts);
    } catch (err) {
      await this.abortBackup(domain).catch(() => undefined);
      throw err;
    }
  }

  private async describeBackup(domain: DomainRef, opts: PullBackupOptions): Promise<BackupJob> {
    const active = parseActiveBackupXml(await this.virsh.run(['backup-dumpxml', domain], { operation: 'backup-dumpxml', domain }));
    const disks: BackupJobDisk[] = opts.disks.map((requested) => {
      const exported = active.disks.find((disk) => disk.target === requested.target);
      if (exported === undefined) {
        throw new HypervisorError('operation-failed', `libvirt's backup job on ${domain} does not export disk ${requested.target}`, {
          context: { uri: this.uri, domain, operation: 'backup-begin' },
        });
      }
      return {
        target: requested.target,
        exportName: exported.exportName,
        mode: exported.mode,
        dirtyBitmapContext: exported.exportBitmap === undefined ? undefined : `qemu:dirty-bitmap:${exported.exportBitmap}`,
        scratchFile: exported.scratchFile ?? requested.scratchFile,
      };
    });
    let nbd: NbdTarget;
    if (opts.tcp !== undefined) {
      const listening = active.tcp ?? opts.tcp;
      // The reader's TLS options are ours, not libvirt's: the job only says that TLS is on.
      nbd = { host: listening.address, port: listening.port, ...(opts.tcp.tls ? { tls: opts.tcp.tls } : {}) };
    } else {
      nbd = { unix: active.socketPath ?? opts.socketPath! };
    }
    return {
      domain,
      nbd,
      socketPath: opts.tcp ? undefined : active.socketPath ?? opts.socketPath,
      disks,
      checkpointName: opts.checkpointName,
      incrementalFrom: opts.incrementalFrom,
      finish: async () => {
        await this.abortBackup(domain);
      },
    };
  }

  async jobInfo(domain: DomainRef, opts: { completed?: boolean } = {}): Promise<JobInfo | undefined> {
    const args = ['domjobinfo', domain, '--rawstats', ...(opts.completed === true ? ['--completed', '--keep-completed'] : [])];
    return parseJobStats(await this.virsh.run(args, { operation: 'domjobinfo', domain }));
  }

  async abortBackup(domain: DomainRef): Promise<boolean> {
    const job = await this.jobInfo(domain);
    if (job === undefined || job.kind !== 'backup') return false;
    try {
      await this.virsh.run(['domjobabort', domain], { operation: 'domjobabort', domain });
    } catch (err) {
      // It ended between the two calls.
      if (err instanceof HypervisorError && err.code === 'no-backup-job') return false;
      throw err;
    }
    await this.untilBackupEnded(domain);
    return true;
  }

  /**
   * domjobabort returns while libvirt still tears the job down (QEMU's block jobs end a moment
   * later): until then the domain still reports an active backup job, and checkpoint changes or
   * a new job would be refused. Waits until it is gone.
   */
  private async untilBackupEnded(domain: DomainRef, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (let wait = 5; ; wait = Math.min(wait * 2, 200)) {
      const job = await this.jobInfo(domain);
      if (job === undefined || job.kind !== 'backup') return;
      if (Date.now() > deadline) {
        throw new HypervisorError('timeout', `the backup job on domain ${domain} was aborted but had not ended after ${timeoutMs} ms`, {
          context: { uri: this.uri, domain, operation: 'domjobabort', timeoutMs },
          hint: 'check `virsh domjobinfo` and libvirtd\'s log; the job may need `virsh domjobabort` again',
        });
      }
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  async suspend(domain: DomainRef): Promise<void> {
    await this.virsh.run(['suspend', domain], { operation: 'suspend', domain });
  }

  async resume(domain: DomainRef): Promise<void> {
    await this.virsh.run(['resume', domain], { operation: 'resume', domain });
  }

  guestAgent(domain: DomainRef): GuestAgent {
    return new LibvirtGuestAgent(this.virsh, domain);
  }

  watchEvents(listener: (event: HypervisorEvent) => void, opts: { domain?: DomainRef } = {}): EventWatch {
    return watchVirshEvents(this.uri, listener, opts);
  }
}
