/**
 * Partition tables: MBR (with the EBR chain of an extended partition) and GPT (header and entry
 * array CRC32 checked, backup header used when the primary is damaged).
 *
 * Partitions are numbered as Linux numbers them: MBR primaries by slot 1-4, logical partitions
 * from 5 in chain order; GPT partitions by their slot in the entry array (1-based), so `sda3`
 * here is `3` even when slot 2 is empty. Extended-partition containers are not listed: they hold
 * no filesystem.
 */
import { crc32 } from 'node:zlib';
import { FsDamageError } from './errors.ts';
import { subDevice as sliceDevice } from './block-cache.ts';
import type { BlockDevice } from './filesystem.ts';

export interface Partition {
  /** 1-based, as Linux numbers them (MBR logicals from 5). */
  index: number;
  /** Byte offset and size on the device. */
  offset: number;
  size: number;
  /** MBR: two hex digits ('83', '8e', '07'); GPT: the lowercase type GUID. */
  typeId: string;
  /** GPT partition name. */
  name?: string;
  /** GPT unique partition GUID (lowercase). */
  uuid?: string;
  /** MBR active flag, GPT "legacy BIOS bootable" attribute. */
  bootable?: boolean;
}

export interface PartitionTable {
  scheme: 'gpt' | 'mbr' | 'none';
  partitions: Partition[];
  /** Things a user should know that did not prevent reading the table. */
  warnings: string[];
  /** GPT disk GUID. */
  diskGuid?: string;
  /** Logical sector size the table was found with. */
  sectorSize?: number;
}

export const GPT_TYPE = {
  linuxFilesystem: '0fc63daf-8483-4772-8e79-3d69d8477de4',
  linuxLvm: 'e6d6d379-f507-44c2-a23c-238f2a3df928',
  linuxSwap: '0657fd6d-a4ab-43c4-84e5-0933c84b4f4f',
  efiSystem: 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b',
  biosBoot: '21686148-6449-6e6f-744e-656564454649',
  microsoftBasicData: 'ebd0a0a2-b9e5-4433-87c0-68b6b72699c7',
} as const;

export const MBR_TYPE_LINUX_LVM = '8e';
const MBR_EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const MBR_PROTECTIVE_TYPE = 0xee;
/** Longest EBR chain followed; Linux itself stops far earlier in practice. */
const MAX_LOGICAL_PARTITIONS = 256;
/** Largest GPT entry array read (the usual one is 128 x 128 bytes = 16 KiB). */
const MAX_GPT_ARRAY_BYTES = 1024 * 1024;

/** A bounds-checked window of a device (re-exported here because partitions are its main use). */
export function subDevice(dev: BlockDevice, offset: number, size: number): BlockDevice {
  return sliceDevice(dev, offset, size);
}

export async function readPartitionTable(dev: BlockDevice): Promise<PartitionTable> {
  if (dev.size < 1024) return { scheme: 'none', partitions: [], warnings: [] };
  const mbr = await dev.read(0, 512);
  if (mbr.readUInt16LE(510) !== 0xaa55) return { scheme: 'none', partitions: [], warnings: [] };
  const entries = parseMbrEntries(mbr);
  if (entries.some((e) => e.type === MBR_PROTECTIVE_TYPE)) return readGpt(dev);
  if (!looksLikeMbr(mbr, entries)) return { scheme: 'none', partitions: [], warnings: [] };
  return readMbr(dev, entries);
}

// ---------------------------------------------------------------------------------------------
// MBR

interface MbrEntry {
  slot: number;
  bootFlag: number;
  type: number;
  startLba: number;
  sectors: number;
}

function parseMbrEntries(sector: Buffer): MbrEntry[] {
  const entries: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const at = 446 + slot * 16;
    entries.push({
      slot,
      bootFlag: sector[at],
      type: sector[at + 4],
      startLba: sector.readUInt32LE(at + 8),
      sectors: sector.readUInt32LE(at + 12),
    });
  }
  return entries;
}

/**
 * A FAT or NTFS boot sector also ends in 55 AA: like Linux, require sane boot flags and at least
 * one used entry, and reject sectors that carry a filesystem signature.
 */
