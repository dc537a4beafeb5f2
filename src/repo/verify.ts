/**
 * Verification: re-reads snapshots and checks everything they depend on.
 *
 *  1. every index file decodes (SHA-256 name, authentication/CRC, structure);
 *  2. every selected manifest decodes and is authentic, and its disk maps' piece lists match
 *     their digests;
 *  3. every index piece and every chunk they reference is in the index, its pack exists and the
 *     blob lies inside it;
 *  4. (`readData`, the default) every such blob is read and decoded: AES-GCM tag or CRC32, zstd,
 *     length, and identity (SHA-256 / keyed HMAC of the plaintext equals its id). Each distinct
 *     blob is checked once, however many snapshots share it; packs are read in large ranges.
 *
 * Damage is reported per object with the snapshots, disks and disk offsets it affects.
 */
import { ZERO_ID, BlobType, BLOB_TYPE_NAMES, type BlobTypeValue } from './codec.ts';
import { type CodecPool, transferable } from './codec-pool.ts';
import type { DecodeItem } from './codec-ops.ts';
import { type BatchItem, BaseUses, baseFields, basesForWorker, newBaseCache, readBlobBatch } from './blob-batch.ts';
import { IdSet } from './id-set.ts';
import { DiskMapReader } from './disk-map.ts';
import type { SnapshotManifest } from './manifest.ts';
import { packIdFromName, packName } from './pack.ts';
import type { Repository } from './repository.ts';
import { mapLimit } from '../util/concurrency.ts';
import type { TresorError } from '../util/errors.ts';

export interface Affected {
  snapshot: string;
  disk?: string;
  /** Disk byte offsets that read the damaged object (first 16). */
  offsets?: number[];
}

export interface Damage {
  kind: 'index-file' | 'manifest' | 'index-piece' | 'chunk' | 'missing-blob' | 'missing-pack' | 'disk-map';
  object: string;
  error: string;
  affects: Affected[];
  /** For a damaged blob copy: its id, type and pack (hex), as damage records keep them. */
  copy?: { id: string; type: number; pack: string };
}

export interface VerifyReport {
  ok: boolean;
  snapshots: string[];
  indexFiles: number;
  blobsChecked: number;
  bytesRead: number;
  damage: Damage[];
  /** Not damage: packs no index names (left by an interrupted backup; gc removes them). */
  unindexedPacks: number;
}

export interface VerifyOptions {
  /** Verify only these snapshots (default: all). */
  snapshots?: string[];
  readData?: boolean;
  progress?: (doneBlobs: number, totalBlobs: number) => void;
}

/** Deltas per base from which a base is read once on this thread and kept, not sent stored with each delta. */
const SHARED_BASE_USES = 4;

