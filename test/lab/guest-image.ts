/**
 * Builds the lab's tiny bootable test guest from Debian packages (recipe: ../shared/LAB.md §2):
 * a Debian kernel (downloaded with `apt-get download`, unpacked, never installed) and an
 * initramfs that is the whole root filesystem: busybox-static as init, the host's qemu-ga with
 * the libraries ldd lists, the kernel modules for virtio disks/console and ext4 (dependency
 * closure read from each module's .modinfo, loaded with insmod in order), an fsfreeze hook and
 * /sbin/shutdown for agent shutdown.
 *
 * Guest behaviour is chosen per domain on the kernel command line, so one image serves every
 * test (see `guestCmdline`). The image is cached under the lab directory (default
 * /var/tmp/tresor-lab, override TRESOR_LAB_DIR) in a directory named by a hash of every input,
 * so it is rebuilt only when the kernel package, busybox, qemu-ga, a library or this file's
 * scripts change. Concurrent builders are safe: each builds in a private directory and renames
 * it into place; the loser of the race discards its copy.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, realpath, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { buildCpio, type CpioEntry } from './cpio.ts';

export interface GuestImage {
  kernel: string;
  initrd: string;
  /** Kernel release, e.g. 6.1.0-56-amd64. */
  kernelRelease: string;
  /** Milliseconds this call took (download + build, or ~0 when cached). */
  buildMs: number;
  /** True when the image was already built for the same inputs. */
  cached: boolean;
}

/** Modules the guest loads (their dependencies are added automatically). */
const GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_scsi', 'sd_mod', 'virtio_console', 'crc32c_generic', 'ext4'];
/** Parts of the kernel package to unpack: a superset of the modules' dependency closure. */
const KERNEL_PACKAGE_GLOBS = [
  './boot/vmlinuz-*',
  './lib/modules/*/kernel/drivers/virtio/*',
  './lib/modules/*/kernel/drivers/block/*',
  './lib/modules/*/kernel/drivers/scsi/*.ko',
  './lib/modules/*/kernel/drivers/char/*',
  './lib/modules/*/kernel/fs/ext4/*',
  './lib/modules/*/kernel/fs/jbd2/*',
  './lib/modules/*/kernel/fs/mbcache.ko',
  './lib/modules/*/kernel/lib/*',
  './lib/modules/*/kernel/crypto/*',
  './lib/modules/*/kernel/block/*',
];
const BUSYBOX = '/bin/busybox';
const QEMU_GA = '/usr/sbin/qemu-ga';

export function labDir(): string {
  return process.env.TRESOR_LAB_DIR ?? '/var/tmp/tresor-lab';
}

// ---------------------------------------------------------------------------------------------
// Guest scripts. Changing any of them changes the cache key, so the image is rebuilt.
// ---------------------------------------------------------------------------------------------

/**
 * PID 1. Kernel command line parameters (all optional):
 *   tresor.disks=N         wait (up to 10 s) until N disks (vd*, sd*) exist before mounting
 *   tresor.agent=0|1       run qemu-ga (default 1)
 *   tresor.writer=0|1      run the writer (default 0)
 *   tresor.interval_ms=MS  writer pause between lines (default 200; 0 = as fast as possible)
 *   tresor.writer_both=1   the writer appends each line to /data/log and /data2/log, then syncs
 * Every whole disk that mounts as ext4 is mounted in the order of its address (SCSI disks by
 * host:channel:target:lun, then virtio disks by their virtio device): the first on /data, the next
 * on /data2, /data3... That is libvirt's target order (sda is unit 0, sdb unit 1). The guest's own
 * names are not: the kernel probes SCSI disks asynchronously and names them in the order the probes
 * finish, which nothing guarantees (in the boots watched, LUN 1 was the guest's sdc). Progress
 * goes to the serial console as `tresor-guest: ...`.
 */
