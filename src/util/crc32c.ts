/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table driven (slicing by 8).
 * node:zlib's crc32 is the IEEE polynomial; ext4, XFS v5, btrfs and iSCSI use this one.
 *
 * Two flavours, because filesystems use the raw register:
 * - `crc32c(data)`: the standard checksum (initial ~0, final inversion), e.g. crc32c("123456789")
 *   = 0xE3069283.
 * - `crc32cUpdate(crc, data)`: the raw register update without pre/post inversion, as the Linux
 *   kernel's `crc32c_le()`/ext4's `ext4_chksum()` use it: ext4 seeds with ~0 (or a per-inode seed)
 *   and stores the register as is.
 */
const TABLES: Uint32Array[] = buildTables();

function buildTables(): Uint32Array[] {
  const tables: Uint32Array[] = [];
  const first = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    first[n] = c >>> 0;
  }
  tables.push(first);
  for (let t = 1; t < 8; t++) {
    const prev = tables[t - 1];
    const next = new Uint32Array(256);
    for (let n = 0; n < 256; n++) next[n] = (prev[n] >>> 8) ^ first[prev[n] & 0xff];
    tables.push(next);
  }
  return tables;
}

/** Raw CRC-32C register update (no inversion): returns the new register value as uint32. */
export function crc32cUpdate(crc: number, data: Uint8Array): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = TABLES;
  let c = crc >>> 0;
  let i = 0;
  const end8 = data.length - (data.length % 8);
  while (i < end8) {
    const lo = c ^ (data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24));
    c = t7[lo & 0xff] ^ t6[(lo >>> 8) & 0xff] ^ t5[(lo >>> 16) & 0xff] ^ t4[lo >>> 24]
      ^ t3[data[i + 4]] ^ t2[data[i + 5]] ^ t1[data[i + 6]] ^ t0[data[i + 7]];
    i += 8;
  }
  while (i < data.length) c = (c >>> 8) ^ t0[(c ^ data[i++]) & 0xff];
  return c >>> 0;
}

/** Standard CRC-32C of `data` (optionally continuing a previous standard CRC-32C value). */
export function crc32c(data: Uint8Array, previous = 0): number {
  return (crc32cUpdate(~previous >>> 0, data) ^ 0xffffffff) >>> 0;
}
