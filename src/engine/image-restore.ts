/**
 * `tresor restore image SNAPSHOT OUTFILE [--format raw|qcow2] [--disk NAME]`: writes one disk of
 * a snapshot to a raw (sparse) file or block device, or to a new qcow2 image.
 */
import { createQcow2Writer } from '../image/qcow2-writer.ts';
import { createRawWriter } from '../image/raw.ts';
import type { DiskWriter } from '../image/disk.ts';
import { CodecPool } from '../repo/codec-pool.ts';
import type { Repository } from '../repo/repository.ts';
import { NotFoundError } from '../util/errors.ts';
import { restoreDisk, type DiskRestoreStats } from './disk-restore.ts';

export interface ImageRestoreOptions {
  format: 'raw' | 'qcow2';
  disk?: string;
  overwrite?: boolean;
  progress?: (done: number, total: number) => void;
  signal?: AbortSignal;
}

export async function restoreImage(repo: Repository, snapshot: string, outFile: string, opts: ImageRestoreOptions): Promise<DiskRestoreStats & { disk: string; size: number }> {
  const lock = await repo.lock('shared', `restore ${snapshot}`);
  try {
    const manifest = await repo.readSnapshot(snapshot);
    const disk = opts.disk === undefined ? manifest.disks[0] : manifest.disks.find((d) => d.name === opts.disk);
    if (!disk) {
      throw new NotFoundError('no-such-disk', `snapshot ${snapshot} has no disk ${opts.disk ?? ''}`.trim(), {
        hint: `its disks are: ${manifest.disks.map((d) => d.name).join(', ') || 'none'}`,
        context: { snapshot, disk: opts.disk },
      });
    }
    const out: DiskWriter = opts.format === 'qcow2'
      ? await createQcow2Writer(outFile, disk.size, { overwrite: opts.overwrite })
      : await createRawWriter(outFile, disk.size, { overwrite: opts.overwrite });
    const pool = new CodecPool(repo.keys);
    try {
      const stats = await restoreDisk(repo, pool, snapshot, disk, out, {
        signal: opts.signal, progress: (done) => opts.progress?.(done, disk.size),
      });
      await out.close();
      return { ...stats, disk: disk.name, size: disk.size };
    } catch (err) {
      await out.abort().catch(() => undefined);
      throw err;
    } finally {
      await pool.close();
    }
  } finally {
    await lock.release();
  }
}
