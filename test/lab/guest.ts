/**
 * The test lab for live VMs: tiny guests (see guest-image.ts) defined as libvirt domains, data
 * disks, and the helpers tests need around them. Recipes: ../shared/LAB.md §0–3.
 *
 * Typical use:
 *   let lab: LabHost;
 *   before(async () => { lab = await LabHost.create(); });
 *   after(() => lab?.cleanup());                    // runs even when tests fail
 *   const disk = await lab.dataDisk('a.qcow2', 64);
 *   const dom = await lab.defineDomain({ name: 'a', disks: [{ path: disk, bus: 'scsi', target: 'sda' }], writer: { intervalMs: 100 } });
 *   await lab.start(dom);
 *   await waitForAgent(lab.virsh, dom.name, 30_000);
 *
 * Domains run under TCG (`<domain type='qemu'>`, cpu qemu64) because this machine's /dev/kvm is a
 * slow nested one; TRESOR_LAB_KVM=1 switches to `<domain type='kvm'>` with host-passthrough.
 * Everything a LabHost creates (domains with their checkpoints, files) is removed by cleanup(),
 * also when a test fails; domains left by a killed test process are swept by the next LabHost.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Virsh } from '../../src/hypervisor/virsh.ts';
import { childElement, childElements, parseXml, renderXml, type XmlInput } from '../../src/util/xml.ts';
import { ensureGuestImage, labDir, type GuestImage } from './guest-image.ts';
import { ensureLibvirtd, SYSTEM_URI } from './libvirtd.ts';
import { processAlive } from '../../src/util/process.ts';

export { ensureGuestImage, labDir, type GuestImage } from './guest-image.ts';
export { ensureLibvirtd, SYSTEM_URI } from './libvirtd.ts';

/** A connection: a Virsh runner or a libvirt URI. */
export type LabConnection = Virsh | string;

export interface TestDisk {
  path: string;
  bus: 'scsi' | 'virtio';
  /** sda, sdb... for scsi; vda, vdb... for virtio. */
  target: string;
  /** Default: from the file name (.raw → raw, else qcow2). */
  format?: 'qcow2' | 'raw';
  readonly?: boolean;
}

export interface WriterOptions {
  /** Pause between lines; default 200 ms, 0 = as fast as possible. */
  intervalMs?: number;
  /** Append every line to /data2/log too (same line, one sync for both). */
  both?: boolean;
}

export interface TestDomainOptions {
  name: string;
  disks: TestDisk[];
  /** Direct kernel boot of the lab guest; with undefined the domain has no OS (block-layer tests only). */
  guest: GuestImage | undefined;
  /** File the serial console is written to. */
  consoleLog: string;
  memoryMiB?: number;
  /** Run qemu-ga in the guest (default true). */
  agent?: boolean;
  /** Give the domain the agent's virtio-serial channel (default: same as `agent`). */
  agentChannel?: boolean;
  /** Start the writer at boot (default: off). */
  writer?: WriterOptions | false;
  /** Extra kernel command line words. */
  cmdline?: string;
  /** Real KVM instead of TCG (default: TRESOR_LAB_KVM=1). */
  kvm?: boolean;
}

export interface TestDomain {
  name: string;
  uuid: string;
  consoleLog: string;
  disks: TestDisk[];
}

const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

function connection(conn: LabConnection): Virsh {
  return typeof conn === 'string' ? new Virsh(conn) : conn;
}

function formatOf(disk: TestDisk): 'qcow2' | 'raw' {
  return disk.format ?? (disk.path.endsWith('.raw') ? 'raw' : 'qcow2');
}

