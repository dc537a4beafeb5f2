/**
 * The migration lab (test/lab/hosts.ts): two extra libvirt hosts in namespaces, a live migration
 * between them seen through the project's libvirt driver, and a teardown that leaves nothing.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { openLibvirt } from '../src/hypervisor/libvirt.ts';
import { Virsh } from '../src/hypervisor/virsh.ts';
import { LabHost, defineTestDomain } from './lab/guest.ts';
import { startLibvirtHosts, type LibvirtHostLab } from './lab/hosts.ts';

const execFileAsync = promisify(execFile);

describe('libvirt hosts in namespaces', { timeout: 180_000 }, () => {
  let lab: LabHost;
  let hosts: LibvirtHostLab;
  after(async () => {
    await (hosts as LibvirtHostLab | undefined)?.stop();
    await (lab as LabHost | undefined)?.cleanup();
  });
  before(async () => {
    lab = await LabHost.create();
    const started = Date.now();
    hosts = await startLibvirtHosts(2);
    console.log(`# two libvirt hosts up in ${Date.now() - started} ms`);
  });

  it('migrates a running domain from one host to the other and tears down completely', async () => {
    const [h1, h2] = hosts.hosts;
    assert.ok(h1 && h2);
    assert.notEqual(h1.uri, h2.uri);
    const hv1 = await openLibvirt(h1.uri);
    const hv2 = await openLibvirt(h2.uri);
    assert.deepEqual(await hv1.listDomains(), [], 'a fresh host has no domains (not the main daemon\'s)');

    const disk = await lab.dataDisk('migrant.qcow2', 16, { filesystem: false });
    const domain = await defineTestDomain(new Virsh(h1.uri), {
      name: `tresor-lab-${process.pid}-migrant`, guest: undefined, consoleLog: lab.path('migrant.console.log'),
      disks: [{ path: disk, bus: 'scsi', target: 'sda' }], agent: false,
    });
    await new Virsh(h1.uri).run(['start', domain.name], { operation: 'start' });
    assert.equal((await hv1.getDomain(domain.uuid)).state, 'running');

    const started = Date.now();
    await hosts.migrate(domain.name, h1, h2);
    console.log(`# live migration took ${Date.now() - started} ms`);
    const moved = await hv2.getDomain(domain.uuid);
    assert.equal(moved.state, 'running');
    assert.equal(moved.persistent, true);
    assert.deepEqual((await hv1.listDomains()).map((d) => d.uuid), [], 'the source no longer has it');
    assert.equal((await hv2.disks(domain.uuid))[0]?.source, disk);

    const namespaces = hosts.hosts.map((host) => host.netns);
    const dirs = hosts.hosts.map((host) => host.dir);
    await hosts.stop();
    const { stdout } = await execFileAsync('ip', ['netns', 'list']);
    for (const netns of namespaces) assert.ok(!stdout.includes(netns), `${netns} is gone`);
    for (const dir of dirs) assert.ok(!existsSync(dir), `${dir} is gone`);
    const { stdout: ps } = await execFileAsync('ps', ['-eo', 'args']);
    assert.ok(!ps.includes(domain.name), 'no qemu of the migrated domain is left');
  });
});
