/**
 * The reference corpus of the benchmark (issue 2, BRIEF "Performance goals"), generated
 * deterministically from a seed:
 *
 * - a raw disk file of `size` bytes made of runs of 64 KiB–64 MiB (64 KiB aligned): 40 % left
 *   unallocated (sparse holes: never written), 30 % log-like text, 30 % random bytes;
 * - `rewriteCorpus`: 2 % of the disk size rewritten in scattered, non-overlapping extents of
 *   64 KiB–1 MiB (64 KiB aligned) anywhere in the disk, with new random or text content.
 *
 * Same seed, same size → same bytes, on any machine. Random bytes come from AES-128-CTR keyed from
 * the seed (GB/s, and deterministic); every decision (run lengths, kinds, log fields) comes from a
 * small seeded PRNG. Usable from tests with small sizes (any multiple of 64 KiB).
 *
 * CLI:
 *   node bench/corpus.ts generate FILE [--size 4G] [--seed N]
 *   node bench/corpus.ts rewrite FILE [--fraction 0.02] [--seed N]
 */
import { createCipheriv, createHash } from 'node:crypto';
import type { Cipheriv } from 'node:crypto';
import { closeSync, fstatSync, fsyncSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { BadInputError, UsageError } from '../src/util/errors.ts';

export const BLOCK = 64 * 1024;
const MIB = 1024 * 1024;
const MAX_RUN_BLOCKS = (64 * MIB) / BLOCK;
const MAX_REWRITE_BLOCKS = MIB / BLOCK;
/** Generation writes in pieces of this size: large enough for fast I/O, small enough for memory. */
const WRITE_PIECE = 8 * MIB;

export type RunKind = 'hole' | 'text' | 'random';

export interface Run {
  offset: number;
  length: number;
  kind: RunKind;
}

export interface CorpusLayout {
  size: number;
  seed: number;
  runs: Run[];
  /** Bytes per kind, exactly as written. */
  bytes: Record<RunKind, number>;
}

export interface RewriteResult {
  fraction: number;
  seed: number;
  extents: Run[];
  bytesRewritten: number;
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------------

/** sfc32 seeded through splitmix32: tiny, fast, good enough for layout and log fields. */
export class Prng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number, stream: number) {
    let state = (seed ^ Math.imul(stream + 1, 0x9e3779b9)) >>> 0;
    const splitmix = (): number => {
      state = (state + 0x9e3779b9) >>> 0;
      let z = state;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = splitmix();
    this.b = splitmix();
    this.c = splitmix();
    this.d = splitmix();
    for (let i = 0; i < 12; i++) this.nextU32();
  }

  nextU32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform integer in [0, n). */
  below(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** Integer in [1, max], log-uniform: as many short runs per octave as long ones. */
  logUniform(max: number): number {
    return Math.min(max, Math.floor(2 ** (this.next() * Math.log2(max + 1))));
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }
}

/** An endless stream of random bytes: AES-128-CTR over zeros, keyed by (seed, stream). */
export class RandomBytes {
  private readonly cipher: Cipheriv;
  private zeros = Buffer.alloc(0);

  constructor(seed: number, stream: number) {
    const key = createHash('sha256').update(`tresor-bench-corpus/${seed}/${stream}`).digest();
    this.cipher = createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32));
  }

  fill(target: Buffer): void {
    if (this.zeros.length < target.length) this.zeros = Buffer.alloc(target.length);
    const bytes = this.cipher.update(this.zeros.subarray(0, target.length));
    bytes.copy(target);
  }
}

// ---------------------------------------------------------------------------------------------
// Log-like text
// ---------------------------------------------------------------------------------------------

