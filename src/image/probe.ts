/**
 * Disk image format detection by magic numbers, so the engine can open what it supports and name
 * what it does not ("unsupported format vmdk, convert with qemu-img convert").
 *
 * Like qemu's probing, anything without a known signature is 'raw'. Unlike qemu, a fixed VHD
 * (raw data followed by a 512-byte "conectix" footer) is named 'vhd': reading it as raw would
 * silently append the footer to the disk.
 */
import { openForReading, readAt, sizeOfOpenFile } from './file-io.ts';

export type ImageFormat =
  | 'qcow2' | 'raw'
  | 'qcow' | 'qed' | 'vmdk' | 'vhd' | 'vhdx' | 'vdi' | 'luks' | 'parallels' | 'dmg';

/** Formats Tresor reads natively; everything else must be converted first. */
export const NATIVE_IMAGE_FORMATS: ReadonlySet<ImageFormat> = new Set(['qcow2', 'raw']);

const HEAD_BYTES = 512;

export async function probeImageFormat(path: string): Promise<ImageFormat> {
  const fh = await openForReading(path);
  try {
    const head = Buffer.alloc(HEAD_BYTES);
    await readAt(fh, head, 0, HEAD_BYTES, 0);
    const fromHead = formatFromHead(head);
    if (fromHead !== undefined) return fromHead;
    const size = await sizeOfOpenFile(fh);
    if (size >= 2 * HEAD_BYTES) {
      const tail = Buffer.alloc(HEAD_BYTES);
      await readAt(fh, tail, 0, HEAD_BYTES, size - HEAD_BYTES);
      if (tail.toString('latin1', 0, 8) === 'conectix') return 'vhd';
      // Apple disk images carry their "koly" trailer at the end too.
      if (tail.toString('latin1', 0, 4) === 'koly') return 'dmg';
    }
    return 'raw';
  } finally {
    await fh.close();
  }
}

/** The format named by the first sector, or undefined when it carries no known signature. */
export function formatFromHead(head: Buffer): ImageFormat | undefined {
  const ascii = (start: number, length: number): string => head.toString('latin1', start, start + length);
  if (head.length >= 8 && head.readUInt32BE(0) === 0x514649fb) {
    return head.readUInt32BE(4) === 1 ? 'qcow' : 'qcow2';
  }
  if (ascii(0, 4) === 'QED\0') return 'qed';
  if (ascii(0, 4) === 'KDMV' || ascii(0, 4) === 'COWD') return 'vmdk';
  if (ascii(0, 21) === '# Disk DescriptorFile') return 'vmdk';
  if (ascii(0, 8) === 'vhdxfile') return 'vhdx';
  if (ascii(0, 8) === 'conectix') return 'vhd';
  if (head.length >= 68 && head.readUInt32LE(64) === 0xbeda107f) return 'vdi';
  if (ascii(0, 6) === 'LUKS\xba\xbe') return 'luks';
  if (ascii(0, 16) === 'WithoutFreeSpace' || ascii(0, 16) === 'WithouFreSpacExt') return 'parallels';
  return undefined;
}
