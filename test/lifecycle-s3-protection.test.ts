/**
 * What only S3 can show about the repository lifecycle, against a real Ceph radosgw: radosgw
 * killed in the middle of gc, sync and backup; and append-only protection enforced by the
 * storage — a bucket policy that lets the backup host's S3 user add but not delete, and object
 * lock (COMPLIANCE) that keeps every version, even against the bucket owner (docs/security.md).
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  S3Client, ListObjectsV2Command, GetObjectCommand, PutObjectCommand, DeleteObjectCommand, ListObjectVersionsCommand,
  PutBucketPolicyCommand, PutObjectLockConfigurationCommand,
} from '@aws-sdk/client-s3';
import { PASS } from './lifecycle-suite.ts';
import { startCeph, type CephLab, type S3Credentials } from './lab/ceph.ts';
import { tresor, spawnTresor } from './helpers/cli.ts';
import { tempDir } from './helpers/tmp.ts';
import { sha256File } from './helpers/exec.ts';
import { generateCorpus, rewriteCorpus } from '../bench/corpus.ts';

let lab: CephLab;
let s3: S3Client;
let n = 0;

function client(c: S3Credentials): S3Client {
  return new S3Client({
    endpoint: lab.endpoint, region: lab.region, forcePathStyle: true, credentials: c,
    requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED',
  });
}

const labEnv = () => ({ AWS_ACCESS_KEY_ID: lab.accessKeyId, AWS_SECRET_ACCESS_KEY: lab.secretAccessKey, AWS_REGION: lab.region });

describe('repository lifecycle: what only S3 shows', { concurrency: false }, () => {
  let dir: { path: string; cleanup(): Promise<void> };
  const args = () => ['--s3-endpoint', lab.endpoint, '--json'];
  const cli = (loc: string, a: string[], env: Record<string, string | undefined> = {}) =>
    tresor(['--repo', loc, ...args(), ...a], { env: { TRESOR_PASSPHRASE: PASS, ...labEnv(), ...env } });
  const ok = async (loc: string, a: string[], env: Record<string, string | undefined> = {}) => {
    const r = await cli(loc, a, env);
    assert.equal(r.code, 0, `tresor ${a.join(' ')} failed (${r.code}): ${r.stdout}${r.stderr}`);
    return r.json;
  };

  before(async () => {
    dir = await tempDir('tresor-lc-s3-');
    lab = await startCeph();
    s3 = client(lab);
    await lab.createBucket('tresor-lc-extra');
  });
  after(async () => {
    s3?.destroy();
    await lab?.stop();
    await dir?.cleanup();
  });

  it('radosgw killed in the middle of gc, sync and backup: nothing is lost, the next run finishes', async () => {
    const loc = `s3://tresor-lc-extra/killed`;
    const target = `s3://tresor-lc-extra/killed-target`;
    await ok(loc, ['repo', 'init']);
    await ok(target, ['repo', 'init'], { TRESOR_PASSPHRASE: 'target' });
    const img = join(dir.path, 'k.raw');
    generateCorpus(img, { size: 24 << 20, seed: 71 });
    const shas = new Map<string, string>();
    for (let i = 0; i < 3; i++) {
      if (i > 0) rewriteCorpus(img, { fraction: 0.4, seed: 71 + i });
      const b = await ok(loc, ['backup', 'image', img, '--id', 'k']);
      shas.set(b.snapshot.name, await sha256File(img));
    }
    await ok(loc, ['prune', '--all', '--keep-last', '1']);
    rewriteCorpus(img, { fraction: 0.4, seed: 80 });
    const ops: Array<[string, string[]]> = [
      ['gc', ['gc', '--max-wait', '10']],
      ['sync', ['sync', '--to', target, '--to-s3-endpoint', lab.endpoint]],
      ['backup', ['backup', 'image', img, '--id', 'k']],
    ];
    for (const [what, a] of ops) {
      const child = spawnTresor(['--repo', loc, ...args(), ...a], { env: { TRESOR_PASSPHRASE: PASS, TRESOR_SYNC_PASSPHRASE: 'target', ...labEnv() } });
      let out = '';
      child.stdout!.on('data', (d) => (out += d));
      const exited = new Promise<number | null>((r) => child.on('close', r));
      await sleep(what === 'backup' ? 700 : 400);
      await lab.killRadosgw();
      await sleep(1500);
      await lab.restartRadosgw();
      const code = await exited;
      // With the retries of the S3 store the operation may even succeed; a failure must be clear.
      if (code !== 0) assert.ok(out.includes('"error"'), `${what} after radosgw was killed: ${out}`);
      const v = await cli(loc, ['verify']);
      assert.equal(v.code, 0, `verify after ${what} lost radosgw: ${v.stdout}`);
      if (what === 'backup' && code === 0) shas.set(JSON.parse(out).snapshot.name, await sha256File(img));
    }
    assert.equal((await ok(loc, ['gc'])).complete, true);
    await ok(loc, ['sync', '--to', target, '--to-s3-endpoint', lab.endpoint], { TRESOR_SYNC_PASSPHRASE: 'target' });
    assert.equal((await cli(target, ['verify'], { TRESOR_PASSPHRASE: 'target' })).code, 0);
    const c = await cli(loc, ['check']);
    assert.equal(c.code, 0, c.stdout);
    for (const s of (await ok(loc, ['snapshots'])).snapshots) {
      const out = join(dir.path, `k${n++}.out`);
      await ok(target, ['restore', 'image', s.name, out], { TRESOR_PASSPHRASE: 'target' });
      assert.equal(await sha256File(out), shas.get(s.name));
    }
  });

  it('an append-only S3 user (bucket policy) cannot delete, and object lock keeps every version even from the bucket owner', async () => {
    const bucket = 'tresor-locked';
    await lab.createBucket(bucket, { objectLock: true });
    await s3.send(new PutObjectLockConfigurationCommand({
      Bucket: bucket,
      ObjectLockConfiguration: { ObjectLockEnabled: 'Enabled', Rule: { DefaultRetention: { Mode: 'COMPLIANCE', Days: 1 } } },
    }));
    const host = await lab.createUser('backup-host');
    // docs/security.md: the host may read, list and add; it may delete only its own locks.
    const policy = {
      Version: '2012-10-17',
      Statement: [
        { Effect: 'Allow', Principal: { AWS: ['arn:aws:iam:::user/backup-host'] }, Action: ['s3:GetObject', 's3:PutObject', 's3:ListBucket'], Resource: [`arn:aws:s3:::${bucket}`, `arn:aws:s3:::${bucket}/*`] },
        { Effect: 'Allow', Principal: { AWS: ['arn:aws:iam:::user/backup-host'] }, Action: ['s3:DeleteObject'], Resource: [`arn:aws:s3:::${bucket}/repo/locks/*`] },
        { Effect: 'Allow', Principal: { AWS: ['arn:aws:iam:::user/lab-admin'] }, Action: ['s3:*'], Resource: [`arn:aws:s3:::${bucket}`, `arn:aws:s3:::${bucket}/*`] },
      ],
    };
    await s3.send(new PutBucketPolicyCommand({ Bucket: bucket, Policy: JSON.stringify(policy) }));
    const loc = `s3://${bucket}/repo`;
    await ok(loc, ['repo', 'init']);
    await ok(loc, ['key', 'add-append-only', '--label', 'backup host'], { TRESOR_NEW_PASSPHRASE: 'host key' });
    const hostEnv = { AWS_ACCESS_KEY_ID: host.accessKeyId, AWS_SECRET_ACCESS_KEY: host.secretAccessKey, TRESOR_PASSPHRASE: 'host key' };
    const img = join(dir.path, 'locked.raw');
    generateCorpus(img, { size: 8 << 20, seed: 91 });
    const sha = await sha256File(img);
    // The host backs up and verifies with its own S3 user and its append-only key.
    const s = (await ok(loc, ['backup', 'image', img, '--id', 'db'], hostEnv)).snapshot.name;
    rewriteCorpus(img, { fraction: 0.3, seed: 1 });
    await ok(loc, ['backup', 'image', img, '--id', 'db'], hostEnv);
    await ok(loc, ['verify'], hostEnv);
    // Tresor refuses deletion with the append-only key…
    const refused = await cli(loc, ['prune', '--all', '--keep-last', '1'], hostEnv);
    assert.equal(refused.code, 6);
    assert.equal(refused.json.error.code, 'append-only');
    // …and the storage refuses it whatever key is used: the full passphrase with the host's S3 user.
    const denied = await cli(loc, ['prune', '--all', '--keep-last', '1'], { ...hostEnv, TRESOR_PASSPHRASE: PASS });
    assert.equal(denied.code, 6, denied.stdout);
    assert.match(denied.json.error.message, /denied access/);
    // An attacker with the host's S3 credentials talks to S3 directly.
    const attacker = client(host);
    const objects = (await attacker.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'repo/' }))).Contents!.map((o) => o.Key!);
    for (const key of objects.filter((k) => !k.startsWith('repo/locks/'))) {
      await assert.rejects(attacker.send(new DeleteObjectCommand({ Bucket: bucket, Key: key })), (e: any) => e.$metadata?.httpStatusCode === 403, `delete ${key}`);
    }
    const manifestKey = objects.find((k) => k.startsWith('repo/snapshots/'))!;
    // Overwriting is a PUT, which the host needs: it only adds a version (radosgw 16 ignores
    // If-None-Match on versioned buckets). The old version stays, locked.
    await attacker.send(new PutObjectCommand({ Bucket: bucket, Key: manifestKey, Body: Buffer.from('ransom') }));
    const versions = (await s3.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: manifestKey }))).Versions!;
    assert.equal(versions.length, 2);
    const original = versions.find((v) => !v.IsLatest)!;
    await assert.rejects(attacker.send(new DeleteObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: original.VersionId })), (e: any) => e.$metadata?.httpStatusCode === 403);
    // Object lock (COMPLIANCE): not even the bucket owner can delete a version before it expires.
    await assert.rejects(s3.send(new DeleteObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: original.VersionId })), (e: any) => e.$metadata?.httpStatusCode === 403);
    // The damage is visible, and the administrator restores the previous version.
    assert.equal((await cli(loc, ['verify'])).code, 3);
    const old = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: original.VersionId }));
    await s3.send(new PutObjectCommand({ Bucket: bucket, Key: manifestKey, Body: Buffer.from(await old.Body!.transformToByteArray()) }));
    assert.equal((await ok(loc, ['verify'])).ok, true);
    const out = join(dir.path, 'locked.out');
    await ok(loc, ['restore', 'image', s, out], hostEnv);
    assert.equal(await sha256File(out), sha);
    // The administrator's gc only hides objects (delete markers): the versions stay until the
    // retention expires (then a lifecycle rule removes them).
    await ok(loc, ['prune', '--all', '--keep-last', '1']);
    const gc = await ok(loc, ['gc']);
    assert.equal(gc.complete, true);
    const all = await s3.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: 'repo/snapshots/' }));
    assert.ok((all.DeleteMarkers ?? []).length >= 1, 'pruned manifests are delete markers, their versions kept');
  });
});