const HOSTS = ['web-01', 'web-02', 'web-03', 'web-04', 'db-01', 'db-02', 'cache-01', 'mail-01',
  'lb-01', 'worker-01', 'worker-02', 'worker-03', 'auth-01', 'search-01'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const METHODS = ['GET', 'GET', 'GET', 'GET', 'POST', 'POST', 'PUT', 'DELETE', 'HEAD', 'PATCH'];
const STATUSES = [200, 200, 200, 200, 200, 200, 200, 304, 304, 201, 204, 301, 302, 400, 401, 403,
  404, 404, 499, 500, 502, 503];
const RESOURCES = ['orders', 'users', 'products', 'carts', 'invoices', 'sessions', 'payments',
  'shipments', 'reviews', 'search', 'inventory', 'accounts', 'tickets', 'reports'];
const STATIC = ['js/app', 'js/vendor', 'css/main', 'css/print', 'img/logo', 'img/hero', 'fonts/inter'];
const STATIC_EXT = ['js', 'js', 'css', 'css', 'png', 'jpg', 'woff2'];
const AGENTS = [
  'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36',
  'Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0',
  'Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15',
  'Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148',
  'curl/7.88.1', 'Go-http-client/1.1', 'python-requests/2.31.0', 'Prometheus/2.45.0',
  'kube-probe/1.29', 'Googlebot/2.1 (+http://www.google.com/bot.html)',
];
const REFERERS = ['-', '-', '-', 'https://shop.example.com/', 'https://shop.example.com/cart',
  'https://www.google.com/', 'https://shop.example.com/search?q=boots'];
const LEVELS = ['INFO', 'INFO', 'INFO', 'INFO', 'INFO', 'DEBUG', 'DEBUG', 'WARN', 'ERROR'];
const LOGGERS = ['order-service', 'payment-gateway', 'http.server', 'db.pool', 'cache.client',
  'auth.jwt', 'scheduler', 'mailer', 'inventory-sync', 'search.indexer'];
/** '00'..'ff', so hex strings are built from table lookups instead of per-digit formatting. */
const HEX_PAIRS = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));
const USERS = ['deploy', 'root', 'backup', 'admin', 'git', 'monitor', 'alice', 'bob'];
const UNITS = ['nginx.service', 'postgresql.service', 'cron.service', 'ssh.service',
  'logrotate.service', 'apt-daily.service', 'certbot.timer', 'node-exporter.service'];

/** Produces realistic syslog, nginx and application log lines with a clock that moves forward. */
export class LogText {
  private readonly prng: Prng;
  private clockMs: number;
  private cachedSecond = -1;
  private bsdTime = '';
  private clfTime = '';
  private isoTime = '';

  constructor(seed: number, stream: number) {
    this.prng = new Prng(seed, stream);
    // Somewhere in 2026, so the timestamps look like a live system's.
    this.clockMs = Date.UTC(2026, 0, 1) + this.prng.below(300 * 86400) * 1000;
  }

  /** Fills `target` completely with log lines (the last one cut at the end, as in a disk block). */
  fill(target: Buffer): void {
    let offset = 0;
    const lines: string[] = [];
    while (offset < target.length) {
      let batchLength = 0;
      lines.length = 0;
      while (batchLength < 64 * 1024) {
        const line = this.nextLine();
        lines.push(line);
        batchLength += line.length;
      }
      offset += target.write(lines.join(''), offset, 'latin1');
    }
  }

  nextLine(): string {
    this.clockMs += this.prng.below(120);
    this.updateClock();
    const choice = this.prng.below(10);
    if (choice < 4) return this.nginxLine();
    if (choice < 7) return this.appLine();
    return this.syslogLine();
  }

  private updateClock(): void {
    const second = Math.floor(this.clockMs / 1000);
    if (second === this.cachedSecond) return;
    this.cachedSecond = second;
    const d = new Date(second * 1000);
    const hms = `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}:${pad2(d.getUTCSeconds())}`;
    const month = MONTHS[d.getUTCMonth()];
    this.bsdTime = `${month} ${String(d.getUTCDate()).padStart(2, ' ')} ${hms}`;
    this.clfTime = `${pad2(d.getUTCDate())}/${month}/${d.getUTCFullYear()}:${hms} +0000`;
    this.isoTime = `${d.getUTCFullYear()}-${pad2(d.getUTCMonth() + 1)}-${pad2(d.getUTCDate())}T${hms}`;
  }

  private millis(): string {
    return String(this.clockMs % 1000).padStart(3, '0');
  }

