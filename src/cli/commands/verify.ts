/** `tresor verify [SNAPSHOT...]`. */
import type { Command } from 'commander';
import { CodecPool } from '../../repo/codec-pool.ts';
import { verifyRepository } from '../../repo/verify.ts';
import { ExitCode } from '../../util/errors.ts';
import { openRepository } from '../context.ts';
import { Progress, formatBytes, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function registerVerifyCommands(program: Command, env: CommandEnv): void {
  program.command('verify [snapshots...]')
    .description('check snapshots (default: all) and everything they need; exit 3 on damage')
    .option('--no-read-data', 'check structure and presence only, without reading chunk data')
    .action(async (names: string[], o: { readData: boolean }) => {
      const g = env.globals();
      const repo = await openRepository(g);
      const lock = await repo.lock('shared', 'verify');
      const pool = new CodecPool(repo.keys);
      const progress = new Progress('verify', g);
      try {
        const report = await verifyRepository(repo, pool, {
          snapshots: names.length > 0 ? names : undefined, readData: o.readData,
          progress: (d, t) => progress.update(d, t),
        });
        progress.finish();
        printResult(g, report, () => {
          const lines = [`checked ${report.snapshots.length} snapshot(s), ${report.blobsChecked} blobs, read ${formatBytes(report.bytesRead)}`];
          if (report.unindexedPacks > 0) lines.push(`note: ${report.unindexedPacks} pack(s) are not in any index (left by an interrupted backup; not damage)`);
          for (const d of report.damage) {
            lines.push(`DAMAGED ${d.kind} ${d.object}: ${d.error}`);
            for (const a of d.affects) lines.push(`  affects ${a.snapshot}${a.disk ? ` disk ${a.disk}` : ''}${a.offsets?.length ? ` at offset ${a.offsets.join(', ')}` : ''}`);
          }
          lines.push(report.ok ? 'OK: no damage found' : `${report.damage.length} damaged object(s)`);
          return lines.join('\n');
        });
        if (!report.ok) process.exitCode = ExitCode.damaged;
      } finally {
        await pool.close();
        await lock.release();
      }
    });
}
