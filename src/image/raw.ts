/**
 * Raw disk images and block devices: the disk is the file, byte for byte.
 */
import { open, stat, unlink, type FileHandle } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import type { DiskSource, DiskWriter, Extent } from './disk.ts';
import { BadInputError, TresorError, isErrno } from '../util/errors.ts';
import { isAllZero } from '../util/bytes.ts';
import { isValidRange, openForReading, readAt, sizeOfOpenFile, writeAt } from './file-io.ts';

export async function openRaw(path: string): Promise<DiskSource> {
  const fh = await openForReading(path);
  try {
    const st = await fh.stat();
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new BadInputError('image_not_a_file', `${path} is neither a regular file nor a block device`, {
        context: { file: path }, hint: 'give the path of a disk image file or of a block device',
      });
    }
    const size = await sizeOfOpenFile(fh);
    return new RawDisk(path, fh, size, st.isFile() ? await holeMap(path, size) : undefined);
  } catch (err) {
    await fh.close();
    throw err;
  }
}

/** Where a sparse file's data and holes are: sorted, non-overlapping [start, end) ranges of data. */
interface HoleMap {
  starts: number[];
  ends: number[];
}

/**
 * Node has no SEEK_DATA/SEEK_HOLE, but qemu-img (required anyway, the reference for disk formats)
 * asks the filesystem for us. Without it, or for an absurdly fragmented file, everything counts
 * as data and the engine finds zeros by reading.
 */
function holeMap(path: string, size: number): Promise<HoleMap | undefined> {
  return new Promise((resolve) => {
    execFile('qemu-img', ['map', '-f', 'raw', '--output=json', path], { maxBuffer: 128 << 20, timeout: 60_000 }, (err, stdout) => {
      if (err) return resolve(undefined);
      try {
        const entries = JSON.parse(stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
        const map: HoleMap = { starts: [], ends: [] };
        for (const e of entries) {
          if (!Number.isSafeInteger(e.start) || !Number.isSafeInteger(e.length) || e.start < 0 || e.start + e.length > size) return resolve(undefined);
          if (e.data && !e.zero) {
            const last = map.ends.length - 1;
            if (last >= 0 && map.ends[last] === e.start) map.ends[last] = e.start + e.length;
            else {
              map.starts.push(e.start);
              map.ends.push(e.start + e.length);
            }
          }
        }
        resolve(map);
      } catch {
        resolve(undefined);
      }
    });
  });
}

class RawDisk implements DiskSource {
  readonly format = 'raw';
  readonly size: number;
  readonly description: string;
  private readonly fh: FileHandle;
  private readonly map: HoleMap | undefined;

  constructor(path: string, fh: FileHandle, size: number, map: HoleMap | undefined) {
    this.description = path;
    this.fh = fh;
    this.size = size;
    this.map = map;
  }

  async *extents(offset: number, length: number): AsyncIterable<Extent> {
    checkRange(this, offset, length);
    if (length === 0) return;
    const end = offset + length;
    if (!this.map) {
      yield { offset, length, kind: 'data' };
      return;
    }
    const { starts, ends } = this.map;
    // First data range that ends after `offset`.
    let lo = 0;
    let hi = ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (ends[mid] <= offset) lo = mid + 1;
      else hi = mid;
    }
    let pos = offset;
    for (let i = lo; i < starts.length && starts[i] < end && pos < end; i++) {
      const a = Math.max(starts[i], pos);
      const b = Math.min(ends[i], end);
      if (a > pos) yield { offset: pos, length: a - pos, kind: 'zero' };
      yield { offset: a, length: b - a, kind: 'data' };
      pos = b;
    }
    if (pos < end) yield { offset: pos, length: end - pos, kind: 'zero' };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.readTo(offset, length, buf);
    return buf;
  }

  async readTo(offset: number, length: number, target: Buffer): Promise<void> {
    checkRange(this, offset, length);
    const got = await readAt(this.fh, target, 0, length, offset);
    // The file shrank since it was opened: what is gone reads as zeros, like a sparse tail.
    if (got < length) target.fill(0, got, length);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

export function checkRange(disk: { size: number; description: string }, offset: number, length: number): void {
  if (!isValidRange(offset, length, disk.size)) {
    throw new TresorError('disk_range_invalid',
      `${disk.description}: range ${offset}+${length} is outside the disk (size ${disk.size})`, {
        context: { file: disk.description, offset, length, size: disk.size },
        hint: 'this is a bug in the caller: report it',
      });
  }
}

export interface RawWriterOptions {
  /** Replace an existing regular file (default: refuse, so nothing is destroyed by mistake). */
  overwrite?: boolean;
}

/**
 * A raw target. A regular file is created sparse (ftruncate to the size; all-zero blocks are not
 * written). An existing block device is written in place, never truncated; as it may hold old
 * data, the ranges never written are zeroed at close so the DiskWriter contract holds.
 */
export async function createRawWriter(path: string, size: number, opts: RawWriterOptions = {}): Promise<DiskWriter> {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new TresorError('disk_size_invalid', `invalid disk size ${size} for ${path}`, {
      context: { file: path, size }, hint: 'this is a bug in the caller: report it',
    });
  }
  const existing = await stat(path).catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) return undefined;
    throw err;
  });
  if (existing?.isBlockDevice()) {
    const fh = await open(path, 'r+');
    const deviceSize = await sizeOfOpenFile(fh).catch(async (err: unknown) => {
      await fh.close();
      throw err;
    });
    if (deviceSize < size) {
      await fh.close();
      throw new BadInputError('target_too_small',
        `block device ${path} holds ${deviceSize} bytes, the disk needs ${size}`, {
          context: { file: path, deviceSize, size }, hint: 'restore to a larger device, or to a file',
        });
    }
    return new RawDeviceWriter(path, fh, size);
  }
  if (existing !== undefined && !(existing.isFile() && opts.overwrite === true)) {
    throw new BadInputError('target_exists', `${path} already exists`, {
      context: { file: path },
      hint: existing.isFile() ? 'remove it, choose another path, or ask to overwrite it'
        : 'give the path of a new file or of a block device',
    });
  }
  const fh = await open(path, existing === undefined ? 'wx' : 'w');
  try {
    await fh.truncate(size);
  } catch (err) {
    await fh.close();
    await unlink(path).catch(() => undefined);
    throw err;
  }
  return new RawFileWriter(path, fh, size);
}

