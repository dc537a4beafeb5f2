/**
 * A pool of codec executors (codec-ops.ts), one worker thread per core (up to 8). The main
 * thread does no codec work: it reads, looks up, packs and writes, and a synchronous compression
 * on it would stall every worker waiting for its next batch (measured: with the main thread as
 * one of two executors, the worker idled 45 % of a backup).
 *
 * Chunk processing is two-phase so chunks already in the repository are never compressed or
 * encrypted: `hash` returns the ids of a batch while the executor keeps its data; the caller
 * checks them against the blob index and asks the same executor to `encode` only the new ones.
 *
 * Buffers cross threads by transfer, not copy, wherever the sender is done with them; each side
 * frees large buffers explicitly at the end of their life (util/bytes.ts releaseBuffer).
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { TresorError } from '../util/errors.ts';
import { bufferView, copyBytes, releaseBuffer } from '../util/bytes.ts';
import { SharedArena, SharedBufferPool } from '../util/concurrency.ts';
import type { CodecKeys, BlobTypeValue, DeltaBase } from './codec.ts';
import type { CodecRequest, DecodeItem, DecodeResult } from './codec-ops.ts';

export type { DecodeItem, DecodeResult } from './codec-ops.ts';

interface Executor {
  load: number;
  call<T>(msg: CodecRequest, transfer?: ArrayBuffer[]): Promise<T>;
  close(): Promise<void>;
}

class WorkerExecutor implements Executor {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (v: any) => void; reject: (e: Error) => void }>();
  load = 0;
  #failed: Error | undefined;

  constructor(keys: CodecKeys, arena: SharedArrayBuffer) {
    this.#worker = new Worker(new URL('./codec-worker.ts', import.meta.url), {
      // A small young generation: a worker's objects are short-lived wrappers around native
      // buffers (cipher and zstd outputs), and frequent cheap scavenges free those buffers
      // promptly instead of letting malloc's per-thread arena grow. Measured on the 4 GiB
      // corpus: peak RSS of a backup 322 → 245 MiB, of a restore 323 → 251 MiB, same speed.
      resourceLimits: { maxYoungGenerationSizeMb: 3 },
      workerData: {
        encKey: keys.master?.encKey, idKey: keys.master?.idKey, compressionLevel: keys.compressionLevel, compressionStrategy: keys.compressionStrategy,
        compressionTuning: keys.compressionTuning, arena,
      },
    });
    this.#worker.unref();
    this.#worker.on('message', (m: { req: number; error?: string }) => {
      const p = this.#pending.get(m.req);
      if (!p) return;
      this.#pending.delete(m.req);
      this.load--;
      if (m.error !== undefined) p.reject(new TresorError('codec-worker', `codec worker failed: ${m.error}`));
      else p.resolve(m);
    });
    const fail = (err: Error) => {
      this.#failed = err;
      for (const p of this.#pending.values()) p.reject(new TresorError('codec-worker', `codec worker died: ${err.message}`, { cause: err }));
      this.#pending.clear();
    };
    this.#worker.on('error', fail);
    this.#worker.on('exit', (code) => {
      if (this.#pending.size > 0) fail(new Error(`exited with code ${code}`));
    });
  }

  call<T>(msg: CodecRequest, transfer: ArrayBuffer[] = []): Promise<T> {
    if (this.#failed) return Promise.reject(this.#failed);
    this.load++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(msg.req, { resolve, reject });
      this.#worker.postMessage(msg, transfer);
    });
  }

  async close(): Promise<void> {
    await this.#worker.terminate();
  }
}

/**
 * Shared output buffers for `encode`: a batch of up to 2 MiB of chunks (disk-backup.ts's
 * default) and their overhead. Larger batches fall back to a buffer per reply.
 */
const ENCODE_SLAB_BYTES = (2 << 20) + (64 << 10);

/**
 * The batch arena (batchBuffer): per executor plus two, two batches of disk-backup.ts's default
 * 2 MiB, twice its default read budget. Its pages become resident only as ranges are used.
 */
const ARENA_BYTES_PER_EXECUTOR = 2 * (2 << 20);
const ARENA_EXTRA_EXECUTORS = 2;

export interface EncodeOptions {
  bases?: Array<DeltaBase | null>;
  dictionary?: DeltaBase;
  level?: number;
  propose?: number;
}

