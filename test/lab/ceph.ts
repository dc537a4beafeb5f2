/**
 * A real, throw-away, single-node Ceph cluster with radosgw (S3) for tests: one monitor, one OSD
 * on memstore (data in RAM) and radosgw's beast frontend on 127.0.0.1, everything (config, keys,
 * monitor store, logs, sockets) under one temporary directory. Recipe: ../shared/LAB.md §7.
 *
 * Several test files may run a lab at the same time: each lab has its own directory, cluster fsid,
 * monitor port and radosgw port (OSDs pick free ports themselves).
 *
 * Start-up (~1.5-3 s) is fast because: cephx keys are generated here instead of by ceph-authtool;
 * the OSD store is formatted while the monitor store is; the OSD is registered and all seven
 * radosgw pools are created in one librados session (Python binding) that does not wait for an OSD
 * map after each command, the OSD booting meanwhile; `paxos propose interval = 0.05`; and
 * `objecter tick interval = 0.25`, without which radosgw, started before the OSD is up, idles 5 s.
 *
 * Daemons never outlive the test process: they run in the foreground as our children under
 * `setpriv --pdeathsig KILL` (the kernel kills them when this process dies, whatever the cause),
 * and a process 'exit' handler kills them too.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { accessSync, constants as fsConstants, closeSync, openSync, rmSync } from 'node:fs';
import { mkdir, open, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join, delimiter } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { S3Client, CreateBucketCommand } from '@aws-sdk/client-s3';
import { tempDir } from '../helpers/tmp.ts';

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
}

export interface CephLab {
  /** `http://127.0.0.1:PORT` of radosgw. */
  endpoint: string;
  /** Credentials of the lab's S3 user (full rights on its own buckets). */
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
  /** Milliseconds from `startCeph()` to the first S3 answer. */
  startupMs: number;
  /** Scratch directory of the cluster (config, logs); removed by `stop()`. */
  dir: string;
  /** Creates a bucket owned by the lab user; `objectLock` enables S3 object lock (and versioning). */
  createBucket(name: string, opts?: { objectLock?: boolean }): Promise<void>;
  /** Creates another S3 user with fresh random keys. */
  createUser(uid: string): Promise<S3Credentials>;
  /** Sets (and enables) a user-level quota on stored bytes; `uid` defaults to the lab user. */
  setUserQuota(maxBytes: number, uid?: string): Promise<void>;
  /** Sets (and enables) a quota on the bytes stored in one bucket. */
  setBucketQuota(bucket: string, maxBytes: number): Promise<void>;
  /** SIGKILLs radosgw (the cluster itself keeps running) and waits until it is gone. */
  killRadosgw(): Promise<void>;
  /** Starts radosgw again on the same port and waits until it answers. */
  restartRadosgw(): Promise<void>;
  /** SIGSTOPs radosgw: connections stay open but nothing answers (to test timeouts). */
  pauseRadosgw(): void;
  resumeRadosgw(): void;
  /** Kills every daemon of this lab and removes its directory. Safe to call twice. */
  stop(): Promise<void>;
}

export const LAB_USER = 'lab-admin';
const REGION = 'us-east-1';
const RGW_NAME = 'client.rgw.lab';
const RGW_POOLS = [
  '.rgw.root',
  'default.rgw.control',
  'default.rgw.meta',
  'default.rgw.log',
  'default.rgw.buckets.index',
  'default.rgw.buckets.data',
  'default.rgw.buckets.non-ec',
];
const REQUIRED_BINARIES = ['monmaptool', 'ceph-mon', 'ceph-osd', 'radosgw', 'radosgw-admin'];
/** Python with the librados binding (Debian python3-rados, a dependency of ceph-common). */
const PYTHON = '/usr/bin/python3';
const START_TIMEOUT_MS = 90_000;

const BOOTSTRAP_PY = `
import json, sys, threading, rados
conf, osd_uuid, pools = sys.argv[1], sys.argv[2], sys.argv[3:]
cluster = rados.Rados(conffile=conf, name='client.admin')
cluster.connect(timeout=30)
def command(cmd):
    ret, out, err = cluster.mon_command(json.dumps(cmd), b'', timeout=30)
    if ret != 0:
        raise RuntimeError(cmd['prefix'] + ' ' + cmd.get('pool', '') + ' failed: ' + err)
command({'prefix': 'osd new', 'uuid': osd_uuid, 'id': 0})
print('osd-registered', flush=True)
errors = []
def create(pool):
    try:
        command({'prefix': 'osd pool create', 'pool': pool, 'pg_num': 8})
    except Exception as e:
        errors.append(str(e))
threads = [threading.Thread(target=create, args=(p,)) for p in pools]
for t in threads: t.start()
for t in threads: t.join()
cluster.shutdown()
if errors:
    sys.exit('; '.join(errors))
`;

