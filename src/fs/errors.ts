/**
 * Errors of the guest filesystem, partition table and volume manager readers.
 *
 * Guest disks are untrusted input that is not part of the repository, so a malformed structure in
 * them is not repository damage: FsDamageError is a BadInputError (exit code "bad input") whose
 * context always names the filesystem, the inode (where one is involved) and the structure at
 * fault, so a file browser can show "this entry is damaged" and go on with the rest of the walk.
 */
import { BadInputError } from '../util/errors.ts';

export interface FsDamageContext {
  /** 'ext4', 'xfs', 'ntfs', 'vfat', 'gpt', 'mbr', 'lvm'... */
  fs: string;
  /** Inode / MFT record / directory cluster the damage was found in, when there is one. */
  ino?: bigint | number;
  /** The structure at fault: 'superblock', 'group descriptor 3', 'extent tree', 'dir block'... */
  structure: string;
  /** Anything else that helps locate it: byte offsets, block numbers, counts. */
  [key: string]: unknown;
}

const DEFAULT_HINT = 'the guest filesystem is damaged here: run its own checker (e2fsck -n, xfs_repair -n, ' +
  'chkdsk) on a restored copy of the disk, or restore from another snapshot';

export class FsDamageError extends BadInputError {
  readonly fs: string;
  readonly ino: bigint | undefined;
  readonly structure: string;

  constructor(message: string, context: FsDamageContext, hint: string = DEFAULT_HINT) {
    const ino = context.ino === undefined ? undefined : BigInt(context.ino);
    // bigint is not JSON-serialisable: keep the inode number as a string in the context.
    super('fs_damaged', `${context.fs}: ${message}`, {
      hint,
      context: { ...context, ino: ino === undefined ? undefined : ino.toString() },
    });
    this.name = 'FsDamageError';
    this.fs = context.fs;
    this.ino = ino;
    this.structure = context.structure;
  }
}

/** The filesystem uses a feature this reader does not understand, so reading it could be wrong. */
export class FsUnsupportedError extends BadInputError {
  constructor(message: string, context: FsDamageContext, hint?: string) {
    super('fs_unsupported', `${context.fs}: ${message}`, {
      hint: hint ?? 'restore the whole disk and mount it on a host whose kernel supports the feature',
      context: { ...context, ino: context.ino === undefined ? undefined : String(context.ino) },
    });
    this.name = 'FsUnsupportedError';
  }
}
