/**
 * Repository lifecycle commands: `tresor prune`, `forget`, `protect`, `unprotect`, `gc`, `sync`, `check`,
 * and `tresor key add-append-only`.
 */
import { availableParallelism } from 'node:os';
import type { Command } from 'commander';
import { LocalStore } from '../../store/local.ts';
import type { BlobStore } from '../../store/store.ts';
import { addAppendOnlyPassphrase, requireFullAccess } from '../../repo/access.ts';
import { checkRepository } from '../../repo/check.ts';
import { CodecPool } from '../../repo/codec-pool.ts';
import { collectGarbage } from '../../repo/gc.ts';
import { readSnapshotState, writeNote } from '../../repo/notes.ts';
import { describePolicy, forgetSnapshots, pruneSnapshots } from '../../repo/prune.ts';
import { Repository } from '../../repo/repository.ts';
import type { RetentionPolicy } from '../../repo/retention.ts';
import { syncRepositories } from '../../repo/sync.ts';
import { ExitCode, TresorError, UsageError } from '../../util/errors.ts';
import { openRepository, readPassphrase } from '../context.ts';
import { Progress, formatBytes, formatDuration, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

function count(name: string) {
  return (text: string): number => {
    const n = Number(text);
    if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`${name} needs a whole number ≥ 0, not ${JSON.stringify(text)}`);
    return n;
  };
}

function seconds(name: string) {
  return (text: string): number => {
    const n = Number(text);
    if (!Number.isFinite(n) || n < 0) throw new UsageError(`${name} needs a number of seconds ≥ 0, not ${JSON.stringify(text)}`);
    return n;
  };
}

interface PruneFlags {
  id?: string;
  all?: boolean;
  dryRun?: boolean;
  localTime?: boolean;
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
}

interface SyncFlags {
  to: string;
  id: string[];
  toPassphraseFile?: string;
  toS3Endpoint?: string;
}

