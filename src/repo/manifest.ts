/**
 * Snapshot manifests and snapshot names.
 *
 * A snapshot is named `<type>/<id>/<UTC time, basic ISO 8601>`, e.g. `vm/web1/20261122T101500Z`:
 * no ':' so it is a safe file name, S3 key and the first part of `SNAPSHOT:DISK:PART` references.
 * The manifest is stored at `snapshots/<hex>` where hex = the keyed name id of the snapshot name
 * (HMAC when encrypted, so names are not readable from object keys), created only if absent:
 * two writers can never both commit the same name. Its plaintext is JSON (docs §Manifests).
 */
import { BadInputError, UsageError } from '../util/errors.ts';

export const SNAPSHOT_TYPES = ['image', 'vm', 'files', 'host', 'db'] as const;
export type SnapshotType = (typeof SNAPSHOT_TYPES)[number];

const ID_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const TIME_RE = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/;

export interface DiskRecord {
  /** Disk name inside the snapshot: `disk0` for image backups, the target (`vda`) for VMs. */
  name: string;
  size: number;
  chunkSize: number;
  /** Slots per index piece. */
  pieceSlots: number;
  /** Version 1 manifests: hex ids of the index pieces, in order. */
  pieces?: string[];
  /** Version 2: piece ids per disk-map node (disk-map.ts). */
  nodeIds?: number;
  /** Version 2: hex ids of the disk-map nodes, in order; they list the piece ids. */
  nodes?: string[];
  /** SHA-256 over the concatenated binary piece ids: one checksum for the whole disk map. */
  digest: string;
  /** Format the disk was read from (raw, qcow2, nbd...). */
  sourceFormat: string;
  /** Bytes of the disk covered by data chunks (the rest are holes). */
  dataBytes: number;
  dataChunks: number;
  /** Where an incremental was possible: which parent disk it was based on (else why not). */
  base?: { snapshot: string; reason?: string };
  /** Bytes read from the source for this disk (an incremental reads only what changed). */
  bytesRead?: number;
}

export interface SnapshotStats {
  bytesRead: number;
  newChunks: number;
  newChunkBytes: number;
  /** Bytes added to the repository by this snapshot (stored packs + index + manifest). */
  addedBytes: number;
  reusedChunks: number;
  durationMs: number;
}

export interface SnapshotManifest {
  format: 'tresor-snapshot';
  /** 1: disks list their piece ids; 2 (written now): disks list disk-map nodes. */
  version: 1 | 2;
  name: string;
  type: SnapshotType;
  id: string;
  /** ISO 8601 with milliseconds: the point in time of the snapshot. */
  time: string;
  started: string;
  finished: string;
  parent: string | null;
  host: string;
  tool: { name: 'tresor'; version: string };
  source: Record<string, unknown>;
  disks: DiskRecord[];
  stats: SnapshotStats;
  tags: Record<string, string>;
}

export function validateSourceId(id: string): string {
  if (!ID_RE.test(id)) {
    throw new UsageError(`invalid backup id ${JSON.stringify(id)}`, 'use 1-128 characters from letters, digits, ".", "_" and "-", starting with a letter, digit or "_"');
  }
  return id;
}

export function formatSnapshotTime(d: Date): string {
  return d.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}Z$/, 'Z');
}

export function snapshotName(type: SnapshotType, id: string, time: Date): string {
  return `${type}/${validateSourceId(id)}/${formatSnapshotTime(time)}`;
}

export interface ParsedSnapshotName {
  type: SnapshotType;
  id: string;
  time: Date;
}

export function parseSnapshotName(name: string): ParsedSnapshotName {
  const parts = name.split('/');
  const m = parts.length === 3 ? TIME_RE.exec(parts[2]) : null;
  if (!m || !(SNAPSHOT_TYPES as readonly string[]).includes(parts[0]) || !ID_RE.test(parts[1])) {
    throw new BadInputError('bad-snapshot-name', `${JSON.stringify(name)} is not a snapshot name`, {
      hint: 'snapshot names look like image/db1/20261122T101500Z; list them with `tresor snapshots`',
    });
  }
  const time = new Date(Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]));
  return { type: parts[0] as SnapshotType, id: parts[1], time };
}

export const MANIFEST_VERSION = 2;

const isIdList = (l: unknown): l is string[] => Array.isArray(l) && l.every((p) => typeof p === 'string' && /^[0-9a-f]{64}$/.test(p));

export function validateManifest(m: unknown, where: string): SnapshotManifest {
  const x = m as SnapshotManifest;
  const ok = x && x.format === 'tresor-snapshot' && (x.version === 1 || x.version === 2) && typeof x.name === 'string'
    && Array.isArray(x.disks) && x.disks.every((d) => {
      if (typeof d?.name !== 'string' || !Number.isSafeInteger(d.size) || d.size < 0 || !Number.isSafeInteger(d.chunkSize) || d.chunkSize <= 0
        || !Number.isSafeInteger(d.pieceSlots) || d.pieceSlots <= 0 || typeof d.digest !== 'string') return false;
      const pieces = Math.ceil(Math.ceil(d.size / d.chunkSize) / d.pieceSlots);
      return x.version === 1
        ? isIdList(d.pieces) && d.pieces.length === pieces
        : d.pieces === undefined && Number.isSafeInteger(d.nodeIds) && d.nodeIds! > 0 && isIdList(d.nodes) && d.nodes.length === Math.ceil(pieces / d.nodeIds!);
    });
  if (!ok) throw new BadInputError('bad-manifest', `${where} is not a valid Tresor snapshot manifest (version 1 or 2)`, { hint: 'run `tresor verify` to see the damage; a newer Tresor may have written it' });
  return x;
}
