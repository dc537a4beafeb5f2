/** `tresor backup image FILE --id NAME`. */
import type { Command } from 'commander';
import { backupImage } from '../../engine/image-backup.ts';
import { backupVm, DEFAULT_SCRATCH_DIR, type ConsistencyPolicy } from '../../engine/vm-backup.ts';
import { DEFAULT_NBD_PORTS, DEFAULT_NBD_TLS_DIR } from '../../engine/vm-nbd-server.ts';
import { openLibvirt } from '../../hypervisor/libvirt.ts';
import { connectUri, DEFAULT_CONNECT } from './vms.ts';
import { UsageError } from '../../util/errors.ts';
import { openRepository } from '../context.ts';
import { Progress, formatBytes, formatDuration, parseSize, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function parseTags(list: string[]): Record<string, string> {
  const tags: Record<string, string> = {};
  for (const t of list) {
    const i = t.indexOf('=');
    if (i <= 0) throw new UsageError(`invalid tag ${JSON.stringify(t)}`, 'write tags as KEY=VALUE');
    tags[t.slice(0, i)] = t.slice(i + 1);
  }
  return tags;
}

/** `10809` or `10809-10908`. */
export function parsePortRange(text: string): [number, number] {
  const match = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(text.trim());
  const low = Number(match?.[1]);
  const high = match?.[2] === undefined ? low : Number(match[2]);
  if (match === null || low < 1 || high > 65535 || low > high) {
    throw new UsageError(`--nbd-port ${JSON.stringify(text)} is not a port or a port range`, 'write one port (10809) or a range (10809-10908) of ports 1-65535');
  }
  return [low, high];
}

export function registerBackupCommands(program: Command, env: CommandEnv): void {
  const backup = program.command('backup').description('create snapshots');
  backup.command('image <file>')
    .description('back up a disk image file (raw or qcow2, with its backing chain)')
    .requiredOption('--id <name>', 'backup id: snapshots are named image/<id>/<time>')
    .option('--tag <key=value...>', 'tags to record on the snapshot', [])
    .action(async (file: string, o: { id: string; tag: string[] }) => {
      const g = env.globals();
      const repo = await openRepository(g);
      const progress = new Progress(`backup ${o.id}`, g);
      const m = await backupImage(repo, file, { id: o.id, tags: parseTags(o.tag), signal: env.signal, progress: (d, t) => progress.update(d, t) });
      progress.finish();
      const d = m.disks[0];
      printResult(g, { ok: true, snapshot: m }, () => [
        `snapshot ${m.name}`,
        `disk ${formatBytes(d.size)} (${d.sourceFormat}), ${formatBytes(d.dataBytes)} in data chunks; read ${formatBytes(m.stats.bytesRead)}`,
        `${m.stats.newChunks} new chunks, ${m.stats.reusedChunks} reused; added ${formatBytes(m.stats.addedBytes)} to the repository in ${formatDuration(m.stats.durationMs)}`,
      ].join('\n'));
    });

  backup.command('vm <domain>')
    .description('back up a libvirt VM (running: pull-mode backup with checkpoints; shut off: from its images)')
    .option('--connect <uri>', `libvirt URI (default: $TRESOR_CONNECT, $LIBVIRT_DEFAULT_URI or ${DEFAULT_CONNECT})`)
    .option('--id <name>', 'backup id (default: the domain name): snapshots are named vm/<id>/<time>')
    .option('--consistency <policy>', 'require: fail without a guest-agent freeze; try: fall back to crash-consistent; off', 'try')
    .option('--full', 'read every disk whole even when an incremental is possible', false)
    .option('--exclude-disk <target...>', 'disks not to back up (vdb, sdc...)', [])
    .option('--bwlimit <rate>', 'read at most this many bytes per second from the VM disks (e.g. 100M)')
    .option('--scratch-dir <dir>', `scratch (copy-before-write) space, a directory on the VM's host (default: ${DEFAULT_SCRATCH_DIR} on this machine; next to each disk image on a remote host)`)
    .option('--scratch-reserve <fraction>', 'free scratch space required, as a fraction of the disks\' size (default 0.1)')
    .option('--nbd-transport <tcp|ssh>', 'remote host: the disk data over TCP (TLS per --nbd-tls), or forwarded over the ssh login of a qemu+ssh:// connection (no certificates needed)', 'tcp')
    .option('--nbd-address <address>', 'remote host: address its NBD server listens on and Tresor connects to (default: the host of --connect)')
    .option('--nbd-port <port|min-max>', `remote host: TCP port(s) for the NBD server (default ${DEFAULT_NBD_PORTS.join('-')})`)
    .option('--nbd-tls <on|off>', 'remote host: TLS for the disk data (default on; off sends it in clear text)', 'on')
    .option('--nbd-tls-dir <dir>', `remote host: ca-cert.pem, client-cert.pem and client-key.pem for TLS (default ${DEFAULT_NBD_TLS_DIR})`)
    .option('--tag <key=value...>', 'tags to record on the snapshot', [])
    .action(async (domain: string, o: {
      connect?: string; id?: string; consistency: string; full: boolean; excludeDisk: string[]; bwlimit?: string; scratchDir?: string; scratchReserve?: string;
      nbdTransport: string; nbdAddress?: string; nbdPort?: string; nbdTls: string; nbdTlsDir?: string; tag: string[];
    }) => {
      const g = env.globals();
      if (!['require', 'try', 'off'].includes(o.consistency)) throw new UsageError(`unknown consistency policy ${JSON.stringify(o.consistency)}`, 'use --consistency require, try or off');
      if (o.nbdTls !== 'on' && o.nbdTls !== 'off') throw new UsageError(`--nbd-tls must be on or off, not ${JSON.stringify(o.nbdTls)}`);
      if (o.nbdTransport !== 'tcp' && o.nbdTransport !== 'ssh') throw new UsageError(`--nbd-transport must be tcp or ssh, not ${JSON.stringify(o.nbdTransport)}`);
      const scratchReserve = o.scratchReserve === undefined ? undefined : Number(o.scratchReserve);
      if (scratchReserve !== undefined && !(scratchReserve >= 0 && scratchReserve <= 1)) {
        throw new UsageError(`--scratch-reserve ${JSON.stringify(o.scratchReserve)} is not a fraction between 0 and 1`, 'e.g. --scratch-reserve 0.05 for 5 % of the disks');
      }
      // The repository's key derivation and libvirt's version check take a while each: at once.
      const [repo, hv] = await Promise.all([openRepository(g), openLibvirt(connectUri(o))]);
      const progress = new Progress(`backup ${domain}`, g);
      const r = await backupVm(repo, hv, domain, {
        id: o.id, consistency: o.consistency as ConsistencyPolicy, full: o.full, excludeDisks: o.excludeDisk,
        bwlimit: o.bwlimit ? parseSize(o.bwlimit) : undefined, scratchDir: o.scratchDir, scratchReserve, tags: parseTags(o.tag),
        nbd: { transport: o.nbdTransport, address: o.nbdAddress, ports: o.nbdPort === undefined ? undefined : parsePortRange(o.nbdPort), tls: o.nbdTls, tlsDir: o.nbdTlsDir },
        signal: env.signal, progress: (d, t) => progress.update(d, t),
        log: (line) => { if (!g.json && !g.quiet && !process.stderr.isTTY) process.stderr.write(`${line}\n`); },
      });
      progress.finish();
      const m = r.manifest;
      const consistency = (m.source.consistency as { level: string }).level;
      printResult(g, { ok: true, snapshot: m, log: r.log }, () => [
        `snapshot ${m.name} (${consistency}-consistent)`,
        ...m.disks.map((d) => `disk ${d.name} ${formatBytes(d.size)}: ${d.base?.snapshot ? `incremental from ${d.base.snapshot}` : `full read${d.base?.reason ? ` (${d.base.reason})` : ''}`}`),
        `read ${formatBytes(m.stats.bytesRead)}; ${m.stats.newChunks} new chunks, ${m.stats.reusedChunks} reused; added ${formatBytes(m.stats.addedBytes)} in ${formatDuration(m.stats.durationMs)}`,
      ].join('\n'));
    });
}
