/**
 * A streaming tar writer: POSIX ustar headers, with PAX extended headers (pax format, POSIX.1-2001)
 * for whatever ustar cannot hold exactly: long or non-ASCII names and link targets, sizes of
 * 8 GiB and more, large uids/gids, negative or nanosecond modification times. Files with holes
 * are written in the GNU sparse format 1.0 (PAX records + a sparse map before the data), which
 * GNU tar and bsdtar extract as sparse files; other readers get the map as part of the file.
 *
 * Paths must be relative and clean ('a/b', no '', '.', '..' components, no NUL): the writer
 * refuses anything else, so an archive it writes can never extract outside its target directory.
 */
import { BadInputError } from './errors.ts';

export type TarEntryType = 'file' | 'dir' | 'symlink' | 'hardlink' | 'chardev' | 'blockdev' | 'fifo';

export interface TarEntry {
  /** Relative '/'-separated path (no trailing '/'; directories get one). */
  path: string;
  type: TarEntryType;
  mode: number;
  uid: number;
  gid: number;
  mtimeNs: bigint;
  /** Files: the file's (apparent) size. */
  size?: number;
  /** Symlinks: the target text; hard links: the archive path of the entry they link to. */
  linkTarget?: string;
  device?: { major: number; minor: number };
  /**
   * Files with holes: the data segments, ascending and non-overlapping; the data then yields only
   * the bytes of these segments, one after the other.
   */
  dataSegments?: Array<{ offset: number; length: number }>;
}

/** Receives the archive bytes in order; resolves when the consumer can take more. */
export type TarSink = (chunk: Buffer) => Promise<void>;

const BLOCK = 512;
const TYPE_FLAG: Record<TarEntryType, string> = {
  file: '0', hardlink: '1', symlink: '2', chardev: '3', blockdev: '4', dir: '5', fifo: '6',
};
const MAX_OCTAL_7 = 0o7777777;
const MAX_OCTAL_11 = 0o77777777777;

export class TarWriter {
  readonly #sink: TarSink;
  #bytes = 0;
  #finished = false;

  constructor(sink: TarSink) {
    this.#sink = sink;
  }

  get bytesWritten(): number {
    return this.#bytes;
  }

  /**
   * Adds one entry. For files, `data` must yield exactly the bytes announced (`size`, or the sum
   * of `dataSegments`). If it fails or falls short, the rest is padded with zeros so the archive
   * stays well formed, and the error is rethrown for the caller to report.
   */
  async add(entry: TarEntry, data?: AsyncIterable<Buffer>): Promise<void> {
    if (this.#finished) throw new Error('tar: add() after finish()');
    checkPath(entry.path, 'path');
    if (entry.type === 'hardlink') checkPath(entry.linkTarget ?? '', 'hard link target');
    const pax: Array<[string, string]> = [];
    const sparse = entry.type === 'file' && entry.dataSegments !== undefined;
    let name = entry.type === 'dir' ? `${entry.path}/` : entry.path;
    let payload = entry.type === 'file' ? entry.size ?? 0 : 0;
    let sparseMap: Buffer | undefined;
    if (sparse) {
      const segments = entry.dataSegments as Array<{ offset: number; length: number }>;
      sparseMap = encodeSparseMap(segments, entry.size ?? 0);
      payload = sparseMap.length + segments.reduce((n, s) => n + s.length, 0);
      pax.push(['GNU.sparse.major', '1'], ['GNU.sparse.minor', '0'], ['GNU.sparse.name', name], ['GNU.sparse.realsize', String(entry.size ?? 0)]);
      const slash = name.lastIndexOf('/');
      name = `${name.slice(0, slash + 1)}GNUSparseFile.0/${name.slice(slash + 1)}`;
    }
    if (!fitsUstar(name, 100)) pax.push(['path', name]);
    const link = entry.linkTarget ?? '';
    if ((entry.type === 'symlink' || entry.type === 'hardlink') && !fitsUstar(link, 100)) pax.push(['linkpath', link]);
    if (payload > MAX_OCTAL_11) pax.push(['size', String(payload)]);
    if (entry.uid > MAX_OCTAL_7) pax.push(['uid', String(entry.uid)]);
    if (entry.gid > MAX_OCTAL_7) pax.push(['gid', String(entry.gid)]);
    const seconds = floorDiv(entry.mtimeNs, 1_000_000_000n);
    if (entry.mtimeNs % 1_000_000_000n !== 0n || seconds < 0n || seconds > BigInt(MAX_OCTAL_11)) pax.push(['mtime', formatPaxTime(entry.mtimeNs)]);

    if (pax.length > 0) {
      const records = Buffer.concat(pax.map(([k, v]) => paxRecord(k, v)));
      await this.#write(header({
        name: `PaxHeaders/${asciiFallback(basename(name), 80)}`, mode: 0o644, uid: 0, gid: 0, size: records.length,
        mtime: clampOctal(seconds, MAX_OCTAL_11), typeflag: 'x', linkname: '',
      }));
      await this.#write(padded(records));
    }
    await this.#write(header({
      name: fitsUstar(name, 100) ? name : asciiFallback(name, 100),
      mode: entry.mode & 0o7777,
      uid: entry.uid > MAX_OCTAL_7 ? 0 : entry.uid,
      gid: entry.gid > MAX_OCTAL_7 ? 0 : entry.gid,
      size: payload > MAX_OCTAL_11 ? 0 : payload,
      mtime: clampOctal(seconds, MAX_OCTAL_11),
      typeflag: TYPE_FLAG[entry.type],
      linkname: (entry.type === 'symlink' || entry.type === 'hardlink') ? (fitsUstar(link, 100) ? link : asciiFallback(link, 100)) : '',
      device: entry.device,
    }));
    if (entry.type !== 'file') return;
    let written = 0;
    if (sparseMap) {
      await this.#write(sparseMap);
      written += sparseMap.length;
    }
    try {
      for await (const piece of data ?? []) {
        if (written + piece.length > payload) throw new Error(`tar: ${entry.path}: data is longer than announced (${payload - (sparseMap?.length ?? 0)} bytes)`);
        await this.#write(piece);
        written += piece.length;
      }
      if (written !== payload) throw new Error(`tar: ${entry.path}: data ended after ${written - (sparseMap?.length ?? 0)} of ${payload - (sparseMap?.length ?? 0)} bytes`);
    } finally {
      // Keep the archive well formed whatever happened: zeros for what is missing, then padding.
      await this.#zeros(payload - written);
      await this.#zeros((BLOCK - (payload % BLOCK)) % BLOCK);
    }
  }

  /** Writes the end-of-archive marker (two zero blocks). */
  async finish(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    await this.#write(Buffer.alloc(2 * BLOCK));
  }

  async #write(buf: Buffer): Promise<void> {
    if (buf.length === 0) return;
    this.#bytes += buf.length;
    await this.#sink(buf);
  }

  async #zeros(n: number): Promise<void> {
    const piece = Buffer.alloc(Math.min(n, 1 << 20));
    for (let left = n; left > 0; left -= piece.length) await this.#write(left >= piece.length ? piece : piece.subarray(0, left));
  }
}