const INIT_SCRIPT = `#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/run /var/log
say() { echo "tresor-guest: $*" > /dev/console; }

disks=0; agent=1; writer=0; interval_ms=200; writer_both=0
for word in $(cat /proc/cmdline); do
  case "$word" in
    tresor.disks=*) disks=\${word#*=} ;;
    tresor.agent=*) agent=\${word#*=} ;;
    tresor.writer=*) writer=\${word#*=} ;;
    tresor.interval_ms=*) interval_ms=\${word#*=} ;;
    tresor.writer_both=*) writer_both=\${word#*=} ;;
  esac
done

for module in $(cat /etc/modules.order); do
  insmod "/lib/modules/$module" || say "insmod $module failed"
done

count_disks() { ls /sys/block | grep -cE '^(sd|vd)[a-z]+$'; }
tries=0
while [ "$(count_disks)" -lt "$disks" ] && [ $tries -lt 100 ]; do usleep 100000; tries=$((tries + 1)); done
# "ADDRESS NAME" per disk, in address order: 0:0:0:1 sdc (sd), virtio3 vda (vd).
disks_by_address() {
  for dev in $(ls /sys/block | grep -E '^sd[a-z]+$'); do
    echo "$(basename "$(readlink /sys/block/$dev/device)") $dev"
  done | sort -t: -k1,1n -k2,2n -k3,3n -k4,4n
  for dev in $(ls /sys/block | grep -E '^vd[a-z]+$'); do
    echo "$(basename "$(readlink /sys/block/$dev/device)") $dev"
  done | sort -k1.7n
}
say "disks: $(disks_by_address | tr '\\n' ' ')"

n=0
for dev in $(disks_by_address | cut -d ' ' -f 2); do
  if [ $n -eq 0 ]; then mountpoint=/data; else mountpoint=/data$((n + 1)); fi
  mkdir -p $mountpoint
  if mount -t ext4 -o noatime /dev/$dev $mountpoint 2>/dev/null; then
    say "mounted /dev/$dev on $mountpoint"
    n=$((n + 1))
  else
    rmdir $mountpoint
  fi
done

if [ "$agent" = 1 ]; then
  mkdir -p /dev/virtio-ports /run/qga
  for port in /sys/class/virtio-ports/*; do
    [ -f "$port/name" ] && ln -sf "/dev/\${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
  done
  (
    while true; do
      qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -F/etc/qemu/fsfreeze-hook -t /run/qga -f /run/qga/qemu-ga.pid
      say "qemu-ga exited with $?"
      sleep 1
    done
  ) < /dev/null > /dev/console 2>&1 &
  say "agent started"
fi

if [ "$writer" = 1 ] && [ -d /data ]; then
  (
    seq=$(tail -n 1 /data/log 2>/dev/null | cut -d ' ' -f 1)
    case "$seq" in ''|*[!0-9]*) seq=0 ;; esac
    while true; do
      seq=$((seq + 1))
      line="$seq $(date +%s)"
      echo "$line" >> /data/log
      if [ "$writer_both" = 1 ] && [ -d /data2 ]; then echo "$line" >> /data2/log; fi
      sync
      [ "$interval_ms" -gt 0 ] && usleep $((interval_ms * 1000))
    done
  ) < /dev/null > /dev/console 2>&1 &
  echo $! > /run/writer.pid
  say "writer started"
fi

say "ready"
while true; do wait; sleep 60; done
`;

/** Runs on freeze (before the filesystems freeze) and on thaw (after): visible on the console and in /data/hooks.log. */
const FSFREEZE_HOOK = `#!/bin/sh
echo "tresor-guest: fsfreeze-hook $1" > /dev/console
if [ -d /data ]; then echo "$1 $(date +%s)" >> /data/hooks.log; sync; fi
exit 0
`;

/** qemu-ga runs `/sbin/shutdown -h -P +0 MSG` (or -r): stop the writer, unmount cleanly, power off. */
const SHUTDOWN_SCRIPT = `#!/bin/sh
echo "tresor-guest: shutdown $*" > /dev/console
[ -f /run/writer.pid ] && kill "$(cat /run/writer.pid)" 2>/dev/null
sync
for m in $(grep ' /data' /proc/mounts | cut -d ' ' -f 2 | sort -r); do umount "$m" || echo "tresor-guest: umount $m failed" > /dev/console; done
sync
case " $* " in *" -r "*) reboot -f ;; *) poweroff -f ;; esac
`;

// ---------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------

/** Builds the guest image if needed and returns its kernel and initrd paths. */
export async function ensureGuestImage(): Promise<GuestImage> {
  const started = Date.now();
  const root = labDir();
  await mkdir(root, { recursive: true, mode: 0o755 });
  await chmod(root, 0o755);
  const kernelDeb = await ensureKernelPackage(join(root, 'debs'));
  const qemuGaFiles = await qemuGaClosure();
  const key = await cacheKey(kernelDeb, qemuGaFiles);
  const imageDir = join(root, `guest-${key}`);
  const kernel = join(imageDir, 'vmlinuz');
  const initrd = join(imageDir, 'initrd.cpio');
  const releaseFile = join(imageDir, 'release');
  if (existsSync(releaseFile)) {
    return { kernel, initrd, kernelRelease: (await readFile(releaseFile, 'utf8')).trim(), buildMs: Date.now() - started, cached: true };
  }
  const workDir = join(root, `.build-${process.pid}-${randomBytes(4).toString('hex')}`);
  try {
    await mkdir(workDir);
    const kernelRelease = await buildInto(workDir, kernelDeb, qemuGaFiles);
    try {
      await rename(join(workDir, 'out'), imageDir);
    } catch (err) {
      // Another process built the same image meanwhile: use theirs.
      if (!existsSync(releaseFile)) throw err;
    }
    return { kernel, initrd, kernelRelease, buildMs: Date.now() - started, cached: false };
  } finally {
    await rm(workDir, { recursive: true, force: true });
  }
}

