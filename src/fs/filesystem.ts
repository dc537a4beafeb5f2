/**
 * The read-only filesystem interface every guest filesystem reader implements (ext2/3/4, XFS,
 * NTFS, FAT, exFAT...). Readers work over a BlockDevice: a random-access byte range (a whole
 * disk, a partition, or an LVM logical volume), usually read lazily from a snapshot.
 *
 * Contract:
 * - Everything a reader parses is untrusted: every count, offset, length and pointer is checked;
 *   a damaged structure is a FsDamageError naming the filesystem, the inode/record and what is
 *   wrong; a walk over a damaged directory reports the error for that entry and goes on.
 *   Nothing loops forever (cycles in directory trees, extent trees, cluster chains, run lists are
 *   detected) and nothing allocates memory proportional to a size field it has not validated.
 * - Names are returned as the filesystem stores them, decoded to JS strings (UTF-8 for ext/XFS,
 *   UTF-16 for NTFS/exFAT/VFAT long names); readers do not sanitise them — restore does, since
 *   a name may contain '/', NUL or be '..'.
 * - Inode numbers are filesystem specific identifiers (`bigint` to hold 64-bit XFS/NTFS values).
 */
export interface BlockDevice {
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
}

export type FileType = 'file' | 'dir' | 'symlink' | 'chardev' | 'blockdev' | 'fifo' | 'socket' | 'unknown';

export interface FileStat {
  ino: bigint;
  type: FileType;
  size: number;
  /** POSIX permission bits + setuid/setgid/sticky (no type bits); undefined when the fs has none. */
  mode?: number;
  uid?: number;
  gid?: number;
  nlink?: number;
  /** Times in nanoseconds since the Unix epoch (bigint keeps ns precision). */
  atimeNs?: bigint;
  mtimeNs?: bigint;
  ctimeNs?: bigint;
  birthtimeNs?: bigint;
  /** For char/block devices. */
  rdev?: { major: number; minor: number };
  /** DOS/NTFS attribute bits where relevant (hidden, system, readonly, archive...). */
  attributes?: number;
  /** Names of alternate data streams (NTFS), excluding the default unnamed stream. */
  streams?: string[];
}

export interface DirEntry {
  name: string;
  ino: bigint;
  /** Type from the directory entry when the fs stores it; readers may stat to fill it. */
  type: FileType;
}

/** A byte range of a file: `hole` ranges read as zeros and need not be written on restore. */
export interface FileExtent {
  offset: number;
  length: number;
  hole: boolean;
}

export interface Filesystem {
  /** 'ext2' | 'ext3' | 'ext4' | 'xfs' | 'ntfs' | 'vfat' | 'exfat' ... */
  readonly type: string;
  readonly label: string | undefined;
  readonly uuid: string | undefined;
  readonly rootIno: bigint;
  /** Filesystem size in bytes and used bytes where cheaply known. */
  readonly sizeBytes: number;
  stat(ino: bigint): Promise<FileStat>;
  readdir(ino: bigint): Promise<DirEntry[]>;
  /** Looks one name up in a directory (may use a hashed/B-tree index); undefined if absent. */
  lookup(dirIno: bigint, name: string): Promise<DirEntry | undefined>;
  /** Reads up to `length` bytes of the file's (default) data at `offset`; short only at EOF. */
  read(ino: bigint, offset: number, length: number, stream?: string): Promise<Buffer>;
  /** The file's data map, so restores can keep sparse files sparse. */
  extents(ino: bigint): Promise<FileExtent[]>;
  readlink(ino: bigint): Promise<string>;
}

/** Probes return undefined when the bytes are not theirs; they throw only on damage. */
export type FilesystemProbe = (dev: BlockDevice) => Promise<Filesystem | undefined>;
