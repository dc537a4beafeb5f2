/** `tresor verify [SNAPSHOT...] | --all | --new | --older-than DAYS`. */
import type { Command } from 'commander';
import { CodecPool } from '../../repo/codec-pool.ts';
import { verifyRepository } from '../../repo/verify.ts';
import { recordVerification, selectSnapshots } from '../../repo/verify-records.ts';
import { ExitCode, UsageError } from '../../util/errors.ts';
import { openRepository } from '../context.ts';
import { Progress, formatBytes, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function registerVerifyCommands(program: Command, env: CommandEnv): void {
  program.command('verify [snapshots...]')
    .description('check snapshots (default: all) and everything they need; exit 3 on damage')
    .option('--no-read-data', 'check structure and presence only, without reading chunk data')
    .option('--all', 'verify every snapshot (the default without names)')
    .option('--new', 'verify only snapshots never verified before')
    .option('--older-than <days>', 'verify only snapshots not verified within this many days')
    .option('--no-record', 'do not record the results on the snapshots')
    .action(async (names: string[], o: { readData: boolean; all?: boolean; new?: boolean; olderThan?: string; record: boolean }) => {
      const g = env.globals();
      const olderThanDays = o.olderThan === undefined ? undefined : Number(o.olderThan);
      if (olderThanDays !== undefined && !(olderThanDays >= 0)) throw new UsageError(`--older-than needs a number of days, not ${JSON.stringify(o.olderThan)}`);
      const repo = await openRepository(g);
      const lock = await repo.lock('shared', 'verify');
      const pool = new CodecPool(repo.keys);
      const progress = new Progress('verify', g);
      try {
        const started = new Date();
        const selected = await selectSnapshots(repo, { names, all: o.all, new: o.new, olderThanDays }, started);
        const report = await verifyRepository(repo, pool, {
          snapshots: selected, readData: o.readData,
          progress: (d, t) => progress.update(d, t),
        });
        progress.finish();
        // Results are recorded on the snapshots (and damage for healing); even an append-only key may.
        // A verification that cannot be recorded (storage full or read-only) still reports its result.
        let recorded: Awaited<ReturnType<typeof recordVerification>> | undefined;
        let recordError: string | undefined;
        if (o.record) {
          try {
            recorded = await recordVerification(repo, report, o.readData, new Date());
          } catch (err) {
            recordError = (err as Error).message;
          }
        }
        printResult(g, { ...report, recorded, recordError }, () => {
          const lines = [`checked ${report.snapshots.length} snapshot(s), ${report.blobsChecked} blobs, read ${formatBytes(report.bytesRead)}`];
          if (recordError) lines.push(`warning: the results could not be recorded on the snapshots: ${recordError}`);
          if (recorded?.damageRecord) lines.push(`recorded the damaged blobs in ${recorded.damageRecord}: the next backup of the same data stores fresh copies`);
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
