/**
 * The codec operations the pool runs: hashing and zero detection, encoding and decoding of
 * chunks. One `CodecExecutor` holds a set of keys and the batches between `hash` and `encode`;
 * it runs in a worker thread (codec-worker.ts). Protocol:
 *  - hash {batch, data | at, byteLength, chunkSize}: split the batch into chunks; reply ids (32
 *    bytes each, all-zero id for an all-zero chunk). The batch is `data` (transferred, the
 *    executor's own), or the range at `at` of the arena the pool shared with the executor when
 *    it was made (read in place; the caller reuses the range once `encode` or `drop` replied).
 *    The executor keeps the batch until `encode` or `drop`.
 *  - encode {batch, which[], bases?, level?, dictionary?, dictionaryId?, propose?, into?}:
 *    encode the chosen chunks (chunk `which[n]` as a delta chunk against `bases[n]` where given
 *    and worth it, else against the dictionary where given and worth it; at zstd `level` when
 *    given, else the repository's setting). `dictionary` is kept for later requests, which name
 *    it by `dictionaryId` alone (a worker handles its requests in order). With `propose` (bytes),
 *    also a dictionary candidate from the first chunk that compressed well (codec.ts
 *    dictionaryCandidate): its plaintext, id and blob as a plain chunk, in the reply's
 *    `proposal`. Reply the blobs' lengths and types, the
 *    blobs one after another in `into` (a SharedArrayBuffer the caller reuses) when they fit,
 *    else in one buffer of the reply; forget the batch.
 *  - drop {batch}: forget the batch.
 *  - decode {items[], trustAead?, trustBaseAead?, into?}: decode stored blobs (verifying ids; a
 *    delta chunk against its item's `base`, or against its `storedBase` decoded here first, once
 *    per request however many items share it); reply plaintexts or error messages. With `into`
 *    (a SharedArrayBuffer the caller reuses) each plaintext is copied to its item's `at` and only
 *    verdicts travel back: no buffer is allocated per chunk that outlives the request, which
 *    keeps malloc's per-thread arenas from fragmenting.
 * The executor owns every buffer a request brings (they arrived by message: copied or
 * transferred) and frees large ones when done. Replies own their ArrayBuffers whole, so they
 * are transferred rather than copied.
 */
import { BlobType, type BlobTypeValue, type CodecKeys, type DeltaBase, ZERO_ID, computeId, decodeBlob, dictionaryCandidate, encodeBlob, encodeChunk } from './codec.ts';
import { copyBytes, isAllZero, releaseBuffer } from '../util/bytes.ts';

export type CodecRequest =
  | { op: 'hash'; req: number; batch: number; data?: ArrayBuffer; at?: number; byteLength: number; chunkSize: number }
  | {
    op: 'encode'; req: number; batch: number; which: number[]; type: BlobTypeValue; bases?: Array<DeltaBase | null>; level?: number;
    dictionary?: DeltaBase; dictionaryId?: Uint8Array; propose?: number; into?: SharedArrayBuffer;
  }
  | { op: 'drop'; req: number; batch: number }
  | { op: 'decode'; req: number; items: DecodeItem[]; checkOnly?: boolean; trustAead?: boolean; trustBaseAead?: boolean; into?: SharedArrayBuffer };

export interface DecodeItem {
  type: BlobTypeValue;
  id: Uint8Array;
  stored: Uint8Array;
  rawLength: number;
  label: string;
  /** With a decode `into` a shared buffer: where this item's plaintext goes in it. */
  at?: number;
  /** A delta chunk's base (its plaintext, fetched and checked by the caller). */
  base?: DeltaBase;
  /** Instead of `base`: the base as stored, decoded by the executor (blob-batch.ts fetchDeltaBases). */
  storedBase?: StoredBase;
}

/**
 * A delta chunk's base as fetched, not decoded: a plain chunk, or a delta chunk (two levels,
 * repository-format.md §4) with its own base's plaintext in `base`.
 */
export interface StoredBase {
  id: Uint8Array;
  type: BlobTypeValue;
  stored: Uint8Array;
  rawLength: number;
  /** Names the base in errors, e.g. "chunk 1a2b… in data/ab/ab12…". */
  label: string;
  base?: DeltaBase;
}

/** DecodeResult code of an item whose stored base could not be decoded. */
export const BASE_UNREADABLE = 'base-unreadable';

/** The stored bases one decode request has decoded, by id (hex): plaintext or the error. */
type StoredBases = Map<string, { stored: Uint8Array; base: DeltaBase | Error }>;

export type DecodeResult = { ok: true; plain: Uint8Array } | { ok: false; message: string; code: string };

export interface CodecReply {
  message: Record<string, unknown>;
  transfer: ArrayBuffer[];
  /** Bytes that became garbage while handling the request (drives prompt collection). */
  garbage: number;
}