function checkPath(path: string, what: string): void {
  const parts = path.split('/');
  if (path.length === 0 || path.includes('\0') || parts.some((p) => p === '' || p === '.' || p === '..')) {
    throw new BadInputError('tar_bad_path', `tar: refusing ${what} ${JSON.stringify(path)}: archive paths must be relative, without empty, '.' or '..' components`, {
      hint: 'this is a bug in the caller: names must be sanitised before they reach the tar writer',
    });
  }
}

function fitsUstar(text: string, max: number): boolean {
  return /^[\x20-\x7e]*$/.test(text) && text.length <= max;
}

function asciiFallback(text: string, max: number): string {
  return text.replace(/[^\x20-\x7e]/g, '_').slice(0, max);
}

function basename(path: string): string {
  const trimmed = path.endsWith('/') ? path.slice(0, -1) : path;
  return trimmed.slice(trimmed.lastIndexOf('/') + 1);
}

function floorDiv(a: bigint, b: bigint): bigint {
  const q = a / b;
  return a % b !== 0n && (a < 0n) !== (b < 0n) ? q - 1n : q;
}

function clampOctal(value: bigint, max: number): number {
  return value < 0n ? 0 : value > BigInt(max) ? max : Number(value);
}

/** Seconds with nine decimals, e.g. "1234567890.123456789" or "-1.500000000". */
function formatPaxTime(ns: bigint): string {
  const negative = ns < 0n;
  const abs = negative ? -ns : ns;
  const frac = abs % 1_000_000_000n;
  const text = frac === 0n ? String(abs / 1_000_000_000n) : `${abs / 1_000_000_000n}.${String(frac).padStart(9, '0')}`;
  return negative ? `-${text}` : text;
}

/** "<len> <key>=<value>\n", where len counts the whole record including its own digits. */
function paxRecord(key: string, value: string): Buffer {
  const body = Buffer.byteLength(`${key}=${value}\n`) + 1;
  let len = body + String(body).length;
  if (String(len).length !== String(len - body).length) len = body + String(len).length;
  return Buffer.from(`${len} ${key}=${value}\n`, 'utf8');
}

/** GNU sparse 1.0 map: count, then offset/length pairs, in decimal lines, padded to a block. */
function encodeSparseMap(segments: Array<{ offset: number; length: number }>, realSize: number): Buffer {
  const entries = [...segments];
  const last = entries.at(-1);
  if (!last || last.offset + last.length < realSize) entries.push({ offset: realSize, length: 0 });
  const text = [String(entries.length), ...entries.flatMap((s) => [String(s.offset), String(s.length)])].join('\n');
  return padded(Buffer.from(`${text}\n`, 'ascii'));
}

function padded(buf: Buffer): Buffer {
  const rest = (BLOCK - (buf.length % BLOCK)) % BLOCK;
  return rest === 0 ? buf : Buffer.concat([buf, Buffer.alloc(rest)]);
}

interface HeaderFields {
  name: string;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  typeflag: string;
  linkname: string;
  device?: { major: number; minor: number };
}

function header(f: HeaderFields): Buffer {
  const h = Buffer.alloc(BLOCK);
  h.write(f.name, 0, 100, 'utf8');
  octal(h, 100, 8, f.mode);
  octal(h, 108, 8, f.uid);
  octal(h, 116, 8, f.gid);
  octal(h, 124, 12, f.size);
  octal(h, 136, 12, f.mtime);
  h.fill(0x20, 148, 156); // checksum counted as spaces
  h.write(f.typeflag, 156, 1, 'ascii');
  h.write(f.linkname, 157, 100, 'utf8');
  h.write('ustar\0', 257, 6, 'ascii');
  h.write('00', 263, 2, 'ascii');
  if (f.device) {
    octal(h, 329, 8, Math.min(f.device.major, MAX_OCTAL_7));
    octal(h, 337, 8, Math.min(f.device.minor, MAX_OCTAL_7));
  }
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 8, 'ascii');
  return h;
}

/** A zero-padded octal number in `width - 1` digits followed by NUL. */
function octal(h: Buffer, at: number, width: number, value: number): void {
  h.write(`${Math.trunc(value).toString(8).padStart(width - 1, '0')}\0`, at, width, 'ascii');
}
