/**
 * Restores one disk of a snapshot into a DiskWriter.
 *
 * Works in units of whole disk-map pieces, at least 1024 slots (128 MiB of disk): the distinct
 * chunks of a unit are located in the index, grouped by pack and sorted by offset, adjacent
 * ones are fetched with one ranged read, decoded (decrypted, decompressed, identity-checked:
 * by the AES-GCM tag when encrypted, codec.ts DecodeExpect.trustAead) in
 * the worker pool, and written to every slot that uses them. Holes are never written, so raw
 * output stays sparse. Two units are in flight to keep storage and both cores busy.
 */
import { ZERO_ID, isChunkType } from '../repo/codec.ts';
import { baseFields, baseUses, basesForWorker, newBaseCache } from '../repo/blob-batch.ts';
import { type CodecPool, transferable } from '../repo/codec-pool.ts';
import { BASE_UNREADABLE, type DecodeItem } from '../repo/codec-ops.ts';
import { DiskMapReader, slotLength, unitPieces } from '../repo/disk-map.ts';
import type { DiskRecord } from '../repo/manifest.ts';
import { packName } from '../repo/pack.ts';
import type { Repository } from '../repo/repository.ts';
import type { DiskWriter } from '../image/disk.ts';
import { DamageError, TresorError } from '../util/errors.ts';
import { SharedBufferPool, mapLimit } from '../util/concurrency.ts';
import type { BlobLocation } from '../repo/blob-index.ts';

export interface DiskRestoreOptions {
  progress?: (doneBytes: number) => void;
  signal?: AbortSignal;
  /** Max gap between two blobs of a pack that is still read in one request. */
  coalesceGap?: number;
  /** Max bytes of one ranged read. */
  maxReadBytes?: number;
  /** Bytes of stored and decoded data in flight at once (bounds memory). */
  inFlightBytes?: number;
}

export interface DiskRestoreStats {
  bytesWritten: number;
  bytesFetched: number;
  chunks: number;
}

interface Wanted {
  id: Buffer;
  loc: BlobLocation;
  slots: number[];
}

