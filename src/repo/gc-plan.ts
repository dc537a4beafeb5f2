/**
 * The persistent state of a garbage collection in progress (docs/repository-format.md §Garbage
 * collection): `gc/<plan id>/plan` and `gc/<plan id>/blockers`, both meta objects.
 *
 * The plan is what makes GC safe while backups run and resumable after a crash: while it exists,
 * every writer that loads the index treats its condemned ids as absent (Repository.avoids), so no
 * new snapshot can start to depend on a blob GC is about to delete; and a GC started later (after
 * a crash, or because the first one stopped waiting) finishes this plan before making another.
 *
 * Plan plaintext: "TGC1" | u32 json length | JSON header | u32 n | n condemned blob ids [32]
 *                 | u32 m | m manifest name ids [32] (the snapshots the mark phase saw)
 */
import type { BlobStore } from '../store/store.ts';
import { DamageError, type TresorError } from '../util/errors.ts';
import type { CodecKeys } from './codec.ts';
import { decodeMetaObject, encodeMetaObject } from './meta-object.ts';

const MAGIC = Buffer.from('TGC1');
const MAX_PLAN = 1 << 30;
export const PLAN_NAME = /^gc\/([0-9a-f]{32})\/plan$/;

export interface PlanHeader {
  format: 'tresor-gc-plan';
  version: 1;
  id: string;
  created: string;
  host: string;
  /** Index files the plan's view was made of; the final index supersedes them all. */
  indexFiles: string[];
  /** Index files written by the plan (relocating repacked blobs); superseded by the final index. */
  planIndexFiles: string[];
  /** Packs with no live blob. */
  deletePacks: string[];
  /** Packs whose live blobs were copied into new packs. */
  repackedPacks: string[];
  /** Packs no index named when the plan was made (interrupted writers, or writers still running). */
  unindexedPacks: string[];
  /** Expected effect, for reports. */
  stats: { garbageBlobs: number; garbageBytes: number; repackedBlobs: number; repackedBytes: number };
}

export interface GcPlan {
  header: PlanHeader;
  /** Blob ids no snapshot referenced: writers must not deduplicate against them. */
  condemned: Buffer[];
  /** Name ids (hex) of the manifests the mark phase read. */
  seenManifests: string[];
}

export interface LockIdentity {
  host: string;
  pid: number;
  started?: string;
  operation: string;
}

export interface BlockersDocument {
  format: 'tresor-gc-blockers';
  version: 1;
  time: string;
  /** Locks that existed when the plan became visible: GC deletes nothing until they are gone. */
  locks: LockIdentity[];
}

export function planName(id: string): string {
  return `gc/${id}/plan`;
}

export function blockersName(id: string): string {
  return `gc/${id}/blockers`;
}

export function encodePlan(keys: CodecKeys, plan: GcPlan): { name: string; data: Buffer } {
  const json = Buffer.from(JSON.stringify(plan.header));
  const size = 4 + 4 + json.length + 4 + plan.condemned.length * 32 + 4 + plan.seenManifests.length * 32;
  const buf = Buffer.allocUnsafe(size);
  let o = MAGIC.copy(buf, 0);
  o = buf.writeUInt32LE(json.length, o);
  o += json.copy(buf, o);
  o = buf.writeUInt32LE(plan.condemned.length, o);
  for (const id of plan.condemned) o += id.copy(buf, o);
  o = buf.writeUInt32LE(plan.seenManifests.length, o);
  for (const hex of plan.seenManifests) o += Buffer.from(hex, 'hex').copy(buf, o);
  const name = planName(plan.header.id);
  return { name, data: encodeMetaObject(keys, name, buf) };
}

export function decodePlan(keys: CodecKeys, name: string, stored: Buffer): GcPlan {
  const bad = (why: string): never => {
    throw new DamageError('damaged-gc-plan', `garbage collection plan ${name} is damaged: ${why}`, {
      hint: 'nothing was deleted on the strength of it being damaged; run `tresor check`', context: { object: name },
    });
  };
  const plain = decodeMetaObject(keys, name, stored, MAX_PLAN);
  if (plain.length < 8 || !plain.subarray(0, 4).equals(MAGIC)) bad('bad magic');
  let o = 4;
  const need = (n: number) => {
    if (o + n > plain.length) bad(`truncated at byte ${o}`);
  };
  const jsonLength = plain.readUInt32LE(o);
  o += 4;
  need(jsonLength);
  let header: PlanHeader;
  try {
    header = JSON.parse(plain.subarray(o, o + jsonLength).toString('utf8')) as PlanHeader;
  } catch {
    return bad('header is not JSON');
  }
  o += jsonLength;
  const lists = ['indexFiles', 'planIndexFiles', 'deletePacks', 'repackedPacks', 'unindexedPacks'] as const;
  if (header?.format !== 'tresor-gc-plan' || header.version !== 1 || !lists.every((k) => Array.isArray(header[k]) && header[k].every((x) => typeof x === 'string'))) {
    bad('header has the wrong shape');
  }
  need(4);
  const n = plain.readUInt32LE(o);
  o += 4;
  need(n * 32);
  const condemned: Buffer[] = [];
  for (let i = 0; i < n; i++, o += 32) condemned.push(Buffer.from(plain.subarray(o, o + 32)));
  need(4);
  const m = plain.readUInt32LE(o);
  o += 4;
  need(m * 32);
  const seenManifests: string[] = [];
  for (let i = 0; i < m; i++, o += 32) seenManifests.push(plain.subarray(o, o + 32).toString('hex'));
  if (o !== plain.length) bad(`${plain.length - o} trailing bytes`);
  return { header, condemned, seenManifests };
}

export function encodeBlockers(keys: CodecKeys, planId: string, doc: BlockersDocument): { name: string; data: Buffer } {
  const name = blockersName(planId);
  return { name, data: encodeMetaObject(keys, name, Buffer.from(JSON.stringify(doc))) };
}

export function decodeBlockers(keys: CodecKeys, name: string, stored: Buffer): BlockersDocument {
  const doc = JSON.parse(decodeMetaObject(keys, name, stored, 16 << 20).toString('utf8')) as BlockersDocument;
  if (doc?.format !== 'tresor-gc-blockers' || !Array.isArray(doc.locks)) {
    throw new DamageError('damaged-gc-plan', `${name} is not a list of garbage collection blockers`, { context: { object: name } });
  }
  return doc;
}

/**
 * Every GC plan in the repository (normally none or one), and the names of plans that cannot be
 * decoded. A damaged plan can be ignored safely: GC writes the final index, which no longer names
 * condemned blobs, before it deletes any pack, so at every moment either nothing of the plan was
 * deleted or nothing deleted is still named by an index.
 */
export async function readPlans(store: BlobStore, keys: CodecKeys): Promise<{ plans: GcPlan[]; damaged: string[] }> {
  const plans: GcPlan[] = [];
  const damaged: string[] = [];
  for await (const b of store.list('gc/')) {
    if (!PLAN_NAME.test(b.name)) continue;
    try {
      plans.push(decodePlan(keys, b.name, await store.read(b.name)));
    } catch (err) {
      if ((err as TresorError).code === 'blob-not-found') continue; // finished meanwhile
      if (err instanceof DamageError || err instanceof SyntaxError) damaged.push(b.name);
      else throw err;
    }
  }
  return { plans, damaged };
}
