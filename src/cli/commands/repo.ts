/** `tresor repo init|info`, `tresor key list|add|remove`, `tresor unlock`. */
import type { Command } from 'commander';
import { Repository, DEFAULTS } from '../../repo/repository.ts';
import { listLocks } from '../../repo/lock.ts';
import { requireFullAccess } from '../../repo/access.ts';
import { UsageError } from '../../util/errors.ts';
import { openRepository, openStore, readPassphrase } from '../context.ts';
import { formatBytes, parseSize, printResult } from '../output.ts';
import type { CommandEnv } from '../main.ts';

export function registerRepoCommands(program: Command, env: CommandEnv): void {
  const repo = program.command('repo').description('create and inspect repositories');

  repo.command('init')
    .description('create a new repository (encrypted by default)')
    .option('--encryption <mode>', 'aes-256-gcm or none', 'aes-256-gcm')
    .option('--chunk-size <size>', 'fixed chunk size for disk images', String(DEFAULTS.chunkSize))
    .option('--compression-level <n>', `zstd level, 0 = off (default ${DEFAULTS.compressionLevel} with the lazy strategy)`)
    .option('--compression-strategy <n>', 'zstd strategy 1-9 (ZSTD_c_strategy); default: the level\'s own')
    .option('--incremental-compression-level <n>', `zstd level of what incremental backups store (default ${DEFAULTS.incrementalCompressionLevel} with the default setting, else --compression-level)`)
    .option('--dictionary-size <size>', `compression dictionary sampled from each disk, 4K-128K, 0 = none (default ${DEFAULTS.dictionaryBytes >> 10}K with the default setting, else none)`)
    .action(async (o: { encryption: string; chunkSize: string; compressionLevel?: string; compressionStrategy?: string; incrementalCompressionLevel?: string; dictionarySize?: string }) => {
      const g = env.globals();
      if (o.encryption !== 'aes-256-gcm' && o.encryption !== 'none') {
        throw new UsageError(`unknown encryption ${JSON.stringify(o.encryption)}`, 'use --encryption aes-256-gcm (default) or --encryption none');
      }
      const level = o.compressionLevel === undefined ? undefined : Number(o.compressionLevel);
      if (level !== undefined && (!Number.isInteger(level) || level < 0 || level > 19)) throw new UsageError('--compression-level must be 0..19');
      const strategy = o.compressionStrategy === undefined ? undefined : Number(o.compressionStrategy);
      if (strategy !== undefined && (!Number.isInteger(strategy) || strategy < 1 || strategy > 9)) throw new UsageError('--compression-strategy must be 1..9');
      const incremental = o.incrementalCompressionLevel === undefined ? undefined : Number(o.incrementalCompressionLevel);
      if (incremental !== undefined && (!Number.isInteger(incremental) || incremental < 0 || incremental > 19)) throw new UsageError('--incremental-compression-level must be 0..19');
      const store = await openStore(g, true);
      const passphrase = o.encryption === 'none' ? undefined : await readPassphrase(g, `protect the new repository at ${store.location}`, true);
      const { repo: r, recoveryKey } = await Repository.init(store, {
        encryption: o.encryption, passphrase, chunkSize: parseSize(o.chunkSize), compressionLevel: level, compressionStrategy: strategy,
        incrementalCompressionLevel: incremental, dictionaryBytes: o.dictionarySize === undefined ? undefined : parseSize(o.dictionarySize),
      });
      printResult(g, { ok: true, location: store.location, id: r.config.id, encryption: r.config.encryption, chunkSize: r.config.chunkSize, recoveryKey }, () => [
        `created repository ${r.config.id} at ${store.location}`,
        `encryption: ${r.config.encryption}, chunk size ${formatBytes(r.config.chunkSize)}, zstd level ${r.config.compression.level}`
          + (r.config.compression.incrementalLevel !== undefined ? ` (incremental backups: level ${r.config.compression.incrementalLevel})` : '')
          + (r.config.compression.dictionaryBytes !== undefined ? `, ${formatBytes(r.config.compression.dictionaryBytes)} dictionaries` : ''),
        ...(recoveryKey ? [
          '',
          'RECOVERY KEY — print it and keep it somewhere safe. It opens the repository if the passphrase is lost:',
          '',
          `    ${recoveryKey}`,
          '',
        ] : ['WARNING: this repository is NOT encrypted (--encryption none).']),
      ].join('\n'));
    });

  repo.command('info')
    .description('show the repository configuration and what it holds')
    .action(async () => {
      const g = env.globals();
      const r = await openRepository(g);
      const index = await r.index();
      let packs = 0;
      let packBytes = 0;
      for await (const b of r.store.list('data/')) {
        packs++;
        packBytes += b.size;
      }
      const { snapshots, damaged } = await r.listSnapshots();
      const locks = await listLocks(r.store, r.keys);
      // Dictionaries (§4): the bases of dictionary length (a parent chunk is a whole chunk).
      const bases = new Set<string>();
      for (const [, base] of index.deltaBases()) bases.add(base.toString('hex'));
      const dictionaries = [...bases].filter((hex) => index.get(Buffer.from(hex, 'hex'))?.rawLength === r.config.compression.dictionaryBytes).length;
      const info = {
        location: r.store.location, id: r.config.id, version: r.config.version, created: r.config.created,
        encryption: r.config.encryption, chunkSize: r.config.chunkSize, packSize: r.config.packSize,
        compression: r.config.compression, snapshots: snapshots.length, damagedManifests: damaged.length,
        packs, storedBytes: packBytes, blobs: index.size, deltaChunks: [...index.deltaBases()].length, dictionaries, indexFiles: r.indexFiles.size,
        locks: locks.map((l) => ({ ...l.info, stale: l.stale })),
      };
      printResult(g, info, () => [
        `repository ${info.id} at ${info.location}`,
        `format v${info.version}, created ${info.created}`,
        `encryption ${info.encryption}; chunk size ${formatBytes(info.chunkSize)}; zstd level ${info.compression.level}`,
        `${info.snapshots} snapshots${info.damagedManifests ? ` (+${info.damagedManifests} unreadable manifests)` : ''}, ${info.blobs} blobs${info.deltaChunks ? ` (${info.deltaChunks} of them delta chunks${info.dictionaries ? `, ${info.dictionaries} compression dictionaries` : ''})` : ''} in ${info.packs} packs, ${formatBytes(info.storedBytes)} stored`,
        ...info.locks.map((l) => `lock: ${l.kind} ${l.operation} by pid ${l.pid} on ${l.host} since ${l.time}${l.stale ? ' (stale)' : ''}`),
      ].join('\n'));
    });

  const key = program.command('key').description('manage the passphrases of an encrypted repository');
  key.command('list').description('list key slots').action(async () => {
    const g = env.globals();
    const r = await openRepository(g);
    const slots = await r.listKeySlots();
    printResult(g, slots, () => slots.map((s) => `${s.current ? '*' : ' '} ${s.name}  ${s.kind.padEnd(10)} ${s.created}  ${s.host}${s.label ? `  ${s.label}` : ''}`).join('\n'));
  });
  key.command('add').description('add a passphrase (asked for, or from $TRESOR_NEW_PASSPHRASE)')
    .option('--label <text>', 'a note to recognise the slot by')
    .action(async (o: { label?: string }) => {
      const g = env.globals();
      const r = await openRepository(g);
      await requireFullAccess(r, 'add a key');
      const pw = process.env.TRESOR_NEW_PASSPHRASE ?? await readPassphrase({ ...g, passphraseFile: undefined }, 'add as a new key slot', true);
      const id = await r.addPassphrase(pw, o.label);
      printResult(g, { ok: true, slot: id }, () => `added key slot ${id}`);
    });
  key.command('remove <slot>').description('remove a key slot (never the last passphrase)').action(async (slot: string) => {
    const g = env.globals();
    const r = await openRepository(g);
    await requireFullAccess(r, 'remove a key');
    const lock = await r.lock('exclusive', 'key remove');
    try {
      await r.removeKeySlot(slot);
    } finally {
      await lock.release();
    }
    printResult(g, { ok: true, removed: slot }, () => `removed key slot ${slot}`);
  });

  program.command('unlock')
    .description('remove stale locks (of dead processes); with --all, every lock')
    .option('--all', 'remove all locks, also of processes that may still run', false)
    .action(async (o: { all: boolean }) => {
      const g = env.globals();
      const r = await openRepository(g);
      if (o.all) await requireFullAccess(r, 'remove the locks of running processes');
      const removed: string[] = [];
      for (const l of await listLocks(r.store, r.keys)) {
        if (o.all || l.stale) {
          await r.store.delete(l.name);
          removed.push(l.name);
        }
      }
      printResult(g, { ok: true, removed }, () => `removed ${removed.length} lock(s)`);
    });
}
