/**
 * The libvirt driver against real guests under TCG (test/lab): discovery, domain XML, the guest
 * agent with fsfreeze, pull-mode backup jobs read with the project's NBD client (full, then
 * incremental from a checkpoint with an exactly known dirty range), checkpoint list / redefine /
 * delete, shut-off disks (qcow2 bitmaps, qemu-nbd export), events, and the typed errors.
 *
 * At most two domains run at once: the main guest (agent + writer), and briefly an OS-less one.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { DIRTY_BITMAP_FLAG_DIRTY, NbdClient } from '../src/nbd/client.ts';
import { parseDomainDisks } from '../src/hypervisor/domain-xml.ts';
import { HypervisorError, openLibvirt, type BackupJob, type Hypervisor, type HypervisorEvent } from '../src/hypervisor/libvirt.ts';
import { exportDiskImage, readImageInfo } from '../src/hypervisor/offline-disk.ts';
import { Virsh } from '../src/hypervisor/virsh.ts';
import { parseXml, childText } from '../src/util/xml.ts';
import {
  LabHost, SYSTEM_URI, e2fsckClean, qemuIoWrite, readGuestFile, readGuestLog, type TestDomain,
} from './lab/guest.ts';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;

/** Expects a HypervisorError with this code, a hint, and (for libvirt calls) the URI in its context. */
async function rejectsWithCode(promise: Promise<unknown>, code: string, opts: { libvirt?: boolean } = {}): Promise<HypervisorError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof HypervisorError, `expected a HypervisorError, got ${String(err)}`);
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    assert.ok(err.hint !== undefined && err.hint.length > 0, `the error carries a hint: ${err.message}`);
    if (opts.libvirt !== false) assert.equal(err.context.uri, SYSTEM_URI);
    return err;
  }
  assert.fail(`expected a HypervisorError ${code}`);
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * MiB })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Reads a whole export with the project's NBD client and hashes it. */
async function sha256Export(job: BackupJob, target: string): Promise<{ hash: string; size: number }> {
  const disk = job.disks.find((candidate) => candidate.target === target);
  assert.ok(disk, `job exports ${target}`);
  const client = await NbdClient.connect(job.nbd, { exportName: disk.exportName });
  try {
    const hash = createHash('sha256');
    const step = 4 * MiB;
    const reads: Array<Promise<Buffer>> = [];
    for (let offset = 0; offset < client.size; offset += step) reads.push(client.read(offset, Math.min(step, client.size - offset)));
    for (const read of reads) hash.update(await read);
    return { hash: hash.digest('hex'), size: client.size };
  } finally {
    await client.close();
  }
}

async function dirtyExtents(nbd: BackupJob['nbd'], exportName: string, context: string): Promise<Array<{ offset: number; length: number }>> {
  const client = await NbdClient.connect(nbd, { exportName, metaContexts: [context] });
  try {
    const extents = await client.blockStatus(context, 0, client.size);
    return extents.filter((extent) => (extent.flags & DIRTY_BITMAP_FLAG_DIRTY) !== 0).map(({ offset, length }) => ({ offset, length }));
  } finally {
    await client.close();
  }
}

async function rawCopy(image: string, target: string): Promise<string> {
  await execFileAsync('qemu-img', ['convert', '-U', '-O', 'raw', image, target]);
  return target;
}

