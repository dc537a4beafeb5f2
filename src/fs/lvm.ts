/**
 * LVM2 reader: physical volume labels, the metadata area's text, volume groups and their linear
 * and striped logical volumes, as BlockDevices read lazily from the physical volumes.
 *
 * On-disk layout (LVM2 "lvm2" format, checked against what pvcreate/vgcreate/lvcreate write):
 * - label header in one of sectors 0-3: "LABELONE", its own sector number (u64), a CRC over bytes
 *   20..511, the offset of the PV header (u32) and "LVM2 001";
 * - PV header: the PV UUID (32 chars), device size, then two zero-terminated lists of
 *   (offset u64, size u64): data areas and metadata areas;
 * - metadata area: a 512-byte header (CRC over bytes 4..511, magic " LVM2 x[5A%r0N*>", version 1,
 *   its own start and size, then raw locations (offset, size, CRC, flags)) followed by a circular
 *   text buffer; the first raw location is the current metadata text, NUL included;
 * - every CRC is LVM's calc_crc: the reflected CRC-32 register from 0xf597a6cf, no final xor.
 *
 * Everything is untrusted: sizes are bounded, the text parser has depth and node limits, and
 * extent ranges are checked against the PVs before an LV is offered.
 */
import { crc32 } from 'node:zlib';
import { BadInputError } from '../util/errors.ts';
import { FsDamageError } from './errors.ts';
import { checkRange } from './block-cache.ts';
import type { BlockDevice } from './filesystem.ts';

const SECTOR = 512;
const LVM_CRC_INITIAL = 0xf597a6cf;
const MDA_MAGIC = ' LVM2 x[5A%r0N*>';
const MDA_HEADER_SIZE = 512;
const RAW_LOCN_IGNORED = 1;
/** Largest metadata text accepted (LVM's default area is 1 MiB; big VGs use a few MiB). */
const MAX_METADATA_TEXT = 16 * 1024 * 1024;
const MAX_LIST_ENTRIES = 16;

export interface LogicalVolume {
  vg: string;
  name: string;
  size: number;
  device: BlockDevice;
  /** Set when the LV cannot be read (missing PV, unsupported segment type...); reads then fail. */
  error?: string;
}

export interface PhysicalVolumeLabel {
  /** PV UUID without dashes, as stored in the label. */
  uuid: string;
  deviceSize: number;
  metadataAreas: Array<{ offset: number; size: number }>;
}

/** Calls LVM's CRC over `data` starting from `initial` (raw register, no final inversion). */
export function lvmCrc(data: Uint8Array, initial = LVM_CRC_INITIAL): number {
  return (~crc32(data, ~initial >>> 0)) >>> 0;
}

function damage(message: string, structure: string, extra: Record<string, unknown> = {}): FsDamageError {
  return new FsDamageError(message, { fs: 'lvm', structure, ...extra },
    'the LVM metadata on this disk is damaged: try `pvck` / `vgcfgrestore` on a restored copy of the disk');
}

/** Reads the PV label; undefined when there is no LABELONE in sectors 0-3. */
export async function readPvLabel(dev: BlockDevice): Promise<PhysicalVolumeLabel | undefined> {
  if (dev.size < 4 * SECTOR) return undefined;
  const head = await dev.read(0, 4 * SECTOR);
  for (let sector = 0; sector < 4; sector++) {
    const label = head.subarray(sector * SECTOR, (sector + 1) * SECTOR);
    if (label.toString('latin1', 0, 8) !== 'LABELONE') continue;
    if (label.readBigUInt64LE(8) !== BigInt(sector)) {
      throw damage(`label in sector ${sector} claims to be in sector ${label.readBigUInt64LE(8)}`, 'PV label');
    }
    if (lvmCrc(label.subarray(20)) !== label.readUInt32LE(16)) {
      throw damage(`PV label CRC mismatch in sector ${sector}`, 'PV label');
    }
    if (label.toString('latin1', 24, 32) !== 'LVM2 001') {
      throw damage(`unknown label type "${label.toString('latin1', 24, 32)}"`, 'PV label');
    }
    const headerAt = label.readUInt32LE(20);
    if (headerAt < 32 || headerAt + 32 + 8 + 16 > SECTOR) throw damage(`PV header offset ${headerAt} is invalid`, 'PV header');
    return parsePvHeader(label, headerAt, dev.size);
  }
  return undefined;
}

