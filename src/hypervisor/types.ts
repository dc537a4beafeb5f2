/**
 * The hypervisor interface the backup engine programs against, and the data it returns.
 * One implementation: the libvirt driver (libvirt.ts). Domains are named by name or UUID
 * (`DomainRef`); prefer the UUID, which survives renames and migrations.
 */
import type { ConnectionOptions as NbdTlsOptions } from 'node:tls';
import type { NbdTarget } from '../nbd/client.ts';

/** A domain's name or UUID. */
export type DomainRef = string;

export type DomainState = 'running' | 'paused' | 'shutting-down' | 'shutoff' | 'crashed' | 'pmsuspended' | 'other';

export interface DomainInfo {
  name: string;
  uuid: string;
  state: DomainState;
  /** libvirt's state word as printed (e.g. 'in shutdown'), for messages. */
  stateText: string;
  /** Defined (survives shut off) rather than transient. */
  persistent: boolean;
}

export interface DiskInfo {
  /** Target device name: vda, sda... (the name checkpoints and backups use). */
  target: string;
  /** virtio, scsi, sata, ide... */
  bus: string;
  /** file, block, network, volume. */
  sourceType: string;
  /** Path of the file or block device; undefined for network disks and empty drives. */
  source: string | undefined;
  /** For network disks: protocol and name (e.g. rbd pool/image). */
  network?: { protocol: string; name: string };
  /** Driver format: qcow2, raw... */
  format: string | undefined;
  readonly: boolean;
  shareable: boolean;
  /** Device alias in a running domain (e.g. scsi0-0-0-0); undefined when shut off. */
  alias: string | undefined;
}

export interface BlockInfo {
  /** Guest-visible size in bytes. */
  capacity: number;
  /** Host bytes in use. */
  allocation: number;
  /** Host size of the file or device. */
  physical: number;
}

export interface CheckpointDisk {
  target: string;
  /** 'bitmap' or 'no'. */
  checkpoint: string;
  /** Name of the dirty bitmap in the qcow2 (usually the checkpoint name). */
  bitmap: string | undefined;
  /** Bytes dirty since the checkpoint, when asked for (running domains only). */
  size?: number;
}

export interface CheckpointInfo {
  name: string;
  /** Seconds since the epoch. */
  creationTime: number;
  parent: string | undefined;
  disks: CheckpointDisk[];
  /** The checkpoint's full XML (with the domain definition), as `redefineCheckpoint` accepts it. */
  xml: string;
}

export interface PullBackupDisk {
  target: string;
  /**
   * Scratch (fleecing) file for copy-before-write data, a path on the domain's host; its directory
   * must be writable by QEMU. (libvirt 9 cannot name one itself for a disk the XML lists: it
   * fails with "argument key 'filename' must not have null value".)
   */
  scratchFile: string;
  /** NBD export name; default: the target. */
  exportName?: string;
  /**
   * Per-disk mode (libvirt ≥ 7.6 `backupmode`): 'full' reads this disk whole even in an
   * incremental job (e.g. a disk without the checkpoint's bitmap, or resized since).
   */
  backupMode?: 'full' | 'incremental';
}

/** An NBD server on TCP, for a domain on another host than the reader. */
export interface PullBackupTcpServer {
  /** Address QEMU listens on and the reader connects to (an address of the domain's host). */
  address: string;
  port: number;
  /**
   * TLS (libvirt's `tls='yes'`: the host's backup_tls_x509_* settings in qemu.conf) with these
   * client options (CA, client certificate) for the reader; without it the data goes in clear.
   */
  tls?: NbdTlsOptions;
}

export interface PullBackupOptions {
  /** Unix socket the NBD server listens on (its directory must be writable by QEMU); or `tcp`. */
  socketPath?: string;
  /** TCP server instead of a unix socket: for a domain on another host. Exactly one of the two. */
  tcp?: PullBackupTcpServer;
  disks: PullBackupDisk[];
  /** Checkpoint the incremental starts from; without it the backup is full. */
  incrementalFrom?: string;
  /** Creates this checkpoint atomically with the backup's point in time. */
  checkpointName?: string;
  /** Disks the new checkpoint tracks with a bitmap (default: every backed-up disk); others get checkpoint='no'. */
  checkpointDisks?: string[];
  /**
   * The domain's live definition, when the caller has just read it: saves asking again. (A disk
   * added or removed since then makes libvirt refuse the job, so this is only a shortcut.)
   */
  definition?: string;
}

export interface BackupJobDisk {
  target: string;
  exportName: string;
  mode: 'full' | 'incremental';
  /** NBD meta context with the dirty blocks (`qemu:dirty-bitmap:backup-<target>`), for incrementals. */
  dirtyBitmapContext: string | undefined;
  /** Where libvirt put the scratch file (on the domain's host), when it says. */
  scratchFile: string | undefined;
}

