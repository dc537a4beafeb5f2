/**
 * A Tresor repository over a BlobStore: configuration, keys, the blob index, blob reads, locks
 * and snapshot manifests. Layout (docs/repository-format.md):
 *
 *   config                      JSON, unencrypted: format, version, id, chunking, crypto choice
 *   keys/<slot>                 JSON key slots wrapping the master key
 *   data/<hh>/<pack id>         pack files (chunks and index pieces)
 *   index/<sha256>              index files: pack → blobs
 *   snapshots/<name id>         snapshot manifests
 *   locks/<random>              locks
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { TresorError, ExitCode, NotFoundError, DamageError, UsageError } from '../util/errors.ts';
import type { BlobStore } from '../store/store.ts';
import { readOneBlob } from './blob-batch.ts';
import { BlobIndex, type BlobLocation, entryLocation } from './blob-index.ts';
import { BlobType, type BlobTypeValue, type CodecKeys, decodeBlob, encodeBlob, nameId } from './codec.ts';
import { decodeIndexFileViews, encodeIndexFile, indexFileId, viewEntries, type IndexedPack } from './index-file.ts';
import {
  type KeySlot, type MasterKey, generateMasterKey, generateRecoveryKey, looksLikeRecoveryKey,
  parseKeySlot, parseRecoveryKey, unwrapMasterKey, wrapMasterKey,
} from './keys.ts';
import { RepositoryLock, type LockKind } from './lock.ts';
import { type SnapshotManifest, validateManifest, parseSnapshotName } from './manifest.ts';
import { packIdFromName, readPackHeader } from './pack.ts';
import { mapLimit } from '../util/concurrency.ts';
import { IdSet } from './id-set.ts';
import { SnapshotCatalog } from './snapshot-catalog.ts';
import { readIndexCache, writeIndexCache, type CachedIndex } from './index-cache.ts';
import { loadReuseExclusions } from './reuse.ts';

export const TOOL_VERSION = '0.1.0';

export interface RepoConfig {
  format: 'tresor-repository';
  /** 1, or 2: packs may hold delta chunks (docs/repository-format.md §2). */
  version: 1 | 2 | 3;
  id: string;
  created: string;
  /** Fixed chunk size for disk images, bytes (power of two). */
  chunkSize: number;
  /** Index slots per index piece. */
  pieceSlots: number;
  /** Piece ids per disk-map node (absent in repositories made before nodes: 1024). */
  nodeIds?: number;
  /** Target size of a pack file, bytes. */
  packSize: number;
  /** zstd level and optional strategy (ZSTD_c_strategy), searchLog, minMatch; decoders need none. */
  compression: { algorithm: 'zstd'; level: number; strategy?: number; searchLog?: number; minMatch?: number; incrementalLevel?: number; dictionaryBytes?: number };
  encryption: 'aes-256-gcm' | 'none';
}

/** Chosen by measurement: docs/repository-format.md §12 and docs/performance.md. */
export const DEFAULTS = {
  chunkSize: 128 * 1024,
  /**
   * 2 KiB pieces (8 MiB of disk): the 2 % scattered rewrite of the reference corpus touches 212
   * of them (~0.25 MiB stored) where 1024-slot pieces touched all 32 (~0.6 MiB).
   */
  pieceSlots: 64,
  nodeIds: 1024,
  packSize: 8 * 1024 * 1024,
  compressionLevel: 3,
  /** ZSTD_lazy: ~8 % smaller than level 3's default strategy on text at 128 KiB, ~1.6x its CPU. */
  compressionStrategy: 4 as number | undefined,
  /**
   * With ZSTD_lazy: searchLog 3 and minMatch 6 make log-like text at 128 KiB 2.5 % smaller at
   * the same speed (211.8 vs 217.2 per mille of 400 MiB of the reference corpus's text).
   */
  compressionTuning: { searchLog: 3, minMatch: 6 },
  /**
   * The chunks an incremental backup stores (the changed part of a disk, small and on the path of
   * frequent backups) at zstd level 1: a third of the lazy setting's CPU for ~2-3 % more bytes
   * added (docs/performance.md, eighth session).
   */
  incrementalCompressionLevel: 1,
  /**
   * Compressible chunks without a delta base are compressed against a 32 KiB dictionary sampled
   * from the disk being backed up, at zstd's double-fast setting: ~2.2x the lazy setting's speed
   * for 2-3 % more bytes (repository-format.md §4, docs/performance.md, ninth session).
   */
  dictionaryBytes: 32 * 1024,
};

/** Bounds of compression.dictionaryBytes. */
export const DICTIONARY_BYTES = { min: 4096, max: 128 * 1024 };

