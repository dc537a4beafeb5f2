/**
 * NBD client against real servers: qemu-nbd (qcow2 with data, zero clusters, holes and a
 * persistent dirty bitmap; plain, TLS) and nbdkit (pattern, error injection, delays, block size
 * policy, simple replies, old negotiation, a server killed mid-request). Reference data comes from
 * qemu-img (convert, map) and libnbd's nbdcopy. A scripted NBD server written here covers what
 * real servers cannot be made to do: garbage, absurd lengths, ERROR_OFFSET, short block status.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { AllocationFlag, DIRTY_BITMAP_FLAG_DIRTY, NbdClient, NbdError, NbdReaderPool } from '../src/nbd/client.ts';
import type { BlockStatusExtent, NbdTarget } from '../src/nbd/client.ts';
import { NbdDiskSource } from '../src/nbd/source.ts';
import type { Extent } from '../src/image/disk.ts';

const execFileAsync = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * 1024;
const DISK_SIZE = 64 * MiB;
const BITMAP = 'qemu:dirty-bitmap:bm0';

let dir = '';
let image = '';
let reference: Buffer;
const servers: ChildProcess[] = [];

async function run(command: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync(command, args, { maxBuffer: 64 * MiB });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${e.stderr ?? ''} ${e.message}`);
  }
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function canConnect(target: { path: string } | { port: number; host: string }): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(target as net.NetConnectOpts);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** Spawns a server and waits until it accepts connections; fails loudly if it exits or never listens. */
async function startServer(command: string, args: string[], listen: { path: string } | { port: number; host: string }): Promise<ChildProcess> {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  servers.push(child);
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  for (let attempt = 0; attempt < 100; attempt++) {
    if (child.exitCode !== null) throw new Error(`${command} exited with ${child.exitCode}: ${stderr}`);
    const failed = await Promise.race([spawnError, new Promise<undefined>((resolve) => setTimeout(resolve, 50, undefined))]);
    if (failed !== undefined) throw new Error(`cannot start ${command}: ${failed.message}`);
    if (await canConnect(listen)) return child;
  }
  throw new Error(`${command} did not start listening within 5 s: ${stderr}`);
}

async function stopServer(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 2000);
  await exited;
  clearTimeout(timer);
}

async function startNbdkit(name: string, args: string[]): Promise<{ target: NbdTarget; child: ChildProcess }> {
  const socket = path.join(dir, `${name}.sock`);
  const child = await startServer('nbdkit', ['--foreground', '--exit-with-parent', '--unix', socket, ...args], { path: socket });
  return { target: { unix: socket }, child };
}

function compareToReference(data: Buffer, offset: number, what: string): void {
  const expected = reference.subarray(offset, offset + data.length);
  if (!data.equals(expected)) assert.fail(`${what}: ${data.length} bytes at ${offset} differ from qemu-img convert's output`);
}

/** base:allocation-style runs from `qemu-img map`: HOLE when not data, ZERO when zero. */
async function qemuImgMapRuns(): Promise<BlockStatusExtent[]> {
  const map = JSON.parse(await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', image])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
  const runs: BlockStatusExtent[] = [];
  for (const entry of map) {
    const flags = (entry.data ? 0 : AllocationFlag.hole) | (entry.zero ? AllocationFlag.zero : 0);
    const last = runs[runs.length - 1];
    if (last !== undefined && last.flags === flags) last.length += entry.length;
    else runs.push({ offset: entry.start, length: entry.length, flags });
  }
  return runs;
}

/** Writes made after the bitmap was added, and what the bitmap must therefore mark dirty (64 KiB granules). */
const WRITES_AFTER_BITMAP = [
  { command: 'write -P 0x77 30M 64k', dirty: { offset: 30 * MiB, length: 64 * KiB } },
  { command: 'write -P 0x66 41024k 192k', dirty: { offset: 41024 * KiB, length: 192 * KiB } },
  { command: 'write -z 2304k 64k', dirty: { offset: 2304 * KiB, length: 64 * KiB } },
  { command: `write -P 0x55 ${50 * MiB + 1000} 100`, dirty: { offset: 50 * MiB, length: 64 * KiB } },
];

async function buildImage(): Promise<void> {
  image = path.join(dir, 'disk.qcow2');
  const random = path.join(dir, 'random.bin');
  await fs.writeFile(random, randomBytes(3 * MiB));
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, String(DISK_SIZE)]);
  // Data, a partly written cluster, zero clusters (write -z) and unallocated ranges in between.
  await run('qemu-io', ['-f', 'qcow2',
    '-c', 'write -P 0xab 0 64k',
    '-c', `write -s ${random} 2M 1M`,
    '-c', 'write -P 0xcd 5124k 12k',
    '-c', 'write -z 8M 1M',
    '-c', `write -s ${random} 20M 3M`,
    '-c', 'write -P 0x01 63M 1M',
    image]);
  await run('qemu-img', ['bitmap', '--add', '-f', 'qcow2', image, 'bm0']);
  await run('qemu-io', ['-f', 'qcow2', ...WRITES_AFTER_BITMAP.flatMap((write) => ['-c', write.command]), image]);
  const raw = path.join(dir, 'reference.raw');
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
  reference = await fs.readFile(raw);
  assert.equal(reference.length, DISK_SIZE);
}

