/**
 * `tresor backup image FILE --id NAME`: back up a disk image file (raw or qcow2, with its backing
 * chain) as snapshot `image/NAME/<time>`. Deduplicated against every chunk in the repository;
 * holes and zero ranges are not stored.
 */
import { openDiskImage } from '../image/open.ts';
import type { SnapshotManifest } from '../repo/manifest.ts';
import type { Repository } from '../repo/repository.ts';
import { validateSourceId } from '../repo/manifest.ts';
import { backupDisk } from './disk-backup.ts';
import { SnapshotSession } from './snapshot-writer.ts';

export interface ImageBackupOptions {
  id: string;
  progress?: (done: number, total: number) => void;
  signal?: AbortSignal;
  tags?: Record<string, string>;
}

export async function backupImage(repo: Repository, file: string, opts: ImageBackupOptions): Promise<SnapshotManifest> {
  validateSourceId(opts.id);
  const source = await openDiskImage(file);
  try {
    const pointInTime = new Date();
    const session = await SnapshotSession.start(repo, `backup image ${opts.id}`);
    try {
      const parent = await repo.latestSnapshot('image', opts.id);
      const { map, stats } = await backupDisk(repo, session.pool, session.writer, source, {
        signal: opts.signal, progress: (done) => opts.progress?.(done, source.size),
      });
      const disk = { name: 'disk0', sourceFormat: source.format, ...(await map.finish()) };
      return await session.commit(
        { type: 'image', id: opts.id, source: { kind: 'image-file', path: file, format: source.format }, tags: opts.tags },
        pointInTime, [disk], parent?.name ?? null, stats,
      );
    } finally {
      await session.close();
    }
  } finally {
    await source.close();
  }
}
