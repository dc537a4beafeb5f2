#!/usr/bin/env node
/**
 * `tresor`: the command line. Every command accepts --json (one JSON document on stdout) and
 * exits with the codes documented in the README (src/util/errors.ts ExitCode).
 */
import { Command, CommanderError, Option } from 'commander';
import { ExitCode, TresorError } from '../util/errors.ts';
import type { GlobalOptions } from './context.ts';
import { reportError } from './output.ts';
import { TOOL_VERSION } from '../repo/repository.ts';

export interface CommandEnv {
  globals(): GlobalOptions;
  /** Aborted on SIGINT/SIGTERM so long operations stop cleanly (nothing half committed). */
  signal: AbortSignal;
}

type Register = (program: Command, env: CommandEnv) => void;

// Each group of commands in its own module, loaded when needed: a command line loads only the
// modules of the command it runs (`backup vm` 55 of Tresor's 97 modules; from a cold page cache
// each costs two file reads), help and unknown commands load them all.
const repoCommands = async (): Promise<Register> => (await import('./commands/repo.ts')).registerRepoCommands;
const backupCommands = async (): Promise<Register> => (await import('./commands/backup.ts')).registerBackupCommands;
const restoreCommands = async (): Promise<Register> => (await import('./commands/restore.ts')).registerRestoreCommands;
const snapshotCommands = async (): Promise<Register> => (await import('./commands/snapshots.ts')).registerSnapshotCommands;
const verifyCommands = async (): Promise<Register> => (await import('./commands/verify.ts')).registerVerifyCommands;
const lifecycleCommands = async (): Promise<Register> => (await import('./commands/lifecycle.ts')).registerLifecycleCommands;
const filesCommands = async (): Promise<Register> => (await import('./commands/files.ts')).registerFilesCommands;
const vmCommands = async (): Promise<Register> => (await import('./commands/vms.ts')).registerVmCommands;

/** Every group, in the order help lists them. */
const ALL_COMMANDS = [repoCommands, backupCommands, restoreCommands, snapshotCommands, verifyCommands, lifecycleCommands, filesCommands, vmCommands];

/** The groups that define each top-level command (`key` has subcommands in two). */
const COMMAND_GROUPS: Record<string, Array<() => Promise<Register>>> = {
  repo: [repoCommands], key: [repoCommands, lifecycleCommands], unlock: [repoCommands],
  backup: [backupCommands], restore: [restoreCommands], snapshots: [snapshotCommands], verify: [verifyCommands],
  prune: [lifecycleCommands], forget: [lifecycleCommands], protect: [lifecycleCommands], unprotect: [lifecycleCommands],
  gc: [lifecycleCommands], sync: [lifecycleCommands], check: [lifecycleCommands],
  files: [filesCommands], vms: [vmCommands],
};

/** The top-level command a command line names: its first word that is neither an option nor an option's value. */
function commandWord(program: Command, argv: string[]): string | undefined {
  const takesValue = new Set(program.options.filter((o) => o.required || o.optional).flatMap((o) => [o.long, o.short]).filter((n): n is string => n !== undefined));
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') return argv[i + 1];
    if (takesValue.has(arg)) i++;
    else if (!arg.startsWith('-')) return arg;
  }
  return undefined;
}

async function buildProgram(argv: string[]): Promise<{ program: Command; env: CommandEnv }> {
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
  const word = commandWord(program, argv);
  const groups = (word !== undefined ? COMMAND_GROUPS[word] : undefined) ?? ALL_COMMANDS;
  for (const register of await Promise.all(groups.map((load) => load()))) register(program, env);
  return { program, env };
}

export async function main(argv: string[]): Promise<number> {
  const { program } = await buildProgram(argv);
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