/** A dictionary candidate (codec-ops.ts): its plaintext, id, and blob as a plain chunk. */
export interface DictionaryProposal {
  id: Buffer;
  plain: Buffer;
  blob: Buffer;
}

export interface EncodedBlobs {
  blobs: Buffer[];
  /** What each blob is: chunks may have become delta chunks (encode's `bases` and `dictionary`). */
  types: BlobTypeValue[];
  proposal?: DictionaryProposal;
  /** Frees the buffer under `blobs` (after they were copied into a pack). */
  release(): void;
}

export interface HashedBatch {
  executor: number;
  batch: number;
  /** 32 bytes per chunk; all-zero id = the chunk is all zeros. */
  ids: Buffer;
  /** bytes of chunk data in the batch */
  byteLength: number;
}

export class CodecPool {
  readonly #executors: Executor[];
  /** Per executor, the id (hex) of the dictionary it holds (codec-ops.ts encode). */
  readonly #dictionaries: Array<string | undefined>;
  #slabs: SharedBufferPool | undefined;
  #nextReq = 1;
  #nextBatch = 1;
  /** Shared with every executor (codec-ops.ts hash `at`): batch buffers (batchBuffer). */
  readonly #arena: SharedArena;
  /** Arena ranges batchBuffer handed out that `hash` has not taken yet: length by offset. */
  readonly #handedOut = new Map<number, number>();
  /** Batches read in place from the arena, by batch number: their range, freed when the batch is done with. */
  readonly #inArena = new Map<number, { at: number; bytes: number }>();

  /** `size` workers (default: one per core, up to 8). */
  constructor(keys: CodecKeys, size = Math.max(1, Math.min(availableParallelism(), 8))) {
    this.#arena = new SharedArena((size + ARENA_EXTRA_EXECUTORS) * ARENA_BYTES_PER_EXECUTOR);
    this.#executors = Array.from({ length: size }, () => new WorkerExecutor(keys, this.#arena.buffer));
    this.#dictionaries = this.#executors.map(() => undefined);
  }

