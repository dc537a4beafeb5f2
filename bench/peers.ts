/**
 * The backup tools compared by the benchmark and how each is configured: Tresor (through its CLI,
 * the contract of issue 2), restic and borg. Every tool gets its passphrase from the environment
 * and keeps its repository and caches inside the run's scratch directory.
 */
import { existsSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { TresorError } from '../src/util/errors.ts';
import { capture, findFile } from './measure.ts';
import type { CommandSpec, Measurement } from './measure.ts';

export type BackupLabel = 'full' | 'second';

export interface Peer {
  /** unique in a run: 'tresor', 'tresor@64K', 'restic', 'borg' */
  readonly name: string;
  /** how the report names it */
  readonly label: string;
  readonly repoDir: string;
  /** one line for the report: how it is configured and why */
  readonly configuration: string;
  /** throws a TresorError with a hint when the tool cannot run at all */
  preflight(): void;
  init(): CommandSpec;
  backup(label: BackupLabel): CommandSpec;
  /** called after a successful backup, e.g. to learn the snapshot name */
  afterBackup(label: BackupLabel, measurement: Measurement): void;
  restore(label: BackupLabel, targetDir: string): CommandSpec;
  /** where the restored disk image ended up below targetDir */
  restoredFile(targetDir: string): string | undefined;
  /** extra facts recorded in the results after the run (e.g. `repo info --json`) */
  describeRepository(): unknown;
}

export interface PeerSetting {
  scratch: string;
  corpusPath: string;
  /** the Tresor checkout (holds node_modules/.bin/node; commands run from here) */
  repoRoot: string;
  /** the Tresor CLI: a .ts/.js file run with the pinned Node, or an executable */
  tresorCli: string;
}

/** Every tool's passphrase in the benchmark (handed over in the environment, never in argv). */
export const PASSPHRASE = 'tresor-bench-passphrase';
const TRESOR_CORPUS_ID = 'bench-corpus';

class ToolMissingError extends TresorError {
  constructor(tool: string, hint: string) {
    super('bench-tool-missing', `${tool} is not available`, { hint, context: { tool } });
  }
}

export function requireExecutable(command: string, hint: string): void {
  if (capture(['sh', '-c', `command -v ${command}`]) === '') throw new ToolMissingError(command, hint);
}

/** The environment without any TRESOR_/RESTIC_/BORG_ variable of the caller's. */
export function baseEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const key of Object.keys(env)) {
    if (key.startsWith('TRESOR_') || key.startsWith('RESTIC_') || key.startsWith('BORG_')) delete env[key];
  }
  return env;
}

// ---------------------------------------------------------------------------------------------

export function tresorCliPath(repoRoot: string): string {
  return join(repoRoot, 'bin', 'tresor.js');
}

export function tresorNode(repoRoot: string): string {
  const pinned = join(repoRoot, 'node_modules', '.bin', 'node');
  return existsSync(pinned) ? pinned : process.execPath;
}

/** Snapshot names look like `<type>/<id>/<UTC time>` (issue 2), e.g. image/bench-corpus/20261122T101500Z. */
const SNAPSHOT_NAME = new RegExp(`^[^/\\s]+/${TRESOR_CORPUS_ID}/\\d{8}T\\d{6}`);

/** Finds the snapshot name in whatever JSON document `backup --json` or `snapshots --json` prints. */
export function findSnapshotNames(document: unknown): string[] {
  const names: string[] = [];
  const visit = (value: unknown): void => {
    if (typeof value === 'string') {
      if (SNAPSHOT_NAME.test(value)) names.push(value);
    } else if (Array.isArray(value)) {
      for (const item of value) visit(item);
    } else if (value !== null && typeof value === 'object') {
      for (const item of Object.values(value)) visit(item);
    }
  };
  visit(document);
  return names;
}

export function parseJsonDocument(text: string): unknown {
  const trimmed = text.trim();
  try {
    return JSON.parse(trimmed);
  } catch {
    // Tolerate log lines before the document: take the last line that parses.
    for (const line of trimmed.split('\n').reverse()) {
      try { return JSON.parse(line); } catch { /* keep looking */ }
    }
    return undefined;
  }
}

export class TresorPeer implements Peer {
  readonly name: string;
  readonly label: string;
  readonly repoDir: string;
  readonly configuration: string;
  private readonly setting: PeerSetting;
  private readonly chunkSize: string | undefined;
  private readonly snapshots = new Map<BackupLabel, string>();

