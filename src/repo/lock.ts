/**
 * Repository locks (docs/repository-format.md §Locks).
 *
 * A lock is a small encoded object `locks/<random 32 hex>` saying who holds it, for what and since
 * when. Shared locks (backup, restore, verify, sync, prune) coexist; a maintenance lock (garbage
 * collection) coexists with shared locks but excludes other maintenance and exclusive locks; an
 * exclusive lock (key removal) excludes everything. A holder refreshes its lock every REFRESH_MS
 * by writing a new lock object and deleting the old one, so a lock whose time is older than
 * STALE_MS belongs to a dead process on some host and is ignored (and removed). A lock from this
 * host whose process no longer exists is stale at once. `started` (kept across refreshes)
 * identifies a holder: garbage collection waits for the holders it saw (docs §Garbage collection).
 *
 * Acquisition: list → refuse on conflict → create ours → list again → if a conflicting lock
 * appeared meanwhile (a race), remove ours and refuse. Both racers may back off; neither proceeds
 * wrongly.
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { TresorError, ExitCode } from '../util/errors.ts';
import { processAlive } from '../util/process.ts';
import type { BlobStore } from '../store/store.ts';
import { BlobType, type CodecKeys, decodeBlob, encodeBlob } from './codec.ts';

export const REFRESH_MS = 5 * 60_000;
export const STALE_MS = 30 * 60_000;

export type LockKind = 'shared' | 'maintenance' | 'exclusive';

export interface LockInfo {
  kind: LockKind;
  operation: string;
  host: string;
  pid: number;
  /** Time of the last refresh. */
  time: string;
  /** When the holder first took the lock; kept across refreshes (identifies the holder). */
  started?: string;
}

export class RepositoryLockedError extends TresorError {
  constructor(location: string, holder: LockInfo | undefined, wanted: string) {
    const who = holder ? `${holder.operation} (pid ${holder.pid} on ${holder.host}, since ${holder.time})` : 'another process (its lock is unreadable)';
    super('locked', `the repository at ${location} is locked by ${who}; cannot ${wanted} now`, {
      exitCode: ExitCode.locked,
      hint: holder && holder.kind === 'exclusive'
        ? 'wait for that operation to finish and try again'
        : 'wait for the running operations to finish; if the holder is known to be dead, remove its lock with `tresor unlock`',
      context: { location, holder },
    });
  }
}

function lockContext(name: string): Buffer {
  return Buffer.from(name.slice('locks/'.length).padEnd(64, '0').slice(0, 64), 'hex');
}

function isStale(info: LockInfo, now: number): boolean {
  const t = Date.parse(info.time);
  if (!Number.isFinite(t) || now - t > STALE_MS) return true;
  if (info.host === hostname() && !processAlive(info.pid)) return true;
  return false;
}

export interface ListedLock {
  name: string;
  info: LockInfo | undefined;
  stale: boolean;
}

export async function listLocks(store: BlobStore, keys: CodecKeys): Promise<ListedLock[]> {
  const out: ListedLock[] = [];
  const now = Date.now();
  for await (const b of store.list('locks/')) {
    let info: LockInfo | undefined;
    try {
      const plain = decodeBlob(keys, BlobType.lock, lockContext(b.name), await store.read(b.name), { maxLength: 4096 }, () => ({ what: `lock ${b.name}`, context: {} }));
      info = JSON.parse(plain.toString('utf8')) as LockInfo;
    } catch (err) {
      if ((err as TresorError).code === 'blob-not-found') continue; // released meanwhile
      info = undefined;
    }
    out.push({ name: b.name, info, stale: info ? isStale(info, now) : false });
  }
  return out;
}

function conflicts(want: LockKind, other: LockInfo | undefined): boolean {
  if (want === 'exclusive' || other === undefined || other.kind === 'exclusive') return true;
  return want === 'maintenance' && other.kind !== 'shared';
}

export class RepositoryLock {
  #name: string;
  readonly #store: BlobStore;
  readonly #keys: CodecKeys;
  readonly info: LockInfo;
  #timer: NodeJS.Timeout | undefined;
  #released = false;

  private constructor(store: BlobStore, keys: CodecKeys, name: string, info: LockInfo) {
    this.#store = store;
    this.#keys = keys;
    this.#name = name;
    this.info = info;
  }

  static async acquire(store: BlobStore, keys: CodecKeys, kind: LockKind, operation: string): Promise<RepositoryLock> {
    await checkConflicts(store, keys, kind, operation, undefined);
    const now = new Date().toISOString();
    const info: LockInfo = { kind, operation, host: hostname(), pid: process.pid, time: now, started: now };
    const name = await writeLock(store, keys, info);
    const lock = new RepositoryLock(store, keys, name, info);
    try {
      await checkConflicts(store, keys, kind, operation, name);
    } catch (err) {
      await lock.release();
      throw err;
    }
    lock.#timer = setInterval(() => void lock.#refresh(), REFRESH_MS);
    lock.#timer.unref();
    return lock;
  }

  async #refresh(): Promise<void> {
    if (this.#released) return;
    const old = this.#name;
    try {
      this.#name = await writeLock(this.#store, this.#keys, { ...this.info, time: new Date().toISOString() });
      await this.#store.delete(old);
    } catch {
      // The next refresh tries again; only after STALE_MS without success could others ignore us.
    }
  }

  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    if (this.#timer) clearInterval(this.#timer);
    await this.#store.delete(this.#name);
  }
}

async function writeLock(store: BlobStore, keys: CodecKeys, info: LockInfo): Promise<string> {
  const name = `locks/${randomBytes(16).toString('hex')}`;
  await store.create(name, encodeBlob(keys, BlobType.lock, lockContext(name), Buffer.from(JSON.stringify(info))));
  return name;
}

async function checkConflicts(store: BlobStore, keys: CodecKeys, kind: LockKind, operation: string, own: string | undefined): Promise<void> {
  for (const l of await listLocks(store, keys)) {
    if (l.name === own) continue;
    if (l.stale) {
      await store.delete(l.name).catch(() => undefined);
      continue;
    }
    if (conflicts(kind, l.info)) throw new RepositoryLockedError(store.location, l.info, operation);
  }
}
