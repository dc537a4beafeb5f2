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
 * Makes `gc()` available: returned for this thread, and global in worker threads created from
 * now on. (V8's flag is read when a context is created: a new context gets the function; one is
 * made once per thread.)
 */
export function exposeGc(): GcFunction | undefined {
  if (exposed === undefined) {
    setFlagsFromString('--expose-gc');
    let gc: GcFunction | undefined;
    try {
      gc = runInNewContext('gc') as GcFunction;
    } catch {
      gc = undefined;
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
