/**
 * Random-access views of virtual disks, shared by every disk format, NBD and the engine.
 *
 * DiskSource contract:
 * - `size` is the virtual size in bytes.
 * - `extents(offset, length)` describes [offset, offset+length) as consecutive, non-overlapping,
 *   ascending extents that exactly cover the range. `zero` means the range reads as zeros without
 *   reading anything (unallocated, a hole, or a zero cluster); `data` means it must be read (it may
 *   still contain zeros); `unchanged` (only from sources that know a parent, e.g. a dirty bitmap)
 *   means identical to the same range of the parent snapshot the engine was given.
 * - `read(offset, length)` returns exactly `length` bytes; zero extents read as zeros. Reads past
 *   `size` are an error. Concurrent reads are allowed.
 * - `readTo(offset, length, target)`, where a source offers it, reads the same bytes into
 *   target[0, length) instead, overwriting whatever it held (so a caller can reuse its buffers).
 *   Once it settles, also by failing, nothing writes into `target` any more.
 * - A malformed image is a BadInputError naming the file and the structure at fault, never a
 *   crash, an out-of-bounds read, or a hang.
 */
export type ExtentKind = 'data' | 'zero' | 'unchanged';

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

export interface DiskSource {
  readonly size: number;
  /** e.g. 'raw', 'qcow2', 'nbd' */
  readonly format: string;
  /** Where it comes from, for messages: a path, an NBD URI... */
  readonly description: string;
  extents(offset: number, length: number): AsyncIterable<Extent>;
  read(offset: number, length: number): Promise<Buffer>;
  readTo?(offset: number, length: number, target: Buffer): Promise<void>;
  close(): Promise<void>;
}

/**
 * DiskWriter contract: the target of a restore. `write` calls come with non-overlapping ranges,
 * in any order; ranges never written read back as zeros. `close` makes everything durable
 * (fsync) and finishes format metadata. `abort` removes what was written.
 */
export interface DiskWriter {
  readonly size: number;
  /** Writes `data` at `offset`; the writer is done with `data` once the promise settles. */
  write(offset: number, data: Uint8Array): Promise<void>;
  close(): Promise<void>;
  abort(): Promise<void>;
}
