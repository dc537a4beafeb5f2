/**
 * Disks of shut-off domains: reading a qcow2's persistent dirty bitmaps (so the engine can decide
 * whether an incremental is possible) and exporting the image read-only over NBD with qemu-nbd
 * (optionally with a bitmap as `qemu:dirty-bitmap:NAME`), the same way a running domain's backup
 * job exports it.
 *
 * qemu-nbd runs as our child under `setpriv --pdeathsig KILL`: if this process dies, the kernel
 * kills qemu-nbd too, so a leftover export never holds the image's lock and stops the VM from
 * starting.
 *
 * On a host reached by `qemu+ssh://` (ssh.ts) both run there, over ssh: qemu-nbd listens on a unix
 * socket in a private directory in the host's /tmp, and ssh forwards a local socket to it, so the
 * data is encrypted and authenticated by the ssh connection virsh already relies on. The remote side is tied to the
 * ssh session: when our end closes (close(), or this process dying: ssh runs under pdeathsig
 * too), a watcher there sees its stdin end and stops qemu-nbd.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient, type NbdTarget } from '../nbd/client.ts';
import { HypervisorError } from './errors.ts';
import { remoteSocketDir, runOverSsh, shellQuote, sshArgs, type SshTarget } from './ssh.ts';

export interface ImageBitmap {
  name: string;
  granularity: number;
  /** 'in-use' in a closed image: QEMU did not close it cleanly, the bitmap cannot be trusted. */
  inUse: boolean;
  /** Tracks writes (enabled). */
  auto: boolean;
}

export interface ImageInfo {
  format: string;
  virtualSize: number;
  /** qcow2 compat level ('1.1' = v3, which is needed for persistent bitmaps). */
  compat: string | undefined;
  bitmaps: ImageBitmap[];
  /** qcow2 dirty flag (lazy refcounts left dirty). */
  dirty: boolean;
}

/**
 * `qemu-img info` of a disk image, with its persistent bitmaps. `force` (-U) reads an image that
 * another process (a running QEMU) holds; its bitmaps then show in-use because QEMU has them open.
 */
export async function readImageInfo(path: string, opts: { force?: boolean; ssh?: SshTarget } = {}): Promise<ImageInfo> {
  const args = ['info', '--output=json', ...(opts.force === true ? ['-U'] : []), path];
  const out = await runTool('qemu-img', args, 'qemu-img info', path, opts.ssh);
  let json: {
    format?: unknown; 'virtual-size'?: unknown; 'dirty-flag'?: unknown;
    'format-specific'?: { data?: { compat?: unknown; bitmaps?: Array<{ name?: unknown; granularity?: unknown; flags?: unknown }> } };
  };
  try {
    json = JSON.parse(out) as typeof json;
  } catch (err) {
    throw new HypervisorError('operation-failed', `qemu-img info ${path} printed something that is not JSON`, { context: { operation: 'qemu-img info', path }, cause: err });
  }
  const data = json['format-specific']?.data;
  const bitmaps: ImageBitmap[] = (Array.isArray(data?.bitmaps) ? data.bitmaps : []).map((bitmap) => {
    const flags = Array.isArray(bitmap.flags) ? bitmap.flags : [];
    return {
      name: String(bitmap.name),
      granularity: Number(bitmap.granularity),
      inUse: flags.includes('in-use'),
      auto: flags.includes('auto'),
    };
  });
  return {
    format: String(json.format),
    virtualSize: Number(json['virtual-size']),
    compat: typeof data?.compat === 'string' ? data.compat : undefined,
    bitmaps,
    dirty: json['dirty-flag'] === true,
  };
}

export interface DiskImageExportOptions {
  image: string;
  /** Unix socket to listen on (created by qemu-nbd; removed on close). */
  socketPath: string;
  /** Image format; default: probed by qemu-img info (never guessed by qemu-nbd). */
  format?: string;
  exportName?: string;
  /** Persistent bitmap to expose as `qemu:dirty-bitmap:NAME`. */
  bitmap?: string;
  /** Parallel client connections allowed (default 8). */
  maxConnections?: number;
  /** The image is on this host (qemu+ssh): qemu-nbd runs there, `socketPath` forwards to it. */
  ssh?: SshTarget;
}

export interface DiskImageExport {
  readonly nbd: NbdTarget;
  readonly exportName: string;
  /** Meta context of the bitmap, when one was exported. */
  readonly dirtyBitmapContext: string | undefined;
  close(): Promise<void>;
}

const READY_TIMEOUT_MS = 15_000;

