/**
 * Damage records (docs/repository-format.md §Damage records): what verification found broken,
 * kept in the repository so that the next backup heals it.
 *
 * `damaged/<time>-<random>` is a meta object listing damaged blob copies as (type, blob id, pack
 * id). Its effects, from the next index load on:
 *  - writers treat the id as absent and store a fresh copy when they meet the same data
 *    (self-healing) — Repository.avoids();
 *  - the index prefers any other copy of the id over a recorded damaged one, so after healing
 *    reads (restore, verify) use the fresh copy;
 *  - garbage collection treats a damaged copy that has a healthy twin as garbage, and deletes a
 *    record once no index names the damaged copy any more.
 */
import { randomBytes } from 'node:crypto';
import type { BlobStore } from '../store/store.ts';
import type { TresorError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';
import type { CodecKeys } from './codec.ts';
import { decodeMetaObject, encodeMetaObject, nameTime } from './meta-object.ts';

export interface DamagedCopy {
  /** Blob type (1 chunk, 2 index piece). */
  type: number;
  /** Blob id, hex. */
  id: string;
  /** Pack holding the damaged copy, hex. */
  pack: string;
  error: string;
}

interface DamageDocument {
  format: 'tresor-damage';
  version: 1;
  time: string;
  blobs: DamagedCopy[];
}

const MAX_RECORD = 16 << 20;
const RECORD_NAME = /^damaged\/\d{8}T\d{9}Z-[0-9a-f]{16}$/;
const HEX64 = /^[0-9a-f]{64}$/;

export interface DamageRecord {
  name: string;
  blobs: DamagedCopy[];
}

export async function writeDamageRecord(store: BlobStore, keys: CodecKeys, blobs: DamagedCopy[], at = new Date()): Promise<string | undefined> {
  if (blobs.length === 0) return undefined;
  const name = `damaged/${nameTime(at)}-${randomBytes(8).toString('hex')}`;
  const doc: DamageDocument = { format: 'tresor-damage', version: 1, time: at.toISOString(), blobs };
  await store.create(name, encodeMetaObject(keys, name, Buffer.from(JSON.stringify(doc))));
  return name;
}

function parseRecord(keys: CodecKeys, name: string, stored: Buffer): DamagedCopy[] {
  const doc = JSON.parse(decodeMetaObject(keys, name, stored, MAX_RECORD).toString('utf8')) as DamageDocument;
  if (doc?.format !== 'tresor-damage' || doc.version !== 1 || !Array.isArray(doc.blobs)) throw new Error(`${name} is not a damage record`);
  return doc.blobs.filter((b) => b && HEX64.test(b.id) && HEX64.test(b.pack) && Number.isInteger(b.type));
}

export interface DamageRecords {
  records: DamageRecord[];
  /** Records that could not be read: ignored (they only ever make writers store more). */
  unreadable: Array<{ name: string; error: string }>;
}

export async function readDamageRecords(store: BlobStore, keys: CodecKeys): Promise<DamageRecords> {
  const names: string[] = [];
  for await (const b of store.list('damaged/')) if (RECORD_NAME.test(b.name)) names.push(b.name);
  const unreadable: DamageRecords['unreadable'] = [];
  const records = await mapLimit(names, 8, async (name) => {
    try {
      return { name, blobs: parseRecord(keys, name, await store.read(name)) };
    } catch (err) {
      if ((err as TresorError).code !== 'blob-not-found') unreadable.push({ name, error: (err as Error).message });
      return undefined;
    }
  });
  return { records: records.filter((r): r is DamageRecord => r !== undefined), unreadable };
}
