/**
 * Collects new blobs into packs, uploads sealed packs (a bounded number at once), and records
 * them in index files. Write ordering (crash safety): a pack is durable before an index file
 * names it; an index file is durable before `commitIndex` returns, and callers commit a manifest
 * only after that. A crash at any point leaves only unreferenced packs or index entries, which
 * garbage collection removes; never a reference to something missing.
 *
 * Disk-map blobs (index pieces and nodes) go into packs of their own, apart from chunks (restic
 * keeps tree and data blobs apart the same way): a disk's map then lies in a few contiguous
 * ranges that a reader fetches with a few ranged reads, instead of one read per small blob
 * scattered between megabytes of chunks.
 */
import type { Repository } from './repository.ts';
import { type BlobTypeValue, isChunkType } from './codec.ts';
import type { IndexedPack } from './index-file.ts';
import { entryLocation } from './blob-index.ts';
import { MAX_PACK_SIZE, PackBuilder } from './pack.ts';
import { releaseBuffer } from '../util/bytes.ts';

export interface PackWriterStats {
  packs: number;
  blobs: number;
  /** Stored bytes of packs + index files written. */
  bytes: number;
}

export class PackWriter {
  readonly #repo: Repository;
  readonly #maxUploads: number;
  #current: PackBuilder;
  /** Pack under construction for disk-map blobs (pieces, nodes); built lazily. */
  #currentMap: PackBuilder | undefined;
  readonly #pendingIds = new Set<string>();
  readonly #uploads = new Set<Promise<void>>();
  #uncommitted: IndexedPack[] = [];
  /** The buffer of the last pack stored, for the next pack (#newBuilder). */
  #spare: Buffer | undefined;
  #failure: unknown;
  readonly stats: PackWriterStats = { packs: 0, blobs: 0, bytes: 0 };

  constructor(repo: Repository, opts: { maxUploads?: number } = {}) {
    this.#repo = repo;
    this.#maxUploads = opts.maxUploads ?? repo.store.parallelCreates ?? 2;
    this.#current = this.#newBuilder();
  }

  /**
   * Room for a full pack plus the blob that overflows it and the header: the last stored pack's
   * buffer when there is one, else allocated once. Reusing it keeps the main thread from turning
   * over a fresh 8 MiB ArrayBuffer per pack, which V8 counts as new external memory and answers
   * with full collections: measured on the 4 GiB corpus VM backup, with the batch arena
   * (codec-pool.ts), 131 → ~30 full collections of the main thread's heap. The number of
   * pack buffers alive at once does not grow: the spare is a finished upload's.
   */
  #newBuilder(): PackBuilder {
    const target = Math.min(this.#repo.config.packSize, MAX_PACK_SIZE);
    const spare = this.#spare;
    this.#spare = undefined;
    return new PackBuilder(target + Math.min(target, this.#repo.config.chunkSize + (256 << 10)), spare);
  }

  /**
   * A pack's buffer once its upload ended: after a successful upload the spare for the next
   * pack, or freed. After a failed one it is left to the garbage collector: a backend may not be
   * done with it (an aborted request can still be sending its body), and neither reusing nor
   * freeing it is safe before nothing refers to it.
   */
  #recycle(data: Buffer, stored: boolean): void {
    if (!stored) return;
    const ab = data.buffer;
    if (this.#spare === undefined && ab instanceof ArrayBuffer && !ab.detached) this.#spare = Buffer.from(ab);
    else releaseBuffer(data, 'arraybuffer');
  }

  /** True when the blob is written or being written by this writer (not yet in the index). */
  isPending(id: Buffer): boolean {
    return this.#pendingIds.has(id.toString('hex'));
  }

  /** Claims an id for writing; returns false when it is already claimed. */
  claim(id: Buffer): boolean {
    const hex = id.toString('hex');
    if (this.#pendingIds.has(hex)) return false;
    this.#pendingIds.add(hex);
    return true;
  }

  /**
   * Adds an encoded blob (copied: the caller may free or reuse `encoded` once this returns).
   * `base`: for a delta chunk, the id of its base, which must be a plain chunk in the index.
   */
  async add(type: BlobTypeValue, id: Buffer, encoded: Buffer, rawLength: number, base?: Buffer): Promise<void> {
    if (this.#failure) throw this.#failure;
    this.#pendingIds.add(id.toString('hex'));
    const target = Math.min(this.#repo.config.packSize, MAX_PACK_SIZE);
    this.stats.blobs++;
    if (isChunkType(type)) {
      this.#current.add(type, id, encoded, rawLength, base);
      if (this.#current.size >= target) await this.#sealCurrent();
    } else {
      this.#currentMap ??= new PackBuilder(64 << 10);
      this.#currentMap.add(type, id, encoded, rawLength);
      if (this.#currentMap.size >= target) await this.#sealMap();
    }
  }

  async #sealCurrent(): Promise<void> {
    if (this.#current.count === 0) return;
    const builder = this.#current;
    this.#current = this.#newBuilder();
    await this.#upload(builder);
  }

  async #sealMap(): Promise<void> {
    const builder = this.#currentMap;
    this.#currentMap = undefined;
    if (builder && builder.count > 0) await this.#upload(builder);
  }

  async #upload(builder: PackBuilder): Promise<void> {
    while (this.#uploads.size >= this.#maxUploads) await Promise.race(this.#uploads);
    if (this.#failure) throw this.#failure;
    const sealed = builder.seal(this.#repo.keys);
    let stored = false;
    const upload = (async () => {
      await this.#repo.store.create(sealed.name, sealed.data);
      stored = true;
      const index = await this.#repo.index();
      for (const e of sealed.entries) {
        // Replace: a fresh copy of a blob recorded as damaged must win over the damaged one.
        index.add(e.id, entryLocation(sealed.id, e), true);
      }
      this.#uncommitted.push({ packId: sealed.id, entries: sealed.entries });
      this.stats.packs++;
      this.stats.bytes += sealed.data.length;
    })().catch((err) => {
      this.#failure ??= err;
    }).finally(() => this.#recycle(sealed.data, stored));
    const tracked = upload.finally(() => this.#uploads.delete(tracked));
    this.#uploads.add(tracked);
  }

  /** Seals the open pack and waits for every upload. */
  async flush(): Promise<void> {
    await this.#sealCurrent();
    await this.#sealMap();
    await Promise.all(this.#uploads);
    if (this.#spare !== undefined) releaseBuffer(this.#spare);
    this.#spare = undefined;
    if (this.#failure) throw this.#failure;
  }

  /** Flushes, then writes one index file for all packs uploaded since the last commit. */
  async commitIndex(): Promise<void> {
    await this.flush();
    if (this.#uncommitted.length === 0) return;
    const packs = this.#uncommitted;
    this.#uncommitted = [];
    const { size } = await this.#repo.writeIndexFile(packs);
    this.stats.bytes += size;
  }

  /** Packs uploaded but not yet named by an index file (to bound rework after a crash). */
  get uncommittedPacks(): number {
    return this.#uncommitted.length;
  }
}
