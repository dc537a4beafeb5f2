/** Starts a separate live process that holds an exclusive repository lock. */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export class LockHolder {
  readonly #child: ChildProcess;

  private constructor(child: ChildProcess) {
    this.#child = child;
  }

  static async start(location: string, args: string[], env: Record<string, string>): Promise<LockHolder> {
    const endpointAt = args.indexOf('--s3-endpoint');
    const endpoint = endpointAt >= 0 ? args[endpointAt + 1] : '';
    const child = spawn(process.execPath, [fileURLToPath(new URL('./hold-lock.ts', import.meta.url)), location, endpoint], {
      env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (d: Buffer) => {
        if (d.toString().includes('locked')) resolve();
      });
      child.on('exit', (code) => reject(new Error(`lock holder exited with ${code}`)));
    });
    return new LockHolder(child);
  }

  async stop(): Promise<void> {
    const done = new Promise((r) => this.#child.on('exit', r));
    this.#child.stdin!.end();
    await done;
  }
}
