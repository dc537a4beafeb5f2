/**
 * Small named metadata objects (blob type 7, "meta"): snapshot notes, damage records, garbage
 * collection plans, sync state (docs/repository-format.md §Metadata objects).
 *
 * The context id bound into the blob is the keyed name id of the object's own name,
 * `nameId("meta", name)`: a meta object cannot be copied to another name (say, an old note
 * replayed under a newer time, or one snapshot's note moved to another) without failing
 * authentication.
 */
import { BlobType, type CodecKeys, decodeBlob, encodeBlob, nameId } from './codec.ts';

export function metaContext(keys: CodecKeys, name: string): Buffer {
  return nameId(keys, 'meta', name);
}

export function encodeMetaObject(keys: CodecKeys, name: string, plaintext: Uint8Array): Buffer {
  return encodeBlob(keys, BlobType.meta, metaContext(keys, name), plaintext);
}

export function decodeMetaObject(keys: CodecKeys, name: string, stored: Uint8Array, maxLength: number): Buffer {
  return decodeBlob(keys, BlobType.meta, metaContext(keys, name), stored, { maxLength }, () => ({
    what: `metadata object ${name}`, context: { object: name },
  }));
}

/** A sortable UTC time stamp with milliseconds for object names: 20261122T101500123Z. */
export function nameTime(d: Date): string {
  return d.toISOString().replace(/[-:.]/g, '');
}

export function parseNameTime(s: string): Date | undefined {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(\d{3})Z$/.exec(s);
  if (!m) return undefined;
  const t = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], +m[7]);
  return Number.isFinite(t) ? new Date(t) : undefined;
}
