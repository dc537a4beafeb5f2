/**
 * Backups of real running guests (TCG) through the CLI: application consistency with the guest
 * agent, all disks at one instant, incremental forever from checkpoints (and the exact bytes it
 * reads), byte-identical restores, the fallbacks to a full read (qemu killed, checkpoint lost),
 * shut-off VMs, the consistency policies, a killed Tresor, and a VM migrated to another host.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { readFile, readdir, mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { LabHost, SYSTEM_URI, defineTestDomain, e2fsckClean, qemuIoWrite, readGuestLog, type TestDomain } from './lab/guest.ts';
import { startLibvirtHosts, type LibvirtHostLab } from './lab/hosts.ts';
import { createLabPki } from './lab/pki.ts';
import { tresor, spawnTresor } from './helpers/cli.ts';
import { openLibvirt } from '../src/hypervisor/libvirt.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const PASS = 'vm test passphrase';

describe('backup of running libvirt VMs', { concurrency: false, timeout: 900_000 }, () => {
  let lab: LabHost;
  let repo: string;
  let scratch: string;
  let main: TestDomain;
  const env = () => ({ TRESOR_PASSPHRASE: PASS });
  // `inRepo`: the suite's repository unless a test has one of its own.
  const cli = (args: string[], timeoutMs = 300_000, inRepo = repo) => tresor(['--repo', inRepo, '--json', ...args], { env: env(), timeoutMs });
  const backup = async (domain: string, extra: string[] = [], uri = SYSTEM_URI, inRepo = repo) => {
    const r = await cli(['backup', 'vm', domain, '--connect', uri, '--scratch-dir', scratch, ...extra], 300_000, inRepo);
    assert.equal(r.code, 0, `backup vm ${domain} failed: ${r.stdout}${r.stderr}`);
    return r.json as { snapshot: any; log: string[] };
  };
  const restore = async (snapshot: string, disk: string, out: string, inRepo = repo) => {
    const r = await cli(['restore', 'image', snapshot, out, '--disk', disk], 300_000, inRepo);
    assert.equal(r.code, 0, `restore ${snapshot}:${disk} failed: ${r.stdout}${r.stderr}`);
  };
  const vms = async () => (await cli(['snapshots', '--type', 'vm'])).json.snapshots as Array<{ name: string }>;
  /** The snapshot's disk, restored to a raw file, equals `image` (qemu-img compare -U: a VM may hold it). */
  const restoresTo = async (snapshot: string, disk: string, image: string, out: string, inRepo = repo) => {
    await restore(snapshot, disk, out, inRepo);
    await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'raw', image, out]);
  };
  /** Resumes the domain, writes through its block layer (HMP qemu-io), pauses it again: pausing flushes QEMU's qcow2 caches into the image. */
  const writeThenPause = async (uri: string, domain: string, write: { offset: number; length: number; pattern: number }) => {
    await run('virsh', ['-c', uri, 'resume', domain]);
    await qemuIoWrite(uri, domain, 'sda', write);
    await run('virsh', ['-c', uri, 'suspend', domain]);
  };

  before(async () => {
    lab = await LabHost.create();
    repo = lab.path('repo');
    scratch = lab.path('scratch');
    await mkdir(scratch, { recursive: true });
    const r = await tresor(['--repo', repo, '--json', 'repo', 'init'], { env: env() });
    assert.equal(r.code, 0, r.stdout);
    const sda = await lab.dataDisk('main-sda.qcow2', 64);
    const sdb = await lab.dataDisk('main-sdb.qcow2', 32);
    const sdc = await lab.dataDisk('main-sdc.qcow2', 48, { filesystem: false });
    main = await lab.defineDomain({
      name: 'main',
      disks: [
        { path: sda, bus: 'scsi', target: 'sda' },
        { path: sdb, bus: 'scsi', target: 'sdb' },
        { path: sdc, bus: 'scsi', target: 'sdc' },
      ],
      writer: { intervalMs: 50, both: true },
    });
    await lab.boot(main, 90_000);
  });
  after(async () => {
    await lab?.cleanup();
  });

  it('full then incremental backups of a running guest are application-consistent, capture all disks at one instant, and read only what changed', async () => {
    // Data under the later 128 KiB write at 20 MiB+64 KiB, which then changes half of each of two chunks.
    await qemuIoWrite(lab.virsh, main.name, 'sdc', { offset: 20 * MiB, length: 256 * 1024, pattern: 0x11 });
    const full = await backup(main.name, ['--consistency', 'require']);
    assert.equal(full.snapshot.source.consistency.level, 'application');
    assert.deepEqual(full.snapshot.disks.map((d: any) => d.name).sort(), ['sda', 'sdb', 'sdc']);
    assert.match(full.log.join('\n'), /full read: no earlier snapshot/);
    await sleep(2000); // the writer appends more lines
    // A known change on the disk no guest process touches: exactly these bytes are dirty.
    await qemuIoWrite(lab.virsh, main.name, 'sdc', { offset: 5 * MiB, length: MiB, pattern: 0x5a });
    await qemuIoWrite(lab.virsh, main.name, 'sdc', { offset: 20 * MiB + 64 * 1024, length: 128 * 1024, pattern: 0x33 });
    const inc = await backup(main.name, ['--consistency', 'require']);
    assert.equal(inc.snapshot.parent, full.snapshot.name);
    const sdc = inc.snapshot.disks.find((d: any) => d.name === 'sdc');
    assert.equal(sdc.base.snapshot, full.snapshot.name, inc.log.join('\n'));
    // 1 MiB at 5 MiB (8 chunks of 128 KiB) + 128 KiB at 20 MiB+64 KiB, which straddles 2 chunks:
    // exactly the dirty bytes are read, the unchanged halves of those two come from the full
    // backup's chunks.
    assert.equal(sdc.bytesRead, 9 * 128 * 1024, `sdc: read ${sdc.bytesRead} bytes`);
    // The two half-rewritten chunks are stored as deltas against the full backup's chunks.
    // (The eight 0x5a chunks are one: 3 new chunks, 7 reused.)
    assert.match(inc.log.join('\n'), /disk sdc: incremental read of 1179648 bytes \(131072 unchanged bytes of partly changed chunks taken from the parent's\); 3 new chunks \(2 as deltas\), 7 reused/);
    assert.ok((await cli(['repo', 'info'])).json.deltaChunks >= 2, 'repo info counts the delta chunks');
    for (const d of inc.snapshot.disks) assert.ok(d.bytesRead < d.size / 4, `${d.name}: incremental read ${d.bytesRead} of ${d.size}`);
    for (const snap of [full.snapshot.name, inc.snapshot.name]) {
      const a = lab.path(`${snap.replace(/\//g, '_')}-sda.raw`);
      const b = lab.path(`${snap.replace(/\//g, '_')}-sdb.raw`);
      await restore(snap, 'sda', a);
      await restore(snap, 'sdb', b);
      for (const img of [a, b]) {
        const fsck = await e2fsckClean(img);
        assert.ok(fsck.clean, `${snap} ${img}: e2fsck -fn without journal replay: ${fsck.output}`);
      }
      const la = await readGuestLog(a);
      const lb = await readGuestLog(b);
      assert.ok(la.entries.length > 0);
      assert.deepEqual(la.gaps, [], `${snap}: gaps in the writer log`);
      assert.deepEqual(la.badLines, [], `${snap}: torn lines`);
      // The writer appends each line to sda's log, then sdb's, then syncs, every 50 ms. Captured at
      // one instant, sda is at most one line ahead; disks read one after the other (seconds
      // apart) would be many lines apart.
      const ahead = la.entries.at(-1)!.seq - lb.entries.at(-1)!.seq;
      assert.ok(ahead === 0 || ahead === 1, `${snap}: sda ends at ${la.entries.at(-1)!.seq}, sdb at ${lb.entries.at(-1)!.seq}`);
    }
    // `tresor vms` shows the VM with its state and last snapshot.
    const listed = (await cli(['vms', '--connect', SYSTEM_URI])).json.vms.find((v: any) => v.uuid === main.uuid);
    assert.equal(listed.state, 'running');
    assert.equal(listed.lastSnapshot.name, inc.snapshot.name);
    assert.equal(listed.lastSnapshot.consistency, 'application');
    // Single files straight out of the live VM's snapshot (issue 4): the writer log on sda.
    const restoredSda = lab.path(`${inc.snapshot.name.replace(/\//g, '_')}-sda.raw`);
    const viaFiles = lab.path('inc-log-via-files');
    const cat = await cli(['files', 'cat', `${inc.snapshot.name}:sda:0:/log`, '-o', viaFiles]);
    assert.equal(cat.code, 0, cat.stdout + cat.stderr);
    const viaDebugfs = (await run('debugfs', ['-R', 'cat /log', restoredSda], { maxBuffer: 64 << 20 })).stdout;
    assert.equal(await readFile(viaFiles, 'utf8'), viaDebugfs);
    const listed2 = await cli(['files', 'ls', `${inc.snapshot.name}:sdb`, '/']);
    assert.equal(listed2.code, 0, listed2.stdout);
    assert.ok(JSON.stringify(listed2.json).includes('"log"'));
    const out = lab.path('inc-sdc.raw');
    await restore(inc.snapshot.name, 'sdc', out);
    const data = await readFile(out);
    assert.ok(data.subarray(5 * MiB, 6 * MiB).every((b) => b === 0x5a));
    assert.ok(data.subarray(20 * MiB + 64 * 1024, 20 * MiB + 192 * 1024).every((b) => b === 0x33));
    // ... and decode against them: the unchanged halves come from the bases.
    assert.ok(data.subarray(20 * MiB, 20 * MiB + 64 * 1024).every((b) => b === 0x11));
    assert.ok(data.subarray(20 * MiB + 192 * 1024, 20 * MiB + 256 * 1024).every((b) => b === 0x11));
  });

  it('an incremental snapshot restores byte-identical to the disk at that point in time', async () => {
    await qemuIoWrite(lab.virsh, main.name, 'sdc', { offset: 30 * MiB, length: 3 * MiB, pattern: 0x77 });
    await run('virsh', ['-c', SYSTEM_URI, 'suspend', main.name]);
    try {
      const inc = await backup(main.name, ['--consistency', 'off']);
      assert.ok(inc.snapshot.disks.every((d: any) => d.base?.snapshot), inc.log.join('\n'));
      for (const disk of main.disks) {
        const out = lab.path(`paused-${disk.target}.raw`);
        await restore(inc.snapshot.name, disk.target, out);
        await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'raw', disk.path, out]);
      }
    } finally {
      await run('virsh', ['-c', SYSTEM_URI, 'resume', main.name]);
    }
  });

  it('a clean shutdown keeps backups incremental (also while shut off); SIGKILL of qemu forces a full read, with the reason logged', async (t) => {
    await lab.shutdown(main);
    const offline = await backup(main.name);
    assert.equal(offline.snapshot.source.consistency.level, 'offline');
    // Incremental from the bitmaps QEMU stored at shutdown; the untouched disk reads nothing (the
    // others read what unmounting them wrote).
    assert.ok(offline.snapshot.disks.every((d: any) => d.base?.snapshot), offline.log.join('\n'));
    assert.equal(offline.snapshot.disks.find((d: any) => d.name === 'sdc').bytesRead, 0);
    await lab.boot(main, 90_000);
    await qemuIoWrite(lab.virsh, main.name, 'sdc', { offset: 2 * MiB, length: 256 * 1024, pattern: 0x11 });
    const afterRestart = await backup(main.name);
    const sdc = afterRestart.snapshot.disks.find((d: any) => d.name === 'sdc');
    assert.equal(sdc.base.snapshot, offline.snapshot.name, afterRestart.log.join('\n'));
    assert.equal(sdc.bytesRead, 256 * 1024);
    // Kill QEMU: its bitmaps were never stored cleanly.
    const pid = Number((await readFile(`/run/libvirt/qemu/${main.name}.pid`, 'utf8')).trim());
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 100 && (await openLibvirt(SYSTEM_URI).then((h) => h.getDomain(main.name))).state !== 'shutoff'; i++) await sleep(100);
    await lab.boot(main, 90_000);
    const afterCrash = await backup(main.name);
    const log = afterCrash.log.join('\n');
    t.diagnostic(log);
    assert.ok(afterCrash.snapshot.disks.every((d: any) => !d.base?.snapshot), log);
    assert.match(log, /full read|reading every disk whole/);
    assert.match(log, /bitmap|checkpoint/);
    // And the chain starts again: the next one is incremental.
    const next = await backup(main.name);
    assert.ok(next.snapshot.disks.every((d: any) => d.base?.snapshot === afterCrash.snapshot.name), next.log.join('\n'));
  });

  describe('on a guest without an agent', () => {
    let bare: TestDomain;
    before(async () => {
      const disk = await lab.dataDisk('bare-vda.qcow2', 128, { filesystem: false });
      // 96 MiB of data so a backup takes a moment.
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 96M', disk]);
      bare = await lab.defineDomain({ name: 'bare', disks: [{ path: disk, bus: 'scsi', target: 'sda' }], agent: false, bootable: false });
      await lab.start(bare);
    });

    it('--consistency require fails cleanly; try records crash-consistent', async () => {
      const before = (await vms()).length;
      const r = await cli(['backup', 'vm', bare.name, '--connect', SYSTEM_URI, '--scratch-dir', scratch, '--consistency', 'require']);
      assert.notEqual(r.code, 0);
      assert.equal(r.json.error.code, 'freeze-failed');
      assert.match(r.json.error.hint, /guest-agent|guest agent/);
      assert.equal((await vms()).length, before);
      const hv = await openLibvirt(SYSTEM_URI);
      assert.equal(await hv.jobInfo(bare.name), undefined);
      assert.deepEqual((await hv.checkpoints(bare.name)).map((c) => c.name), []);
      const t = await backup(bare.name, ['--consistency', 'try']);
      assert.equal(t.snapshot.source.consistency.level, 'crash');
      assert.match(t.snapshot.source.consistency.detail, /freeze failed/);
    });

    it('SIGKILL of tresor mid-backup: no snapshot; the next run cleans up the libvirt job and checkpoint and succeeds', async () => {
      const before = (await vms()).length;
      const child = spawnTresor(['--repo', repo, '--json', 'backup', 'vm', bare.name, '--connect', SYSTEM_URI, '--scratch-dir', scratch, '--full', '--bwlimit', '8M'], { env: env() });
      const hv = await openLibvirt(SYSTEM_URI);
      let sawJob = false;
      for (let i = 0; i < 100 && !sawJob; i++) {
        await sleep(100);
        // libvirt answers "backup job data missing" while the job is being set up.
        sawJob = (await hv.jobInfo(bare.name).catch(() => undefined))?.kind === 'backup';
      }
      assert.ok(sawJob, 'the backup job started');
      await sleep(800);
      child.kill('SIGKILL');
      await new Promise((r) => child.on('close', r));
      assert.equal((await vms()).length, before, 'no snapshot from the killed run');
      assert.equal((await hv.jobInfo(bare.name))?.kind, 'backup', 'the killed run left its libvirt job behind');
      const next = await backup(bare.name);
      assert.match(next.log.join('\n'), /cleaning up after an interrupted backup/);
      assert.match(next.log.join('\n'), /aborted its leftover libvirt backup job/);
      assert.equal(await hv.jobInfo(bare.name), undefined);
      const cps = (await hv.checkpoints(bare.name)).map((c) => c.name);
      assert.deepEqual(cps, [next.snapshot.source.checkpoint.name]);
      const v = await cli(['verify', next.snapshot.name]);
      assert.equal(v.code, 0, v.stdout);
    });

    it('other tools\' checkpoints change nothing; forgetting a snapshot breaks no other; a resized disk and a repository without the checkpoint\'s snapshot (rolled back or forgotten) make a full read, with the reason', async () => {
      const disk = lab.path('fallbacks-sda.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', disk, '32M']);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x51 0 4M', disk]);
      const dom = await lab.defineDomain({ name: 'fallbacks', disks: [{ path: disk, bus: 'scsi', target: 'sda' }], agent: false, bootable: false });
      await lab.start(dom);
      // A repository of its own: this test rolls it back.
      const own = lab.path('fallbacks-repo');
      assert.equal((await cli(['repo', 'init'], 300_000, own)).code, 0);
      const b = async () => {
        const r = await backup(dom.name, ['--consistency', 'off'], SYSTEM_URI, own);
        return { ...r, text: r.log.join('\n') };
      };
      let restores = 0;
      const restoresExactly = async (snapshot: string) => {
        // Paused: QEMU's caches are in the image, and nothing writes (no guest OS).
        await run('virsh', ['-c', SYSTEM_URI, 'suspend', dom.name]);
        await restoresTo(snapshot, 'sda', disk, lab.path(`fallbacks-${restores++}.raw`), own);
        await run('virsh', ['-c', SYSTEM_URI, 'resume', dom.name]);
      };
      const checkpointNames = async () => (await (await openLibvirt(SYSTEM_URI)).checkpoints(dom.name)).map((c) => c.name);
      const first = await b();
      assert.match(first.text, /full read: no earlier snapshot/);

      // Another tool's checkpoint after ours: libvirt merges the bitmaps, the incremental reads
      // exactly what was written, and the other checkpoint stays.
      await run('virsh', ['-c', SYSTEM_URI, 'checkpoint-create-as', dom.name, 'othertool-1']);
      await qemuIoWrite(SYSTEM_URI, dom.name, 'sda', { offset: 8 * MiB, length: 256 * 1024, pattern: 0x52 });
      const second = await b();
      assert.equal(second.snapshot.disks[0].base?.snapshot, first.snapshot.name, second.text);
      assert.equal(second.snapshot.disks[0].bytesRead, 256 * 1024, second.text);
      assert.ok((await checkpointNames()).includes('othertool-1'), 'the other tool\'s checkpoint is left alone');
      await restoresExactly(second.snapshot.name);

      // Grown while running: the old map does not fit, everything allocated is read.
      await run('virsh', ['-c', SYSTEM_URI, 'blockresize', dom.name, 'sda', '48M']);
      await qemuIoWrite(SYSTEM_URI, dom.name, 'sda', { offset: 40 * MiB, length: 128 * 1024, pattern: 0x53 });
      const third = await b();
      assert.ok(!third.snapshot.disks[0].base?.snapshot, third.text);
      assert.match(third.text, /disk sda was resized from 33554432 to 50331648 bytes/);
      assert.equal(third.snapshot.disks[0].size, 48 * MiB);
      assert.equal(third.snapshot.disks[0].bytesRead, 4 * MiB + 256 * 1024 + 128 * 1024, third.text);
      await restoresExactly(third.snapshot.name);

      // The repository rolled back to a copy without the latest snapshot (say, restored from its
      // off-site copy): libvirt's checkpoint belongs to a snapshot the repository does not have,
      // and the one it does have lost its checkpoint. Nothing to be incremental from: a full read.
      const copy = lab.path('fallbacks-repo-copy');
      await run('cp', ['-a', own, copy]);
      await qemuIoWrite(SYSTEM_URI, dom.name, 'sda', { offset: 12 * MiB, length: 64 * 1024, pattern: 0x54 });
      const fourth = await b();
      assert.equal(fourth.snapshot.disks[0].base?.snapshot, third.snapshot.name, fourth.text);
      await run('rm', ['-rf', own]);
      await run('mv', [copy, own]);
      await qemuIoWrite(SYSTEM_URI, dom.name, 'sda', { offset: 16 * MiB, length: 64 * 1024, pattern: 0x55 });
      const fifth = await b();
      assert.ok(!fifth.snapshot.disks[0].base?.snapshot, fifth.text);
      assert.match(fifth.text, new RegExp(`checkpoint ${third.snapshot.source.checkpoint.name} of snapshot ${third.snapshot.name.replace(/[/]/g, '\\/')} is gone and cannot be redefined`));
      // (Each 64 KiB write is read as its whole 128 KiB chunk.)
      assert.equal(fifth.snapshot.disks[0].bytesRead, 4 * MiB + 256 * 1024 + 128 * 1024 + 2 * 128 * 1024, fifth.text);
      await restoresExactly(fifth.snapshot.name);
      const sixth = await b();
      assert.equal(sixth.snapshot.disks[0].base?.snapshot, fifth.snapshot.name, sixth.text);
      assert.equal(sixth.snapshot.disks[0].bytesRead, 0, sixth.text);

      // Forgetting a snapshot breaks no other: the sixth (an incremental) restores without its
      // parent, also after gc (the sixth holds all the parent's data: nothing may be condemned;
      // lifecycle-suite.ts has forget with data that gc frees). With the sixth forgotten too, the
      // checkpoint libvirt holds belongs to no snapshot, and the newest one left (the third) lost
      // its checkpoint long ago: the next backup is a full read, says why, and replaces the
      // orphaned checkpoint.
      const forget = async (name: string) => {
        const r = await cli(['forget', name], 300_000, own);
        assert.equal(r.code, 0, r.stdout);
        assert.deepEqual(r.json.removed, [name]);
      };
      await forget(fifth.snapshot.name);
      const gc = await cli(['gc'], 300_000, own);
      assert.ok(gc.code === 0 && gc.json.complete && gc.json.condemnedBlobs === 0, gc.stdout);
      await restoresExactly(sixth.snapshot.name);
      await forget(sixth.snapshot.name);
      await qemuIoWrite(SYSTEM_URI, dom.name, 'sda', { offset: 20 * MiB, length: 64 * 1024, pattern: 0x56 });
      const seventh = await b();
      assert.ok(!seventh.snapshot.disks[0].base?.snapshot, seventh.text);
      assert.equal(seventh.snapshot.parent, third.snapshot.name, seventh.text);
      assert.match(seventh.text, new RegExp(`full read: checkpoint ${third.snapshot.source.checkpoint.name} of snapshot ${third.snapshot.name.replace(/[/]/g, '\\/')} is gone and cannot be redefined`));
      assert.equal(seventh.snapshot.disks[0].bytesRead, fifth.snapshot.disks[0].bytesRead + 128 * 1024, seventh.text);
      await restoresExactly(seventh.snapshot.name);
      const left = await checkpointNames();
      assert.ok(left.includes(seventh.snapshot.source.checkpoint.name) && !left.includes(sixth.snapshot.source.checkpoint.name), left.join(' '));

      // QEMU killed, the VM left shut off: the checkpoint's bitmap never reached the image (QEMU
      // stores it on close) or is marked in use there, so the backup from the image reads it all,
      // and says why.
      const pid = Number((await readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim());
      process.kill(pid, 'SIGKILL');
      for (let i = 0; i < 100 && (await (await openLibvirt(SYSTEM_URI)).getDomain(dom.name)).state !== 'shutoff'; i++) await sleep(100);
      const offline = await b();
      assert.equal(offline.snapshot.source.consistency.level, 'offline');
      assert.ok(!offline.snapshot.disks[0].base?.snapshot, offline.text);
      const bitmap = seventh.snapshot.source.checkpoint.name;
      assert.match(offline.text, new RegExp(`full read of sda: (the image of sda has no bitmap ${bitmap}|bitmap ${bitmap} in the image of sda is marked in use)`));
      await restoresTo(offline.snapshot.name, 'sda', disk, lab.path('fallbacks-offline.raw'), own);
    });

    it('a checkpoint whose bitmap is gone (deleted behind our back) makes the next backup a full read, with the reason', async () => {
      const hv = await openLibvirt(SYSTEM_URI);
      for (const cp of await hv.checkpoints(bare.name)) await hv.deleteCheckpoint(bare.name, cp.name);
      const r = await backup(bare.name);
      const log = r.log.join('\n');
      assert.ok(r.snapshot.disks.every((d: any) => !d.base?.snapshot), log);
      assert.match(log, /is gone and cannot be redefined/);
      const again = await backup(bare.name);
      assert.ok(again.snapshot.disks.every((d: any) => d.base?.snapshot === r.snapshot.name), again.log.join('\n'));
    });
  });

  describe('VMs on other libvirt hosts', () => {
    let hosts: LibvirtHostLab;
    before(async () => {
      hosts = await startLibvirtHosts(2);
    });
    after(async () => {
      await hosts?.stop();
    });

    it('is backed up incrementally on the new host (checkpoint redefined from the repository), and restores exactly', async (t) => {
      const [h1, h2] = hosts.hosts;
      const disk = lab.path('mig-sda.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', disk, '64M']);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 0 8M', disk]);
      const dom = await defineTestDomain(h1.uri, { name: `tresor-lab-${process.pid}-mig`, disks: [{ path: disk, bus: 'scsi', target: 'sda' }], guest: undefined, consoleLog: lab.path('mig.console.log'), agent: false });
      await run('virsh', ['-c', h1.uri, 'start', dom.name]);
      const first = await backup(dom.name, ['--id', 'mig'], h1.uri);
      await qemuIoWrite(h1.uri, dom.name, 'sda', { offset: 16 * MiB, length: 512 * 1024, pattern: 0x44 });
      await hosts.migrate(dom.name, h1, h2);
      await qemuIoWrite(h2.uri, dom.name, 'sda', { offset: 40 * MiB, length: 256 * 1024, pattern: 0x45 });
      await run('virsh', ['-c', h2.uri, 'suspend', dom.name]);
      const second = await backup(dom.name, ['--id', 'mig', '--consistency', 'off'], h2.uri);
      const log = second.log.join('\n');
      t.diagnostic(log);
      const d = second.snapshot.disks[0];
      // Shared storage: the persistent bitmap travelled inside the qcow2, libvirt's metadata did
      // not; Tresor redefines the checkpoint from the repository and libvirt validates it.
      assert.equal(d.base?.snapshot, first.snapshot.name, log);
      assert.match(log, /redefined it from snapshot/);
      assert.equal(d.bytesRead, 512 * 1024 + 256 * 1024, log);
      await restoresTo(second.snapshot.name, 'sda', disk, lab.path('mig-restored.raw'));

      // Back again, live: the checkpoint to redefine now has a parent (the one redefined on h2,
      // which h1 never had and Tresor deleted once the second backup committed). It is redefined
      // without it, and the backup stays incremental.
      await run('virsh', ['-c', h2.uri, 'resume', dom.name]);
      await hosts.migrate(dom.name, h2, h1);
      await qemuIoWrite(h1.uri, dom.name, 'sda', { offset: 24 * MiB, length: 256 * 1024, pattern: 0x4b });
      await run('virsh', ['-c', h1.uri, 'suspend', dom.name]);
      const back = await backup(dom.name, ['--id', 'mig', '--consistency', 'off'], h1.uri);
      const logBack = back.log.join('\n');
      assert.equal(back.snapshot.disks[0].base?.snapshot, second.snapshot.name, logBack);
      assert.match(logBack, /redefined it from snapshot/);
      assert.equal(back.snapshot.disks[0].bytesRead, 256 * 1024, logBack);

      // Moved cold to h2, its disk copied without the bitmaps (qemu-img convert, as another tool's
      // copy would be): the bitmap did not travel, so the next backup reads everything there is,
      // says why, and starts a fresh checkpoint that the one after continues incrementally.
      await run('virsh', ['-c', h1.uri, 'destroy', dom.name]);
      const xml = (await run('virsh', ['-c', h1.uri, 'dumpxml', '--inactive', dom.name])).stdout;
      await run('virsh', ['-c', h1.uri, 'undefine', dom.name, '--checkpoints-metadata']);
      const moved = lab.path('mig-sda-moved.qcow2');
      await run('qemu-img', ['convert', '-O', 'qcow2', disk, moved]);
      assert.doesNotMatch((await run('qemu-img', ['info', moved])).stdout, /bitmaps:/);
      const movedXml = lab.path('mig-moved.xml');
      await writeFile(movedXml, xml.split(disk).join(moved));
      await run('virsh', ['-c', h2.uri, 'define', movedXml]);
      await run('virsh', ['-c', h2.uri, 'start', dom.name]);
      await run('virsh', ['-c', h2.uri, 'suspend', dom.name]);
      const third = await backup(dom.name, ['--id', 'mig', '--consistency', 'off'], h2.uri);
      const log3 = third.log.join('\n');
      t.diagnostic(log3);
      assert.equal(third.snapshot.source.uuid, dom.uuid);
      assert.ok(!third.snapshot.disks[0].base?.snapshot, log3);
      assert.match(log3, /is gone and cannot be redefined/);
      assert.equal(third.snapshot.disks[0].bytesRead, 8 * MiB + 512 * 1024 + 2 * 256 * 1024, log3);
      await restoresTo(third.snapshot.name, 'sda', moved, lab.path('mig-restored-moved.raw'));
      await writeThenPause(h2.uri, dom.name, { offset: 48 * MiB, length: 128 * 1024, pattern: 0x4a });
      const fourth = await backup(dom.name, ['--id', 'mig', '--consistency', 'off'], h2.uri);
      assert.equal(fourth.snapshot.disks[0].base?.snapshot, third.snapshot.name, fourth.log.join('\n'));
      assert.equal(fourth.snapshot.disks[0].bytesRead, 128 * 1024, fourth.log.join('\n'));
      await run('virsh', ['-c', h2.uri, 'destroy', dom.name]).catch(() => undefined);
      await run('virsh', ['-c', h2.uri, 'undefine', dom.name, '--checkpoints-metadata']).catch(() => undefined);
    });

    it('on a remote host (qemu+tcp://, qemu+ssh://) is read over NBD/TCP with TLS, incrementally, and restores exactly (shut off: over ssh); a wrong CA, a missing CA, a busy port fail cleanly', async (t) => {
      const [h1] = hosts.hosts;
      const disk = lab.path('remote-sda.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', disk, '64M']);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 0 8M', disk]);
      const dom = await defineTestDomain(h1.uri, { name: `tresor-lab-${process.pid}-remote`, disks: [{ path: disk, bus: 'scsi', target: 'sda' }], guest: undefined, consoleLog: lab.path('remote.console.log'), agent: false });
      await run('virsh', ['-c', h1.uri, 'start', dom.name]);
      // The test process reaches h1 only over the lab network, as Tresor would reach another machine.
      const remote = (extra: string[], uri = h1.tcpUri) => cli(['backup', 'vm', dom.name, '--connect', uri, '--id', 'remote', '--consistency', 'off', ...extra]);
      const ok = async (extra: string[], uri?: string) => {
        const r = await remote(extra, uri);
        assert.equal(r.code, 0, `remote backup failed: ${r.stdout}${r.stderr}`);
        return r.json as { snapshot: any; log: string[] };
      };
      const tlsDir = ['--nbd-tls-dir', hosts.pki.clientDir];
      const checkpoints = async () => (await run('virsh', ['-c', h1.uri, 'checkpoint-list', dom.name, '--name'])).stdout.split('\n').filter((l) => l.trim() !== '');
      const jobType = async () => /Job type:\s*(\S+)/.exec((await run('virsh', ['-c', h1.uri, 'domjobinfo', dom.name])).stdout)?.[1];

      // The lab hosts share this machine's /tmp: what an earlier, failed run left there is not this test's.
      const earlierSocketDirs = new Set((await readdir('/tmp')).filter((f) => f.startsWith('tresor-nbd-')));
      const socketDirs = async () => (await readdir('/tmp')).filter((f) => f.startsWith('tresor-nbd-') && !earlierSocketDirs.has(f));
      const first = await ok(tlsDir);
      const log1 = first.log.join('\n');
      t.diagnostic(log1);
      assert.match(log1, new RegExp(`NBD over TCP at ${h1.address.replace(/\./g, '\\.')}:\\d+ with TLS`));
      assert.equal(first.snapshot.disks[0].bytesRead, 8 * MiB, log1);
      // No --scratch-dir: libvirt put the scratch file next to the image and removed it with the job.
      assert.deepEqual((await readdir(dirname(disk))).filter((f) => f.startsWith('remote-sda.qcow2.')), []);
      assert.equal((await checkpoints()).length, 1);

      await qemuIoWrite(h1.uri, dom.name, 'sda', { offset: 16 * MiB, length: 512 * 1024, pattern: 0x46 });
      const count = (await vms()).length;
      // A CA that did not sign the host's certificate: the TLS handshake fails after the job
      // started; no snapshot, the job is gone, the new checkpoint deleted.
      const intruder = await createLabPki(lab.path('intruder-pki'), [h1.address], 'intruder');
      const bad = await remote(['--nbd-tls-dir', intruder.clientDir]);
      assert.notEqual(bad.code, 0, bad.stdout);
      assert.match(`${bad.stdout}${bad.stderr}`, /TLS handshake .* failed/);
      assert.equal((await vms()).length, count);
      assert.equal(await jobType(), 'None');
      assert.deepEqual(await checkpoints(), [first.snapshot.source.checkpoint.name]);
      // No CA at all: refused before anything starts.
      await mkdir(lab.path('no-pki'), { recursive: true });
      const none = await remote(['--nbd-tls-dir', lab.path('no-pki')]);
      assert.notEqual(none.code, 0, none.stdout);
      assert.match(`${none.stdout}${none.stderr}`, /ca-cert\.pem.*missing/);

      await run('virsh', ['-c', h1.uri, 'suspend', dom.name]);
      const second = await ok(tlsDir);
      const log2 = second.log.join('\n');
      const d = second.snapshot.disks[0];
      assert.equal(d.base?.snapshot, first.snapshot.name, log2);
      assert.equal(d.bytesRead, 512 * 1024, log2);
      await restoresTo(second.snapshot.name, 'sda', disk, lab.path('remote-restored.raw'));

      // A port the host already uses: a typed error naming the option, and nothing left behind.
      const squatter = spawn('ip', ['netns', 'exec', h1.netns, process.execPath, '-e',
        `require('net').createServer().listen(10999, '${h1.address}', () => console.log('listening'))`], { stdio: ['ignore', 'pipe', 'inherit'] });
      try {
        await new Promise<void>((resolve, reject) => {
          squatter.stdout!.once('data', () => resolve());
          squatter.once('exit', (code) => reject(new Error(`port squatter exited with ${code}`)));
        });
        const busy = await remote([...tlsDir, '--nbd-port', '10999']);
        assert.notEqual(busy.code, 0, busy.stdout);
        assert.equal(busy.json?.error?.code, 'port-in-use', busy.stdout);
        assert.match(busy.json.error.hint, /--nbd-port/);
      } finally {
        squatter.kill();
      }
      assert.equal((await vms()).length, count + 1);
      assert.equal(await jobType(), 'None');
      assert.deepEqual(await checkpoints(), [second.snapshot.source.checkpoint.name]);

      // Clear text only when asked, and the log says so.
      const clear = await ok(['--nbd-tls', 'off']);
      assert.match(clear.log.join('\n'), /IN CLEAR TEXT/);
      assert.equal(clear.snapshot.disks[0].bytesRead, 0);

      // qemu+ssh://root@host: virsh goes through ssh, the disk data to the URI's host over NBD/TLS.
      // (Written while running: pausing flushes QEMU's qcow2 caches, so the image file is current.)
      await writeThenPause(h1.uri, dom.name, { offset: 32 * MiB, length: 256 * 1024, pattern: 0x47 });
      const viaSsh = await ok(tlsDir, h1.sshUri);
      const log3 = viaSsh.log.join('\n');
      assert.match(log3, new RegExp(`NBD over TCP at ${h1.address.replace(/\./g, '\\.')}:\\d+ with TLS`));
      assert.equal(viaSsh.snapshot.disks[0].base?.snapshot, clear.snapshot.name, log3);
      assert.equal(viaSsh.snapshot.disks[0].bytesRead, 256 * 1024, log3);
      await restoresTo(viaSsh.snapshot.name, 'sda', disk, lab.path('remote-restored-ssh.raw'));

      // The disk data forwarded over ssh instead of TLS: no certificates involved.
      await writeThenPause(h1.uri, dom.name, { offset: 40 * MiB, length: 128 * 1024, pattern: 0x49 });
      const sshData = await ok(['--nbd-transport', 'ssh', '--nbd-tls-dir', lab.path('no-pki')], h1.sshUri);
      const log5 = sshData.log.join('\n');
      assert.match(log5, /NBD over a unix socket on root@[\d.]+, forwarded over ssh/);
      assert.equal(sshData.snapshot.disks[0].base?.snapshot, viaSsh.snapshot.name, log5);
      assert.equal(sshData.snapshot.disks[0].bytesRead, 128 * 1024, log5);
      await restoresTo(sshData.snapshot.name, 'sda', disk, lab.path('remote-restored-fwd.raw'));
      assert.deepEqual(await socketDirs(), [], 'the socket directory on the host is removed');
      // Killed while its disk data is forwarded over ssh: the next run also removes the socket
      // directory the killed one left on the host.
      await run('virsh', ['-c', h1.uri, 'resume', dom.name]);
      const killed = spawnTresor(['--repo', repo, '--json', 'backup', 'vm', dom.name, '--connect', h1.sshUri, '--id', 'remote', '--consistency', 'off',
        '--full', '--nbd-transport', 'ssh', '--nbd-tls-dir', lab.path('no-pki'), '--bwlimit', '1M'], { env: env() });
      let reading = false;
      for (let i = 0; i < 200 && !reading; i++) {
        await sleep(100);
        // libvirt answers "backup job data missing" while the job is being set up.
        reading = (await socketDirs()).length === 1 && await jobType().catch(() => 'None') !== 'None';
      }
      assert.ok(reading, 'the killed run started its job');
      await sleep(500);
      killed.kill('SIGKILL');
      await new Promise((r) => killed.on('close', r));
      assert.equal((await socketDirs()).length, 1, 'the killed run left its socket directory');
      const afterKill = await ok(['--nbd-transport', 'ssh', '--nbd-tls-dir', lab.path('no-pki')], h1.sshUri);
      assert.match(afterKill.log.join('\n'), /removed its NBD socket directory \/tmp\/tresor-nbd-[0-9a-f]{16} on root@/);
      assert.deepEqual(await socketDirs(), [], 'nothing left on the host after the next run');
      await run('virsh', ['-c', h1.uri, 'suspend', dom.name]);
      const noSsh = await remote(['--nbd-transport', 'ssh']);
      assert.notEqual(noSsh.code, 0, noSsh.stdout);
      assert.match(`${noSsh.stdout}${noSsh.stderr}`, /--nbd-transport ssh needs a qemu\+ssh:\/\/ connection/);

      // Shut off: through qemu+tcp there is no way to its images, a clear error; through qemu+ssh
      // they are read there with qemu-img and qemu-nbd, over ssh.
      await run('virsh', ['-c', h1.uri, 'destroy', dom.name]);
      const off = await remote(tlsDir);
      assert.notEqual(off.code, 0, off.stdout);
      assert.match(`${off.stdout}${off.stderr}`, /is shut off: its images can only be read on that host, and Tresor runs commands there only over ssh/);
      // Written while shut off (qemu-io keeps the image's enabled bitmap up to date, as QEMU does).
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x48 48M 256k', disk]);
      const offSsh = await ok([], h1.sshUri);
      const log4 = offSsh.log.join('\n');
      assert.match(log4, /shut off on root@[\d.]+: reading its images there with qemu-img and qemu-nbd, forwarded over ssh/);
      // destroy lets QEMU close the image on SIGTERM: the bitmap is stored cleanly, and only the
      // write since the last backup is read.
      assert.match(log4, /incremental read of sda from bitmap tresor-/);
      assert.equal(offSsh.snapshot.disks[0].base?.snapshot, afterKill.snapshot.name, log4);
      assert.equal(offSsh.snapshot.disks[0].bytesRead, 256 * 1024, log4);
      assert.equal(offSsh.snapshot.source.consistency.level, 'offline');
      const outOff = lab.path('remote-restored-off.raw');
      await restore(offSsh.snapshot.name, 'sda', outOff);
      await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', disk, outOff]);
      // Nothing left running or listening on the host.
      assert.deepEqual(await socketDirs(), []);
      await assert.rejects(run('pgrep', ['-f', `qemu-nbd .*${disk}`]));
      await run('virsh', ['-c', h1.uri, 'undefine', dom.name, '--checkpoints-metadata']).catch(() => undefined);

      // Free space of a directory on the host, through libvirt: a transient pool, or an active
      // pool with that target; a directory the host does not have is an error.
      const hv = await openLibvirt(h1.tcpUri);
      const viaProbe = await hv.freeSpace(dirname(disk));
      await run('virsh', ['-c', h1.uri, 'pool-create-as', 'lab-images', 'dir', '--target', dirname(disk)]);
      try {
        const viaPool = await hv.freeSpace(dirname(disk));
        assert.ok(viaProbe > 0 && Math.abs(viaPool - viaProbe) < 1024 * MiB, `${viaProbe} vs ${viaPool}`);
      } finally {
        await run('virsh', ['-c', h1.uri, 'pool-destroy', 'lab-images']);
      }
      await assert.rejects(hv.freeSpace(lab.path('no-such-dir')), /no-such-dir/);
      assert.equal((await run('virsh', ['-c', h1.uri, 'pool-list', '--all', '--name'])).stdout.trim(), '', 'no probe pool left behind');
    });
  });
});
