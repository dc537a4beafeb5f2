/**
 * What every repository command needs: the store from --repo / TRESOR_REPO, and the passphrase
 * from TRESOR_PASSPHRASE, --passphrase-file or an interactive prompt — never from argv.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { LocalStore } from '../store/local.ts';
import type { BlobStore } from '../store/store.ts';
import { Repository } from '../repo/repository.ts';
import { UsageError, TresorError, ExitCode } from '../util/errors.ts';

export interface GlobalOptions {
  repo?: string;
  passphraseFile?: string;
  s3Endpoint?: string;
  json: boolean;
  quiet: boolean;
}

export function repoLocation(opts: GlobalOptions): string {
  const loc = opts.repo ?? process.env.TRESOR_REPO;
  if (!loc) throw new UsageError('no repository given', 'pass --repo PATH|s3://BUCKET/PREFIX or set TRESOR_REPO');
  return loc;
}

export async function openStore(opts: GlobalOptions, create = false): Promise<BlobStore> {
  const loc = repoLocation(opts);
  if (loc.startsWith('s3://')) {
    const { openS3Store } = await import('../store/s3.ts');
    const { withRetries } = await import('../store/retry.ts');
    return withRetries(await openS3Store(loc, { endpoint: opts.s3Endpoint }), {});
  }
  return LocalStore.open(loc, { create });
}

export async function readPassphrase(opts: GlobalOptions, purpose: string, confirm = false): Promise<string> {
  if (opts.passphraseFile) {
    let text: string;
    try {
      text = await readFile(opts.passphraseFile, 'utf8');
    } catch (err) {
      throw new UsageError(`cannot read the passphrase file ${opts.passphraseFile}: ${(err as Error).message}`, 'check the path given to --passphrase-file');
    }
    const pw = text.replace(/\r?\n$/, '');
    if (!pw) throw new UsageError(`the passphrase file ${opts.passphraseFile} is empty`);
    return pw;
  }
  const env = process.env.TRESOR_PASSPHRASE;
  if (env) return env;
  if (!process.stdin.isTTY) {
    throw new TresorError('no-passphrase', `a passphrase is needed to ${purpose}`, {
      hint: 'set TRESOR_PASSPHRASE, or pass --passphrase-file FILE, or run on a terminal to be asked',
      exitCode: ExitCode.auth,
    });
  }
  const pw = await promptHidden(`Passphrase to ${purpose}: `);
  if (confirm) {
    const again = await promptHidden('Repeat the passphrase: ');
    if (again !== pw) throw new UsageError('the two passphrases differ', 'run the command again');
  }
  if (!pw) throw new UsageError('empty passphrase', 'type a passphrase (or use --encryption none explicitly for an unencrypted repository)');
  return pw;
}

/** Reads a line from the terminal without echoing it. */
function promptHidden(question: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const stdin = process.stdin;
    process.stderr.write(question);
    let value = '';
    stdin.setRawMode(true);
    stdin.resume();
    stdin.setEncoding('utf8');
    const done = (err?: Error) => {
      stdin.setRawMode(false);
      stdin.pause();
      stdin.off('data', onData);
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(value);
    };
    const onData = (chunk: string) => {
      for (const ch of chunk) {
        if (ch === '\r' || ch === '\n') return done();
        if (ch === '\u0003') return done(new TresorError('interrupted', 'interrupted', { exitCode: ExitCode.interrupted }));
        if (ch === '\u007f' || ch === '\b') value = value.slice(0, -1);
        else value += ch;
      }
    };
    stdin.on('data', onData);
  });
}

/** Tresor's per-user cache ($TRESOR_CACHE_DIR, else ~/.cache/tresor): compile cache, snapshot catalogs, index caches. */
export function cacheDir(): string {
  return process.env.TRESOR_CACHE_DIR ?? join(homedir(), '.cache', 'tresor');
}

export async function openRepository(opts: GlobalOptions): Promise<Repository> {
  const store = await openStore(opts);
  const repo = await Repository.open(store, () => readPassphrase(opts, `open the repository at ${store.location}`));
  await repo.useSnapshotCatalog(join(cacheDir(), 'snapshots'));
  repo.useIndexCache(join(cacheDir(), 'index'));
  return repo;
}
