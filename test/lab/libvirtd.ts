/**
 * Makes sure the host's libvirt daemon answers on qemu:///system. The lab machines (and CI) have
 * no systemd, so when nothing answers we start `virtlogd -d` and `libvirtd -d` ourselves (both
 * refuse to start twice through their pid files, so concurrent callers are harmless) and wait
 * until the daemon answers. They stay running afterwards like the system services they are.
 *
 * Without udev, /dev/kvm stays root:root 0600 instead of Debian's root:kvm 0660. libvirt 9.0 then
 * probes QEMU with KVM, finds KVM unusable for the qemu user at every later lookup, and re-probes
 * QEMU forever: every `virsh define` hangs. We give /dev/kvm the owner and mode Debian's udev
 * rule would (the lab's domains still use TCG).
 */
import { execFile } from 'node:child_process';
import { chmodSync, chownSync, existsSync, readFileSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

export const SYSTEM_URI = 'qemu:///system';
const START_TIMEOUT_MS = 60_000;

let ready: Promise<void> | undefined;

/** Resolves once qemu:///system answers; starts the daemons when needed; throws when it cannot. */
export function ensureLibvirtd(): Promise<void> {
  ready ??= startIfNeeded().catch((err: unknown) => {
    ready = undefined;
    throw err;
  });
  return ready;
}

async function startIfNeeded(): Promise<void> {
  giveKvmDeviceDebianPermissions();
  const first = await probe();
  if (first === undefined) return;
  if (!/Failed to connect socket|No such file|Connection refused/i.test(first)) {
    throw new Error(`libvirt at ${SYSTEM_URI} answers with an error: ${first}`);
  }
  // Both daemons exit at once with an error when another instance holds their pid file.
  await runIgnoringFailure('virtlogd', ['-d']);
  await runIgnoringFailure('libvirtd', ['-d']);
  const deadline = Date.now() + START_TIMEOUT_MS;
  let last: string | undefined = first;
  while (Date.now() < deadline) {
    last = await probe();
    if (last === undefined) return;
    await sleep(250);
  }
  throw new Error(`libvirtd did not come up within ${START_TIMEOUT_MS} ms (${last}); is libvirt-daemon-system installed (scripts/setup.sh)? See /var/log/libvirt/`);
}

function giveKvmDeviceDebianPermissions(): void {
  const device = '/dev/kvm';
  if (!existsSync(device)) return;
  const kvmGroup = /^kvm:[^:]*:(\d+):/m.exec(readFileSync('/etc/group', 'utf8'));
  if (kvmGroup === null) return;
  const gid = Number(kvmGroup[1]);
  const info = statSync(device);
  if (info.gid !== gid) chownSync(device, info.uid, gid);
  if ((info.mode & 0o060) !== 0o060) chmodSync(device, (info.mode & 0o777) | 0o060);
}

/** undefined when the daemon answers, else virsh's error text. */
function probe(): Promise<string | undefined> {
  return new Promise((resolve, reject) => {
    execFile('virsh', ['-c', SYSTEM_URI, 'version'], { timeout: 30_000, env: { ...process.env, LC_ALL: 'C' } }, (err, _stdout, stderr) => {
      if (err === null) return resolve(undefined);
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        return reject(new Error('virsh is not installed: run scripts/setup.sh (Debian packages libvirt-clients, libvirt-daemon-system)'));
      }
      resolve(stderr.trim() || err.message);
    });
  });
}

function runIgnoringFailure(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 30_000 }, (err) => {
      if (err !== null && (err as NodeJS.ErrnoException).code === 'ENOENT') {
        reject(new Error(`${cmd} is not installed: run scripts/setup.sh (Debian package libvirt-daemon-system)`));
      } else resolve();
    });
  });
}
