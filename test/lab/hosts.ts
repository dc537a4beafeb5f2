/**
 * Extra libvirt hosts on this machine for migration tests (recipe: ../shared/LAB.md §5).
 *
 * Host i is a network namespace (veth to a bridge that lives in its own namespace) plus a private
 * mount/UTS namespace in which per-host directories are bind-mounted over /etc/libvirt,
 * /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, running its own
 * `libvirtd --listen` (TCP without auth, on the namespace address only). Everything else, including
 * disk image paths, is shared with the machine, so a live migration with `--unsafe` behaves like
 * one with shared storage.
 *
 * Reach host i from the test process as `qemu+unix:///system?socket=<dir>/hI/run/libvirt-sock`
 * (this machine, shared filesystem) or as a remote host, `qemu+tcp://10.X.Y.I/system`: the test
 * process's own namespace has a veth into the bridge too (address 10.X.Y.254), so NBD servers of
 * backup jobs on a host are reached over TCP exactly as on another machine. Host to host (p2p
 * migration) also uses `qemu+tcp://`. Every host's QEMU serves backup NBD over TLS with a lab
 * certificate (pki.ts); `pki.clientDir` holds the client side for Tresor. Every host also runs sshd
 * on its address (root, lab key only), for `sshUri` (qemu+ssh://).
 *
 * Teardown (stop(), also after failures): domains destroyed and undefined, libvirtd stopped, every
 * process left in the namespaces killed, namespaces deleted, directories removed. libvirtd runs
 * under `setpriv --pdeathsig KILL`, and namespace names carry the test process id, so a lab left
 * by a killed test process is swept by the next startLibvirtHosts().
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { cpSync, existsSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { labDir } from './guest-image.ts';
import { createLabPki, type LabPki } from './pki.ts';
import { ensureLibvirtd } from './libvirtd.ts';
import { processAlive } from '../../src/util/process.ts';

export interface LabLibvirtHost {
  /** h1, h2... (also the host name inside its UTS namespace). */
  name: string;
  /** URI usable from the test process. */
  uri: string;
  /** URI usable from inside the lab's namespaces (for p2p migration), and from the test process. */
  tcpUri: string;
  /**
   * qemu+ssh:// URI usable from the test process: the host runs sshd (root, lab key only), and
   * the URI's `command` is a wrapper that gives ssh the lab's key and known_hosts file.
   */
  sshUri: string;
  address: string;
  netns: string;
  dir: string;
}

export interface LibvirtHostLab {
  hosts: LabLibvirtHost[];
  /** Backup TLS: server certificate valid for every host address; client files for Tresor. */
  pki: LabPki;
  /** Live-migrates a domain between two lab hosts (shared storage semantics, definition moves too). */
  migrate(domain: string, from: LabLibvirtHost, to: LabLibvirtHost, opts?: { timeoutMs?: number }): Promise<void>;
  /** Tears everything down; safe to call twice. */
  stop(): Promise<void>;
}

const NETNS_PREFIX = 'tresor-lab-';
const LIBVIRT_DIRS = { etc: '/etc/libvirt', run: '/run/libvirt', lib: '/var/lib/libvirt', log: '/var/log/libvirt', cache: '/var/cache/libvirt' } as const;
const START_TIMEOUT_MS = 30_000;