export interface InitOptions {
  encryption: 'aes-256-gcm' | 'none';
  passphrase?: string;
  chunkSize?: number;
  packSize?: number;
  compressionLevel?: number;
  compressionStrategy?: number;
  /** zstd level of chunks stored by incremental backups (default: 1 with the default setting, else the level). */
  incrementalCompressionLevel?: number;
  /** Bytes of a compression dictionary (0 = none; default: DEFAULTS.dictionaryBytes with the default compression). */
  dictionaryBytes?: number;
  /** Disk-map shape (slots per piece, piece ids per node); defaults chosen by measurement. */
  pieceSlots?: number;
  nodeIds?: number;
  /** Lower scrypt cost, for tests only. */
  scrypt?: { N: number; r: number; p: number };
}

/** Supplies the passphrase or recovery key when (and only when) the repository is encrypted. */
export type SecretProvider = () => Promise<string>;

export class WrongPassphraseError extends TresorError {
  constructor(location: string) {
    super('wrong-passphrase', `the passphrase does not open any key slot of the repository at ${location}`, {
      exitCode: ExitCode.auth,
      hint: 'check TRESOR_PASSPHRASE / --passphrase-file, or use the recovery key printed by `tresor repo init`',
      context: { location },
    });
  }
}

export interface SnapshotListing {
  snapshots: SnapshotManifest[];
  damaged: Array<{ object: string; error: string }>;
}

/** What one load of the blob index found (published by `index()` unless invalidated meanwhile). */
interface IndexLoad {
  index: BlobIndex;
  /** The index files whose entries it holds. */
  files: Set<string>;
  /** Index files that failed to load, with the reason. */
  damaged: Array<{ name: string; error: string }>;
  /** Ids writers must not deduplicate against. */
  avoid: IdSet;
  from: { cache: boolean; filesRead: number };
}

export class Repository {
  readonly store: BlobStore;
  readonly config: RepoConfig;
  readonly keys: CodecKeys;
  /** Key slot that opened the repository (undefined when unencrypted). */
  readonly keySlot: string | undefined;
  #index: BlobIndex | undefined;
  #indexLoad: Promise<BlobIndex> | undefined;
  /** Ids writers must not deduplicate against (reuse.ts); loaded with the index. */
  #avoid = new IdSet();
  /** Index files that failed to load, with the reason. */
  readonly damagedIndexFiles: Array<{ name: string; error: string }> = [];
  readonly indexFiles = new Set<string>();
  #catalog: SnapshotCatalog | undefined;
  /** Directory of the local index cache (index-cache.ts), when loads may use it. */
  #indexCacheDir: string | undefined;
  /** Whether the loaded (or loading) index may have come from the cache. */
  #indexMayBeCached = false;
  /** Bumped by invalidateIndex: a load started before it does not become the index. */
  #indexGeneration = 0;
  /** How the last index was loaded: index files read, and whether the local cache gave the rest. */
  indexLoadedFrom: { cache: boolean; filesRead: number } | undefined;
  /** The cache being written in the background, if one is (tests wait for it). */
  indexCacheWrite: Promise<void> | undefined;

  private constructor(store: BlobStore, config: RepoConfig, master: MasterKey | undefined, keySlot: string | undefined) {
    this.store = store;
    this.config = config;
    this.keys = {
      master, compressionLevel: config.compression.level, compressionStrategy: config.compression.strategy,
      compressionTuning: { searchLog: config.compression.searchLog, minMatch: config.compression.minMatch },
    };
    this.keySlot = keySlot;
  }

  get encrypted(): boolean {
    return this.keys.master !== undefined;
  }

