/**
 * Loop devices and mounts (kernel or FUSE) for tests that fill images through a mounted
 * filesystem, with cleanup that runs even when a test fails: every loop device and mount point
 * is registered when created and released by `releaseAll()` (call it from `after`), newest first.
 *
 * FUSE filesystems are mounted on a loop device (fuseblk), so that `umount` waits for the
 * daemon to flush and exit before the image is read.
 */
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run } from './tools.ts';

export class MountTracker {
  private readonly mountPoints: string[] = [];
  private readonly loops: string[] = [];

  /** Attaches an image file to a free loop device. */
  async attachLoop(image: string): Promise<string> {
    const dev = (await run('losetup', ['--find', '--show', image])).trim();
    this.loops.push(dev);
    return dev;
  }

  /**
   * Detaches a loop device and waits until it is gone. The kernel only defers the detach (and
   * returns success) while the device is still in use, e.g. by a filesystem that another mount
   * namespace still holds: the image's last writes may not be in the file yet.
   */
  async detachLoop(dev: string): Promise<void> {
    const i = this.loops.indexOf(dev);
    if (i >= 0) this.loops.splice(i, 1);
    await run('losetup', ['-d', dev]);
    const backing = `/sys/block/${basename(dev)}/loop/backing_file`;
    for (const started = Date.now(); existsSync(backing);) {
      if (Date.now() - started > 30_000) throw new Error(`${dev} is still attached 30 s after losetup -d: something else holds it (${readFileSync(backing, 'utf8').trim()})`);
      await sleep(50);
    }
  }

  /** Runs a mount command (`mount`, `ntfs-3g`, `mount.exfat-fuse`...) whose last argument is the mount point. */
  async mount(cmd: string, args: string[], mountPoint: string): Promise<void> {
    mkdirSync(mountPoint, { recursive: true });
    await run(cmd, [...args, mountPoint]);
    this.mountPoints.push(mountPoint);
  }

  async unmount(mountPoint: string): Promise<void> {
    const i = this.mountPoints.indexOf(mountPoint);
    if (i >= 0) this.mountPoints.splice(i, 1);
    await run('umount', [mountPoint]);
  }

  /**
   * Mounts `image` with the kernel driver on a loop device of its own, runs `fill`, then
   * unmounts and detaches it. Not `mount -o loop`: its loop device clears itself in the
   * background after `umount`, and a reader of the image file right after could still find
   * metadata the loop device had not written yet (seen as CRC errors under load).
   */
  withLoopMount(image: string, mountPoint: string, fill: (dir: string) => Promise<void>): Promise<void> {
    return this.#onLoop(image, 'mount', [], mountPoint, fill);
  }

  /** Mounts a FUSE filesystem on a loop device of `image`, runs `fill`, then unmounts and detaches. */
  withFuse(image: string, cmd: string, options: string[], mountPoint: string, fill: (dir: string) => Promise<void>): Promise<void> {
    return this.#onLoop(image, cmd, options, mountPoint, fill);
  }

  async #onLoop(image: string, cmd: string, options: string[], mountPoint: string, fill: (dir: string) => Promise<void>): Promise<void> {
    const loop = await this.attachLoop(image);
    try {
      await this.mount(cmd, [...options, loop], mountPoint);
      try {
        await fill(mountPoint);
      } finally {
        await this.unmount(mountPoint);
      }
    } finally {
      await this.detachLoop(loop);
    }
  }

  /** Unmounts and detaches whatever is still registered; failures are collected, not thrown early. */
  async releaseAll(): Promise<void> {
    const problems: string[] = [];
    for (const mountPoint of this.mountPoints.splice(0).reverse()) {
      await run('umount', ['-l', mountPoint]).catch((err: Error) => problems.push(err.message));
    }
    for (const dev of this.loops.splice(0).reverse()) {
      await run('losetup', ['-d', dev]).catch((err: Error) => problems.push(err.message));
    }
    if (problems.length > 0) throw new Error(`cleanup failed: ${problems.join('; ')}`);
  }
}