export async function startLibvirtHosts(count = 2): Promise<LibvirtHostLab> {
  if (count < 1 || count > 8) throw new Error(`startLibvirtHosts: count ${count} out of range 1..8`);
  // The main daemon's QEMU capabilities cache makes each host start in well under a second.
  await ensureLibvirtd();
  await sweepStaleNamespaces();
  const id = `${process.pid}-${randomBytes(2).toString('hex')}`;
  const subnet = `10.${200 + (randomBytes(1)[0] as number) % 50}.${(randomBytes(1)[0] as number) % 250}`;
  const bridgeNs = `${NETNS_PREFIX}${id}-br`;
  const runs = join(labDir(), 'hosts');
  await mkdir(runs, { recursive: true, mode: 0o755 });
  const base = await mkdtemp(join(runs, `${process.pid}-`));
  const lab = new HostLab(base);
  try {
    await ip(['netns', 'add', bridgeNs]);
    lab.namespaces.push(bridgeNs);
    await ip(['-n', bridgeNs, 'link', 'set', 'lo', 'up']);
    await ip(['-n', bridgeNs, 'link', 'add', 'br0', 'type', 'bridge']);
    await ip(['-n', bridgeNs, 'link', 'set', 'br0', 'up']);
    // This namespace joins the bridge as 10.X.Y.254: hosts are reachable over TCP like other machines.
    const suffix = randomBytes(3).toString('hex');
    await ip(['link', 'add', `tr${suffix}`, 'type', 'veth', 'peer', 'name', `tb${suffix}`, 'netns', bridgeNs]);
    await ip(['addr', 'add', `${subnet}.254/24`, 'dev', `tr${suffix}`]);
    await ip(['link', 'set', `tr${suffix}`, 'up']);
    await ip(['-n', bridgeNs, 'link', 'set', `tb${suffix}`, 'master', 'br0']);
    await ip(['-n', bridgeNs, 'link', 'set', `tb${suffix}`, 'up']);
    lab.pki = await createLabPki(join(base, 'pki'), Array.from({ length: count }, (_, i) => `${subnet}.${i + 1}`));
    await createSshKeys(join(base, 'ssh'));
    for (let i = 1; i <= count; i++) {
      const host = await createHost(lab, id, i, `${subnet}.${i}`, bridgeNs);
      lab.hosts.push(host);
    }
    await Promise.all(lab.hosts.map((host) => waitForDaemon(host, lab)));
    return lab;
  } catch (err) {
    await lab.stop().catch(() => undefined);
    throw err;
  }
}

class HostLab implements LibvirtHostLab {
  readonly hosts: LabLibvirtHost[] = [];
  readonly namespaces: string[] = [];
  readonly daemons = new Map<string, { child: ChildProcess; exited: Promise<void>; log: () => string }>();
  pki!: LabPki;
  /** Directory holding every host's directories. */
  readonly base: string;
  private stopped = false;

  constructor(base: string) {
    this.base = base;
  }

  async migrate(domain: string, from: LabLibvirtHost, to: LabLibvirtHost, opts: { timeoutMs?: number } = {}): Promise<void> {
    await run('virsh', ['-c', from.uri, 'migrate', '--live', '--unsafe', '--persistent', '--undefinesource', '--p2p', domain, to.tcpUri],
      { timeoutMs: opts.timeoutMs ?? 120_000 });
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const errors: string[] = [];
    for (const host of this.hosts) {
      if (!this.daemons.has(host.name)) continue;
      await removeAllDomains(host.uri).catch((err: Error) => errors.push(`${host.name}: ${err.message}`));
    }
    for (const daemon of this.daemons.values()) {
      if (daemon.child.exitCode === null && daemon.child.signalCode === null) daemon.child.kill('SIGTERM');
      const timer = setTimeout(() => daemon.child.kill('SIGKILL'), 5000);
      await daemon.exited;
      clearTimeout(timer);
    }
    for (const netns of this.namespaces.reverse()) {
      await destroyNamespace(netns).catch((err: Error) => errors.push(`${netns}: ${err.message}`));
    }
    await rm(this.base, { recursive: true, force: true }).catch((err: Error) => errors.push(err.message));
    if (errors.length > 0) throw new Error(`libvirt host lab teardown: ${errors.join('; ')}`);
  }
}

