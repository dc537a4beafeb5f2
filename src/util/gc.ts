/**
 * Prompt garbage collection where a thread turns over many buffers. Large buffers are freed
 * explicitly (bytes.ts releaseBuffer), but small ones (socket reads, cipher and zstd outputs)
 * live until a collection, and V8 lets tens of MiB of external memory pile up before it
 * collects; malloc then keeps that high-water mark as resident memory. So after every
 * `everyBytes` of data processed a scavenge runs (cheap: the wrappers are young), and every
 * `majorEvery`-th time (0: never) a full collection.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

export type GcFunction = (opts: { type: 'minor' | 'major'; execution: 'sync' }) => void;

let exposed: { gc: GcFunction | undefined } | undefined;

/**
 * `gc()` for the calling thread (each thread calls this for itself; the first call per thread
 * does the work).
 *
 * V8 gives the function to a context created while `--expose-gc` is set, so the flag is set for
 * the moment one new context takes it, and then cleared. Cleared, because V8's flags are part of
 * what a code cache is checked against: while `--expose-gc` stayed set, every worker thread
 * created afterwards compiled Node's internal modules from source instead of from the code cache
 * built into Node, and Tresor's own modules missed the compile cache too. Measured: two codec
 * workers started in 0.17–0.24 CPU-s instead of 0.33–0.45.
 *
 * The flag is the process's: codec workers starting together can clear it under each other's
 * context, which then has no `gc`. Such a thread tries again, a few times (a collection is
 * only a memory saving; without it the thread works the same).
 */
export function exposeGc(): GcFunction | undefined {
  if (exposed === undefined) {
    // Started with --expose-gc: the function is there, and the flag is the user's to keep.
    let gc = (globalThis as { gc?: GcFunction }).gc;
    for (let attempt = 0; attempt < 5 && gc === undefined; attempt++) {
      try {
        setFlagsFromString('--expose-gc');
        const got: unknown = runInNewContext('typeof gc === "function" ? gc : undefined');
        gc = typeof got === 'function' ? (got as GcFunction) : undefined;
      } catch {
        gc = undefined;
      } finally {
        setFlagsFromString('--no-expose-gc');
      }
    }
    exposed = { gc };
  }
  return exposed.gc;
}

export class GarbageCollector {
  readonly #gc: GcFunction | undefined;
  readonly #everyBytes: number;
  readonly #majorEvery: number;
  #bytes = 0;
  #runs = 0;

  constructor(gc: GcFunction | undefined, opts: { everyBytes?: number; majorEvery?: number } = {}) {
    this.#gc = gc;
    this.#everyBytes = opts.everyBytes ?? 12 << 20;
    this.#majorEvery = opts.majorEvery ?? 8;
  }

  note(bytes: number): void {
    this.#bytes += bytes;
    if (this.#bytes < this.#everyBytes || !this.#gc) return;
    this.#bytes = 0;
    this.#gc({ type: this.#majorEvery > 0 && ++this.#runs % this.#majorEvery === 0 ? 'major' : 'minor', execution: 'sync' });
  }
}