  private ip(): string {
    const p = this.prng;
    return p.below(4) === 0
      ? `10.${p.below(4)}.${p.below(16)}.${p.below(256)}`
      : `${p.below(223) + 1}.${p.below(256)}.${p.below(256)}.${p.below(256)}`;
  }

  /** `length` random lowercase hex digits (ids, hashes, trace ids). */
  private hex(length: number): string {
    let s = '';
    for (let i = 0; i < length; i += 8) {
      const r = this.prng.nextU32();
      s += HEX_PAIRS[r & 255] + HEX_PAIRS[(r >>> 8) & 255] + HEX_PAIRS[(r >>> 16) & 255] + HEX_PAIRS[r >>> 24];
    }
    return s.length === length ? s : s.slice(0, length);
  }

  private path(): string {
    const p = this.prng;
    const kind = p.below(10);
    if (kind < 5) {
      const query = p.below(3) === 0 ? `?page=${p.below(20) + 1}&limit=${p.pick([10, 20, 50, 100])}` : '';
      return `/api/v1/${p.pick(RESOURCES)}/${p.below(2_000_000)}${query}`;
    }
    if (kind < 8) {
      const asset = p.below(STATIC.length);
      return `/static/${STATIC[asset]}.${this.hex(8)}.${STATIC_EXT[asset]}`;
    }
    if (kind < 9) return `/api/v1/${p.pick(RESOURCES)}?sort=${p.pick(['date', 'name', 'price'])}&q=${p.pick(RESOURCES)}`;
    return p.pick(['/', '/healthz', '/metrics', '/login', '/favicon.ico', '/robots.txt']);
  }

  private nginxLine(): string {
    const p = this.prng;
    const status = p.pick(STATUSES);
    const bytes = status === 304 || status === 204 ? 0 : p.below(250_000);
    const time = (p.below(3000) / 1000).toFixed(3);
    return `${this.ip()} - - [${this.clfTime}] "${p.pick(METHODS)} ${this.path()} HTTP/1.1" ${status} ${bytes}`
      + ` "${p.pick(REFERERS)}" "${p.pick(AGENTS)}" ${time} ${this.hex(8)}\n`;
  }

  private appLine(): string {
    const p = this.prng;
    const level = p.pick(LEVELS);
    const head = `${this.isoTime}.${this.millis()}Z ${level.padEnd(5)} [worker-${p.below(16)}] ${p.pick(LOGGERS)}:`;
    const trace = `trace_id=${this.hex(16)}`;
    switch (p.below(6)) {
      case 0:
        return `${head} processed order id=${p.below(9_000_000)} items=${p.below(12) + 1} total=${p.below(50000) / 100} latency_ms=${p.below(900)} ${trace}\n`;
      case 1:
        return `${head} cache ${p.pick(['hit', 'hit', 'miss'])} key=${p.pick(RESOURCES)}:${p.below(500_000)} ttl=${p.pick([60, 300, 3600])} ${trace}\n`;
      case 2:
        return `${head} query took ${p.below(4000)}ms rows=${p.below(10000)} sql="SELECT * FROM ${p.pick(RESOURCES)} WHERE id = $1" ${trace}\n`;
      case 3:
        return `${head} user ${p.pick(USERS)}${p.below(1000)} ${p.pick(['logged in', 'logged out', 'password reset requested', 'token refreshed'])} from ${this.ip()} ${trace}\n`;
      case 4:
        return `${head} connection pool stats active=${p.below(64)} idle=${p.below(64)} waiting=${p.below(8)}\n`;
      default:
        return `${head} ${level === 'ERROR' ? 'request failed' : 'request completed'} method=${p.pick(METHODS)} path=${this.path()} status=${p.pick(STATUSES)} duration=${p.below(2000)}ms ${trace}\n`;
    }
  }