async function buildInto(workDir: string, kernelDeb: string, qemuGaFiles: string[]): Promise<string> {
  const unpacked = join(workDir, 'kernel');
  await mkdir(unpacked);
  await sh(`dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards ${KERNEL_PACKAGE_GLOBS.map((g) => `'${g}'`).join(' ')}`, [kernelDeb, unpacked]);
  const vmlinuz = (await readdir(join(unpacked, 'boot'))).find((name) => name.startsWith('vmlinuz-'));
  if (vmlinuz === undefined) throw new Error(`no vmlinuz in ${kernelDeb}`);
  const kernelRelease = vmlinuz.slice('vmlinuz-'.length);
  const moduleRoot = join(unpacked, 'lib/modules', kernelRelease);
  const modules = await resolveModules(moduleRoot, GUEST_MODULES);

  const entries: CpioEntry[] = [];
  const dirs = new Set<string>();
  const addDir = (path: string): void => {
    if (path === '/' || path === '' || dirs.has(path)) return;
    addDir(dirname(path));
    dirs.add(path);
    entries.push({ type: 'dir', path });
  };
  const addFile = (path: string, data: Buffer, mode = 0o644): void => {
    addDir(dirname(path));
    entries.push({ type: 'file', path, data, mode });
  };
  for (const dir of ['/proc', '/sys', '/dev', '/run', '/tmp', '/data', '/etc/qemu', '/usr/bin', '/usr/sbin']) addDir(dir);
  entries.push({ type: 'chardev', path: '/dev/console', major: 5, minor: 1 });
  entries.push({ type: 'chardev', path: '/dev/null', major: 1, minor: 3, mode: 0o666 });

  addFile('/bin/busybox', await readFile(BUSYBOX), 0o755);
  const applets = (await run(BUSYBOX, ['--list'])).split('\n').filter((name) => /^[a-z0-9_.[-]+$/.test(name) && name !== 'busybox' && name !== 'shutdown');
  for (const applet of applets.sort()) entries.push({ type: 'symlink', path: `/bin/${applet}`, target: 'busybox' });
  addDir('/sbin');
  addFile('/init', Buffer.from(INIT_SCRIPT), 0o755);
  addFile('/sbin/shutdown', Buffer.from(SHUTDOWN_SCRIPT), 0o755);
  addFile('/etc/qemu/fsfreeze-hook', Buffer.from(FSFREEZE_HOOK), 0o755);
  for (const file of qemuGaFiles) addFile(file, await readFile(await realpath(file)), 0o755);

  for (const module of modules) addFile(`/lib/modules/${module.relativePath}`, await readFile(module.path));
  addFile('/etc/modules.order', Buffer.from(modules.map((module) => module.relativePath).join('\n') + '\n'));

  const out = join(workDir, 'out');
  await mkdir(out, { mode: 0o755 });
  await writeFile(join(out, 'initrd.cpio'), buildCpio(entries), { mode: 0o644 });
  await rename(join(unpacked, 'boot', vmlinuz), join(out, 'vmlinuz'));
  await chmod(join(out, 'vmlinuz'), 0o644);
  await writeFile(join(out, 'release'), `${kernelRelease}\n`, { mode: 0o644 });
  return kernelRelease;
}

interface ModuleFile {
  name: string;
  path: string;
  /** Path below the kernel's module directory, e.g. kernel/fs/ext4/ext4.ko. */
  relativePath: string;
}

/** The modules plus their `depends=` closure, ordered so every module follows its dependencies. */
async function resolveModules(moduleRoot: string, wanted: string[]): Promise<ModuleFile[]> {
  const byName = new Map<string, ModuleFile>();
  for (const entry of await readdir(moduleRoot, { recursive: true })) {
    if (!entry.endsWith('.ko')) continue;
    const name = normaliseModuleName(entry.slice(entry.lastIndexOf('/') + 1, -3));
    byName.set(name, { name, path: join(moduleRoot, entry), relativePath: relative(moduleRoot, join(moduleRoot, entry)) });
  }
  const ordered: ModuleFile[] = [];
  const visiting = new Set<string>();
  const done = new Set<string>();
  const visit = async (rawName: string, neededBy: string): Promise<void> => {
    const name = normaliseModuleName(rawName);
    if (done.has(name)) return;
    if (visiting.has(name)) throw new Error(`kernel module dependency cycle at ${name}`);
    const module = byName.get(name);
    if (module === undefined) throw new Error(`kernel module ${name} (needed by ${neededBy}) is not in the unpacked part of the kernel package: extend KERNEL_PACKAGE_GLOBS`);
    visiting.add(name);
    for (const dependency of moduleDependencies(await readFile(module.path))) await visit(dependency, name);
    visiting.delete(name);
    done.add(name);
    ordered.push(module);
  };
  for (const name of wanted) await visit(name, 'the guest');
  return ordered;
}

function normaliseModuleName(name: string): string {
  return name.replace(/-/g, '_');
}

/** Reads `depends=a,b` from the module's .modinfo strings (NUL-separated key=value pairs). */
function moduleDependencies(ko: Buffer): string[] {
  const marker = Buffer.from('\0depends=');
  const at = ko.indexOf(marker);
  if (at < 0) return [];
  const start = at + marker.length;
  const end = ko.indexOf(0, start);
  const value = ko.subarray(start, end < 0 ? start : end).toString('latin1');
  return value === '' ? [] : value.split(',');
}

/** qemu-ga and every library it loads (as listed by ldd), as absolute paths in the host. */
async function qemuGaClosure(): Promise<string[]> {
  if (!existsSync(QEMU_GA)) throw new Error(`${QEMU_GA} is missing: install the Debian package qemu-guest-agent (scripts/setup.sh)`);
  if (!existsSync(BUSYBOX)) throw new Error(`${BUSYBOX} is missing: install the Debian package busybox-static (scripts/setup.sh)`);
  const files = [QEMU_GA];
  for (const line of (await run('ldd', [QEMU_GA])).split('\n')) {
    const match = /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(line);
    if (match) files.push(match[1] as string);
  }
  return files.sort();
}

async function cacheKey(kernelDeb: string, qemuGaFiles: string[]): Promise<string> {
  const hash = createHash('sha256');
  hash.update(`${kernelDeb}\n${GUEST_MODULES.join(',')}\n${KERNEL_PACKAGE_GLOBS.join(',')}\n`);
  // This file and the cpio writer hold the scripts and the build recipe.
  hash.update(await readFile(new URL(import.meta.url))).update(await readFile(new URL('./cpio.ts', import.meta.url)));
  for (const file of [BUSYBOX, ...qemuGaFiles]) {
    const info = await stat(file);
    hash.update(`${file} ${info.size} ${info.mtimeMs}\n`);
  }
  return hash.digest('hex').slice(0, 16);
}

/**
 * The kernel package that linux-image-amd64 depends on, downloaded once into `debDir`.
 * Needs apt's package lists (`apt-get update`, which scripts/setup.sh runs on a fresh machine).
 */
async function ensureKernelPackage(debDir: string): Promise<string> {
  await mkdir(debDir, { recursive: true, mode: 0o755 });
  const depends = await run('apt-cache', ['depends', 'linux-image-amd64']).catch((err: Error) => {
    throw new Error(`cannot resolve linux-image-amd64 (run apt-get update first): ${err.message}`);
  });
  const match = /Depends:\s*(linux-image-[0-9][^\s]*-amd64)/.exec(depends);
  if (!match) throw new Error(`apt-cache depends linux-image-amd64 names no kernel package (run apt-get update):\n${depends}`);
  const packageName = match[1] as string;
  const existing = (await readdir(debDir)).find((name) => name.startsWith(`${packageName}_`) && name.endsWith('.deb'));
  if (existing !== undefined) return join(debDir, existing);
  const downloadDir = join(debDir, `.download-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(downloadDir, { mode: 0o777 });
  try {
    await run('apt-get', ['download', '-q', packageName], { cwd: downloadDir, timeoutMs: 300_000 });
    const deb = (await readdir(downloadDir)).find((name) => name.endsWith('.deb'));
    if (deb === undefined) throw new Error(`apt-get download ${packageName} produced no .deb`);
    await rename(join(downloadDir, deb), join(debDir, deb));
    return join(debDir, deb);
  } finally {
    await rm(downloadDir, { recursive: true, force: true });
  }
}

function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd: opts.cwd, timeout: opts.timeoutMs ?? 120_000, maxBuffer: 64 << 20, env: { ...process.env, LC_ALL: 'C' } },
      (err, stdout, stderr) => {
        if (err) {
          reject(new Error((err as NodeJS.ErrnoException).code === 'ENOENT'
            ? `${cmd} is not installed: run scripts/setup.sh`
            : `${cmd} ${args.join(' ')} failed: ${stderr.trim() || err.message}`));
        } else resolve(stdout);
      });
  });
}

function sh(script: string, args: string[]): Promise<string> {
  return run('sh', ['-ec', script, 'sh', ...args], { timeoutMs: 300_000 });
}