  static async init(store: BlobStore, opts: InitOptions): Promise<{ repo: Repository; recoveryKey?: string }> {
    const chunkSize = opts.chunkSize ?? DEFAULTS.chunkSize;
    if (!Number.isInteger(Math.log2(chunkSize)) || chunkSize < 4096 || chunkSize > 16 << 20) {
      throw new UsageError(`chunk size ${chunkSize} is not a power of two between 4 KiB and 16 MiB`, 'use e.g. --chunk-size 64K');
    }
    if (opts.dictionaryBytes !== undefined && opts.dictionaryBytes !== 0 && !validDictionaryBytes(opts.dictionaryBytes, chunkSize)) {
      throw new UsageError(`dictionary size ${opts.dictionaryBytes} is not 0 or a multiple of 4 KiB between ${DICTIONARY_BYTES.min} and ${Math.min(DICTIONARY_BYTES.max, chunkSize / 2)} (at most half a chunk)`, 'e.g. --dictionary-size 32K, or 0 for none');
    }
    for (const [name, v, max] of [['piece slots', opts.pieceSlots, 1 << 16], ['node ids', opts.nodeIds, 1 << 20]] as const) {
      if (v !== undefined && !(Number.isSafeInteger(v) && v >= 1 && v <= max)) throw new UsageError(`${name} ${v} is not an integer between 1 and ${max}`, 'leave it to the default');
    }
    if (await store.stat('config')) {
      throw new TresorError('repo-exists', `a repository already exists at ${store.location}`, { hint: 'use it as it is, or choose another location', exitCode: ExitCode.usage });
    }
    const config: RepoConfig = {
      format: 'tresor-repository', version: 3, id: randomBytes(16).toString('hex'), created: new Date().toISOString(),
      chunkSize, pieceSlots: opts.pieceSlots ?? DEFAULTS.pieceSlots, nodeIds: opts.nodeIds ?? DEFAULTS.nodeIds, packSize: opts.packSize ?? DEFAULTS.packSize,
      compression: {
        algorithm: 'zstd', level: opts.compressionLevel ?? DEFAULTS.compressionLevel,
        ...(() => {
          const defaults = opts.compressionLevel === undefined && opts.compressionStrategy === undefined;
          const strategy = opts.compressionStrategy ?? (defaults ? DEFAULTS.compressionStrategy : undefined);
          const incrementalLevel = opts.incrementalCompressionLevel ?? (defaults ? DEFAULTS.incrementalCompressionLevel : undefined);
          const dictionaryBytes = opts.dictionaryBytes ?? (defaults && chunkSize >= 2 * DICTIONARY_BYTES.min ? Math.min(DEFAULTS.dictionaryBytes, chunkSize / 2) : undefined);
          return {
            ...(strategy === undefined ? {} : { strategy }), ...(defaults ? DEFAULTS.compressionTuning : {}),
            ...(incrementalLevel === undefined ? {} : { incrementalLevel }),
            ...(dictionaryBytes === undefined || dictionaryBytes === 0 ? {} : { dictionaryBytes }),
          };
        })(),
      },
      encryption: opts.encryption,
    };
    let master: MasterKey | undefined;
    let recoveryKey: string | undefined;
    let slotName: string | undefined;
    if (opts.encryption === 'aes-256-gcm') {
      if (!opts.passphrase) throw new UsageError('an encrypted repository needs a passphrase', 'set TRESOR_PASSPHRASE or --passphrase-file');
      master = generateMasterKey();
      const host = hostname();
      const slot = await wrapMasterKey(master, config.id, 'passphrase', opts.passphrase, { host, scrypt: opts.scrypt });
      const recovery = generateRecoveryKey();
      const rslot = await wrapMasterKey(master, config.id, 'recovery', recovery.secret, { host, label: 'recovery key' });
      slotName = `keys/${randomBytes(8).toString('hex')}`;
      await store.create(slotName, Buffer.from(JSON.stringify(slot, null, 2)));
      await store.create(`keys/${randomBytes(8).toString('hex')}`, Buffer.from(JSON.stringify(rslot, null, 2)));
      recoveryKey = recovery.printable;
    }
    // config last: a repository is visible only once its keys are durable.
    if (!(await store.create('config', Buffer.from(JSON.stringify(config, null, 2))))) {
      throw new TresorError('repo-exists', `a repository was created at ${store.location} at the same time`, { exitCode: ExitCode.usage });
    }
    return { repo: new Repository(store, config, master, slotName), recoveryKey };
  }

  static async readConfig(store: BlobStore): Promise<RepoConfig> {
    let raw: Buffer;
    try {
      raw = await store.read('config');
    } catch (err) {
      if ((err as TresorError).code === 'blob-not-found') {
        throw new NotFoundError('no-repository', `there is no Tresor repository at ${store.location}`, { hint: 'create one with `tresor repo init`, or fix --repo / TRESOR_REPO' });
      }
      throw err;
    }
    let c: RepoConfig;
    try {
      c = JSON.parse(raw.toString('utf8')) as RepoConfig;
    } catch (err) {
      throw new DamageError('damaged-config', `the repository config at ${store.location} is not valid JSON`, { cause: err });
    }
    if (c?.format !== 'tresor-repository') throw new DamageError('damaged-config', `${store.location}/config is not a Tresor repository config`);
    if (c.version !== 1 && c.version !== 2 && c.version !== 3) throw new TresorError('repo-version', `the repository at ${store.location} has format version ${c.version}; this Tresor reads versions 1 to 3`, { hint: 'upgrade Tresor' });
    if (!Number.isInteger(Math.log2(c.chunkSize)) || c.chunkSize < 4096 || c.chunkSize > 16 << 20 || !(Number.isSafeInteger(c.pieceSlots) && c.pieceSlots > 0) || !(c.packSize > 0)
      || (c.nodeIds !== undefined && !(Number.isSafeInteger(c.nodeIds) && c.nodeIds > 0 && c.nodeIds <= 1 << 20))
      || (c.encryption !== 'none' && c.encryption !== 'aes-256-gcm')
      || c.compression?.algorithm !== 'zstd' || !Number.isInteger(c.compression.level) || c.compression.level < 0 || c.compression.level > 22
      || (c.compression.strategy !== undefined && !(Number.isInteger(c.compression.strategy) && c.compression.strategy >= 1 && c.compression.strategy <= 9))
      || (c.compression.searchLog !== undefined && !(Number.isInteger(c.compression.searchLog) && c.compression.searchLog >= 1 && c.compression.searchLog <= 26))
      || (c.compression.minMatch !== undefined && !(Number.isInteger(c.compression.minMatch) && c.compression.minMatch >= 3 && c.compression.minMatch <= 7))
      || (c.compression.incrementalLevel !== undefined && !(Number.isInteger(c.compression.incrementalLevel) && c.compression.incrementalLevel >= 0 && c.compression.incrementalLevel <= 22))
      || (c.compression.dictionaryBytes !== undefined && !validDictionaryBytes(c.compression.dictionaryBytes, c.chunkSize))) {
      throw new DamageError('damaged-config', `the repository config at ${store.location} has invalid values`);
    }
    return c;
  }

