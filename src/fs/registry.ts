/**
 * The filesystem probes openVolumes() tries, in order. Each reader module adds its probe here;
 * order matters only for devices that could match two readers (none of the current ones do).
 */
import type { FilesystemProbe } from './filesystem.ts';
import { probeExfat } from './exfat.ts';
import { probeExt } from './ext4.ts';
import { probeFat } from './fat.ts';
import { probeNtfs } from './ntfs.ts';
import { probeXfs } from './xfs.ts';

// FAT comes last: its boot sector has no magic number, only plausibility checks.
export const defaultProbes: FilesystemProbe[] = [probeExt, probeXfs, probeNtfs, probeExfat, probeFat];
