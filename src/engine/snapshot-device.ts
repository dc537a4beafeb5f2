/**
 * One disk of a snapshot as a lazy, random-access BlockDevice: the filesystem readers (src/fs)
 * run straight on the repository, so getting one file out of a 200 GB disk reads the few index
 * pieces and chunks that file (and the metadata leading to it) live in, nothing else.
 *
 * A read of [offset, offset+length) maps to disk-map slots (chunkSize bytes each). The disk map's
 * index pieces are loaded on first use and kept in a small LRU. Hole slots read as zeros without
 * touching the repository. Data chunks are located in the blob index, the missing ones of one read
 * are grouped by pack and fetched with ranged reads (adjacent blobs of a pack in one request),
 * decoded and identity-checked (the plaintext must hash to the id the disk map names), then kept
 * in a bounded LRU of decoded chunks. Concurrent reads of the same chunk share one fetch.
 *
 * Large reads (file data streamed by a restore) use cached chunks but do not fill the cache, so
 * they do not evict the filesystem metadata every lookup needs.
 */
import { BlobType, ZERO_ID, decodeBlob, isChunkType } from '../repo/codec.ts';
import type { CodecPool } from '../repo/codec-pool.ts';
import type { BlobLocation } from '../repo/blob-index.ts';
import { deltaBasesOf, newBaseCache, readOneBlob } from '../repo/blob-batch.ts';
import { pieceIds, slotCount, slotLength } from '../repo/disk-map.ts';
import type { DiskRecord, SnapshotManifest } from '../repo/manifest.ts';
import { packName } from '../repo/pack.ts';
import type { Repository } from '../repo/repository.ts';
import type { BlockDevice } from '../fs/filesystem.ts';
import { BadInputError, DamageError, NotFoundError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';

export interface SnapshotDiskOptions {
  /** Upper bound of decoded chunks kept in memory (default 32 MiB, at least 4 chunks). */
  cacheBytes?: number;
  /** Decode in the worker pool (both cores) instead of on the main thread. */
  pool?: CodecPool;
  /** Blobs of one pack closer than this are fetched in one ranged read (default 64 KiB). */
  coalesceGap?: number;
  /** Upper bound of one ranged read (default 4 MiB). */
  maxReadBytes?: number;
  /** The snapshot's manifest when the caller has already read it. */
  manifest?: SnapshotManifest;
}

export interface SnapshotDiskStats {
  /** Bytes read from the repository for this disk: index pieces + chunks (the blob index excluded). */
  bytesFetched: number;
  /** Ranged reads issued to the store. */
  storeReads: number;
  chunksDecoded: number;
  indexPiecesLoaded: number;
  /** Chunk requests served from the decoded-chunk cache or an in-flight fetch. */
  cacheHits: number;
}

export interface SnapshotDisk {
  device: BlockDevice;
  disk: DiskRecord;
  manifest: SnapshotManifest;
  stats: SnapshotDiskStats;
  close(): Promise<void>;
}

const DEFAULT_CACHE_BYTES = 32 << 20;
const PIECE_CACHE = 64;
/** Reads at least this long are file data: they do not insert what they fetch into the cache. */
const STREAMING_BYTES = 512 * 1024;
const FETCH_CONCURRENCY = 8;

/** Picks a disk of a snapshot by name; without a name, the first (image backups have one). */
export function pickDisk(manifest: SnapshotManifest, diskName?: string): DiskRecord {
  const disk = diskName === undefined ? manifest.disks[0] : manifest.disks.find((d) => d.name === diskName);
  if (!disk) {
    throw new NotFoundError('no-such-disk', diskName === undefined
      ? `snapshot ${manifest.name} has no disks`
      : `snapshot ${manifest.name} has no disk ${diskName}`, {
      hint: `its disks are: ${manifest.disks.map((d) => d.name).join(', ') || 'none'}`,
      context: { snapshot: manifest.name, disk: diskName },
    });
  }
  return disk;
}

export async function openSnapshotDisk(repo: Repository, snapshotName: string, diskName?: string, options: SnapshotDiskOptions = {}): Promise<SnapshotDisk> {
  const manifest = options.manifest?.name === snapshotName ? options.manifest : await repo.readSnapshot(snapshotName);
  const disk = pickDisk(manifest, diskName);
  await repo.index();
  const device = new SnapshotDevice(repo, manifest.name, disk, options);
  await device.openMap();
  return { device, disk, manifest, stats: device.stats, close: async () => device.close() };
}

interface Fetch {
  id: Buffer;
  hex: string;
  /** First disk offset that uses it, for error messages. */
  diskOffset: number;
  resolve: (plain: Buffer) => void;
  reject: (err: unknown) => void;
}

class SnapshotDevice implements BlockDevice {
  readonly size: number;
  readonly stats: SnapshotDiskStats = { bytesFetched: 0, storeReads: 0, chunksDecoded: 0, indexPiecesLoaded: 0, cacheHits: 0 };
  readonly #repo: Repository;
  readonly #snapshot: string;
  readonly #disk: DiskRecord;
  readonly #slots: number;
  readonly #pool: CodecPool | undefined;
  readonly #gap: number;
  readonly #maxRead: number;
  readonly #maxChunks: number;
  readonly #pieces = new Map<number, Promise<Buffer>>();
  /** Hex ids of the disk map's pieces (openMap). */
  #pieceIds: string[] = [];
  readonly #chunks = new Map<string, Buffer>();
  readonly #inFlight = new Map<string, Promise<Buffer>>();
  /** Delta bases (compression dictionaries above all) read once. */
  readonly #baseCache = newBaseCache();
  #closed = false;

  constructor(repo: Repository, snapshot: string, disk: DiskRecord, options: SnapshotDiskOptions) {
    this.#repo = repo;
    this.#snapshot = snapshot;
    this.#disk = disk;
    this.size = disk.size;
    this.#slots = slotCount(disk.size, disk.chunkSize);
    this.#pool = options.pool;
    this.#gap = options.coalesceGap ?? 64 * 1024;
    this.#maxRead = Math.max(options.maxReadBytes ?? 4 << 20, disk.chunkSize * 2);
    this.#maxChunks = Math.max(4, Math.floor((options.cacheBytes ?? DEFAULT_CACHE_BYTES) / disk.chunkSize));
  }

  /** Reads the disk map's list of pieces (its nodes), counted in the stats like every read. */
  async openMap(): Promise<void> {
    this.#pieceIds = await pieceIds(this.#repo, this.#snapshot, this.#disk, { onFetch: this.#countFetch });
  }

  readonly #countFetch = (bytes: number): void => {
    this.stats.bytesFetched += bytes;
    this.stats.storeReads++;
  };

  close(): void {
    this.#closed = true;
    this.#chunks.clear();
    this.#pieces.clear();
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new BadInputError('device_range', `disk ${this.#disk.name} of snapshot ${this.#snapshot}: read of ${length} bytes at ${offset} is outside the disk (${this.size} bytes)`, {
        context: { snapshot: this.#snapshot, disk: this.#disk.name, offset, length },
        hint: 'a pointer in the guest disk is out of range: the guest filesystem or partition table is damaged',
      });
    }
    if (this.#closed) throw new BadInputError('device_closed', `disk ${this.#disk.name} of snapshot ${this.#snapshot} is closed`);
    const out = Buffer.alloc(length);
    if (length === 0) return out;
    const { chunkSize } = this.#disk;
    const first = Math.floor(offset / chunkSize);
    const last = Math.floor((offset + length - 1) / chunkSize);
    const streaming = length >= STREAMING_BYTES;
    const used: Array<{ slot: number; id: Buffer }> = [];
    for (let slot = first; slot <= last; slot++) {
      const id = await this.#slotId(slot);
      if (!ZERO_ID.equals(id)) used.push({ slot, id });
    }
    // From here on nothing awaits until every new fetch is started: a promise registered as
    // in flight must always settle, or other readers of the same chunk would wait forever.
    const missing: Fetch[] = [];
    const copies = used.map(({ slot, id }) => ({ slot, chunk: this.#chunk(id, slot, streaming, missing) }));
    if (missing.length > 0) this.#fetch(missing);
    // Awaited in order below; a later failure must not count as unhandled meanwhile.
    for (const c of copies) c.chunk.catch(() => undefined);
    for (const { slot, chunk } of copies) {
      const plain = await chunk;
      const slotStart = slot * chunkSize;
      const from = Math.max(offset, slotStart);
      const to = Math.min(offset + length, slotStart + plain.length);
      plain.copy(out, from - offset, from - slotStart, to - slotStart);
    }
    return out;
  }

  /** The 32-byte id of slot `slot` (all zeros for a hole). */
  async #slotId(slot: number): Promise<Buffer> {
    const p = Math.floor(slot / this.#disk.pieceSlots);
    const piece = await this.#piece(p);
    const at = (slot - p * this.#disk.pieceSlots) * 32;
    return piece.subarray(at, at + 32);
  }

  #piece(p: number): Promise<Buffer> {
    const hit = this.#pieces.get(p);
    if (hit) {
      this.#pieces.delete(p);
      this.#pieces.set(p, hit);
      return hit;
    }
    const load = this.#loadPiece(p);
    load.catch(() => this.#pieces.delete(p));
    this.#pieces.set(p, load);
    while (this.#pieces.size > PIECE_CACHE) this.#pieces.delete(this.#pieces.keys().next().value as number);
    return load;
  }

  async #loadPiece(p: number): Promise<Buffer> {
    const disk = this.#disk;
    const piece = await readOneBlob(this.#repo, {
      id: Buffer.from(this.#pieceIds[p], 'hex'), type: BlobType.indexPiece,
      what: () => `index piece ${p} of disk ${disk.name} in snapshot ${this.#snapshot}`,
      length: Math.min(disk.pieceSlots, this.#slots - p * disk.pieceSlots) * 32,
    }, { onFetch: this.#countFetch });
    this.stats.indexPiecesLoaded++;
    return piece;
  }

  /** A decoded chunk from the cache, an in-flight fetch, or a new fetch queued into `missing`. */
  #chunk(id: Buffer, slot: number, streaming: boolean, missing: Fetch[]): Promise<Buffer> {
    const hex = id.toString('hex');
    const cached = this.#chunks.get(hex);
    if (cached) {
      this.stats.cacheHits++;
      this.#chunks.delete(hex);
      this.#chunks.set(hex, cached);
      return Promise.resolve(this.#checkLength(cached, slot, hex));
    }
    const pending = this.#inFlight.get(hex);
    if (pending) {
      this.stats.cacheHits++;
      return pending.then((plain) => this.#checkLength(plain, slot, hex));
    }
    let fetch!: Fetch;
    const promise = new Promise<Buffer>((resolve, reject) => {
      fetch = { id: Buffer.from(id), hex, diskOffset: slot * this.#disk.chunkSize, resolve, reject };
    });
    this.#inFlight.set(hex, promise);
    promise.then((plain) => {
      this.#inFlight.delete(hex);
      if (!streaming && !this.#closed) this.#remember(hex, plain);
    }, () => this.#inFlight.delete(hex));
    missing.push(fetch);
    return promise.then((plain) => this.#checkLength(plain, slot, hex));
  }

  #checkLength(plain: Buffer, slot: number, hex: string): Buffer {
    const want = slotLength(this.#disk.size, this.#disk.chunkSize, slot);
    if (plain.length !== want) {
      throw new DamageError('damaged-chunk', `chunk ${hex} has ${plain.length} bytes but disk ${this.#disk.name} of snapshot ${this.#snapshot} needs ${want} at offset ${slot * this.#disk.chunkSize}`, {
        context: { snapshot: this.#snapshot, disk: this.#disk.name, chunk: hex },
      });
    }
    return plain;
  }

  #remember(hex: string, plain: Buffer): void {
    // An unencrypted, uncompressed chunk is a view into its whole ranged read: copy it, so the
    // cache bound counts what is really held.
    this.#chunks.set(hex, plain.buffer.byteLength > 2 * plain.length ? Buffer.from(plain) : plain);
    while (this.#chunks.size > this.#maxChunks) this.#chunks.delete(this.#chunks.keys().next().value as string);
  }

  /** Locates, groups and fetches the chunks; every Fetch is settled, whatever fails. */
  #fetch(missing: Fetch[]): void {
    const work = async () => {
      const located: Located[] = [];
      for (const f of missing) {
        try {
          const loc = await this.#repo.locate(f.id, () => `the chunk for disk ${this.#disk.name} at offset ${f.diskOffset} of snapshot ${this.#snapshot}`);
          if (!isChunkType(loc.type)) {
            throw new DamageError('wrong-blob-type', `snapshot ${this.#snapshot}: disk ${this.#disk.name} at offset ${f.diskOffset} refers to blob ${f.hex}, which is not a data chunk`, {
              context: { snapshot: this.#snapshot, disk: this.#disk.name, chunk: f.hex },
            });
          }
          located.push({ ...f, loc });
        } catch (err) {
          f.reject(err);
        }
      }
      await mapLimit(coalesce(located, this.#gap, this.#maxRead), FETCH_CONCURRENCY, (run) => this.#fetchRun(run));
    };
    // Settling an already settled promise is a no-op: this only catches what would otherwise hang.
    work().catch((err: unknown) => missing.forEach((f) => f.reject(err)));
  }

  async #fetchRun(run: ReadRun): Promise<void> {
    const pack = packName(run.packId);
    try {
      const data = await this.#repo.store.read(pack, { offset: run.offset, length: run.length });
      this.stats.bytesFetched += data.length;
      this.stats.storeReads++;
      const stored = run.fetches.map((f) => data.subarray(f.loc.offset - run.offset, f.loc.offset - run.offset + f.loc.length));
      const decoded = await this.#decode(run.fetches, stored, pack);
      run.fetches.forEach((f, i) => {
        const r = decoded[i];
        if (r instanceof Buffer) {
          this.stats.chunksDecoded++;
          f.resolve(r);
        } else {
          f.reject(r);
        }
      });
    } catch (err) {
      for (const f of run.fetches) f.reject(err);
    }
  }

  /** Decoded plaintexts, or the error for each blob that failed its checks. */
  async #decode(fetches: Located[], stored: Buffer[], pack: string): Promise<Array<Buffer | Error>> {
    const damage = (f: Located, message: string) => new DamageError('damaged-chunk', `${message}; it holds disk ${this.#disk.name} at offset ${f.diskOffset} of snapshot ${this.#snapshot}`, {
      context: { snapshot: this.#snapshot, disk: this.#disk.name, chunk: f.hex, pack, offset: f.diskOffset },
    });
    // Delta chunks decode against their bases (plain chunks, mostly in other packs).
    const baseOf = await deltaBasesOf(this.#repo, fetches.map((f) => f.loc), (id) => `chunk ${id.toString('hex')} (the base of a delta chunk)`, {
      cache: this.#baseCache,
      onFetch: (n) => {
        this.stats.bytesFetched += n;
        this.stats.storeReads++;
      },
    });
    if (this.#pool) {
      const results = await this.#pool.decode(fetches.map((f, i) => {
        const base = baseOf(f.loc);
        return {
          type: f.loc.type, id: f.id, stored: base instanceof Error ? new Uint8Array(0) : stored[i], rawLength: f.loc.rawLength, label: `chunk ${f.hex} in ${pack}`,
          base: base instanceof Error ? undefined : base,
        };
      }));
      return results.map((r, i) => {
        const base = baseOf(fetches[i].loc);
        if (base instanceof Error) return damage(fetches[i], `delta chunk ${fetches[i].hex} in ${pack} cannot be decoded: ${base.message}`);
        return r.ok ? Buffer.from(r.plain.buffer, r.plain.byteOffset, r.plain.byteLength) : damage(fetches[i], r.message);
      });
    }
    return fetches.map((f, i) => {
      try {
        const base = baseOf(f.loc);
        if (base instanceof Error) throw new Error(`delta chunk ${f.hex} in ${pack} cannot be decoded: ${base.message}`);
        return decodeBlob(this.#repo.keys, f.loc.type, f.id, stored[i], { id: f.id, maxLength: f.loc.rawLength, exactLength: true },
          () => ({ what: `chunk ${f.hex} in ${pack}`, context: {} }), base);
      } catch (err) {
        return damage(f, err instanceof Error ? err.message : String(err));
      }
    });
  }
}

interface Located extends Fetch {
  loc: BlobLocation;
}

interface ReadRun {
  packId: Buffer;
  offset: number;
  length: number;
  fetches: Located[];
}

/** Groups blobs by pack and merges neighbours (gap ≤ `gap`, run ≤ `maxRead`) into one read. */
function coalesce(fetches: Located[], gap: number, maxRead: number): ReadRun[] {
  const sorted = [...fetches].sort((a, b) => Buffer.compare(a.loc.packId, b.loc.packId) || a.loc.offset - b.loc.offset);
  const runs: ReadRun[] = [];
  let cur: ReadRun | undefined;
  for (const f of sorted) {
    const end = f.loc.offset + f.loc.length;
    if (cur && cur.packId.equals(f.loc.packId) && f.loc.offset >= cur.offset + cur.length
      && f.loc.offset - (cur.offset + cur.length) <= gap && end - cur.offset <= maxRead) {
      cur.length = end - cur.offset;
      cur.fetches.push(f);
    } else {
      cur = { packId: f.loc.packId, offset: f.loc.offset, length: f.loc.length, fetches: [f] };
      runs.push(cur);
    }
  }
  return runs;
}
