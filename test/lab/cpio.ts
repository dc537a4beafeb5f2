/**
 * Writes an initramfs archive in the cpio "newc" format the Linux kernel unpacks. Deterministic:
 * every entry has mtime 0, uid/gid 0 and a sequential inode number, and entries are written in
 * the order given (parents must come before their children).
 */

export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number }
  | { type: 'file'; path: string; data: Buffer; mode?: number }
  | { type: 'symlink'; path: string; target: string }
  | { type: 'chardev'; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

export function buildCpio(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const entry of entries) {
    const path = entry.path.replace(/^\/+/, '');
    switch (entry.type) {
      case 'dir':
        parts.push(...record(path, ino++, S_IFDIR | (entry.mode ?? 0o755), 2, Buffer.alloc(0)));
        break;
      case 'file':
        parts.push(...record(path, ino++, S_IFREG | (entry.mode ?? 0o644), 1, entry.data));
        break;
      case 'symlink':
        parts.push(...record(path, ino++, S_IFLNK | 0o777, 1, Buffer.from(entry.target)));
        break;
      case 'chardev':
        parts.push(...record(path, ino++, S_IFCHR | (entry.mode ?? 0o600), 1, Buffer.alloc(0), entry.major, entry.minor));
        break;
    }
  }
  parts.push(...record('TRAILER!!!', 0, 0, 1, Buffer.alloc(0)));
  return Buffer.concat(parts);
}

function record(name: string, ino: number, mode: number, nlink: number, data: Buffer, rdevMajor = 0, rdevMinor = 0): Buffer[] {
  const nameBytes = Buffer.from(`${name}\0`);
  const fields = [ino, mode, 0, 0, nlink, 0, data.length, 0, 0, rdevMajor, rdevMinor, nameBytes.length, 0];
  const header = Buffer.from(`070701${fields.map((value) => value.toString(16).padStart(8, '0')).join('')}`, 'ascii');
  return [header, nameBytes, padding(header.length + nameBytes.length), data, padding(data.length)];
}

function padding(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}
