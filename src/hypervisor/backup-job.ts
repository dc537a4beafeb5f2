/**
 * libvirt backup XML (formatbackup.rst) for pull mode, the `backup-dumpxml` reply that says what
 * libvirt actually exported, and the raw job statistics of `domjobinfo --rawstats`.
 */
import { BadInputError } from '../util/errors.ts';
import { childElement, childElements, childText, parseXml, renderXml } from '../util/xml.ts';
import type { JobInfo, JobKind, PullBackupOptions } from './types.ts';

/**
 * `<domainbackup mode='pull'>` with an NBD server on a unix socket or on TCP (optionally TLS): every
 * disk of the domain is listed, the requested ones with their scratch file, the others with
 * backup='no' (libvirt would otherwise include them by default).
 */
export function pullBackupXml(opts: PullBackupOptions, allTargets: string[]): string {
  const requested = new Map(opts.disks.map((disk) => [disk.target, disk]));
  return renderXml({
    name: 'domainbackup',
    attributes: { mode: 'pull' },
    children: [
      opts.incrementalFrom !== undefined && { name: 'incremental', children: [opts.incrementalFrom] },
      { name: 'server', attributes: serverAttributes(opts) },
      {
        name: 'disks',
        children: allTargets.map((target) => {
          const disk = requested.get(target);
          if (disk === undefined) return { name: 'disk', attributes: { name: target, backup: 'no' } };
          return {
            name: 'disk',
            attributes: {
              name: target, backup: 'yes', type: 'file', exportname: disk.exportName ?? target,
              ...(disk.backupMode === undefined ? {} : { backupmode: disk.backupMode }),
              ...(disk.backupMode === 'incremental' && opts.incrementalFrom !== undefined ? { incremental: opts.incrementalFrom } : {}),
            },
            children: [{ name: 'scratch', attributes: { file: disk.scratchFile } }],
          };
        }),
      },
    ],
  }) + '\n';
}

function serverAttributes(opts: PullBackupOptions): Record<string, string> {
  if ((opts.tcp === undefined) === (opts.socketPath === undefined)) {
    throw new BadInputError('backup-server-invalid', 'a pull backup needs exactly one NBD server: a unix socket path or a TCP address and port');
  }
  if (opts.tcp === undefined) return { transport: 'unix', socket: opts.socketPath! };
  // libvirt 9 has no port allocation for backups: the port must be given.
  return { transport: 'tcp', name: opts.tcp.address, port: String(opts.tcp.port), ...(opts.tcp.tls ? { tls: 'yes' } : {}) };
}

export interface ActiveBackupDisk {
  target: string;
  exportName: string;
  mode: 'full' | 'incremental';
  exportBitmap: string | undefined;
  scratchFile: string | undefined;
}

export interface ActiveBackup {
  mode: string;
  incremental: string | undefined;
  socketPath: string | undefined;
  /** The TCP server, when the job listens on TCP. */
  tcp: { address: string; port: number; tls: boolean } | undefined;
  disks: ActiveBackupDisk[];
}

/** Parses `backup-dumpxml` of a running job (only the disks being backed up are returned). */
export function parseActiveBackupXml(xml: string): ActiveBackup {
  const root = parseXml(xml);
  if (root.name !== 'domainbackup') throw new BadInputError('backup-xml-invalid', `expected <domainbackup>, found <${root.name}>`);
  const disks: ActiveBackupDisk[] = [];
  for (const disk of childElements(childElement(root, 'disks') ?? root, 'disk')) {
    const target = disk.attributes.name;
    if (target === undefined || disk.attributes.backup === 'no') continue;
    disks.push({
      target,
      exportName: disk.attributes.exportname ?? target,
      mode: disk.attributes.backupmode === 'incremental' ? 'incremental' : 'full',
      exportBitmap: disk.attributes.exportbitmap,
      scratchFile: childElement(disk, 'scratch')?.attributes.file,
    });
  }
  const server = childElement(root, 'server');
  const port = Number(server?.attributes.port);
  const tcp = server?.attributes.transport === 'tcp' && server.attributes.name !== undefined && Number.isInteger(port) && port > 0
    ? { address: server.attributes.name, port, tls: server.attributes.tls === 'yes' }
    : undefined;
  return {
    mode: root.attributes.mode ?? 'push',
    incremental: childText(root, 'incremental'),
    socketPath: server?.attributes.socket,
    tcp,
    disks,
  };
}

// virDomainJobType and virDomainJobOperation from libvirt-domain.h.
const JOB_STATUS: Record<string, JobInfo['status'] | undefined> = {
  '1': 'active', '2': 'active', '3': 'completed', '4': 'failed', '5': 'cancelled',
};
const JOB_KIND: Record<string, JobKind> = {
  '2': 'save', '3': 'restore', '4': 'migration-in', '5': 'migration-out', '6': 'snapshot', '8': 'dump', '9': 'backup',
};

/** Parses `domjobinfo --rawstats`; undefined when there is no job ("Job type: 0"). */
export function parseJobStats(text: string): JobInfo | undefined {
  const fields = new Map<string, string>();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) fields.set(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  const status = JOB_STATUS[fields.get('Job type') ?? '0'];
  if (status === undefined) return undefined;
  const number = (key: string): number | undefined => {
    const value = fields.get(key);
    if (value === undefined || !/^\d+$/.test(value)) return undefined;
    return Number(value);
  };
  return {
    kind: JOB_KIND[fields.get('operation') ?? ''] ?? 'other',
    status,
    elapsedMs: number('time_elapsed'),
    scratchUsed: number('disk_temp_used'),
    scratchTotal: number('disk_temp_total'),
    errorMessage: fields.get('errmsg'),
  };
}
