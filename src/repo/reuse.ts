/**
 * Which blobs writers must not deduplicate against, loaded with the blob index:
 *  - blobs condemned by a garbage collection in progress (gc-plan.ts): GC will delete them once
 *    the writers that could still use them are gone, so a writer that starts now stores a fresh
 *    copy instead;
 *  - blob copies recorded as damaged (damage-records.ts): the index prefers any other copy, and
 *    while the damaged copy is the only one, writers store a fresh copy (self-healing).
 */
import type { BlobStore } from '../store/store.ts';
import type { CodecKeys } from './codec.ts';
import { readDamageRecords } from './damage-records.ts';
import { readPlans } from './gc-plan.ts';
import { IdSet } from './id-set.ts';

export interface ReuseExclusions {
  /** Ids condemned by a pending garbage collection. */
  condemned: IdSet;
  /** Damaged copies: blob id hex → pack ids (hex) holding a damaged copy. */
  damaged: Map<string, Set<string>>;
}

export async function loadReuseExclusions(store: BlobStore, keys: CodecKeys): Promise<ReuseExclusions> {
  const [{ plans }, { records }] = await Promise.all([readPlans(store, keys), readDamageRecords(store, keys)]);
  const condemned = new IdSet(plans.reduce((n, p) => n + p.condemned.length, 0) * 1.5);
  for (const p of plans) for (const id of p.condemned) condemned.add(id);
  const damaged = new Map<string, Set<string>>();
  for (const r of records) {
    for (const b of r.blobs) {
      let packs = damaged.get(b.id);
      if (!packs) damaged.set(b.id, (packs = new Set()));
      packs.add(b.pack);
    }
  }
  return { condemned, damaged };
}
