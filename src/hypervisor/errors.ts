/**
 * Errors of the hypervisor layer. Every failure names the libvirt URI, the domain and the
 * operation, keeps libvirt's own message in `context.libvirtMessage`, and carries a hint saying
 * what to do. `code` is one of HypervisorErrorCode so callers (the backup engine) can branch on
 * the cause: e.g. fall back to a full backup on 'checkpoint-not-found', or abort a leftover job
 * on 'backup-job-running'.
 */
import { ExitCode, TresorError, type ExitCodeValue } from '../util/errors.ts';

export type HypervisorErrorCode =
  | 'libvirt-unreachable'
  | 'libvirt-too-old'
  | 'domain-not-found'
  | 'domain-not-running'
  | 'domain-running'
  | 'checkpoint-not-found'
  | 'checkpoint-exists'
  | 'checkpoint-invalid'
  | 'bitmaps-unsupported'
  | 'backup-job-running'
  | 'no-backup-job'
  | 'scratch-not-writable'
  | 'port-in-use'
  | 'nbd-tls-unavailable'
  | 'disk-not-found'
  | 'disk-in-use'
  | 'agent-not-configured'
  | 'agent-not-responding'
  | 'agent-error'
  | 'operation-failed'
  | 'timeout';

export interface HypervisorErrorContext {
  uri?: string;
  domain?: string;
  operation: string;
  [key: string]: unknown;
}

export class HypervisorError extends TresorError {
  declare readonly code: HypervisorErrorCode;
  declare readonly context: HypervisorErrorContext;

  constructor(code: HypervisorErrorCode, message: string, details: { context: HypervisorErrorContext; hint?: string; cause?: unknown }) {
    super(code, message, { ...details, exitCode: exitCodeFor(code) });
    this.name = 'HypervisorError';
  }
}

function exitCodeFor(code: HypervisorErrorCode): ExitCodeValue {
  switch (code) {
    case 'domain-not-found':
    case 'checkpoint-not-found':
    case 'disk-not-found':
    case 'no-backup-job':
      return ExitCode.notFound;
    case 'backup-job-running':
    case 'disk-in-use':
      return ExitCode.locked;
    default:
      return ExitCode.failure;
  }
}

interface Classification {
  code: HypervisorErrorCode;
  pattern: RegExp;
  hint: (ctx: HypervisorErrorContext) => string;
}

/**
 * libvirt's messages (LC_ALL=C) mapped to causes. Order matters: the first match wins, so the
 * specific patterns come before the general ones.
 */
