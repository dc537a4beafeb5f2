/**
 * Compact sets and maps of 32-byte blob ids, for the repository-wide passes of garbage
 * collection, check and sync, which hold one entry per blob of the repository: typed arrays with
 * open addressing (36 bytes per id in a set, 68 in a map, against ~200 for a Set of hex strings).
 * Ids are uniformly random (SHA-256/HMAC), so their first 32 bits are a perfect hash.
 */

const MIN_CAPACITY = 1024;

function readU32(b: Uint8Array, o: number): number {
  return (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;
}

function nextPow2(n: number): number {
  let p = MIN_CAPACITY;
  while (p < n) p *= 2;
  return p;
}

/** A set of 32-byte ids; optionally each id carries a second 32-byte id (see IdMap). */
class IdTable {
  protected cap: number;
  protected mask: number;
  protected count = 0;
  protected keys: Uint32Array;
  protected used: Uint8Array;
  protected values: Uint32Array | undefined;
  readonly #withValues: boolean;

  constructor(withValues: boolean, capacity = MIN_CAPACITY) {
    this.#withValues = withValues;
    this.cap = nextPow2(capacity);
    this.mask = this.cap - 1;
    this.keys = new Uint32Array(this.cap * 8);
    this.used = new Uint8Array(this.cap);
    this.values = withValues ? new Uint32Array(this.cap * 8) : undefined;
  }

  get size(): number {
    return this.count;
  }

  /** Slot of `id`, or -(empty slot + 1) where it would go. */
  protected find(id: Uint8Array): number {
    const w0 = readU32(id, 0);
    let slot = w0 & this.mask;
    const k = this.keys;
    for (;;) {
      if (this.used[slot] === 0) return -(slot + 1);
      const b = slot * 8;
      if (k[b] === w0 && k[b + 1] === readU32(id, 4) && k[b + 2] === readU32(id, 8) && k[b + 3] === readU32(id, 12)
        && k[b + 4] === readU32(id, 16) && k[b + 5] === readU32(id, 20) && k[b + 6] === readU32(id, 24) && k[b + 7] === readU32(id, 28)) {
        return slot;
      }
      slot = (slot + 1) & this.mask;
    }
  }

  has(id: Uint8Array): boolean {
    return this.count > 0 && this.find(id) >= 0;
  }

  /** Inserts `id` (and its value); returns false when it was present already (value unchanged). */
  protected insert(id: Uint8Array, value?: Uint8Array): boolean {
    if ((this.count + 1) * 10 > this.cap * 7) this.#grow();
    const s = this.find(id);
    if (s >= 0) return false;
    const slot = -s - 1;
    this.used[slot] = 1;
    for (let w = 0; w < 8; w++) this.keys[slot * 8 + w] = readU32(id, w * 4);
    if (value && this.values) for (let w = 0; w < 8; w++) this.values[slot * 8 + w] = readU32(value, w * 4);
    this.count++;
    return true;
  }

  #grow(): void {
    const old = { cap: this.cap, keys: this.keys, used: this.used, values: this.values };
    this.cap *= 2;
    this.mask = this.cap - 1;
    this.keys = new Uint32Array(this.cap * 8);
    this.used = new Uint8Array(this.cap);
    this.values = this.#withValues ? new Uint32Array(this.cap * 8) : undefined;
    const id = Buffer.allocUnsafe(32);
    for (let s = 0; s < old.cap; s++) {
      if (old.used[s] === 0) continue;
      for (let w = 0; w < 8; w++) id.writeUInt32LE(old.keys[s * 8 + w], w * 4);
      const slot = -this.find(id) - 1;
      this.used[slot] = 1;
      this.keys.set(old.keys.subarray(s * 8, s * 8 + 8), slot * 8);
      if (this.values && old.values) this.values.set(old.values.subarray(s * 8, s * 8 + 8), slot * 8);
    }
  }

  protected idAt(slot: number, words: Uint32Array): Buffer {
    const out = Buffer.allocUnsafe(32);
    for (let w = 0; w < 8; w++) out.writeUInt32LE(words[slot * 8 + w], w * 4);
    return out;
  }
}

export class IdSet extends IdTable {
  constructor(capacity?: number) {
    super(false, capacity);
  }

  /** Adds `id`; returns true when it was new. */
  add(id: Uint8Array): boolean {
    return this.insert(id);
  }

  *[Symbol.iterator](): Iterator<Buffer> {
    for (let s = 0; s < this.cap; s++) if (this.used[s] !== 0) yield this.idAt(s, this.keys);
  }
}

/** A map from 32-byte ids to 32-byte ids (sync: source blob id → target blob id). */
export class IdMap extends IdTable {
  constructor(capacity?: number) {
    super(true, capacity);
  }

  /** Sets `id` → `value` unless `id` is present already. */
  set(id: Uint8Array, value: Uint8Array): void {
    this.insert(id, value);
  }

  get(id: Uint8Array): Buffer | undefined {
    if (this.count === 0) return undefined;
    const s = this.find(id);
    return s < 0 ? undefined : this.idAt(s, this.values!);
  }

  *entries(): Iterable<[Buffer, Buffer]> {
    for (let s = 0; s < this.cap; s++) if (this.used[s] !== 0) yield [this.idAt(s, this.keys), this.idAt(s, this.values!)];
  }
}
