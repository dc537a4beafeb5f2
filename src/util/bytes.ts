/** Small helpers for binary data. */
const ZERO_BLOCK = new Uint8Array(1 << 20);

/** True when every byte is zero. Uses memcmp against a zero block (much faster than a JS loop). */
export function isAllZero(buf: Uint8Array): boolean {
  for (let off = 0; off < buf.length; off += ZERO_BLOCK.length) {
    const n = Math.min(ZERO_BLOCK.length, buf.length - off);
    if (Buffer.compare(buf.subarray(off, off + n), ZERO_BLOCK.subarray(0, n)) !== 0) return false;
  }
  return true;
}