const CLASSIFICATIONS: Classification[] = [
  {
    code: 'libvirt-unreachable',
    pattern: /failed to connect to the hypervisor|Failed to connect socket|Cannot recv data|End of file while reading data|Connection refused|no connection driver available|authentication failed/i,
    hint: (ctx) => `check that libvirtd runs and that ${ctx.uri ?? 'the URI'} is right and reachable (try: virsh -c '${ctx.uri ?? ''}' list)`,
  },
  {
    code: 'domain-not-found',
    pattern: /Domain not found|failed to get domain/i,
    hint: () => 'check the name or UUID with `tresor vms` (or virsh list --all); a migrated VM is found on its new host',
  },
  {
    code: 'checkpoint-not-found',
    pattern: /Domain checkpoint not found|no domain checkpoint with matching name|checkpoint .* (?:does not exist|not found)/i,
    hint: () => 'the checkpoint metadata is gone; redefine it from a saved copy or take a full backup',
  },
  {
    code: 'checkpoint-invalid',
    pattern: /checkpoint inconsistent|missing or broken bitmap/i,
    hint: () => 'the bitmap behind this checkpoint is missing or broken: take a full backup and start a new checkpoint',
  },
  {
    code: 'checkpoint-exists',
    pattern: /(?:checkpoint|moment) .*already exists/i,
    hint: () => 'choose another checkpoint name, or delete the existing checkpoint first',
  },
  {
    code: 'backup-job-running',
    pattern: /another job|job .*(?:already|in progress)|already (?:a )?(?:running|active).*job|backup job .* already|cannot acquire state change lock/i,
    hint: (ctx) => `another job runs on the domain; if it is a leftover backup, abort it (virsh -c '${ctx.uri ?? ''}' domjobabort ${ctx.domain ?? 'DOMAIN'})`,
  },
  {
    code: 'no-backup-job',
    pattern: /no (?:active )?(?:backup )?job|no job is active/i,
    hint: () => 'there is no backup job on this domain (it may have ended or been aborted already)',
  },
  {
    code: 'bitmaps-unsupported',
    pattern: /Cannot store dirty bitmaps|qcow2 v2|qcow2 v3|persistent bitmap|unsupported (?:configuration|format).*(?:checkpoint|bitmap)|checkpoint.*(?:unsupported|not supported)|does not support (?:checkpoints|bitmaps)|bitmaps? .*(?:require|not supported)/i,
    hint: () => 'checkpoints need qcow2 v3 disks (persistent dirty bitmaps): convert with `qemu-img amend -o compat=1.1` or `qemu-img convert -O qcow2`, or exclude the disk',
  },
  {
    code: 'port-in-use',
    pattern: /Failed to find an available port|Address already in use/i,
    hint: () => 'another NBD server (another backup?) uses that port on the host: choose another with --nbd-port',
  },
  {
    code: 'nbd-tls-unavailable',
    pattern: /Unable to access credentials|tls-creds|x509/i,
    hint: (ctx) => `the host of ${ctx.uri ?? 'the domain'} has no TLS certificate for backup NBD servers: set backup_tls_x509_cert_dir in its /etc/libvirt/qemu.conf (ca-cert.pem, server-cert.pem, server-key.pem), or accept clear text with --nbd-tls off on a trusted network`,
  },
  {
    code: 'scratch-not-writable',
    pattern: /Permission denied|Could not open .*scratch|Read-only file system|cannot create.*scratch|Failed to bind socket/i,
    hint: () => 'the scratch directory (and NBD socket directory) must be writable by the user QEMU runs as (libvirt-qemu): e.g. chmod 1777 it',
  },
  {
    code: 'domain-not-running',
    pattern: /domain is not running|domain .* is not running/i,
    hint: () => 'start the domain, or back up its disk images directly while it is shut off',
  },
  {
    code: 'domain-running',
    pattern: /domain is already (?:running|active)/i,
    hint: () => 'the domain is already running',
  },
  {
    code: 'agent-not-configured',
    pattern: /guest agent is not configured/i,
    hint: () => 'add a virtio-serial channel named org.qemu.guest_agent.0 to the domain and install qemu-guest-agent in the guest',
  },
  {
    code: 'agent-not-responding',
    pattern: /Guest agent is not responding|agent is not connected|agent .* not (?:available|responding)|Guest agent not available/i,
    hint: () => 'check that qemu-guest-agent runs inside the guest (it may still be booting)',
  },
  {
    code: 'timeout',
    pattern: /timed out|timeout/i,
    hint: () => 'the operation did not finish in time; the host or guest may be overloaded',
  },
];

/** Turns libvirt's error text into a HypervisorError with the matching code and hint. */
export function classifyLibvirtError(libvirtMessage: string, context: HypervisorErrorContext, cause?: unknown): HypervisorError {
  const message = cleanLibvirtMessage(libvirtMessage);
  const match = CLASSIFICATIONS.find((classification) => classification.pattern.test(message));
  const code = match?.code ?? 'operation-failed';
  const subject = context.domain === undefined ? '' : ` on domain ${context.domain}`;
  return new HypervisorError(code, `${context.operation}${subject} failed: ${message}`, {
    context: { ...context, libvirtMessage: message },
    hint: match?.hint(context) ?? 'see the libvirt message; libvirtd\'s log has more detail',
    cause,
  });
}

/** Joins virsh's `error: ...` lines into one message. */
export function cleanLibvirtMessage(stderr: string): string {
  const lines = stderr.split('\n').map((line) => line.replace(/^error:\s*/, '').trim()).filter((line) => line !== '');
  return lines.join(': ') || 'no error message';
}
