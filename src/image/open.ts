/**
 * Opens a disk image file of any supported format as a DiskSource, by probing its magic.
 */
import { BadInputError } from '../util/errors.ts';
import type { DiskSource } from './disk.ts';
import { probeImageFormat } from './probe.ts';
import { openQcow2 } from './qcow2.ts';
import { openRaw } from './raw.ts';

export async function openDiskImage(path: string, format?: 'raw' | 'qcow2'): Promise<DiskSource> {
  const detected = format ?? await probeImageFormat(path);
  switch (detected) {
    case 'raw':
      return openRaw(path);
    case 'qcow2':
      return openQcow2(path);
    default:
      throw new BadInputError('unsupported-image-format', `${path} is a ${detected} image, which Tresor does not read directly`, {
        hint: `convert it first: qemu-img convert -O qcow2 ${path} ${path}.qcow2`,
        context: { file: path, format: detected },
      });
  }
}