/** Zero runs at this granularity are left as holes inside partly-zero writes. */
const SPARSE_BLOCK = 4096;

/**
 * Dirty bytes after which the writer asks the kernel to start writing back (fdatasync in the
 * background). Without it a restore fills the page cache and the final fsync then waits for
 * the whole image to reach the disk; with it the disk writes while the restore still decodes.
 * Restore of the 4 GiB reference corpus: 7.2-7.4 s without, 6.3-7.0 s at 128 MiB, 5.5-5.9 s at
 * 16 MiB (8 MiB: no better).
 */
const WRITEBACK_BYTES = 16 << 20;

abstract class RawWriterBase implements DiskWriter {
  readonly size: number;
  protected readonly path: string;
  protected readonly fh: FileHandle;
  private finished = false;
  private dirty = 0;
  private writeback: Promise<void> | undefined;

  constructor(path: string, fh: FileHandle, size: number) {
    this.path = path;
    this.fh = fh;
    this.size = size;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.finished) {
      throw new TresorError('writer_closed', `${this.path}: write after close or abort`, {
        context: { file: this.path }, hint: 'this is a bug in the caller: report it',
      });
    }
    checkRange({ size: this.size, description: this.path }, offset, data.length);
    await this.writeRange(offset, data);
    this.dirty += data.length;
    if (this.dirty >= WRITEBACK_BYTES && this.writeback === undefined) {
      this.dirty = 0;
      // One flush at a time; an error surfaces at close (the final fsync repeats it anyway).
      this.writeback = this.fh.datasync().catch(() => undefined).finally(() => {
        this.writeback = undefined;
      });
    }
  }

  protected abstract writeRange(offset: number, data: Uint8Array): Promise<void>;
  protected abstract finish(): Promise<void>;
  protected abstract discard(): Promise<void>;

  async close(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    try {
      await this.writeback;
      await this.finish();
      await this.fh.sync();
    } finally {
      await this.fh.close();
    }
  }

  async abort(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    await this.writeback;
    await this.fh.close().catch(() => undefined);
    await this.discard();
  }
}