function looksLikeMbr(sector: Buffer, entries: MbrEntry[]): boolean {
  if (entries.some((e) => e.bootFlag !== 0 && e.bootFlag !== 0x80)) return false;
  const used = entries.filter((e) => e.type !== 0 && e.sectors !== 0);
  if (used.length === 0) return false;
  if (used.some((e) => e.startLba === 0)) return false;
  const oem = sector.toString('latin1', 3, 11);
  if (oem === 'NTFS    ' || oem === 'EXFAT   ') return false;
  const fat16 = sector.toString('latin1', 0x36, 0x39);
  const fat32 = sector.toString('latin1', 0x52, 0x57);
  const jump = sector[0] === 0xeb || sector[0] === 0xe9;
  if (jump && (fat16 === 'FAT' || fat32 === 'FAT32')) return false;
  return true;
}

async function readMbr(dev: BlockDevice, entries: MbrEntry[]): Promise<PartitionTable> {
  const sectors = Math.floor(dev.size / 512);
  const warnings: string[] = [];
  const partitions: Partition[] = [];
  const extended: MbrEntry[] = [];
  for (const entry of entries) {
    if (entry.type === 0 || entry.sectors === 0) continue;
    if (MBR_EXTENDED_TYPES.has(entry.type)) {
      extended.push(entry);
      continue;
    }
    const part = mbrPartition(entry.slot + 1, entry, 0, sectors, warnings);
    if (part) partitions.push(part);
  }
  let nextLogical = 5;
  for (const container of extended) {
    nextLogical = await readLogicalPartitions(dev, container, sectors, nextLogical, partitions, warnings);
  }
  partitions.sort((a, b) => a.index - b.index);
  return { scheme: 'mbr', partitions, warnings, sectorSize: 512 };
}

/** Turns an entry into a partition, clamping one that runs past the end of the disk. */
function mbrPartition(index: number, entry: MbrEntry, baseLba: number, diskSectors: number,
  warnings: string[]): Partition | undefined {
  const start = baseLba + entry.startLba;
  let count = entry.sectors;
  if (start >= diskSectors) {
    warnings.push(`partition ${index} starts at sector ${start}, past the end of the disk (${diskSectors} sectors): ignored`);
    return undefined;
  }
  if (start + count > diskSectors) {
    warnings.push(`partition ${index} runs past the end of the disk: truncated to the disk size`);
    count = diskSectors - start;
  }
  return {
    index,
    offset: start * 512,
    size: count * 512,
    typeId: entry.type.toString(16).padStart(2, '0'),
    bootable: entry.bootFlag === 0x80,
  };
}

/**
 * Follows the EBR chain. Each EBR holds the logical partition (relative to the EBR) in slot 0
 * and the link to the next EBR (relative to the start of the extended partition) in slot 1.
 * The chain is untrusted: visited EBRs are remembered (a loop ends the chain with a warning) and
 * its length is bounded.
 */
async function readLogicalPartitions(dev: BlockDevice, container: MbrEntry, diskSectors: number,
  firstIndex: number, out: Partition[], warnings: string[]): Promise<number> {
  const extStart = container.startLba;
  const extEnd = Math.min(diskSectors, extStart + container.sectors);
  const visited = new Set<number>();
  let ebrLba = extStart;
  let index = firstIndex;
  while (true) {
    if (visited.has(ebrLba)) {
      warnings.push(`the extended partition's EBR chain loops back to sector ${ebrLba}: stopped after ${index - firstIndex} logical partitions`);
      break;
    }
    if (index - firstIndex >= MAX_LOGICAL_PARTITIONS) {
      warnings.push(`more than ${MAX_LOGICAL_PARTITIONS} logical partitions: the rest are ignored`);
      break;
    }
    if (ebrLba < extStart || ebrLba >= extEnd) {
      warnings.push(`an EBR link points to sector ${ebrLba}, outside the extended partition: chain stopped`);
      break;
    }
    visited.add(ebrLba);
    const ebr = await dev.read(ebrLba * 512, 512);
    if (ebr.readUInt16LE(510) !== 0xaa55) {
      warnings.push(`the EBR at sector ${ebrLba} has no 55AA signature: chain stopped`);
      break;
    }
    const [logical, link] = parseMbrEntries(ebr);
    if (logical.type !== 0 && logical.sectors !== 0) {
      const part = mbrPartition(index, logical, ebrLba, diskSectors, warnings);
      if (part && part.offset + part.size > extEnd * 512) {
        warnings.push(`logical partition ${index} extends beyond its extended partition`);
      }
      if (part) out.push(part);
      index++;
    }
    if (link.type === 0 || link.startLba === 0 || !MBR_EXTENDED_TYPES.has(link.type)) break;
    ebrLba = extStart + link.startLba;
  }
  return index;
}

