/**
 * The in-memory blob index: blob id → (pack, offset, length, raw length, type).
 *
 * Held compactly in typed arrays with open addressing (about 70 bytes per blob, against several
 * hundred for a Map of objects), because it holds every blob of the repository: 16 M chunks
 * (1 TiB of unique 64 KiB chunks) take ~1.1 GiB; 1 M chunks (64 GiB unique) ~70 MiB.
 * Ids are uniformly random (SHA-256/HMAC), so their first 32 bits are a perfect hash.
 */
import { BlobType, type BlobTypeValue } from './codec.ts';
import type { IndexedPackView } from './index-file.ts';
import type { PackEntry } from './pack.ts';

/** Bytes of an index entry (pack.ts): type, id, offset, length, raw length; a delta chunk's adds its base id. */
const ENTRY_BYTES = 1 + 32 + 4 + 4 + 4;
const DELTA_ENTRY_BYTES = ENTRY_BYTES + 32;

export interface BlobLocation {
  packId: Buffer;
  type: BlobTypeValue;
  offset: number;
  length: number;
  rawLength: number;
  /** Delta chunks only: the plain chunk the delta decodes against. */
  base?: Buffer;
}

/** Where a pack's entry is, as the index holds it. */
export function entryLocation(packId: Buffer, e: PackEntry): BlobLocation {
  return { packId, type: e.type, offset: e.offset, length: e.length, rawLength: e.rawLength, ...(e.base !== undefined ? { base: e.base } : {}) };
}

const MIN_CAPACITY = 1024;

export class BlobIndex {
  #cap = 0;
  #mask = 0;
  #count = 0;
  #ids = new Uint32Array(0); // 8 words per slot
  #pack = new Uint32Array(0); // pack number + 1; 0 = empty slot
  #off = new Uint32Array(0);
  #len = new Uint32Array(0);
  #raw = new Uint32Array(0);
  #type = new Uint8Array(0);
  // Delta chunks' base ids, few against all blobs: a slot's number + 1 into #bases (8 words
  // each), 0 for none. Allocated with the first delta.
  #baseRef: Uint32Array<ArrayBuffer> | undefined;
  #bases = new Uint32Array(0);
  #baseCount = 0;
  readonly #packIds: Buffer[] = [];
  readonly #packNumbers = new Map<string, number>();

  constructor(capacity = MIN_CAPACITY) {
    this.#allocate(nextPow2(Math.max(MIN_CAPACITY, capacity)));
  }

  get size(): number {
    return this.#count;
  }

  get packCount(): number {
    return this.#packIds.length;
  }