export function registerLifecycleCommands(program: Command, env: CommandEnv): void {
  program.command('prune')
    .description('delete snapshots that no retention rule keeps (rules as in Proxmox Backup Server); `tresor gc` then frees their data')
    .option('--id <name>', 'only the snapshots of this backup id')
    .option('--all', 'every backup group (each type/id is pruned on its own)')
    .option('--keep-last <n>', 'keep the n newest snapshots', count('--keep-last'))
    .option('--keep-hourly <n>', 'keep the newest snapshot of each of the n newest hours that have one', count('--keep-hourly'))
    .option('--keep-daily <n>', 'likewise for days', count('--keep-daily'))
    .option('--keep-weekly <n>', 'likewise for ISO weeks (Monday to Sunday)', count('--keep-weekly'))
    .option('--keep-monthly <n>', 'likewise for months', count('--keep-monthly'))
    .option('--keep-yearly <n>', 'likewise for years', count('--keep-yearly'))
    .option('--local-time', 'take hours, days, weeks... in the local time zone instead of UTC')
    .option('--dry-run', 'only say what would be kept (and by which rule) and what removed')
    .action(async (o: PruneFlags) => {
      const g = env.globals();
      const policy: RetentionPolicy = { last: o.keepLast, hourly: o.keepHourly, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly, yearly: o.keepYearly };
      const repo = await openRepository(g);
      const report = await pruneSnapshots(repo, { policy, id: o.id, all: o.all, dryRun: o.dryRun, timeZone: o.localTime ? 'local' : 'utc' });
      printResult(g, { ok: true, policy, ...report }, () => {
        const lines = [`policy: ${describePolicy(policy)}${report.dryRun ? ' (dry run: nothing deleted)' : ''}`];
        for (const grp of report.groups) {
          lines.push(`${grp.group}:`);
          for (const s of grp.snapshots) lines.push(`  ${s.action === 'keep' ? 'keep  ' : 'remove'} ${s.name}  ${s.action === 'keep' ? `(${s.reason})` : ''}`.trimEnd());
        }
        for (const s of report.skipped) lines.push(`not removed (protected meanwhile): ${s}`);
        for (const u of report.unreadable) lines.push(`UNREADABLE (never pruned) ${u.object}: ${u.error}`);
        lines.push(`${report.dryRun ? 'would remove' : 'removed'} ${report.removed.length} snapshot(s), kept ${report.kept}${report.dryRun || report.removed.length === 0 ? '' : '; run `tresor gc` to free their data'}`);
        return lines.join('\n');
      });
    });

  program.command('forget <snapshots...>')
    .description('delete the named snapshots (all or none: an unknown or protected name deletes nothing); `tresor gc` then frees their data')
    .option('--dry-run', 'only check the names and say what would be deleted')
    .action(async (snapshots: string[], o: { dryRun?: boolean }) => {
      const g = env.globals();
      const repo = await openRepository(g);
      const report = await forgetSnapshots(repo, snapshots, { dryRun: o.dryRun });
      printResult(g, { ok: true, ...report }, () => [
        ...report.removed.map((s) => `${report.dryRun ? 'would remove' : 'removed'} ${s}`),
        ...report.skipped.map((s) => `not removed (protected meanwhile): ${s}`),
        report.dryRun ? 'dry run: nothing deleted' : `removed ${report.removed.length} snapshot(s); run \`tresor gc\` to free their data`,
      ].join('\n'));
    });

  program.command('protect <snapshot>')
    .description('protect a snapshot: prune never deletes it')
    .action(async (snapshot: string) => {
      const g = env.globals();
      const repo = await openRepository(g);
      await repo.readSnapshot(snapshot); // it must exist
      await writeNote(repo, snapshot, { protected: true });
      printResult(g, { ok: true, snapshot, protected: true }, () => `protected ${snapshot}`);
    });

  program.command('unprotect <snapshot>')
    .description('remove the protection of a snapshot')
    .action(async (snapshot: string) => {
      const g = env.globals();
      const repo = await openRepository(g);
      await requireFullAccess(repo, 'unprotect a snapshot');
      await repo.readSnapshot(snapshot);
      if ((await readSnapshotState(repo, snapshot)).protected) await writeNote(repo, snapshot, { protected: false });
      printResult(g, { ok: true, snapshot, protected: false }, () => `${snapshot} is not protected`);
    });

  program.command('gc')
    .description('free the data no snapshot references, safely while backups run (resumes an interrupted run)')
    .option('--max-wait <seconds>', 'how long to wait for operations that started before this run (default 600); a later run finishes the job', seconds('--max-wait'), 600)
    .option('--repack-threshold <fraction>', 'rewrite a pack when at least this fraction of it is garbage (default 0.1)', (t: string) => {
      const f = Number(t);
      if (!(f > 0 && f <= 1)) throw new UsageError(`--repack-threshold needs a fraction in (0, 1], not ${JSON.stringify(t)}`);
      return f;
    }, 0.1)
    .action(async (o: { maxWait: number; repackThreshold: number }) => {
      const g = env.globals();
      const repo = await openRepository(g);
      const pool = new CodecPool(repo.keys);
      const progress = new Progress('gc', g);
      try {
        const r = await collectGarbage(repo, {
          pool, maxWaitMs: o.maxWait * 1000, repackThreshold: o.repackThreshold, signal: env.signal,
          progress: (_phase, d, t) => progress.update(d, t),
        });
        progress.finish();
        printResult(g, { ok: true, ...r }, () => [
          r.plan
            ? `${r.resumed ? 'resumed' : 'planned'} garbage collection ${r.plan}: ${r.resumed ? '' : `${r.snapshots} snapshots, ${r.liveBlobs} live blobs, `}${r.condemnedBlobs} unreferenced`
            : `nothing to collect: ${r.snapshots} snapshots, ${r.liveBlobs} live blobs`,
          `deleted ${r.deletedPacks} pack(s) (${formatBytes(r.deletedPackBytes)}), repacked ${r.repackedPacks} (${r.repackedBlobs} blobs, ${formatBytes(r.writtenPackBytes)} written), ${r.deletedIndexFiles} index file(s) replaced by ${r.writtenIndexFiles}`,
          `freed ${formatBytes(Math.max(0, r.freedBytes))} in ${formatDuration(r.durationMs)}`,
          ...(r.rescuedBlobs ? [`kept ${r.rescuedBlobs} blob(s) that snapshots committed meanwhile use`] : []),
          ...(r.missingBlobs ? [`WARNING: snapshots reference ${r.missingBlobs} blob(s) that are in no index; run \`tresor check\``] : []),
          ...(r.complete ? [] : [`not finished: waiting for ${r.waitingFor.map((w) => `${w.operation} (pid ${w.pid} on ${w.host})`).join(', ')}, which started before this run; run \`tresor gc\` again when they are done`]),
        ].join('\n'));
      } finally {
        await pool.close();
      }
    });

  program.command('sync')
    .description('copy snapshots to a second repository (off-site), sending only the chunks it lacks')
    .requiredOption('--to <location>', 'target repository: a directory or s3://BUCKET/PREFIX')
    .option('--id <name...>', 'only these backup ids', [])
    .option('--to-passphrase-file <file>', 'read the target\'s passphrase from this file (default: $TRESOR_SYNC_PASSPHRASE)')
    .option('--to-s3-endpoint <url>', 'S3 endpoint of the target (default: --s3-endpoint; credentials from $TRESOR_SYNC_AWS_ACCESS_KEY_ID/$TRESOR_SYNC_AWS_SECRET_ACCESS_KEY, else the AWS variables)')
    .action(async (o: SyncFlags) => {
      const g = env.globals();
      const source = await openRepository(g);
      const targetStore = await openTargetStore(o.to, o.toS3Endpoint ?? g.s3Endpoint);
      const target = await Repository.open(targetStore, () => targetPassphrase(o, targetStore.location));
      // Two key sets, two pools; together one worker per core (decoding the source is the
      // lighter half: the target hashes, compresses and encrypts).
      const cores = Math.max(2, Math.min(availableParallelism(), 8));
      const sourcePool = new CodecPool(source.keys, Math.max(1, Math.floor(cores / 2)));
      const targetPool = new CodecPool(target.keys, Math.max(1, Math.ceil(cores / 2)));
      const progress = new Progress('sync', g);
      try {
        const r = await syncRepositories(source, target, {
          ids: o.id, sourcePool, targetPool, signal: env.signal, progress: (_s, d, t) => progress.update(d, t),
        });
        progress.finish();
        printResult(g, { ok: true, ...r }, () => [
          `copied ${r.copied.length} snapshot(s) to ${r.target}${r.skipped.length ? `; ${r.skipped.length} already there (or pruned there)` : ''}`,
          `sent ${r.chunksSent} chunk(s), ${formatBytes(r.bytesSent)}; ${r.chunksAlreadyThere} chunk(s) were there already${r.adoptedPacks ? `; resumed ${r.adoptedPacks} pack(s) of an interrupted sync` : ''}`,
          ...r.copied.map((n) => `  ${n}`),
        ].join('\n'));
      } finally {
        await Promise.all([sourcePool.close(), targetPool.close()]);
        await targetStore.close();
      }
    });

  program.command('check')
    .description('check the structure of the repository without reading chunk data; exit 3 on damage')
    .option('--read-data', 'also read and check every chunk (as `tresor verify`)')
    .action(async (o: { readData?: boolean }) => {
      const g = env.globals();
      const repo = await openRepository(g);
      const pool = new CodecPool(repo.keys);
      const progress = new Progress('check', g);
      try {
        const r = await checkRepository(repo, pool, { readData: o.readData, progress: (d, t) => progress.update(d, t) });
        progress.finish();
        printResult(g, r, () => {
          const lines = [`checked ${r.snapshots} snapshot(s), ${r.packs} pack(s), ${r.indexFiles} index file(s)${r.readData ? `, read ${formatBytes(r.bytesRead)}` : ''}`];
          for (const d of r.damage) {
            lines.push(`DAMAGED ${d.kind} ${d.object}: ${d.error}`);
            for (const a of d.affects) lines.push(`  affects ${a.snapshot}${a.disk ? ` disk ${a.disk}` : ''}`);
          }
          for (const i of r.issues) lines.push(`INCONSISTENT ${i.kind} ${i.object}: ${i.error}`);
          for (const n of r.notes) lines.push(`note: ${n.kind} ${n.object}: ${n.message}`);
          lines.push(r.ok ? 'OK: the structure is consistent' : `${r.damage.length + r.issues.length} problem(s)`);
          return lines.join('\n');
        });
        if (!r.ok) process.exitCode = ExitCode.damaged;
      } finally {
        await pool.close();
      }
    });

  const key = program.commands.find((c) => c.name() === 'key') ?? program.command('key').description('manage the passphrases of an encrypted repository');
  key.command('add-append-only')
    .description('add a passphrase that can add snapshots but never delete (asked for, or from $TRESOR_NEW_PASSPHRASE)')
    .option('--label <text>', 'a note to recognise the slot by')
    .action(async (o: { label?: string }) => {
      const g = env.globals();
      const r = await openRepository(g);
      const pw = process.env.TRESOR_NEW_PASSPHRASE ?? await readPassphrase({ ...g, passphraseFile: undefined }, 'add as an append-only key', true);
      const id = await addAppendOnlyPassphrase(r, pw, o.label);
      printResult(g, { ok: true, slot: id, access: 'append-only' }, () => `added append-only key slot ${id}`);
    });
}

