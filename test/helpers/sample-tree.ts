/**
 * Builds the reference directory tree that filesystem-reader tests put into images with the
 * real tools (mkfs.ext4 -d, mcopy, mkfs.xfs -p, ...) and compare against with fs-compare.ts.
 *
 * Contents: unicode (NFC and NFD) names, names with spaces, a 20-deep directory chain, a large
 * directory (10 000 entries by default: enough for an htree index), a 2 MiB random file, an empty
 * file, sparse files, hard links, relative/absolute/dangling/long symlinks, setuid/setgid/sticky
 * modes, owners, fixed nanosecond mtimes, a fifo and device nodes. Options drop what a filesystem
 * cannot hold.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, closeSync, linkSync, mkdirSync, openSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';

export interface SampleTreeOptions {
  /** Entries in big/ (default 10 000). */
  bigDirEntries?: number;
  hardLinks?: boolean;
  symlinks?: boolean;
  /** fifo and device nodes. */
  specialFiles?: boolean;
  /** chown to non-root owners. */
  owners?: boolean;
  /** setuid/setgid/sticky and unusual permission bits. */
  modes?: boolean;
  /** Names that FAT cannot hold (trailing spaces, ':' etc.) and characters outside the BMP. */
  exoticNames?: boolean;
  /** Sparse files (created with holes on the host). */
  sparse?: boolean;
  /**
   * A small file followed by a long hole (size 5 MiB, 4 bytes of data). mke2fs 1.47.0 -d with
   * inline_data stores it with a wrong size (1024): leave it out of such images.
   */
  trailingHole?: boolean;
  /** Size of the random file (default 2 MiB). */
  randomFileBytes?: number;
}

/** A fixed timestamp per path, in the `touch -d @SECONDS.NANOS` format. */
export const FIXED_MTIME = '@1234567890.123456789';
export const OLD_MTIME = '@946684800.5';

/** Name of entry `i` of big/: varied lengths spread the hashes, some non-ASCII. */
export function bigDirEntryName(i: number): string {
  return `entry-${String(i).padStart(5, '0')}${'-'.repeat(i % 23)}${i % 7 === 0 ? '-é' : ''}`;
}

