/**
 * Small helpers shared by the FAT, exFAT, NTFS and XFS readers: bounds-checked device reads that
 * fail with an FsDamageError naming the structure, the usual caller errors (not a directory, not
 * a symlink), a tiny LRU map for parsed metadata, and argument checks for `read`.
 */
import { BadInputError } from '../util/errors.ts';
import { FsDamageError } from './errors.ts';
import type { FsDamageContext } from './errors.ts';
import type { BlockDevice, FileExtent } from './filesystem.ts';

/**
 * Reads [offset, offset+length) of the device, or fails with an FsDamageError when a (parsed,
 * untrusted) pointer leads outside it or the device returns fewer bytes than asked.
 */
export async function readRange(dev: BlockDevice, offset: number, length: number, where: FsDamageContext): Promise<Buffer> {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0
    || offset + length > dev.size) {
    throw new FsDamageError(`${where.structure} at byte ${offset} (+${length}) lies outside the device (${dev.size} bytes)`,
      { ...where, offset, length, deviceSize: dev.size });
  }
  if (length === 0) return Buffer.alloc(0);
  const buf = await dev.read(offset, length);
  if (buf.length !== length) {
    throw new FsDamageError(`short read of ${where.structure}: ${buf.length} of ${length} bytes`, { ...where, offset, length });
  }
  return buf;
}

export function notDirectory(fs: string, ino: bigint): BadInputError {
  return new BadInputError('fs_not_directory', `${fs}: inode ${ino} is not a directory`, {
    context: { fs, ino: ino.toString() },
    hint: 'list a directory, or read the file instead',
  });
}

export function notSymlink(fs: string, ino: bigint): BadInputError {
  return new BadInputError('fs_not_symlink', `${fs}: inode ${ino} is not a symbolic link`, {
    context: { fs, ino: ino.toString() },
    hint: 'only symbolic links have a target to read',
  });
}

export function isDirectory(fs: string, ino: bigint): BadInputError {
  return new BadInputError('fs_is_directory', `${fs}: inode ${ino} is a directory, it has no data to read`, {
    context: { fs, ino: ino.toString() },
    hint: 'list the directory instead',
  });
}

export function noSuchStream(fs: string, ino: bigint, stream: string): BadInputError {
  return new BadInputError('fs_no_stream', `${fs}: inode ${ino} has no data stream named '${stream}'`, {
    context: { fs, ino: ino.toString(), stream },
    hint: 'FileStat.streams lists the alternate data streams a file has',
  });
}

/** Validates read() arguments; returns the number of bytes to read given the file size. */
export function clampRead(fs: string, offset: number, length: number, size: number): number {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BadInputError('fs_read_range', `${fs}: invalid read of ${length} bytes at ${offset}`, {
      context: { fs, offset, length },
      hint: 'offset and length must be non-negative integers',
    });
  }
  if (offset >= size) return 0;
  return Math.min(length, size - offset);
}

/** Appends an extent, merging it into the previous one when both are adjacent and of one kind. */
export function pushExtent(out: FileExtent[], offset: number, length: number, hole: boolean): void {
  if (length <= 0) return;
  const last = out[out.length - 1];
  if (last && last.hole === hole && last.offset + last.length === offset) {
    last.length += length;
    return;
  }
  out.push({ offset, length, hole });
}

export { LruMap } from '../util/lru.ts';

/** ns since the Unix epoch from ms since the epoch plus extra nanoseconds. */
export function msToNs(ms: number, extraNs = 0n): bigint {
  return BigInt(ms) * 1_000_000n + extraNs;
}

/** Decodes `count` UTF-16LE code units at `offset` (an unpaired surrogate stays a lone code unit). */
export function utf16At(buf: Buffer, offset: number, count: number, where: FsDamageContext): string {
  if (offset < 0 || count < 0 || offset + count * 2 > buf.length) {
    throw new FsDamageError(`${where.structure}: a name of ${count} UTF-16 units at ${offset} overruns its record`,
      { ...where, nameOffset: offset, nameUnits: count });
  }
  return buf.toString('utf16le', offset, offset + count * 2);
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}