async function createHost(lab: HostLab, id: string, index: number, address: string, bridgeNs: string): Promise<LabLibvirtHost> {
  const name = `h${index}`;
  const netns = `${NETNS_PREFIX}${id}-${name}`;
  const dir = join(lab.base, name);
  await ip(['netns', 'add', netns]);
  lab.namespaces.push(netns);
  // veth names are global while both ends are created, and limited to 15 characters.
  const suffix = randomBytes(3).toString('hex');
  await ip(['link', 'add', `th${suffix}`, 'netns', netns, 'type', 'veth', 'peer', 'name', `tb${suffix}`, 'netns', bridgeNs]);
  await ip(['-n', netns, 'link', 'set', `th${suffix}`, 'name', 'eth0']);
  await ip(['-n', netns, 'addr', 'add', `${address}/24`, 'dev', 'eth0']);
  await ip(['-n', netns, 'link', 'set', 'eth0', 'up']);
  await ip(['-n', netns, 'link', 'set', 'lo', 'up']);
  await ip(['-n', bridgeNs, 'link', 'set', `tb${suffix}`, 'master', 'br0']);
  await ip(['-n', bridgeNs, 'link', 'set', `tb${suffix}`, 'up']);

  for (const sub of Object.keys(LIBVIRT_DIRS)) await mkdir(join(dir, sub), { recursive: true, mode: 0o755 });
  await writeHostConfig(join(dir, 'etc'), address, lab.pki.serverDir);
  const capabilities = '/var/cache/libvirt/qemu/capabilities';
  if (existsSync(capabilities)) cpSync(capabilities, join(dir, 'cache', 'qemu', 'capabilities'), { recursive: true });

  const mounts = Object.entries(LIBVIRT_DIRS).map(([sub, target]) => `mount --bind '${join(dir, sub)}' '${target}'`).join(' && ');
  // The new mount namespace starts with a copy of every mount, including images other test files
  // have mounted under their scratch directories (/tmp/tresor-*) at that moment. A copy held here
  // would keep such a filesystem alive after its test unmounts it (nothing written back, the loop
  // device not released): drop them first.
  const dropForeign = `for m in $(awk '{print $5}' /proc/self/mountinfo | grep '^${tmpdir()}/tresor-' | sort -r); do umount -l "$m" || true; done`;
  // The default pid file (/run/libvirtd.pid) is the main daemon's: keep ours in the private /run/libvirt.
  // sshd starts in the same mount namespace, so its sessions (virsh's qemu+ssh proxy) see this
  // host's /run/libvirt.
  const sshdConfig = await writeSshdConfig(dir, address, join(lab.base, 'ssh'));
  const sshd = `mkdir -p /run/sshd && /usr/sbin/sshd -f '${sshdConfig}'`;
  const script = `${dropForeign}; ${mounts} && hostname ${name} && ${sshd} && exec libvirtd --listen --pid-file /run/libvirt/libvirtd.pid`;
  const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', 'ip', 'netns', 'exec', netns,
    'unshare', '--mount', '--uts', '--propagation', 'private', '--', 'sh', '-ec', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr = (stderr + chunk).slice(-4000); });
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()));
  child.on('error', () => undefined);
  lab.daemons.set(name, { child, exited, log: () => stderr });
  return {
    name,
    uri: `qemu+unix:///system?socket=${join(dir, 'run', 'libvirt-sock')}`,
    tcpUri: `qemu+tcp://${address}/system`,
    sshUri: `qemu+ssh://root@${address}/system?command=${join(lab.base, 'ssh', 'ssh')}`,
    address,
    netns,
    dir,
  };
}

/** A host key for every lab sshd, a client key, and an `ssh` wrapper that uses them (never ~/.ssh). */
async function createSshKeys(dir: string): Promise<void> {
  if (!existsSync('/usr/sbin/sshd')) throw new Error('the libvirt host lab needs sshd for qemu+ssh:// (Debian package openssh-server; scripts/setup.sh installs it)');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  for (const key of ['host_key', 'client_key']) await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', `tresor-lab ${key}`, '-f', join(dir, key)]);
  await cp(join(dir, 'client_key.pub'), join(dir, 'authorized_keys'));
  await writeFile(join(dir, 'ssh_config'), [
    'Host *',
    `  IdentityFile ${join(dir, 'client_key')}`,
    '  IdentitiesOnly yes',
    `  UserKnownHostsFile ${join(dir, 'known_hosts')}`,
    '  StrictHostKeyChecking accept-new',
    '  BatchMode yes',
    '',
  ].join('\n'));
  await writeFile(join(dir, 'ssh'), `#!/bin/sh\nexec ssh -F '${join(dir, 'ssh_config')}' "$@"\n`, { mode: 0o755 });
}

async function writeSshdConfig(hostDir: string, address: string, sshDir: string): Promise<string> {
  const file = join(hostDir, 'sshd_config');
  await mkdir(join(hostDir, 'home'), { recursive: true, mode: 0o700 });
  await writeFile(file, [
    `ListenAddress ${address}`,
    `HostKey ${join(sshDir, 'host_key')}`,
    `PidFile ${join(hostDir, 'sshd.pid')}`,
    `AuthorizedKeysFile ${join(sshDir, 'authorized_keys')}`,
    'PermitRootLogin prohibit-password',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'UsePAM no',
    // The lab directory's owners and modes are a test's, not a home directory's.
    'StrictModes no',
    // Sessions get a home of their own, so bash does not source this machine's ~/.bashrc (which
    // sshd sessions do): a developer's shell set-up is not a host's, and one that blocks (pyenv's
    // rehash waits 60 s on a lock a killed session left) would hang every login.
    `SetEnv HOME=${join(hostDir, 'home')}`,
    '',
  ].join('\n'));
  return file;
}

