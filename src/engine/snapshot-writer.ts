/**
 * The life of one snapshot being written: lock, worker pool, pack writer, and the commit that
 * makes it visible. Shared by every kind of backup (image files, VMs, ...).
 *
 * Order of commit (crash safety): all packs durable → index file durable → manifest created
 * (create-if-absent). Until the manifest exists nothing is visible; after, everything it names
 * is durable. On failure or cancellation nothing is committed and the lock is released.
 */
import { hostname } from 'node:os';
import { CodecPool } from '../repo/codec-pool.ts';
import { PackWriter } from '../repo/pack-writer.ts';
import type { RepositoryLock } from '../repo/lock.ts';
import { type DiskRecord, MANIFEST_VERSION, type SnapshotManifest, type SnapshotType, snapshotName } from '../repo/manifest.ts';
import { TOOL_VERSION, type Repository } from '../repo/repository.ts';
import { TresorError } from '../util/errors.ts';

export interface SnapshotDraft {
  type: SnapshotType;
  id: string;
  source: Record<string, unknown>;
  tags?: Record<string, string>;
}

export class SnapshotSession {
  readonly repo: Repository;
  readonly pool: CodecPool;
  readonly writer: PackWriter;
  readonly started = new Date();
  readonly #lock: RepositoryLock;
  #closed = false;

  private constructor(repo: Repository, lock: RepositoryLock, pool: CodecPool) {
    this.repo = repo;
    this.#lock = lock;
    this.pool = pool;
    this.writer = new PackWriter(repo);
  }

  static async start(repo: Repository, operation: string): Promise<SnapshotSession> {
    const lock = await repo.lock('shared', operation);
    try {
      // The index must be loaded after the lock exists (garbage collection relies on it). It
      // loads in the background while the caller plans (e.g. finds the parent snapshot); every
      // user awaits `repo.index()`, which also reports a failure to load it.
      repo.invalidateIndex();
      repo.index().catch(() => undefined);
      return new SnapshotSession(repo, lock, new CodecPool(repo.keys));
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  /**
   * Makes the snapshot durable and visible. The name's time is the snapshot's point in time; if
   * that second is taken (two backups of one id within a second), the next free second is used.
   */
  async commit(draft: SnapshotDraft, pointInTime: Date, disks: DiskRecord[], parent: string | null, stats: { bytesRead: number; newChunks: number; reusedChunks: number }): Promise<SnapshotManifest> {
    await this.writer.commitIndex();
    const finished = new Date();
    for (let attempt = 0; attempt < 60; attempt++) {
      const t = new Date(Math.floor(pointInTime.getTime() / 1000) * 1000 + attempt * 1000);
      const manifest: SnapshotManifest = {
        format: 'tresor-snapshot', version: MANIFEST_VERSION, name: snapshotName(draft.type, draft.id, t), type: draft.type, id: draft.id,
        time: pointInTime.toISOString(), started: this.started.toISOString(), finished: finished.toISOString(),
        parent, host: hostname(), tool: { name: 'tresor', version: TOOL_VERSION }, source: draft.source, disks,
        stats: {
          bytesRead: stats.bytesRead, newChunks: stats.newChunks, reusedChunks: stats.reusedChunks,
          newChunkBytes: this.writer.stats.bytes, addedBytes: 0, durationMs: finished.getTime() - this.started.getTime(),
        },
        tags: draft.tags ?? {},
      };
      manifest.stats.addedBytes = this.writer.stats.bytes + this.repo.encodeManifest(manifest).data.length;
      const { created } = await this.repo.commitSnapshot(manifest);
      if (created) return manifest;
    }
    throw new TresorError('name-taken', `could not find a free snapshot name for ${draft.type}/${draft.id} near ${pointInTime.toISOString()}`);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.pool.close();
    await this.#lock.release();
  }
}
