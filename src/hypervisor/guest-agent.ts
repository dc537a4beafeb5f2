/**
 * The QEMU guest agent through libvirt. Freeze and thaw go through libvirt's own API
 * (`domfsfreeze`/`domfsthaw`) rather than raw agent commands, so libvirt knows the guest is
 * frozen; ping, info and status are raw agent commands with a bounded agent timeout.
 * An agent that is not configured (no channel) or not connected fails at once with a
 * HypervisorError ('agent-not-configured' / 'agent-not-responding').
 */
import { HypervisorError } from './errors.ts';
import type { GuestAgent, GuestAgentInfo } from './types.ts';
import type { Virsh } from './virsh.ts';

const DEFAULT_AGENT_TIMEOUT_SECONDS = 10;
/** Freezing waits for the guest's hooks and for dirty data to reach the disk. */
const FREEZE_TIMEOUT_MS = 120_000;

export class LibvirtGuestAgent implements GuestAgent {
  private readonly virsh: Virsh;
  private readonly domain: string;

  constructor(virsh: Virsh, domain: string) {
    this.virsh = virsh;
    this.domain = domain;
  }

  async ping(timeoutSeconds = DEFAULT_AGENT_TIMEOUT_SECONDS): Promise<void> {
    await this.command('guest-ping', timeoutSeconds);
  }

  async info(): Promise<GuestAgentInfo> {
    const reply = await this.command('guest-info');
    const value = reply as { version?: unknown; supported_commands?: Array<{ name?: unknown; enabled?: unknown }> };
    return {
      version: typeof value.version === 'string' ? value.version : 'unknown',
      supportedCommands: (Array.isArray(value.supported_commands) ? value.supported_commands : [])
        .filter((command) => command.enabled !== false && typeof command.name === 'string')
        .map((command) => command.name as string),
    };
  }

  async freeze(mountpoints: string[] = []): Promise<number> {
    const args = ['domfsfreeze', this.domain, ...mountpoints.flatMap((mountpoint) => ['--mountpoint', mountpoint])];
    const out = await this.virsh.run(args, { operation: 'fsfreeze', domain: this.domain, timeoutMs: FREEZE_TIMEOUT_MS });
    return countFrom(out, /Froze (\d+) filesystem/, 'fsfreeze', this.virsh.uri, this.domain);
  }

  async thaw(): Promise<number> {
    const out = await this.virsh.run(['domfsthaw', this.domain], { operation: 'fsthaw', domain: this.domain, timeoutMs: FREEZE_TIMEOUT_MS });
    return countFrom(out, /Thawed (\d+) filesystem/, 'fsthaw', this.virsh.uri, this.domain);
  }

  async freezeStatus(): Promise<'frozen' | 'thawed'> {
    const status = await this.command('guest-fsfreeze-status');
    if (status !== 'frozen' && status !== 'thawed') {
      throw new HypervisorError('agent-error', `guest agent of ${this.domain} reported an unknown freeze status ${JSON.stringify(status)}`, {
        context: { uri: this.virsh.uri, domain: this.domain, operation: 'guest-fsfreeze-status' },
      });
    }
    return status;
  }

  /** Runs a raw agent command without arguments and returns its `return` value. */
  private async command(name: string, timeoutSeconds = DEFAULT_AGENT_TIMEOUT_SECONDS): Promise<unknown> {
    const out = await this.virsh.run(
      ['qemu-agent-command', this.domain, JSON.stringify({ execute: name }), '--timeout', String(timeoutSeconds)],
      { operation: name, domain: this.domain, timeoutMs: timeoutSeconds * 1000 + 15_000 },
    );
    try {
      return (JSON.parse(out) as { return?: unknown }).return;
    } catch (err) {
      throw new HypervisorError('agent-error', `guest agent of ${this.domain} answered ${name} with something that is not JSON`, {
        context: { uri: this.virsh.uri, domain: this.domain, operation: name, reply: out.slice(0, 200) },
        cause: err,
      });
    }
  }
}

function countFrom(out: string, pattern: RegExp, operation: string, uri: string, domain: string): number {
  const match = pattern.exec(out);
  if (!match) {
    throw new HypervisorError('agent-error', `${operation} on ${domain}: unexpected reply '${out.trim()}'`, { context: { uri, domain, operation } });
  }
  return Number(match[1]);
}
