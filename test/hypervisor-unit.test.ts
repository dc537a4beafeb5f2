/**
 * Unit tests of the hypervisor layer's parsers and writers (no libvirt needed): the safe XML
 * parser, backup/checkpoint XML, job statistics, event lines, and the classification of libvirt's
 * real error messages (collected from libvirt 9.0 / QEMU 7.2) into typed errors.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseActiveBackupXml, parseJobStats, pullBackupXml } from '../src/hypervisor/backup-job.ts';
import { checkpointCreateXml, checkpointXmlWithoutParent, parseCheckpointXml, validateCheckpointName } from '../src/hypervisor/checkpoint.ts';
import { classifyLibvirtError } from '../src/hypervisor/errors.ts';
import { parseEventLine } from '../src/hypervisor/events.ts';
import { remoteHostOf } from '../src/hypervisor/libvirt.ts';
import { isRemoteSocketDir, remoteSocketDir, shellQuote, sshArgs, sshTargetOf } from '../src/hypervisor/ssh.ts';
import { portCandidates } from '../src/engine/vm-nbd-server.ts';
import { parsePortRange } from '../src/cli/commands/backup.ts';
import { BadInputError } from '../src/util/errors.ts';
import { childElements, childText, parseXml, renderXml, textContent } from '../src/util/xml.ts';

describe('xml parser', () => {
  it('reads elements, attributes, text, entities, CDATA; skips comments and declarations', () => {
    const root = parseXml(`<?xml version="1.0"?>\n<!-- c --><a x='1' y="&lt;&amp;&quot;&#65;&#x42;">t&gt;<b/><![CDATA[<raw>]]><b k='v'>two</b></a>`);
    assert.equal(root.name, 'a');
    assert.deepEqual({ ...root.attributes }, { x: '1', y: '<&"AB' });
    assert.equal(childElements(root, 'b').length, 2);
    assert.equal(textContent(root), 't><raw>two');
    assert.equal(childText(root, 'b'), '');
  });

  it('round-trips what renderXml writes, escaping everything', () => {
    const nasty = `a<b>&"'\n\tz`;
    const xml = renderXml({ name: 'r', attributes: { v: nasty, skip: undefined }, children: [{ name: 'c', children: [nasty] }] });
    const root = parseXml(xml);
    assert.equal(root.attributes.v, nasty);
    assert.equal(root.attributes.skip, undefined);
    assert.equal(childText(root, 'c'), nasty.trim());
  });

  it('refuses DOCTYPE (no entity expansion at all), unknown entities and malformed documents', () => {
    const bad = [
      '<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
      '<a>&x;</a>',
      '<a>&#0;</a>',
      '<a><b></a>',
      '<a x="1" x="2"/>',
      '<a>',
      '<a/><b/>',
      '<a x=1/>',
      '',
      '<a><!DOCTYPE b></a>',
    ];
    for (const text of bad) assert.throws(() => parseXml(text), BadInputError, text);
  });

  it('bounds depth, size, attributes and nodes', () => {
    assert.throws(() => parseXml('<a>'.repeat(300) + '</a>'.repeat(300)), /nested deeper/);
    assert.doesNotThrow(() => parseXml('<a>'.repeat(200) + '</a>'.repeat(200)));
    assert.throws(() => parseXml(`<a>${'x'.repeat(100)}</a>`, { maxLength: 50 }), /exceeds the limit/);
    assert.throws(() => parseXml(`<a ${Array.from({ length: 5 }, (_, i) => `a${i}="1"`).join(' ')}/>`, { maxAttributes: 4 }), /attributes/);
    assert.throws(() => parseXml(`<a>${'<b/>'.repeat(20)}</a>`, { maxNodes: 10 }), /nodes/);
  });
});

describe('backup and checkpoint XML', () => {
  it('lists every disk in the backup and checkpoint, excluded ones as no', () => {
    const backup = parseXml(pullBackupXml({
      socketPath: '/s/n.sock', incrementalFrom: 'cp1',
      disks: [{ target: 'vda', scratchFile: '/s/vda.qcow2' }],
    }, ['vda', 'vdb']));
    assert.equal(backup.attributes.mode, 'pull');
    assert.equal(childText(backup, 'incremental'), 'cp1');
    const disks = childElements(childElements(backup, 'disks')[0]!, 'disk');
    assert.deepEqual(disks.map((disk) => ({ ...disk.attributes })), [
      { name: 'vda', backup: 'yes', type: 'file', exportname: 'vda' },
      { name: 'vdb', backup: 'no' },
    ]);
    const checkpoint = parseCheckpointXml(checkpointCreateXml('cp2', ['vda'], ['vda', 'vdb']));
    assert.deepEqual(checkpoint.disks.map((disk) => [disk.target, disk.checkpoint]), [['vda', 'bitmap'], ['vdb', 'no']]);
  });

  it('reads what libvirt reports for a running backup and a checkpoint', () => {
    const active = parseActiveBackupXml(`<domainbackup mode='pull'><incremental>cp1</incremental><server transport='unix' socket='/s/n.sock'/><disks>
      <disk name='sda' backup='no'/>
      <disk name='sdb' backup='yes' type='file' backupmode='incremental' incremental='cp1' exportname='sdb' exportbitmap='backup-sdb' index='5'><driver type='qcow2'/><scratch file='/s/sdb'/></disk>
      </disks></domainbackup>`);
    assert.deepEqual(active, {
      mode: 'pull', incremental: 'cp1', socketPath: '/s/n.sock', tcp: undefined,
      disks: [{ target: 'sdb', exportName: 'sdb', mode: 'incremental', exportBitmap: 'backup-sdb', scratchFile: '/s/sdb' }],
    });
    const checkpoint = parseCheckpointXml(`<domaincheckpoint><name>cp2</name><parent><name>cp1</name></parent><creationTime>1795345300</creationTime>
      <disks><disk name='sda' checkpoint='no'/><disk name='sdb' checkpoint='bitmap' bitmap='cp2' size='65536'/></disks></domaincheckpoint>`);
    assert.equal(checkpoint.parent, 'cp1');
    assert.equal(checkpoint.creationTime, 1795345300);
    assert.deepEqual(checkpoint.disks[1], { target: 'sdb', checkpoint: 'bitmap', bitmap: 'cp2', size: 65536 });
    assert.throws(() => parseCheckpointXml('<domain/>'), BadInputError);
    assert.throws(() => parseCheckpointXml('<domaincheckpoint><name>x</name><creationTime>-1</creationTime></domaincheckpoint>'), BadInputError);
  });

  it('drops a checkpoint\'s parent for redefinition on a host that lacks it, and nothing else', () => {
    const xml = `<domaincheckpoint>
  <name>tresor-2</name>
  <parent>
    <name>tresor-1</name>
  </parent>
  <creationTime>1795345300</creationTime>
  <disks>
    <disk name='sda' checkpoint='bitmap' bitmap='tresor-2' size='65536'/>
  </disks>
  <domain type='qemu'>
    <name>vm</name>
    <description>&lt;parent&gt;&lt;name&gt;tresor-1&lt;/name&gt;&lt;/parent&gt;</description>
  </domain>
</domaincheckpoint>`;
    const stripped = checkpointXmlWithoutParent(xml);
    const before = parseCheckpointXml(xml);
    const after = parseCheckpointXml(stripped);
    assert.equal(before.parent, 'tresor-1');
    assert.equal(after.parent, undefined);
    assert.deepEqual({ ...after, xml: '' }, { ...before, parent: undefined, xml: '' });
    assert.equal(stripped, xml.replace(/  <parent>\n    <name>tresor-1<\/name>\n  <\/parent>\n/, ''));
    assert.match(stripped, /<description>&lt;parent&gt;/, 'the domain definition is untouched');
    const root = '<domaincheckpoint><name>a</name><creationTime>1</creationTime></domaincheckpoint>';
    assert.equal(checkpointXmlWithoutParent(root), root);
  });

  it('puts the NBD server on TCP with TLS for a remote host, and reads it back', () => {
    const disks = [{ target: 'vda', scratchFile: '/img/vda.qcow2.cp.scratch' }];
    const backup = parseXml(pullBackupXml({ tcp: { address: '10.0.0.7', port: 10850, tls: { ca: 'x' } }, disks }, ['vda']));
    assert.deepEqual({ ...childElements(backup, 'server')[0]!.attributes }, { transport: 'tcp', name: '10.0.0.7', port: '10850', tls: 'yes' });
    const clear = parseXml(pullBackupXml({ tcp: { address: 'host.example', port: 10809 }, disks }, ['vda']));
    assert.deepEqual({ ...childElements(clear, 'server')[0]!.attributes }, { transport: 'tcp', name: 'host.example', port: '10809' });
    // One server, never none or two.
    assert.throws(() => pullBackupXml({ disks }, ['vda']), BadInputError);
    assert.throws(() => pullBackupXml({ socketPath: '/s', tcp: { address: 'h', port: 1 }, disks }, ['vda']), BadInputError);
    const active = parseActiveBackupXml(`<domainbackup mode='pull'><server transport='tcp' tls='yes' name='10.0.0.7' port='10850'/><disks>
      <disk name='vda' backup='yes' type='file' backupmode='full' exportname='vda' index='3'><scratch file='/img/vda.qcow2.cp.scratch'/></disk></disks></domainbackup>`);
    assert.deepEqual(active.tcp, { address: '10.0.0.7', port: 10850, tls: true });
    assert.equal(active.socketPath, undefined);
  });

  it('tells remote libvirt URIs from local ones', () => {
    for (const [uri, host] of [
      ['qemu:///system', undefined], ['qemu+unix:///system?socket=/run/x/libvirt-sock', undefined], ['qemu:///session', undefined],
      ['qemu+ssh://root@kvm1.example:2222/system', 'kvm1.example'], ['qemu+tcp://10.1.2.3/system', '10.1.2.3'],
      ['qemu+tls://[fd00::5]:16514/system', 'fd00::5'], ['qemu://kvm2/system', 'kvm2'], ['qemu+ssh://kvm3/system?keyfile=/k', 'kvm3'],
    ] as const) assert.equal(remoteHostOf(uri), host, uri);
  });

  it('takes ssh settings from qemu+ssh URIs as virsh does, and quotes remote words', () => {
    assert.equal(sshTargetOf('qemu+tcp://h/system'), undefined);
    assert.equal(sshTargetOf('qemu:///system'), undefined);
    const t = sshTargetOf('qemu+ssh://admin@kvm1.example:2222/system?keyfile=/k/id&no_verify=1&command=/opt/ssh')!;
    assert.deepEqual({ ...t }, { host: 'kvm1.example', user: 'admin', port: 2222, keyfile: '/k/id', noVerify: true, command: '/opt/ssh', label: 'admin@kvm1.example:2222' });
    assert.deepEqual(sshArgs(t, ['-L', 'a:b']), ['-T', '-o', 'BatchMode=yes', '-e', 'none', '-p', '2222', '-l', 'admin', '-i', '/k/id', '-o', 'StrictHostKeyChecking=no', '-L', 'a:b', '--', 'kvm1.example']);
    assert.deepEqual(sshArgs(sshTargetOf('qemu+ssh://[fd00::7]/system')!), ['-T', '-o', 'BatchMode=yes', '-e', 'none', '--', 'fd00::7']);
    assert.equal(shellQuote('/var/lib/images/a.qcow2'), '/var/lib/images/a.qcow2');
    assert.equal(shellQuote("it's $(rm -rf /) `x` a b"), `'it'\\''s $(rm -rf /) \`x\` a b'`);
  });

  it('removes a recorded socket directory only when it is one Tresor makes', () => {
    const dir = remoteSocketDir();
    assert.ok(isRemoteSocketDir(dir), dir);
    assert.notEqual(remoteSocketDir(), dir);
    for (const bad of ['/', '/tmp', '/tmp/tresor-nbd-', '/tmp/tresor-nbd-0123456789abcdef/../..', '/tmp/tresor-nbd-0123456789abcdeg', ' /tmp/tresor-nbd-0123456789abcdef', '/tmp/tresor-nbd-0123456789abcdef\n/etc']) {
      assert.equal(isRemoteSocketDir(bad), false, JSON.stringify(bad));
    }
  });

  it('tries a few ports of the range from a random start, wrapping around; parses port ranges', () => {
    assert.deepEqual(portCandidates([10809, 10908], () => 0.999), [10908, 10809, 10810, 10811, 10812]);
    assert.deepEqual(portCandidates([10809, 10810], () => 0), [10809, 10810]);
    assert.deepEqual(portCandidates([7000, 7000]), [7000]);
    assert.deepEqual(parsePortRange('10809'), [10809, 10809]);
    assert.deepEqual(parsePortRange('10809-10908'), [10809, 10908]);
    for (const bad of ['0', '70000', '10-5', 'x', '1-2-3', '']) assert.throws(() => parsePortRange(bad), /--nbd-port/, bad);
  });

  it('accepts only plain checkpoint names', () => {
    validateCheckpointName('tresor-2026.01_x');
    for (const name of ['', '../x', 'a b', "a'b", '-x', 'x'.repeat(200)]) assert.throws(() => validateCheckpointName(name), BadInputError, name);
  });
});

describe('job statistics and events', () => {
  it('parses domjobinfo --rawstats', () => {
    assert.equal(parseJobStats('Job type: 0\n\n'), undefined);
    assert.deepEqual(parseJobStats('Job type: 2\n\noperation: 9\ntime_elapsed: 1024\ndisk_temp_used: 131072\ndisk_temp_total: 100663296\n'), {
      kind: 'backup', status: 'active', elapsedMs: 1024, scratchUsed: 131072, scratchTotal: 100663296, errorMessage: undefined,
    });
    assert.deepEqual(parseJobStats('Job type: 3\n\noperation: 9\ntime_elapsed: 34831\nsuccess: 1\nerrmsg: Operation canceled\n'), {
      kind: 'backup', status: 'completed', elapsedMs: 34831, scratchUsed: undefined, scratchTotal: undefined, errorMessage: 'Operation canceled',
    });
  });

  it('parses virsh event lines', () => {
    const event = parseEventLine("2026-11-22 11:02:32.786+0000: event 'lifecycle' for domain 'my vm': Stopped Shutdown");
    assert.deepEqual(event, { time: new Date('2026-11-22T11:02:32.786Z'), type: 'lifecycle', domain: 'my vm', detail: 'Stopped Shutdown' });
    assert.equal(parseEventLine('events received: 2'), undefined);
  });
});

describe('libvirt error classification', () => {
  const context = { uri: 'qemu:///system', domain: 'vm', operation: 'test' };
  // Real messages printed by virsh with libvirt 9.0 / QEMU 7.2.
  const cases: Array<[string, string]> = [
    ["error: failed to get domain 'nosuchdom'", 'domain-not-found'],
    ["error: Domain checkpoint not found: no domain checkpoint with matching name 'nosuch'", 'checkpoint-not-found'],
    ["error: Domain checkpoint not found: Checkpoint 'nosuch' for incremental backup of disk 'sdb' not found", 'checkpoint-not-found'],
    ['error: operation failed: domain moment cp2 already exists', 'checkpoint-exists'],
    ["error: checkpoint inconsistent: missing or broken bitmap 'cp1' for disk 'sda'", 'checkpoint-invalid'],
    ['error: Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)', 'backup-job-running'],
    ['error: Requested operation is not valid: no job is active on the domain', 'no-backup-job'],
    ["error: internal error: unable to execute QEMU command 'transaction': Can't make bitmap 'cpv2' persistent in 'libvirt-9-format': Cannot store dirty bitmaps in qcow2 v2 files", 'bitmaps-unsupported'],
    ['error: unsupported configuration: checkpoint for disk sdd unsupported for storage type raw', 'bitmaps-unsupported'],
    ["error: internal error: unable to execute QEMU command 'nbd-server-start': Failed to bind socket to /x/nbd.sock: Permission denied", 'scratch-not-writable'],
    ["error: internal error: unable to execute QEMU command 'nbd-server-start': Failed to find an available port: Address already in use", 'port-in-use'],
    ["error: internal error: unable to execute QEMU command 'object-add': Unable to access credentials /etc/pki/qemu/ca-cert.pem: No such file or directory", 'nbd-tls-unavailable'],
    ['error: argument unsupported: QEMU guest agent is not configured', 'agent-not-configured'],
    ['error: Guest agent is not responding: QEMU guest agent is not connected', 'agent-not-responding'],
    ['error: Requested operation is not valid: domain is not running', 'domain-not-running'],
    ["error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory", 'libvirt-unreachable'],
    ['error: something new', 'operation-failed'],
  ];
  for (const [message, code] of cases) {
    it(`${code}: ${message.slice(7, 70)}`, () => {
      const err = classifyLibvirtError(message, context);
      assert.equal(err.code, code);
      assert.ok(err.hint !== undefined && err.hint !== '');
      assert.equal(err.context.domain, 'vm');
      assert.ok(!String(err.context.libvirtMessage).startsWith('error:'));
    });
  }
});