  static async open(store: BlobStore, secret: SecretProvider): Promise<Repository> {
    const config = await Repository.readConfig(store);
    if (config.encryption === 'none') return new Repository(store, config, undefined, undefined);
    const text = await secret();
    const slots: Array<{ name: string; slot: KeySlot }> = [];
    for await (const b of store.list('keys/')) slots.push({ name: b.name, slot: parseKeySlot(await store.read(b.name), b.name) });
    if (slots.length === 0) throw new DamageError('no-keys', `the encrypted repository at ${store.location} has no key slots`, { hint: 'the keys/ directory was deleted; the data cannot be decrypted without it' });
    const recovery = looksLikeRecoveryKey(text);
    // Try the cheap, likely slots first: recovery slots for a recovery key, passphrase slots otherwise.
    slots.sort((a, b) => Number((a.slot.kind === 'recovery') !== recovery) - Number((b.slot.kind === 'recovery') !== recovery));
    for (const { name, slot } of slots) {
      if ((slot.kind === 'recovery') !== recovery) continue;
      const master = await unwrapMasterKey(slot, config.id, recovery ? parseRecoveryKey(text) : text);
      if (master) return new Repository(store, config, master, name);
    }
    throw new WrongPassphraseError(store.location);
  }

  // ---- keys -------------------------------------------------------------------------------

  async listKeySlots(): Promise<Array<{ name: string; kind: string; created: string; host: string; label?: string; current: boolean }>> {
    const out = [];
    for await (const b of this.store.list('keys/')) {
      const s = parseKeySlot(await this.store.read(b.name), b.name);
      out.push({ name: b.name.slice(5), kind: s.kind, created: s.created, host: s.host, label: s.label, current: b.name === this.keySlot });
    }
    return out;
  }

  async addPassphrase(passphrase: string, label?: string): Promise<string> {
    if (!this.keys.master) throw new UsageError('the repository is not encrypted: it has no passphrases');
    const slot = await wrapMasterKey(this.keys.master, this.config.id, 'passphrase', passphrase, { host: hostname(), label });
    const name = `keys/${randomBytes(8).toString('hex')}`;
    await this.store.create(name, Buffer.from(JSON.stringify(slot, null, 2)));
    return name.slice(5);
  }

  async removeKeySlot(id: string): Promise<void> {
    const name = `keys/${id}`;
    if (!/^[0-9a-f]{16}$/.test(id) || !(await this.store.stat(name))) throw new NotFoundError('no-such-key', `there is no key slot ${id}`, { hint: 'list key slots with `tresor key list`' });
    const slots = await this.listKeySlots();
    if (slots.filter((s) => s.kind === 'passphrase' && s.name !== id).length === 0) {
      throw new UsageError(`key slot ${id} is the last passphrase slot`, 'add another passphrase with `tresor key add` first');
    }
    await this.store.delete(name);
  }

  // ---- locks ------------------------------------------------------------------------------

  lock(kind: LockKind, operation: string): Promise<RepositoryLock> {
    return RepositoryLock.acquire(this.store, this.keys, kind, operation);
  }

  // ---- index ------------------------------------------------------------------------------

  /**
   * The blob index, loaded on first use from every index file, or from the local index cache
   * (useIndexCache) and the index files listed since. `fresh`: from the index files only, as
   * verification, check and garbage collection need (they must see the files' own damage); an
   * index that came from the cache is loaded again.
   */
  index(opts: { fresh?: boolean } = {}): Promise<BlobIndex> {
    if (opts.fresh === true && this.#indexMayBeCached) this.invalidateIndex();
    if (this.#index) return Promise.resolve(this.#index);
    if (this.#indexLoad === undefined) {
      const generation = this.#indexGeneration;
      const useCache = opts.fresh !== true && this.#indexCacheDir !== undefined;
      this.#indexMayBeCached = useCache;
      this.#indexLoad = this.#loadIndex(useCache).then((load) => {
        // A load that invalidateIndex overtook neither becomes the index nor reports on it.
        if (generation === this.#indexGeneration) {
          this.#index = load.index;
          this.#avoid = load.avoid;
          this.indexFiles.clear();
          for (const f of load.files) this.indexFiles.add(f);
          this.damagedIndexFiles.splice(0, this.damagedIndexFiles.length, ...load.damaged);
          this.indexLoadedFrom = load.from;
        }
        return load.index;
      });
    }
    return this.#indexLoad;
  }

