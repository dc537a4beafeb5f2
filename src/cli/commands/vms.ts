/** `tresor vms [--connect URI]`: the domains of a libvirt host and how they are protected. */
import type { Command } from 'commander';
import { openLibvirt } from '../../hypervisor/libvirt.ts';
import { openRepository, repoLocation } from '../context.ts';
import { printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';
import type { SnapshotManifest } from '../../repo/manifest.ts';

export const DEFAULT_CONNECT = 'qemu:///system';

export function connectUri(o: { connect?: string }): string {
  return o.connect ?? process.env.TRESOR_CONNECT ?? process.env.LIBVIRT_DEFAULT_URI ?? DEFAULT_CONNECT;
}

export function registerVmCommands(program: Command, env: CommandEnv): void {
  program.command('vms')
    .description('list the VMs of a libvirt host, with their last snapshot when a repository is given')
    .option('--connect <uri>', `libvirt URI (default: $TRESOR_CONNECT, $LIBVIRT_DEFAULT_URI or ${DEFAULT_CONNECT})`)
    .action(async (o: { connect?: string }) => {
      const g = env.globals();
      const hv = await openLibvirt(connectUri(o));
      const domains = await hv.listDomains();
      const latest = new Map<string, SnapshotManifest>();
      let hasRepo = true;
      try {
        repoLocation(g);
      } catch {
        hasRepo = false;
      }
      if (hasRepo) {
        const repo = await openRepository(g);
        for (const m of (await repo.listSnapshots({ type: 'vm' })).snapshots) {
          const uuid = String(m.source.uuid ?? '');
          const prev = latest.get(uuid);
          if (!prev || prev.time < m.time) latest.set(uuid, m);
        }
      }
      const rows = await Promise.all(domains.map(async (d) => {
        const m = latest.get(d.uuid);
        const disks = await hv.disks(d.name).catch(() => []);
        return {
          name: d.name, uuid: d.uuid, state: d.state, persistent: d.persistent,
          disks: disks.map((x) => ({ target: x.target, format: x.format, source: x.source })),
          lastSnapshot: m ? { name: m.name, time: m.time, consistency: (m.source.consistency as { level?: string } | undefined)?.level ?? null } : null,
        };
      }));
      printResult(g, { uri: hv.uri, vms: rows }, () => rows.length === 0 ? `no domains at ${hv.uri}` : rows.map((r) =>
        `${r.name.padEnd(24)} ${r.state.padEnd(9)} ${r.uuid}  ${r.disks.map((x) => x.target).join(',').padEnd(10)} ${r.lastSnapshot ? `${r.lastSnapshot.name} (${r.lastSnapshot.consistency})` : hasRepo ? 'never backed up' : ''}`).join('\n'));
    });
}