  private syslogLine(): string {
    const p = this.prng;
    const head = `${this.bsdTime} ${p.pick(HOSTS)}`;
    switch (p.below(7)) {
      case 0:
        return `${head} sshd[${p.below(60000) + 1000}]: Accepted publickey for ${p.pick(USERS)} from ${this.ip()} port ${p.below(30000) + 32768} ssh2: ED25519 SHA256:${this.hex(12)}\n`;
      case 1:
        return `${head} sshd[${p.below(60000) + 1000}]: Failed password for invalid user ${p.pick(USERS)}${p.below(100)} from ${this.ip()} port ${p.below(30000) + 32768} ssh2\n`;
      case 2:
        return `${head} CRON[${p.below(60000) + 1000}]: (${p.pick(USERS)}) CMD (${p.pick(['/usr/local/bin/backup.sh', 'run-parts /etc/cron.hourly', 'php /var/www/cron.php', '/usr/lib/sysstat/debian-sa1 1 1'])})\n`;
      case 3:
        return `${head} systemd[1]: ${p.pick(['Started', 'Stopping', 'Finished', 'Reloading'])} ${p.pick(UNITS)}.\n`;
      case 4:
        return `${head} kernel: [${p.below(9_000_000)}.${String(p.below(1_000_000)).padStart(6, '0')}] ${p.pick([
          'EXT4-fs (vda1): re-mounted. Opts: errors=remount-ro',
          'TCP: request_sock_TCP: Possible SYN flooding on port 443. Sending cookies.',
          'nf_conntrack: table full, dropping packet',
          'virtio_net virtio0 ens3: renamed from eth0',
          'Out of memory: Killed process 4242 (java) total-vm:8123456kB',
        ])}\n`;
      case 5:
        return `${head} postfix/smtp[${p.below(60000) + 1000}]: ${this.hex(10).toUpperCase()}: to=<${p.pick(USERS)}@example.org>, relay=mx${p.below(4)}.example.org[${this.ip()}]:25, delay=${p.below(500) / 100}, status=${p.pick(['sent (250 2.0.0 OK)', 'sent (250 2.0.0 OK)', 'deferred (connection timed out)'])}\n`;
      default:
        return `${head} dockerd[${p.below(3000) + 500}]: time="${this.isoTime}.${this.millis()}Z" level=${p.pick(['info', 'warning'])} msg="${p.pick(['ignoring event', 'container health check passed', 'image pulled', 'network endpoint joined'])}" container=${this.hex(12)}\n`;
    }
  }
}

function pad2(n: number): string {
  return n < 10 ? `0${n}` : String(n);
}

// ---------------------------------------------------------------------------------------------
// Layout, generation and rewrite
// ---------------------------------------------------------------------------------------------

/** PRNG and cipher stream numbers, so every purpose has its own independent sequence. */
const STREAM = { layout: 1, text: 2, random: 3, rewriteLayout: 11, rewriteText: 12, rewriteRandom: 13 };

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size % BLOCK !== 0) {
    throw new BadInputError('bench-corpus-size', `corpus size ${size} is not a positive multiple of 64 KiB`, {
      hint: 'pass a size such as 256M or 4G',
      context: { size },
    });
  }
}

/**
 * The corpus layout for (size, seed): consecutive runs covering the disk. Each kind has a budget of
 * blocks (40/30/30 %); a run's kind is drawn in proportion to what is left of each budget and its
 * length log-uniformly in 1..1024 blocks (64 KiB–64 MiB), clipped to that budget, so the
 * proportions come out exact at every size while the order stays random.
 */
export function planCorpus(size: number, seed: number): CorpusLayout {
  checkSize(size);
  const prng = new Prng(seed, STREAM.layout);
  const totalBlocks = size / BLOCK;
  const holeBlocks = Math.round(totalBlocks * 0.4);
  const textBlocks = Math.round(totalBlocks * 0.3);
  const budget: Record<RunKind, number> = {
    hole: holeBlocks,
    text: textBlocks,
    random: totalBlocks - holeBlocks - textBlocks,
  };
  const kinds: RunKind[] = ['hole', 'text', 'random'];
  const runs: Run[] = [];
  let block = 0;
  while (block < totalBlocks) {
    const left = budget.hole + budget.text + budget.random;
    let draw = prng.below(left);
    let kind: RunKind = 'random';
    for (const k of kinds) {
      if (draw < budget[k]) { kind = k; break; }
      draw -= budget[k];
    }
    const blocks = Math.min(prng.logUniform(MAX_RUN_BLOCKS), budget[kind]);
    budget[kind] -= blocks;
    const last = runs[runs.length - 1];
    if (last !== undefined && last.kind === kind) last.length += blocks * BLOCK;
    else runs.push({ offset: block * BLOCK, length: blocks * BLOCK, kind });
    block += blocks;
  }
  const bytes: Record<RunKind, number> = { hole: 0, text: 0, random: 0 };
  for (const run of runs) bytes[run.kind] += run.length;
  return { size, seed, runs, bytes };
}