/** The sync target's store; its S3 credentials may differ from the source's (TRESOR_SYNC_AWS_*). */
async function openTargetStore(location: string, endpoint: string | undefined): Promise<BlobStore> {
  if (!location.startsWith('s3://')) return LocalStore.open(location);
  const { openS3Store } = await import('../../store/s3.ts');
  const { withRetries } = await import('../../store/retry.ts');
  const e = process.env;
  const own = e.TRESOR_SYNC_AWS_ACCESS_KEY_ID !== undefined;
  const s3env = own
    ? { AWS_ACCESS_KEY_ID: e.TRESOR_SYNC_AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: e.TRESOR_SYNC_AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN: e.TRESOR_SYNC_AWS_SESSION_TOKEN, AWS_REGION: e.TRESOR_SYNC_AWS_REGION ?? e.AWS_REGION }
    : e;
  return withRetries(openS3Store(location, { endpoint, env: s3env }), {});
}

async function targetPassphrase(o: SyncFlags, location: string): Promise<string> {
  if (o.toPassphraseFile) return readPassphrase({ passphraseFile: o.toPassphraseFile, json: false, quiet: true }, `open ${location}`);
  const pw = process.env.TRESOR_SYNC_PASSPHRASE;
  if (pw) return pw;
  throw new TresorError('no-passphrase', `a passphrase is needed to open the sync target ${location}`, {
    hint: 'set TRESOR_SYNC_PASSPHRASE or pass --to-passphrase-file FILE', exitCode: ExitCode.auth,
  });
}