describe('libvirt driver with live TCG guests', { timeout: 300_000 }, () => {
  let lab: LabHost;
  let hv: Hypervisor;
  let main: TestDomain;
  let off: TestDomain;
  let sda: string;
  let sdb: string;
  let fullJob: BackupJob | undefined;
  const timings: Record<string, number> = {};

  // `lab` is unset when before() failed early.
  after(() => (lab as LabHost | undefined)?.cleanup());

  before(async () => {
    let started = Date.now();
    lab = await LabHost.create();
    timings.labSetupMs = Date.now() - started;
    timings.guestBuildMs = lab.guest.buildMs;
    hv = await openLibvirt(SYSTEM_URI);
    sda = await lab.dataDisk('main-sda.qcow2', 64, { files: { 'hello.txt': 'hello from the lab\n' } });
    sdb = await lab.dataDisk('main-sdb.qcow2', 32, { filesystem: false });
    main = await lab.defineDomain({
      name: 'main',
      disks: [{ path: sda, bus: 'scsi', target: 'sda' }, { path: sdb, bus: 'scsi', target: 'sdb' }],
      writer: { intervalMs: 100 },
    });
    const offDisk = await lab.dataDisk('off-vda.raw', 16, { format: 'raw', filesystem: false });
    off = await lab.defineDomain({ name: 'off', disks: [{ path: offDisk, bus: 'virtio', target: 'vda' }], agent: false });
    started = Date.now();
    timings.bootToAgentMs = await lab.boot(main, 60_000);
    timings.bootTotalMs = Date.now() - started;
  });

  it('discovers running and shut-off domains with UUID, state and disks', async () => {
    const domains = await hv.listDomains();
    const mainInfo = domains.find((domain) => domain.uuid === main.uuid);
    const offInfo = domains.find((domain) => domain.uuid === off.uuid);
    assert.deepEqual(mainInfo, { name: main.name, uuid: main.uuid, state: 'running', stateText: 'running', persistent: true });
    assert.deepEqual(offInfo, { name: off.name, uuid: off.uuid, state: 'shutoff', stateText: 'shut off', persistent: true });
    assert.deepEqual(await hv.getDomain(main.name), mainInfo, 'by name and by UUID alike');

    const mainDisks = await hv.disks(main.uuid);
    assert.deepEqual(mainDisks.map((disk) => [disk.target, disk.bus, disk.sourceType, disk.source, disk.format, disk.readonly]), [
      ['sda', 'scsi', 'file', sda, 'qcow2', false],
      ['sdb', 'scsi', 'file', sdb, 'qcow2', false],
    ]);
    assert.deepEqual(mainDisks.map((disk) => disk.alias), ['scsi0-0-0-0', 'scsi0-0-0-1'], 'a running domain has device aliases');
    const offDisks = await hv.disks(off.uuid);
    assert.deepEqual(offDisks.map((disk) => [disk.target, disk.bus, disk.format, disk.alias]), [['vda', 'virtio', 'raw', undefined]]);
    const block = await hv.blockInfo(main.uuid, 'sdb');
    assert.equal(block.capacity, 32 * MiB);
    assert.ok(block.physical > 0 && block.physical < 32 * MiB, 'a fresh qcow2 is small on the host');

    await rejectsWithCode(hv.getDomain('tresor-no-such-domain'), 'domain-not-found');
    await rejectsWithCode(hv.disks('00000000-0000-4000-8000-000000000000'), 'domain-not-found');
  });

  it('skips cdroms and reads network disks from domain XML', () => {
    const disks = parseDomainDisks(`<domain type='kvm'><name>x</name><devices>
      <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sdc' bus='sata'/><readonly/></disk>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='pool/img'/><target dev='vdb' bus='virtio'/><shareable/></disk>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/><target dev='vda' bus='virtio'/></disk>
    </devices></domain>`);
    assert.deepEqual(disks.map((disk) => [disk.target, disk.sourceType, disk.source, disk.network?.name, disk.shareable]), [
      ['vdb', 'network', undefined, 'pool/img', true],
      ['vda', 'block', '/dev/vg/lv', undefined, false],
    ]);
  });

  it('captures the live and the inactive domain XML', async () => {
    const live = parseXml(await hv.domainXml(main.uuid));
    assert.equal(childText(live, 'name'), main.name);
    assert.equal(childText(live, 'uuid'), main.uuid);
    assert.equal(live.attributes.id !== undefined, true, 'the live XML has the running domain id');
    const inactive = await hv.domainXml(main.uuid, { inactive: true });
    assert.equal(parseXml(inactive).attributes.id, undefined);
    assert.match(inactive, /<cmdline>console=ttyS0/);
    assert.ok(!inactive.includes('<alias'), 'the inactive definition has no runtime aliases');
  });

  it('virsh sessions: calls reuse long-running virsh processes; one that misses its deadline is killed and the next call works', async () => {
    const virsh = new Virsh(SYSTEM_URI, { sessions: true });
    const started = performance.now();
    const infos = await Promise.all(Array.from({ length: 12 }, () => virsh.run(['dominfo', main.uuid], { operation: 'dominfo' })));
    for (const info of infos) assert.match(info, new RegExp(`^UUID:\\s+${main.uuid}$`, 'm'));
    timings.twelveSessionCallsMs = Math.round(performance.now() - started);
    assert.ok(virsh.liveSessions >= 1 && virsh.liveSessions <= 3, `12 calls ran in ${virsh.liveSessions} long-running virsh processes (1 to 3 expected)`);
    assert.equal((await virsh.run(['dumpxml', main.uuid], { operation: 'dumpxml' })).slice(0, 7), '<domain', 'neither prompts, echoed commands nor blank lines are part of the output');
    // `event --timeout` blocks the session for its timeout: past the call's deadline it is killed.
    await assert.rejects(virsh.run(['event', '--all', '--timeout', '5'], { operation: 'event', timeoutMs: 300 }), (err: unknown) => err instanceof HypervisorError && err.code === 'timeout');
    assert.match(await virsh.run(['version'], { operation: 'version' }), /Running hypervisor: QEMU/);
    await assert.rejects(virsh.run(['dominfo', 'no such domain'], { operation: 'dominfo' }), (err: unknown) => err instanceof HypervisorError && err.code === 'domain-not-found');
  });

  it('guest agent: ping, info, fsfreeze runs the hook and blocks writes until thaw', async () => {
    const agent = hv.guestAgent(main.uuid);
    await agent.ping();
    assert.ok((await agent.info()).supportedCommands.includes('guest-fsfreeze-freeze'));
    assert.equal(await agent.freezeStatus(), 'thawed');
    // The writer logs once a second from boot: let it write a few lines first, so the frozen
    // copy shows that writes before the freeze are all there.
    for (const deadline = Date.now() + 30_000; (await readGuestLog(sda, { replayJournal: true })).entries.length <= 3;) {
      assert.ok(Date.now() < deadline, 'the guest writer wrote no 4 lines within 30 s');
      await sleep(500);
    }

    const frozenCopy = lab.path('frozen-sda.raw');
    const freezeStarted = Date.now();
    assert.equal(await agent.freeze(), 1, '/data is the one filesystem to freeze');
    try {
      assert.equal(await agent.freezeStatus(), 'frozen');
      await rawCopy(sda, frozenCopy);
      await sleep(Math.max(0, 3000 - (Date.now() - freezeStarted)));
    } finally {
      assert.equal(await agent.thaw(), 1);
    }
    assert.equal(await agent.freezeStatus(), 'thawed');

    // A copy taken while frozen is a clean filesystem, no journal replay needed, and its log has no gap or torn line.
    const fsck = await e2fsckClean(frozenCopy);
    assert.ok(fsck.clean, fsck.output);
    const frozenLog = await readGuestLog(frozenCopy);
    assert.ok(frozenLog.entries.length > 3, 'the writer wrote before the freeze');
    assert.deepEqual(frozenLog.gaps, []);
    assert.deepEqual(frozenLog.badLines, []);
    assert.match(await readGuestFile(frozenCopy, '/hooks.log'), /^freeze \d+$/m, 'the freeze hook ran before the filesystem froze');

    // The writer was blocked, not failing: after thaw, the line that waited lands with its pre-freeze time.
    await sleep(1500);
    const live = await readGuestLog(sda, { replayJournal: true });
    assert.deepEqual(live.gaps, []);
    const stall = live.entries.some((entry, i) => i > 0 && entry.epoch - (live.entries[i - 1] as { epoch: number }).epoch >= 2);
    assert.ok(stall, 'two consecutive writer lines are >= 2 s apart: the write waited for the thaw');
    const console = await readFile(main.consoleLog, 'utf8');
    assert.match(console, /fsfreeze-hook freeze/);
    assert.match(console, /fsfreeze-hook thaw/);
  });

  it('full pull backup: the export equals the disk at the point in time', async () => {
    const scratch = lab.path('scratch');
    await mkdir(scratch, { mode: 0o1777 });
    // Pause the guest so the copies and the backup's point in time are the same instant.
    await hv.suspend(main.uuid);
    let beginMs: number;
    const refSda = await rawCopy(sda, lab.path('ref-sda.raw'));
    const refSdb = await rawCopy(sdb, lab.path('ref-sdb.raw'));
    try {
      const started = Date.now();
      fullJob = await hv.beginPullBackup(main.uuid, {
        socketPath: lab.path('backup.sock'),
        disks: [{ target: 'sda', scratchFile: `${scratch}/sda.qcow2` }, { target: 'sdb', scratchFile: `${scratch}/sdb.qcow2` }],
        checkpointName: 'tresor-1',
      });
      beginMs = Date.now() - started;
    } finally {
      await hv.resume(main.uuid);
    }
    timings.backupBeginMs = beginMs;
    assert.deepEqual(fullJob.disks.map((disk) => [disk.target, disk.exportName, disk.mode, disk.dirtyBitmapContext]), [
      ['sda', 'sda', 'full', undefined],
      ['sdb', 'sdb', 'full', undefined],
    ]);
    const job = await hv.jobInfo(main.uuid);
    assert.equal(job?.kind, 'backup');
    assert.equal(job?.status, 'active');

    // The guest keeps writing; the export still shows the paused instant.
    await sleep(500);
    const readStarted = Date.now();
    assert.deepEqual(await sha256Export(fullJob, 'sda'), { hash: await sha256File(refSda), size: 64 * MiB });
    assert.deepEqual(await sha256Export(fullJob, 'sdb'), { hash: await sha256File(refSdb), size: 32 * MiB });
    timings.fullReadMs = Date.now() - readStarted;

    // A second job is refused at once (libvirt itself would wait 30 s for its job lock).
    const refusedAt = Date.now();
    const refused = await rejectsWithCode(hv.beginPullBackup(main.uuid, {
      socketPath: lab.path('other.sock'), disks: [{ target: 'sda', scratchFile: `${scratch}/other.qcow2` }],
    }), 'backup-job-running');
    assert.ok(Date.now() - refusedAt < 5000);
    assert.match(refused.hint ?? '', /abort/);

    await fullJob.finish();
    assert.equal(await hv.jobInfo(main.uuid), undefined);
    const completed = await hv.jobInfo(main.uuid, { completed: true });
    assert.equal(completed?.kind, 'backup');
    assert.equal(await hv.abortBackup(main.uuid), false, 'nothing left to abort');
  });

  it('incremental pull backup: the dirty bitmap marks exactly what was written', async () => {
    const scratch = lab.path('scratch');
    await qemuIoWrite(lab.virsh, main.name, 'sdb', { offset: 1 * MiB, length: 128 * 1024, pattern: 0xab });
    await qemuIoWrite(lab.virsh, main.name, 'sdb', { offset: 5 * MiB, length: 64 * 1024, pattern: 0xcd });
    const job = await hv.beginPullBackup(main.uuid, {
      socketPath: lab.path('backup.sock'),
      disks: [{ target: 'sda', scratchFile: `${scratch}/sda.qcow2` }, { target: 'sdb', scratchFile: `${scratch}/sdb.qcow2` }],
      incrementalFrom: 'tresor-1',
      checkpointName: 'tresor-2',
    });
    try {
      const disk = job.disks.find((candidate) => candidate.target === 'sdb');
      assert.equal(disk?.mode, 'incremental');
      assert.equal(disk?.dirtyBitmapContext, 'qemu:dirty-bitmap:backup-sdb');
      assert.deepEqual(await dirtyExtents(job.nbd, disk.exportName, disk.dirtyBitmapContext), [
        { offset: 1 * MiB, length: 128 * 1024 },
        { offset: 5 * MiB, length: 64 * 1024 },
      ]);
      const client = await NbdClient.connect(job.nbd, { exportName: 'sdb' });
      try {
        assert.deepEqual(await client.read(1 * MiB, 128 * 1024), Buffer.alloc(128 * 1024, 0xab));
        assert.deepEqual(await client.read(5 * MiB, 64 * 1024), Buffer.alloc(64 * 1024, 0xcd));
      } finally {
        await client.close();
      }
      // The writer dirtied sda too: its bitmap is not empty.
      assert.ok((await dirtyExtents(job.nbd, 'sda', 'qemu:dirty-bitmap:backup-sda')).length > 0);
    } finally {
      await job.finish();
    }
  });

  it('checkpoints: list, sizes, redefine from a saved copy, validate, delete', async () => {
    const list = await hv.checkpoints(main.uuid);
    assert.deepEqual(list.map((checkpoint) => [checkpoint.name, checkpoint.parent]), [['tresor-1', undefined], ['tresor-2', 'tresor-1']]);
    assert.deepEqual(list[1]?.disks.map((disk) => [disk.target, disk.checkpoint, disk.bitmap]), [['sda', 'bitmap', 'tresor-2'], ['sdb', 'bitmap', 'tresor-2']]);
    assert.ok((list[1]?.creationTime ?? 0) >= (list[0]?.creationTime ?? Infinity));
    assert.match(list[1]?.xml ?? '', /<domain type='qemu'>/, 'the saved XML carries the domain definition');

    await qemuIoWrite(lab.virsh, main.name, 'sdb', { offset: 8 * MiB, length: 64 * 1024 });
    const sized = await hv.checkpoints(main.uuid, { sizes: true });
    assert.equal(sized[1]?.disks.find((disk) => disk.target === 'sdb')?.size, 64 * 1024);

    // Metadata lost (e.g. after a host move), bitmaps still in the qcow2: redefine from the saved copy.
    const saved = await hv.checkpointXml(main.uuid, 'tresor-2');
    await hv.deleteCheckpoint(main.uuid, 'tresor-2', { metadataOnly: true });
    assert.deepEqual((await hv.checkpoints(main.uuid)).map((checkpoint) => checkpoint.name), ['tresor-1']);
    await rejectsWithCode(hv.checkpointXml(main.uuid, 'tresor-2'), 'checkpoint-not-found');
    await hv.redefineCheckpoint(main.uuid, saved, { validate: true });
    assert.deepEqual((await hv.checkpoints(main.uuid)).map((checkpoint) => [checkpoint.name, checkpoint.parent]), [['tresor-1', undefined], ['tresor-2', 'tresor-1']]);
    await hv.redefineCheckpoint(main.uuid, saved); // redefining what exists is idempotent
    await rejectsWithCode(hv.beginPullBackup(main.uuid, {
      socketPath: lab.path('backup.sock'), disks: [{ target: 'sdb', scratchFile: lab.path('scratch/sdb.qcow2') }], checkpointName: 'tresor-2',
    }), 'checkpoint-exists');

    // Deleting tresor-1 merges its bitmap away: redefining it from the copy must fail validation.
    const savedFirst = await hv.checkpointXml(main.uuid, 'tresor-1');
    await hv.deleteCheckpoint(main.uuid, 'tresor-1');
    assert.deepEqual((await hv.checkpoints(main.uuid)).map((checkpoint) => [checkpoint.name, checkpoint.parent]), [['tresor-2', undefined]]);
    await rejectsWithCode(hv.redefineCheckpoint(main.uuid, savedFirst, { validate: true }), 'checkpoint-invalid');
    await rejectsWithCode(hv.deleteCheckpoint(main.uuid, 'tresor-no-such'), 'checkpoint-not-found');
    await rejectsWithCode(hv.beginPullBackup(main.uuid, {
      socketPath: lab.path('backup.sock'), disks: [{ target: 'sdb', scratchFile: lab.path('scratch/sdb.qcow2') }], incrementalFrom: 'tresor-1',
    }), 'checkpoint-not-found');
    await rejectsWithCode(hv.beginPullBackup(main.uuid, {
      socketPath: lab.path('backup.sock'), disks: [{ target: 'sdz', scratchFile: lab.path('scratch/sdz.qcow2') }],
    }), 'disk-not-found');
    assert.equal(await hv.jobInfo(main.uuid), undefined, 'failed begins leave no job behind');
  });

  it('typed errors: disks without bitmaps, unwritable socket directory, absent or silent agent, shut-off domain', async () => {
    const raw = await lab.dataDisk('blank-raw.raw', 16, { format: 'raw', filesystem: false });
    const v2 = await lab.dataDisk('blank-v2.qcow2', 16, { filesystem: false, compat: '0.10' });
    const blank = await lab.defineDomain({
      name: 'blank', bootable: false, agentChannel: true, agent: false,
      disks: [{ path: raw, bus: 'scsi', target: 'sda' }, { path: v2, bus: 'scsi', target: 'sdb' }],
    });
    await lab.start(blank);
    try {
      const backup = (target: string, socketPath = lab.path('blank.sock')) => hv.beginPullBackup(blank.uuid, {
        socketPath, disks: [{ target, scratchFile: lab.path(`scratch/blank-${target}.qcow2`) }], checkpointName: `cp-${target}`,
      });
      await rejectsWithCode(backup('sda'), 'bitmaps-unsupported');
      await rejectsWithCode(backup('sdb'), 'bitmaps-unsupported');
      const closed = lab.path('closed');
      await mkdir(closed, { mode: 0o755 });
      await rejectsWithCode(hv.beginPullBackup(blank.uuid, {
        socketPath: `${closed}/nbd.sock`, disks: [{ target: 'sda', scratchFile: lab.path('scratch/blank-sda.qcow2') }],
      }), 'scratch-not-writable');
      assert.equal(await hv.jobInfo(blank.uuid), undefined);
      await rejectsWithCode(hv.guestAgent(blank.uuid).ping(2), 'agent-not-responding');
      await rejectsWithCode(hv.guestAgent(blank.uuid).freeze(), 'agent-not-responding');
    } finally {
      await lab.destroy(blank);
    }
    await rejectsWithCode(hv.guestAgent(off.uuid).ping(), 'domain-not-running');
    await rejectsWithCode(hv.beginPullBackup(off.uuid, {
      socketPath: lab.path('off.sock'), disks: [{ target: 'vda', scratchFile: lab.path('scratch/off.qcow2') }],
    }), 'domain-not-running');

    const noChannel = await lab.defineDomain({ name: 'nochannel', bootable: false, agent: false, disks: [{ path: raw, bus: 'scsi', target: 'sda' }] });
    await lab.start(noChannel);
    try {
      await rejectsWithCode(hv.guestAgent(noChannel.uuid).ping(), 'agent-not-configured');
    } finally {
      await lab.destroy(noChannel);
    }
  });

  it('shut-off disks: persistent bitmaps survive a clean shutdown and export over qemu-nbd', async () => {
    // While the domain runs, its image is locked.
    await rejectsWithCode(exportDiskImage({ image: sdb, socketPath: lab.path('busy.sock') }).then((e) => e.close()), 'disk-in-use', { libvirt: false });
    const events: HypervisorEvent[] = [];
    const watch = hv.watchEvents((event) => events.push(event), { domain: main.uuid });
    await sleep(300);
    const shutdownStarted = Date.now();
    await lab.shutdown(main);
    timings.agentShutdownMs = Date.now() - shutdownStarted;
    await sleep(300);
    await watch.close();
    assert.ok(events.some((event) => event.type === 'lifecycle' && event.domain === main.name && /^Stopped/.test(event.detail)),
      `a Stopped lifecycle event arrived (got ${events.map((event) => `${event.type}: ${event.detail}`).join('; ')})`);
    assert.equal((await hv.getDomain(main.uuid)).state, 'shutoff');

    const info = await readImageInfo(sdb);
    assert.equal(info.format, 'qcow2');
    assert.equal(info.compat, '1.1');
    assert.deepEqual(info.bitmaps.map((bitmap) => [bitmap.name, bitmap.auto, bitmap.inUse, bitmap.granularity]), [['tresor-2', true, false, 65536]]);

    // The clean shutdown unmounted /data: the writer's log is whole without journal replay.
    assert.ok((await e2fsckClean(sda)).clean);
    const log = await readGuestLog(sda);
    assert.deepEqual(log.gaps, []);
    assert.deepEqual(log.badLines, []);

    const exported = await exportDiskImage({ image: sdb, socketPath: lab.path('offline.sock'), bitmap: 'tresor-2', exportName: 'sdb' });
    try {
      assert.equal(exported.dirtyBitmapContext, 'qemu:dirty-bitmap:tresor-2');
      assert.deepEqual(await dirtyExtents(exported.nbd, 'sdb', 'qemu:dirty-bitmap:tresor-2'), [{ offset: 8 * MiB, length: 64 * 1024 }]);
      const reference = await rawCopy(sdb, lab.path('ref-sdb-off.raw'));
      const client = await NbdClient.connect(exported.nbd, { exportName: 'sdb' });
      try {
        assert.deepEqual(await client.read(0, 32 * MiB), await readFile(reference));
      } finally {
        await client.close();
      }
    } finally {
      await exported.close();
    }
    await rejectsWithCode(exportDiskImage({ image: sdb, socketPath: lab.path('nobitmap.sock'), bitmap: 'no-such-bitmap' }).then((e) => e.close()),
      'checkpoint-not-found', { libvirt: false });
  });

  it('reports timings', (t) => {
    t.diagnostic(JSON.stringify(timings));
    assert.ok(timings.bootToAgentMs !== undefined);
  });
});
