/**
 * Bounded-time mutation fuzzing of a filesystem reader over a real image.
 *
 * A clean walk records which byte ranges the reader reads; each run then changes a few random
 * bytes inside those ranges (the metadata the reader parses: small reads; large reads are file
 * data and are left alone), probes the mutated image and walks all of it. Every failure must be
 * a TresorError and every walk must end. Mutations are applied by an overlay device, so even a
 * 300 MB image is never copied.
 *
 * `reseal` lets a test recompute a checksum around a mutation (XFS CRCs...), so that the parser
 * behind the checksum sees the garbage too instead of the checksum catching everything.
 */
import assert from 'node:assert/strict';
import { cachedDevice } from '../../src/fs/block-cache.ts';
import type { BlockDevice, Filesystem } from '../../src/fs/filesystem.ts';
import { TresorError } from '../../src/util/errors.ts';
import { recordingDevice } from './block-devices.ts';
import { walkFilesystem } from './fs-compare.ts';

export interface FuzzOptions {
  probe: (dev: BlockDevice) => Promise<Filesystem | undefined>;
  /** The pristine image. */
  device: BlockDevice;
  budgetMs: number;
  /**
   * Mutations tried even when they take longer than the budget: the budget bounds the time on a
   * fast machine, this the coverage on a slow or busy one (a fuzz that ran out of time after
   * three runs tested too little, and the test's verdict must not depend on the machine's speed).
   */
  minRuns?: number;
  /** Reads longer than this in the clean walk are file data and are not mutated. */
  maxTargetLength?: number;
  /** Extra byte patches that re-seal checksums after mutating byte `at` (reads see the mutation). */
  reseal?: (read: (offset: number, length: number) => Promise<Buffer>, at: number) => Promise<Array<[number, number]>>;
  seed?: number;
}

export interface FuzzResult {
  runs: number;
  /** Runs where the reader reported at least one error. */
  failures: number;
}

/** A device that reads `inner` with some bytes replaced. */
export function patchedDevice(inner: BlockDevice, patches: Map<number, number>): BlockDevice {
  return {
    size: inner.size,
    async read(offset: number, length: number): Promise<Buffer> {
      const buf = await inner.read(offset, length);
      for (const [at, value] of patches) if (at >= offset && at < offset + length) buf[at - offset] = value;
      return buf;
    },
  };
}

export async function fuzzFilesystem(options: FuzzOptions): Promise<FuzzResult> {
  const recorder = recordingDevice(options.device);
  const cleanFs = await options.probe(recorder);
  assert.ok(cleanFs, 'the pristine image probes');
  const clean = await walkFilesystem(cleanFs, { maxBytesPerFile: 4096, maxEntries: 2000 });
  assert.deepEqual(clean.errors.map((e) => `${e.path}: ${String(e.error)}`), [], 'the pristine image walks cleanly');
  const maxLength = options.maxTargetLength ?? 65536;
  const targets = recorder.reads.filter((r) => r.length > 0 && r.length <= maxLength);
  assert.ok(targets.length > 0, 'the clean walk read some metadata');

  let seed = options.seed ?? 20261122;
  const random = (n: number) => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  const deadline = Date.now() + options.budgetMs;
  const result: FuzzResult = { runs: 0, failures: 0 };
  while (result.runs < (options.minRuns ?? 0) || Date.now() < deadline) {
    const patches = new Map<number, number>();
    for (let i = 0, n = 1 + random(6); i < n; i++) {
      const target = targets[random(targets.length)];
      const at = target.offset + random(target.length);
      patches.set(at, random(4) === 0 ? [0, 0xff, 0x80, 0x01][random(4)] : random(256));
    }
    if (options.reseal && random(2) === 0) {
      const mutated = patchedDevice(options.device, patches);
      for (const at of [...patches.keys()]) {
        for (const [offset, value] of await options.reseal((o, l) => mutated.read(o, l), at)) patches.set(offset, value);
      }
    }
    const described = [...patches].map(([at, v]) => `${at}=${v}`).join(' ');
    result.runs++;
    const outcome = await Promise.race([
      (async (): Promise<unknown[]> => {
        try {
          const fs = await options.probe(cachedDevice(patchedDevice(options.device, patches), { maxBytes: 4 * 1024 * 1024 }));
          if (!fs) return [];
          return (await walkFilesystem(fs, { maxBytesPerFile: 65536, maxEntries: 3000 })).errors.map((e) => e.error);
        } catch (err) {
          return [err];
        }
      })(),
      new Promise<'hang'>((resolve) => setTimeout(() => resolve('hang'), 10_000).unref()),
    ]);
    assert.notEqual(outcome, 'hang', `walk did not finish after mutations ${described}`);
    const errors = outcome as unknown[];
    for (const err of errors) {
      // The walker's own cycle report is a plain Error: it is the walker detecting a cycle.
      if (!(err instanceof TresorError) && !String(err).includes('reached twice (cycle)')) {
        assert.fail(`mutations ${described} raised a non-Tresor error: ${(err as Error)?.stack ?? String(err)}`);
      }
    }
    if (errors.length > 0) result.failures++;
  }
  return result;
}