/** A Buffer that owns its whole ArrayBuffer (small Buffers share a pool and cannot be transferred). */
function owned(buf: Buffer): Buffer {
  return buf.byteOffset === 0 && buf.buffer.byteLength === buf.length ? buf : Buffer.from(new Uint8Array(buf).buffer);
}

function chunkAt(data: Buffer, chunkSize: number, i: number): Buffer {
  return data.subarray(i * chunkSize, Math.min(data.length, (i + 1) * chunkSize));
}

export class CodecExecutor {
  readonly #keys: CodecKeys;
  /** The pool's batch arena (hash `at`), when it shared one. */
  readonly #arena: SharedArrayBuffer | undefined;
  readonly #batches = new Map<number, { data: Buffer; chunkSize: number; ids: Buffer }>();
  /** The dictionary of the last encode that brought one. */
  #dictionary: DeltaBase | undefined;

  constructor(keys: CodecKeys, arena?: SharedArrayBuffer) {
    this.#keys = keys;
    this.#arena = arena;
  }

  /** A batch is done with: a buffer of its own is freed now; an arena range is the caller's again once this replies. */
  #finish(b: { data: Buffer } | undefined): void {
    if (b !== undefined && b.data.buffer !== this.#arena) releaseBuffer(b.data, 'arraybuffer');
  }

  #batchData(msg: { data?: ArrayBuffer; at?: number; byteLength: number }): Buffer {
    if (msg.data !== undefined) return Buffer.from(msg.data, 0, msg.byteLength);
    if (this.#arena === undefined || msg.at === undefined || msg.at + msg.byteLength > this.#arena.byteLength) {
      throw new Error(`hash of arena range ${msg.at}+${msg.byteLength}, outside the arena this executor was given`);
    }
    return Buffer.from(this.#arena, msg.at, msg.byteLength);
  }

