/**
 * A disk in memory for library tests of backups: its extents say which 64 KiB blocks changed
 * since the parent, like a dirty bitmap; and seeded log-like text that compresses like a real
 * disk's; the backups made of such disks, each recorded with its statistics and data.
 */
import assert from 'node:assert/strict';
import type { DiskSource, Extent } from '../../src/image/disk.ts';
import { BlobType } from '../../src/repo/codec.ts';
import { DiskMapReader } from '../../src/repo/disk-map.ts';
import type { SnapshotManifest } from '../../src/repo/manifest.ts';
import type { Repository } from '../../src/repo/repository.ts';
import { backupDisk, type DiskBackupOptions, type DiskBackupStats } from '../../src/engine/disk-backup.ts';
import { SnapshotSession } from '../../src/engine/snapshot-writer.ts';

export const BLOCK = 64 << 10; // a dirty bitmap's granularity

/** A disk in memory whose extents say which 64 KiB blocks changed since the parent (a dirty bitmap). */
export class BitmapSource implements DiskSource {
  readonly size: number;
  readonly format = 'raw';
  readonly description = 'test disk';
  readonly data: Buffer;
  readonly #dirty: Set<number> | undefined;
  readonly #zeroed: Set<number>;

  /** `zeroedBlocks`: changed blocks that now read as zeros (discarded by the guest). */
  constructor(data: Buffer, dirtyBlocks?: Set<number>, zeroedBlocks = new Set<number>()) {
    this.data = Buffer.from(data);
    this.size = data.length;
    this.#dirty = dirtyBlocks;
    this.#zeroed = zeroedBlocks;
    for (const b of zeroedBlocks) this.data.fill(0, b * BLOCK, (b + 1) * BLOCK);
  }

  async *extents(offset: number, length: number): AsyncIterable<Extent> {
    for (let at = offset; at < offset + length; at += BLOCK) {
      const kind = this.#zeroed.has(at / BLOCK) ? 'zero' : this.#dirty === undefined || this.#dirty.has(at / BLOCK) ? 'data' : 'unchanged';
      yield { offset: at, length: Math.min(BLOCK, offset + length - at), kind };
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  async close(): Promise<void> {}
}

/** A small seeded generator (mulberry32): the text is the same on every run. */
export class Prng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  next(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
}

/** Log-like text: compresses, like most of a real disk. */
export function text(prng: Prng, n: number): Buffer {
  const words = ['backup', 'restore', 'chunk', 'snapshot', 'guest', 'kernel', 'disk', 'bitmap', 'repository', 'delta'];
  let s = '';
  while (s.length < n) s += `${new Date(1_700_000_000_000 + prng.next() * 1e9).toISOString()} ${words[Math.floor(prng.next() * words.length)]} ${Math.floor(prng.next() * 1e6)}\n`;
  return Buffer.from(s.slice(0, n));
}

/** Every delta chunk of the repository (index reloaded), with where it, its base and its base's base are. */
export async function deltaEntries(r: Repository) {
  r.invalidateIndex();
  const index = await r.index();
  return [...index.deltaBases()].map(([id, base]) => {
    const baseLoc = index.get(base);
    return { id, base, loc: index.get(id)!, baseLoc, innerLoc: baseLoc?.base !== undefined ? index.get(baseLoc.base) : undefined };
  });
}

export type DeltaEntry = Awaited<ReturnType<typeof deltaEntries>>[number];

/** A base is a plain chunk, or a delta chunk whose own base is a plain chunk (two levels). */
export function assertBaseOk(d: DeltaEntry, what = 'a base is a plain chunk or a delta of one'): void {
  assert.ok(d.baseLoc !== undefined, `base ${d.base.toString('hex')} is there`);
  assert.ok(d.baseLoc.type === BlobType.chunk || (d.baseLoc.type === BlobType.deltaChunk && d.innerLoc?.type === BlobType.chunk), what);
}

/** Backups of in-memory disks as image snapshots of one id; the n-th backup is `snaps[n]`, `stats[n]`, `disks[n]`. */
export class BackupHistory {
  readonly snaps: SnapshotManifest[] = [];
  readonly stats: DiskBackupStats[] = [];
  readonly disks: Buffer[] = [];
  readonly #id: string;

  constructor(id: string) {
    this.#id = id;
  }

  /** Backs up `source` (incremental from `parent` when given), a second later than the last one. */
  async backup(repo: Repository, source: BitmapSource, parent: SnapshotManifest | undefined, opts: DiskBackupOptions = {}): Promise<SnapshotManifest> {
    const session = await SnapshotSession.start(repo, `${this.#id} test`);
    try {
      const parentMap = parent ? await DiskMapReader.open(repo, parent.name, parent.disks[0]) : undefined;
      const made = await backupDisk(repo, session.pool, session.writer, source, { ...opts, parent: parentMap });
      const disk = { name: 'disk0', sourceFormat: 'raw', ...(await made.map.finish()) };
      const manifest = await session.commit({ type: 'image', id: this.#id, source: { kind: 'image-file', path: 'memory', format: 'raw' } },
        new Date(Date.now() + this.snaps.length * 1000), [disk], parent?.name ?? null, made.stats);
      this.snaps.push(manifest);
      this.stats.push(made.stats);
      this.disks.push(source.data);
      return manifest;
    } finally {
      await session.close();
    }
  }
}
