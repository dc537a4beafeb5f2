/**
 * BlockDevices for tests: an image file, a Buffer, and a wrapper that records what was read
 * (to check laziness, and to aim fuzzing at the bytes a reader actually parses).
 */
import { open } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { BadInputError } from '../../src/util/errors.ts';
import type { BlockDevice } from '../../src/fs/filesystem.ts';

export interface FileDevice extends BlockDevice {
  close(): Promise<void>;
}

export async function openFileDevice(path: string): Promise<FileDevice> {
  const handle: FileHandle = await open(path, 'r');
  const size = (await handle.stat()).size;
  return {
    size,
    async read(offset: number, length: number): Promise<Buffer> {
      checkRange(size, offset, length);
      const buf = Buffer.alloc(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await handle.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new Error(`short read of ${path} at ${offset + done}`);
        done += bytesRead;
      }
      return buf;
    },
    close: () => handle.close(),
  };
}

export function memoryDevice(data: Buffer): BlockDevice {
  return {
    size: data.length,
    async read(offset: number, length: number): Promise<Buffer> {
      checkRange(data.length, offset, length);
      return Buffer.from(data.subarray(offset, offset + length));
    },
  };
}

export interface RecordingDevice extends BlockDevice {
  readonly reads: Array<{ offset: number; length: number }>;
  readonly bytesRead: number;
}

export function recordingDevice(inner: BlockDevice): RecordingDevice {
  const reads: Array<{ offset: number; length: number }> = [];
  let bytesRead = 0;
  return {
    size: inner.size,
    reads,
    get bytesRead() {
      return bytesRead;
    },
    read(offset: number, length: number): Promise<Buffer> {
      reads.push({ offset, length });
      bytesRead += length;
      return inner.read(offset, length);
    },
  };
}

function checkRange(size: number, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new BadInputError('test_device_range', `read of ${length} bytes at ${offset} outside a ${size}-byte device`);
  }
}