/** The domain XML of a lab guest (see TestDomainOptions). */
export function testDomainXml(opts: TestDomainOptions): string {
  const kvm = opts.kvm ?? process.env.TRESOR_LAB_KVM === '1';
  const agent = opts.agent ?? true;
  const agentChannel = opts.agentChannel ?? agent;
  const writer = opts.writer === undefined ? false : opts.writer;
  const cmdline = [
    'console=ttyS0', 'quiet', 'panic=-1',
    `tresor.disks=${opts.disks.length}`,
    `tresor.agent=${agent ? 1 : 0}`,
    `tresor.writer=${writer === false ? 0 : 1}`,
    writer === false ? undefined : `tresor.interval_ms=${writer.intervalMs ?? 200}`,
    writer !== false && writer.both === true ? 'tresor.writer_both=1' : undefined,
    opts.cmdline,
  ].filter((word) => word !== undefined).join(' ');
  const os: XmlInput[] = [{ name: 'type', attributes: { arch: 'x86_64', machine: 'q35' }, children: ['hvm'] }];
  if (opts.guest !== undefined) {
    os.push({ name: 'kernel', children: [opts.guest.kernel] }, { name: 'initrd', children: [opts.guest.initrd] }, { name: 'cmdline', children: [cmdline] });
  } else {
    os.push({ name: 'boot', attributes: { dev: 'hd' } }, { name: 'bios', attributes: { rebootTimeout: '-1' } });
  }
  const disks: XmlInput[] = opts.disks.map((disk) => ({
    name: 'disk',
    attributes: { type: 'file', device: 'disk' },
    children: [
      { name: 'driver', attributes: { name: 'qemu', type: formatOf(disk) } },
      { name: 'source', attributes: { file: disk.path } },
      { name: 'target', attributes: { dev: disk.target, bus: disk.bus } },
      disk.readonly === true && { name: 'readonly' },
    ],
  }));
  const domain: XmlInput = {
    name: 'domain',
    attributes: { type: kvm ? 'kvm' : 'qemu' },
    children: [
      { name: 'name', children: [opts.name] },
      { name: 'memory', attributes: { unit: 'MiB' }, children: [String(opts.memoryMiB ?? 256)] },
      { name: 'vcpu', children: ['1'] },
      { name: 'os', children: os },
      { name: 'features', children: [{ name: 'acpi' }] },
      kvm
        ? { name: 'cpu', attributes: { mode: 'host-passthrough' } }
        : { name: 'cpu', attributes: { mode: 'custom', match: 'exact' }, children: [{ name: 'model', attributes: { fallback: 'forbid' }, children: ['qemu64'] }] },
      { name: 'clock', attributes: { offset: 'utc' } },
      { name: 'on_poweroff', children: ['destroy'] },
      // A guest that panics (panic=-1) or reboots stops instead of looping under TCG.
      { name: 'on_reboot', children: ['destroy'] },
      { name: 'on_crash', children: ['destroy'] },
      {
        name: 'devices',
        children: [
          ...disks,
          { name: 'controller', attributes: { type: 'scsi', index: 0, model: 'virtio-scsi' } },
          { name: 'controller', attributes: { type: 'usb', model: 'none' } },
          { name: 'serial', attributes: { type: 'file' }, children: [{ name: 'source', attributes: { path: opts.consoleLog } }, { name: 'target', attributes: { port: 0 } }] },
          agentChannel && { name: 'channel', attributes: { type: 'unix' }, children: [{ name: 'target', attributes: { type: 'virtio', name: GUEST_AGENT_CHANNEL } }] },
          { name: 'memballoon', attributes: { model: 'none' } },
        ],
      },
    ],
  };
  return renderXml(domain) + '\n';
}

/** Defines (persistently, not started) a lab domain and returns its name and UUID. */
export async function defineTestDomain(conn: LabConnection, opts: TestDomainOptions): Promise<TestDomain> {
  const virsh = connection(conn);
  await virsh.withFiles([testDomainXml(opts)], ([file]) => virsh.run(['define', file as string], { operation: 'define', domain: opts.name }));
  const uuid = (await virsh.run(['domuuid', opts.name], { operation: 'domuuid', domain: opts.name })).trim();
  return { name: opts.name, uuid, consoleLog: opts.consoleLog, disks: opts.disks };
}

/** Stops the domain hard (if running) and removes it with its checkpoint and snapshot metadata. Missing is fine. */
export async function destroyAndUndefine(conn: LabConnection, name: string): Promise<void> {
  const virsh = connection(conn);
  await virsh.run(['destroy', name], { operation: 'destroy', domain: name }).catch(ignoreCodes('domain-not-running', 'domain-not-found', 'operation-failed'));
  await virsh.run(['undefine', name, '--checkpoints-metadata', '--snapshots-metadata', '--nvram'], { operation: 'undefine', domain: name })
    .catch(ignoreCodes('domain-not-found'));
}