  #allocate(cap: number): void {
    this.#cap = cap;
    this.#mask = cap - 1;
    this.#ids = new Uint32Array(cap * 8);
    this.#pack = new Uint32Array(cap);
    this.#off = new Uint32Array(cap);
    this.#len = new Uint32Array(cap);
    this.#raw = new Uint32Array(cap);
    this.#type = new Uint8Array(cap);
    this.#baseRef = undefined;
  }

  #baseAt(slot: number): Buffer | undefined {
    const ref = this.#baseRef?.[slot] ?? 0;
    if (ref === 0) return undefined;
    const id = Buffer.allocUnsafe(32);
    for (let w = 0; w < 8; w++) id.writeUInt32LE(this.#bases[(ref - 1) * 8 + w], w * 4);
    return id;
  }

  #setBase(slot: number, base: Buffer | undefined): void {
    if (base === undefined) {
      if (this.#baseRef) this.#baseRef[slot] = 0;
      return;
    }
    this.#setBaseAt(slot, base, 0);
  }

  /** Records the base id at `o` in `b` for `slot`. */
  #setBaseAt(slot: number, b: Uint8Array, o: number): void {
    this.#baseRef ??= new Uint32Array(this.#cap);
    if ((this.#baseCount + 1) * 8 > this.#bases.length) {
      const grown = new Uint32Array(Math.max(8 * 64, this.#bases.length * 2));
      grown.set(this.#bases);
      this.#bases = grown;
    }
    for (let w = 0; w < 8; w++) this.#bases[this.#baseCount * 8 + w] = readU32(b, o + w * 4);
    this.#baseRef[slot] = ++this.#baseCount;
  }

  #lastPack: Buffer | undefined;
  #lastPackNumber = 0;

  #packNumber(packId: Buffer): number {
    // Entries arrive pack by pack: skip the hex conversion and map lookup for the same pack.
    if (this.#lastPack !== undefined && (packId === this.#lastPack || packId.equals(this.#lastPack))) return this.#lastPackNumber;
    const hex = packId.toString('hex');
    let n = this.#packNumbers.get(hex);
    if (n === undefined) {
      n = this.#packIds.length;
      this.#packIds.push(Buffer.from(packId));
      this.#packNumbers.set(hex, n);
    }
    this.#lastPack = this.#packIds[n];
    this.#lastPackNumber = n;
    return n;
  }

  /** Slot holding `id`, or the empty slot where it would go (as -(slot+1)). */
  #find(id: Uint8Array): number {
    return this.#findAt(id, 0);
  }

  /** #find for the id at `o` in `b` (read in place: loading the index finds every id once). */
  #findAt(b: Uint8Array, o: number): number {
    const w0 = readU32(b, o);
    let slot = w0 & this.#mask;
    const ids = this.#ids;
    for (;;) {
      if (this.#pack[slot] === 0) return -(slot + 1);
      const x = slot * 8;
      if (ids[x] === w0 && ids[x + 1] === readU32(b, o + 4) && ids[x + 2] === readU32(b, o + 8) && ids[x + 3] === readU32(b, o + 12)
        && ids[x + 4] === readU32(b, o + 16) && ids[x + 5] === readU32(b, o + 20) && ids[x + 6] === readU32(b, o + 24) && ids[x + 7] === readU32(b, o + 28)) {
        return slot;
      }
      slot = (slot + 1) & this.#mask;
    }
  }

  has(id: Uint8Array): boolean {
    return this.#find(id) >= 0;
  }

  get(id: Uint8Array): BlobLocation | undefined {
    const s = this.#find(id);
    return s < 0 ? undefined : this.locationAt(s);
  }

  // Slot-level access, for passes over many blobs that keep slot numbers (4 bytes) instead of
  // ids or location objects (verify). A slot number stays valid until the next add.

  /** The slot holding `id`, or -1. */
  slotOf(id: Uint8Array): number {
    const s = this.#find(id);
    return s < 0 ? -1 : s;
  }

  /** The location held in `slot` (a slot from slotOf). */
  locationAt(slot: number): BlobLocation {
    const base = this.#baseAt(slot);
    return {
      packId: this.#packIds[this.#pack[slot] - 1],
      type: this.#type[slot] as BlobTypeValue,
      offset: this.#off[slot], length: this.#len[slot], rawLength: this.#raw[slot],
      ...(base !== undefined ? { base } : {}),
    };
  }

  /** The id held in `slot`. */
  idAt(slot: number): Buffer {
    const id = Buffer.allocUnsafe(32);
    for (let w = 0; w < 8; w++) id.writeUInt32LE(this.#ids[slot * 8 + w], w * 4);
    return id;
  }

  /** The number (0 … packCount-1, in order of first appearance) of the pack of `slot`. */
  packNumberAt(slot: number): number {
    return this.#pack[slot] - 1;
  }

  /** The base id of the delta chunk in `slot`, or undefined for any other blob. */
  baseIdAt(slot: number): Buffer | undefined {
    return this.#baseAt(slot);
  }

  /** Adds a location; when the id is already present the first location is kept unless `replace`. */
  add(id: Uint8Array, loc: BlobLocation, replace = false): void {
    const slot = this.#slotFor(id, 0, replace);
    if (slot < 0) return;
    this.#fill(slot, this.#packNumber(loc.packId) + 1, loc.offset, loc.length, loc.rawLength, loc.type);
    this.#setBase(slot, loc.base);
  }

  /**
   * The slot to fill for the id at `o` in `b`: a new one (the id written and counted), the one
   * holding it when `replace`, else -1.
   */
  #slotFor(b: Uint8Array, o: number, replace: boolean): number {
    if ((this.#count + 1) * 10 > this.#cap * 7) this.#grow();
    const s = this.#findAt(b, o);
    if (s >= 0) return replace ? s : -1;
    const slot = -s - 1;
    this.#count++;
    for (let w = 0; w < 8; w++) this.#ids[slot * 8 + w] = readU32(b, o + w * 4);
    return slot;
  }

  /** `pack`: the pack's number + 1. */
  #fill(slot: number, pack: number, offset: number, length: number, rawLength: number, type: number): void {
    this.#pack[slot] = pack;
    this.#off[slot] = offset;
    this.#len[slot] = length;
    this.#raw[slot] = rawLength;
    this.#type[slot] = type;
  }

  /**
   * Adds the entries of a pack as they lie in an index file (index-file.ts IndexedPackView,
   * already checked), read in place: no object per entry. The first location of an id is kept.
   */
  addPackEntries(view: IndexedPackView): void {
    const { plain, count } = view;
    const pack = this.#packNumber(view.packId) + 1;
    for (let j = 0, o = view.at; j < count; j++) {
      const type = plain[o];
      const next = o + (type === BlobType.deltaChunk ? DELTA_ENTRY_BYTES : ENTRY_BYTES);
      const slot = this.#slotFor(plain, o + 1, false);
      if (slot >= 0) {
        this.#fill(slot, pack, readU32(plain, o + 33), readU32(plain, o + 37), readU32(plain, o + 41), type);
        if (type === BlobType.deltaChunk) this.#setBaseAt(slot, plain, o + ENTRY_BYTES);
        else if (this.#baseRef !== undefined) this.#baseRef[slot] = 0;
      }
      o = next;
    }
  }

  #grow(): void {
    const old = { cap: this.#cap, ids: this.#ids, pack: this.#pack, off: this.#off, len: this.#len, raw: this.#raw, type: this.#type, baseRef: this.#baseRef };
    this.#allocate(this.#cap * 2);
    const id = Buffer.allocUnsafe(32);
    for (let s = 0; s < old.cap; s++) {
      if (old.pack[s] === 0) continue;
      for (let w = 0; w < 8; w++) id.writeUInt32LE(old.ids[s * 8 + w], w * 4);
      const slot = -this.#find(id) - 1;
      this.#ids.set(old.ids.subarray(s * 8, s * 8 + 8), slot * 8);
      this.#pack[slot] = old.pack[s];
      this.#off[slot] = old.off[s];
      this.#len[slot] = old.len[s];
      this.#raw[slot] = old.raw[s];
      this.#type[slot] = old.type[s];
      if (old.baseRef !== undefined && old.baseRef[s] !== 0) (this.#baseRef ??= new Uint32Array(this.#cap))[slot] = old.baseRef[s];
    }
  }

  /** Every entry, in no particular order. */
  *entries(): Iterable<[Buffer, BlobLocation]> {
    for (let s = 0; s < this.#cap; s++) {
      if (this.#pack[s] === 0) continue;
      const id = Buffer.allocUnsafe(32);
      for (let w = 0; w < 8; w++) id.writeUInt32LE(this.#ids[s * 8 + w], w * 4);
      const base = this.#baseAt(s);
      yield [id, {
        packId: this.#packIds[this.#pack[s] - 1], type: this.#type[s] as BlobTypeValue,
        offset: this.#off[s], length: this.#len[s], rawLength: this.#raw[s],
        ...(base !== undefined ? { base } : {}),
      }];
    }
  }

  /** Every delta chunk's (id, base id): few, so garbage collection can keep bases alive. */
  *deltaBases(): Iterable<[Buffer, Buffer]> {
    if (this.#baseRef === undefined) return;
    for (let s = 0; s < this.#cap; s++) {
      if (this.#pack[s] === 0 || this.#baseRef[s] === 0) continue;
      const id = Buffer.allocUnsafe(32);
      for (let w = 0; w < 8; w++) id.writeUInt32LE(this.#ids[s * 8 + w], w * 4);
      yield [id, this.#baseAt(s)!];
    }
  }

  packIds(): Buffer[] {
    return [...this.#packIds];
  }

  /**
   * The index as its arrays, for the local index cache (index-cache.ts): views of this index's
   * own arrays, valid until the next add.
   */
  state(): BlobIndexState {
    return {
      capacity: this.#cap, count: this.#count, packIds: this.#packIds,
      ids: this.#ids, pack: this.#pack, offset: this.#off, length: this.#len, rawLength: this.#raw, type: this.#type,
      ...(this.#baseRef !== undefined ? { baseRef: this.#baseRef } : {}), bases: this.#bases.subarray(0, this.#baseCount * 8),
    };
  }

  /**
   * An index made of the arrays `state()` gave (it takes them; the caller must not change them).
   * Checks that they fit together, so a cache written by a buggy or other version of this code
   * is refused rather than misread; the bytes themselves the cache authenticates.
   */
  static fromState(s: BlobIndexState): BlobIndex {
    const cap = s.capacity;
    const fits = Number.isInteger(cap) && cap >= MIN_CAPACITY && nextPow2(cap) === cap
      && s.ids.length === cap * 8 && s.pack.length === cap && s.offset.length === cap && s.length.length === cap
      && s.rawLength.length === cap && s.type.length === cap && (s.baseRef === undefined || s.baseRef.length === cap)
      && s.bases.length % 8 === 0 && Number.isInteger(s.count) && s.count >= 0 && s.count * 10 <= cap * 7;
    if (!fits) throw new Error('blob index state: arrays do not fit its capacity');
    let count = 0;
    const packs = s.packIds.length;
    const baseCount = s.bases.length / 8;
    for (let slot = 0; slot < cap; slot++) {
      const p = s.pack[slot];
      if (p === 0) continue;
      count++;
      if (p > packs || (s.baseRef !== undefined && s.baseRef[slot] > baseCount)) throw new Error(`blob index state: slot ${slot} refers past its packs or bases`);
    }
    if (count !== s.count) throw new Error(`blob index state: ${count} slots in use, ${s.count} counted`);
    const index = new BlobIndex(MIN_CAPACITY);
    index.#cap = cap;
    index.#mask = cap - 1;
    index.#count = count;
    index.#ids = s.ids;
    index.#pack = s.pack;
    index.#off = s.offset;
    index.#len = s.length;
    index.#raw = s.rawLength;
    index.#type = s.type;
    index.#baseRef = s.baseRef;
    index.#bases = s.bases;
    index.#baseCount = baseCount;
    for (const id of s.packIds) {
      index.#packNumbers.set(id.toString('hex'), index.#packIds.length);
      index.#packIds.push(id);
    }
    return index;
  }
}

/** A blob index's arrays (BlobIndex.state); slot layout as in BlobIndex. */
export interface BlobIndexState {
  capacity: number;
  count: number;
  packIds: Buffer[];
  ids: Uint32Array<ArrayBuffer>;
  pack: Uint32Array<ArrayBuffer>;
  offset: Uint32Array<ArrayBuffer>;
  length: Uint32Array<ArrayBuffer>;
  rawLength: Uint32Array<ArrayBuffer>;
  type: Uint8Array<ArrayBuffer>;
  baseRef?: Uint32Array<ArrayBuffer>;
  /** Base ids in use: 8 words each. */
  bases: Uint32Array<ArrayBuffer>;
}

function readU32(b: Uint8Array, o: number): number {
  return (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;
}

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}
