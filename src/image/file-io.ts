/**
 * Small positional-I/O helpers shared by the disk image formats.
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { NotFoundError, isErrno } from '../util/errors.ts';

/**
 * Reads `length` bytes at `position` into `target[targetOffset...]`, looping over short reads.
 * Stops at end of file and returns how many bytes were read; the caller decides whether the rest
 * is an error or reads as zeros. `target` must already be zeroed where the caller needs zeros.
 */
export async function readAt(
  fh: FileHandle, target: Uint8Array, targetOffset: number, length: number, position: number,
): Promise<number> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(target, targetOffset + done, length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** Writes all of `data` at `position`, looping over short writes. */
export async function writeAt(fh: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

/**
 * Runs `task` over `items` with at most `limit` tasks in flight (the libuv pool has only a few
 * threads, and thousands of pending reads would only cost memory).
 */
export async function forEachLimited<T>(items: readonly T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const item = items[next++];
      await task(item);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/** Validates the arguments of DiskSource.read / DiskWriter.write against a disk size. */
export function isValidRange(offset: number, length: number, size: number): boolean {
  return Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0
    && offset + length <= size;
}

/**
 * Size in bytes of an open regular file or block device. fstat reports 0 for block devices and
 * Node has no lseek/ioctl, so a device's size comes from sysfs (in 512-byte sectors), or failing
 * that from a binary search for the last readable byte (the equivalent of seeking to the end).
 */
export async function sizeOfOpenFile(fh: FileHandle): Promise<number> {
  const st = await fh.stat();
  if (!st.isBlockDevice()) return st.size;
  const fromSysfs = await blockDeviceSizeFromSysfs(st.rdev);
  return fromSysfs ?? await findEndByReading(fh);
}

async function blockDeviceSizeFromSysfs(rdev: number): Promise<number | undefined> {
  // Linux dev_t encoding (glibc gnu_dev_major/minor), on a number because rdev fits in 53 bits.
  const high = Math.floor(rdev / 2 ** 32);
  const low = rdev % 2 ** 32;
  const major = ((low >>> 8) & 0xfff) | ((high & 0xfffff000) >>> 0);
  const minor = (low & 0xff) | ((low >>> 12) & 0xfff00);
  try {
    const text = await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
    const sectors = Number(text.trim());
    return Number.isSafeInteger(sectors) && sectors >= 0 ? sectors * 512 : undefined;
  } catch {
    return undefined;
  }
}

async function findEndByReading(fh: FileHandle): Promise<number> {
  const probe = Buffer.alloc(1);
  // holds(k): the device has at least k bytes, i.e. byte k-1 is readable.
  const holds = async (k: number): Promise<boolean> => k === 0 || (await fh.read(probe, 0, 1, k - 1)).bytesRead === 1;
  let atLeast = 0;
  let fewerThan = 1;
  while (await holds(fewerThan)) {
    atLeast = fewerThan;
    if (fewerThan >= 2 ** 52) return atLeast;
    fewerThan *= 2;
  }
  while (fewerThan - atLeast > 1) {
    const mid = atLeast + Math.floor((fewerThan - atLeast) / 2);
    if (await holds(mid)) atLeast = mid; else fewerThan = mid;
  }
  return atLeast;
}

/** Opens a disk image read-only; a missing file is a NotFoundError naming it. */
export async function openForReading(path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r');
  } catch (err) {
    if (isErrno(err, 'ENOENT', 'ENOTDIR')) {
      throw new NotFoundError('image_not_found', `disk image ${path} does not exist`, {
        context: { file: path }, hint: 'check the path of the disk image', cause: err,
      });
    }
    throw err;
  }
}
