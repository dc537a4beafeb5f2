/**
 * Reads many small blobs (disk-map pieces and nodes) with few ranged reads: located, grouped by
 * pack, sorted by offset, and neighbours less than `gap` apart fetched with one read of at most
 * `maxRead` bytes. Writers keep map blobs in packs of their own (pack-writer.ts), so the pieces
 * of one snapshot usually come in one or two reads instead of one read each.
 *
 * Every item gets exactly one outcome through `each`: its plaintext (decoded, authenticated,
 * identity-checked, of its indexed length) or the error that names it. One item's failure never
 * stops the others.
 */
import { DamageError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';
import { LruMap } from '../util/lru.ts';
import type { BlobLocation } from './blob-index.ts';
import { IdSet } from './id-set.ts';
import { BLOB_TYPE_NAMES, BlobType, type BlobTypeValue, type DeltaBase, decodeBlob } from './codec.ts';
import type { StoredBase } from './codec-ops.ts';
import { transferable } from './codec-pool.ts';
import { packName } from './pack.ts';
import type { Repository } from './repository.ts';

export interface BatchItem {
  id: Buffer;
  type: BlobTypeValue;
  /** What the blob is, for errors: "index piece 3 of disk vda in snapshot …". */
  what: () => string;
  /** Plaintext length the caller requires (checked before reading); default: the indexed one. */
  length?: number;
  /** For a delta chunk: its base, read and checked by the caller. */
  base?: DeltaBase;
}

export type BatchOutcome = { plain: Buffer; error?: undefined } | { plain?: undefined; error: unknown };

export interface BatchOptions {
  /** Where a blob is (default: the repository's index). */
  locate?: (id: Buffer) => BlobLocation | undefined;
  gap?: number;
  maxRead?: number;
  /** Ranged reads at once. */
  concurrency?: number;
  /** Called with the size of every ranged read (callers that account for what they fetch). */
  onFetch?: (bytes: number) => void;
  /** Accept the AEAD tag as proof of identity (codec.ts DecodeExpect.trustAead): restores and backups only. */
  trustAead?: boolean;
}

/**
 * Delta bases already read and checked, by id (hex). A compression dictionary is the base of
 * thousands of delta chunks: readers that go through many of them keep one of these so each
 * base is read once, not once per ranged read.
 */
export type BaseCache = LruMap<string, DeltaBase>;

/** Room for 32 bases: at most 4 MiB with 128 KiB chunks. */
export function newBaseCache(): BaseCache {
  return new LruMap<string, DeltaBase>(32);
}

/**
 * The bases of delta chunks, read with the checks of any batch. A base is a plain chunk, or (two
 * levels, repository-format.md §4) a delta chunk whose own base is a plain chunk: that one is
 * read first and the base decoded against it. Each base id maps to its plaintext or to the error
 * that stops every delta made against it (a missing base, a deeper chain, damage). `what(id)`
 * names a base for errors.
 */
export async function readDeltaBases(repo: Repository, baseIds: Iterable<Buffer>, what: (id: Buffer) => string, opts: BatchOptions & { cache?: BaseCache } = {}): Promise<Map<string, DeltaBase | Error>> {
  const ids = [...baseIds];
  return readBases(repo, ids, what, await innerBases(repo, ids, what, opts), opts);
}

/**
 * For bases that are delta chunks (two levels): their own bases, which must be plain chunks,
 * read first. Returns the lookup from a base's id to its own base's plaintext, the error that
 * stops it, or undefined for a plain chunk.
 */
async function innerBases(repo: Repository, ids: Buffer[], what: (id: Buffer) => string, opts: BatchOptions & { cache?: BaseCache }): Promise<(id: Buffer) => DeltaBase | Error | undefined> {
  const index = opts.locate ? undefined : await repo.index();
  const locate = opts.locate ?? ((id: Buffer) => index!.get(id));
  const innerIds = ids.flatMap((id) => {
    const loc = locate(id);
    return loc?.type === BlobType.deltaChunk && loc.base !== undefined ? [loc.base] : [];
  });
  const inner = innerIds.length === 0 ? new Map<string, DeltaBase | Error>() : await readBases(repo, innerIds, (id) => `${what(id)} (the base of a base)`, () => undefined, opts);
  return (id) => {
    const loc = locate(id);
    if (loc?.type !== BlobType.deltaChunk || loc.base === undefined) return undefined;
    const base = inner.get(loc.base.toString('hex'));
    return base instanceof Error || base === undefined
      ? new Error(`${what(id)} is a delta chunk whose base ${loc.base.toString('hex')} cannot be read: ${base?.message ?? 'not read'}`)
      : base;
  };
}

/**
 * Reads chunks by id (each once; from the cache where it has them): as a plain chunk where
 * `baseOf` gives no base, else as a delta chunk against it (or the error it gives).
 */
async function readBases(
  repo: Repository, ids: Buffer[], what: (id: Buffer) => string, baseOf: (id: Buffer) => DeltaBase | Error | undefined, opts: BatchOptions & { cache?: BaseCache },
): Promise<Map<string, DeltaBase | Error>> {
  const bases = new Map<string, DeltaBase | Error>();
  const items: BatchItem[] = [];
  for (const id of ids) {
    const hex = id.toString('hex');
    if (bases.has(hex)) continue;
    const cached = opts.cache?.get(hex);
    const base = cached === undefined ? baseOf(id) : undefined;
    if (cached !== undefined || base instanceof Error) {
      bases.set(hex, cached ?? base!);
      continue;
    }
    bases.set(hex, new Error('not read'));
    items.push({ id, type: base === undefined ? BlobType.chunk : BlobType.deltaChunk, what: () => what(id), ...(base !== undefined ? { base } : {}) });
  }
  await readBlobBatch(repo, items, (item, outcome) => {
    const hex = item.id.toString('hex');
    if (outcome.plain === undefined) {
      bases.set(hex, outcome.error instanceof Error ? outcome.error : new Error(String(outcome.error)));
      return;
    }
    // A copy of its own: a plaintext can be a view into a whole ranged read, which a cache would
    // pin and a message to a worker would copy whole.
    const base = { id: item.id, plain: opts.cache !== undefined ? Buffer.from(outcome.plain) : outcome.plain };
    bases.set(hex, base);
    opts.cache?.set(hex, base);
  }, opts);
  return bases;
}

/**
 * The bases of delta chunks as stored, not decoded, for a worker to decode with the deltas that
 * need them (codec-ops.ts DecodeItem.storedBase): their decryption, decompression and the copies
 * of their plaintext stay off this thread. A base that is a delta chunk (two levels) comes with
 * its own base's plaintext, read here as readDeltaBases does (through `cache`: it is mostly the
 * disk's compression dictionary). `transfer`: the ranged reads under the stored views, for the
 * request that carries them (they are detached here once posted, so the result serves one
 * request).
 */
export async function fetchDeltaBases(repo: Repository, baseIds: Iterable<Buffer>, what: (id: Buffer) => string, opts: BatchOptions & { cache?: BaseCache } = {}): Promise<{ bases: Map<string, StoredBase | Error>; transfer: ArrayBuffer[] }> {
  const bases = new Map<string, StoredBase | Error>();
  const ids: Buffer[] = [];
  for (const id of baseIds) {
    if (bases.has(id.toString('hex'))) continue;
    bases.set(id.toString('hex'), new Error('not read'));
    ids.push(id);
  }
  const innerOf = await innerBases(repo, ids, what, opts);
  const items: BatchItem[] = [];
  for (const id of ids) {
    const base = innerOf(id);
    if (base instanceof Error) bases.set(id.toString('hex'), base);
    else items.push({ id, type: base === undefined ? BlobType.chunk : BlobType.deltaChunk, what: () => what(id), ...(base !== undefined ? { base } : {}) });
  }
  const transfer = new Set<ArrayBuffer>();
  await fetchBlobBatch(repo, items, (item, fetched) => {
    const hex = item.id.toString('hex');
    if (fetched.stored === undefined) {
      bases.set(hex, fetched.error instanceof Error ? fetched.error : new Error(String(fetched.error)));
      return;
    }
    // A range that is not its own ArrayBuffer (a small read from Node's pool) cannot move; a
    // message would copy all of the pool under it, so the base gets a copy of its own.
    const movable = transferable(fetched.range);
    for (const ab of movable) transfer.add(ab);
    bases.set(hex, {
      id: item.id, type: item.type, stored: movable.length > 0 ? fetched.stored : new Uint8Array(fetched.stored), rawLength: fetched.loc.rawLength,
      label: `${item.what()} (${BLOB_TYPE_NAMES[item.type]} ${hex} in ${fetched.pack})`, ...(item.base !== undefined ? { base: item.base } : {}),
    });
  }, opts);
  return { bases, transfer: [...transfer] };
}

/** A delta chunk's base for a worker's decode: its plaintext, or as stored (decoded there), or the error stopping it. */
export type WorkerBase = DeltaBase | StoredBase | Error;

/**
 * The bases of the delta chunks among `locs`, for a decode on the codec pool: a base `shared`
 * by many deltas (a compression dictionary) read and decoded here once, through `cache`
 * (readDeltaBases); every other one fetched as stored (fetchDeltaBases) for the worker to
 * decode, so this thread only reads. `transfer` goes with the request that carries the bases.
 */
export async function basesForWorker(
  repo: Repository, locs: Array<{ base?: Buffer }>, what: (id: Buffer) => string, shared: (baseId: Buffer) => boolean, opts: BatchOptions & { cache?: BaseCache } = {},
): Promise<{ baseOf: (loc: { base?: Buffer }) => WorkerBase | undefined; transfer: ArrayBuffer[] }> {
  const here: Buffer[] = [];
  const there: Buffer[] = [];
  for (const { base } of locs) if (base !== undefined) (shared(base) ? here : there).push(base);
  const [decoded, stored] = await Promise.all([
    here.length === 0 ? new Map<string, DeltaBase | Error>() : readDeltaBases(repo, here, what, opts),
    there.length === 0 ? { bases: new Map<string, StoredBase | Error>(), transfer: [] } : fetchDeltaBases(repo, there, what, opts),
  ]);
  return {
    baseOf: (loc) => (loc.base === undefined ? undefined : decoded.get(loc.base.toString('hex')) ?? stored.bases.get(loc.base.toString('hex'))),
    transfer: stored.transfer,
  };
}

/** How many of `locs` are deltas against each base (by id, hex): what basesForWorker's `shared` is decided on. */
/**
 * How many deltas use each base. Most bases serve one delta (an incremental's parent chunks):
 * they are held in a compact id set, and only bases seen again get a counter (compression
 * dictionaries, few), so counting the bases of a whole repository (verify) stays small.
 */
export class BaseUses {
  readonly #once = new IdSet();
  readonly #repeated = new Map<string, number>();

  add(base: Buffer): void {
    if (this.#once.add(base)) return;
    const hex = base.toString('hex');
    this.#repeated.set(hex, (this.#repeated.get(hex) ?? 1) + 1);
  }

  count(base: Buffer): number {
    return this.#repeated.get(base.toString('hex')) ?? (this.#once.has(base) ? 1 : 0);
  }
}

export function baseUses(locs: Iterable<{ base?: Buffer }>): BaseUses {
  const uses = new BaseUses();
  for (const { base } of locs) if (base !== undefined) uses.add(base);
  return uses;
}

/** The fields of a DecodeItem (codec-ops.ts) that give it `base`: none for no base or an error. */
export function baseFields(base: WorkerBase | undefined): { base?: DeltaBase; storedBase?: StoredBase } {
  if (base === undefined || base instanceof Error) return {};
  return 'stored' in base ? { storedBase: base } : { base };
}

/** For a location (index entry or pack entry): its base's plaintext, the error stopping it, or undefined for a plain blob. */
export type DeltaBaseLookup = (loc: { base?: Buffer }) => DeltaBase | Error | undefined;

/**
 * Reads the bases of the delta chunks among `locs` (as readDeltaBases) and returns their lookup.
 * Reads nothing when none of them is a delta.
 */
export async function deltaBasesOf(repo: Repository, locs: Iterable<{ base?: Buffer }>, what: (id: Buffer) => string, opts: BatchOptions & { cache?: BaseCache } = {}): Promise<DeltaBaseLookup> {
  const ids = [...locs].flatMap((l) => (l.base !== undefined ? [l.base] : []));
  const bases = ids.length === 0 ? new Map<string, DeltaBase | Error>() : await readDeltaBases(repo, ids, what, opts);
  return (loc) => (loc.base === undefined ? undefined : bases.get(loc.base.toString('hex')));
}

/** One blob, with the same checks and errors as a batch of one. */
export function readOneBlob(repo: Repository, item: BatchItem, opts: BatchOptions = {}): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    readBlobBatch(repo, [item], (_, outcome) => (outcome.plain !== undefined ? resolve(outcome.plain) : reject(outcome.error)), opts).catch(reject);
  });
}