export async function verifyRepository(repo: Repository, pool: CodecPool, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const damage: Damage[] = [];
  const index = await repo.index({ fresh: true });
  for (const d of repo.damagedIndexFiles) damage.push({ kind: 'index-file', object: d.name, error: d.error, affects: [] });

  // Manifests.
  const manifests: SnapshotManifest[] = [];
  if (opts.snapshots) {
    for (const name of opts.snapshots) {
      try {
        manifests.push(await repo.readSnapshot(name));
      } catch (err) {
        damage.push({ kind: 'manifest', object: repo.snapshotKey(name), error: (err as Error).message, affects: [{ snapshot: name }] });
      }
    }
  } else {
    const listing = await repo.listSnapshots();
    manifests.push(...listing.snapshots);
    for (const d of listing.damaged) damage.push({ kind: 'manifest', object: d.object, error: d.error, affects: [{ snapshot: `(unreadable manifest ${d.object})` }] });
  }

  // Packs that exist, for existence and bounds checks.
  const packSizes = new Map<string, number>();
  for await (const b of repo.store.list('data/')) {
    const id = packIdFromName(b.name);
    if (id) packSizes.set(id.toString('hex'), b.size);
  }
  const indexedPacks = new Set(index.packIds().map((p) => p.toString('hex')));
  let unindexedPacks = 0;
  for (const p of packSizes.keys()) if (!indexedPacks.has(p)) unindexedPacks++;

  // Collect referenced blobs: pieces first (they must be read to know the chunks). A repository
  // has millions: they are held compactly, `seen` by id and the chunks to read as index slots
  // (a Map of objects per blob took 500-800 bytes each).
  const seen = new IdSet();
  const chunks = new SlotList();
  let mapBlobs = 0;
  const bad = new Map<string, Damage>();
  const noteBlob = (id: Buffer, type: BlobTypeValue): void => {
    if (!seen.add(id)) return;
    if (type === BlobType.indexPiece || type === BlobType.mapNode) mapBlobs++;
    const slot = index.slotOf(id);
    if (slot < 0) {
      const hex = id.toString('hex');
      bad.set(hex, { kind: 'missing-blob', object: `${BLOB_TYPE_NAMES[type]} ${hex}`, error: 'not in any index (its pack is missing or unindexed)', affects: [] });
      return;
    }
    const loc = index.locationAt(slot);
    const size = packSizes.get(loc.packId.toString('hex'));
    const damaged = (kind: Damage['kind'], error: string, copyType: BlobTypeValue = type): void => {
      const hex = id.toString('hex');
      bad.set(hex, { kind, object: `${BLOB_TYPE_NAMES[copyType]} ${hex}`, error, affects: [], copy: { id: hex, type: copyType, pack: loc.packId.toString('hex') } });
    };
    if (size === undefined) {
      damaged('missing-pack', `its pack ${packName(loc.packId)} does not exist`);
    } else if (loc.offset + loc.length > size) {
      damaged('chunk', `its pack ${packName(loc.packId)} is truncated (${size} bytes, blob ends at ${loc.offset + loc.length})`);
    } else if (loc.type !== type && !(type === BlobType.chunk && loc.type === BlobType.deltaChunk)) {
      damaged('chunk', `the index says it is a ${BLOB_TYPE_NAMES[loc.type]}`);
    } else if (loc.base !== undefined) {
      // A delta chunk needs its base, checked like any chunk: a plain chunk, or a delta chunk
      // whose own base is a plain chunk (two levels at most, §4).
      noteBlob(loc.base, BlobType.chunk);
      const base = index.get(loc.base);
      const inner = base?.type === BlobType.deltaChunk && base.base !== undefined ? index.get(base.base) : undefined;
      if (inner?.type === BlobType.deltaChunk) {
        damaged('chunk', `its base ${loc.base.toString('hex')} is a delta chunk whose own base is a delta chunk too (at most two levels)`, loc.type);
      } else {
        chunks.push(slot);
      }
    } else if (type === BlobType.chunk) {
      chunks.push(slot);
    }
  };

  const readers: Array<{ m: SnapshotManifest; reader: DiskMapReader }> = [];
  // Nodes are read (and so checked) by opening the maps, several at once; a damaged one is named itself.
  const disks = manifests.flatMap((m) => m.disks.map((disk) => ({ m, disk })));
  for (const { disk } of disks) for (const n of disk.nodes ?? []) noteBlob(Buffer.from(n, 'hex'), BlobType.mapNode);
  const opened = await mapLimit(disks, 8, ({ m, disk }) => DiskMapReader.open(repo, m.name, disk, { cacheSize: 1 }).then(
    (reader) => ({ reader, err: undefined }), (err: unknown) => ({ reader: undefined, err })));
  for (const [n, { m, disk }] of disks.entries()) {
    const { reader, err } = opened[n];
    if (reader) {
      readers.push({ m, reader });
      for (let p = 0; p < reader.pieceCount(); p++) noteBlob(Buffer.from(reader.pieceId(p), 'hex'), BlobType.indexPiece);
    } else {
      const blob = (err as TresorError).context?.blob;
      const node = typeof blob === 'string' && disk.nodes?.includes(blob) ? blob : undefined;
      const affects = { snapshot: m.name, disk: disk.name };
      if (node && bad.has(node)) {
        bad.get(node)!.affects.push(affects);
      } else if (node) {
        const loc = index.get(Buffer.from(node, 'hex'));
        bad.set(node, { kind: 'disk-map', object: `disk-map node ${node}`, error: (err as Error).message, affects: [affects], copy: loc && { id: node, type: BlobType.mapNode, pack: loc.packId.toString('hex') } });
      } else {
        damage.push({ kind: 'disk-map', object: `disk ${disk.name} of ${m.name}`, error: (err as Error).message, affects: [affects] });
      }
    }
  }
  // Read every piece once (through the normal decode path, which checks it) and note its chunks.
  const pieceErrors = new Map<string, string>();
  const pieceItems: BatchItem[] = [];
  const queued = new Set<string>();
  for (const { reader } of readers) {
    const { disk, snapshot } = reader;
    for (let p = 0; p < reader.pieceCount(); p++) {
      const pid = reader.pieceId(p);
      if (bad.has(pid) || queued.has(pid)) continue;
      queued.add(pid);
      pieceItems.push({
        id: Buffer.from(pid, 'hex'), type: BlobType.indexPiece, length: Math.min(disk.pieceSlots, reader.slots - p * disk.pieceSlots) * 32,
        what: () => `index piece ${p} of disk ${disk.name} in snapshot ${snapshot}`,
      });
    }
  }
  await readBlobBatch(repo, pieceItems, (item, outcome) => {
    if (outcome.plain === undefined) {
      pieceErrors.set(item.id.toString('hex'), (outcome.error as Error).message);
      return;
    }
    const ids = outcome.plain;
    for (let k = 0; k < ids.length; k += 32) {
      const id = ids.subarray(k, k + 32);
      if (!ZERO_ID.equals(id)) noteBlob(Buffer.from(id), BlobType.chunk);
    }
  });
  for (const [pid, error] of pieceErrors) {
    const loc = index.get(Buffer.from(pid, 'hex'));
    bad.set(pid, { kind: 'index-piece', object: `index piece ${pid}`, error, affects: [], copy: loc && { id: pid, type: BlobType.indexPiece, pack: loc.packId.toString('hex') } });
  }

  // Read and decode every referenced chunk, grouped by pack.
  let blobsChecked = 0;
  let bytesRead = 0;
  if (opts.readData !== false) {
    const byPack = chunks.groupBy((slot) => index.packNumberAt(slot), index.packCount);
    const total = chunks.length;
    // A base that many deltas share (a compression dictionary, thousands) is read and decoded
    // here once and kept. The others (an incremental's parent chunks, one delta each) travel
    // as stored to the worker that checks their deltas, which decodes them there: decoding them
    // on this thread made it the bottleneck of verification (docs/performance.md, thirteenth
    // session). Every base is a chunk verified on its own too, so as a base its AES-GCM tag
    // stands for its identity (trustBaseAead).
    const baseCache = newBaseCache();
    const uses = new BaseUses();
    for (const slot of chunks) {
      const base = index.baseIdAt(slot);
      if (base !== undefined) uses.add(base);
    }
    const sharedBase = (id: Buffer): boolean => baseCache.has(id.toString('hex')) || uses.count(id) >= SHARED_BASE_USES;
    await mapLimit(byPack, 2, async (slots) => {
      // Location objects for one pack at a time.
      const list = Array.from(slots, (slot) => ({ hex: index.idAt(slot).toString('hex'), loc: index.locationAt(slot) }));
      list.sort((a, b) => a.loc.offset - b.loc.offset);
      const pack = packName(list[0].loc.packId);
      for (let i = 0; i < list.length;) {
        // Read up to ~8 MiB of consecutive blobs at once.
        let j = i + 1;
        while (j < list.length && list[j].loc.offset + list[j].loc.length - list[i].loc.offset <= 4 << 20) j++;
        const from = list[i].loc.offset;
        const to = list[j - 1].loc.offset + list[j - 1].loc.length;
        let data: Buffer;
        try {
          data = await repo.store.read(pack, { offset: from, length: to - from });
        } catch (err) {
          for (const b of list.slice(i, j)) bad.set(b.hex, { kind: 'chunk', object: `chunk ${b.hex}`, error: `cannot read ${pack}: ${(err as Error).message}`, affects: [] });
          i = j;
          continue;
        }
        bytesRead += data.length;
        const slice = list.slice(i, j);
        // Delta chunks are checked against their bases: shared ones read here, the others by the worker.
        const { baseOf, transfer } = await basesForWorker(repo, slice.map((b) => b.loc), (id) => `chunk ${id.toString('hex')}`, sharedBase, { cache: baseCache, onFetch: (n) => { bytesRead += n; } });
        const items: DecodeItem[] = slice.map((b) => ({
          type: b.loc.type, id: Buffer.from(b.hex, 'hex'), rawLength: b.loc.rawLength,
          stored: data.subarray(b.loc.offset - from, b.loc.offset - from + b.loc.length), label: `${BLOB_TYPE_NAMES[b.loc.type]} ${b.hex} in ${pack}`,
          ...baseFields(baseOf(b.loc)),
        }));
        // The ranges move to the worker (detached here): no copy, and freed there once checked.
        const results = await pool.check(items, [...transferable(data), ...transfer], { trustBaseAead: true });
        results.forEach((r, n) => {
          const b = slice[n];
          const base = baseOf(b.loc);
          const error = base instanceof Error ? `its base cannot be read: ${base.message}` : r.ok ? undefined : r.message;
          if (error !== undefined) bad.set(b.hex, { kind: 'chunk', object: `${BLOB_TYPE_NAMES[b.loc.type]} ${b.hex} in ${pack}`, error, affects: [], copy: { id: b.hex, type: b.loc.type, pack: b.loc.packId.toString('hex') } });
        });
        blobsChecked += items.length;
        opts.progress?.(blobsChecked, total);
        i = j;
      }
    });
  }
  // Pieces were decoded while collecting.
  blobsChecked += mapBlobs;

  // Map damaged blobs back to the snapshots, disks and offsets that use them.
  if (bad.size > 0) {
    for (const { m, reader } of readers) {
      const disk = reader.disk;
      const hits = new Map<string, number[]>();
      for (let p = 0; p < reader.pieceCount(); p++) {
        const pid = reader.pieceId(p);
        if (bad.has(pid)) {
          addHit(hits, pid, p * disk.pieceSlots * disk.chunkSize);
          continue;
        }
        let ids: Buffer;
        try {
          ids = await reader.piece(p);
        } catch {
          continue;
        }
        for (let k = 0; k < ids.length; k += 32) {
          const hex = ids.subarray(k, k + 32).toString('hex');
          if (bad.has(hex)) addHit(hits, hex, (p * disk.pieceSlots + k / 32) * disk.chunkSize);
        }
      }
      for (const [hex, offsets] of hits) bad.get(hex)!.affects.push({ snapshot: m.name, disk: disk.name, offsets: offsets.slice(0, 16) });
    }
  }
  damage.push(...bad.values());
  return {
    ok: damage.length === 0,
    snapshots: manifests.map((m) => m.name),
    indexFiles: repo.indexFiles.size + repo.damagedIndexFiles.length,
    blobsChecked, bytesRead, damage, unindexedPacks,
  };
}