export async function restoreDisk(
  repo: Repository, pool: CodecPool, snapshot: string, disk: DiskRecord, out: DiskWriter, opts: DiskRestoreOptions = {},
): Promise<DiskRestoreStats> {
  const perUnit = unitPieces(disk.pieceSlots);
  const unitSlots = perUnit * disk.pieceSlots;
  const map = await DiskMapReader.open(repo, snapshot, disk, { readAhead: 2 * perUnit });
  const index = await repo.index();
  const stats: DiskRestoreStats = { bytesWritten: 0, bytesFetched: 0, chunks: 0 };
  const gap = opts.coalesceGap ?? 256 * 1024;
  const maxRead = opts.maxReadBytes ?? 2 << 20;
  // Plaintexts land in a few reused shared buffers (codec-ops.ts decode `into`): memory is fixed
  // up front, and the number of buffers bounds the runs in flight (each also holds ≤ maxRead).
  const slabBytes = Math.max(4 << 20, disk.chunkSize);
  const slabs = new SharedBufferPool(Math.max(1, Math.floor((opts.inFlightBytes ?? 24 << 20) / (slabBytes + maxRead))), slabBytes);
  // Compression dictionaries are the bases of thousands of chunks: read once.
  const baseCache = newBaseCache();
  let done = 0;

  const restoreUnit = async (u: number): Promise<void> => {
    if (opts.signal?.aborted) throw opts.signal.reason ?? new TresorError('aborted', 'restore cancelled');
    const firstSlot = u * unitSlots;
    const ids = await map.ids(firstSlot, Math.min(unitSlots, map.slots - firstSlot));
    const wanted = new Map<string, Wanted>();
    for (let k = 0; k < ids.length / 32; k++) {
      const id = ids.subarray(k * 32, k * 32 + 32);
      if (ZERO_ID.equals(id)) continue;
      const hex = id.toString('hex');
      let w = wanted.get(hex);
      if (!w) {
        const loc = index.get(id);
        if (!loc) {
          throw new DamageError('missing-chunk', `snapshot ${snapshot} cannot be restored: the chunk for disk ${disk.name} at offset ${(firstSlot + k) * disk.chunkSize} (chunk ${hex}) is missing from the repository`, {
            context: { snapshot, disk: disk.name, offset: (firstSlot + k) * disk.chunkSize, chunk: hex },
          });
        }
        if (!isChunkType(loc.type)) {
          throw new DamageError('wrong-blob-type', `snapshot ${snapshot}: disk ${disk.name} at offset ${(firstSlot + k) * disk.chunkSize} refers to blob ${hex}, which is not a data chunk`, { context: { snapshot, disk: disk.name, chunk: hex } });
        }
        w = { id: Buffer.from(id), loc, slots: [] };
        wanted.set(hex, w);
      }
      w.slots.push(firstSlot + k);
    }
    const runs = coalesce([...wanted.values()], gap, maxRead, slabBytes);
    await mapLimit(runs, 4, async (run) => {
      const slab = await slabs.acquire();
      try {
        await restoreRun(run, slab);
      } finally {
        slabs.release(slab);
      }
    });
    done += Math.min(unitSlots * disk.chunkSize, disk.size - firstSlot * disk.chunkSize);
    opts.progress?.(done);
  };

  const restoreRun = async (run: ReadRun, slab: SharedArrayBuffer): Promise<void> => {
    const pack = packName(run.packId);
    // Delta chunks decode against their bases (plain chunks, mostly in other packs), read at the
    // same time as the run itself: a base several of them share (a compression dictionary) is
    // decoded here once and kept, the others go as stored to the worker that decodes the run.
    const uses = baseUses(run.blobs.map((w) => w.loc));
    const shared = (id: Buffer): boolean => baseCache.has(id.toString('hex')) || uses.count(id) > 1;
    const [data, { baseOf, transfer }] = await Promise.all([
      repo.store.read(pack, { offset: run.offset, length: run.length }),
      basesForWorker(repo, run.blobs.map((w) => w.loc), (id) => `chunk ${id.toString('hex')} (the base of a delta chunk of snapshot ${snapshot})`, shared, { trustAead: true, cache: baseCache, onFetch: (n) => { stats.bytesFetched += n; } }),
    ]);
    stats.bytesFetched += data.length;
    let at = 0;
    const items: DecodeItem[] = run.blobs.map((w) => {
      const base = baseOf(w.loc);
      if (base instanceof Error) {
        throw new DamageError('damaged-chunk', `snapshot ${snapshot} cannot be restored: delta chunk ${w.id.toString('hex')} of disk ${disk.name} cannot be decoded: ${base.message}`, {
          context: { snapshot, disk: disk.name, chunk: w.id.toString('hex'), base: w.loc.base!.toString('hex') },
        });
      }
      const item = {
        type: w.loc.type, id: w.id, rawLength: w.loc.rawLength, at, ...baseFields(base),
        stored: data.subarray(w.loc.offset - run.offset, w.loc.offset - run.offset + w.loc.length),
        label: `chunk ${w.id.toString('hex')} in ${pack}`,
      };
      at += w.loc.rawLength;
      return item;
    });
    // The range moves to the worker (no copy); it is detached here from now on.
    const results = await pool.decodeInto(items, slab, [...transferable(data), ...transfer], { trustAead: true });
    const placed: Array<{ slot: number; plain: Buffer }> = [];
    for (let n = 0; n < results.length; n++) {
      const r = results[n];
      const w = run.blobs[n];
      if (!r.ok) {
        const offsets = w.slots.map((s) => s * disk.chunkSize);
        const why = r.code === BASE_UNREADABLE ? `delta chunk ${w.id.toString('hex')} of disk ${disk.name} cannot be decoded: ${r.message}` : r.message;
        throw new DamageError('damaged-chunk', `snapshot ${snapshot} cannot be restored: ${why}; it holds disk ${disk.name} at offset${offsets.length > 1 ? 's' : ''} ${offsets.slice(0, 8).join(', ')}${offsets.length > 8 ? ', …' : ''}`, {
          context: { snapshot, disk: disk.name, chunk: w.id.toString('hex'), pack, offsets: offsets.slice(0, 64) },
        });
      }
      const plain = Buffer.from(slab, items[n].at, w.loc.rawLength);
      for (const s of w.slots) {
        if (plain.length !== slotLength(disk.size, disk.chunkSize, s)) {
          throw new DamageError('damaged-chunk', `chunk ${w.id.toString('hex')} has ${plain.length} bytes but disk ${disk.name} of snapshot ${snapshot} needs ${slotLength(disk.size, disk.chunkSize, s)} at offset ${s * disk.chunkSize}`, { context: { snapshot, disk: disk.name } });
        }
        placed.push({ slot: s, plain });
      }
      stats.chunks++;
    }
    await writeSlots(placed);
  };

  // All writes of a run go out at once: page-cache writes are latency-bound, not busy.
  const writeSlots = async (placed: Array<{ slot: number; plain: Buffer }>): Promise<void> => {
    const settled = await Promise.allSettled(placed.map(async ({ slot, plain }) => {
      await out.write(slot * disk.chunkSize, plain);
      stats.bytesWritten += plain.length;
    }));
    const failed = settled.find((x) => x.status === 'rejected');
    if (failed) throw failed.reason;
  };

  // Units in flight: enough to overlap fetching and decoding, bounded for memory.
  const units = Array.from({ length: Math.ceil(map.slots / unitSlots) }, (_, u) => u);
  await mapLimit(units, 2, restoreUnit);
  return stats;
}

interface ReadRun {
  packId: Buffer;
  offset: number;
  length: number;
  /** plaintext bytes of its blobs */
  raw: number;
  blobs: Wanted[];
}

/** Runs of blobs read with one request: ≤ maxRead stored bytes, ≤ maxRaw plaintext bytes. */
function coalesce(wanted: Wanted[], gap: number, maxRead: number, maxRaw: number): ReadRun[] {
  wanted.sort((a, b) => Buffer.compare(a.loc.packId, b.loc.packId) || a.loc.offset - b.loc.offset);
  const runs: ReadRun[] = [];
  let cur: ReadRun | undefined;
  for (const w of wanted) {
    const end = w.loc.offset + w.loc.length;
    if (cur && cur.packId.equals(w.loc.packId) && w.loc.offset - (cur.offset + cur.length) <= gap && end - cur.offset <= maxRead
      && cur.raw + w.loc.rawLength <= maxRaw) {
      cur.length = end - cur.offset;
      cur.raw += w.loc.rawLength;
      cur.blobs.push(w);
    } else {
      cur = { packId: w.loc.packId, offset: w.loc.offset, length: w.loc.length, raw: w.loc.rawLength, blobs: [w] };
      runs.push(cur);
    }
  }
  return runs;
}
