/**
 * The codec operations the pool runs: hashing and zero detection, encoding and decoding of
 * chunks. One `CodecExecutor` holds a set of keys and the batches between `hash` and `encode`;
 * it runs in a worker thread (codec-worker.ts) or inline on the main thread (codec-pool.ts).
 * Protocol:
 *  - hash {batch, data, chunkSize}: split `data` into chunks; reply ids (32 bytes each, all-zero
 *    id for an all-zero chunk). The executor keeps the data until `encode` or `drop`.
 *  - encode {batch, which[]}: reply the encoded blobs of the chosen chunks; forget the batch.
 *  - drop {batch}: forget the batch.
 *  - decode {items[]}: decode stored blobs (verifying ids); reply plaintexts or error messages.
 * Replies own their ArrayBuffers whole, so a worker can transfer rather than copy them.
 */
import { type BlobTypeValue, type CodecKeys, ZERO_ID, computeId, decodeBlob, encodeBlob } from './codec.ts';
import { isAllZero } from '../util/bytes.ts';

export type CodecRequest =
  | { op: 'hash'; req: number; batch: number; data: ArrayBuffer; byteLength: number; chunkSize: number }
  | { op: 'encode'; req: number; batch: number; which: number[]; type: BlobTypeValue }
  | { op: 'drop'; req: number; batch: number }
  | { op: 'decode'; req: number; items: DecodeItem[]; checkOnly?: boolean };

export interface DecodeItem {
  type: BlobTypeValue;
  id: Uint8Array;
  stored: Uint8Array;
  rawLength: number;
  label: string;
}

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
  readonly #batches = new Map<number, { data: Buffer; chunkSize: number }>();

  constructor(keys: CodecKeys) {
    this.#keys = keys;
  }

  handle(msg: CodecRequest): CodecReply {
    switch (msg.op) {
      case 'hash': {
        const data = Buffer.from(msg.data, 0, msg.byteLength);
        const n = Math.ceil(data.length / msg.chunkSize);
        const ids = Buffer.from(new ArrayBuffer(n * 32));
        for (let i = 0; i < n; i++) {
          const chunk = chunkAt(data, msg.chunkSize, i);
          (isAllZero(chunk) ? ZERO_ID : computeId(this.#keys, chunk)).copy(ids, i * 32);
        }
        this.#batches.set(msg.batch, { data, chunkSize: msg.chunkSize });
        return { message: { req: msg.req, ids }, transfer: [ids.buffer as ArrayBuffer], garbage: 0 };
      }
      case 'encode': {
        const b = this.#batches.get(msg.batch);
        this.#batches.delete(msg.batch);
        if (!b) throw new Error(`unknown batch ${msg.batch}`);
        const blobs: Buffer[] = [];
        const transfer: ArrayBuffer[] = [];
        for (const i of msg.which) {
          const chunk = chunkAt(b.data, b.chunkSize, i);
          const blob = owned(encodeBlob(this.#keys, msg.type, computeId(this.#keys, chunk), chunk));
          blobs.push(blob);
          transfer.push(blob.buffer as ArrayBuffer);
        }
        return { message: { req: msg.req, blobs }, transfer, garbage: b.data.length * 3 };
      }
      case 'drop': {
        const size = this.#batches.get(msg.batch)?.data.length ?? 0;
        this.#batches.delete(msg.batch);
        return { message: { req: msg.req }, transfer: [], garbage: size };
      }
      case 'decode': {
        const transfer: ArrayBuffer[] = [];
        let garbage = 0;
        const results: DecodeResult[] = msg.items.map((it) => {
          garbage += it.stored.length + it.rawLength;
          try {
            const decoded = decodeBlob(this.#keys, it.type, it.id, it.stored, { id: it.id, maxLength: it.rawLength, exactLength: true },
              () => ({ what: it.label, context: {} }));
            // Verification only needs the verdict: do not ship plaintext back.
            if (msg.checkOnly) return { ok: true, plain: new Uint8Array(0) };
            const plain = owned(decoded);
            if (!transfer.includes(plain.buffer as ArrayBuffer)) transfer.push(plain.buffer as ArrayBuffer);
            return { ok: true, plain };
          } catch (err) {
            return { ok: false, message: err instanceof Error ? err.message : String(err), code: (err as { code?: string }).code ?? 'error' };
          }
        });
        return { message: { req: msg.req, results }, transfer, garbage };
      }
    }
  }
}

type GcFunction = (opts: { type: 'minor' | 'major'; execution: 'sync' }) => void;

/**
 * Prompt garbage collection. The codec churns through large short-lived buffers (input batches,
 * zstd and AES outputs, packs). V8 collects them only once an isolate's external memory has grown
 * by tens of MiB, which across isolates blows the memory budget; so every 12 MiB of garbage a
 * scavenge runs (cheap: the wrappers are young), and every 8th time a full collection.
 */
export class GarbageCollector {
  readonly #gc: GcFunction | undefined;
  #bytes = 0;
  #runs = 0;

  constructor(gc: GcFunction | undefined) {
    this.#gc = gc;
  }

  note(bytes: number): void {
    this.#bytes += bytes;
    if (this.#bytes < 12 << 20 || !this.#gc) return;
    this.#bytes = 0;
    this.#gc({ type: ++this.#runs % 8 === 0 ? 'major' : 'minor', execution: 'sync' });
  }
}
