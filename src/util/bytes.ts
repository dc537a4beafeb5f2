/** Small helpers for binary data. */
const ZERO_BLOCK = new Uint8Array(1 << 20);

/** A Buffer over the same memory as `u` (no copy), for APIs that want a Buffer. */
export function bufferView(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/** True when every byte is zero. Uses memcmp against a zero block (much faster than a JS loop). */
export function isAllZero(buf: Uint8Array): boolean {
  for (let off = 0; off < buf.length; off += ZERO_BLOCK.length) {
    const n = Math.min(ZERO_BLOCK.length, buf.length - off);
    if (Buffer.compare(buf.subarray(off, off + n), ZERO_BLOCK.subarray(0, n)) !== 0) return false;
  }
  return true;
}

/**
 * Frees a large buffer now instead of at some later garbage collection, by detaching its
 * ArrayBuffer. Tresor's pipelines churn through hundreds of MiB of short-lived buffers (batches,
 * compressed and encrypted blobs, packs); V8 frees a buffer only when it collects the object that
 * holds it, which for buffers that lived long enough to be promoted means a full collection.
 * Releasing at the end of a buffer's life keeps memory bounded without forcing collections.
 *
 * Only for buffers the caller owns exclusively: `whole` views (the buffer is exactly its
 * ArrayBuffer), or any view when `owner` says the whole ArrayBuffer belongs to the caller (e.g.
 * the output of a zlib call). Every other view of it reads as empty afterwards. Small buffers,
 * which may share Node's allocation pool (Buffer.poolSize), are left alone.
 */
export function releaseBuffer(buf: Uint8Array, owner: 'whole' | 'arraybuffer' = 'whole'): void {
  const ab = buf.buffer;
  if (!(ab instanceof ArrayBuffer) || ab.detached || ab.byteLength <= Buffer.poolSize) return;
  if (owner === 'whole' && (buf.byteOffset !== 0 || buf.byteLength !== ab.byteLength)) return;
  try {
    ab.transfer(0);
  } catch {
    // Not detachable (Node's own buffers): it is left to the garbage collector.
  }
}

/**
 * Copies all of `source` into `target` at `at` (the caller makes sure it fits; the two do not
 * overlap), at memcpy speed also where either side is SharedArrayBuffer memory: there V8's
 * copies (Buffer#copy, TypedArray#set) move one relaxed-atomic word at a time, 3-4× slower than
 * memcpy even in cache (on the VM backup's 2.4 GiB the NBD reader's copies into the batch arena
 * took 1.8 s instead of 0.2 s). Node's fill() with a buffer value copies it with memcpy.
 */
export function copyBytes(target: Uint8Array, at: number, source: Uint8Array): void {
  if (source.length === 0) return;
  if (!(target.buffer instanceof SharedArrayBuffer) && !(source.buffer instanceof SharedArrayBuffer)) {
    target.set(source, at);
    return;
  }
  if (at < 0 || at + source.length > target.length) throw new RangeError(`copy of ${source.length} bytes at ${at} overruns a target of ${target.length}`);
  const into = Buffer.isBuffer(target) ? target : Buffer.from(target.buffer, target.byteOffset, target.length);
  into.fill(source, at, at + source.length);
}
