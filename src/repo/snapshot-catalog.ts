/**
 * A local catalog of a repository's snapshots, so that finding one backup id's snapshots (a
 * backup's parent, `snapshots --id`, prune of one id) does not read and decrypt every manifest of
 * every VM. Measured: 3002 manifests in a local repository took 0.56-0.63 s to search (listing
 * 78 ms, reading 200 ms, decoding 230 ms), every backup, and over S3 each is a GET.
 *
 * Why it is safe to cache: a manifest object is immutable. Its key is derived from the snapshot
 * name (repository.ts snapshotKey) and created once (`create` refuses to overwrite); prune deletes
 * it, and the listing then no longer shows the key. So an entry, once learnt from an
 * authenticated manifest, stays true for as long as its key is listed. What the catalog keeps per
 * key is only what filters need: name, type, id and time. Listings still list the repository
 * every time; keys the catalog does not know are read and learnt; the manifests a filter selects
 * are always read and decoded from the repository, so callers get nothing but checked manifests.
 *
 * The file (JSON) lives in the user's cache directory, one per repository id, written atomically
 * (temporary file + rename; concurrent writers: the last one wins, a lost entry is learnt again)
 * with mode 0600; catalogs of other repositories untouched for 30 days are removed when one is
 * saved (CATALOG_MAX_AGE_MS; at most once a day, SWEEP_EVERY_MS). It carries an HMAC under a key derived from the repository's master key (for an
 * unencrypted repository only a checksum): a file that fails it (edited, truncated, another
 * repository's) is ignored and rebuilt. A catalog
 * cannot make a backup wrong even then: the worst a stale parent can cause is a full read, since
 * the engine proves every link of an incremental against libvirt.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdir, readFile, readdir, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { nameId, type CodecKeys } from './codec.ts';
import type { SnapshotManifest } from './manifest.ts';

export interface CatalogEntry {
  name: string;
  type: string;
  id: string;
  time: string;
}

const FORMAT = 'tresor-snapshot-catalog';
const VERSION = 1;
/**
 * Catalogs of other repositories untouched this long are removed when a catalog is saved, so
 * repositories that are gone (tests, moved or deleted ones) do not pile up in the cache. One still
 * in use but idle that long is rebuilt on its next use: a listing that reads every manifest once.
 */
export const CATALOG_MAX_AGE_MS = 30 * 24 * 3600 * 1000;
/** A catalog in use gets its time refreshed when older than this (a write at most once a day). */
const TOUCH_AFTER_MS = 24 * 3600 * 1000;
/** Temporary files older than this were left by a writer that died. */
const TMP_MAX_AGE_MS = 3600 * 1000;
/** How often a save sweeps the cache directory for stale catalogs (sweepDaily). */
export const SWEEP_EVERY_MS = 24 * 3600 * 1000;
/** The file whose modification time is the last sweep's. */
export const SWEPT_MARKER = '.swept';

interface CatalogFile {
  format: typeof FORMAT;
  version: typeof VERSION;
  repository: string;
  /** key (hex part of snapshots/<hex>) → entry */
  entries: Record<string, CatalogEntry>;
  mac: string;
}

export class SnapshotCatalog {
  readonly path: string;
  readonly #repositoryId: string;
  readonly #macKey: Buffer;
  #entries = new Map<string, CatalogEntry>();
  #changed = false;

  private constructor(path: string, repositoryId: string, macKey: Buffer) {
    this.path = path;
    this.#repositoryId = repositoryId;
    this.#macKey = macKey;
  }

  /** Loads the catalog of repository `repositoryId` from `dir` (an unusable file counts as empty). */
  static async open(dir: string, repositoryId: string, keys: CodecKeys): Promise<SnapshotCatalog> {
    const catalog = new SnapshotCatalog(join(dir, `${repositoryId}.json`), repositoryId, nameId(keys, 'snapshot-catalog', repositoryId));
    let text: string;
    try {
      text = await readFile(catalog.path, 'utf8');
    } catch {
      return catalog;
    }
    try {
      const file = JSON.parse(text) as CatalogFile;
      if (file.format !== FORMAT || file.version !== VERSION || file.repository !== repositoryId || typeof file.entries !== 'object') return catalog;
      const expected = catalog.#mac(file.entries);
      const given = Buffer.from(String(file.mac), 'hex');
      if (given.length !== expected.length || !timingSafeEqual(given, expected)) return catalog;
      for (const [key, e] of Object.entries(file.entries)) catalog.#entries.set(key, e);
      // In use: keep it younger than the age at which other repositories' saves remove it.
      const now = Date.now();
      if (now - (await stat(catalog.path)).mtimeMs > TOUCH_AFTER_MS) await utimes(catalog.path, now / 1000, now / 1000).catch(() => undefined);
    } catch {
      // Not JSON: rebuilt from the repository.
    }
    return catalog;
  }