export function buildSampleTree(root: string, options: SampleTreeOptions = {}): void {
  const opt = {
    bigDirEntries: 10_000, hardLinks: true, symlinks: true, specialFiles: true, owners: true, modes: true,
    exoticNames: true, sparse: true, trailingHole: true, randomFileBytes: 2 * 1024 * 1024, ...options,
  };
  mkdirSync(root, { recursive: true });
  writeFileSync(join(root, 'hello.txt'), 'hello, world\n');
  writeFileSync(join(root, 'empty'), '');
  writeFileSync(join(root, 'random.bin'), randomBytes(opt.randomFileBytes));
  writeFileSync(join(root, 'name with spaces.txt'), 'spaces\n');
  writeFileSync(join(root, 'café.txt'), 'NFC name\n');
  writeFileSync(join(root, 'cafe\u0301-nfd.txt'), 'NFD name\n');
  writeFileSync(join(root, '日本語のファイル.txt'), 'unicode\n');
  mkdirSync(join(root, 'Ελληνικά κατάλογος'));
  writeFileSync(join(root, 'Ελληνικά κατάλογος', 'αρχείο.txt'), 'greek\n');
  if (opt.exoticNames) {
    writeFileSync(join(root, 'emoji-😀.txt'), 'astral plane\n');
    writeFileSync(join(root, ' leading and trailing spaces '), 'odd\n');
    writeFileSync(join(root, 'colon:and\\backslash'), 'odd\n');
  }
  // A block-sized and a multi-block text file (different sizes exercise partial last blocks).
  writeFileSync(join(root, 'block.txt'), 'x'.repeat(4096));
  writeFileSync(join(root, 'lines.txt'), Array.from({ length: 5000 }, (_, i) => `line ${i}`).join('\n'));

  let deep = join(root, 'deep');
  for (let i = 1; i <= 20; i++) {
    deep = join(deep, `level-${String(i).padStart(2, '0')}`);
  }
  mkdirSync(deep, { recursive: true });
  writeFileSync(join(deep, 'bottom.txt'), 'at the bottom\n');

  const big = join(root, 'big');
  mkdirSync(big);
  for (let i = 0; i < opt.bigDirEntries; i++) {
    writeFileSync(join(big, bigDirEntryName(i)), i % 250 === 0 ? `content of ${i}\n` : '');
  }

  if (opt.sparse) {
    const sparse = join(root, 'sparse.bin');
    const fd = openSync(sparse, 'w');
    writeSync(fd, Buffer.alloc(4096, 0x41), 0, 4096, 0);
    writeSync(fd, Buffer.alloc(65536, 0x42), 0, 65536, 3 * 1024 * 1024);
    writeSync(fd, Buffer.alloc(4096, 0x43), 0, 4096, 8 * 1024 * 1024 - 4096);
    closeSync(fd);
    // Data past 64.3 MiB: reached through a triple-indirect block on ext2/3 with 1 KiB blocks.
    const far = openSync(join(root, 'sparse-far.bin'), 'w');
    writeSync(far, Buffer.alloc(2048, 0x44), 0, 2048, 66 * 1024 * 1024);
    closeSync(far);
  }
  if (opt.trailingHole) {
    const tail = openSync(join(root, 'sparse-tail.bin'), 'w');
    writeSync(tail, Buffer.from('head'), 0, 4, 0);
    closeSync(tail);
    execFileSync('truncate', ['-s', '5M', join(root, 'sparse-tail.bin')]);
  }

  mkdirSync(join(root, 'sub'));
  writeFileSync(join(root, 'sub', 'file.txt'), 'in sub\n');
  if (opt.hardLinks) {
    writeFileSync(join(root, 'hardlink-a'), 'shared by three names\n');
    linkSync(join(root, 'hardlink-a'), join(root, 'hardlink-b'));
    linkSync(join(root, 'hardlink-a'), join(root, 'sub', 'hardlink-c'));
  }
  if (opt.symlinks) {
    symlinkSync('sub/file.txt', join(root, 'link-relative'));
    symlinkSync('/etc/passwd', join(root, 'link-absolute'));
    symlinkSync('does/not/exist', join(root, 'link-dangling'));
    symlinkSync('sub', join(root, 'link-to-dir'));
    symlinkSync(`../${'long-target-component/'.repeat(6)}end`, join(root, 'link-long'));
    symlinkSync('../hello.txt', join(root, 'sub', 'link-up'));
  }
  if (opt.specialFiles) {
    execFileSync('mkfifo', [join(root, 'fifo')]);
    execFileSync('mknod', [join(root, 'char-device'), 'c', '1', '3']);
    execFileSync('mknod', [join(root, 'block-device'), 'b', '7', '200']);
  }
  if (opt.modes) {
    writeFileSync(join(root, 'setuid-file'), '#!/bin/sh\n');
    chmodSync(join(root, 'setuid-file'), 0o4755);
    writeFileSync(join(root, 'private-file'), 'secret\n');
    chmodSync(join(root, 'private-file'), 0o600);
    writeFileSync(join(root, 'readonly-file'), 'ro\n');
    chmodSync(join(root, 'readonly-file'), 0o444);
    mkdirSync(join(root, 'sticky-dir'));
    chmodSync(join(root, 'sticky-dir'), 0o1777);
    mkdirSync(join(root, 'setgid-dir'));
    chmodSync(join(root, 'setgid-dir'), 0o2775);
  }
  if (opt.owners) {
    chownSync(join(root, 'hello.txt'), 1234, 5678);
    chownSync(join(root, 'sub'), 1000, 1000);
    chownSync(join(root, 'random.bin'), 65534, 65534);
    chownSync(join(root, 'private-file'), 100000, 100000);
  }
  // Fixed times last: creating entries changes their directories' mtimes.
  const touch = (when: string, ...paths: string[]) => execFileSync('touch', ['-h', '-d', when, ...paths.map((p) => join(root, p))]);
  touch(FIXED_MTIME, 'hello.txt', 'random.bin', 'empty', 'sub/file.txt', 'sub', 'deep', 'big');
  touch(OLD_MTIME, 'café.txt', 'lines.txt');
  if (opt.symlinks) touch(FIXED_MTIME, 'link-relative', 'link-long');
}