async function makeCertificates(tlsDir: string): Promise<void> {
  await fs.mkdir(tlsDir);
  const p = (name: string): string => path.join(tlsDir, name);
  const subj = (cn: string): string[] => ['-subj', `/CN=${cn}`];
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'];
  await run('openssl', ['req', '-x509', ...key, '-nodes', '-keyout', p('ca-key.pem'), '-out', p('ca-cert.pem'), '-days', '2',
    ...subj('Tresor test CA'), '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  for (const [role, usage, san] of [['server', 'serverAuth', 'subjectAltName=DNS:localhost,IP:127.0.0.1\n'], ['client', 'clientAuth', '']] as const) {
    await run('openssl', ['req', ...key, '-nodes', '-keyout', p(`${role}-key.pem`), '-out', p(`${role}.csr`), ...subj(role === 'server' ? 'localhost' : 'tresor')]);
    await fs.writeFile(p(`${role}.ext`), `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=${usage}\n${san}`);
    await run('openssl', ['x509', '-req', '-in', p(`${role}.csr`), '-CA', p('ca-cert.pem'), '-CAkey', p('ca-key.pem'), '-CAcreateserial',
      '-out', p(`${role}-cert.pem`), '-days', '2', '-extfile', p(`${role}.ext`)]);
  }
}

async function expectNbdError(promise: Promise<unknown>, code: string, pattern?: RegExp): Promise<NbdError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof NbdError, `expected an NbdError, got ${String(err)}`);
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    if (pattern !== undefined) assert.match(err.message, pattern);
    return err;
  }
  assert.fail(`expected an NbdError ${code}, but the call succeeded`);
}

async function collect(source: NbdDiskSource, offset: number, length: number): Promise<Extent[]> {
  const extents: Extent[] = [];
  for await (const extent of source.extents(offset, length)) extents.push(extent);
  return extents;
}

function assertCovers(extents: Array<{ offset: number; length: number }>, offset: number, length: number): void {
  let position = offset;
  for (const extent of extents) {
    assert.equal(extent.offset, position, 'extents must be consecutive');
    assert.ok(extent.length > 0);
    position += extent.length;
  }
  assert.equal(position, offset + length, 'extents must cover the whole range');
}

before(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'tresor-nbd-'));
  await buildImage();
});

after(async () => {
  await Promise.all(servers.map((child) => stopServer(child)));
  if (dir !== '') await fs.rm(dir, { recursive: true, force: true });
});