  /** Lets index loads use (and keep up to date) the local index cache in `dir` (index-cache.ts). */
  useIndexCache(dir: string): void {
    this.#indexCacheDir = dir;
  }

  /**
   * True when writers must not deduplicate against `id` although the index may have it: a
   * pending garbage collection condemned it, or its only copy is recorded as damaged. The writer
   * stores a fresh copy instead (docs/repository-format.md §Garbage collection, §Damage records).
   * Valid once `index()` has resolved.
   */
  avoids(id: Uint8Array): boolean {
    return this.#avoid.has(id);
  }

  /**
   * Whether writers may store delta chunks: version-2 repositories with compression (a reader
   * that knows only version 1 refuses the repository instead of misreading its packs).
   */
  get deltaChunks(): boolean {
    return this.config.version >= 2 && this.config.compression.level > 0;
  }

  /**
   * Whether writers may store a delta against a delta chunk whose base is a plain chunk (two
   * levels; version 3: a reader of version 2 would call such a base damage). A partly changed
   * chunk whose parent chunk was compressed against a dictionary needs it (§4).
   */
  get twoLevelDeltas(): boolean {
    return this.config.version >= 3 && this.deltaChunks;
  }

  /**
   * Bytes of the compression dictionaries backups sample from the disk (§4), or undefined when
   * backups use none (version 1, no compression, or not configured).
   */
  get dictionaryBytes(): number | undefined {
    return this.deltaChunks ? this.config.compression.dictionaryBytes : undefined;
  }

  /** zstd level of the chunks incremental backups store, when the repository sets one (§2). */
  get incrementalCompressionLevel(): number | undefined {
    return this.config.compression.incrementalLevel;
  }

  /**
   * Forgets the loaded index so the next `index()` reads the index files again. A process must
   * hold its lock before the index it uses is loaded (garbage collection relies on it), so a
   * long-lived Repository reloads the index at the start of each locked operation.
   */
  invalidateIndex(): void {
    this.#indexGeneration++;
    this.#indexMayBeCached = false;
    this.#index = undefined;
    this.#indexLoad = undefined;
    this.#avoid = new IdSet();
    this.indexFiles.clear();
    this.damagedIndexFiles.length = 0;
  }