// ---------------------------------------------------------------------------------------------
// GPT

interface GptHeader {
  myLba: number;
  alternateLba: number;
  firstUsable: number;
  lastUsable: number;
  diskGuid: string;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

async function readGpt(dev: BlockDevice): Promise<PartitionTable> {
  const sectorSize = await detectGptSectorSize(dev);
  const totalSectors = Math.floor(dev.size / sectorSize);
  const warnings: string[] = [];
  const primary = await readGptCopy(dev, sectorSize, 1, totalSectors);
  let chosen: { header: GptHeader; entries: Buffer } | undefined;
  if (primary.ok) {
    chosen = primary.value;
  } else {
    const candidates = [totalSectors - 1];
    if (primary.header && primary.header.alternateLba !== totalSectors - 1) candidates.push(primary.header.alternateLba);
    let lastProblem = '';
    for (const lba of candidates) {
      const backup = await readGptCopy(dev, sectorSize, lba, totalSectors);
      if (backup.ok) {
        chosen = backup.value;
        warnings.push(`primary GPT is damaged (${primary.problem}); using the backup GPT at sector ${lba}`);
        break;
      }
      lastProblem = backup.problem;
    }
    if (!chosen) {
      throw new FsDamageError(`both GPT copies are damaged: primary: ${primary.problem}; backup: ${lastProblem}`, {
        fs: 'gpt', structure: 'GPT header',
      }, 'the partition table is unreadable: try `sgdisk -v` / `gdisk` recovery on a restored copy of the disk');
    }
  }
  const partitions = parseGptEntries(chosen.header, chosen.entries, sectorSize, totalSectors, warnings);
  return { scheme: 'gpt', partitions, warnings, diskGuid: chosen.header.diskGuid, sectorSize };
}

/** 512-byte sectors are the rule; a 4Kn disk has its header at byte 4096. */
async function detectGptSectorSize(dev: BlockDevice): Promise<number> {
  for (const size of [512, 4096]) {
    if (dev.size < size * 3) continue;
    const sig = await dev.read(size, 8);
    if (sig.toString('latin1') === 'EFI PART') return size;
  }
  return 512;
}

type GptCopy =
  | { ok: true; value: { header: GptHeader; entries: Buffer } }
  | { ok: false; problem: string; header?: GptHeader };

async function readGptCopy(dev: BlockDevice, sectorSize: number, lba: number, totalSectors: number): Promise<GptCopy> {
  if (lba < 1 || lba >= totalSectors) return { ok: false, problem: `header sector ${lba} is outside the disk` };
  const sector = await dev.read(lba * sectorSize, sectorSize);
  const parsed = parseGptHeader(sector, lba, sectorSize, totalSectors);
  if (!parsed.ok) return parsed;
  const header = parsed.header;
  const arrayBytes = header.entryCount * header.entrySize;
  const entries = await dev.read(header.entriesLba * sectorSize, arrayBytes);
  const actual = crc32(entries) >>> 0;
  if (actual !== header.entriesCrc) {
    return { ok: false, header, problem: `partition entry array CRC32 mismatch at sector ${header.entriesLba}` };
  }
  return { ok: true, value: { header, entries } };
}

function parseGptHeader(sector: Buffer, lba: number, sectorSize: number, totalSectors: number):
  { ok: true; header: GptHeader } | { ok: false; problem: string } {
  if (sector.toString('latin1', 0, 8) !== 'EFI PART') return { ok: false, problem: `no "EFI PART" signature at sector ${lba}` };
  const headerSize = sector.readUInt32LE(12);
  if (headerSize < 92 || headerSize > sectorSize) return { ok: false, problem: `header size ${headerSize} is invalid` };
  const stored = sector.readUInt32LE(16);
  const copy = Buffer.from(sector.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if ((crc32(copy) >>> 0) !== stored) return { ok: false, problem: `header CRC32 mismatch at sector ${lba}` };
  const header: GptHeader = {
    myLba: readLba(sector, 24),
    alternateLba: readLba(sector, 32),
    firstUsable: readLba(sector, 40),
    lastUsable: readLba(sector, 48),
    diskGuid: formatGuid(sector, 56),
    entriesLba: readLba(sector, 72),
    entryCount: sector.readUInt32LE(80),
    entrySize: sector.readUInt32LE(84),
    entriesCrc: sector.readUInt32LE(88),
  };
  if (header.myLba !== lba) return { ok: false, problem: `header at sector ${lba} says it is at sector ${header.myLba}` };
  if (header.entrySize < 128 || header.entrySize % 8 !== 0 || header.entrySize > 4096) {
    return { ok: false, problem: `partition entry size ${header.entrySize} is invalid` };
  }
  const arrayBytes = header.entryCount * header.entrySize;
  if (header.entryCount === 0 || arrayBytes > MAX_GPT_ARRAY_BYTES) {
    return { ok: false, problem: `partition entry count ${header.entryCount} is invalid` };
  }
  const arraySectors = Math.ceil(arrayBytes / sectorSize);
  if (header.entriesLba < 1 || header.entriesLba + arraySectors > totalSectors) {
    return { ok: false, problem: `partition entry array at sector ${header.entriesLba} is outside the disk` };
  }
  if (header.firstUsable > header.lastUsable) {
    return { ok: false, problem: `first usable sector ${header.firstUsable} is after the last ${header.lastUsable}` };
  }
  return { ok: true, header };
}

function parseGptEntries(header: GptHeader, entries: Buffer, sectorSize: number, totalSectors: number,
  warnings: string[]): Partition[] {
  const partitions: Partition[] = [];
  for (let slot = 0; slot < header.entryCount; slot++) {
    const at = slot * header.entrySize;
    const typeId = formatGuid(entries, at);
    if (typeId === '00000000-0000-0000-0000-000000000000') continue;
    const index = slot + 1;
    const first = readLba(entries, at + 32);
    const last = readLba(entries, at + 40);
    if (first > last || first === 0) {
      warnings.push(`GPT partition ${index} has an invalid range ${first}-${last}: ignored`);
      continue;
    }
    if (last >= totalSectors) {
      warnings.push(`GPT partition ${index} ends at sector ${last}, past the end of the disk: ignored`);
      continue;
    }
    if (first < header.firstUsable || last > header.lastUsable) {
      warnings.push(`GPT partition ${index} lies outside the usable area ${header.firstUsable}-${header.lastUsable}`);
    }
    const attributes = entries.readBigUInt64LE(at + 48);
    const name = decodeUtf16Name(entries.subarray(at + 56, at + Math.min(header.entrySize, 128)));
    partitions.push({
      index,
      offset: first * sectorSize,
      size: (last - first + 1) * sectorSize,
      typeId,
      uuid: formatGuid(entries, at + 16),
      ...(name === '' ? {} : { name }),
      bootable: (attributes & 4n) !== 0n,
    });
  }
  return partitions;
}

/** LBAs are u64; anything past 2^53 cannot address a real disk and fails the range checks. */
function readLba(buf: Buffer, at: number): number {
  const value = buf.readBigUInt64LE(at);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
}

/** GUIDs are stored mixed-endian: the first three fields little-endian, the rest as bytes. */
export function formatGuid(buf: Buffer, at: number): string {
  const hex = (from: number, to: number) => buf.subarray(at + from, at + to).toString('hex');
  const le = (from: number, to: number) => Buffer.from(buf.subarray(at + from, at + to)).reverse().toString('hex');
  return `${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${hex(8, 10)}-${hex(10, 16)}`;
}

function decodeUtf16Name(raw: Buffer): string {
  let end = 0;
  while (end + 1 < raw.length && (raw[end] !== 0 || raw[end + 1] !== 0)) end += 2;
  return raw.toString('utf16le', 0, end);
}
