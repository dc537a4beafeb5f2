/** `tresor backup image FILE --id NAME`. */
import type { Command } from 'commander';
import { backupImage } from '../../engine/image-backup.ts';
import { UsageError } from '../../util/errors.ts';
import { openRepository } from '../context.ts';
import { Progress, formatBytes, formatDuration, printResult } from '../output.ts';
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
}