  async #loadIndex(useCache: boolean): Promise<IndexLoad> {
    // Garbage collection deletes index files once a newer one supersedes them: a file listed
    // here may be gone when it is read. Then the superseding file exists: list again.
    for (let attempt = 1; ; attempt++) {
      const load = await this.#tryLoadIndex(attempt < 4, useCache);
      if (load) return load;
    }
  }

  async #tryLoadIndex(retryOnVanished: boolean, useCache: boolean): Promise<IndexLoad | undefined> {
    const files = new Set<string>();
    const cacheDir = useCache ? this.#indexCacheDir : undefined;
    const [exclusions, names, cached] = await Promise.all([
      loadReuseExclusions(this.store, this.keys),
      (async () => {
        const listed: string[] = [];
        for await (const b of this.store.list('index/')) if (indexFileId(b.name)) listed.push(b.name);
        return listed;
      })(),
      cacheDir !== undefined ? readIndexCache(cacheDir, this.config.id, this.keys) : undefined,
    ]);
    // Recorded damaged copies need the full load's ordering (they go in last).
    if (cached !== undefined && exclusions.damaged.size === 0) {
      const outcome = await this.#extendCachedIndex(cached, names);
      if (outcome === 'vanished' && retryOnVanished) return undefined;
      if (outcome !== undefined && outcome !== 'vanished') return { ...outcome, damaged: [], avoid: exclusions.condemned };
      // Unusable: load from the files.
    }
    const { loaded, vanished, damaged: unreadable, superseded } = await this.#readIndexFiles(names);
    if (vanished && retryOnVanished) return undefined;
    const damaged = unreadable.filter((d) => !superseded.has(d.name));
    let total = 0;
    for (const l of loaded) if (l && !superseded.has(l.name)) for (const p of l.content.packs) total += p.count;
    const index = new BlobIndex(Math.ceil(total / 0.6));
    // Recorded damaged copies go in last, so any other copy of the same blob wins.
    const deferred: IndexedPack[] = [];
    const add = (p: IndexedPack) => addPack(index, p, exclusions.damaged, deferred);
    for (const l of loaded) {
      if (!l || superseded.has(l.name)) continue;
      files.add(l.name);
      for (const p of l.content.packs) {
        // Read in place unless a damaged copy may be among them (they must be set aside).
        if (exclusions.damaged.size === 0) index.addPackEntries(p);
        else add({ packId: p.packId, entries: viewEntries(p) });
      }
    }
    if (damaged.length > 0) await this.#indexUnindexedPacks(index, add);
    for (const p of deferred) addPack(index, p);
    const avoid = exclusions.condemned;
    for (const [hex, packs] of exclusions.damaged) {
      const loc = index.get(Buffer.from(hex, 'hex'));
      if (loc && packs.has(loc.packId.toString('hex'))) avoid.add(Buffer.from(hex, 'hex'));
    }
    // A load from the files is what the cache holds next (also after verification or garbage
    // collection, which load fresh), unless damage made it one the cache must not stand for.
    if (damaged.length === 0 && exclusions.damaged.size === 0) {
      this.#saveIndexCache({ index, files: new Set(files), skipped: new Set(names.filter((n) => superseded.has(n))) });
    }
    return { index, files, damaged, avoid, from: { cache: false, filesRead: names.length } };
  }

  /**
   * The cached index with the index files listed since added, when the cache still describes the
   * repository (index-cache.ts says when); 'vanished' when a file listed was gone when read;
   * undefined when the cache cannot be used.
   */
  async #extendCachedIndex(cached: CachedIndex, names: string[]): Promise<Pick<IndexLoad, 'index' | 'files' | 'from'> | 'vanished' | undefined> {
    const listed = new Set(names);
    for (const f of cached.files) if (!listed.has(f)) return undefined; // superseded and deleted since
    const added = names.filter((n) => !cached.files.has(n) && !cached.skipped.has(n));
    const { loaded, vanished, damaged, superseded } = await this.#readIndexFiles(added);
    if (vanished) return 'vanished';
    if (damaged.length > 0) return undefined; // the load from the files reports it
    for (const f of cached.files) if (superseded.has(f)) return undefined; // garbage collection ran since
    const index = cached.index;
    const files = new Set(cached.files);
    let addedEntries = 0;
    for (const l of loaded) {
      if (superseded.has(l!.name)) continue;
      files.add(l!.name);
      for (const p of l!.content.packs) {
        index.addPackEntries(p);
        addedEntries += p.count;
      }
    }
    // Kept up to date only now and then: each file read costs little, and a save rewrites it all.
    if (added.length > 16 || addedEntries * 8 > index.size) {
      this.#saveIndexCache({ index, files: new Set(files), skipped: new Set([...cached.skipped, ...added.filter((n) => superseded.has(n))].filter((n) => listed.has(n))) });
    }
    return { index, files, from: { cache: true, filesRead: added.length } };
  }

  /**
   * Reads and decodes index files: each one's content, or undefined where it was gone
   * (`vanished`: superseded and deleted meanwhile) or unreadable (`damaged`, with the reason);
   * and the files the ones read supersede.
   */
  async #readIndexFiles(names: string[]): Promise<{
    loaded: Array<{ name: string; content: ReturnType<typeof decodeIndexFileViews> } | undefined>;
    vanished: boolean; damaged: Array<{ name: string; error: string }>; superseded: Set<string>;
  }> {
    let vanished = false;
    const damaged: Array<{ name: string; error: string }> = [];
    const loaded = await mapLimit(names, 8, async (name) => {
      try {
        return { name, content: decodeIndexFileViews(this.keys, name, await this.store.read(name)) };
      } catch (err) {
        if ((err as TresorError).code === 'blob-not-found') vanished = true;
        else damaged.push({ name, error: (err as Error).message });
        return undefined;
      }
    });
    const superseded = new Set<string>();
    for (const l of loaded) for (const s of l?.content.supersedes ?? []) superseded.add(`index/${s.toString('hex')}`);
    return { loaded, vanished, damaged, superseded };
  }

  /** Writes the index cache in the background (the arrays are copied before this returns). */
  #saveIndexCache(cached: CachedIndex): void {
    const dir = this.#indexCacheDir;
    if (dir === undefined) return;
    const write = writeIndexCache(dir, this.config.id, this.keys, cached);
    this.indexCacheWrite = write;
  }

  /**
   * Packs are self-describing: when an index file is damaged, the packs it described are found
   * by reading the headers of every pack no intact index file lists.
   */
  async #indexUnindexedPacks(index: BlobIndex, add: (p: IndexedPack) => void): Promise<void> {
    const known = new Set(index.packIds().map((p) => p.toString('hex')));
    const missing: Array<{ name: string; size: number }> = [];
    for await (const b of this.store.list('data/')) {
      const id = packIdFromName(b.name);
      if (id && !known.has(id.toString('hex'))) missing.push(b);
    }
    await mapLimit(missing, 8, async (b) => {
      try {
        const entries = await readPackHeader(this.keys, b.name, b.size, (o, l) => this.store.read(b.name, { offset: o, length: l }));
        add({ packId: packIdFromName(b.name)!, entries });
      } catch {
        // A pack whose header is unreadable stays unknown; verify reports the chunks as missing.
      }
    });
  }

  /** Writes an index file for `packs` (durably) before anything may reference their blobs. */
  async writeIndexFile(packs: IndexedPack[], supersedes: Buffer[] = []): Promise<{ name: string; size: number }> {
    const { name, data } = encodeIndexFile(this.keys, { packs, supersedes });
    await this.store.create(name, data);
    this.indexFiles.add(name);
    return { name, size: data.length };
  }

  // ---- blobs ------------------------------------------------------------------------------

  async locate(id: Buffer, what: () => string): Promise<BlobLocation> {
    const loc = (await this.index()).get(id);
    if (!loc) {
      throw new DamageError('missing-blob', `${what()} is missing from the repository (blob ${id.toString('hex')} is in no index)`, {
        context: { blob: id.toString('hex') },
      });
    }
    return loc;
  }

  /** Reads, decodes and checks one content-addressed blob. */
  /** One blob's plaintext, checked (blob-batch.ts: the same reads and errors as a batch of one). */
  readBlob(id: Buffer, type: BlobTypeValue, what: () => string): Promise<Buffer> {
    return readOneBlob(this, { id, type, what });
  }

  // ---- snapshots --------------------------------------------------------------------------

  snapshotKey(name: string): string {
    return `snapshots/${nameId(this.keys, 'snapshot', name).toString('hex')}`;
  }

  encodeManifest(m: SnapshotManifest): { key: string; data: Buffer } {
    const key = this.snapshotKey(m.name);
    return { key, data: encodeBlob(this.keys, BlobType.manifest, Buffer.from(key.slice(10), 'hex'), Buffer.from(JSON.stringify(m))) };
  }

  /** Commits a snapshot: true if created, false if a snapshot of that name already exists. */
  async commitSnapshot(m: SnapshotManifest): Promise<{ created: boolean; size: number }> {
    const { key, data } = this.encodeManifest(m);
    return { created: await this.store.create(key, data), size: data.length };
  }

  decodeManifest(key: string, stored: Buffer): SnapshotManifest {
    const hex = key.slice('snapshots/'.length);
    if (!/^[0-9a-f]{64}$/.test(hex)) throw new DamageError('damaged-manifest', `${key} is not a manifest name`);
    const plain = decodeBlob(this.keys, BlobType.manifest, Buffer.from(hex, 'hex'), stored, { maxLength: 256 << 20 }, () => ({ what: `snapshot manifest ${key}`, context: { manifest: key } }));
    let parsed: unknown;
    try {
      parsed = JSON.parse(plain.toString('utf8'));
    } catch {
      throw new DamageError('damaged-manifest', `snapshot manifest ${key} is not valid JSON`, { context: { manifest: key } });
    }
    const m = validateManifest(parsed, `snapshot manifest ${key}`);
    if (this.snapshotKey(m.name) !== key) throw new DamageError('damaged-manifest', `snapshot manifest ${key} names snapshot ${m.name}, which belongs elsewhere`, { context: { manifest: key } });
    return m;
  }

  async readSnapshot(name: string): Promise<SnapshotManifest> {
    parseSnapshotName(name);
    const key = this.snapshotKey(name);
    let stored: Buffer;
    try {
      stored = await this.store.read(key);
    } catch (err) {
      if ((err as TresorError).code === 'blob-not-found') {
        throw new NotFoundError('no-such-snapshot', `snapshot ${name} does not exist in ${this.store.location}`, { hint: 'list snapshots with `tresor snapshots`', context: { snapshot: name } });
      }
      throw err;
    }
    try {
      return this.decodeManifest(key, stored);
    } catch (err) {
      if (err instanceof DamageError) throw new DamageError('damaged-manifest', `the manifest of snapshot ${name} is damaged: ${err.message}`, { context: { snapshot: name, manifest: key } });
      throw err;
    }
  }

  /**
   * The latest committed snapshot of this type and id, if any (a damaged manifest does not count,
   * as in `listSnapshots`). With a catalog only the newest manifest of the id that it knows is
   * read, with the ones it does not know: every backup asks this, and a VM with a year of
   * snapshots would otherwise read hundreds of manifests each time.
   */
  async latestSnapshot(type: string, id: string): Promise<SnapshotManifest | undefined> {
    const catalog = this.#catalog;
    if (catalog === undefined) return (await this.listSnapshots({ type, id })).snapshots.at(-1);
    const keys = await this.#snapshotKeys();
    const wanted = (e: { type: string; id: string }) => e.id === id && e.type === type;
    const { snapshots } = await this.#readManifests(keys.filter((key) => catalog.lookup(key) === undefined), wanted);
    // Newest first, by the order listSnapshots sorts in; a manifest gone or damaged meanwhile: the
    // next. None older than the newest of those just learnt.
    const learnt = snapshots.sort(bySnapshotTime).at(-1);
    const known = keys.flatMap((key) => {
      const e = catalog.lookup(key);
      return e !== undefined && wanted(e) && !snapshots.some((m) => m.name === e.name) ? [{ key, time: e.time, name: e.name }] : [];
    }).sort((a, b) => bySnapshotTime(b, a));
    for (const k of known) {
      if (learnt !== undefined && bySnapshotTime(k, learnt) < 0) break;
      const read = await this.#readManifests([k.key], wanted);
      if (read.snapshots.length === 0) continue;
      snapshots.push(...read.snapshots);
      break;
    }
    catalog.retain(keys);
    await catalog.save();
    return snapshots.sort(bySnapshotTime).at(-1);
  }

  /**
   * Keeps a local catalog of the snapshots in `dir` (snapshot-catalog.ts): filtered listings then
   * read only the manifests they select and the ones not seen before.
   */
  async useSnapshotCatalog(dir: string): Promise<void> {
    this.#catalog = await SnapshotCatalog.open(dir, this.config.id, this.keys);
  }

  /**
   * Snapshots, oldest first, optionally of one type and id. Manifests that cannot be read or
   * decoded are reported in `damaged` (with a catalog and a filter: only those it had to read).
   */
  async listSnapshots(filter?: { type?: string; id?: string }): Promise<SnapshotListing> {
    const keys = await this.#snapshotKeys();
    const wanted = (e: { type: string; id: string }) => (!filter?.id || e.id === filter.id) && (!filter?.type || e.type === filter.type);
    const catalog = this.#catalog;
    const toRead = catalog && (filter?.id || filter?.type) ? keys.filter((key) => {
      const known = catalog.lookup(key);
      return known === undefined || wanted(known);
    }) : keys;
    const listing = await this.#readManifests(toRead, wanted);
    if (catalog) {
      catalog.retain(keys);
      await catalog.save();
    }
    listing.snapshots.sort(bySnapshotTime);
    return listing;
  }

  async #snapshotKeys(): Promise<string[]> {
    const keys: string[] = [];
    for await (const b of this.store.list('snapshots/')) keys.push(b.name);
    return keys;
  }

  /** Reads and decodes manifests (teaching the catalog each one); keeps the `wanted` ones, in no order. */
  async #readManifests(keys: string[], wanted: (m: SnapshotManifest) => boolean): Promise<SnapshotListing> {
    const snapshots: SnapshotManifest[] = [];
    const damaged: SnapshotListing['damaged'] = [];
    await mapLimit(keys, 16, async (key) => {
      try {
        const m = this.decodeManifest(key, await this.store.read(key));
        this.#catalog?.learn(key, m);
        if (wanted(m)) snapshots.push(m);
      } catch (err) {
        if ((err as TresorError).code === 'blob-not-found') return;
        damaged.push({ object: key, error: (err as Error).message });
      }
    });
    return { snapshots, damaged };
  }
}

