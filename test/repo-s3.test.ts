/** The repository suite on the S3 backend, against a real Ceph radosgw started for this file. */
import { S3Client, ListObjectsV2Command, GetObjectCommand, PutObjectCommand } from '@aws-sdk/client-s3';
import { repositorySuite } from './repo-suite.ts';
import { labS3Client, startCeph, type CephLab } from './lab/ceph.ts';
import { openS3Store } from '../src/store/s3.ts';

let lab: CephLab;
let s3: S3Client;
const BUCKET = 'tresor-suite';
let n = 0;

function split(loc: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/]+)\/(.*)$/.exec(loc)!;
  return { bucket: m[1], prefix: m[2].replace(/\/?$/, '/') };
}

repositorySuite({
  label: 'S3 (Ceph radosgw)',
  setup: async () => {
    lab = await startCeph();
    await lab.createBucket(BUCKET);
    s3 = labS3Client(lab);
  },
  teardown: async () => {
    s3?.destroy();
    await lab?.stop();
  },
  newLocation: async () => `s3://${BUCKET}/repo${n++}`,
  env: () => ({ AWS_ACCESS_KEY_ID: lab.accessKeyId, AWS_SECRET_ACCESS_KEY: lab.secretAccessKey, AWS_REGION: lab.region }),
  args: () => ['--s3-endpoint', lab.endpoint],
  list: async (loc) => {
    const { bucket, prefix } = split(loc);
    const out: Array<{ name: string; size: number }> = [];
    let token: string | undefined;
    do {
      const r = await s3.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }));
      for (const o of r.Contents ?? []) out.push({ name: o.Key!.slice(prefix.length), size: o.Size ?? 0 });
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
    return out;
  },
  read: async (loc, name) => {
    const { bucket, prefix } = split(loc);
    const r = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: prefix + name }));
    return Buffer.from(await r.Body!.transformToByteArray());
  },
  overwrite: async (loc, name, data) => {
    const { bucket, prefix } = split(loc);
    await s3.send(new PutObjectCommand({ Bucket: bucket, Key: prefix + name, Body: data }));
  },
  crashTrials: 12,
  openStore: async (loc) => openS3Store(loc, {
    endpoint: lab.endpoint,
    env: { AWS_ACCESS_KEY_ID: lab.accessKeyId, AWS_SECRET_ACCESS_KEY: lab.secretAccessKey, AWS_REGION: lab.region },
  }),
});