  handle(msg: CodecRequest): CodecReply {
    switch (msg.op) {
      case 'hash': {
        const data = this.#batchData(msg);
        const n = Math.ceil(data.length / msg.chunkSize);
        const ids = Buffer.allocUnsafe(n * 32);
        for (let i = 0; i < n; i++) {
          const chunk = chunkAt(data, msg.chunkSize, i);
          (isAllZero(chunk) ? ZERO_ID : computeId(this.#keys, chunk)).copy(ids, i * 32);
        }
        // The ids are kept for `encode` (a chunk's id is its blob's context): hashing twice would
        // cost a quarter of the backup's CPU. The reply gets a copy (small) to transfer.
        this.#batches.set(msg.batch, { data, chunkSize: msg.chunkSize, ids });
        const reply = Buffer.from(new ArrayBuffer(n * 32));
        ids.copy(reply);
        return { message: { req: msg.req, ids: reply }, transfer: [reply.buffer as ArrayBuffer], garbage: 0 };
      }
      case 'encode': {
        const b = this.#batches.get(msg.batch);
        this.#batches.delete(msg.batch);
        if (!b) throw new Error(`unknown batch ${msg.batch}`);
        // Each blob is copied out and freed at once, on this thread: nothing allocated here
        // outlives the request. Into the caller's shared buffer when given and big enough
        // (codec-pool.ts), else into one buffer transferred back.
        const encoded: Buffer[] = [];
        const types: BlobTypeValue[] = [];
        let total = 0;
        let proposal: { id: Buffer; plain: Buffer; blob: Buffer } | undefined;
        if (msg.dictionary !== undefined) this.#dictionary = msg.dictionary;
        if (msg.dictionaryId !== undefined && !(this.#dictionary !== undefined && Buffer.from(this.#dictionary.id).equals(msg.dictionaryId))) {
          throw new Error(`unknown dictionary ${Buffer.from(msg.dictionaryId).toString('hex')}`);
        }
        const dictionary = msg.dictionary ?? (msg.dictionaryId !== undefined ? this.#dictionary : undefined);
        msg.which.forEach((i, n) => {
          const id = b.ids.subarray(i * 32, i * 32 + 32);
          const chunk = chunkAt(b.data, b.chunkSize, i);
          const { type, blob, ratio } = msg.type === BlobType.chunk
            ? encodeChunk(this.#keys, id, chunk, msg.bases?.[n] ?? undefined, msg.level, dictionary)
            : { type: msg.type, blob: encodeBlob(this.#keys, msg.type, id, chunk), ratio: undefined };
          const candidate = msg.propose !== undefined && proposal === undefined ? dictionaryCandidate(chunk, ratio, msg.propose) : undefined;
          if (candidate !== undefined) {
            const plain = owned(Buffer.from(candidate));
            const dictId = computeId(this.#keys, plain);
            proposal = { id: owned(dictId), plain, blob: owned(encodeBlob(this.#keys, BlobType.chunk, dictId, plain)) };
          }
          encoded.push(blob);
          types.push(type);
          total += blob.length;
        });
        const shared = msg.into !== undefined && total <= msg.into.byteLength;
        const out = shared ? new Uint8Array(msg.into!, 0, total) : Buffer.from(new ArrayBuffer(total));
        const lengths: number[] = [];
        let at = 0;
        for (const blob of encoded) {
          copyBytes(out, at, blob);
          at += blob.length;
          lengths.push(blob.length);
          releaseBuffer(blob);
        }
        // What is left for the collector: cipher outputs small enough to live in Node's pool.
        const message: Record<string, unknown> = shared ? { req: msg.req, lengths, types, shared: true } : { req: msg.req, out, lengths, types };
        const transfer: ArrayBuffer[] = shared ? [] : [out.buffer as ArrayBuffer];
        if (proposal !== undefined) {
          message.proposal = proposal;
          transfer.push(proposal.id.buffer as ArrayBuffer, proposal.plain.buffer as ArrayBuffer, proposal.blob.buffer as ArrayBuffer);
        }
        this.#finish(b);
        // Garbage: the blobs, and as much again as the chunks encoded. Most zstd outputs now live in
        // contexts kept across calls (zstd-context.ts), but counting only the blobs changed no wall
        // time and raised the peak RSS (docs/performance.md, twelfth session).
        return { message, transfer, garbage: total + msg.which.length * b.chunkSize };
      }
      case 'drop': {
        this.#finish(this.#batches.get(msg.batch));
        this.#batches.delete(msg.batch);
        return { message: { req: msg.req }, transfer: [], garbage: 0 };
      }
      case 'decode': {
        const transfer: ArrayBuffer[] = [];
        const bases: StoredBases = new Map();
        const results: DecodeResult[] = msg.items.map((it) => {
          try {
            const base = it.storedBase !== undefined ? this.#storedBase(it.storedBase, bases, msg.trustBaseAead === true || msg.trustAead === true) : it.base;
            const decoded = decodeBlob(this.#keys, it.type, it.id, it.stored, { id: it.id, maxLength: it.rawLength, exactLength: true, trustAead: msg.trustAead === true && !msg.checkOnly },
              () => ({ what: it.label, context: {} }), base);
            // Verification only needs the verdict: do not ship plaintext back.
            if (msg.checkOnly) {
              if (decoded.buffer !== it.stored.buffer) releaseBuffer(decoded, 'arraybuffer');
              return { ok: true, plain: new Uint8Array(0) };
            }
            if (msg.into) {
              const at = it.at ?? -1;
              if (!(at >= 0 && at + decoded.length <= msg.into.byteLength)) throw new Error(`plaintext of ${it.label} does not fit the shared buffer at ${at}`);
              copyBytes(new Uint8Array(msg.into), at, decoded);
              if (decoded.buffer !== it.stored.buffer) releaseBuffer(decoded, 'arraybuffer');
              return { ok: true, plain: new Uint8Array(0) };
            }
            const plain = owned(decoded);
            if (!transfer.includes(plain.buffer as ArrayBuffer)) transfer.push(plain.buffer as ArrayBuffer);
            return { ok: true, plain };
          } catch (err) {
            return { ok: false, message: err instanceof Error ? err.message : String(err), code: (err as { code?: string }).code ?? 'error' };
          }
        });
        // The stored bytes came in a message (copied or transferred): this executor's own.
        let garbage = 0;
        for (const it of msg.items) {
          // (and a zstd output buffer the size of the plaintext, and the dictionary copied in)
          garbage += it.stored.length + it.rawLength;
          releaseBuffer(it.stored, 'arraybuffer');
        }
        for (const { stored, base } of bases.values()) {
          if (!(base instanceof Error) && base.plain.buffer !== stored.buffer) {
            garbage += base.plain.length;
            releaseBuffer(base.plain, 'arraybuffer');
          }
          garbage += stored.length;
          releaseBuffer(stored, 'arraybuffer');
        }
        return { message: { req: msg.req, results }, transfer, garbage };
      }
    }
  }

  /**
   * A stored base's plaintext, decoded once per request (`bases`, by id). With `trustAead` the
   * AES-GCM tag stands for its identity (codec.ts DecodeExpect): callers set it where the base
   * is checked fully elsewhere (verify reads every base as a chunk of its own too).
   */
  #storedBase(sb: StoredBase, bases: StoredBases, trustAead: boolean): DeltaBase {
    const hex = Buffer.from(sb.id).toString('hex');
    let decoded = bases.get(hex);
    if (decoded === undefined) {
      let base: DeltaBase | Error;
      try {
        base = { id: sb.id, plain: decodeBlob(this.#keys, sb.type, sb.id, sb.stored, { id: sb.id, maxLength: sb.rawLength, exactLength: true, trustAead }, () => ({ what: sb.label, context: {} }), sb.base) };
      } catch (err) {
        base = err instanceof Error ? err : new Error(String(err));
      }
      bases.set(hex, (decoded = { stored: sb.stored, base }));
    }
    if (decoded.base instanceof Error) throw Object.assign(new Error(`its base cannot be read: ${decoded.base.message}`), { code: BASE_UNREADABLE });
    return decoded.base;
  }
}