/** Exports a (shut-off domain's) disk image read-only over NBD on a unix socket. */
export async function exportDiskImage(opts: DiskImageExportOptions): Promise<DiskImageExport> {
  const format = opts.format ?? (await readImageInfo(opts.image, { ssh: opts.ssh })).format;
  const exportName = opts.exportName ?? 'disk';
  // On a remote host: a private directory (0700, unguessable name) so no other user there can
  // connect to the export.
  const serverDir = remoteSocketDir();
  const serverSocket = opts.ssh === undefined ? opts.socketPath : `${serverDir}/nbd.sock`;
  const qemuNbd = [
    'qemu-nbd', '--read-only', '--persistent', `--shared=${opts.maxConnections ?? 8}`,
    `--format=${format}`, `--export-name=${exportName}`, `--socket=${serverSocket}`, '--cache=none', '--aio=threads',
    ...(opts.bitmap === undefined ? [] : [`--bitmap=${opts.bitmap}`]), opts.image,
  ];
  const context = { operation: 'qemu-nbd export', path: opts.image, socketPath: opts.socketPath, ...(opts.ssh ? { host: opts.ssh.label } : {}) };
  let child: ChildProcess;
  if (opts.ssh === undefined) {
    child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', ...qemuNbd], { stdio: ['ignore', 'ignore', 'pipe'] });
  } else {
    await rm(opts.socketPath, { force: true });
    // qemu-nbd in the background; a watcher stops it when the session's stdin ends (fd 3: sh
    // gives background jobs /dev/null as stdin); the script ends (and with it the session) when
    // qemu-nbd does, with its status.
    const script = `mkdir -m 700 ${shellQuote(serverDir)} || exit 1; exec 3<&0; ${qemuNbd.map(shellQuote).join(' ')} & pid=$!; `
      + `(cat <&3 >/dev/null; kill $pid 2>/dev/null) >/dev/null 2>&1 & exec 3<&-; wait $pid; status=$?; rm -rf ${shellQuote(serverDir)}; exit $status`;
    const forward = ['-o', 'ExitOnForwardFailure=yes', '-o', 'StreamLocalBindUnlink=yes', '-L', `${opts.socketPath}:${serverSocket}`];
    child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', opts.ssh.command, ...sshArgs(opts.ssh, forward), `sh -c ${shellQuote(script)}`], { stdio: ['pipe', 'ignore', 'pipe'] });
    child.stdin!.on('error', () => undefined); // the session may be gone when we end it
  }
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => { stderr = (stderr + chunk).slice(-4096); });
  const exited = new Promise<number | null>((resolve) => {
    child.on('error', () => resolve(-1));
    child.on('close', (code) => resolve(code));
  });
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      // 'close' comes only after stderr was read to the end: the reason must be complete.
      await exited;
      throw exportFailure(stderr, context);
    }
    if (existsSync(opts.socketPath) && await servesExport(opts.socketPath, exportName)) break;
    if (Date.now() > deadline) {
      await stopChild(child, exited);
      throw new HypervisorError('timeout', `qemu-nbd did not listen on ${opts.socketPath} within ${READY_TIMEOUT_MS} ms`, { context });
    }
    await Promise.race([sleep(50), exited]);
  }
  let closed = false;
  return {
    nbd: { unix: opts.socketPath },
    exportName,
    dirtyBitmapContext: opts.bitmap === undefined ? undefined : `qemu:dirty-bitmap:${opts.bitmap}`,
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      // Over ssh: ending the session's stdin lets the host stop qemu-nbd and remove its socket.
      if (child.stdin !== null) {
        child.stdin.end();
        await Promise.race([exited, sleep(5000)]);
      }
      await stopChild(child, exited);
      await rm(opts.socketPath, { force: true });
    },
  };
}

function exportFailure(stderr: string, context: Record<string, unknown> & { operation: string }): HypervisorError {
  // Over ssh, every readiness probe before qemu-nbd listened left a "channel N: open failed" line.
  const message = stderr.split(/\r?\n/).filter((line) => !/^channel \d+: open failed/.test(line)).join('\n').trim() || 'qemu-nbd exited';
  if (IMAGE_LOCKED.test(message)) return imageInUse(message, context);
  if (/bitmap/i.test(message)) {
    return new HypervisorError('checkpoint-not-found', `qemu-nbd cannot export the bitmap: ${message}`, {
      context, hint: 'the bitmap is missing or inconsistent: take a full backup',
    });
  }
  if (/setpriv|No such file/i.test(message) && !existsSync('/usr/bin/qemu-nbd')) {
    return new HypervisorError('operation-failed', 'qemu-nbd is not installed', { context, hint: 'install the Debian package qemu-utils' });
  }
  return new HypervisorError('operation-failed', `qemu-nbd failed: ${message}`, { context });
}

const IMAGE_LOCKED = /Failed to get .*lock|Is another process using the image/i;

function imageInUse(message: string, context: Record<string, unknown> & { operation: string }): HypervisorError {
  return new HypervisorError('disk-in-use', `the disk image is in use by another process: ${message}`, {
    context, hint: 'a running VM (or another export) holds the image: back it up through libvirt while it runs, or stop the other process',
  });
}

async function stopChild(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/**
 * Ready means the export answers an NBD handshake, not merely that the socket accepts: qemu-nbd
 * listens before it has checked the bitmap it was asked for, and then exits.
 */
async function servesExport(socketPath: string, exportName: string): Promise<boolean> {
  try {
    const client = await NbdClient.connect({ unix: socketPath }, { exportName, timeoutMs: 5000 });
    await client.close();
    return true;
  } catch {
    return false;
  }
}

async function runTool(cmd: string, args: string[], operation: string, path: string, ssh?: SshTarget): Promise<string> {
  if (ssh !== undefined) {
    try {
      return (await runOverSsh(ssh, [cmd, ...args], { operation: `${operation} ${path}` })).stdout;
    } catch (err) {
      const stderr = (err as { stderr?: string }).stderr ?? '';
      if (IMAGE_LOCKED.test(stderr)) throw imageInUse(stderr.trim(), { operation, path, host: ssh.label });
      throw err;
    }
  }
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 16 << 20, timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      if (err === null) return resolve(stdout);
      if (IMAGE_LOCKED.test(stderr)) return reject(imageInUse(stderr.trim(), { operation, path }));
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      reject(new HypervisorError('operation-failed', missing ? `${cmd} is not installed` : `${operation} ${path} failed: ${stderr.trim() || err.message}`, {
        context: { operation, path },
        hint: missing ? 'install the Debian package qemu-utils' : undefined,
      }));
    });
  });
}
