#!/usr/bin/env node
/**
 * `tresor`: the command line. Every command accepts --json (one JSON document on stdout) and
 * exits with the codes documented in the README (src/util/errors.ts ExitCode).
 */
import { Command, CommanderError, Option } from 'commander';
import { ExitCode, TresorError } from '../util/errors.ts';
import type { GlobalOptions } from './context.ts';
import { reportError } from './output.ts';
import { registerRepoCommands } from './commands/repo.ts';
import { registerBackupCommands } from './commands/backup.ts';
import { registerRestoreCommands } from './commands/restore.ts';
import { registerSnapshotCommands } from './commands/snapshots.ts';
import { registerVerifyCommands } from './commands/verify.ts';
import { registerLifecycleCommands } from './commands/lifecycle.ts';
import { registerFilesCommands } from './commands/files.ts';
import { registerVmCommands } from './commands/vms.ts';
import { TOOL_VERSION } from '../repo/repository.ts';

export interface CommandEnv {
  globals(): GlobalOptions;
  /** Aborted on SIGINT/SIGTERM so long operations stop cleanly (nothing half committed). */
  signal: AbortSignal;
}

function buildProgram(): { program: Command; env: CommandEnv } {
  const abort = new AbortController();
  const program = new Command('tresor')
    .description('Backup, restore and instant recovery for KVM/libvirt virtual machines')
    .version(TOOL_VERSION)
    .option('--repo <location>', 'repository: a directory or s3://BUCKET/PREFIX (default: $TRESOR_REPO)')
    .option('--passphrase-file <file>', 'read the passphrase from this file (default: $TRESOR_PASSPHRASE, else ask)')
    .option('--s3-endpoint <url>', 'S3 endpoint URL (default: $AWS_ENDPOINT_URL; credentials from the AWS variables)')
    .option('--json', 'print one JSON document on stdout', false)
    .option('-q, --quiet', 'print nothing but errors', false)
    .showHelpAfterError()
    .exitOverride();
  program.addOption(new Option('--passphrase <secret>').hideHelp().argParser(() => {
    throw new TresorError('usage', 'passphrases are never accepted on the command line (other users can read it)', {
      hint: 'set TRESOR_PASSPHRASE or use --passphrase-file FILE', exitCode: ExitCode.usage,
    });
  }));
  const env: CommandEnv = {
    globals: () => program.opts<GlobalOptions>(),
    signal: abort.signal,
  };
  let signals = 0;
  const onSignal = (sig: string) => {
    signals++;
    if (signals > 1) process.exit(ExitCode.interrupted);
    abort.abort(new TresorError('interrupted', `interrupted by ${sig}; nothing was committed`, { exitCode: ExitCode.interrupted, hint: 'run the command again' }));
  };
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  registerRepoCommands(program, env);
  registerBackupCommands(program, env);
  registerRestoreCommands(program, env);
  registerSnapshotCommands(program, env);
  registerVerifyCommands(program, env);
  registerLifecycleCommands(program, env);
  registerFilesCommands(program, env);
  registerVmCommands(program, env);
  return { program, env };
}

export async function main(argv: string[]): Promise<number> {
  const { program } = buildProgram();
  const json = argv.includes('--json');
  try {
    await program.parseAsync(argv, { from: 'user' });
    return process.exitCode === undefined ? 0 : Number(process.exitCode);
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return 0;
      if (json) process.stdout.write(`${JSON.stringify({ ok: false, error: { code: 'usage', message: err.message } })}\n`);
      return ExitCode.usage;
    }
    return reportError(err, json);
  }
}

if (import.meta.main) {
  const code = await main(process.argv.slice(2));
  process.exitCode = code;
}
