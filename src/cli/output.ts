/**
 * CLI output: one JSON document on stdout with --json, human text otherwise; progress bars on
 * a TTY (stderr) with rate and ETA; errors with what is wrong and what to do.
 */
import { TresorError, ExitCode } from '../util/errors.ts';

export interface OutputOptions {
  json: boolean;
  quiet: boolean;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[u]}`;
}

export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${String(sec).padStart(2, '0')}` : `${m}:${String(sec).padStart(2, '0')}`;
}

export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?$/i.exec(text.trim());
  if (!m) throw new TresorError('usage', `invalid size ${JSON.stringify(text)}`, { hint: 'write sizes like 65536, 64K, 4M or 1G', exitCode: ExitCode.usage });
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round(Number(m[1]) * mult);
}

/** A progress bar on stderr, redrawn at most 5 times a second; silent when not a TTY. */
export class Progress {
  readonly #label: string;
  readonly #enabled: boolean;
  readonly #start = Date.now();
  #last = 0;
  #total = 0;
  #done = 0;

  constructor(label: string, opts: OutputOptions) {
    this.#label = label;
    this.#enabled = !opts.json && !opts.quiet && process.stderr.isTTY === true;
  }

  update(done: number, total: number): void {
    this.#done = done;
    this.#total = total;
    const now = Date.now();
    if (!this.#enabled || now - this.#last < 200) return;
    this.#last = now;
    this.#draw(now);
  }

  #draw(now: number): void {
    const frac = this.#total > 0 ? Math.min(1, this.#done / this.#total) : 0;
    const width = 28;
    const filled = Math.round(frac * width);
    const elapsed = (now - this.#start) / 1000;
    const rate = elapsed > 0 ? this.#done / elapsed : 0;
    const eta = rate > 0 ? ((this.#total - this.#done) / rate) * 1000 : 0;
    const bar = '='.repeat(Math.max(0, filled - 1)) + (filled > 0 ? '>' : '') + ' '.repeat(width - filled);
    const line = `${this.#label} [${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ${formatBytes(this.#done)}/${formatBytes(this.#total)} ${formatBytes(rate)}/s ETA ${formatDuration(eta)}`;
    process.stderr.write(`\r${line.slice(0, (process.stderr.columns || 120) - 1)}\x1b[K`);
  }

  finish(): void {
    if (!this.#enabled) return;
    this.#draw(Date.now());
    process.stderr.write('\n');
  }
}

export function printResult(opts: OutputOptions, json: unknown, human: () => string): void {
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(json, null, 2)}\n`);
  } else if (!opts.quiet) {
    const text = human();
    if (text) process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
  }
}

export function reportError(err: unknown, json: boolean): number {
  const te = err instanceof TresorError ? err : undefined;
  const code = te?.exitCode ?? ExitCode.failure;
  if (json) {
    const body = te ? te.toJSON() : { code: 'internal', message: err instanceof Error ? err.message : String(err) };
    process.stdout.write(`${JSON.stringify({ ok: false, error: body }, null, 2)}\n`);
  } else {
    const msg = err instanceof Error ? err.message : String(err);
    process.stderr.write(`tresor: error: ${msg}\n`);
    if (te?.hint) process.stderr.write(`  what to do: ${te.hint}\n`);
    if (!te && err instanceof Error && process.env.TRESOR_DEBUG) process.stderr.write(`${err.stack}\n`);
    if (!te) process.stderr.write('  this is an unexpected error; run with TRESOR_DEBUG=1 for details and report it\n');
  }
  return code;
}
