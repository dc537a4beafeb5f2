/**
 * Where a running VM's backup job serves its disks, and how Tresor reaches them.
 *
 * - Domain on this machine (qemu:///system, qemu+unix://...): a unix socket in the VM's scratch
 *   directory, as before. Nothing leaves the machine.
 * - Domain on another host (qemu+ssh://host/..., qemu+tcp://host/..., qemu+tls://host/...): QEMU
 *   cannot put a socket on our filesystem, so its NBD server listens on TCP at an address of that
 *   host (by default the host name of the URI, the name Tresor already reaches it by) and a port
 *   of a range (libvirt 9 allocates none for backups; a port in use is retried with another).
 *   Disk data then crosses the network, so TLS is on by default: libvirt starts the server with
 *   the host's backup certificate (qemu.conf backup_tls_x509_cert_dir) and Tresor verifies it
 *   with a CA and presents a client certificate, in QEMU's file names: ca-cert.pem,
 *   client-cert.pem, client-key.pem (default directory /etc/pki/qemu, as for QEMU's own clients).
 *   Clear text needs an explicit `tls: 'off'`, and the job log says so.
 *
 * Scratch files are paths on the domain's host. For a remote host they go to `scratchDir` when
 * given (it must exist there), else libvirt puts each next to its disk image; free space is asked
 * through libvirt's storage pools, since Tresor cannot statfs another machine.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ConnectionOptions } from 'node:tls';
import type { Hypervisor } from '../hypervisor/types.ts';
import { remoteSocketDir, sshTargetOf, type SshTarget } from '../hypervisor/ssh.ts';
import { TresorError, UsageError } from '../util/errors.ts';

export interface VmNbdOptions {
  /** Address QEMU listens on for a remote domain; default: the host name of the libvirt URI. */
  address?: string;
  /** Ports to try for a remote domain, inclusive (default 10809–10908). */
  ports?: [number, number];
  /** TLS for a remote domain's NBD server (default 'on'). */
  tls?: 'on' | 'off';
  /** CA and client certificate for TLS (default /etc/pki/qemu). */
  tlsDir?: string;
  /**
   * How a remote domain's disks travel: 'tcp' (default; TLS per `tls`), or 'ssh' (qemu+ssh only):
   * the job's NBD server on a unix socket on the host, forwarded over the ssh login virsh uses.
   */
  transport?: 'tcp' | 'ssh';
}

export const DEFAULT_NBD_PORTS: [number, number] = [10809, 10908];
export const DEFAULT_NBD_TLS_DIR = '/etc/pki/qemu';
/** Ports tried before giving up when each one is in use on the host. */
const PORT_ATTEMPTS = 5;

export type NbdServerPlan =
  | { transport: 'unix' }
  /** `socketDir`: the private directory on the host for the job's socket (chosen now, so the job file can name it). */
  | { transport: 'ssh'; ssh: SshTarget; socketDir: string }
  | { transport: 'tcp'; address: string; ports: [number, number]; tls: ConnectionOptions | undefined; tlsDir: string | undefined };

export class VmNbdError extends TresorError {}

/** Decides the transport, and loads the TLS material before any job starts (a missing file fails here). */
export async function planNbdServer(hv: Hypervisor, opts: VmNbdOptions = {}): Promise<NbdServerPlan> {
  const remote = hv.remoteHost;
  if (opts.transport === 'ssh') {
    const ssh = sshTargetOf(hv.uri);
    if (ssh === undefined) {
      throw new UsageError(`--nbd-transport ssh needs a qemu+ssh:// connection, not ${hv.uri}`, 'connect with qemu+ssh://HOST/system, or use --nbd-transport tcp');
    }
    return { transport: 'ssh', ssh, socketDir: remoteSocketDir() };
  }
  if (remote === undefined && opts.address === undefined) return { transport: 'unix' };
  const ports = opts.ports ?? DEFAULT_NBD_PORTS;
  if (!(Number.isInteger(ports[0]) && Number.isInteger(ports[1]) && ports[0] >= 1 && ports[0] <= ports[1] && ports[1] <= 65535)) {
    throw new UsageError(`NBD port range ${ports[0]}-${ports[1]} is not a range of TCP ports`, 'give a range like 10809-10908 (or one port)');
  }
  const address = opts.address ?? remote!;
  if (opts.tls === 'off') return { transport: 'tcp', address, ports, tls: undefined, tlsDir: undefined };
  const tlsDir = opts.tlsDir ?? DEFAULT_NBD_TLS_DIR;
  return { transport: 'tcp', address, ports, tls: await loadClientTls(tlsDir, address), tlsDir };
}

async function loadClientTls(dir: string, address: string): Promise<ConnectionOptions> {
  const read = async (name: string): Promise<Buffer | undefined> => {
    try {
      return await readFile(join(dir, name));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new VmNbdError('nbd-tls-files', `cannot read ${join(dir, name)}: ${(err as Error).message}`, { hint: 'check its permissions', context: { dir } });
    }
  };
  const [ca, cert, key] = await Promise.all([read('ca-cert.pem'), read('client-cert.pem'), read('client-key.pem')]);
  if (ca === undefined) {
    throw new VmNbdError('nbd-tls-files', `TLS for the backup's NBD connection to ${address} needs the CA that signed the host's backup certificate, in ${join(dir, 'ca-cert.pem')}; it is missing`, {
      hint: 'copy the CA (and client-cert.pem, client-key.pem when the host verifies clients) there or name another directory with --nbd-tls-dir; or, on a trusted network only, --nbd-tls off',
      context: { dir },
    });
  }
  if ((cert === undefined) !== (key === undefined)) {
    throw new VmNbdError('nbd-tls-files', `${dir} has ${cert ? 'client-cert.pem but no client-key.pem' : 'client-key.pem but no client-cert.pem'}`, {
      hint: 'a client certificate needs its key next to it (or remove both if the host does not verify clients)', context: { dir },
    });
  }
  return { ca, ...(cert && key ? { cert, key } : {}) };
}

/** Ports to try in order: a random start in the range (so concurrent backups rarely collide), then on. */
export function portCandidates(ports: [number, number], random = Math.random): number[] {
  const count = ports[1] - ports[0] + 1;
  const start = Math.floor(random() * count);
  const out: number[] = [];
  for (let i = 0; i < Math.min(count, PORT_ATTEMPTS); i++) out.push(ports[0] + ((start + i) % count));
  return out;
}

/** How the job log names the server. */
export function describeNbdServer(plan: NbdServerPlan, port?: number): string {
  if (plan.transport === 'unix') return 'NBD over a unix socket on this machine';
  if (plan.transport === 'ssh') return `NBD over a unix socket on ${plan.ssh.label}, forwarded over ssh`;
  return `NBD over TCP at ${plan.address}:${port ?? '?'} ${plan.tls ? `with TLS (client files from ${plan.tlsDir})` : 'IN CLEAR TEXT (--nbd-tls off): disk data crosses the network unencrypted'}`;
}