class RawFileWriter extends RawWriterBase {
  protected async writeRange(offset: number, data: Uint8Array): Promise<void> {
    for (const [start, end] of nonZeroRuns(offset, data)) {
      await writeAt(this.fh, data.subarray(start, end), offset + start);
    }
  }

  protected async finish(): Promise<void> {}

  protected async discard(): Promise<void> {
    await unlink(this.path).catch((err: unknown) => {
      if (!isErrno(err, 'ENOENT')) throw err;
    });
  }
}

/**
 * [start, end) runs of `data` (indexes into it) that hold a non-zero byte, at SPARSE_BLOCK
 * granularity aligned to disk offsets, so zero blocks stay holes in the file.
 */
function nonZeroRuns(offset: number, data: Uint8Array): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  let runStart = -1;
  let pos = 0;
  while (pos < data.length) {
    const blockEnd = Math.min(data.length, pos + SPARSE_BLOCK - ((offset + pos) % SPARSE_BLOCK));
    const zero = isAllZero(data.subarray(pos, blockEnd));
    if (!zero && runStart < 0) runStart = pos;
    if (zero && runStart >= 0) {
      runs.push([runStart, pos]);
      runStart = -1;
    }
    pos = blockEnd;
  }
  if (runStart >= 0) runs.push([runStart, data.length]);
  return runs;
}

class RawDeviceWriter extends RawWriterBase {
  private readonly written = new RangeSet();

  protected async writeRange(offset: number, data: Uint8Array): Promise<void> {
    // A device may hold old data: zeros are written like anything else.
    await writeAt(this.fh, data, offset);
    this.written.add(offset, offset + data.length);
  }

  protected async finish(): Promise<void> {
    const zeros = Buffer.alloc(1 << 20);
    for (const [start, end] of this.written.gaps(0, this.size)) {
      for (let pos = start; pos < end; pos += zeros.length) {
        await writeAt(this.fh, zeros.subarray(0, Math.min(zeros.length, end - pos)), pos);
      }
    }
  }

  protected async discard(): Promise<void> {
    // Nothing to remove: the device stays, with whatever was written.
  }
}

/** Set of half-open ranges that merges touching neighbours as they are added. */
class RangeSet {
  private readonly endByStart = new Map<number, number>();
  private readonly startByEnd = new Map<number, number>();

  add(start: number, end: number): void {
    if (end <= start) return;
    const before = this.startByEnd.get(start);
    if (before !== undefined) {
      this.startByEnd.delete(start);
      this.endByStart.delete(before);
      start = before;
    }
    const after = this.endByStart.get(end);
    if (after !== undefined) {
      this.endByStart.delete(end);
      this.startByEnd.delete(after);
      end = after;
    }
    this.endByStart.set(start, end);
    this.startByEnd.set(end, start);
  }

  /** The parts of [from, to) not covered, ascending. */
  gaps(from: number, to: number): Array<[number, number]> {
    const covered = [...this.endByStart].sort((a, b) => a[0] - b[0]);
    const gaps: Array<[number, number]> = [];
    let pos = from;
    for (const [start, end] of covered) {
      if (start > pos) gaps.push([pos, Math.min(start, to)]);
      pos = Math.max(pos, end);
      if (pos >= to) break;
    }
    if (pos < to) gaps.push([pos, to]);
    return gaps;
  }
}