/** Writes `length` bytes of `kind` content at `offset`, piece by piece. */
function writeContent(fd: number, offset: number, length: number, source: RandomBytes | LogText, piece: Buffer): void {
  let done = 0;
  while (done < length) {
    const n = Math.min(piece.length, length - done);
    const view = piece.subarray(0, n);
    source.fill(view);
    let written = 0;
    while (written < n) written += writeSync(fd, view, written, n - written, offset + done + written);
    done += n;
  }
}

export interface GenerateOptions {
  size: number;
  seed?: number;
}

/**
 * Creates (or replaces) `path` as the corpus: a sparse file of `size` bytes whose text and random
 * runs are written and whose holes are never touched. Fsynced before returning.
 */
export function generateCorpus(path: string, options: GenerateOptions): CorpusLayout {
  const layout = planCorpus(options.size, options.seed ?? 1);
  const text = new LogText(layout.seed, STREAM.text);
  const random = new RandomBytes(layout.seed, STREAM.random);
  const piece = Buffer.allocUnsafe(Math.min(WRITE_PIECE, layout.size));
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, layout.size);
    for (const run of layout.runs) {
      if (run.kind === 'hole') continue;
      writeContent(fd, run.offset, run.length, run.kind === 'text' ? text : random, piece);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return layout;
}

/**
 * Where the rewrite lands for (size, fraction, seed): non-overlapping, non-adjacent extents of
 * 1..16 blocks (64 KiB–1 MiB, log-uniform) at random block offsets, totalling round(fraction ×
 * size) rounded to whole blocks (at least one block when fraction > 0). Half the extents get new
 * text, half new random bytes. Sorted by offset.
 */
export function planRewrite(size: number, fraction = 0.02, seed = 1): RewriteResult {
  checkSize(size);
  if (!(fraction >= 0 && fraction <= 0.5)) {
    throw new BadInputError('bench-rewrite-fraction', `rewrite fraction ${fraction} is outside [0, 0.5]`, {
      hint: 'pass a fraction such as 0.02',
      context: { fraction },
    });
  }
  const prng = new Prng(seed, STREAM.rewriteLayout);
  const totalBlocks = size / BLOCK;
  let wanted = Math.round((fraction * size) / BLOCK);
  if (fraction > 0 && wanted === 0) wanted = 1;
  // taken[b] = 1 when block b is rewritten; a new extent may not touch a taken block or a
  // neighbour of one, so extents stay scattered instead of merging into longer ones.
  const taken = new Uint8Array(totalBlocks);
  const extents: Run[] = [];
  let attempts = 0;
  while (wanted > 0 && attempts < 100_000) {
    attempts++;
    const blocks = Math.min(prng.logUniform(MAX_REWRITE_BLOCKS), wanted);
    const start = prng.below(totalBlocks - blocks + 1);
    if (!isFree(taken, Math.max(0, start - 1), Math.min(totalBlocks, start + blocks + 1))) continue;
    taken.fill(1, start, start + blocks);
    extents.push({ offset: start * BLOCK, length: blocks * BLOCK, kind: prng.below(2) === 0 ? 'text' : 'random' });
    wanted -= blocks;
  }
  extents.sort((a, b) => a.offset - b.offset);
  const bytesRewritten = extents.reduce((sum, e) => sum + e.length, 0);
  return { fraction, seed, extents, bytesRewritten };
}

function isFree(taken: Uint8Array, from: number, to: number): boolean {
  for (let b = from; b < to; b++) if (taken[b] !== 0) return false;
  return true;
}

export interface RewriteOptions {
  fraction?: number;
  seed?: number;
}

