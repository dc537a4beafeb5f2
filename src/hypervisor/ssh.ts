/**
 * Commands on a libvirt host reached by `qemu+ssh://`, with the same ssh settings virsh uses for
 * that URI (libvirt's remote URI parameters): user, port, `keyfile`, `no_verify`, `command` (the
 * ssh binary). Authentication stays ssh's own (agent, keys, known_hosts); no secret passes through
 * Tresor. Used for what libvirt cannot do for us on a remote host: reading a shut-off domain's
 * images (qemu-img info, qemu-nbd).
 */
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { HypervisorError } from './errors.ts';

export interface SshTarget {
  host: string;
  user: string | undefined;
  port: number | undefined;
  keyfile: string | undefined;
  noVerify: boolean;
  /** The ssh client binary (`command=` in the URI; default `ssh`). */
  command: string;
  /** For messages: user@host:port. */
  label: string;
}

/** The ssh target of a `qemu+ssh://` URI, or undefined for any other URI. */
export function sshTargetOf(uri: string): SshTarget | undefined {
  if (!/^[a-z0-9]+\+ssh:\/\//i.test(uri)) return undefined;
  let url: URL;
  try {
    url = new URL(uri.replace(/^[^:]+:/, 'ssh:'));
  } catch {
    return undefined;
  }
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  if (host === '') return undefined;
  const user = url.username === '' ? undefined : decodeURIComponent(url.username);
  const port = url.port === '' ? undefined : Number(url.port);
  return {
    host, user, port,
    keyfile: url.searchParams.get('keyfile') ?? undefined,
    noVerify: url.searchParams.get('no_verify') === '1',
    command: url.searchParams.get('command') ?? 'ssh',
    label: `${user === undefined ? '' : `${user}@`}${host}${port === undefined ? '' : `:${port}`}`,
  };
}

/** ssh arguments up to and including the host; `extra` go before the host (e.g. -L forwards). */
export function sshArgs(t: SshTarget, extra: string[] = []): string[] {
  return [
    '-T', '-o', 'BatchMode=yes', '-e', 'none',
    ...(t.port === undefined ? [] : ['-p', String(t.port)]),
    ...(t.user === undefined ? [] : ['-l', t.user]),
    ...(t.keyfile === undefined ? [] : ['-i', t.keyfile]),
    ...(t.noVerify ? ['-o', 'StrictHostKeyChecking=no'] : []),
    ...extra,
    '--', t.host,
  ];
}

/** One word for the remote POSIX shell. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./:=@%+-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * A fresh path for a private directory in a host's /tmp that will hold an NBD socket: the name is
 * unguessable, so nobody there can create it first; the caller makes it 0700.
 */
export function remoteSocketDir(): string {
  return `/tmp/tresor-nbd-${randomBytes(8).toString('hex')}`;
}

/** True for a path remoteSocketDir could have made (checked before a recorded one is removed). */
export function isRemoteSocketDir(path: string): boolean {
  return /^\/tmp\/tresor-nbd-[0-9a-f]{16}$/.test(path);
}

/** Removes, over ssh, a directory remoteSocketDir made; any other path is refused (this is rm -rf). */
export async function removeRemoteSocketDir(t: SshTarget, dir: string): Promise<void> {
  if (!isRemoteSocketDir(dir)) {
    throw new HypervisorError('operation-failed', `${JSON.stringify(dir)} on ${t.label} is not an NBD socket directory of Tresor's: not removed`, {
      context: { operation: 'remove the NBD socket directory', host: t.label }, hint: 'this is a bug in Tresor: only directories it made are removed',
    });
  }
  await runOverSsh(t, ['rm', '-rf', dir], { operation: 'remove the NBD socket directory' });
}

export interface SshForward {
  /** Stops forwarding (the local socket is removed). */
  close(): Promise<void>;
}

/**
 * Forwards the local unix socket `localPath` to `remotePath` on the host (`ssh -N -L`), until
 * close() or this process's death (ssh runs under pdeathsig). Resolves once ssh listens.
 */
export async function forwardUnixSocket(t: SshTarget, localPath: string, remotePath: string): Promise<SshForward> {
  await rm(localPath, { force: true });
  const forward = ['-N', '-o', 'ExitOnForwardFailure=yes', '-o', 'StreamLocalBindUnlink=yes', '-L', `${localPath}:${remotePath}`];
  const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', t.command, ...sshArgs(t, forward)], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr = (stderr + chunk).slice(-4096); });
  const exited = new Promise<void>((resolve) => {
    child.on('error', () => resolve());
    child.on('close', () => resolve());
  });
  const deadline = Date.now() + 15_000;
  while (!existsSync(localPath)) {
    if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      await exited;
      throw new HypervisorError('libvirt-unreachable', `ssh to ${t.label} did not forward ${localPath} to ${remotePath}: ${stderr.trim() || 'no message'}`, {
        context: { operation: 'ssh forward', host: t.label }, hint: `check that \`${t.command} ${t.label}\` logs in without a prompt and that the server allows stream-local forwarding`,
      });
    }
    await Promise.race([sleep(20), exited]);
  }
  return {
    async close(): Promise<void> {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
      await rm(localPath, { force: true });
    },
  };
}

/** Runs `argv` on the host (through its login shell, every word quoted) and returns stdout. */
export function runOverSsh(t: SshTarget, argv: string[], opts: { operation: string; timeoutMs?: number }): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const remote = ['env', 'LC_ALL=C', ...argv].map(shellQuote).join(' ');
    execFile(t.command, [...sshArgs(t), remote], { maxBuffer: 16 << 20, timeout: opts.timeoutMs ?? 60_000 }, (err, stdout, stderr) => {
      if (err === null) return resolve({ stdout, stderr });
      const code = (err as { code?: unknown }).code;
      reject(Object.assign(new HypervisorError(code === 255 ? 'libvirt-unreachable' : 'operation-failed',
        `${opts.operation} on ${t.label} over ssh failed: ${stderr.trim() || err.message}`, {
          context: { operation: opts.operation, host: t.label },
          hint: code === 255 ? `check that \`${t.command} ${t.label}\` logs in without a prompt (keys or agent), as virsh's qemu+ssh needs too` : undefined,
        }), { stderr }));
    });
  });
}
