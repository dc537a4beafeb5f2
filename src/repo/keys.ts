/**
 * Repository keys: a random master key, wrapped once per key slot.
 *
 * The master key never changes for the life of a repository, so adding or removing a passphrase
 * only adds or deletes a small `keys/<slot>` object: no data is re-encrypted. A slot wraps the
 * master key with AES-256-GCM under a key derived from the passphrase by scrypt (memory-hard:
 * offline guessing is expensive), or, for the printable recovery key (256 random bits, no need
 * to slow guessing down), by HKDF-SHA256. The slot's AAD binds it to the repository id, so a slot
 * copied from another repository does not open this one.
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes, scrypt as scryptCb, timingSafeEqual } from 'node:crypto';
import { promisify } from 'node:util';
import { TresorError, ExitCode } from '../util/errors.ts';

const scrypt = promisify(scryptCb) as (pw: string | Buffer, salt: Buffer, len: number, opts: object) => Promise<Buffer>;

export interface MasterKey {
  /** AES-256-GCM key for every blob. */
  encKey: Buffer;
  /** HMAC-SHA256 key that makes chunk identifiers keyed. */
  idKey: Buffer;
}

export interface ScryptParams { name: 'scrypt'; N: number; r: number; p: number; salt: string }
export interface HkdfParams { name: 'hkdf-sha256'; salt: string }

export interface KeySlot {
  format: 'tresor-key';
  version: 1;
  kind: 'passphrase' | 'recovery';
  created: string;
  host: string;
  label?: string;
  kdf: ScryptParams | HkdfParams;
  /** base64(nonce[12] || ciphertext[64] || tag[16]) */
  wrapped: string;
}

export const DEFAULT_SCRYPT = { N: 1 << 15, r: 8, p: 1 } as const;

export function generateMasterKey(): MasterKey {
  return { encKey: randomBytes(32), idKey: randomBytes(32) };
}

function slotAad(repoId: string): Buffer {
  return Buffer.from(`tresor-key-slot-v1:${repoId}`);
}

async function deriveSlotKey(secret: string | Buffer, kdf: ScryptParams | HkdfParams): Promise<Buffer> {
  const salt = Buffer.from(kdf.salt, 'base64');
  if (kdf.name === 'scrypt') {
    if (!(kdf.N >= 1024 && kdf.N <= 1 << 22 && (kdf.N & (kdf.N - 1)) === 0 && kdf.r >= 1 && kdf.r <= 32 && kdf.p >= 1 && kdf.p <= 16)) {
      throw new TresorError('bad-key-slot', `key slot has unreasonable scrypt parameters N=${kdf.N} r=${kdf.r} p=${kdf.p}`, {
        hint: 'the key slot was tampered with or is damaged; use another passphrase or the recovery key',
      });
    }
    return scrypt(secret, salt, 32, { N: kdf.N, r: kdf.r, p: kdf.p, maxmem: 256 * kdf.N * kdf.r + (32 << 20) });
  }
  return Buffer.from(hkdfSync('sha256', secret, salt, Buffer.from('tresor-recovery-key-v1'), 32));
}

export async function wrapMasterKey(
  master: MasterKey, repoId: string, kind: 'passphrase' | 'recovery', secret: string | Buffer,
  opts: { host: string; label?: string; scrypt?: { N: number; r: number; p: number } },
): Promise<KeySlot> {
  const salt = randomBytes(16).toString('base64');
  const kdf: ScryptParams | HkdfParams = kind === 'passphrase'
    ? { name: 'scrypt', ...(opts.scrypt ?? DEFAULT_SCRYPT), salt }
    : { name: 'hkdf-sha256', salt };
  const key = await deriveSlotKey(secret, kdf);
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(slotAad(repoId));
  const ct = Buffer.concat([c.update(Buffer.concat([master.encKey, master.idKey])), c.final()]);
  return {
    format: 'tresor-key', version: 1, kind, created: new Date().toISOString(), host: opts.host,
    ...(opts.label !== undefined ? { label: opts.label } : {}),
    kdf, wrapped: Buffer.concat([nonce, ct, c.getAuthTag()]).toString('base64'),
  };
}

/** Returns the master key, or undefined when the secret does not open this slot. */
export async function unwrapMasterKey(slot: KeySlot, repoId: string, secret: string | Buffer): Promise<MasterKey | undefined> {
  const key = await deriveSlotKey(secret, slot.kdf);
  const raw = Buffer.from(slot.wrapped, 'base64');
  if (raw.length !== 12 + 64 + 16) throw new TresorError('bad-key-slot', 'key slot has a wrapped key of the wrong length', { hint: 'the key slot is damaged; use another passphrase or the recovery key' });
  const d = createDecipheriv('aes-256-gcm', key, raw.subarray(0, 12));
  d.setAAD(slotAad(repoId));
  d.setAuthTag(raw.subarray(76));
  try {
    const pt = Buffer.concat([d.update(raw.subarray(12, 76)), d.final()]);
    return { encKey: pt.subarray(0, 32), idKey: pt.subarray(32, 64) };
  } catch {
    return undefined;
  }
}

export function parseKeySlot(data: Buffer, name: string): KeySlot {
  let slot: KeySlot;
  try {
    slot = JSON.parse(data.toString('utf8')) as KeySlot;
  } catch (err) {
    throw new TresorError('bad-key-slot', `key slot ${name} is not valid JSON`, { cause: err, hint: 'the key slot is damaged; remove it with `tresor key remove` using another passphrase' });
  }
  if (slot?.format !== 'tresor-key' || slot.version !== 1 || typeof slot.wrapped !== 'string' || typeof slot.kdf?.salt !== 'string') {
    throw new TresorError('bad-key-slot', `key slot ${name} is not a Tresor v1 key slot`, { hint: 'the key slot is damaged or from a newer version of Tresor' });
  }
  return slot;
}

// Recovery keys: 32 random bytes printed as Crockford base32 in groups of 4, e.g. "7K2M-…".
const B32 = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

export function generateRecoveryKey(): { secret: Buffer; printable: string } {
  const secret = randomBytes(32);
  return { secret, printable: formatRecoveryKey(secret) };
}

export function formatRecoveryKey(secret: Buffer): string {
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of secret) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    value &= (1 << bits) - 1;
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out.match(/.{1,4}/g)!.join('-');
}

export function parseRecoveryKey(text: string): Buffer {
  const clean = text.toUpperCase().replace(/[\s-]/g, '').replace(/O/g, '0').replace(/[IL]/g, '1');
  let bits = 0;
  let value = 0;
  const out: number[] = [];
  for (const ch of clean) {
    const v = B32.indexOf(ch);
    if (v < 0) throw new TresorError('bad-recovery-key', `the recovery key contains an invalid character ${JSON.stringify(ch)}`, { hint: 'type the recovery key exactly as printed (groups of 4 characters, dashes optional)', exitCode: ExitCode.auth });
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 255);
      bits -= 8;
      value &= (1 << bits) - 1;
    }
  }
  if (out.length !== 32) throw new TresorError('bad-recovery-key', `the recovery key has ${clean.length} characters, expected 52`, { hint: 'type the whole recovery key as printed', exitCode: ExitCode.auth });
  return Buffer.from(out);
}

export function looksLikeRecoveryKey(secret: string): boolean {
  return /^([0-9A-Z]{4}-){12}[0-9A-Z]{4}$/i.test(secret.trim());
}

export function constantTimeEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