function ignoreCodes(...codes: string[]) {
  return (err: unknown): void => {
    if (!(err instanceof Error && codes.includes((err as { code?: string }).code ?? ''))) throw err;
  };
}

/**
 * Waits until the guest agent answers guest-ping; returns the milliseconds waited. Throws with the
 * tail of the serial console (when known) after `timeoutMs`.
 */
export async function waitForAgent(conn: LabConnection, domain: string | TestDomain, timeoutMs = 60_000): Promise<number> {
  const virsh = connection(conn);
  const name = typeof domain === 'string' ? domain : domain.name;
  const started = Date.now();
  let lastError: unknown;
  while (Date.now() - started < timeoutMs) {
    try {
      await virsh.run(['qemu-agent-command', name, '{"execute":"guest-ping"}', '--timeout', '2'], { operation: 'guest-ping', domain: name, timeoutMs: 10_000 });
      return Date.now() - started;
    } catch (err) {
      lastError = err;
      const code = (err as { code?: string }).code;
      if (code === 'domain-not-found' || code === 'domain-not-running' || code === 'agent-not-configured') break;
      await sleep(250);
    }
  }
  const console = typeof domain === 'string' ? '' : await consoleTail(domain.consoleLog);
  throw new Error(`guest agent of ${name} did not answer within ${timeoutMs} ms: ${(lastError as Error)?.message}${console}`);
}

async function consoleTail(path: string): Promise<string> {
  const text = await readFile(path, 'utf8').catch(() => '');
  return text === '' ? '' : `\n--- console (${path}) ---\n${text.split('\n').slice(-30).join('\n')}`;
}

/** Waits until the domain is shut off (e.g. after an agent shutdown). */
export async function waitForShutoff(conn: LabConnection, name: string, timeoutMs = 30_000): Promise<void> {
  const virsh = connection(conn);
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const state = (await virsh.run(['domstate', name], { operation: 'domstate', domain: name })).trim();
    if (state === 'shut off') return;
    await sleep(200);
  }
  throw new Error(`domain ${name} did not shut off within ${timeoutMs} ms`);
}

/** The device alias of a disk in the running domain (e.g. scsi0-0-0-1), as qemu-io -d needs it. */
export async function diskAlias(conn: LabConnection, domain: string, target: string): Promise<string> {
  const virsh = connection(conn);
  const xml = parseXml(await virsh.run(['dumpxml', domain], { operation: 'dumpxml', domain }));
  for (const disk of childElements(childElement(xml, 'devices') ?? xml, 'disk')) {
    if (childElement(disk, 'target')?.attributes.dev !== target) continue;
    const alias = childElement(disk, 'alias')?.attributes.name;
    if (alias === undefined) throw new Error(`disk ${target} of ${domain} has no alias (is the domain running?)`);
    return alias;
  }
  throw new Error(`domain ${domain} has no disk ${target}`);
}

export interface QemuIoWrite {
  offset: number;
  length: number;
  /** Bytes come from this host file (must be readable by the qemu user), else `pattern` is repeated. */
  file?: string;
  /** Byte value to write when no file is given (default 0xa5). */
  pattern?: number;
}

/**
 * Writes into a running guest's disk from the host through the disk's BlockBackend with HMP
 * `qemu-io -d` (LAB.md §3), so dirty bitmaps see the write as a guest write would be seen. Works
 * for virtio-scsi disks (for virtio-blk the qdev id names the PCI proxy and qemu refuses). qemu-io
 * prints its result into the domain's log, not the reply: when the log is local, it is checked.
 */