/** Rewrites a fraction of the corpus at `path` in place (see planRewrite). Fsynced before returning. */
export function rewriteCorpus(path: string, options: RewriteOptions = {}): RewriteResult {
  const fd = openSync(path, 'r+');
  try {
    const size = fstatSync(fd).size;
    const plan = planRewrite(size, options.fraction ?? 0.02, options.seed ?? 1);
    const text = new LogText(plan.seed, STREAM.rewriteText);
    const random = new RandomBytes(plan.seed, STREAM.rewriteRandom);
    const piece = Buffer.allocUnsafe(MIB);
    for (const extent of plan.extents) {
      writeContent(fd, extent.offset, extent.length, extent.kind === 'text' ? text : random, piece);
    }
    fsyncSync(fd);
    return plan;
  } finally {
    closeSync(fd);
  }
}

export interface RewriteExtentContent {
  extent: Run;
  /** exactly the bytes rewriteCorpus writes at extent.offset (a fresh buffer per extent) */
  bytes: Buffer;
}

/**
 * The rewrite of a `size`-byte corpus, extent by extent in offset order, with the bytes
 * rewriteCorpus would write there — for applying the identical rewrite somewhere else than a raw
 * file (the live-VM benchmark writes each extent through a running VM's block layer). The content
 * streams are consumed exactly as rewriteCorpus consumes them: in extent order, in pieces of 1 MiB.
 */
export function* rewriteContents(size: number, options: RewriteOptions = {}): Generator<RewriteExtentContent, RewriteResult> {
  const plan = planRewrite(size, options.fraction ?? 0.02, options.seed ?? 1);
  const text = new LogText(plan.seed, STREAM.rewriteText);
  const random = new RandomBytes(plan.seed, STREAM.rewriteRandom);
  for (const extent of plan.extents) {
    const bytes = Buffer.allocUnsafe(extent.length);
    const source = extent.kind === 'text' ? text : random;
    for (let done = 0; done < extent.length; done += MIB) {
      source.fill(bytes.subarray(done, Math.min(extent.length, done + MIB)));
    }
    yield { extent, bytes };
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Sizes and CLI
// ---------------------------------------------------------------------------------------------

/** Parses "4G", "512M", "64K", "4GiB" or a plain byte count (binary units). */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (match === null) {
    throw new UsageError(`cannot read size "${text}"`, 'write a size such as 256M, 4G or 65536');
  }
  const unit = match[2].toUpperCase();
  const scale = unit === '' ? 1 : 1024 ** (' KMGT'.indexOf(unit));
  return Math.round(Number(match[1]) * scale);
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} ${units[unit]}`;
}

function summarise(layout: CorpusLayout): Record<string, unknown> {
  return {
    size: layout.size,
    seed: layout.seed,
    runs: layout.runs.length,
    holeBytes: layout.bytes.hole,
    textBytes: layout.bytes.text,
    randomBytes: layout.bytes.random,
  };
}

function main(argv: string[]): void {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      size: { type: 'string', default: '4G' },
      seed: { type: 'string', default: '1' },
      fraction: { type: 'string', default: '0.02' },
      layout: { type: 'boolean', default: false },
    },
  });
  const [command, file] = positionals;
  if ((command !== 'generate' && command !== 'rewrite') || file === undefined) {
    throw new UsageError('usage: corpus.ts generate FILE [--size 4G] [--seed N] [--layout] | rewrite FILE [--fraction 0.02] [--seed N]');
  }
  const seed = Number(values.seed);
  const started = performance.now();
  if (command === 'generate') {
    const layout = generateCorpus(file, { size: parseSize(values.size), seed });
    const seconds = (performance.now() - started) / 1000;
    console.log(JSON.stringify({ file, seconds, ...summarise(layout), ...(values.layout ? { layout: layout.runs } : {}) }, null, 2));
  } else {
    const result = rewriteCorpus(file, { fraction: Number(values.fraction), seed });
    const seconds = (performance.now() - started) / 1000;
    console.log(JSON.stringify({ file, seconds, extents: result.extents.length, bytesRewritten: result.bytesRewritten }, null, 2));
  }
}

if (import.meta.main) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    console.error(err instanceof Error ? err.message : String(err));
    process.exitCode = 2;
  }
}