describe('qemu-nbd (unix socket, qcow2 with a dirty bitmap)', () => {
  let target: NbdTarget;
  const open = (extra: Partial<Parameters<typeof NbdClient.connect>[1]> = {}): Promise<NbdClient> =>
    NbdClient.connect(target, { exportName: 'disk', metaContexts: ['base:allocation', BITMAP], ...extra });

  before(async () => {
    const socket = path.join(dir, 'qemu.sock');
    await startServer('qemu-nbd', ['--read-only', '--persistent', '--shared=8', '--format=qcow2', '--export-name=disk', '--bitmap=bm0', '--socket', socket, image], { path: socket });
    target = { unix: socket };
  });

  it('negotiates size, flags, structured replies and the metadata contexts it grants', async () => {
    const client = await open();
    try {
      const info = JSON.parse(await run('qemu-img', ['info', '--output=json', '-U', image])) as { 'virtual-size': number };
      assert.equal(client.size, info['virtual-size']);
      assert.ok(client.readOnly);
      assert.ok(client.structuredReplies);
      assert.deepEqual([...client.contexts.keys()].sort(), ['base:allocation', BITMAP]);
      assert.notEqual(client.contexts.get('base:allocation'), client.contexts.get(BITMAP));
      assert.match(client.description, /^nbd\+unix:\/\/\/disk\?socket=/);
    } finally {
      await client.close();
    }
  });

  it('reads the whole disk byte-identical to qemu-img convert, holes and zero clusters included', async () => {
    const client = await open({ maxRequestBytes: 1 * MiB });
    try {
      compareToReference(await client.read(0, DISK_SIZE), 0, 'full read');
      compareToReference(await client.read(5124 * KiB + 7, 12 * KiB - 3), 5124 * KiB + 7, 'unaligned read');
      compareToReference(await client.read(DISK_SIZE - 1, 1), DISK_SIZE - 1, 'last byte');
      assert.equal((await client.read(100, 0)).length, 0);
      await expectNbdError(client.read(DISK_SIZE - 10, 11), 'nbd-usage', /outside the export/);
    } finally {
      await client.close();
    }
  });

  it('keeps hundreds of random reads in flight (at most maxInFlight on the wire) and matches every reply', async () => {
    const client = await open({ maxInFlight: 16 });
    try {
      const reads = Array.from({ length: 400 }, () => {
        const length = randomInt(1, 256 * KiB);
        return { offset: randomInt(0, DISK_SIZE - length), length };
      });
      const results = reads.map((read) => client.read(read.offset, read.length));
      assert.ok(client.load > 16, 'the rest should be queued');
      let mostOnTheWire = 0;
      const sampler = setInterval(() => { mostOnTheWire = Math.max(mostOnTheWire, client.inFlightRequests); }, 1);
      const buffers = await Promise.all(results).finally(() => clearInterval(sampler));
      assert.ok(mostOnTheWire > 1 && mostOnTheWire <= 16, `${mostOnTheWire} requests were on the wire at once`);
      buffers.forEach((buffer, index) => compareToReference(buffer, reads[index]!.offset, `random read ${index}`));
      assert.equal(client.load, 0);
    } finally {
      await client.close();
    }
  });

  it('spreads reads over a pool of connections', async () => {
    const pool = await NbdReaderPool.open(target, { exportName: 'disk', connections: 4, maxRequestBytes: 512 * KiB });
    try {
      compareToReference(await pool.read(0, DISK_SIZE), 0, 'pooled full read');
      compareToReference(await pool.read(3 * MiB - 5, 2 * MiB + 11), 3 * MiB - 5, 'pooled unaligned read');
      for (const client of pool.clients) assert.ok(client.requestsSent > 10, `every connection should carry reads (${client.requestsSent})`);
    } finally {
      await pool.close();
    }
  });

  it('reports base:allocation exactly as qemu-img map', async () => {
    const client = await open();
    try {
      assert.deepEqual(await client.blockStatus('base:allocation', 0, DISK_SIZE), await qemuImgMapRuns());
      const window = await client.blockStatus('base:allocation', 2 * MiB + 123, 7 * MiB);
      assertCovers(window, 2 * MiB + 123, 7 * MiB);
      await expectNbdError(client.blockStatus('qemu:allocation-depth', 0, 4096), 'nbd-usage', /not granted/);
    } finally {
      await client.close();
    }
  });

  it('reports qemu:dirty-bitmap dirty exactly where the image was written after the bitmap was added', async () => {
    const client = await open();
    try {
      const dirty = (await client.blockStatus(BITMAP, 0, DISK_SIZE))
        .filter((extent) => (extent.flags & DIRTY_BITMAP_FLAG_DIRTY) !== 0)
        .map(({ offset, length }) => ({ offset, length }));
      const expected = WRITES_AFTER_BITMAP.map((write) => write.dirty).sort((a, b) => a.offset - b.offset);
      assert.deepEqual(dirty, expected);
    } finally {
      await client.close();
    }
  });

  it('NbdDiskSource: extents from base:allocation, and a restore from them equals the disk', async () => {
    const source = await NbdDiskSource.open(target, { exportName: 'disk', connections: 2, statusWindow: 8 * MiB });
    try {
      assert.equal(source.format, 'nbd');
      assert.equal(source.size, DISK_SIZE);
      const extents = await collect(source, 0, DISK_SIZE);
      assertCovers(extents, 0, DISK_SIZE);
      const restored = Buffer.alloc(DISK_SIZE);
      for (const extent of extents) {
        assert.notEqual(extent.kind, 'unchanged');
        if (extent.kind === 'data') (await source.read(extent.offset, extent.length)).copy(restored, extent.offset);
      }
      assert.ok(restored.equals(reference), 'zero extents must really read as zeros');
      const mapped = await qemuImgMapRuns();
      const zeroBytes = mapped.filter((run) => (run.flags & AllocationFlag.zero) !== 0).reduce((sum, run) => sum + run.length, 0);
      assert.equal(extents.filter((extent) => extent.kind === 'zero').reduce((sum, extent) => sum + extent.length, 0), zeroBytes);
      assertCovers(await collect(source, 1000, 3 * MiB), 1000, 3 * MiB);
    } finally {
      await source.close();
    }
  });

  it('NbdDiskSource with the dirty bitmap: clean ranges are unchanged, dirty ones data or zero', async () => {
    const source = await NbdDiskSource.open(target, { exportName: 'disk', dirtyBitmap: BITMAP, statusWindow: 16 * MiB });
    try {
      const extents = await collect(source, 0, DISK_SIZE);
      assertCovers(extents, 0, DISK_SIZE);
      const changed = extents.filter((extent) => extent.kind !== 'unchanged');
      const expected = WRITES_AFTER_BITMAP.map((write) => write.dirty).sort((a, b) => a.offset - b.offset);
      assert.deepEqual(changed.map(({ offset, length }) => ({ offset, length })), expected);
      // The write -z range is dirty and reads as zeros; the others carry data.
      assert.deepEqual(changed.map((extent) => extent.kind), ['zero', 'data', 'data', 'data']);
    } finally {
      await source.close();
    }
  });

  it('NbdDiskSource asks block status once per window while a backup walks the disk in small batches', async () => {
    const source = await NbdDiskSource.open(target, { exportName: 'disk', dirtyBitmap: BITMAP, statusWindow: 16 * MiB });
    try {
      const whole = await collect(source, 0, DISK_SIZE);
      const fresh = await NbdDiskSource.open(target, { exportName: 'disk', dirtyBitmap: BITMAP, statusWindow: 16 * MiB });
      const freshReader = fresh.reader as { blockStatus: (...args: never[]) => Promise<unknown> };
      const freshStatus = freshReader.blockStatus.bind(freshReader);
      let freshAsked = 0;
      freshReader.blockStatus = (...args: never[]) => {
        freshAsked++;
        return freshStatus(...args);
      };
      try {
        const walked: Array<{ offset: number; length: number; kind: string }> = [];
        for (let at = 0; at < DISK_SIZE; at += 2 * MiB) {
          for (const e of await collect(fresh, at, Math.min(2 * MiB, DISK_SIZE - at))) {
            const last = walked.at(-1);
            if (last && last.kind === e.kind && last.offset + last.length === e.offset) last.length += e.length;
            else walked.push({ ...e });
          }
        }
        assert.deepEqual(walked, whole.map((e) => ({ ...e })));
        // Two contexts (allocation, bitmap) per 16 MiB window, however many batches asked.
        assert.equal(freshAsked, 2 * Math.ceil(DISK_SIZE / (16 * MiB)));
      } finally {
        await fresh.close();
      }
    } finally {
      await source.close();
    }
  });

  it('refuses an incremental source when the bitmap context is not granted', async () => {
    await expectNbdError(NbdDiskSource.open(target, { exportName: 'disk', dirtyBitmap: 'qemu:dirty-bitmap:nosuch' }), 'nbd-context-missing', /impossible/);
  });

  it('names the export and the reply when the export does not exist', async () => {
    await expectNbdError(NbdClient.connect(target, { exportName: 'nosuch' }), 'nbd-handshake', /NBD_REP_ERR_UNKNOWN/);
  });
});