  get size(): number {
    return this.#entries.size;
  }

  lookup(key: string): CatalogEntry | undefined {
    return this.#entries.get(keyHex(key));
  }

  learn(key: string, m: SnapshotManifest): void {
    const hex = keyHex(key);
    if (this.#entries.has(hex)) return;
    this.#entries.set(hex, { name: m.name, type: m.type, id: m.id, time: m.time });
    this.#changed = true;
  }

  /** Forgets keys no longer listed (pruned snapshots). */
  retain(listed: Iterable<string>): void {
    const keep = new Set<string>();
    for (const key of listed) keep.add(keyHex(key));
    for (const hex of this.#entries.keys()) {
      if (!keep.has(hex)) {
        this.#entries.delete(hex);
        this.#changed = true;
      }
    }
  }

  /** Writes the catalog if it changed; a failure to write only costs the next listing time. */
  async save(): Promise<void> {
    if (!this.#changed) return;
    const entries = Object.fromEntries([...this.#entries].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    const file: CatalogFile = { format: FORMAT, version: VERSION, repository: this.#repositoryId, entries, mac: this.#mac(entries).toString('hex') };
    const tmp = `${this.path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      await mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
      await writeFile(tmp, JSON.stringify(file), { mode: 0o600 });
      await rename(tmp, this.path);
      this.#changed = false;
    } catch {
      await rm(tmp, { force: true }).catch(() => undefined);
    }
    await sweepDaily(dirname(this.path), this.path).catch(() => undefined);
  }

  #mac(entries: Record<string, CatalogEntry>): Buffer {
    const h = createHmac('sha256', this.#macKey);
    h.update(`${FORMAT}\0${VERSION}\0${this.#repositoryId}\0`);
    for (const key of Object.keys(entries).sort()) {
      const e = entries[key]!;
      h.update(`${key}\0${e.name}\0${e.type}\0${e.id}\0${e.time}\n`);
    }
    return h.digest();
  }
}

/**
 * Removes stale files (removeStaleCatalogs) at most once a day per cache directory: a sweep
 * stats every file there, and a user's cache can hold hundreds of catalogs (a test machine's
 * held 1425, and sweeping it took 0.4 s of every incremental backup). The time of the last sweep
 * is the modification time of SWEPT_MARKER, set before sweeping so concurrent savers do not all
 * sweep.
 */
export async function sweepDaily(dir: string, own: string, extension = '.json'): Promise<void> {
  const marker = join(dir, SWEPT_MARKER);
  const last = await stat(marker).then((st) => st.mtimeMs, () => 0);
  if (Date.now() - last < SWEEP_EVERY_MS) return;
  await writeFile(marker, '', { mode: 0o600 }); // (truncating it sets its time)
  await removeStaleCatalogs(dir, own, extension);
}

/**
 * Other repositories' files (catalogs, or what `extension` names: index-cache.ts) untouched for
 * CATALOG_MAX_AGE_MS, and dead writers' temporary files.
 */
async function removeStaleCatalogs(dir: string, own: string, extension: string): Promise<void> {
  const now = Date.now();
  for (const name of await readdir(dir)) {
    const path = join(dir, name);
    const maxAge = name.endsWith('.tmp') ? TMP_MAX_AGE_MS : name.endsWith(extension) ? CATALOG_MAX_AGE_MS : undefined;
    if (maxAge === undefined || path === own) continue;
    const info = await stat(path).catch(() => undefined);
    if (info !== undefined && now - info.mtimeMs > maxAge) await rm(path, { force: true }).catch(() => undefined);
  }
}

function keyHex(key: string): string {
  return key.startsWith('snapshots/') ? key.slice('snapshots/'.length) : key;
}
