/**
 * The directory-index (htree) name hashes of ext3/ext4: legacy ("dx_hack"), half-MD4 and TEA,
 * each in a signed-char and an unsigned-char variant (which one a filesystem uses is recorded in
 * the superblock flags). Same algorithms as the kernel's fs/ext4/hash.c and e2fsprogs' dirhash.c;
 * all arithmetic is on uint32 (`>>> 0`, Math.imul).
 */

export const DX_HASH = {
  legacy: 0,
  halfMd4: 1,
  tea: 2,
  legacyUnsigned: 3,
  halfMd4Unsigned: 4,
  teaUnsigned: 5,
  siphash: 6,
} as const;

const DEFAULT_SEED = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];

/**
 * Major hash of `name` (low bit cleared, as stored in dx entries), or undefined for a hash
 * version this reader does not compute (siphash of casefolded names).
 */
export function extDirHash(name: Uint8Array, version: number, seed: readonly number[]): number | undefined {
  const buf = seed.some((w) => w !== 0) ? [...seed] : [...DEFAULT_SEED];
  let hash: number;
  switch (version) {
    case DX_HASH.legacy:
      hash = dxHackHash(name, true);
      break;
    case DX_HASH.legacyUnsigned:
      hash = dxHackHash(name, false);
      break;
    case DX_HASH.halfMd4:
    case DX_HASH.halfMd4Unsigned: {
      const signed = version === DX_HASH.halfMd4;
      const input = new Array<number>(8);
      for (let p = 0, len = name.length; len > 0; len -= 32, p += 32) {
        str2hashbuf(name, p, len, input, 8, signed);
        halfMd4Transform(buf, input);
      }
      hash = buf[1];
      break;
    }
    case DX_HASH.tea:
    case DX_HASH.teaUnsigned: {
      const signed = version === DX_HASH.tea;
      const input = new Array<number>(4);
      for (let p = 0, len = name.length; len > 0; len -= 16, p += 16) {
        str2hashbuf(name, p, len, input, 4, signed);
        teaTransform(buf, input);
      }
      hash = buf[0];
      break;
    }
    default:
      return undefined;
  }
  hash = (hash & ~1) >>> 0;
  // 0x7fffffff << 1 is the "end of directory" cookie: the kernel moves that hash one step down.
  if (hash === 0xfffffffe) hash = 0xfffffffc;
  return hash;
}

function charValue(byte: number, signed: boolean): number {
  return signed && byte > 127 ? byte - 256 : byte;
}

function dxHackHash(name: Uint8Array, signed: boolean): number {
  let hash0 = 0x12a3fe2d;
  let hash1 = 0x37abe8f9;
  for (const byte of name) {
    let hash = (hash1 + ((hash0 ^ Math.imul(charValue(byte, signed), 7152373)) >>> 0)) >>> 0;
    if (hash & 0x80000000) hash = (hash - 0x7fffffff) >>> 0;
    hash1 = hash0;
    hash0 = hash;
  }
  return (hash0 << 1) >>> 0;
}

/** Packs up to num*4 bytes of the name into num words, padded with a length-derived pattern. */
function str2hashbuf(msg: Uint8Array, start: number, len: number, out: number[], num: number, signed: boolean): void {
  let pad = (len | (len << 8)) >>> 0;
  pad = (pad | (pad << 16)) >>> 0;
  let val = pad;
  const n = Math.min(len, num * 4);
  let w = 0;
  for (let i = 0; i < n; i++) {
    val = (charValue(msg[start + i], signed) + ((val << 8) >>> 0)) >>> 0;
    if (i % 4 === 3) {
      out[w++] = val;
      val = pad;
      num--;
    }
  }
  if (--num >= 0) out[w++] = val;
  while (--num >= 0) out[w++] = pad;
}

function rol(x: number, s: number): number {
  return ((x << s) | (x >>> (32 - s))) >>> 0;
}

const K2 = 0o13240474631;
const K3 = 0o15666365641;

function halfMd4Transform(buf: number[], x: number[]): void {
  let [a, b, c, d] = buf;
  const F = (x1: number, y: number, z: number) => (z ^ (x1 & (y ^ z))) >>> 0;
  const G = (x1: number, y: number, z: number) => (((x1 & y) >>> 0) + (((x1 ^ y) & z) >>> 0)) >>> 0;
  const H = (x1: number, y: number, z: number) => (x1 ^ y ^ z) >>> 0;
  const round = (f: typeof F, p: number, q: number, r: number, s: number, input: number, shift: number) =>
    rol((p + f(q, r, s) + input) >>> 0, shift);

  a = round(F, a, b, c, d, x[0], 3);
  d = round(F, d, a, b, c, x[1], 7);
  c = round(F, c, d, a, b, x[2], 11);
  b = round(F, b, c, d, a, x[3], 19);
  a = round(F, a, b, c, d, x[4], 3);
  d = round(F, d, a, b, c, x[5], 7);
  c = round(F, c, d, a, b, x[6], 11);
  b = round(F, b, c, d, a, x[7], 19);

  a = round(G, a, b, c, d, (x[1] + K2) >>> 0, 3);
  d = round(G, d, a, b, c, (x[3] + K2) >>> 0, 5);
  c = round(G, c, d, a, b, (x[5] + K2) >>> 0, 9);
  b = round(G, b, c, d, a, (x[7] + K2) >>> 0, 13);
  a = round(G, a, b, c, d, (x[0] + K2) >>> 0, 3);
  d = round(G, d, a, b, c, (x[2] + K2) >>> 0, 5);
  c = round(G, c, d, a, b, (x[4] + K2) >>> 0, 9);
  b = round(G, b, c, d, a, (x[6] + K2) >>> 0, 13);

  a = round(H, a, b, c, d, (x[3] + K3) >>> 0, 3);
  d = round(H, d, a, b, c, (x[7] + K3) >>> 0, 9);
  c = round(H, c, d, a, b, (x[2] + K3) >>> 0, 11);
  b = round(H, b, c, d, a, (x[6] + K3) >>> 0, 15);
  a = round(H, a, b, c, d, (x[1] + K3) >>> 0, 3);
  d = round(H, d, a, b, c, (x[5] + K3) >>> 0, 9);
  c = round(H, c, d, a, b, (x[0] + K3) >>> 0, 11);
  b = round(H, b, c, d, a, (x[4] + K3) >>> 0, 15);

  buf[0] = (buf[0] + a) >>> 0;
  buf[1] = (buf[1] + b) >>> 0;
  buf[2] = (buf[2] + c) >>> 0;
  buf[3] = (buf[3] + d) >>> 0;
}

function teaTransform(buf: number[], input: number[]): void {
  let sum = 0;
  let b0 = buf[0];
  let b1 = buf[1];
  const [a, b, c, d] = input;
  for (let n = 0; n < 16; n++) {
    sum = (sum + 0x9e3779b9) >>> 0;
    b0 = (b0 + ((((b1 << 4) + a) >>> 0) ^ ((b1 + sum) >>> 0) ^ (((b1 >>> 5) + b) >>> 0))) >>> 0;
    b1 = (b1 + ((((b0 << 4) + c) >>> 0) ^ ((b0 + sum) >>> 0) ^ (((b0 >>> 5) + d) >>> 0))) >>> 0;
  }
  buf[0] = (buf[0] + b0) >>> 0;
  buf[1] = (buf[1] + b1) >>> 0;
}
