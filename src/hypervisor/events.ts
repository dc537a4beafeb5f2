/**
 * Domain events from a long-running `virsh event --all --loop --timestamp`. Each event is one
 * line `TIME: event 'TYPE' for domain 'NAME': DETAIL`, sometimes followed by indented lines
 * (job-completed statistics), which are appended to `detail`.
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { EventWatch, HypervisorEvent } from './types.ts';

const EVENT_LINE = /^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d{4}): event '([^']+)' for domain '(.*?)'(?::\s?(.*))?$/;
/** Continuation lines arrive right after their event; wait this long before delivering it. */
const CONTINUATION_WAIT_MS = 30;

export function parseEventLine(line: string): HypervisorEvent | undefined {
  const match = EVENT_LINE.exec(line);
  if (!match) return undefined;
  const time = new Date((match[1] as string).replace(' ', 'T').replace(/([+-]\d\d)(\d\d)$/, '$1:$2'));
  return { time, type: match[2] as string, domain: match[3] as string, detail: (match[4] ?? '').trim() };
}

export function watchVirshEvents(uri: string, listener: (event: HypervisorEvent) => void, opts: { domain?: string; binary?: string } = {}): EventWatch {
  const args = ['-c', uri, 'event', '--all', '--loop', '--timestamp'];
  if (opts.domain !== undefined) args.push('--domain', opts.domain);
  const child = spawn(opts.binary ?? 'virsh', args, { env: { ...process.env, LC_ALL: 'C' }, stdio: ['ignore', 'pipe', 'ignore'] });
  child.on('error', () => undefined);
  let pending: HypervisorEvent | undefined;
  let timer: NodeJS.Timeout | undefined;
  const deliver = (): void => {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
    const event = pending;
    pending = undefined;
    if (event !== undefined) listener(event);
  };
  const lines = createInterface({ input: child.stdout });
  lines.on('line', (line) => {
    const event = parseEventLine(line);
    if (event !== undefined) {
      deliver();
      pending = event;
      timer = setTimeout(deliver, CONTINUATION_WAIT_MS);
    } else if (pending !== undefined && line.trim() !== '') {
      pending.detail += (pending.detail === '' ? '' : '\n') + line.trim();
    }
  });
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()));
  return {
    async close(): Promise<void> {
      deliver();
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}
