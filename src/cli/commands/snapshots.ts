/** `tresor snapshots [--id NAME]`. */
import type { Command } from 'commander';
import { readSnapshotStates } from '../../repo/notes.ts';
import { openRepository } from '../context.ts';
import { formatBytes, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function registerSnapshotCommands(program: Command, env: CommandEnv): void {
  program.command('snapshots')
    .description('list snapshots')
    .option('--id <name>', 'only snapshots of this backup id')
    .option('--type <type>', 'only snapshots of this type (image, vm, ...)')
    .action(async (o: { id?: string; type?: string }) => {
      const g = env.globals();
      const repo = await openRepository(g);
      const { snapshots, damaged } = await repo.listSnapshots({ id: o.id, type: o.type });
      const { states } = await readSnapshotStates(repo, snapshots.map((m) => m.name));
      const rows = snapshots.map((m) => ({
        name: m.name, type: m.type, id: m.id, time: m.time, parent: m.parent, host: m.host,
        disks: m.disks.map((d) => ({ name: d.name, size: d.size, dataBytes: d.dataBytes, format: d.sourceFormat })),
        addedBytes: m.stats.addedBytes, tags: m.tags,
        protected: states.get(m.name)?.protected ?? false, verified: states.get(m.name)?.verification ?? null,
      }));
      printResult(g, { snapshots: rows, damaged }, () => {
        if (rows.length === 0 && damaged.length === 0) return 'no snapshots';
        const verified = (v: (typeof rows)[number]['verified']) => (v ? `${v.ok ? 'verified' : 'DAMAGED'} ${v.time.slice(0, 16).replace('T', ' ')}${v.readData ? '' : ' (structure)'}` : 'never verified');
        const lines = rows.map((r) => `${r.name.padEnd(40)} ${r.time}  ${r.disks.map((d) => `${d.name}:${formatBytes(d.size)}`).join(' ')}  +${formatBytes(r.addedBytes)}  ${verified(r.verified)}${r.protected ? '  protected' : ''}`);
        for (const d of damaged) lines.push(`UNREADABLE ${d.object}: ${d.error}`);
        return lines.join('\n');
      });
      if (damaged.length > 0) process.exitCode = 3;
    });
}