  constructor(setting: PeerSetting, chunkSize?: string) {
    this.setting = setting;
    this.chunkSize = chunkSize;
    this.name = chunkSize === undefined ? 'tresor' : `tresor@${chunkSize}`;
    this.label = chunkSize === undefined ? 'Tresor' : `Tresor (${chunkSize} chunks)`;
    this.repoDir = join(setting.scratch, 'repos', this.name.replace('@', '-'));
    this.configuration = 'repo init --encryption aes-256-gcm'
      + (chunkSize === undefined ? ' (default chunk size)' : ` --chunk-size ${chunkSize}`)
      + '; backup image FILE --id; restore image SNAPSHOT OUT --format raw';
  }

  preflight(): void {
    const cli = this.setting.tresorCli;
    if (!existsSync(cli)) {
      throw new ToolMissingError('the Tresor CLI', `${cli} does not exist (yet): the Tresor steps need it (issue 2, item 6)`);
    }
  }

  private command(args: string[]): CommandSpec {
    const cli = this.setting.tresorCli;
    const viaNode = /\.[cm]?[jt]s$/.test(cli);
    return {
      argv: viaNode ? [tresorNode(this.setting.repoRoot), cli, ...args] : [cli, ...args],
      cwd: this.setting.repoRoot,
      env: { ...baseEnv(), TRESOR_REPO: this.repoDir, TRESOR_PASSPHRASE: PASSPHRASE },
    };
  }

  init(): CommandSpec {
    const args = ['repo', 'init', '--repo', this.repoDir, '--encryption', 'aes-256-gcm'];
    if (this.chunkSize !== undefined) args.push('--chunk-size', this.chunkSize);
    return this.command(args);
  }

  backup(): CommandSpec {
    return this.command(['backup', 'image', this.setting.corpusPath, '--id', TRESOR_CORPUS_ID, '--json']);
  }

  afterBackup(label: BackupLabel, measurement: Measurement): void {
    const known = new Set(this.snapshots.values());
    let candidates = findSnapshotNames(parseJsonDocument(measurement.stdout)).filter((n) => !known.has(n));
    if (candidates.length === 0) {
      // The backup's JSON did not name the snapshot: ask the repository for the newest one.
      const listing = capture(this.command(['snapshots', '--json']).argv, this.command([]).env);
      candidates = findSnapshotNames(parseJsonDocument(listing)).filter((n) => !known.has(n)).sort();
    }
    const name = candidates[candidates.length - 1];
    if (name === undefined) {
      throw new TresorError('bench-no-snapshot-name', `cannot find the snapshot name of the ${label} backup`, {
        hint: 'tresor backup --json should print the snapshot name (<type>/<id>/<time>)',
        context: { stdout: measurement.stdout.slice(0, 500) },
      });
    }
    this.snapshots.set(label, name);
  }

  restore(label: BackupLabel, targetDir: string): CommandSpec {
    const snapshot = this.snapshots.get(label);
    if (snapshot === undefined) {
      throw new TresorError('bench-no-snapshot', `no ${label} Tresor snapshot to restore`, {
        hint: `the ${label} backup failed; see its error`,
      });
    }
    return this.command(['restore', 'image', snapshot, join(targetDir, 'restored.raw'), '--format', 'raw']);
  }

  restoredFile(targetDir: string): string | undefined {
    const path = join(targetDir, 'restored.raw');
    return existsSync(path) ? path : undefined;
  }

  describeRepository(): unknown {
    const spec = this.command(['repo', 'info', '--json']);
    const text = capture(spec.argv, spec.env);
    return { snapshots: Object.fromEntries(this.snapshots), repoInfo: parseJsonDocument(text) ?? text };
  }
}

// ---------------------------------------------------------------------------------------------

export class ResticPeer implements Peer {
  readonly name = 'restic';
  readonly label = 'restic';
  readonly repoDir: string;
  readonly configuration = 'init --repository-version 2 (compression auto = zstd default level; '
    + 'content-defined chunks of 512 KiB–8 MiB, 16 MiB packs, AES-256-CTR + Poly1305); '
    + 'backup FILE; restore latest --target DIR (restic 0.14 has no sparse restore)';
  private readonly setting: PeerSetting;
  private readonly env: NodeJS.ProcessEnv;

