/**
 * Codec worker thread: hashing, zero detection, compression, encryption and decoding of chunks,
 * so that both cores work while the main thread does I/O. Protocol (see codec-pool.ts):
 *  - hash {batch, data, chunkSize}: split `data` into chunks; reply ids (32 bytes each, all-zero
 *    id for an all-zero chunk). The worker keeps the data until `encode` or `drop`.
 *  - encode {batch, which[]}: reply the encoded blobs of the chosen chunks; forget the batch.
 *  - drop {batch}: forget the batch.
 *  - decode {items[]}: decode stored blobs (verifying ids); reply plaintexts or error messages.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { type BlobTypeValue, type CodecKeys, ZERO_ID, computeId, decodeBlob, encodeBlob } from './codec.ts';
import { isAllZero } from '../util/bytes.ts';

interface WorkerInit {
  encKey?: Uint8Array;
  idKey?: Uint8Array;
  compressionLevel: number;
}

const init = workerData as WorkerInit;
const keys: CodecKeys = {
  master: init.encKey && init.idKey ? { encKey: Buffer.from(init.encKey), idKey: Buffer.from(init.idKey) } : undefined,
  compressionLevel: init.compressionLevel,
};

const batches = new Map<number, { data: Buffer; chunkSize: number }>();

// See codec-pool.ts: collect garbage buffers promptly to keep the process's memory bounded.
const GC_EVERY_BYTES = 12 << 20;
let bytesSinceGc = 0;
const collect = (globalThis as { gc?: () => void }).gc;
function noteGarbage(bytes: number): void {
  bytesSinceGc += bytes;
  if (bytesSinceGc >= GC_EVERY_BYTES && collect) {
    bytesSinceGc = 0;
    collect();
  }
}

export type WorkerRequest =
  | { op: 'hash'; req: number; batch: number; data: ArrayBuffer; byteLength: number; chunkSize: number }
  | { op: 'encode'; req: number; batch: number; which: number[]; type: BlobTypeValue }
  | { op: 'drop'; req: number; batch: number }
  | { op: 'decode'; req: number; items: DecodeItem[] };

export interface DecodeItem {
  type: BlobTypeValue;
  id: Uint8Array;
  stored: Uint8Array;
  rawLength: number;
  label: string;
}

export type DecodeResult = { ok: true; plain: Uint8Array } | { ok: false; message: string; code: string };

function chunkAt(data: Buffer, chunkSize: number, i: number): Buffer {
  return data.subarray(i * chunkSize, Math.min(data.length, (i + 1) * chunkSize));
}

parentPort!.on('message', (msg: WorkerRequest) => {
  try {
    switch (msg.op) {
      case 'hash': {
        const data = Buffer.from(msg.data, 0, msg.byteLength);
        const n = Math.ceil(data.length / msg.chunkSize);
        const ids = Buffer.from(new ArrayBuffer(n * 32));
        for (let i = 0; i < n; i++) {
          const chunk = chunkAt(data, msg.chunkSize, i);
          (isAllZero(chunk) ? ZERO_ID : computeId(keys, chunk)).copy(ids, i * 32);
        }
        batches.set(msg.batch, { data, chunkSize: msg.chunkSize });
        parentPort!.postMessage({ req: msg.req, ids }, [ids.buffer as ArrayBuffer]);
        break;
      }
      case 'encode': {
        const b = batches.get(msg.batch);
        batches.delete(msg.batch);
        if (!b) throw new Error(`unknown batch ${msg.batch}`);
        const blobs: Buffer[] = [];
        const transfer: ArrayBuffer[] = [];
        for (const i of msg.which) {
          const chunk = chunkAt(b.data, b.chunkSize, i);
          const enc = encodeBlob(keys, msg.type, computeId(keys, chunk), chunk);
          // Transfer needs a buffer that owns its whole ArrayBuffer (small ones come from a pool).
          const own = enc.byteOffset === 0 && enc.buffer.byteLength === enc.length ? enc : Buffer.from(new Uint8Array(enc).buffer);
          blobs.push(own);
          transfer.push(own.buffer as ArrayBuffer);
        }
        parentPort!.postMessage({ req: msg.req, blobs }, transfer);
        noteGarbage(b.data.length * 3);
        break;
      }
      case 'drop':
        noteGarbage(batches.get(msg.batch)?.data.length ?? 0);
        batches.delete(msg.batch);
        parentPort!.postMessage({ req: msg.req });
        break;
      case 'decode': {
        const results: DecodeResult[] = msg.items.map((it) => {
          try {
            const plain = decodeBlob(keys, it.type, it.id, it.stored, { id: it.id, maxLength: it.rawLength, exactLength: true },
              () => ({ what: it.label, context: {} }));
            return { ok: true, plain };
          } catch (err) {
            return { ok: false, message: err instanceof Error ? err.message : String(err), code: (err as { code?: string }).code ?? 'error' };
          }
        });
        parentPort!.postMessage({ req: msg.req, results });
        noteGarbage(msg.items.reduce((n, it) => n + it.rawLength * 2, 0));
        break;
      }
    }
  } catch (err) {
    parentPort!.postMessage({ req: msg.req, error: err instanceof Error ? err.message : String(err) });
  }
});