export async function readBlobBatch<T extends BatchItem>(repo: Repository, items: T[], each: (item: T, outcome: BatchOutcome) => void, opts: BatchOptions = {}): Promise<void> {
  await fetchBlobBatch(repo, items, (item, fetched) => {
    if (fetched.stored === undefined) {
      each(item, { error: fetched.error });
      return;
    }
    let outcome: BatchOutcome;
    try {
      const { stored, loc, pack } = fetched;
      const plain = decodeBlob(repo.keys, item.type, item.id, stored, { id: item.id, maxLength: loc.rawLength, exactLength: true, trustAead: opts.trustAead },
        () => ({ what: `${item.what()} (${BLOB_TYPE_NAMES[item.type]} ${item.id.toString('hex')} in ${pack})`, context: { blob: item.id.toString('hex'), pack } }), item.base);
      outcome = { plain };
    } catch (err) {
      outcome = { error: err };
    }
    each(item, outcome);
  }, opts);
}

/** A blob's stored bytes as fetched (not decoded), with where they came from. */
export type FetchOutcome =
  | { stored: Buffer; loc: BlobLocation; pack: string; range: Buffer; error?: undefined }
  | { stored?: undefined; error: unknown };

/**
 * The grouping and ranged reads of readBlobBatch without the decoding: each item's stored bytes
 * (a view into `range`, the ranged read that fetched it, which several items may share), after
 * the index checks of its type and length. Callers that decode elsewhere (a worker) use this.
 */