  /** Created on first use: restores and verification never encode. */
  get #encodeSlabs(): SharedBufferPool {
    this.#slabs ??= new SharedBufferPool(2 * this.#executors.length + 2, ENCODE_SLAB_BYTES);
    return this.#slabs;
  }

  get size(): number {
    return this.#executors.length;
  }

  /** The least loaded executor. */
  #pick(): number {
    let best = 0;
    let bestLoad = Infinity;
    this.#executors.forEach((e, i) => {
      const load = e.load;
      if (load < bestLoad) {
        best = i;
        bestLoad = load;
      }
    });
    return best;
  }

  /**
   * A buffer of `bytes` to read a batch into and hand to `hash`: a range of the arena this pool
   * shares with its executors when one is free, else a buffer of its own. The executors read an
   * arena range in place, so a backup turns its disk over through a few MiB of memory without an
   * ArrayBuffer per batch: each one a thread receives counts as new external memory, and V8
   * answered a batch buffer sent to a worker and back per 2 MiB with a full collection of the
   * main thread's heap every ~40 ms (131 per 4 GiB backup, a tenth of its CPU with the helper
   * threads' marking). A buffer that never reaches `hash` goes back by `discardBatchBuffer`.
   */
  batchBuffer(bytes: number): Buffer {
    const at = this.#arena.allocate(bytes);
    if (at === undefined) return Buffer.from(new ArrayBuffer(bytes));
    this.#handedOut.set(at, bytes);
    return Buffer.from(this.#arena.buffer, at, bytes);
  }

  /** A buffer from batchBuffer that will not be hashed (its read failed). */
  discardBatchBuffer(data: Buffer): void {
    if (!this.#isHandedOut(data)) return;
    this.#handedOut.delete(data.byteOffset);
    this.#arena.free(data.byteOffset, data.length);
  }

  /** A whole buffer from batchBuffer, in the arena and not yet hashed or discarded. */
  #isHandedOut(data: Buffer): boolean {
    return data.buffer === this.#arena.buffer && this.#handedOut.get(data.byteOffset) === data.length;
  }

  #batchDone(batch: number): void {
    const range = this.#inArena.get(batch);
    if (range === undefined) return;
    this.#inArena.delete(batch);
    this.#arena.free(range.at, range.bytes);
  }

  /**
   * Hashes `data` (the caller must not touch it afterwards) in chunks of `chunkSize`. The
   * executor keeps the batch until `encode` or `drop`. A buffer from batchBuffer must be
   * passed whole (a view into one is copied, and the buffer stays the caller's to discard).
   */
  async hash(data: Buffer, chunkSize: number): Promise<HashedBatch> {
    const e = this.#pick();
    const batch = this.#nextBatch++;
    const byteLength = data.length; // `data` may be detached by the transfer below
    let request: CodecRequest;
    let transfer: ArrayBuffer[] = [];
    if (this.#isHandedOut(data)) {
      this.#handedOut.delete(data.byteOffset);
      this.#inArena.set(batch, { at: data.byteOffset, bytes: byteLength });
      request = { op: 'hash', req: this.#nextReq++, batch, at: data.byteOffset, byteLength, chunkSize };
    } else {
      // Transfer needs a whole, unshared ArrayBuffer; copy when `data` is a view into a larger one.
      let ab: ArrayBuffer;
      if (data.byteOffset === 0 && data.buffer instanceof ArrayBuffer && data.buffer.byteLength === data.length) {
        ab = data.buffer;
      } else {
        ab = new ArrayBuffer(data.length);
        copyBytes(new Uint8Array(ab), 0, data);
      }
      request = { op: 'hash', req: this.#nextReq++, batch, data: ab, byteLength, chunkSize };
      transfer = [ab];
    }
    try {
      const r = await this.#executors[e].call<{ ids: Uint8Array }>(request, transfer);
      return { executor: e, batch, ids: Buffer.from(r.ids.buffer, r.ids.byteOffset, r.ids.byteLength), byteLength };
    } catch (err) {
      this.#batchDone(batch);
      throw err;
    }
  }

  /** Forgets a hashed batch without encoding any of it. */
  async drop(b: HashedBatch): Promise<void> {
    try {
      await this.#executors[b.executor].call({ op: 'drop', req: this.#nextReq++, batch: b.batch });
    } finally {
      this.#batchDone(b.batch);
    }
  }

  /**
   * Encodes chunks `which` of a hashed batch and releases the batch. The blobs are views into
   * one buffer: hand them to a PackWriter (which copies them), then call `release`. Chunks only:
   * `bases`, per entry of `which`, a base to encode that chunk as a delta against, or null;
   * `dictionary`, the base for compressible chunks given none; `types` says what each blob
   * became (a delta chunk's base is its entry of `bases` when given, else the dictionary).
   * `level`: a zstd level other than the repository's setting. `propose`: also return a
   * dictionary candidate of that many bytes when one of the chunks is one (codec-ops.ts).
   */
  async encode(b: HashedBatch, which: number[], type: BlobTypeValue, opts: EncodeOptions = {}): Promise<EncodedBlobs> {
    if (which.length === 0) {
      await this.drop(b);
      return { blobs: [], types: [], release: () => undefined };
    }
    // Output into a reused shared buffer when the batch surely fits (blobs are at most the
    // chunk plus a small overhead): the common case allocates nothing per batch.
    const bound = b.byteLength + which.length * 64;
    const slab = bound <= ENCODE_SLAB_BYTES ? await this.#encodeSlabs.acquire() : undefined;
    let r: { out?: Uint8Array; lengths: number[]; types: BlobTypeValue[]; shared?: boolean; proposal?: DictionaryProposal };
    try {
      r = await this.#executors[b.executor].call({
        op: 'encode', req: this.#nextReq++, batch: b.batch, which, type, into: slab,
        ...(opts.bases?.some((x) => x !== null) ? { bases: opts.bases } : {}), ...(opts.level !== undefined ? { level: opts.level } : {}),
        ...this.#dictionaryFields(b.executor, opts.dictionary), ...(opts.propose !== undefined ? { propose: opts.propose } : {}),
      });
    } catch (err) {
      if (slab) this.#encodeSlabs.release(slab);
      throw err;
    } finally {
      this.#batchDone(b.batch);
    }
    if (slab && !r.shared) this.#encodeSlabs.release(slab);
    const out = r.shared ? Buffer.from(slab!, 0, r.lengths.reduce((n, x) => n + x, 0)) : Buffer.from(r.out!.buffer, r.out!.byteOffset, r.out!.byteLength);
    const blobs: Buffer[] = [];
    let at = 0;
    for (const n of r.lengths) {
      blobs.push(out.subarray(at, at + n));
      at += n;
    }
    let released = false;
    return {
      blobs,
      types: r.types,
      ...(r.proposal !== undefined ? { proposal: { id: bufferView(r.proposal.id), plain: bufferView(r.proposal.plain), blob: bufferView(r.proposal.blob) } } : {}),
      release: () => {
        if (released) return;
        released = true;
        if (r.shared) this.#encodeSlabs.release(slab!);
        else releaseBuffer(out);
      },
    };
  }

  /** The dictionary itself the first time an executor gets it, its id after that. */
  #dictionaryFields(e: number, dictionary: DeltaBase | undefined): { dictionary?: DeltaBase; dictionaryId?: Uint8Array } {
    if (dictionary === undefined) return {};
    const hex = Buffer.from(dictionary.id).toString('hex');
    if (this.#dictionaries[e] === hex) return { dictionaryId: dictionary.id };
    this.#dictionaries[e] = hex;
    return { dictionary };
  }

  /**
   * Decodes stored blobs. `transfer`: ArrayBuffers under the items' `stored` views that the
   * caller gives up (they move to the worker instead of being copied, and are detached here).
   * `trustAead`: codec.ts DecodeExpect.
   */
  async decode(items: DecodeItem[], transfer: ArrayBuffer[] = [], opts: { trustAead?: boolean } = {}): Promise<DecodeResult[]> {
    const r = await this.#executors[this.#pick()].call<{ results: DecodeResult[] }>({ op: 'decode', req: this.#nextReq++, items: compactIds(items), trustAead: opts.trustAead }, transfer);
    return r.results;
  }

  /**
   * Like decode, but each plaintext is copied into `into` at its item's `at` (the caller keeps
   * and reuses `into`; see codec-ops.ts); results carry only verdicts.
   */
  async decodeInto(items: DecodeItem[], into: SharedArrayBuffer, transfer: ArrayBuffer[] = [], opts: { trustAead?: boolean } = {}): Promise<DecodeResult[]> {
    const r = await this.#executors[this.#pick()].call<{ results: DecodeResult[] }>({ op: 'decode', req: this.#nextReq++, items: compactIds(items), trustAead: opts.trustAead, into }, transfer);
    return r.results;
  }

  /**
   * Like decode, but returns only the verdicts (no plaintext travels back): for verification.
   * `trustBaseAead`: items' stored bases are decoded with codec.ts DecodeExpect.trustAead (for
   * callers that check every base as a blob of its own too).
   */
  async check(items: DecodeItem[], transfer: ArrayBuffer[] = [], opts: { trustBaseAead?: boolean } = {}): Promise<DecodeResult[]> {
    const r = await this.#executors[this.#pick()].call<{ results: DecodeResult[] }>({ op: 'decode', req: this.#nextReq++, items: compactIds(items), checkOnly: true, trustBaseAead: opts.trustBaseAead }, transfer);
    return r.results;
  }

  async close(): Promise<void> {
    await Promise.all(this.#executors.map((e) => e.close()));
  }
}

/**
 * Ids are usually small Buffers that live in Node's 64 KiB allocation pool, and posting a view
 * copies its whole ArrayBuffer: 16 ids could cost 1 MiB of copying per message. One packed
 * buffer for all ids of a message costs 32 bytes each.
 */
function compactIds(items: DecodeItem[]): DecodeItem[] {
  const ids = new Uint8Array(items.length * 32);
  return items.map((it, i) => {
    ids.set(it.id, i * 32);
    return { ...it, id: ids.subarray(i * 32, i * 32 + 32) };
  });
}

/** The ArrayBuffer under `data` when `data` is all of it (so it can be transferred whole). */
export function transferable(data: Uint8Array): ArrayBuffer[] {
  const ab = data.buffer;
  return ab instanceof ArrayBuffer && data.byteOffset === 0 && data.byteLength === ab.byteLength ? [ab] : [];
}
