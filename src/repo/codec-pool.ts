/**
 * A pool of codec worker threads (codec-worker.ts). Chunk processing is two-phase so that
 * chunks already in the repository are never compressed or encrypted: `hash` returns the ids of
 * a batch while the worker keeps its data; the caller checks them against the blob index and
 * asks the same worker to `encode` only the new ones.
 */
import { Worker } from 'node:worker_threads';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { availableParallelism } from 'node:os';
import { TresorError } from '../util/errors.ts';
import type { CodecKeys, BlobTypeValue } from './codec.ts';
import type { DecodeItem, DecodeResult } from './codec-worker.ts';

interface Pending {
  resolve: (v: any) => void;
  reject: (e: Error) => void;
}

class CodecWorker {
  readonly worker: Worker;
  readonly pending = new Map<number, Pending>();
  load = 0;
  #failed: Error | undefined;

  constructor(keys: CodecKeys) {
    this.worker = new Worker(new URL('./codec-worker.ts', import.meta.url), {
      workerData: {
        encKey: keys.master?.encKey, idKey: keys.master?.idKey, compressionLevel: keys.compressionLevel,
      },
    });
    this.worker.unref();
    this.worker.on('message', (m: { req: number; error?: string }) => {
      const p = this.pending.get(m.req);
      if (!p) return;
      this.pending.delete(m.req);
      this.load--;
      if (m.error !== undefined) p.reject(new TresorError('codec-worker', `codec worker failed: ${m.error}`));
      else p.resolve(m);
    });
    const fail = (err: Error) => {
      this.#failed = err;
      for (const p of this.pending.values()) p.reject(new TresorError('codec-worker', `codec worker died: ${err.message}`, { cause: err }));
      this.pending.clear();
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => {
      if (this.pending.size > 0) fail(new Error(`exited with code ${code}`));
    });
  }

  call<T>(msg: Record<string, unknown>, req: number, transfer: ArrayBuffer[] = []): Promise<T> {
    if (this.#failed) return Promise.reject(this.#failed);
    this.load++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(req, { resolve, reject });
      this.worker.postMessage({ ...msg, req }, transfer);
    });
  }
}

export interface HashedBatch {
  worker: number;
  batch: number;
  /** 32 bytes per chunk; all-zero id = the chunk is all zeros. */
  ids: Buffer;
}

/**
 * Workers churn through large short-lived buffers (input batches, zstd and AES outputs). V8 only
 * collects them once external memory has grown by tens of MiB per isolate, which with several
 * isolates blows the memory budget; so workers are given `gc()` and call it every few MiB.
 * The flag must be set before the workers' isolates are created.
 */
let gcExposed = false;
let mainGc: (() => void) | undefined;
function exposeGcToWorkers(): void {
  if (gcExposed) return;
  setFlagsFromString('--expose-gc');
  gcExposed = true;
  // Contexts created from now on have gc(); the main thread gets one from a fresh context.
  mainGc = runInNewContext('gc') as () => void;
}

/** Collects garbage on the main thread (after a large buffer such as a pack was released). */
export function collectGarbage(): void {
  mainGc?.();
}

export class CodecPool {
  readonly #workers: CodecWorker[];
  #nextReq = 1;
  #nextBatch = 1;

  constructor(keys: CodecKeys, size = Math.max(1, Math.min(availableParallelism(), 8))) {
    exposeGcToWorkers();
    this.#workers = Array.from({ length: size }, () => new CodecWorker(keys));
  }

  get size(): number {
    return this.#workers.length;
  }

  #leastLoaded(): number {
    let best = 0;
    for (let i = 1; i < this.#workers.length; i++) if (this.#workers[i].load < this.#workers[best].load) best = i;
    return best;
  }

  /** Hashes `data` (transferred: the caller must not touch it afterwards) in chunks of `chunkSize`. */
  async hash(data: Buffer, chunkSize: number): Promise<HashedBatch> {
    const w = this.#leastLoaded();
    const batch = this.#nextBatch++;
    // Transfer needs a whole, unshared ArrayBuffer; copy when `data` is a view into a larger one.
    let ab: ArrayBuffer;
    if (data.byteOffset === 0 && data.buffer.byteLength === data.length && data.buffer instanceof ArrayBuffer) {
      ab = data.buffer;
    } else {
      ab = new ArrayBuffer(data.length);
      new Uint8Array(ab).set(data);
    }
    const owned = { length: data.length };
    const r = await this.#workers[w].call<{ ids: Uint8Array }>({ op: 'hash', batch, data: ab, byteLength: owned.length, chunkSize }, this.#nextReq++, [ab]);
    return { worker: w, batch, ids: Buffer.from(r.ids.buffer, r.ids.byteOffset, r.ids.byteLength) };
  }

  /** Encodes chunks `which` of a hashed batch and releases the batch. */
  async encode(b: HashedBatch, which: number[], type: BlobTypeValue): Promise<Buffer[]> {
    if (which.length === 0) {
      await this.#workers[b.worker].call({ op: 'drop', batch: b.batch }, this.#nextReq++);
      return [];
    }
    const r = await this.#workers[b.worker].call<{ blobs: Uint8Array[] }>({ op: 'encode', batch: b.batch, which, type }, this.#nextReq++);
    return r.blobs.map((u) => Buffer.from(u.buffer, u.byteOffset, u.byteLength));
  }

  async decode(items: DecodeItem[]): Promise<DecodeResult[]> {
    const w = this.#leastLoaded();
    const r = await this.#workers[w].call<{ results: DecodeResult[] }>({ op: 'decode', items }, this.#nextReq++);
    return r.results;
  }

  async close(): Promise<void> {
    await Promise.all(this.#workers.map((w) => w.worker.terminate()));
  }
}