export async function fetchBlobBatch<T extends BatchItem>(repo: Repository, items: T[], each: (item: T, outcome: FetchOutcome) => void, opts: BatchOptions = {}): Promise<void> {
  const gap = opts.gap ?? 16 << 10;
  const maxRead = opts.maxRead ?? 1 << 20;
  const index = opts.locate ? undefined : await repo.index();
  const locate = opts.locate ?? ((id: Buffer) => index!.get(id));
  const located: Array<{ item: T; loc: BlobLocation }> = [];
  for (const item of items) {
    const loc = locate(item.id);
    const hex = item.id.toString('hex');
    if (!loc) {
      each(item, { error: new DamageError('missing-blob', `${item.what()} is missing from the repository (blob ${hex} is in no index)`, { context: { blob: hex } }) });
    } else if (loc.type !== item.type || (item.length !== undefined && loc.rawLength !== item.length)) {
      each(item, {
        error: new DamageError('wrong-blob', `${item.what()} is indexed as a ${BLOB_TYPE_NAMES[loc.type] ?? `blob of type ${loc.type}`} of ${loc.rawLength} bytes; expected a ${BLOB_TYPE_NAMES[item.type]}${item.length === undefined ? '' : ` of ${item.length} bytes`}`, {
          context: { blob: hex, pack: packName(loc.packId) },
        }),
      });
    } else {
      located.push({ item, loc });
    }
  }
  located.sort((a, b) => Buffer.compare(a.loc.packId, b.loc.packId) || a.loc.offset - b.loc.offset);
  const runs: Array<typeof located> = [];
  for (const x of located) {
    const run = runs.at(-1);
    const last = run?.at(-1);
    if (run && last && last.loc.packId.equals(x.loc.packId) && x.loc.offset - (last.loc.offset + last.loc.length) <= gap
      && x.loc.offset + x.loc.length - run[0].loc.offset <= maxRead) run.push(x);
    else runs.push([x]);
  }
  await mapLimit(runs, opts.concurrency ?? 8, async (run) => {
    const pack = packName(run[0].loc.packId);
    const from = run[0].loc.offset;
    const to = Math.max(...run.map((x) => x.loc.offset + x.loc.length));
    let data: Buffer;
    try {
      data = await repo.store.read(pack, { offset: from, length: to - from });
    } catch (err) {
      for (const x of run) each(x.item, { error: err });
      return;
    }
    opts.onFetch?.(data.length);
    for (const { item, loc } of run) each(item, { stored: data.subarray(loc.offset - from, loc.offset - from + loc.length), loc, pack, range: data });
  });
}