/**
 * Oldest first; snapshots of the same time by name. Plain code-unit order: times are ISO 8601 in
 * UTC, names ASCII, and a locale-aware compare would load ICU's collator (14 ms) at every start.
 */
function bySnapshotTime(a: { time: string; name: string }, b: { time: string; name: string }): number {
  return compareText(a.time, b.time) || compareText(a.name, b.name);
}

function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Adds a pack's entries; copies recorded as damaged are set aside in `deferred` instead. */
function addPack(index: BlobIndex, p: IndexedPack, damaged?: Map<string, Set<string>>, deferred?: IndexedPack[]): void {
  let packHex: string | undefined;
  let held: IndexedPack | undefined;
  for (const e of p.entries) {
    if (damaged !== undefined && damaged.size > 0 && deferred !== undefined) {
      const packs = damaged.get(e.id.toString('hex'));
      if (packs?.has(packHex ??= p.packId.toString('hex'))) {
        if (!held) deferred.push(held = { packId: p.packId, entries: [] });
        held.entries.push(e);
        continue;
      }
    }
    index.add(e.id, entryLocation(p.packId, e));
  }
}

/** At most half a chunk: a dictionary is never as long as a full chunk (codec.ts encodeChunk). */
function validDictionaryBytes(n: number, chunkSize: number): boolean {
  return Number.isInteger(n) && n % 4096 === 0 && n >= DICTIONARY_BYTES.min && n <= Math.min(DICTIONARY_BYTES.max, chunkSize / 2);
}