/** A running pull-mode backup: read each disk's export over NBD, then `finish()` (or `abort()`). */
export interface BackupJob {
  readonly domain: DomainRef;
  /** Where to connect the NBD client (same server for every disk). */
  readonly nbd: NbdTarget;
  /** The unix socket, when the server is not on TCP. */
  readonly socketPath: string | undefined;
  readonly disks: BackupJobDisk[];
  readonly checkpointName: string | undefined;
  readonly incrementalFrom: string | undefined;
  /** Ends the job (libvirt aborts pull jobs to end them); the checkpoint, if any, stays. */
  finish(): Promise<void>;
}

export type JobKind = 'backup' | 'migration-out' | 'migration-in' | 'snapshot' | 'save' | 'restore' | 'dump' | 'other';

export interface JobInfo {
  kind: JobKind;
  /** 'active' while running; 'completed', 'failed' or 'cancelled' for a finished job (`completed: true`). */
  status: 'active' | 'completed' | 'failed' | 'cancelled';
  elapsedMs: number | undefined;
  /** Scratch bytes used by copy-before-write / reserved, for backups. */
  scratchUsed: number | undefined;
  scratchTotal: number | undefined;
  errorMessage: string | undefined;
}

export interface GuestAgentInfo {
  version: string;
  supportedCommands: string[];
}

/** The QEMU guest agent of one domain. Errors: HypervisorError 'agent-not-configured' / 'agent-not-responding'. */
export interface GuestAgent {
  ping(timeoutSeconds?: number): Promise<void>;
  info(): Promise<GuestAgentInfo>;
  /** Freezes the guest's filesystems (running its fsfreeze hooks); returns how many froze. */
  freeze(mountpoints?: string[]): Promise<number>;
  /** Thaws them; returns how many thawed. */
  thaw(): Promise<number>;
  freezeStatus(): Promise<'frozen' | 'thawed'>;
}

export interface HypervisorEvent {
  time: Date;
  /** libvirt's event name: lifecycle, job-completed, agent-lifecycle, block-job... */
  type: string;
  domain: string;
  /** The rest of the event line (and continuation lines), e.g. 'Stopped Destroyed'. */
  detail: string;
}

export interface EventWatch {
  close(): Promise<void>;
}

export interface Hypervisor {
  readonly uri: string;
  /**
   * The host the URI names when it is another machine; undefined for this one. Paths the driver
   * takes or returns (scratch files, images) are on that host; NBD then goes over TCP.
   */
  readonly remoteHost: string | undefined;
  /** Free bytes of the filesystem holding `dir` on the domains' host (the directory must exist there). */
  freeSpace(dir: string): Promise<number>;
  listDomains(): Promise<DomainInfo[]>;
  getDomain(domain: DomainRef): Promise<DomainInfo>;
  /** The domain definition; `inactive` gives the persistent definition of a running domain. */
  domainXml(domain: DomainRef, opts?: { inactive?: boolean }): Promise<string>;
  /**
   * Disks of device type 'disk' (cdrom, floppy and lun are left out); from `fromXml` (a definition
   * `domainXml` returned) instead of asking again when given.
   */
  disks(domain: DomainRef, opts?: { fromXml?: string }): Promise<DiskInfo[]>;
  blockInfo(domain: DomainRef, target: string): Promise<BlockInfo>;
  checkpoints(domain: DomainRef, opts?: { sizes?: boolean }): Promise<CheckpointInfo[]>;
  /** Names of the domain's checkpoints, parents before children (cheaper than `checkpoints`). */
  checkpointNames(domain: DomainRef): Promise<string[]>;
  checkpointXml(domain: DomainRef, name: string): Promise<string>;
  /** Recreates checkpoint metadata from a saved XML; `validate` checks the bitmaps exist and are consistent. */
  redefineCheckpoint(domain: DomainRef, xml: string, opts?: { validate?: boolean }): Promise<void>;
  /** Deletes a checkpoint (merging its bitmap into the parent); `metadataOnly` keeps the bitmaps. */
  deleteCheckpoint(domain: DomainRef, name: string, opts?: { metadataOnly?: boolean }): Promise<void>;
  beginPullBackup(domain: DomainRef, opts: PullBackupOptions): Promise<BackupJob>;
  /** The domain's active job, or undefined; `completed` returns the last finished job instead. */
  jobInfo(domain: DomainRef, opts?: { completed?: boolean }): Promise<JobInfo | undefined>;
  /**
   * Aborts the domain's backup job (ours, or one left by a killed process); returns false when
   * there was none. Never aborts another kind of job (a migration).
   */
  abortBackup(domain: DomainRef): Promise<boolean>;
  suspend(domain: DomainRef): Promise<void>;
  resume(domain: DomainRef): Promise<void>;
  guestAgent(domain: DomainRef): GuestAgent;
  /** Streams domain events until closed. */
  watchEvents(listener: (event: HypervisorEvent) => void, opts?: { domain?: DomainRef }): EventWatch;
}
