/**
 * What reading a VM's disks from another host costs: `npm run bench:remote`.
 *
 * The reference corpus (bench/corpus.ts) as the qcow2 disk of a domain on a lab libvirt host
 * (test/lab/hosts.ts: its own network namespace and libvirtd, reached over a veth like another
 * machine), backed up whole by Tresor three ways, each on a fresh repository with the page cache
 * dropped before it:
 *   - unix:      qemu+unix:// (this machine; NBD over a unix socket), the baseline;
 *   - tcp+tls:   qemu+tcp:// (a remote host; NBD over TCP with TLS, the default);
 *   - tcp clear: qemu+tcp:// with --nbd-tls off;
 *   - ssh forward: qemu+ssh:// with --nbd-transport ssh (the job's unix socket forwarded by ssh);
 *   - shut off, ssh: the domain shut off, qemu+ssh:// (qemu-nbd on the host, forwarded by ssh).
 * Wall time is spawn to exit; CPU (user+sys, the ssh client's included) and peak RSS come from GNU
 * time (bench/measure.ts runs the commands, as for the other benchmarks). Prints a
 * Markdown table: each transport's range over the runs and its ratio to the unix baseline. On a
 * lab host, sshd and qemu-nbd (shut off) run on the same cores as Tresor, unlike on another
 * machine.
 *
 *   node bench/remote.ts [--size 4G] [--seed 1] [--runs 1] [--dir DIR] [--keep]
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { generateCorpus, parseSize, formatSize } from './corpus.ts';
import { convertToQcow2 } from './vm.ts';
import { createCacheDropper, runChecked } from './measure.ts';
import { defineTestDomain } from '../test/lab/guest.ts';
import { startLibvirtHosts } from '../test/lab/hosts.ts';

const ROOT = resolve(fileURLToPath(new URL('..', import.meta.url)));
const NODE = join(ROOT, 'node_modules', '.bin', 'node');
const CLI = join(ROOT, 'bin', 'tresor.js');

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '4G' },
    seed: { type: 'string', default: '1' },
    runs: { type: 'string', default: '1' },
    dir: { type: 'string', default: '/var/tmp/tresor-bench-remote' },
    keep: { type: 'boolean', default: false },
  },
});
const size = parseSize(values.size);
const runs = Math.max(1, Number(values.runs));
const dir = join(values.dir, `run-${process.pid}`);
mkdirSync(dir, { recursive: true });
const env = { ...process.env, TRESOR_PASSPHRASE: 'bench passphrase', TRESOR_CACHE_DIR: join(dir, 'cache') };

interface Row { transport: string; wall: number; cpu: number; rssMiB: number }

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { env, encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr || r.stdout}`);
  return r.stderr;
}

/** One Tresor command under GNU time (bench/measure.ts, as the other benchmarks measure). */
async function timed(label: string, args: string[]): Promise<Omit<Row, 'transport'>> {
  const m = await runChecked({ argv: [NODE, CLI, ...args], cwd: ROOT, env }, { logBase: join(dir, `log-${label.replace(/\W+/g, '-')}`), timeoutMs: 30 * 60_000, useGnuTime: true });
  return { wall: m.wallSeconds, cpu: (m.userSeconds ?? 0) + (m.sysSeconds ?? 0), rssMiB: (m.peakRssBytes ?? 0) / (1 << 20) };
}

const raw = join(dir, 'corpus.raw');
const image = join(dir, 'disk.qcow2');
console.error(`generating a ${formatSize(size)} corpus in ${dir}`);
generateCorpus(raw, { size, seed: Number(values.seed) });
convertToQcow2(raw, image);
rmSync(raw);

const hosts = await startLibvirtHosts(1);
const rows: Row[] = [];
try {
  const [h1] = hosts.hosts;
  const dom = await defineTestDomain(h1!.uri, { name: `tresor-bench-remote-${process.pid}`, disks: [{ path: image, bus: 'scsi', target: 'sda' }], guest: undefined, consoleLog: join(dir, 'console.log'), agent: false });
  run('virsh', ['-c', h1!.uri, 'start', dom.name]);
  mkdirSync(join(dir, 'scratch'), { recursive: true });
  const transports: Array<[string, string, string[]]> = [
    ['unix', h1!.uri, ['--scratch-dir', join(dir, 'scratch')]],
    ['tcp+tls', h1!.tcpUri, ['--nbd-tls-dir', hosts.pki.clientDir]],
    ['tcp clear', h1!.tcpUri, ['--nbd-tls', 'off']],
    ['ssh forward', h1!.sshUri, ['--nbd-transport', 'ssh']],
  ];
  const caches = createCacheDropper();
  if (!caches.works) console.error(caches.note);
  const measure = async (transport: string, uri: string, extra: string[]) => {
    const repo = join(dir, 'repo');
    rmSync(repo, { recursive: true, force: true });
    run(NODE, [CLI, '--repo', repo, 'repo', 'init']);
    caches.drop();
    const row = { transport, ...await timed(transport, ['--repo', repo, '--json', 'backup', 'vm', dom.name, '--connect', uri, '--consistency', 'off', '--full', ...extra]) };
    console.error(`${transport}: ${row.wall.toFixed(2)} s, ${row.cpu.toFixed(1)} CPU-s, ${row.rssMiB.toFixed(0)} MiB`);
    rows.push(row);
  };
  for (let i = 0; i < runs; i++) {
    for (const [transport, uri, extra] of transports) await measure(transport, uri, extra);
  }
  // Shut off: qemu-img and qemu-nbd on the host over ssh, the data through an ssh forward.
  run('virsh', ['-c', h1!.uri, 'destroy', dom.name]);
  for (let i = 0; i < runs; i++) await measure('shut off, ssh', h1!.sshUri, []);
} finally {
  await hosts.stop();
  if (!values.keep) rmSync(dir, { recursive: true, force: true });
}

const commit = spawnSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).stdout.trim();
const range = (xs: number[], digits: number) => {
  const lo = Math.min(...xs).toFixed(digits);
  const hi = Math.max(...xs).toFixed(digits);
  return lo === hi ? lo : `${lo}–${hi}`;
};
const by = (t: string) => rows.filter((r) => r.transport === t);
const base = Math.min(...by('unix').map((r) => r.wall));
console.log(`Full backup of the ${formatSize(size)} corpus VM on a lab host, ${new Date().toISOString()}, commit ${commit}, ${runs} run(s) each (range over the runs; ratio of the fastest to unix's fastest):\n`);
console.log('| transport | wall | vs unix | CPU user+sys | peak RSS |');
console.log('|---|---:|---:|---:|---:|');
for (const t of ['unix', 'tcp+tls', 'tcp clear', 'ssh forward', 'shut off, ssh']) {
  const rs = by(t);
  const walls = rs.map((r) => r.wall);
  console.log(`| ${t} | ${range(walls, 2)} s | ${(Math.min(...walls) / base).toFixed(2)}× | ${range(rs.map((r) => r.cpu), 1)} s | ${range(rs.map((r) => r.rssMiB), 0)} MiB |`);
}
