/**
 * Append-only credentials (docs/security.md).
 *
 * A key slot may carry `"access": "append-only"`. A repository opened through such a slot can
 * add (backups, notes, verification records, sync into it) but Tresor refuses everything that
 * deletes or overwrites: prune, garbage collection, unprotect, key removal, unlocking others'
 * locks. Anyone holding the passphrase holds the master key, so this is a guard against
 * mistakes and a declaration of intent: the enforcement that stops an attacker is the storage's
 * (an S3 user allowed to PUT but not DELETE, object lock), see docs/security.md.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { ExitCode, TresorError, UsageError } from '../util/errors.ts';
import { parseKeySlot, wrapMasterKey } from './keys.ts';
import type { Repository } from './repository.ts';

export type Access = 'full' | 'append-only';

export class AppendOnlyError extends TresorError {
  constructor(operation: string, slot: string) {
    super('append-only', `cannot ${operation}: the repository was opened with an append-only key (slot ${slot}), which may add snapshots but never delete or change anything`, {
      exitCode: ExitCode.auth,
      hint: 'run this from the administration host with a full passphrase (TRESOR_PASSPHRASE / --passphrase-file)',
      context: { operation, slot },
    });
  }
}

/** The access the key slot that opened `repo` grants (full for unencrypted repositories). */
export async function credentialAccess(repo: Repository): Promise<Access> {
  if (!repo.keySlot) return 'full';
  const slot = parseKeySlot(await repo.store.read(repo.keySlot), repo.keySlot) as { access?: unknown };
  return slot.access === 'append-only' ? 'append-only' : 'full';
}

/** Throws AppendOnlyError unless the credential may delete and change. */
export async function requireFullAccess(repo: Repository, operation: string): Promise<void> {
  if ((await credentialAccess(repo)) === 'append-only') throw new AppendOnlyError(operation, repo.keySlot!.slice('keys/'.length));
}

/** Adds a passphrase slot that only allows adding; returns the slot id. */
export async function addAppendOnlyPassphrase(repo: Repository, passphrase: string, label?: string): Promise<string> {
  if (!repo.keys.master) {
    throw new UsageError('an unencrypted repository has no key slots, so it cannot have an append-only key',
      'protect an unencrypted repository at the storage level (docs/security.md)');
  }
  await requireFullAccess(repo, 'add an append-only key');
  const slot = await wrapMasterKey(repo.keys.master, repo.config.id, 'passphrase', passphrase, { host: hostname(), label });
  const name = `keys/${randomBytes(8).toString('hex')}`;
  await repo.store.create(name, Buffer.from(JSON.stringify({ ...slot, access: 'append-only' }, null, 2)));
  return name.slice('keys/'.length);
}
