/** Codec worker thread: runs CodecExecutor requests (codec-ops.ts) off the main thread. */
import { parentPort, workerData } from 'node:worker_threads';
import type { CodecKeys, CompressionTuning } from './codec.ts';
import { CodecExecutor, type CodecRequest } from './codec-ops.ts';
import { GarbageCollector, exposeGc } from '../util/gc.ts';

interface WorkerInit {
  encKey?: Uint8Array;
  idKey?: Uint8Array;
  compressionLevel: number;
  compressionStrategy?: number;
  compressionTuning?: CompressionTuning;
  arena?: SharedArrayBuffer;
}

const init = workerData as WorkerInit;
const keys: CodecKeys = {
  master: init.encKey && init.idKey ? { encKey: Buffer.from(init.encKey), idKey: Buffer.from(init.idKey) } : undefined,
  compressionLevel: init.compressionLevel,
  compressionStrategy: init.compressionStrategy,
  compressionTuning: init.compressionTuning,
};
const executor = new CodecExecutor(keys, init.arena);
const collector = new GarbageCollector(exposeGc());

parentPort!.on('message', (msg: CodecRequest) => {
  try {
    const reply = executor.handle(msg);
    parentPort!.postMessage(reply.message, reply.transfer);
    collector.note(reply.garbage);
  } catch (err) {
    parentPort!.postMessage({ req: msg.req, error: err instanceof Error ? err.message : String(err) });
  }
});