export async function qemuIoWrite(conn: LabConnection, domain: string, target: string, write: QemuIoWrite): Promise<void> {
  const virsh = connection(conn);
  const alias = await diskAlias(virsh, domain, target);
  if (write.file !== undefined && /["\s]/.test(write.file)) throw new Error(`qemu-io file path must not contain quotes or spaces: ${write.file}`);
  const command = write.file !== undefined
    ? `write -s ${write.file} ${write.offset} ${write.length}`
    : `write -P ${write.pattern ?? 0xa5} ${write.offset} ${write.length}`;
  const logPath = `/var/log/libvirt/qemu/${domain}.log`;
  const logBefore = virsh.uri === SYSTEM_URI ? (await readFile(logPath, 'utf8').catch(() => '')).length : -1;
  const reply = await virsh.run(['qemu-monitor-command', '--hmp', domain, `qemu-io -d ${alias} "${command}"`], { operation: 'qemu-io', domain });
  if (reply.trim() !== '') throw new Error(`qemu-io ${command} on ${domain}/${alias}: ${reply.trim()}`);
  if (logBefore < 0) return;
  // virtlogd appends qemu's output to the log a moment later.
  const expected = `wrote ${write.length}/${write.length} bytes at offset ${write.offset}`;
  let added = '';
  for (let attempt = 0; attempt < 50; attempt++) {
    added = (await readFile(logPath, 'utf8').catch(() => '')).slice(logBefore);
    if (added.includes(expected)) return;
    if (/failed|error/i.test(added)) break;
    await sleep(100);
  }
  throw new Error(`qemu-io ${command} on ${domain}/${alias} did not report success; domain log says: ${added.trim() || '(nothing)'}`);
}

// ---------------------------------------------------------------------------------------------
// Data disks and offline checks of disk images
// ---------------------------------------------------------------------------------------------

export interface DataDiskOptions {
  /** 'qcow2' (v3, the default) or 'raw'. */
  format?: 'qcow2' | 'raw';
  /** Make an ext4 filesystem (default true); false leaves the disk empty (unmounted by the guest). */
  filesystem?: boolean;
  /** Files to put into the filesystem, path → content. */
  files?: Record<string, string | Buffer>;
  /** qcow2 compat level: '1.1' (v3, default) or '0.10' (v2, no persistent bitmaps). */
  compat?: '1.1' | '0.10';
}

/** Creates a data disk: an ext4 filesystem made by mkfs.ext4 -d, in a qcow2 v3 (default) or raw image. */
export async function makeDataDisk(path: string, sizeMiB: number, opts: DataDiskOptions = {}): Promise<string> {
  const format = opts.format ?? 'qcow2';
  const scratch = await mkdtemp(join(labDir(), '.disk-'));
  try {
    const raw = format === 'raw' ? path : join(scratch, 'disk.raw');
    if (opts.filesystem === false) {
      await run('truncate', ['-s', `${sizeMiB}M`, raw]);
    } else {
      const tree = join(scratch, 'tree');
      await mkdir(tree);
      for (const [name, content] of Object.entries(opts.files ?? {})) {
        const target = join(tree, name);
        await mkdir(join(target, '..'), { recursive: true });
        await writeFile(target, content);
      }
      // No lazy initialisation: the guest's kernel must not write behind the tests' backs.
      await run('mkfs.ext4', ['-q', '-F', '-d', tree, '-E', 'root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0', '-L', 'tresor-data', raw, `${sizeMiB}M`]);
    }
    if (format === 'qcow2') {
      await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', `compat=${opts.compat ?? '1.1'}`, raw, path]);
    }
    await chmod(path, 0o644);
    return path;
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

/** Runs `fn` on a private raw copy of a disk image (any format qemu-img reads; -U: also of a running guest's disk). */
async function withRawCopy<T>(image: string, fn: (raw: string) => Promise<T>): Promise<T> {
  const scratch = await mkdtemp(join(labDir(), '.check-'));
  try {
    const raw = join(scratch, 'copy.raw');
    await run('qemu-img', ['convert', '-U', '-q', '-O', 'raw', image, raw]);
    return await fn(raw);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

async function replayJournal(raw: string): Promise<void> {
  // Exit codes 0-2 mean "clean" or "fixed"; only the journal is replayed here.
  await run('e2fsck', ['-y', '-E', 'journal_only', raw], { okCodes: [0, 1, 2] });
}

export interface ImageCheckOptions {
  /** Replay the ext4 journal on the copy first (for crash-consistent images). Default false. */
  replayJournal?: boolean;
}

/** `e2fsck -fn` on a copy of the image's ext4 filesystem (the whole disk). */
export async function e2fsckClean(image: string, opts: ImageCheckOptions = {}): Promise<{ clean: boolean; output: string }> {
  return withRawCopy(image, async (raw) => {
    if (opts.replayJournal === true) await replayJournal(raw);
    const result = await runStatus('e2fsck', ['-fn', raw]);
    return { clean: result.code === 0, output: result.stdout + result.stderr };
  });
}

export interface WriterLog {
  /** Parsed `seq epoch` lines, in file order. */
  entries: Array<{ seq: number; epoch: number }>;
  /** Lines that do not parse (a torn last line, garbage). */
  badLines: string[];
  /** Places where seq does not grow by exactly 1. */
  gaps: Array<{ after: number; next: number }>;
  raw: string;
}

/** Reads a file from the ext4 filesystem of a disk image (a copy of it) with debugfs. */
export async function readGuestFile(image: string, file: string, opts: ImageCheckOptions = {}): Promise<string> {
  return withRawCopy(image, async (raw) => {
    if (opts.replayJournal === true) await replayJournal(raw);
    const result = await runStatus('debugfs', ['-R', `cat ${file}`, raw]);
    if (/File not found|not found by ext2_lookup/.test(result.stderr)) throw new Error(`${file} does not exist in the filesystem of ${image}`);
    return result.stdout;
  });
}

/** Reads the writer's /log from the image's ext4 filesystem and checks its sequence. */
export async function readGuestLog(image: string, opts: ImageCheckOptions = {}): Promise<WriterLog> {
  return parseWriterLog(await readGuestFile(image, '/log', opts));
}

export function parseWriterLog(text: string): WriterLog {
  const entries: WriterLog['entries'] = [];
  const badLines: string[] = [];
  const gaps: WriterLog['gaps'] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const match = /^(\d+) (\d+)$/.exec(line);
    if (!match) {
      badLines.push(line);
      continue;
    }
    const entry = { seq: Number(match[1]), epoch: Number(match[2]) };
    const previous = entries.at(-1);
    if (previous !== undefined && entry.seq !== previous.seq + 1) gaps.push({ after: previous.seq, next: entry.seq });
    entries.push(entry);
  }
  return { entries, badLines, gaps, raw: text };
}

// ---------------------------------------------------------------------------------------------
// LabHost: one test file's lab on the local libvirt, cleaned up whatever happens
// ---------------------------------------------------------------------------------------------

const NAME_PREFIX = 'tresor-lab-';

export class LabHost {
  readonly virsh: Virsh;
  readonly uri: string;
  /** This lab's directory (mode 1777 so QEMU, running as libvirt-qemu, can create sockets and scratch files). */
  readonly dir: string;
  readonly guest: GuestImage;
  private readonly tag: string;
  private readonly domains = new Set<string>();
  private readonly cleanups: Array<() => Promise<void>> = [];

  private constructor(virsh: Virsh, dir: string, guest: GuestImage, tag: string) {
    this.virsh = virsh;
    this.uri = virsh.uri;
    this.dir = dir;
    this.guest = guest;
    this.tag = tag;
  }

  /**
   * Starts libvirtd if needed, builds (or reuses) the guest image, sweeps domains left by dead
   * test processes, and creates the lab directory. Register `cleanup()` in node:test's `after`
   * at the level of the tests that use the lab (not inside a `before` hook: an `after` registered
   * there runs as soon as that hook ends).
   */
  static async create(): Promise<LabHost> {
    await ensureLibvirtd();
    const virsh = new Virsh(SYSTEM_URI);
    const [guest] = await Promise.all([ensureGuestImage(), sweepStaleDomains(virsh)]);
    const runs = join(labDir(), 'runs');
    await mkdir(runs, { recursive: true, mode: 0o755 });
    const dir = await mkdtemp(join(runs, `${process.pid}-`));
    await chmod(dir, 0o1777);
    const lab = new LabHost(virsh, dir, guest, `${process.pid}-${randomBytes(3).toString('hex')}`);
    return lab;
  }

  /** A path inside the lab directory. */
  path(name: string): string {
    return join(this.dir, name);
  }

  /** A data disk in the lab directory (see makeDataDisk). */
  dataDisk(name: string, sizeMiB: number, opts: DataDiskOptions = {}): Promise<string> {
    return makeDataDisk(this.path(name), sizeMiB, opts);
  }

  /** Defines a lab guest; its libvirt name is `tresor-lab-<pid>-<random>-<name>`. */
  async defineDomain(opts: Omit<TestDomainOptions, 'guest' | 'consoleLog' | 'name'> & { name: string; bootable?: boolean }): Promise<TestDomain> {
    const name = `${NAME_PREFIX}${this.tag}-${opts.name}`;
    this.domains.add(name);
    return defineTestDomain(this.virsh, {
      ...opts,
      name,
      guest: opts.bootable === false ? undefined : this.guest,
      consoleLog: this.path(`${opts.name}.console.log`),
    });
  }

  async start(domain: TestDomain | string): Promise<void> {
    const name = typeof domain === 'string' ? domain : domain.name;
    await this.virsh.run(['start', name], { operation: 'start', domain: name });
  }

  /** Starts the domain and waits for its agent; returns milliseconds from start to the first agent answer. */
  async boot(domain: TestDomain, timeoutMs = 60_000): Promise<number> {
    const started = Date.now();
    await this.start(domain);
    await waitForAgent(this.virsh, domain, timeoutMs);
    return Date.now() - started;
  }

  async destroy(domain: TestDomain | string): Promise<void> {
    const name = typeof domain === 'string' ? domain : domain.name;
    await this.virsh.run(['destroy', name], { operation: 'destroy', domain: name });
  }

  /** Clean shutdown through the guest agent (the guest unmounts its disks), then waits for shut off. */
  async shutdown(domain: TestDomain | string, timeoutMs = 30_000): Promise<void> {
    const name = typeof domain === 'string' ? domain : domain.name;
    await this.virsh.run(['shutdown', name, '--mode', 'agent'], { operation: 'shutdown', domain: name });
    await waitForShutoff(this.virsh, name, timeoutMs);
  }

  /** Registers extra cleanup work (run before the domains are removed, last registered first). */
  onCleanup(fn: () => Promise<void>): void {
    this.cleanups.push(fn);
  }

  /** Runs registered cleanups, destroys and undefines every domain this lab defined, removes its directory. */
  async cleanup(): Promise<void> {
    const errors: unknown[] = [];
    for (const fn of this.cleanups.splice(0).reverse()) await fn().catch((err: unknown) => errors.push(err));
    for (const name of this.domains) await destroyAndUndefine(this.virsh, name).catch((err: unknown) => errors.push(err));
    this.domains.clear();
    await rm(this.dir, { recursive: true, force: true }).catch((err: unknown) => errors.push(err));
    if (errors.length > 0) throw new AggregateError(errors, `lab cleanup failed: ${errors.map((err) => (err as Error).message).join('; ')}`);
  }
}

/** Removes lab domains whose test process (pid in the name) is gone, so a killed run leaves nothing behind for long. */
async function sweepStaleDomains(virsh: Virsh): Promise<void> {
  const names = (await virsh.run(['list', '--all', '--name'], { operation: 'list' })).split('\n').map((line) => line.trim());
  for (const name of names) {
    const match = new RegExp(`^${NAME_PREFIX}(\\d+)-`).exec(name);
    if (match && !processAlive(Number(match[1]))) await destroyAndUndefine(virsh, name).catch(() => undefined);
  }
  const runs = join(labDir(), 'runs');
  if (!existsSync(runs)) return;
  for (const entry of await readdir(runs)) {
    const pid = Number(entry.split('-')[0]);
    if (Number.isInteger(pid) && !processAlive(pid)) await rm(join(runs, entry), { recursive: true, force: true });
  }
}


// ---------------------------------------------------------------------------------------------

function run(cmd: string, args: string[], opts: { okCodes?: number[] } = {}): Promise<string> {
  return runStatus(cmd, args).then((result) => {
    if (result.code !== 0 && !(opts.okCodes ?? []).includes(result.code)) {
      throw new Error(`${cmd} ${args.join(' ')} failed (exit ${result.code}): ${result.stderr.trim() || result.stdout.trim()}`);
    }
    return result.stdout;
  });
}

function runStatus(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 << 20, timeout: 120_000, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout, stderr) => {
      if (err !== null && (err as NodeJS.ErrnoException).code === 'ENOENT') return reject(new Error(`${cmd} is not installed: run scripts/setup.sh`));
      if (err !== null && typeof err.code !== 'number') return reject(new Error(`${cmd} ${args.join(' ')}: ${err.message}`));
      resolve({ code: err === null ? 0 : (err.code as number), stdout, stderr });
    });
  });
}