describe('qemu-nbd over TCP with TLS (x509 certificates from openssl)', () => {
  let port = 0;
  let tlsDir = '';
  const file = (name: string): Promise<Buffer> => fs.readFile(path.join(tlsDir, name));

  before(async () => {
    tlsDir = path.join(dir, 'tls');
    await makeCertificates(tlsDir);
    port = await freePort();
    await startServer('qemu-nbd', ['--read-only', '--persistent', '--shared=4', '--format=qcow2', '--export-name=disk',
      '--object', `tls-creds-x509,id=tls0,dir=${tlsDir},endpoint=server,verify-peer=on`, '--tls-creds', 'tls0',
      '--bind', '127.0.0.1', '--port', String(port), image], { host: '127.0.0.1', port });
  });

  it('upgrades with STARTTLS, presents the client certificate, reads correctly', async () => {
    const client = await NbdClient.connect({ host: '127.0.0.1', port, tls: { ca: await file('ca-cert.pem'), cert: await file('client-cert.pem'), key: await file('client-key.pem') } },
      { exportName: 'disk', metaContexts: ['base:allocation'] });
    try {
      assert.ok(client.tls);
      assert.equal(client.description, `nbds://127.0.0.1:${port}/disk`);
      compareToReference(await client.read(0, 8 * MiB), 0, 'read over TLS');
      assert.deepEqual(await client.blockStatus('base:allocation', 0, DISK_SIZE), await qemuImgMapRuns());
    } finally {
      await client.close();
    }
  });

  it('reports that TLS is required when connecting in clear text', async () => {
    await expectNbdError(NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk' }), 'nbd-handshake', /TLS_REQD/);
  });

  it('fails the handshake on an untrusted server certificate and on a missing client certificate', async () => {
    const strangerDir = path.join(dir, 'tls-stranger');
    await makeCertificates(strangerDir);
    const strangerCa = await fs.readFile(path.join(strangerDir, 'ca-cert.pem'));
    await expectNbdError(NbdClient.connect({ host: '127.0.0.1', port, tls: { ca: strangerCa } }, { exportName: 'disk' }), 'nbd-handshake', /TLS handshake/);
    const noClientCert = await expectNbdError(NbdClient.connect({ host: '127.0.0.1', port, tls: { ca: await file('ca-cert.pem') } }, { exportName: 'disk' }), 'nbd-handshake');
    assert.match(noClientCert.hint ?? '', /certificate/);
  });
});

describe('nbdkit', () => {
  it('serves reads over TCP identical to what nbdcopy (libnbd) reads', async () => {
    const port = await freePort();
    await startServer('nbdkit', ['--foreground', '--exit-with-parent', '--ipaddr', '127.0.0.1', '--port', String(port), 'pattern', '16M'], { host: '127.0.0.1', port });
    const copy = path.join(dir, 'pattern.raw');
    await run('nbdcopy', [`nbd://127.0.0.1:${port}`, copy]);
    const expected = await fs.readFile(copy);
    const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: '', metaContexts: ['base:allocation'] });
    try {
      assert.equal(client.description, `nbd://127.0.0.1:${port}/`);
      assert.ok((await client.read(0, 16 * MiB)).equals(expected));
      const reads = Array.from({ length: 200 }, () => ({ offset: randomInt(0, 16 * MiB - 70000), length: randomInt(1, 70000) }));
      const buffers = await Promise.all(reads.map((read) => client.read(read.offset, read.length)));
      buffers.forEach((buffer, index) => assert.ok(buffer.equals(expected.subarray(reads[index]!.offset, reads[index]!.offset + reads[index]!.length))));
    } finally {
      await client.close();
    }
  });

  it('works with simple replies only (--no-sr) and with the old non-fixed newstyle (EXPORT_NAME, zero padding)', async () => {
    for (const [name, flag] of [['nosr', '--no-sr'], ['nofixed', '--mask-handshake=0']] as const) {
      const { target } = await startNbdkit(name, [flag, 'pattern', '8M']);
      const client = await NbdClient.connect(target, { exportName: '', metaContexts: ['base:allocation'] });
      try {
        assert.equal(client.structuredReplies, false);
        assert.equal(client.contexts.size, 0);
        const data = await client.read(4 * MiB + 3, 100_000);
        assert.equal(data.readBigUInt64BE(5), BigInt(4 * MiB + 8), 'pattern plugin: each 8-byte word holds its own offset');
        await expectNbdError(client.blockStatus('base:allocation', 0, 4096), 'nbd-usage', /not granted/);
      } finally {
        await client.close();
      }
    }
  });

  it('rejects an oldstyle server clearly', async () => {
    const { target } = await startNbdkit('oldstyle', ['--oldstyle', 'pattern', '1M']);
    await expectNbdError(NbdClient.connect(target, { exportName: '' }), 'nbd-handshake', /oldstyle/);
  });

  it('respects minimum and maximum block sizes (the server rejects unaligned or oversized requests)', async () => {
    const { target } = await startNbdkit('blocksize', ['--filter=blocksize-policy', 'pattern', '8M',
      'blocksize-minimum=4096', 'blocksize-preferred=16384', 'blocksize-maximum=65536', 'blocksize-error-policy=error']);
    const client = await NbdClient.connect(target, { exportName: '', metaContexts: ['base:allocation'] });
    try {
      assert.deepEqual(client.blockSize, { minimum: 4096, preferred: 16384, maximum: 65536 });
      assert.equal(client.maxReadRequest, 65536);
      const data = await client.read(12345, 300_000);
      for (let at = (8 - (12345 % 8)) % 8; at + 8 <= data.length; at += 8) {
        assert.equal(data.readBigUInt64BE(at), BigInt(12345 + at));
      }
      assertCovers(await client.blockStatus('base:allocation', 1000, 5000), 1000, 5000);
    } finally {
      await client.close();
    }
  });

  it('turns error replies into NbdError with the errno, and the connection stays usable', async () => {
    const inject = path.join(dir, 'inject');
    const { target } = await startNbdkit('error', ['--filter=error', 'memory', '8M',
      'error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${inject}`,
      'error-extents=EPERM', 'error-extents-rate=100%', `error-extents-file=${inject}`]);
    const client = await NbdClient.connect(target, { exportName: '', metaContexts: ['base:allocation'] });
    try {
      assert.equal((await client.read(0, 4096)).length, 4096);
      await fs.writeFile(inject, '');
      const readError = await expectNbdError(client.read(65536, 4096), 'nbd-server-error', /EIO/);
      assert.equal(readError.errno, 'EIO');
      assert.equal(readError.errnoValue, 5);
      assert.ok(readError.message.includes(client.description));
      const statusError = await expectNbdError(client.blockStatus('base:allocation', 0, 8 * MiB), 'nbd-server-error');
      assert.equal(statusError.errno, 'EPERM');
      await fs.rm(inject);
      assert.ok((await client.read(65536, 4096)).equals(Buffer.alloc(4096)));
    } finally {
      await client.close();
    }
  });

  it('matches replies that come back out of order', async () => {
    const script = path.join(dir, 'slow-first.sh');
    await fs.writeFile(script, [
      '#!/bin/sh',
      'case "$1" in',
      '  thread_model) echo parallel ;;',
      '  get_size) echo 1M ;;',
      '  pread) if [ "$4" = 0 ]; then sleep 0.6; fi; head -c "$3" /dev/zero | tr "\\000" "\\132" ;;',
      '  *) exit 2 ;;',
      'esac',
      '',
    ].join('\n'), { mode: 0o755 });
    const { target } = await startNbdkit('ooo', ['sh', script]);
    const client = await NbdClient.connect(target, { exportName: '' });
    try {
      const order: string[] = [];
      const slow = client.read(0, 4096).then((data) => { order.push('slow'); return data; });
      await new Promise((resolve) => setTimeout(resolve, 100));
      const fast = client.read(65536, 4096).then((data) => { order.push('fast'); return data; });
      const [slowData, fastData] = await Promise.all([slow, fast]);
      assert.deepEqual(order, ['fast', 'slow']);
      assert.ok(slowData.equals(Buffer.alloc(4096, 0x5a)));
      assert.ok(fastData.equals(Buffer.alloc(4096, 0x5a)));
    } finally {
      await client.close();
    }
  });

  it('rejects every pending read promptly when the server dies mid-request', async () => {
    const { target, child } = await startNbdkit('dying', ['--filter=delay', 'pattern', '8M', 'delay-read=10']);
    const client = await NbdClient.connect(target, { exportName: '', maxInFlight: 4 });
    const reads = Array.from({ length: 8 }, (_, index) => client.read(index * 65536, 65536));
    const settled = Promise.allSettled(reads);
    await new Promise((resolve) => setTimeout(resolve, 200));
    const killedAt = Date.now();
    await stopServer(child, 'SIGKILL');
    const results = await settled;
    assert.ok(Date.now() - killedAt < 2000, 'pending reads must not wait for a timeout');
    for (const result of results) {
      assert.equal(result.status, 'rejected');
      const reason = (result as PromiseRejectedResult).reason as NbdError;
      assert.ok(reason instanceof NbdError);
      assert.equal(reason.code, 'nbd-disconnected');
      assert.ok(reason.message.includes((target as { unix: string }).unix), reason.message);
    }
    await expectNbdError(client.read(0, 512), 'nbd-disconnected');
    await client.close();
  });

  it('rejects a pending read when a plugin makes the server drop the connection (nbdkit sh)', async () => {
    const script = path.join(dir, 'drop.sh');
    await fs.writeFile(script, [
      '#!/bin/sh',
      'case "$1" in',
      '  get_size) echo 1M ;;',
      '  pread) if [ "$4" -ge 524288 ]; then kill -9 $PPID; exit 1; fi; head -c "$3" /dev/zero ;;',
      '  *) exit 2 ;;',
      'esac',
      '',
    ].join('\n'), { mode: 0o755 });
    const { target } = await startNbdkit('drop', ['sh', script]);
    const client = await NbdClient.connect(target, { exportName: '' });
    assert.ok((await client.read(0, 4096)).equals(Buffer.alloc(4096)));
    await expectNbdError(client.read(524288, 4096), 'nbd-disconnected', /closed the connection/);
    await client.close();
  });
});

