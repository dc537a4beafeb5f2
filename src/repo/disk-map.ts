/**
 * The image index of one disk ("disk map"): where every byte of the disk lives.
 *
 * The disk is cut into slots of `chunkSize` bytes at fixed offsets (slot i = bytes
 * [i·chunkSize, (i+1)·chunkSize), the last one shorter when the size is not a multiple). Each
 * slot holds the 32-byte id of its chunk, or 32 zero bytes for a hole (unallocated or all zero).
 * Slots are grouped into pieces of `pieceSlots`; each piece is stored as a content-addressed
 * blob (type indexPiece), so an unchanged part of a disk map costs nothing in the next snapshot,
 * and all-hole pieces of every disk are one blob. The manifest lists the piece ids.
 */
import { createHash } from 'node:crypto';
import { DamageError } from '../util/errors.ts';
import { BlobType, ZERO_ID, computeId, encodeBlob } from './codec.ts';
import type { DiskRecord } from './manifest.ts';
import type { PackWriter } from './pack-writer.ts';
import type { Repository } from './repository.ts';

export function slotCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

export function slotLength(size: number, chunkSize: number, slot: number): number {
  return Math.min(chunkSize, size - slot * chunkSize);
}

/** Builds a disk map as slots are filled in any order; pieces are stored as they complete. */
export class DiskMapWriter {
  readonly size: number;
  readonly chunkSize: number;
  readonly pieceSlots: number;
  readonly #slots: number;
  readonly #pieces: string[];
  readonly #open = new Map<number, { buf: Buffer; filled: number }>();
  readonly #repo: Repository;
  readonly #writer: PackWriter;
  readonly #stores: Promise<void>[] = [];
  dataChunks = 0;
  dataBytes = 0;

  constructor(repo: Repository, writer: PackWriter, size: number, chunkSize: number, pieceSlots: number) {
    this.#repo = repo;
    this.#writer = writer;
    this.size = size;
    this.chunkSize = chunkSize;
    this.pieceSlots = pieceSlots;
    this.#slots = slotCount(size, chunkSize);
    this.#pieces = new Array<string>(Math.ceil(this.#slots / pieceSlots));
  }

  #pieceLength(p: number): number {
    return Math.min(this.pieceSlots, this.#slots - p * this.pieceSlots);
  }

  /** Sets slot `i` to chunk `id` (ZERO_ID for a hole). Each slot must be set exactly once. */
  set(i: number, id: Uint8Array): void {
    const p = Math.floor(i / this.pieceSlots);
    let piece = this.#open.get(p);
    if (!piece) {
      piece = { buf: Buffer.alloc(this.#pieceLength(p) * 32), filled: 0 };
      this.#open.set(p, piece);
    }
    piece.buf.set(id, (i - p * this.pieceSlots) * 32);
    piece.filled++;
    if (!ZERO_ID.equals(id)) {
      this.dataChunks++;
      this.dataBytes += slotLength(this.size, this.chunkSize, i);
    }
    if (piece.filled === this.#pieceLength(p)) {
      this.#open.delete(p);
      const stored = this.#storePiece(p, piece.buf);
      // Failures surface in finish(); until then they must not count as unhandled.
      stored.catch(() => undefined);
      this.#stores.push(stored);
    }
  }

  async #storePiece(p: number, plain: Buffer): Promise<void> {
    const id = computeId(this.#repo.keys, plain);
    this.#pieces[p] = id.toString('hex');
    const index = await this.#repo.index();
    if ((index.has(id) && !this.#repo.avoids(id)) || !this.#writer.claim(id)) return;
    await this.#writer.add(BlobType.indexPiece, id, encodeBlob(this.#repo.keys, BlobType.indexPiece, id, plain), plain.length);
  }

  /** Waits for every piece; the caller then commits the pack writer's index. */
  async finish(): Promise<Pick<DiskRecord, 'size' | 'chunkSize' | 'pieceSlots' | 'pieces' | 'digest' | 'dataBytes' | 'dataChunks'>> {
    if (this.#open.size > 0) throw new Error(`disk map incomplete: ${this.#open.size} pieces not filled`);
    await Promise.all(this.#stores);
    for (let p = 0; p < this.#pieces.length; p++) if (this.#pieces[p] === undefined) throw new Error(`disk map piece ${p} was never filled`);
    return {
      size: this.size, chunkSize: this.chunkSize, pieceSlots: this.pieceSlots, pieces: this.#pieces,
      digest: diskMapDigest(this.#pieces), dataBytes: this.dataBytes, dataChunks: this.dataChunks,
    };
  }
}

export function diskMapDigest(pieces: string[]): string {
  const h = createHash('sha256');
  for (const p of pieces) h.update(Buffer.from(p, 'hex'));
  return h.digest('hex');
}

/** Reads a stored disk map lazily, piece by piece, with a small cache. */
export class DiskMapReader {
  readonly disk: DiskRecord;
  readonly snapshot: string;
  readonly #repo: Repository;
  readonly #cache = new Map<number, Promise<Buffer>>();
  readonly #cacheSize: number;
  readonly slots: number;

  constructor(repo: Repository, snapshot: string, disk: DiskRecord, cacheSize = 4) {
    this.#repo = repo;
    this.snapshot = snapshot;
    this.disk = disk;
    this.#cacheSize = cacheSize;
    this.slots = slotCount(disk.size, disk.chunkSize);
    if (diskMapDigest(disk.pieces) !== disk.digest) {
      throw new DamageError('damaged-manifest', `disk ${disk.name} of snapshot ${snapshot}: the list of index pieces does not match its digest`, { context: { snapshot, disk: disk.name } });
    }
  }

  pieceCount(): number {
    return this.disk.pieces.length;
  }

  /** The slot ids of piece `p` (32 bytes per slot). */
  piece(p: number): Promise<Buffer> {
    let hit = this.#cache.get(p);
    if (hit) {
      this.#cache.delete(p);
      this.#cache.set(p, hit);
      return hit;
    }
    const expected = Math.min(this.disk.pieceSlots, this.slots - p * this.disk.pieceSlots) * 32;
    const id = Buffer.from(this.disk.pieces[p], 'hex');
    hit = this.#repo.readBlob(id, BlobType.indexPiece, () => `index piece ${p} of disk ${this.disk.name} in snapshot ${this.snapshot}`).then((plain) => {
      if (plain.length !== expected) {
        throw new DamageError('damaged-index-piece', `index piece ${p} of disk ${this.disk.name} in snapshot ${this.snapshot} has ${plain.length} bytes, expected ${expected}`, { context: { snapshot: this.snapshot, disk: this.disk.name, piece: p } });
      }
      return plain;
    });
    hit.catch(() => this.#cache.delete(p));
    this.#cache.set(p, hit);
    while (this.#cache.size > this.#cacheSize) this.#cache.delete(this.#cache.keys().next().value!);
    return hit;
  }

  async slot(i: number): Promise<Buffer> {
    const p = Math.floor(i / this.disk.pieceSlots);
    const piece = await this.piece(p);
    const o = (i - p * this.disk.pieceSlots) * 32;
    return piece.subarray(o, o + 32);
  }
}
