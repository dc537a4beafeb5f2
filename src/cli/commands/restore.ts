/** `tresor restore image SNAPSHOT OUTFILE [--format raw|qcow2]`. */
import type { Command } from 'commander';
import { restoreImage } from '../../engine/image-restore.ts';
import { UsageError } from '../../util/errors.ts';
import { openRepository } from '../context.ts';
import { Progress, formatBytes, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function registerRestoreCommands(program: Command, env: CommandEnv): void {
  const restore = program.command('restore').description('get data back from snapshots');
  restore.command('image <snapshot> <outfile>')
    .description('write a disk of a snapshot to a file or block device')
    .option('--format <format>', 'raw (sparse) or qcow2', 'raw')
    .option('--disk <name>', 'which disk of the snapshot (default: the first)')
    .option('--force', 'overwrite an existing output file', false)
    .action(async (snapshot: string, outfile: string, o: { format: string; disk?: string; force: boolean }) => {
      const g = env.globals();
      if (o.format !== 'raw' && o.format !== 'qcow2') throw new UsageError(`unknown output format ${JSON.stringify(o.format)}`, 'use --format raw or --format qcow2');
      const repo = await openRepository(g);
      const started = Date.now();
      const progress = new Progress(`restore ${snapshot}`, g);
      const r = await restoreImage(repo, snapshot, outfile, { format: o.format, disk: o.disk, overwrite: o.force, signal: env.signal, progress: (d, t) => progress.update(d, t) });
      progress.finish();
      printResult(g, { ok: true, snapshot, disk: r.disk, output: outfile, format: o.format, size: r.size, bytesWritten: r.bytesWritten, bytesFetched: r.bytesFetched, durationMs: Date.now() - started },
        () => `restored disk ${r.disk} of ${snapshot} to ${outfile} (${o.format}, ${formatBytes(r.size)}; ${formatBytes(r.bytesWritten)} of data)`);
    });
}