// -----------------------------------------------------------------------------------------------
// A scripted NBD server (TCP) for behaviour real servers cannot be made to show.
// -----------------------------------------------------------------------------------------------

interface ScriptedRequest {
  type: number;
  handle: Buffer;
  offset: number;
  length: number;
}

interface Script {
  /** Replaces the whole server side: raw bytes straight after accepting. */
  raw?: (socket: net.Socket) => void;
  /** Answer NBD_OPT_GO with NBD_REP_ERR_UNSUP (forces the EXPORT_NAME fallback). */
  goUnsupported?: boolean;
  /** Replaces the reply to NBD_OPT_STRUCTURED_REPLY. */
  optionReply?: (socket: net.Socket) => void;
  onRequest?: (request: ScriptedRequest, socket: net.Socket) => void;
  size?: number;
}

const OPTION_REPLY_MAGIC = Buffer.from('0003e889045565a9', 'hex');

function optionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(20);
  OPTION_REPLY_MAGIC.copy(header, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type >>> 0, 12);
  header.writeUInt32BE(payload.length, 16);
  return Buffer.concat([header, payload]);
}

function chunk(flags: number, type: number, handle: Buffer, payload: Buffer, lengthOverride?: number): Buffer {
  const header = Buffer.alloc(20);
  header.writeUInt32BE(0x668e33ef, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  handle.copy(header, 8);
  header.writeUInt32BE(lengthOverride ?? payload.length, 16);
  return Buffer.concat([header, payload]);
}

function u64(value: number): Buffer {
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64BE(BigInt(value));
  return buf;
}

function u32s(...values: number[]): Buffer {
  const buf = Buffer.alloc(4 * values.length);
  values.forEach((value, index) => buf.writeUInt32BE(value >>> 0, index * 4));
  return buf;
}

function offsetData(handle: Buffer, offset: number, data: Buffer, done = true): Buffer {
  return chunk(done ? 1 : 0, 1, handle, Buffer.concat([u64(offset), data]));
}

async function startScripted(script: Script): Promise<{ target: NbdTarget; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    if (script.raw !== undefined) {
      script.raw(socket);
      return;
    }
    const greeting = Buffer.concat([Buffer.from('NBDMAGICIHAVEOPT', 'latin1'), Buffer.from([0, 3])]);
    socket.write(greeting);
    let buffered = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    let noZeroes = false;
    const size = script.size ?? MiB;
    const exportInfo = Buffer.concat([Buffer.from([0, 0]), u64(size), Buffer.from([0, 3])]);
    socket.on('data', (data: Buffer) => {
      buffered = Buffer.concat([buffered, data]);
      for (;;) {
        if (phase === 'flags') {
          if (buffered.length < 4) return;
          noZeroes = (buffered.readUInt32BE(0) & 2) !== 0;
          buffered = buffered.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buffered.length < 16) return;
          const option = buffered.readUInt32BE(8);
          const length = buffered.readUInt32BE(12);
          if (buffered.length < 16 + length) return;
          buffered = buffered.subarray(16 + length);
          if (option === 8 && script.optionReply !== undefined) script.optionReply(socket);
          else if (option === 8) socket.write(optionReply(8, 1));
          else if (option === 10) socket.write(Buffer.concat([optionReply(10, 4, Buffer.concat([u32s(7), Buffer.from('base:allocation')])), optionReply(10, 1)]));
          else if (option === 7 && script.goUnsupported === true) socket.write(optionReply(7, 0x80000001));
          else if (option === 7) {
            socket.write(Buffer.concat([optionReply(7, 3, exportInfo), optionReply(7, 1)]));
            phase = 'transmission';
          } else if (option === 1) {
            socket.write(Buffer.concat([u64(size), Buffer.from([0, 3]), noZeroes ? Buffer.alloc(0) : Buffer.alloc(124)]));
            phase = 'transmission';
          } else socket.write(optionReply(option, 0x80000001));
        } else {
          if (buffered.length < 28) return;
          const request = { type: buffered.readUInt16BE(6), handle: Buffer.from(buffered.subarray(8, 16)), offset: Number(buffered.readBigUInt64BE(16)), length: buffered.readUInt32BE(24) };
          buffered = buffered.subarray(28);
          if (request.type === 2) {
            socket.end();
            return;
          }
          script.onRequest?.(request, socket);
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    target: { host: '127.0.0.1', port },
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

async function withScripted<T>(script: Script, body: (target: NbdTarget) => Promise<T>): Promise<T> {
  const server = await startScripted(script);
  try {
    return await body(server.target);
  } finally {
    await server.close();
  }
}

/** Connects, sends one read, and expects the connection to fail with a protocol error. */
async function expectReadViolation(onRequest: Script['onRequest'], pattern: RegExp): Promise<void> {
  await withScripted({ onRequest }, async (target) => {
    const client = await NbdClient.connect(target, { exportName: 'x', timeoutMs: 3000 });
    await expectNbdError(client.read(0, 4096), 'nbd-protocol', pattern);
    await expectNbdError(client.read(0, 4096), 'nbd-protocol');
    await client.close();
  });
}

describe('reply reassembly (scripted)', () => {
  it('reads right however the stream is cut: many replies per segment, one reply over many, replies larger than the reader\'s spill buffer', async () => {
    // Bytes of the export: a function of the offset, so every reply can be checked.
    const content = (offset: number, length: number) => {
      const b = Buffer.allocUnsafe(length);
      for (let i = 0; i < length; i++) b[i] = (Math.imul(offset + i, 2654435761) >>> 24) & 255;
      return b;
    };
    const lengths = Array.from({ length: 96 }, (_, i) => (i % 16 === 5 ? 300 * 1024 + i : i % 4 === 0 ? 1 + i * 37 : 512 + ((i * 7919) % 8192)));
    const pending: ScriptedRequest[] = [];
    let answered = 0;
    const onRequest = (request: ScriptedRequest, socket: net.Socket) => {
      pending.push(request);
      if (pending.length < Math.min(32, lengths.length - answered)) return;
      // All replies of the round in one stream, last request first, written in random slices
      // (1 byte to 150 KiB) a moment apart, so reads see every kind of cut.
      const stream = Buffer.concat(pending.reverse().map((r) => offsetData(r.handle, r.offset, content(r.offset, r.length))));
      answered += pending.length;
      pending.length = 0;
      void (async () => {
        for (let at = 0; at < stream.length;) {
          const n = Math.min(stream.length - at, randomInt(4) === 0 ? 1 + randomInt(64) : 1 + randomInt(150 * 1024));
          socket.write(stream.subarray(at, at + n));
          at += n;
          await new Promise((r) => setImmediate(r));
        }
      })();
    };
    await withScripted({ onRequest, size: 64 * MiB }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x', timeoutMs: 10_000, maxInFlight: 32 });
      let offset = 0;
      const reads = lengths.map((length, i) => {
        const at = offset;
        offset += length + 4096;
        if (i % 2 === 0) return client.read(at, length).then((got) => ({ at, got }));
        if (i % 4 === 1) {
          const target = Buffer.alloc(length);
          return client.readInto(at, length, target).then(() => ({ at, got: target }));
        }
        // A range of shared memory between guard bytes (the codec pool's arena): payloads land
        // there in place, and not one byte beyond the range.
        const arena = Buffer.from(new SharedArrayBuffer(length + 8192)).fill(0xab);
        const target = arena.subarray(4096, 4096 + length);
        return client.readInto(at, length, target).then(() => {
          assert.ok(arena.subarray(0, 4096).every((b) => b === 0xab) && arena.subarray(4096 + length).every((b) => b === 0xab), `read at ${at} wrote outside its target`);
          return { at, got: target };
        });
      });
      const results = await Promise.all(reads);
      for (const { at, got } of results) assert.ok(got.equals(content(at, got.length)), `read at ${at} (${got.length} bytes) returned other bytes`);
      // Buffers handed out stay intact while the connection goes on reading into its own.
      const again = await client.read(0, lengths[0]);
      assert.ok(again.equals(content(0, lengths[0])));
      for (const { at, got } of results) assert.ok(got.equals(content(at, got.length)), `read at ${at} changed after later reads`);
      await client.close();
    });
    assert.equal(answered, lengths.length + 1);
  });
});

describe('hostile or broken servers (scripted)', () => {
  it('random bytes instead of a greeting: a clean protocol error', async () => {
    await withScripted({ raw: (socket) => socket.write(randomBytes(64)) }, async (target) => {
      await expectNbdError(NbdClient.connect(target, { exportName: 'x', timeoutMs: 3000 }), 'nbd-protocol', /not an NBD server/);
    });
  });

  it('an option reply claiming 4 GiB: rejected before anything is allocated', async () => {
    await withScripted({ optionReply: (socket) => socket.write(optionReply(8, 1).fill(0xff, 16, 20)) }, async (target) => {
      await expectNbdError(NbdClient.connect(target, { exportName: 'x', timeoutMs: 3000 }), 'nbd-protocol', /exceeds/);
    });
  });

  it('a server that accepts and stays silent: the handshake times out', async () => {
    await withScripted({ raw: () => {} }, async (target) => {
      const started = Date.now();
      await expectNbdError(NbdClient.connect(target, { exportName: 'x', timeoutMs: 300 }), 'nbd-timeout');
      assert.ok(Date.now() - started < 2000);
    });
  });

  it('a server that never answers a read: the read times out and the connection is dropped', async () => {
    await withScripted({ onRequest: () => {} }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x', timeoutMs: 300 });
      const started = Date.now();
      await expectNbdError(client.read(0, 4096), 'nbd-timeout', /sent nothing for 300 ms/);
      assert.ok(Date.now() - started < 2000);
      await client.close();
    });
  });

  it('a server that hangs up after a request: the read rejects', async () => {
    await withScripted({ onRequest: (_request, socket) => socket.destroy() }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x' });
      await expectNbdError(client.read(0, 4096), 'nbd-disconnected', /closed the connection/);
    });
  });

  it('absurd, inconsistent or misplaced reply chunks are protocol errors', async () => {
    await expectReadViolation((request, socket) => socket.write(chunk(1, 1, request.handle, Buffer.alloc(0), 0xfffffff0)), /larger than allowed/);
    await expectReadViolation((request, socket) => socket.write(offsetData(Buffer.from('unknown!'), 0, Buffer.alloc(4096))), /matches no pending request/);
    await expectReadViolation((request, socket) => socket.write(offsetData(request.handle, 512 * KiB, Buffer.alloc(4096))), /outside/);
    await expectReadViolation((request, socket) => socket.write(Buffer.concat([
      offsetData(request.handle, 0, Buffer.alloc(2048), false), offsetData(request.handle, 1024, Buffer.alloc(2048))])), /overlaps/);
    await expectReadViolation((request, socket) => socket.write(offsetData(request.handle, 0, Buffer.alloc(2048))), /only 2048 bytes/);
    await expectReadViolation((request, socket) => socket.write(chunk(1, 77, request.handle, Buffer.alloc(8))), /larger than allowed|unknown/);
    await expectReadViolation((_request, socket) => socket.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n')), /bad reply magic/);
    await expectReadViolation((request, socket) => {
      const simple = Buffer.alloc(16);
      simple.writeUInt32BE(0x67446698, 0);
      request.handle.copy(simple, 8);
      socket.write(Buffer.concat([simple, Buffer.alloc(4096)]));
    }, /simple reply with data/);
  });

  it('random garbage after a valid handshake never hangs and never crashes', async () => {
    for (let round = 0; round < 30; round++) {
      await withScripted({ onRequest: (request, socket) => socket.write(Buffer.concat([randomInt(2) === 0 ? Buffer.from('668e33ef', 'hex') : Buffer.alloc(0), randomBytes(randomInt(1, 200))])) }, async (target) => {
        const client = await NbdClient.connect(target, { exportName: 'x', timeoutMs: 500 });
        const outcome = await client.read(0, 4096).then(() => 'resolved', (err: unknown) => err);
        assert.ok(outcome instanceof NbdError, `round ${round}: ${String(outcome)}`);
        assert.ok(['nbd-protocol', 'nbd-timeout'].includes(outcome.code), outcome.message);
        client.destroy();
      });
    }
  });

  it('ERROR_OFFSET replies carry errno, message and offset', async () => {
    await withScripted({
      onRequest: (request, socket) => {
        const message = Buffer.from('bad sector');
        const payload = Buffer.concat([u32s(5), Buffer.from([0, message.length]), message, u64(request.offset + 1536)]);
        socket.write(Buffer.concat([offsetData(request.handle, request.offset, Buffer.alloc(1024), false), chunk(1, 0x8002, request.handle, payload)]));
      },
    }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x' });
      const err = await expectNbdError(client.read(8192, 4096), 'nbd-server-error', /EIO at offset 9728: bad sector/);
      assert.equal(err.errno, 'EIO');
      assert.equal(err.offset, 9728);
      await client.close();
    });
  });

  it('block status: fewer extents than asked, and a last extent past the range, are stitched and clipped', async () => {
    const requests: Array<{ offset: number; length: number }> = [];
    await withScripted({
      onRequest: (request, socket) => {
        requests.push({ offset: request.offset, length: request.length });
        // Describe only up to the next 64 KiB boundary per reply, alternating data and hole;
        // the reply to the last request overshoots the range.
        const block = Math.floor(request.offset / 65536);
        const flags = block % 2 === 0 ? 0 : 3;
        socket.write(chunk(1, 5, request.handle, u32s(7, (block + 1) * 65536 - request.offset, flags)));
      },
    }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x', metaContexts: ['base:allocation'] });
      assert.deepEqual([...client.contexts], [['base:allocation', 7]]);
      const extents = await client.blockStatus('base:allocation', 1000, 200_000);
      assert.deepEqual(extents, [
        { offset: 1000, length: 64536, flags: 0 },
        { offset: 65536, length: 65536, flags: 3 },
        { offset: 131072, length: 65536, flags: 0 },
        { offset: 196608, length: 4392, flags: 3 },
      ]);
      assert.equal(requests.length, 4);
      await client.close();
    });
  });

  it('replies in any order over many requests in flight', async () => {
    await withScripted({
      onRequest: (request, socket) => {
        const data = Buffer.alloc(request.length, request.offset / 4096);
        setTimeout(() => socket.write(offsetData(request.handle, request.offset, data)), randomInt(0, 30));
      },
    }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x', maxInFlight: 32 });
      const reads = await Promise.all(Array.from({ length: 100 }, (_, index) => client.read(index * 4096, 4096)));
      reads.forEach((data, index) => assert.ok(data.equals(Buffer.alloc(4096, index)), `read ${index}`));
      await client.close();
    });
  });

  it('falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported', async () => {
    await withScripted({ goUnsupported: true, size: 2 * MiB, onRequest: (request, socket) => socket.write(offsetData(request.handle, request.offset, Buffer.alloc(request.length, 9))) }, async (target) => {
      const client = await NbdClient.connect(target, { exportName: 'x' });
      assert.equal(client.size, 2 * MiB);
      assert.ok((await client.read(MiB, 512)).equals(Buffer.alloc(512, 9)));
      await client.close();
    });
  });
});
