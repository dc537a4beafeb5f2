/**
 * The image index of one disk ("disk map"): where every byte of the disk lives.
 *
 * The disk is cut into slots of `chunkSize` bytes at fixed offsets (slot i = bytes
 * [i·chunkSize, (i+1)·chunkSize), the last one shorter when the size is not a multiple). Each
 * slot holds the 32-byte id of its chunk, or 32 zero bytes for a hole (unallocated or all zero).
 * Slots are grouped into pieces of `pieceSlots`; each piece is stored as a content-addressed
 * blob (type indexPiece), so an unchanged part of a disk map costs nothing in the next snapshot,
 * and all-hole pieces of every disk are one blob.
 *
 * The list of piece ids is itself cut into nodes of `nodeIds` ids, each a content-addressed blob
 * (type mapNode), and the manifest lists the node ids (manifest version 2; version 1 listed the
 * piece ids themselves). Two levels keep what a snapshot adds proportional to what changed at
 * both ends: small pieces (2 KiB: 64 slots, 8 MiB of disk) cost little per scattered write, and
 * the manifest of a 1 TiB disk lists 128 node ids instead of 8192 piece ids.
 */
import { createHash } from 'node:crypto';
import { DamageError } from '../util/errors.ts';
import { isAllZero } from '../util/bytes.ts';
import { type BatchOptions, readBlobBatch, readOneBlob } from './blob-batch.ts';
import { BlobType, ZERO_ID, computeId, encodeBlob } from './codec.ts';
import type { DiskRecord } from './manifest.ts';
import type { PackWriter } from './pack-writer.ts';
import type { Repository } from './repository.ts';

/** Piece ids per node when the repository configuration does not say. */
export const DEFAULT_NODE_IDS = 1024;

export function slotCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

export function slotLength(size: number, chunkSize: number, slot: number): number {
  return Math.min(chunkSize, size - slot * chunkSize);
}

/**
 * Builds a disk map as slots are filled in any order; pieces are stored as they complete.
 *
 * With a parent map (an incremental), slots copied from the parent's map at the same positions
 * are set with `copyFromParent`. A piece whose every slot came that way is byte for byte the
 * parent's piece, so the parent's piece id is taken as it is: nothing is hashed, compared or
 * stored for it. That keeps an incremental's map work proportional to what changed, not to the
 * disk's size (every piece was hashed and looked up, every slot set one by one).
 */
export class DiskMapWriter {
  readonly size: number;
  readonly chunkSize: number;
  readonly pieceSlots: number;
  readonly #slots: number;
  readonly #pieces: string[];
  readonly #open = new Map<number, { buf: Buffer; filled: number; fromParent: number }>();
  readonly #repo: Repository;
  readonly #writer: PackWriter;
  readonly #parent: DiskMapReader | undefined;
  readonly #stores: Promise<void>[] = [];
  dataChunks = 0;
  dataBytes = 0;
  /** Pieces taken from the parent's map by id (diagnostics and tests). */
  reusedPieces = 0;

  /** `parent`: the map `copyFromParent` copies from; its pieces must have the same slots. */
  constructor(repo: Repository, writer: PackWriter, size: number, chunkSize: number, pieceSlots: number, parent?: DiskMapReader) {
    this.#repo = repo;
    this.#writer = writer;
    this.size = size;
    this.chunkSize = chunkSize;
    this.pieceSlots = pieceSlots;
    this.#slots = slotCount(size, chunkSize);
    this.#pieces = new Array<string>(Math.ceil(this.#slots / pieceSlots));
    if (parent !== undefined && (parent.disk.size !== size || parent.disk.chunkSize !== chunkSize)) {
      throw new Error(`bug: a parent disk map of ${parent.disk.size} bytes in chunks of ${parent.disk.chunkSize} for a map of ${size} in chunks of ${chunkSize}`);
    }
    // Pieces of another size never equal the parent's: copies then count as plain sets.
    this.#parent = parent?.disk.pieceSlots === pieceSlots ? parent : undefined;
  }

  #pieceLength(p: number): number {
    return Math.min(this.pieceSlots, this.#slots - p * this.pieceSlots);
  }