async function writeHostConfig(etc: string, address: string, backupTlsDir: string): Promise<void> {
  await mkdir(join(etc, 'qemu'), { recursive: true });
  await writeFile(join(etc, 'libvirtd.conf'), [
    'listen_tls = 0',
    'listen_tcp = 1',
    'auth_tcp = "none"',
    `listen_addr = "${address}"`,
    `host_uuid = "${randomUUID()}"`,
    'unix_sock_rw_perms = "0700"',
    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
    '',
  ].join('\n'));
  await writeFile(join(etc, 'qemu.conf'), [
    'user = "root"',
    'group = "root"',
    'dynamic_ownership = 0',
    'remember_owner = 0',
    'security_driver = "none"',
    'cgroup_controllers = [ ]',
    'stdio_handler = "file"',
    `migration_address = "${address}"`,
    // Without it the destination names itself by host name (h2), which nothing resolves.
    `migration_host = "${address}"`,
    // NBD servers of backup jobs with tls='yes' present this certificate and require a client one.
    `backup_tls_x509_cert_dir = "${backupTlsDir}"`,
    'backup_tls_x509_verify = 1',
    '',
  ].join('\n'));
}

async function waitForDaemon(host: LabLibvirtHost, lab: HostLab): Promise<void> {
  const daemon = lab.daemons.get(host.name);
  const deadline = Date.now() + START_TIMEOUT_MS;
  let last = '';
  while (Date.now() < deadline) {
    if (daemon !== undefined && (daemon.child.exitCode !== null || daemon.child.signalCode !== null)) {
      throw new Error(`libvirtd of lab host ${host.name} exited: ${daemon.log().trim() || 'no output'}`);
    }
    try {
      await run('virsh', ['-c', host.uri, 'version'], { timeoutMs: 10_000 });
      return;
    } catch (err) {
      last = (err as Error).message;
    }
    await sleep(100);
  }
  throw new Error(`libvirtd of lab host ${host.name} did not answer within ${START_TIMEOUT_MS} ms: ${last}`);
}

async function removeAllDomains(uri: string): Promise<void> {
  const names = (await run('virsh', ['-c', uri, 'list', '--all', '--name'])).split('\n').map((line) => line.trim()).filter((line) => line !== '');
  for (const name of names) {
    await run('virsh', ['-c', uri, 'destroy', name]).catch(() => undefined);
    await run('virsh', ['-c', uri, 'undefine', name, '--checkpoints-metadata', '--snapshots-metadata', '--nvram']).catch(() => undefined);
  }
}

/** Kills every process still inside the namespace (qemu left behind by a dead libvirtd), then deletes it. */
async function destroyNamespace(netns: string): Promise<void> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const pids = (await run('ip', ['netns', 'pids', netns]).catch(() => '')).split('\n').map((line) => Number(line.trim())).filter((pid) => pid > 0);
    if (pids.length === 0) break;
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    await sleep(100);
  }
  await ip(['netns', 'del', netns]);
}

/** Namespaces and directories of labs whose test process is gone. */
async function sweepStaleNamespaces(): Promise<void> {
  const list = await run('ip', ['netns', 'list']).catch(() => '');
  for (const line of list.split('\n')) {
    const netns = line.split(' ')[0] ?? '';
    const match = new RegExp(`^${NETNS_PREFIX}(\\d+)-`).exec(netns);
    if (match && !processAlive(Number(match[1]))) await destroyNamespace(netns).catch(() => undefined);
  }
  const runs = join(labDir(), 'hosts');
  if (!existsSync(runs)) return;
  for (const entry of await readdir(runs)) {
    const pid = Number(entry.split('-')[0]);
    if (Number.isInteger(pid) && !processAlive(pid)) await rm(join(runs, entry), { recursive: true, force: true });
  }
}


function ip(args: string[]): Promise<string> {
  return run('ip', args);
}

function run(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 30_000, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      if (err === null) return resolve(stdout);
      reject(new Error((err as NodeJS.ErrnoException).code === 'ENOENT'
        ? `${cmd} is not installed (Debian packages iproute2, libvirt-clients)`
        : `${cmd} ${args.join(' ')} failed: ${stderr.trim() || err.message}`));
    });
  });
}