function parsePvHeader(label: Buffer, at: number, deviceBytes: number): PhysicalVolumeLabel {
  const uuid = label.toString('latin1', at, at + 32);
  if (!/^[A-Za-z0-9!#&+.\-_]{32}$/.test(uuid)) throw damage('PV UUID contains invalid characters', 'PV header');
  const deviceSize = safeNumber(label.readBigUInt64LE(at + 32), 'PV device size', 'PV header');
  let cursor = at + 40;
  const readList = (what: string) => {
    const list: Array<{ offset: number; size: number }> = [];
    while (true) {
      if (cursor + 16 > SECTOR) throw damage(`${what} list runs past the label sector`, 'PV header');
      const offset = safeNumber(label.readBigUInt64LE(cursor), `${what} offset`, 'PV header');
      const size = safeNumber(label.readBigUInt64LE(cursor + 8), `${what} size`, 'PV header');
      cursor += 16;
      if (offset === 0) return list;
      if (list.length >= MAX_LIST_ENTRIES) throw damage(`too many ${what}s`, 'PV header');
      list.push({ offset, size });
    }
  };
  readList('data area');
  const metadataAreas = readList('metadata area').filter((mda) => mda.offset + MDA_HEADER_SIZE <= deviceBytes);
  return { uuid, deviceSize, metadataAreas };
}

function safeNumber(value: bigint, what: string, structure: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw damage(`${what} ${value} is absurd`, structure);
  return Number(value);
}

/** Reads the current metadata text of one metadata area; undefined when the area is ignored/empty. */
async function readMetadataText(dev: BlockDevice, area: { offset: number; size: number }): Promise<string | undefined> {
  const header = await dev.read(area.offset, MDA_HEADER_SIZE);
  if (lvmCrc(header.subarray(4)) !== header.readUInt32LE(0)) {
    throw damage(`metadata area header CRC mismatch at byte ${area.offset}`, 'metadata area header');
  }
  if (header.toString('latin1', 4, 20) !== MDA_MAGIC) throw damage('metadata area header has a wrong magic', 'metadata area header');
  if (header.readUInt32LE(20) !== 1) throw damage(`metadata area version ${header.readUInt32LE(20)} is unknown`, 'metadata area header');
  const start = safeNumber(header.readBigUInt64LE(24), 'metadata area start', 'metadata area header');
  const size = safeNumber(header.readBigUInt64LE(32), 'metadata area size', 'metadata area header');
  if (start !== area.offset) throw damage(`metadata area says it starts at ${start}, the label says ${area.offset}`, 'metadata area header');
  if (size <= MDA_HEADER_SIZE || start + size > dev.size) throw damage(`metadata area size ${size} is invalid`, 'metadata area header');
  const textOffset = safeNumber(header.readBigUInt64LE(40), 'metadata offset', 'metadata area header');
  const textSize = safeNumber(header.readBigUInt64LE(48), 'metadata size', 'metadata area header');
  const checksum = header.readUInt32LE(56);
  const flags = header.readUInt32LE(60);
  if (textOffset === 0 || textSize === 0 || (flags & RAW_LOCN_IGNORED) !== 0) return undefined;
  if (textOffset < MDA_HEADER_SIZE || textOffset >= size || textSize > size - MDA_HEADER_SIZE
    || textSize > MAX_METADATA_TEXT) {
    throw damage(`metadata text location ${textOffset}+${textSize} is outside its area`, 'metadata area header');
  }
  // The text area is a circular buffer after the header: a record may wrap to its beginning.
  const firstPart = Math.min(textSize, size - textOffset);
  const parts = [await dev.read(start + textOffset, firstPart)];
  if (firstPart < textSize) parts.push(await dev.read(start + MDA_HEADER_SIZE, textSize - firstPart));
  const text = Buffer.concat(parts);
  if (lvmCrc(text) !== checksum) throw damage('metadata text CRC mismatch', 'metadata text', { offset: start + textOffset });
  const nul = text.indexOf(0);
  return text.toString('utf8', 0, nul < 0 ? text.length : nul);
}

// ---------------------------------------------------------------------------------------------
// The LVM text configuration format: `key = value`, `name { ... }`, arrays `[a, b]`, strings with
// backslash escapes, `#` comments.

export type LvmValue = number | string | LvmValue[] | LvmSection;
export type LvmSection = Map<string, LvmValue>;

const MAX_DEPTH = 16;
const MAX_NODES = 1_000_000;

export function parseLvmText(text: string): LvmSection {
  return new LvmTextParser(text).parseDocument();
}

class LvmTextParser {
  private pos = 0;
  private nodes = 0;
  private readonly text: string;

  constructor(text: string) {
    this.text = text;
  }

  parseDocument(): LvmSection {
    const root = this.parseBody(0);
    this.skipBlank();
    if (this.pos < this.text.length) this.fail('unexpected "}"');
    return root;
  }

  private parseBody(depth: number): LvmSection {
    if (depth > MAX_DEPTH) this.fail(`sections nested deeper than ${MAX_DEPTH}`);
    const section: LvmSection = new Map();
    while (true) {
      this.skipBlank();
      if (this.pos >= this.text.length || this.text[this.pos] === '}') return section;
      const key = this.parseIdentifier();
      this.skipBlank();
      const c = this.text[this.pos];
      if (c === '{') {
        this.pos++;
        const child = this.parseBody(depth + 1);
        this.skipBlank();
        if (this.text[this.pos] !== '}') this.fail(`section "${key}" is not closed`);
        this.pos++;
        this.set(section, key, child);
      } else if (c === '=') {
        this.pos++;
        this.set(section, key, this.parseValue(depth + 1));
      } else {
        this.fail(`expected "=" or "{" after "${key}"`);
      }
    }
  }

  private set(section: LvmSection, key: string, value: LvmValue): void {
    if (++this.nodes > MAX_NODES) this.fail('too many entries');
    section.set(key, value);
  }

  private parseValue(depth: number): LvmValue {
    this.skipBlank();
    const c = this.text[this.pos];
    if (c === '[') {
      if (depth > MAX_DEPTH) this.fail('arrays nested too deep');
      this.pos++;
      const items: LvmValue[] = [];
      while (true) {
        this.skipBlank();
        if (this.text[this.pos] === ']') {
          this.pos++;
          return items;
        }
        if (items.length > 0) {
          if (this.text[this.pos] !== ',') this.fail('expected "," or "]" in an array');
          this.pos++;
        }
        if (++this.nodes > MAX_NODES) this.fail('too many entries');
        items.push(this.parseValue(depth + 1));
      }
    }
    if (c === '"') return this.parseString();
    return this.parseNumber();
  }

  private parseString(): string {
    this.pos++;
    let out = '';
    let runStart = this.pos;
    while (this.pos < this.text.length) {
      const c = this.text[this.pos];
      if (c === '"') {
        out += this.text.slice(runStart, this.pos);
        this.pos++;
        return out;
      }
      if (c === '\\') {
        out += this.text.slice(runStart, this.pos);
        this.pos++;
        if (this.pos >= this.text.length) break;
        out += this.text[this.pos];
        this.pos++;
        runStart = this.pos;
        continue;
      }
      this.pos++;
    }
    return this.fail('unterminated string');
  }

  private parseNumber(): number {
    const match = /^[-+]?\d+(\.\d+)?/.exec(this.text.slice(this.pos, this.pos + 64));
    if (!match) this.fail('expected a value');
    this.pos += match![0].length;
    const value = Number(match![0]);
    if (!Number.isFinite(value) || (Number.isInteger(value) && !Number.isSafeInteger(value))) this.fail(`number ${match![0]} is out of range`);
    return value;
  }

  private parseIdentifier(): string {
    const start = this.pos;
    while (this.pos < this.text.length && !/[\s{}[\]=,"#]/.test(this.text[this.pos])) this.pos++;
    if (this.pos === start) this.fail(`unexpected "${this.text[this.pos]}"`);
    return this.text.slice(start, this.pos);
  }

  private skipBlank(): void {
    while (this.pos < this.text.length) {
      const c = this.text[this.pos];
      if (c === '#') {
        const eol = this.text.indexOf('\n', this.pos);
        this.pos = eol < 0 ? this.text.length : eol + 1;
      } else if (c === ' ' || c === '\t' || c === '\n' || c === '\r') {
        this.pos++;
      } else {
        return;
      }
    }
  }

  private fail(message: string): never {
    const line = this.text.slice(0, this.pos).split('\n').length;
    throw damage(`metadata text, line ${line}: ${message}`, 'metadata text', { line });
  }
}

// ---------------------------------------------------------------------------------------------
// Volume groups and logical volumes

interface VgMetadata {
  name: string;
  id: string;
  seqno: number;
  section: LvmSection;
}

interface PvInfo {
  label: PhysicalVolumeLabel;
  device: BlockDevice;
}

/**
 * Lists the logical volumes of every volume group found on `pvs`. An LV whose PVs are not all
 * given, or whose segments this reader does not support, is still listed with `error` set and a
 * device whose reads fail with that error.
 */
export async function listLogicalVolumes(pvs: BlockDevice[]): Promise<LogicalVolume[]> {
  const byUuid = new Map<string, PvInfo>();
  const vgs = new Map<string, VgMetadata>();
  const metadataErrors: unknown[] = [];
  for (const device of pvs) {
    const label = await readPvLabel(device);
    if (!label) {
      throw new BadInputError('lvm_not_pv', 'the device has no LVM2 physical volume label', {
        hint: 'pass only LVM physical volumes',
      });
    }
    byUuid.set(label.uuid, { label, device });
    let vg: VgMetadata | undefined;
    try {
      vg = await readNewestMetadata(device, label);
    } catch (err) {
      // Another PV of the same VG may carry a good copy of the metadata.
      metadataErrors.push(err);
    }
    if (!vg) continue;
    const known = vgs.get(vg.id);
    if (!known || known.seqno < vg.seqno) vgs.set(vg.id, vg);
  }
  if (vgs.size === 0 && metadataErrors.length > 0) throw metadataErrors[0];
  const volumes: LogicalVolume[] = [];
  for (const vg of vgs.values()) volumes.push(...logicalVolumesOf(vg, byUuid));
  return volumes;
}

/** The newest (highest seqno) metadata among the PV's readable metadata areas. */
async function readNewestMetadata(device: BlockDevice, label: PhysicalVolumeLabel): Promise<VgMetadata | undefined> {
  let best: VgMetadata | undefined;
  let firstError: unknown;
  for (const area of label.metadataAreas) {
    try {
      const text = await readMetadataText(device, area);
      if (text === undefined) continue;
      const vg = vgFromText(text);
      if (!best || vg.seqno > best.seqno) best = vg;
    } catch (err) {
      firstError ??= err;
    }
  }
  if (!best && firstError) throw firstError;
  return best;
}

function vgFromText(text: string): VgMetadata {
  const root = parseLvmText(text);
  for (const [name, value] of root) {
    if (!(value instanceof Map) || !value.has('physical_volumes')) continue;
    return {
      name,
      id: str(value, 'id', `VG ${name}`),
      seqno: int(value, 'seqno', `VG ${name}`),
      section: value,
    };
  }
  throw damage('metadata text holds no volume group', 'metadata text');
}

function str(section: LvmSection, key: string, where: string): string {
  const value = section.get(key);
  if (typeof value !== 'string') throw damage(`${where}: "${key}" is missing or not a string`, 'metadata text');
  return value;
}

function int(section: LvmSection, key: string, where: string, min = 0): number {
  const value = section.get(key);
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    throw damage(`${where}: "${key}" is missing or not an integer >= ${min}`, 'metadata text');
  }
  return value;
}

function sub(section: LvmSection, key: string, where: string): LvmSection {
  const value = section.get(key);
  if (!(value instanceof Map)) throw damage(`${where}: section "${key}" is missing`, 'metadata text');
  return value;
}

function statusOf(section: LvmSection): string[] {
  const value = section.get('status');
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === 'string') : [];
}

/** A physical volume as the VG metadata describes it, resolved to a device when given. */
interface VgPv {
  name: string;
  uuid: string;
  peStartBytes: number;
  peCount: number;
  device?: BlockDevice;
}

/** One stripe area of a segment: its extents start at `firstExtent` of `pv`, i.e. at `byteOffset`. */
interface StripeArea {
  pv: VgPv;
  firstExtent: number;
  byteOffset: number;
}

interface Segment {
  /** Byte range in the LV. */
  start: number;
  length: number;
  /** Bytes per stripe chunk; equal to `length` for linear segments. */
  stripeBytes: number;
  areas: StripeArea[];
}

function logicalVolumesOf(vg: VgMetadata, byUuid: Map<string, PvInfo>): LogicalVolume[] {
  const where = `VG ${vg.name}`;
  const extentSectors = int(vg.section, 'extent_size', where, 1);
  const extentBytes = extentSectors * SECTOR;
  const pvs = new Map<string, VgPv>();
  for (const [name, value] of sub(vg.section, 'physical_volumes', where)) {
    if (!(value instanceof Map)) continue;
    const uuid = str(value, 'id', `PV ${name}`).replaceAll('-', '');
    pvs.set(name, {
      name,
      uuid,
      peStartBytes: int(value, 'pe_start', `PV ${name}`) * SECTOR,
      peCount: int(value, 'pe_count', `PV ${name}`),
      device: byUuid.get(uuid)?.device,
    });
  }
  const lvSection = vg.section.get('logical_volumes');
  if (!(lvSection instanceof Map)) return [];
  const volumes: LogicalVolume[] = [];
  for (const [name, value] of lvSection) {
    if (!(value instanceof Map) || !statusOf(value).includes('VISIBLE')) continue;
    volumes.push(buildVolume(vg.name, name, value, pvs, extentBytes));
  }
  return volumes;
}

function buildVolume(vgName: string, name: string, lv: LvmSection, pvs: Map<string, VgPv>, extentBytes: number): LogicalVolume {
  const where = `LV ${vgName}/${name}`;
  let segments: Segment[];
  try {
    segments = parseSegments(lv, pvs, extentBytes, where);
  } catch (err) {
    return failedVolume(vgName, name, 0, err instanceof Error ? err.message : String(err));
  }
  const size = segments.reduce((sum, s) => sum + s.length, 0);
  const missing = [...new Set(segments.flatMap((s) => s.areas.filter((a) => !a.pv.device).map((a) => a.pv.name)))];
  if (missing.length > 0) {
    const uuids = missing.map((n) => pvs.get(n)?.uuid ?? n).join(', ');
    return failedVolume(vgName, name, size, `${where} needs physical volume(s) ${missing.join(', ')} (UUID ${uuids}) ` +
      'that were not given: back up and attach every disk of the volume group');
  }
  for (const segment of segments) {
    for (const area of segment.areas) {
      const end = area.byteOffset + segment.length / segment.areas.length;
      if (end > (area.pv.device as BlockDevice).size) {
        return failedVolume(vgName, name, size, `${where} maps past the end of physical volume ${area.pv.name} ` +
          `(${end} > ${(area.pv.device as BlockDevice).size} bytes): the disk is truncated`);
      }
    }
  }
  return { vg: vgName, name, size, device: new LogicalVolumeDevice(where, size, segments) };
}

function failedVolume(vg: string, name: string, size: number, error: string): LogicalVolume {
  return {
    vg,
    name,
    size,
    error,
    device: {
      size,
      read: () => Promise.reject(new BadInputError('lvm_lv_unreadable', error, {
        context: { vg, lv: name },
      })),
    },
  };
}

function parseSegments(lv: LvmSection, pvs: Map<string, VgPv>, extentBytes: number, where: string): Segment[] {
  const count = int(lv, 'segment_count', where, 1);
  if (count > 100_000) throw damage(`${where}: segment_count ${count} is absurd`, 'metadata text');
  const segments: Segment[] = [];
  for (let i = 1; i <= count; i++) {
    const seg = sub(lv, `segment${i}`, where);
    const segWhere = `${where} segment${i}`;
    const type = str(seg, 'type', segWhere);
    if (type !== 'striped') {
      throw new BadInputError('lvm_unsupported_segment', `${segWhere} has type "${type}", which this reader cannot map ` +
        '(only linear and striped volumes are supported)', {
        context: { lv: where, segment: i, type },
        hint: 'restore the whole disks and activate the volume group with LVM itself',
      });
    }
    const startExtent = int(seg, 'start_extent', segWhere);
    const extentCount = int(seg, 'extent_count', segWhere, 1);
    if (!Number.isSafeInteger((startExtent + extentCount) * extentBytes)) {
      throw damage(`${segWhere}: extents ${startExtent}+${extentCount} of ${extentBytes} bytes are out of range`, 'metadata text');
    }
    const stripeCount = int(seg, 'stripe_count', segWhere, 1);
    const stripes = seg.get('stripes');
    if (!Array.isArray(stripes) || stripes.length !== stripeCount * 2) {
      throw damage(`${segWhere}: "stripes" does not list ${stripeCount} (pv, extent) pairs`, 'metadata text');
    }
    if (extentCount % stripeCount !== 0) throw damage(`${segWhere}: ${extentCount} extents do not split into ${stripeCount} stripes`, 'metadata text');
    const perStripe = extentCount / stripeCount;
    const areas: StripeArea[] = [];
    for (let s = 0; s < stripeCount; s++) {
      const pvName = stripes[2 * s];
      const firstExtent = stripes[2 * s + 1];
      const pv = typeof pvName === 'string' ? pvs.get(pvName) : undefined;
      if (!pv || typeof firstExtent !== 'number' || !Number.isSafeInteger(firstExtent) || firstExtent < 0) {
        throw damage(`${segWhere}: stripe ${s} names an unknown PV or a bad extent`, 'metadata text');
      }
      if (firstExtent + perStripe > pv.peCount) {
        throw damage(`${segWhere}: extents ${firstExtent}-${firstExtent + perStripe - 1} exceed the ${pv.peCount} extents of ${pv.name}`, 'metadata text');
      }
      areas.push({ pv, firstExtent, byteOffset: pv.peStartBytes + firstExtent * extentBytes });
    }
    const stripeBytes = stripeCount === 1 ? extentCount * extentBytes : int(seg, 'stripe_size', segWhere, 1) * SECTOR;
    if ((perStripe * extentBytes) % stripeBytes !== 0) {
      throw damage(`${segWhere}: stripe size ${stripeBytes} does not divide the stripe length`, 'metadata text');
    }
    segments.push({ start: startExtent * extentBytes, length: extentCount * extentBytes, stripeBytes, areas });
  }
  segments.sort((a, b) => a.start - b.start);
  let expected = 0;
  for (const s of segments) {
    if (s.start !== expected) throw damage(`${where}: segments leave a gap or overlap at byte ${expected}`, 'metadata text');
    expected = s.start + s.length;
  }
  return segments;
}

/** Maps LV byte ranges onto PV byte ranges (dm-linear / dm-stripe arithmetic). */
class LogicalVolumeDevice implements BlockDevice {
  readonly size: number;
  private readonly where: string;
  private readonly segments: Segment[];

  constructor(where: string, size: number, segments: Segment[]) {
    this.where = where;
    this.size = size;
    this.segments = segments;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this.where, this.size, offset, length);
    const pieces: Array<Promise<Buffer>> = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const segment = this.segmentAt(at);
      const inSegment = at - segment.start;
      const stripes = segment.areas.length;
      // Chunk k of the segment lives on stripe k % n, as that stripe's chunk floor(k / n).
      const chunk = Math.floor(inSegment / segment.stripeBytes);
      const inChunk = inSegment - chunk * segment.stripeBytes;
      const area = segment.areas[chunk % stripes];
      const chunkOnStripe = Math.floor(chunk / stripes);
      const n = Math.min(end - at, segment.stripeBytes - inChunk, segment.start + segment.length - at);
      const pvOffset = area.byteOffset + chunkOnStripe * segment.stripeBytes + inChunk;
      pieces.push((area.pv.device as BlockDevice).read(pvOffset, n));
      at += n;
    }
    const buffers = await Promise.all(pieces);
    return buffers.length === 1 ? buffers[0] : Buffer.concat(buffers);
  }

  private segmentAt(offset: number): Segment {
    let lo = 0;
    let hi = this.segments.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.segments[mid].start <= offset) lo = mid;
      else hi = mid - 1;
    }
    return this.segments[lo];
  }
}