/** Index slots in a growable typed array (4 bytes each). */
class SlotList {
  #slots = new Uint32Array(1024);
  length = 0;

  push(slot: number): void {
    if (this.length === this.#slots.length) {
      const grown = new Uint32Array(this.#slots.length * 2);
      grown.set(this.#slots);
      this.#slots = grown;
    }
    this.#slots[this.length++] = slot;
  }

  [Symbol.iterator](): Iterator<number> {
    return this.#slots.subarray(0, this.length)[Symbol.iterator]();
  }

  /** The slots grouped by `key` (0 … keys-1), each group in the order pushed; empty groups left out. */
  groupBy(key: (slot: number) => number, keys: number): Uint32Array[] {
    const starts = new Uint32Array(keys + 1);
    for (let i = 0; i < this.length; i++) starts[key(this.#slots[i]) + 1]++;
    for (let k = 0; k < keys; k++) starts[k + 1] += starts[k];
    const next = starts.slice(0, keys);
    const grouped = new Uint32Array(this.length);
    for (let i = 0; i < this.length; i++) grouped[next[key(this.#slots[i])]++] = this.#slots[i];
    const groups: Uint32Array[] = [];
    for (let k = 0; k < keys; k++) if (starts[k + 1] > starts[k]) groups.push(grouped.subarray(starts[k], starts[k + 1]));
    return groups;
  }
}

function addHit(hits: Map<string, number[]>, hex: string, offset: number): void {
  let list = hits.get(hex);
  if (!list) hits.set(hex, (list = []));
  if (list.length < 16) list.push(offset);
}
