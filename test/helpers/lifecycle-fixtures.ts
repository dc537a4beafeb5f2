/** Backend fixtures of the lifecycle suite (test/lifecycle-suite.ts): local directories, and S3 on a Ceph radosgw lab. */
import { mkdir, readFile, unlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { S3Client, ListObjectsV2Command, GetObjectCommand, PutObjectCommand, DeleteObjectCommand } from '@aws-sdk/client-s3';
import type { LifecycleFixture } from '../lifecycle-suite.ts';
import { LocalStore } from '../../src/store/local.ts';
import { openS3Store } from '../../src/store/s3.ts';
import { labS3Client, startCeph, type CephLab } from '../lab/ceph.ts';
import { tempDir } from './tmp.ts';
import { listFiles } from './tools.ts';

export function localFixture(opts: { crashTrials: number; concurrentSeconds: number }): LifecycleFixture {
  let root: { path: string; cleanup(): Promise<void> };
  let n = 0;
  return {
    label: 'local filesystem',
    setup: async () => {
      root = await tempDir('tresor-lc-local-');
    },
    teardown: async () => root?.cleanup(),
    newLocation: async () => join(root.path, `repo${n++}`),
    env: () => ({}),
    args: () => [],
    list: async (loc) => (await listFiles(loc)).filter((o) => !o.name.startsWith('tmp/')),
    read: (loc, name) => readFile(join(loc, name)),
    overwrite: async (loc, name, data) => {
      await mkdir(dirname(join(loc, name)), { recursive: true });
      await writeFile(join(loc, name), data);
    },
    remove: (loc, name) => unlink(join(loc, name)),
    openStore: (loc) => LocalStore.open(loc),
    ...opts,
  };
}

function split(loc: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/]+)\/(.*)$/.exec(loc)!;
  return { bucket: m[1], prefix: m[2].replace(/\/?$/, '/') };
}

/** A fresh radosgw lab per suite (started in setup, stopped in teardown). */
export function s3Fixture(opts: { crashTrials: number; concurrentSeconds: number; backendSensitiveOnly?: boolean }): LifecycleFixture {
  let lab: CephLab;
  let s3: S3Client;
  let n = 0;
  const bucket = 'tresor-lifecycle';
  const labEnv = () => ({ AWS_ACCESS_KEY_ID: lab.accessKeyId, AWS_SECRET_ACCESS_KEY: lab.secretAccessKey, AWS_REGION: lab.region });
  return {
    label: 'S3 (Ceph radosgw)',
    setup: async () => {
      lab = await startCeph();
      await lab.createBucket(bucket);
      s3 = labS3Client(lab);
    },
    teardown: async () => {
      s3?.destroy();
      await lab?.stop();
    },
    newLocation: async () => `s3://${bucket}/repo${n++}`,
    env: labEnv,
    args: () => ['--s3-endpoint', lab.endpoint],
    list: async (loc) => {
      const { bucket: b, prefix } = split(loc);
      const out: Array<{ name: string; size: number }> = [];
      let token: string | undefined;
      do {
        const r = await s3.send(new ListObjectsV2Command({ Bucket: b, Prefix: prefix, ContinuationToken: token }));
        for (const o of r.Contents ?? []) out.push({ name: o.Key!.slice(prefix.length), size: o.Size ?? 0 });
        token = r.IsTruncated ? r.NextContinuationToken : undefined;
      } while (token);
      return out;
    },
    read: async (loc, name) => {
      const { bucket: b, prefix } = split(loc);
      const r = await s3.send(new GetObjectCommand({ Bucket: b, Key: prefix + name }));
      return Buffer.from(await r.Body!.transformToByteArray());
    },
    overwrite: async (loc, name, data) => {
      const { bucket: b, prefix } = split(loc);
      await s3.send(new PutObjectCommand({ Bucket: b, Key: prefix + name, Body: data }));
    },
    remove: async (loc, name) => {
      const { bucket: b, prefix } = split(loc);
      await s3.send(new DeleteObjectCommand({ Bucket: b, Key: prefix + name }));
    },
    openStore: async (loc) => openS3Store(loc, { endpoint: lab.endpoint, env: labEnv() }),
    ...opts,
  };
}
