/**
 * Typed errors. Every error Tresor raises on purpose is a TresorError: it has a stable `code`
 * (for scripts and the JSON output), a message that says what is wrong, a `hint` that says what
 * to do, and `context` naming the objects involved (snapshot, disk, chunk, path...).
 * The CLI maps `exitCode` to its process exit status (documented in the README).
 */
export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  damaged: 3,
  locked: 4,
  notFound: 5,
  auth: 6,
  noSpace: 7,
  badInput: 8,
  interrupted: 130,
} as const;
export type ExitCodeValue = (typeof ExitCode)[keyof typeof ExitCode];

export interface ErrorDetails {
  hint?: string;
  context?: Record<string, unknown>;
  cause?: unknown;
  exitCode?: ExitCodeValue;
}

export class TresorError extends Error {
  readonly code: string;
  readonly hint: string | undefined;
  readonly context: Record<string, unknown>;
  readonly exitCode: ExitCodeValue;

  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'TresorError';
    this.code = code;
    this.hint = details.hint;
    this.context = details.context ?? {};
    this.exitCode = details.exitCode ?? ExitCode.failure;
  }

  toJSON(): Record<string, unknown> {
    return { code: this.code, message: this.message, hint: this.hint, context: this.context };
  }
}

export class UsageError extends TresorError {
  constructor(message: string, hint?: string) {
    super('usage', message, { hint, exitCode: ExitCode.usage });
  }
}

export class NotFoundError extends TresorError {
  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(code, message, { exitCode: ExitCode.notFound, ...details });
  }
}

/** Data in the repository failed an integrity, identity or authenticity check. */
export class DamageError extends TresorError {
  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(code, message, {
      exitCode: ExitCode.damaged,
      hint: 'run `tresor verify` to see everything that is damaged and which snapshots it affects',
      ...details,
    });
  }
}

/** Malformed input that is not part of the repository: disk images, user files, requests. */
export class BadInputError extends TresorError {
  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(code, message, { exitCode: ExitCode.badInput, ...details });
  }
}

export function isErrno(err: unknown, ...codes: string[]): err is NodeJS.ErrnoException {
  return err instanceof Error && typeof (err as NodeJS.ErrnoException).code === 'string'
    && codes.includes((err as NodeJS.ErrnoException).code as string);
}

export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