// ---------------------------------------------------------------------------------------------
// Daemons that must die with us.

const liveDaemons = new Set<ChildProcess>();
/** Directories of labs not stopped yet, removed on exit as well. */
const liveLabDirs = new Set<string>();
let exitHandlerInstalled = false;

function installExitHandler(): void {
  if (exitHandlerInstalled) return;
  exitHandlerInstalled = true;
  process.on('exit', () => {
    for (const child of liveDaemons) {
      try {
        child.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
    for (const dir of liveLabDirs) {
      try {
        rmSync(dir, { recursive: true, force: true, maxRetries: 2 });
      } catch {
        // best effort while exiting
      }
    }
  });
}

class Daemon {
  readonly name: string;
  readonly logPath: string;
  readonly #child: ChildProcess;
  readonly exited: Promise<void>;
  #running = true;

  constructor(name: string, command: string, args: string[], logPath: string) {
    this.name = name;
    this.logPath = logPath;
    const logFd = openSync(logPath, 'a');
    try {
      const [cmd, argv] = withParentDeathSignal(command, args);
      this.#child = spawn(cmd, argv, { stdio: ['ignore', logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
    liveDaemons.add(this.#child);
    this.exited = new Promise((resolve) => {
      const done = () => {
        this.#running = false;
        liveDaemons.delete(this.#child);
        resolve();
      };
      this.#child.once('exit', done);
      this.#child.once('error', done);
    });
  }

  get running(): boolean {
    return this.#running;
  }

  signal(sig: NodeJS.Signals): void {
    if (this.#running) this.#child.kill(sig);
  }

  async kill(): Promise<void> {
    if (!this.#running) return;
    this.#child.kill('SIGKILL');
    await this.exited;
  }
}

let setprivAvailable: boolean | undefined;

/** Runs `command` so that the kernel SIGKILLs it when this process dies (even by SIGKILL). */
function withParentDeathSignal(command: string, args: string[]): [string, string[]] {
  setprivAvailable ??= findInPath('setpriv') !== undefined;
  return setprivAvailable ? ['setpriv', ['--pdeathsig', 'KILL', '--', command, ...args]] : [command, args];
}

function findInPath(binary: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    const candidate = join(dir, binary);
    try {
      accessSync(candidate, fsConstants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

function requireCephBinaries(): void {
  const missing = REQUIRED_BINARIES.filter((b) => findInPath(b) === undefined);
  try {
    accessSync(PYTHON, fsConstants.X_OK);
  } catch {
    missing.push(PYTHON);
  }
  if (missing.length > 0) {
    throw new Error(`the Ceph test lab needs ${missing.join(', ')}, which ${missing.length === 1 ? 'is' : 'are'} not installed: `
      + 'run `apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw` (Debian packages)');
  }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/** Runs a Ceph tool to completion; the error carries its output. */
function runTool(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => { out += s; });
    child.stderr.setEncoding('utf8').on('data', (s: string) => { err += s; });
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} failed (${signal ?? `exit ${code}`}):\n${err}${out}`.trimEnd()));
    });
    child.stdin.end(opts.input ?? '');
  });
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') throw new Error('could not allocate a TCP port');
  return address.port;
}

/** A cephx secret as ceph-authtool prints it: u16 type (1 = AES), u32 sec, u32 nsec, u16 length, key. */
function cephxKey(): string {
  const buf = Buffer.alloc(12 + 16);
  const now = Date.now();
  buf.writeUInt16LE(1, 0);
  buf.writeUInt32LE(Math.floor(now / 1000), 2);
  buf.writeUInt32LE((now % 1000) * 1_000_000, 6);
  buf.writeUInt16LE(16, 10);
  randomBytes(16).copy(buf, 12);
  return buf.toString('base64');
}

function keyringEntry(name: string, caps: Record<string, string>): string {
  const lines = [`[${name}]`, `\tkey = ${cephxKey()}`];
  for (const [service, cap] of Object.entries(caps)) lines.push(`\tcaps ${service} = "${cap}"`);
  return `${lines.join('\n')}\n`;
}

function randomKey(alphabet: string, length: number): string {
  const bytes = randomBytes(length);
  let s = '';
  for (const b of bytes) s += alphabet[b % alphabet.length];
  return s;
}

function newS3Credentials(): S3Credentials {
  return {
    accessKeyId: randomKey('ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789', 20),
    secretAccessKey: randomKey('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789', 40),
  };
}

async function tail(path: string, bytes = 4000): Promise<string> {
  try {
    const fh = await open(path, 'r');
    try {
      const { size } = await fh.stat();
      const start = Math.max(0, size - bytes);
      const buf = Buffer.alloc(size - start);
      await fh.read(buf, 0, buf.length, start);
      return buf.toString('utf8');
    } finally {
      await fh.close();
    }
  } catch {
    return '(no log)';
  }
}

// ---------------------------------------------------------------------------------------------
// The cluster.

interface LabLayout {
  dir: string;
  conf: string;
  keyring: string;
  log: string;
  fsid: string;
  osdUuid: string;
  monPort: number;
  rgwPort: number;
}

function cephConf(l: LabLayout): string {
  return `[global]
fsid = ${l.fsid}
mon host = v2:127.0.0.1:${l.monPort}
mon initial members = a
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = ${l.keyring}
run dir = ${l.dir}/run
crash dir = ${l.dir}/crash
admin socket = ${l.dir}/run/$name.$pid.asok
log file = ${l.log}/$name.log
log to stderr = false
err to stderr = false
mon cluster log file = ${l.log}/cluster.log
pid file =
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail crit = 0
mon data avail warn = 0
paxos propose interval = 0.05

[client]
# librados clients (radosgw) re-check the OSD map every 0.25 s instead of 5 s: radosgw started
# before the OSD is up would otherwise sit idle for 5 s.
objecter tick interval = 0.25

[mon]
mon data = ${l.dir}/mon/$id
# A taken port fails at once (and start-up retries with another) instead of after 3 x 5 s.
ms bind retry count = 1

[osd]
osd data = ${l.dir}/osd/$id
osd objectstore = memstore
memstore device bytes = ${2 << 30}

[${RGW_NAME}]
rgw frontends = beast endpoint=127.0.0.1:${l.rgwPort}
rgw data = ${l.dir}/rgw
rgw dns name = localhost
`;
}

class Lab implements CephLab {
  readonly endpoint: string;
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  readonly region = REGION;
  readonly dir: string;
  startupMs = 0;
  readonly #layout: LabLayout;
  readonly #daemons = new Map<string, Daemon>();
  #s3: S3Client | undefined;
  #stopped = false;

  constructor(layout: LabLayout, credentials: S3Credentials) {
    this.#layout = layout;
    this.dir = layout.dir;
    this.endpoint = `http://127.0.0.1:${layout.rgwPort}`;
    this.accessKeyId = credentials.accessKeyId;
    this.secretAccessKey = credentials.secretAccessKey;
  }

  #cephArgs(): string[] {
    return ['-c', this.#layout.conf];
  }

  #startDaemon(name: string, command: string, args: string[]): Daemon {
    const daemon = new Daemon(name, command, [...this.#cephArgs(), ...args], join(this.#layout.log, `${name}.out`));
    this.#daemons.set(name, daemon);
    return daemon;
  }

  async start(): Promise<void> {
    const l = this.#layout;
    const t0 = performance.now();
    const phase = (what: string) => { if (process.env.TRESOR_LAB_DEBUG) console.error(`ceph lab: ${what} at ${Math.round(performance.now() - t0)} ms`); };
    await Promise.all(['run', 'log', 'crash', 'mon/a', 'osd/0', 'rgw'].map((d) => mkdir(join(l.dir, d), { recursive: true })));
    await writeFile(l.conf, cephConf(l));
    await writeFile(l.keyring, [
      keyringEntry('mon.', { mon: 'allow *' }),
      keyringEntry('client.admin', { mon: 'allow *', osd: 'allow *', mgr: 'allow *' }),
      keyringEntry('osd.0', { mon: 'allow profile osd', osd: 'allow *', mgr: 'allow profile osd' }),
      keyringEntry(RGW_NAME, { mon: 'allow rw', osd: 'allow rwx' }),
    ].join(''), { mode: 0o600 });
    const monmap = join(l.dir, 'monmap');
    await runTool('monmaptool', ['--create', '--fsid', l.fsid, '--addv', 'a', `[v2:127.0.0.1:${l.monPort}]`, monmap]);
    // The monitor store (with every key above imported) and the OSD store do not depend on each other.
    await Promise.all([
      runTool('ceph-mon', [...this.#cephArgs(), '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', l.keyring]),
      runTool('ceph-osd', [...this.#cephArgs(), '--no-mon-config', '--mkfs', '-i', '0', '--osd-uuid', l.osdUuid], { timeoutMs: 30_000 }),
    ]);
    phase('stores formatted');
    const mon = this.#startDaemon('mon.a', 'ceph-mon', ['-f', '-i', 'a']);
    // The OSD may boot as soon as it is registered; pools are created meanwhile.
    try {
      await this.#bootstrap(mon, () => {
        phase('osd registered');
        this.#startDaemon('osd.0', 'ceph-osd', ['-f', '-i', '0']);
      });
    } catch (err) {
      throw new Error(`${(err as Error).message}\n--- mon log ---\n${await tail(join(l.log, 'mon.a.log'))}`);
    }
    phase('pools created');
    await this.#startRadosgw();
    phase('radosgw answers');
    await runTool('radosgw-admin', [...this.#cephArgs(), 'user', 'create', '--uid', LAB_USER, '--display-name', LAB_USER,
      '--access-key', this.accessKeyId, '--secret-key', this.secretAccessKey]);
    phase('user created');
  }

  /**
   * Registers the OSD, then creates radosgw's pools, through librados from Python (python3-rados
   * comes with ceph-common): unlike the `ceph` CLI it does not wait for a new OSD map after each
   * command, and the pool creations run concurrently (~0.3 s instead of ~1.5 s).
   */
  async #bootstrap(mon: Daemon, onOsdRegistered: () => void): Promise<void> {
    const child = spawn(PYTHON, ['-c', BOOTSTRAP_PY, this.#layout.conf, this.#layout.osdUuid, ...RGW_POOLS], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
    let buffered = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => {
      buffered += s;
      if (buffered.includes('osd-registered\n')) {
        buffered = '';
        onOsdRegistered();
      }
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    // A monitor that dies (its port taken, say) would leave the client waiting for it.
    let monDied = false;
    void mon.exited.then(() => {
      monDied = true;
      child.kill('SIGKILL');
    });
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => {
      child.once('error', (e) => { stderr += e.message; resolve([null, null]); });
      child.once('close', (c, s) => resolve([c, s]));
    }).finally(() => clearTimeout(timer));
    if (monDied) throw new Error(`ceph-mon exited during start-up:\n${await tail(mon.logPath)}`);
    if (code !== 0) {
      const hint = stderr.includes("No module named 'rados'") ? ' (install the Debian package python3-rados)' : '';
      throw new Error(`registering the OSD and creating pools failed (${signal ?? `exit ${code}`})${hint}: ${stderr.trim()}`);
    }
  }

  async #startRadosgw(): Promise<void> {
    const rgw = this.#startDaemon('rgw', 'radosgw', ['-f', '-n', RGW_NAME]);
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (!rgw.running) {
        throw new Error(`radosgw exited during start-up:\n${await tail(rgw.logPath)}\n${await tail(join(this.#layout.log, `${RGW_NAME}.log`))}`);
      }
      if (await this.#answers()) return;
      if (Date.now() > deadline) {
        throw new Error(`radosgw did not answer on ${this.endpoint} within ${START_TIMEOUT_MS / 1000} s:\n${await tail(join(this.#layout.log, `${RGW_NAME}.log`))}`);
      }
      await sleep(40);
    }
  }

  /** True once radosgw serves S3 (an anonymous ListBuckets is answered with 200). */
  async #answers(): Promise<boolean> {
    try {
      const res = await fetch(`${this.endpoint}/`, { signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer();
      return res.status === 200;
    } catch {
      return false;
    }
  }

  #client(): S3Client {
    this.#s3 ??= new S3Client({
      endpoint: this.endpoint,
      region: this.region,
      forcePathStyle: true,
      credentials: { accessKeyId: this.accessKeyId, secretAccessKey: this.secretAccessKey },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    return this.#s3;
  }

  async createBucket(name: string, opts: { objectLock?: boolean } = {}): Promise<void> {
    await this.#client().send(new CreateBucketCommand({ Bucket: name, ObjectLockEnabledForBucket: opts.objectLock || undefined }));
  }

  async createUser(uid: string): Promise<S3Credentials> {
    const credentials = newS3Credentials();
    await runTool('radosgw-admin', [...this.#cephArgs(), 'user', 'create', '--uid', uid, '--display-name', uid,
      '--access-key', credentials.accessKeyId, '--secret-key', credentials.secretAccessKey]);
    return credentials;
  }

  async setUserQuota(maxBytes: number, uid = LAB_USER): Promise<void> {
    await runTool('radosgw-admin', [...this.#cephArgs(), 'quota', 'set', '--quota-scope=user', `--uid=${uid}`, `--max-size=${maxBytes}`]);
    await runTool('radosgw-admin', [...this.#cephArgs(), 'quota', 'enable', '--quota-scope=user', `--uid=${uid}`]);
  }

  async setBucketQuota(bucket: string, maxBytes: number): Promise<void> {
    await runTool('radosgw-admin', [...this.#cephArgs(), 'quota', 'set', '--quota-scope=bucket', `--bucket=${bucket}`, `--max-size=${maxBytes}`]);
    await runTool('radosgw-admin', [...this.#cephArgs(), 'quota', 'enable', '--quota-scope=bucket', `--bucket=${bucket}`]);
  }

  async killRadosgw(): Promise<void> {
    await this.#daemons.get('rgw')?.kill();
  }

  async restartRadosgw(): Promise<void> {
    await this.killRadosgw();
    await this.#startRadosgw();
  }

  pauseRadosgw(): void {
    this.#daemons.get('rgw')?.signal('SIGSTOP');
  }

  resumeRadosgw(): void {
    this.#daemons.get('rgw')?.signal('SIGCONT');
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    liveLabDirs.delete(this.dir);
    this.#s3?.destroy();
    // radosgw first: it is a client of the others and would otherwise log reconnect noise.
    await this.#daemons.get('rgw')?.kill();
    await Promise.all([...this.#daemons.values()].map((d) => d.kill()));
    await rm(this.dir, { recursive: true, force: true });
  }

  /** Output of every daemon, for a failed start's error message. */
  async logs(): Promise<string> {
    const parts: string[] = [];
    for (const d of this.#daemons.values()) parts.push(`--- ${d.name} (${d.running ? 'running' : 'exited'}) ---\n${await tail(d.logPath, 1500)}`);
    return parts.join('\n');
  }
}

/**
 * Starts a fresh single-node Ceph with radosgw. Throws (after cleaning up) if it does not come up.
 * A port taken by someone else between choosing and binding it is retried with new ports.
 */
export async function startCeph(): Promise<CephLab> {
  requireCephBinaries();
  installExitHandler();
  const t0 = performance.now();
  for (let attempt = 1; ; attempt++) {
    const tmp = await tempDir('tresor-ceph-');
    const layout: LabLayout = {
      dir: tmp.path,
      conf: join(tmp.path, 'ceph.conf'),
      keyring: join(tmp.path, 'keyring'),
      log: join(tmp.path, 'log'),
      fsid: randomUUID(),
      osdUuid: randomUUID(),
      monPort: await freePort(),
      rgwPort: await freePort(),
    };
    const lab = new Lab(layout, newS3Credentials());
    liveLabDirs.add(layout.dir);
    try {
      await lab.start();
      lab.startupMs = Math.round(performance.now() - t0);
      return lab;
    } catch (err) {
      const logs = await lab.logs();
      await lab.stop();
      if (attempt < 3 && /Address already in use|EADDRINUSE/.test(`${(err as Error).message}\n${logs}`)) continue;
      throw new Error(`${(err as Error).message}\n${logs}`, { cause: err });
    }
  }
}

/** A raw S3 client on the lab's endpoint as its user (for tests that look behind Tresor's back). */
export function labS3Client(lab: CephLab): S3Client {
  return new S3Client({
    endpoint: lab.endpoint, region: lab.region, forcePathStyle: true,
    credentials: { accessKeyId: lab.accessKeyId, secretAccessKey: lab.secretAccessKey },
    requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED',
  });
}
