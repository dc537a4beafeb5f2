/**
 * Finds the filesystems on a disk: partition table → partitions → LVM physical volumes →
 * logical volumes → filesystems, probed with the readers given (see registry.ts).
 *
 * Volumes are named the way the CLI addresses them (`SNAPSHOT:DISK:PART`): '1', '2', '5' for
 * partitions (Linux numbering), 'lvm/VG/LV' for logical volumes, '0' for a whole unpartitioned
 * disk. A volume that cannot be read carries `error` instead of `fs`; one bad volume never hides
 * the others.
 */
import { describeError } from '../util/errors.ts';
import { cachedDevice, subDevice } from './block-cache.ts';
import type { BlockDevice, Filesystem, FilesystemProbe } from './filesystem.ts';
import { listLogicalVolumes, readPvLabel } from './lvm.ts';
import { GPT_TYPE, MBR_TYPE_LINUX_LVM, readPartitionTable } from './partitions.ts';

export interface Volume {
  /** '1', '5', 'lvm/vg0/root', or '0' for a whole unpartitioned disk. */
  part: string;
  /** Byte offset and size on the disk (for LVs: offset of the first segment is not meaningful: 0). */
  offset: number;
  size: number;
  /** Partition type (MBR hex or GPT GUID) or 'lvm' for logical volumes. */
  typeId?: string;
  /** GPT partition name or LV name. */
  name?: string;
  /** The device the volume's bytes come from (a partition slice, an LV mapping). */
  device: BlockDevice;
  fs?: Filesystem;
  error?: string;
  /** Partition-table problems that did not prevent reading it (e.g. primary GPT damaged). */
  warnings?: string[];
}

interface Candidate {
  part: string;
  offset: number;
  size: number;
  typeId?: string;
  name?: string;
  device: BlockDevice;
}

export async function openVolumes(dev: BlockDevice, probes: FilesystemProbe[]): Promise<Volume[]> {
  // Partition tables and volume labels are small, scattered reads near each other.
  const disk = cachedDevice(dev, { blockSize: 64 * 1024, maxBytes: 2 * 1024 * 1024 });
  let table;
  try {
    table = await readPartitionTable(disk);
  } catch (err) {
    return [{ part: '0', offset: 0, size: dev.size, device: dev, error: describeError(err) }];
  }
  const candidates: Candidate[] = table.scheme === 'none'
    ? [{ part: '0', offset: 0, size: dev.size, device: dev }]
    : table.partitions.map((p) => ({
      part: String(p.index),
      offset: p.offset,
      size: p.size,
      typeId: p.typeId,
      name: p.name,
      device: subDevice(dev, p.offset, p.size),
    }));

  const volumes: Volume[] = [];
  const physicalVolumes: Candidate[] = [];
  for (const candidate of candidates) {
    if (await isPhysicalVolume(candidate)) physicalVolumes.push(candidate);
    else volumes.push({ ...candidate, ...(await probeDevice(candidate.device, probes)) });
  }
  if (physicalVolumes.length > 0) volumes.push(...(await logicalVolumes(physicalVolumes, probes)));
  if (table.warnings.length > 0) {
    for (const v of volumes) v.warnings = table.warnings;
    if (volumes.length === 0) volumes.push({ part: '0', offset: 0, size: dev.size, device: dev, warnings: table.warnings });
  }
  return volumes;
}

async function isPhysicalVolume(candidate: Candidate): Promise<boolean> {
  const typed = candidate.typeId === MBR_TYPE_LINUX_LVM || candidate.typeId === GPT_TYPE.linuxLvm;
  try {
    return (await readPvLabel(candidate.device)) !== undefined;
  } catch {
    // A damaged label on an LVM-typed partition is still an LVM PV: listLogicalVolumes reports it.
    return typed;
  }
}

async function logicalVolumes(pvs: Candidate[], probes: FilesystemProbe[]): Promise<Volume[]> {
  try {
    const lvs = await listLogicalVolumes(pvs.map((pv) => pv.device));
    const volumes: Volume[] = [];
    for (const lv of lvs) {
      const volume: Volume = { part: `lvm/${lv.vg}/${lv.name}`, offset: 0, size: lv.size, typeId: 'lvm', name: lv.name, device: lv.device };
      if (lv.error) volume.error = lv.error;
      else Object.assign(volume, await probeDevice(lv.device, probes));
      volumes.push(volume);
    }
    return volumes;
  } catch (err) {
    return pvs.map((pv) => ({ ...pv, error: `LVM physical volume: ${describeError(err)}` }));
  }
}

/** Tries each probe in order; the first filesystem wins, else the first error is reported. */
async function probeDevice(device: BlockDevice, probes: FilesystemProbe[]): Promise<{ fs?: Filesystem; error?: string }> {
  let firstError: string | undefined;
  for (const probe of probes) {
    try {
      const fs = await probe(device);
      if (fs) return { fs };
    } catch (err) {
      firstError ??= describeError(err);
    }
  }
  return firstError === undefined ? {} : { error: firstError };
}