  #openPiece(p: number): { buf: Buffer; filled: number; fromParent: number } {
    let piece = this.#open.get(p);
    if (!piece) {
      piece = { buf: Buffer.alloc(this.#pieceLength(p) * 32), filled: 0, fromParent: 0 };
      this.#open.set(p, piece);
    }
    return piece;
  }

  /** Sets slot `i` to chunk `id` (ZERO_ID for a hole). Each slot must be set exactly once. */
  set(i: number, id: Uint8Array): void {
    const p = Math.floor(i / this.pieceSlots);
    const piece = this.#openPiece(p);
    piece.buf.set(id, (i - p * this.pieceSlots) * 32);
    piece.filled++;
    if (!ZERO_ID.equals(id)) {
      this.dataChunks++;
      this.dataBytes += slotLength(this.size, this.chunkSize, i);
    }
    if (piece.filled === this.#pieceLength(p)) this.#complete(p, piece);
  }

  /**
   * Sets the `ids.length / 32` slots from `first` (within one piece) to the ids the parent map
   * holds in the same slots: `ids` must be that part of the parent's piece, as `piece()` gave it.
   */
  copyFromParent(first: number, ids: Uint8Array): void {
    const count = ids.length / 32;
    const p = Math.floor(first / this.pieceSlots);
    if (!Number.isInteger(count) || count < 1 || Math.floor((first + count - 1) / this.pieceSlots) !== p) {
      throw new Error(`bug: copyFromParent of ${ids.length} bytes at slot ${first} does not stay within piece ${p}`);
    }
    const piece = this.#openPiece(p);
    piece.buf.set(ids, (first - p * this.pieceSlots) * 32);
    piece.filled += count;
    piece.fromParent += count;
    for (let k = 0; k < count; k++) {
      if (isAllZero(ids.subarray(k * 32, k * 32 + 32))) continue;
      this.dataChunks++;
      this.dataBytes += slotLength(this.size, this.chunkSize, first + k);
    }
    if (piece.filled === this.#pieceLength(p)) this.#complete(p, piece);
  }

  #complete(p: number, piece: { buf: Buffer; filled: number; fromParent: number }): void {
    this.#open.delete(p);
    const parentId = piece.fromParent === piece.filled ? this.#parent?.pieceId(p) : undefined;
    const stored = this.#storePiece(p, piece.buf, parentId);
    // Failures surface in finish(); until then they must not count as unhandled.
    stored.catch(() => undefined);
    this.#stores.push(stored);
  }

  /** `parentId`: the parent's id of this very piece, when every slot came from there. */
  async #storePiece(p: number, plain: Buffer, parentId: string | undefined): Promise<void> {
    if (parentId !== undefined) {
      // Reused like any blob: while the index has it and no pending collection condemns it.
      // Otherwise it is stored again, as any new piece.
      const raw = Buffer.from(parentId, 'hex');
      const index = await this.#repo.index();
      if (index.has(raw) && !this.#repo.avoids(raw)) {
        this.#pieces[p] = parentId;
        this.reusedPieces++;
        return;
      }
    }
    this.#pieces[p] = (await storeMapBlob(this.#repo, this.#writer, BlobType.indexPiece, plain)).toString('hex');
  }

  /** Waits for every piece; the caller then commits the pack writer's index. */
  async finish(): Promise<Pick<DiskRecord, 'size' | 'chunkSize' | 'pieceSlots' | 'nodeIds' | 'nodes' | 'digest' | 'dataBytes' | 'dataChunks'>> {
    if (this.#open.size > 0) throw new Error(`disk map incomplete: ${this.#open.size} pieces not filled`);
    await Promise.all(this.#stores);
    for (let p = 0; p < this.#pieces.length; p++) if (this.#pieces[p] === undefined) throw new Error(`disk map piece ${p} was never filled`);
    return {
      size: this.size, chunkSize: this.chunkSize, pieceSlots: this.pieceSlots,
      ...(await storeMapNodes(this.#repo, this.#writer, this.#pieces)),
      digest: diskMapDigest(this.#pieces), dataBytes: this.dataBytes, dataChunks: this.dataChunks,
    };
  }
}

/**
 * Stores a disk-map blob (piece or node) unless the repository has a usable copy or the writer
 * has it already; returns its id.
 */
export async function storeMapBlob(repo: Repository, writer: PackWriter, type: typeof BlobType.indexPiece | typeof BlobType.mapNode, plain: Buffer): Promise<Buffer> {
  const id = computeId(repo.keys, plain);
  const index = await repo.index();
  if ((index.has(id) && !repo.avoids(id)) || !writer.claim(id)) return id;
  await writer.add(type, id, encodeBlob(repo.keys, type, id, plain), plain.length);
  return id;
}

/**
 * Stores the list of piece ids as nodes of the repository's `nodeIds` ids; returns what the
 * manifest's disk record lists.
 */
export async function storeMapNodes(repo: Repository, writer: PackWriter, pieces: string[]): Promise<{ nodeIds: number; nodes: string[] }> {
  const nodeIds = repo.config.nodeIds ?? DEFAULT_NODE_IDS;
  const nodes: string[] = [];
  for (let at = 0; at < pieces.length; at += nodeIds) {
    nodes.push((await storeMapBlob(repo, writer, BlobType.mapNode, Buffer.from(pieces.slice(at, at + nodeIds).join(''), 'hex'))).toString('hex'));
  }
  return { nodeIds, nodes };
}

/**
 * Disk-map pieces per unit of bulk work (restore, sync): whole pieces, at least 1024 slots, so
 * small pieces do not make small batches.
 */
export function unitPieces(pieceSlots: number): number {
  return Math.ceil(1024 / pieceSlots);
}

export function pieceCount(disk: Pick<DiskRecord, 'size' | 'chunkSize' | 'pieceSlots'>): number {
  return Math.ceil(slotCount(disk.size, disk.chunkSize) / disk.pieceSlots);
}

const pieceLists = new WeakMap<DiskRecord, Promise<string[]>>();

/**
 * The piece ids of a disk map, in order: listed in a version-1 manifest, else read from the
 * disk's nodes (concurrently, through `read`'s options; remembered per disk record). Checks
 * every node's length and the digest over the whole list, so what comes back is exactly what
 * the backup wrote.
 */
export function pieceIds(repo: Repository, snapshot: string, disk: DiskRecord, read: BatchOptions = {}): Promise<string[]> {
  let list = pieceLists.get(disk);
  if (!list) {
    list = loadPieceIds(repo, snapshot, disk, read);
    list.catch(() => pieceLists.delete(disk));
    pieceLists.set(disk, list);
  }
  return list;
}

async function loadPieceIds(repo: Repository, snapshot: string, disk: DiskRecord, read: BatchOptions): Promise<string[]> {
  const count = pieceCount(disk);
  let pieces: string[];
  if (disk.pieces) {
    pieces = disk.pieces;
  } else {
    const nodes = disk.nodes!;
    const perNode = disk.nodeIds!;
    const parts = await Promise.all(nodes.map(async (hex, n) => {
      const what = () => `disk-map node ${n} of disk ${disk.name} in snapshot ${snapshot}`;
      return readOneBlob(repo, { id: Buffer.from(hex, 'hex'), type: BlobType.mapNode, what, length: Math.min(perNode, count - n * perNode) * 32 }, read);
    }));
    const all = Buffer.concat(parts).toString('hex');
    pieces = Array.from({ length: count }, (_, p) => all.slice(p * 64, p * 64 + 64));
  }
  if (pieces.length !== count || diskMapDigest(pieces) !== disk.digest) {
    throw new DamageError('damaged-manifest', `disk ${disk.name} of snapshot ${snapshot}: the list of index pieces does not match its digest`, { context: { snapshot, disk: disk.name } });
  }
  return pieces;
}

export function diskMapDigest(pieces: string[]): string {
  const h = createHash('sha256');
  for (const p of pieces) h.update(Buffer.from(p, 'hex'));
  return h.digest('hex');
}

/** Reads a stored disk map lazily, piece by piece, with a small cache and optional read-ahead. */
export class DiskMapReader {
  readonly disk: DiskRecord;
  readonly snapshot: string;
  readonly #repo: Repository;
  readonly #pieces: string[];
  readonly #cache = new Map<number, Promise<Buffer>>();
  readonly #cacheSize: number;
  readonly #readAhead: number;
  readonly slots: number;

  /** Opens the map (reads its nodes). `readAhead`: pieces after the one asked for to start loading. */
  static async open(repo: Repository, snapshot: string, disk: DiskRecord, options: { cacheSize?: number; readAhead?: number } = {}): Promise<DiskMapReader> {
    return new DiskMapReader(repo, snapshot, disk, await pieceIds(repo, snapshot, disk), options.cacheSize ?? 4, options.readAhead ?? 0);
  }

  private constructor(repo: Repository, snapshot: string, disk: DiskRecord, pieces: string[], cacheSize: number, readAhead: number) {
    this.#repo = repo;
    this.snapshot = snapshot;
    this.disk = disk;
    this.#pieces = pieces;
    this.#readAhead = readAhead;
    this.#cacheSize = Math.max(cacheSize, 3 * readAhead + 1);
    this.slots = slotCount(disk.size, disk.chunkSize);
  }

  pieceCount(): number {
    return this.#pieces.length;
  }

  /** Hex id of piece `p`. */
  pieceId(p: number): string {
    return this.#pieces[p];
  }

  /**
   * The slot ids of piece `p` (32 bytes per slot). A miss within `readAhead` pieces loads the
   * uncached pieces up to twice that far in one batch: pieces of one backup lie together in its
   * map packs, so a batch is a few ranged reads.
   *
   * Which piece the cache drops when full: without read-ahead (random access) the least
   * recently used; with read-ahead (a scan) the one loaded first. A scan uses pieces in about the
   * order they load, so the first loaded are behind it; "least recently used" would instead drop
   * the pieces loaded ahead and not used yet, and load them again one by one. It did: an
   * incremental backup of a 4 GiB disk loaded its parent's 512 pieces 4266 times.
   */
  piece(p: number): Promise<Buffer> {
    const hit = this.#cache.get(p);
    if (hit && this.#readAhead === 0) {
      this.#cache.delete(p);
      this.#cache.set(p, hit);
    }
    const last = Math.min(this.#pieces.length - 1, p + this.#readAhead);
    let missing = !hit;
    for (let q = p + 1; !missing && q <= last; q++) missing = !this.#cache.has(q);
    if (missing) {
      const batch: number[] = [];
      const to = Math.min(this.#pieces.length - 1, p + 2 * this.#readAhead);
      for (let q = p; q <= to; q++) if (!this.#cache.has(q)) batch.push(q);
      this.#loadBatch(batch);
    }
    // A hit may just have been dropped to make room (it was the first loaded): it is still good.
    return hit ?? this.#cache.get(p)!;
  }

  #loadBatch(batch: number[]): void {
    const waiting = new Map<number, { resolve: (b: Buffer) => void; reject: (e: unknown) => void }>();
    for (const p of batch) {
      const loaded = new Promise<Buffer>((resolve, reject) => waiting.set(p, { resolve, reject }));
      loaded.catch(() => this.#cache.delete(p));
      this.#cache.set(p, loaded);
    }
    while (this.#cache.size > this.#cacheSize) this.#cache.delete(this.#cache.keys().next().value!);
    const items = batch.map((p) => ({
      p, id: Buffer.from(this.#pieces[p], 'hex'), type: BlobType.indexPiece, what: this.#what(p),
      length: Math.min(this.disk.pieceSlots, this.slots - p * this.disk.pieceSlots) * 32,
    }));
    readBlobBatch(this.#repo, items, (item, outcome) => {
      const w = waiting.get(item.p)!;
      if (outcome.plain !== undefined) w.resolve(outcome.plain);
      else w.reject(outcome.error);
    }).catch((err) => {
      for (const w of waiting.values()) w.reject(err); // settled ones ignore it
    });
  }

  #what(p: number): () => string {
    return () => `index piece ${p} of disk ${this.disk.name} in snapshot ${this.snapshot}`;
  }

  /** The ids of slots [first, first + count) (32 bytes each), from as many pieces as they span. */
  async ids(first: number, count: number): Promise<Buffer> {
    const per = this.disk.pieceSlots;
    const from = Math.floor(first / per);
    const to = Math.floor((first + count - 1) / per);
    const parts = await Promise.all(Array.from({ length: to - from + 1 }, (_, k) => this.piece(from + k)));
    const all = parts.length === 1 ? parts[0] : Buffer.concat(parts);
    const at = (first - from * per) * 32;
    return all.subarray(at, at + count * 32);
  }

  async slot(i: number): Promise<Buffer> {
    const p = Math.floor(i / this.disk.pieceSlots);
    const piece = await this.piece(p);
    const o = (i - p * this.disk.pieceSlots) * 32;
    return piece.subarray(o, o + 32);
  }
}