  constructor(setting: PeerSetting) {
    this.setting = setting;
    this.repoDir = join(setting.scratch, 'repos', 'restic');
    this.env = {
      ...baseEnv(),
      RESTIC_REPOSITORY: this.repoDir,
      RESTIC_PASSWORD: PASSPHRASE,
      RESTIC_CACHE_DIR: join(setting.scratch, 'cache', 'restic'),
    };
  }

  preflight(): void {
    requireExecutable('restic', 'apt-get install restic');
  }

  private command(args: string[], cwd = dirname(this.setting.corpusPath)): CommandSpec {
    return { argv: ['restic', ...args], cwd, env: this.env };
  }

  init(): CommandSpec {
    return this.command(['init', '--repository-version', '2']);
  }

  backup(): CommandSpec {
    return this.command(['backup', '--host', 'bench', this.setting.corpusPath]);
  }

  afterBackup(): void { /* restic restores `latest` */ }

  restore(_label: BackupLabel, targetDir: string): CommandSpec {
    return this.command(['restore', 'latest', '--target', targetDir]);
  }

  restoredFile(targetDir: string): string | undefined {
    return findFile(targetDir, basename(this.setting.corpusPath));
  }

  describeRepository(): unknown {
    const text = capture(['restic', 'stats', '--json', '--mode', 'raw-data'], this.env);
    return { stats: parseJsonDocument(text) ?? text };
  }
}

// ---------------------------------------------------------------------------------------------

export class BorgPeer implements Peer {
  readonly name = 'borg';
  readonly label = 'borg';
  readonly repoDir: string;
  readonly configuration = 'init -e repokey (AES-256-CTR + HMAC-SHA256); create --chunker-params fixed,4194304 '
    + '--compression zstd,1 --sparse (borg defaults would be the buzhash chunker 19,23,21,4095 — '
    + '~2 MiB average content-defined chunks — and lz4); extract --sparse';
  private readonly setting: PeerSetting;
  private readonly env: NodeJS.ProcessEnv;

  constructor(setting: PeerSetting) {
    this.setting = setting;
    this.repoDir = join(setting.scratch, 'repos', 'borg');
    this.env = {
      ...baseEnv(),
      BORG_REPO: this.repoDir,
      BORG_PASSPHRASE: PASSPHRASE,
      BORG_DISPLAY_PASSPHRASE: 'no',
      // config, keys, security and cache all below the scratch directory
      BORG_BASE_DIR: join(setting.scratch, 'cache', 'borg'),
      BORG_RELOCATED_REPO_ACCESS_IS_OK: 'yes',
    };
  }

  preflight(): void {
    requireExecutable('borg', 'apt-get install borgbackup');
  }

  init(): CommandSpec {
    return { argv: ['borg', 'init', '--encryption', 'repokey', this.repoDir], cwd: this.setting.scratch, env: this.env };
  }

  backup(label: BackupLabel): CommandSpec {
    // From the corpus directory with a relative path, so the archive holds just the file name.
    return {
      argv: ['borg', 'create', '--chunker-params', 'fixed,4194304', '--compression', 'zstd,1', '--sparse',
        `${this.repoDir}::${label}`, basename(this.setting.corpusPath)],
      cwd: dirname(this.setting.corpusPath),
      env: this.env,
    };
  }

  afterBackup(): void { /* archives are named by label */ }

  restore(label: BackupLabel, targetDir: string): CommandSpec {
    return { argv: ['borg', 'extract', '--sparse', `${this.repoDir}::${label}`], cwd: targetDir, env: this.env };
  }

  restoredFile(targetDir: string): string | undefined {
    return findFile(targetDir, basename(this.setting.corpusPath));
  }

  describeRepository(): unknown {
    return { info: capture(['borg', 'info', this.repoDir], this.env) };
  }
}

/** Tresor's version for the report: package.json plus the commit (read-only git query). */
export function tresorVersion(repoRoot: string): string {
  let version = 'unknown';
  try {
    version = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { version?: string }).version ?? version;
  } catch { /* keep unknown */ }
  const commit = capture(['git', '-C', repoRoot, 'rev-parse', '--short', 'HEAD']);
  // A run measures the working tree: say when src/ differs from the commit it names.
  const dirty = capture(['git', '-C', repoRoot, 'status', '--porcelain', '--', 'src']) !== '';
  return `${version} (${commit === '' ? 'no commit yet' : `commit ${commit}${dirty ? ' + uncommitted changes in src/' : ''}`})`;
}
