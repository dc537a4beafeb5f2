/**
 * Snapshot notes: the mutable state of an immutable snapshot — whether it is protected from
 * pruning, and the result of its last verification (docs/repository-format.md §Snapshot notes).
 *
 * Manifests never change, so state lives in small meta objects
 * `notes/<snapshot name id hex>/<time>-<random>`, one per change, each a partial update ("patch").
 * The state of a snapshot is its patches applied in (time, name) order: newest wins, field by
 * field. Writing a note is a create like every other write (no overwrite, so an append-only
 * credential may write notes); deleting a snapshot deletes its manifest, then its notes; garbage
 * collection removes notes whose snapshot is gone and merges long note histories into one note.
 */
import { randomBytes } from 'node:crypto';
import type { TresorError } from '../util/errors.ts';
import { mapLimit } from '../util/concurrency.ts';
import type { Repository } from './repository.ts';
import { decodeMetaObject, encodeMetaObject, nameTime, parseNameTime } from './meta-object.ts';

export interface VerificationRecord {
  /** When the verification finished (ISO 8601). */
  time: string;
  ok: boolean;
  /** True when chunk data was read and checked, false for a structure-only check. */
  readData: boolean;
  /** Damaged objects that affect this snapshot. */
  damaged: number;
}

export interface NotePatch {
  protected?: boolean;
  verification?: VerificationRecord;
}

export interface SnapshotState {
  protected: boolean;
  verification: VerificationRecord | undefined;
}

interface NoteDocument {
  format: 'tresor-note';
  version: 1;
  snapshot: string;
  time: string;
  set: NotePatch;
}

const MAX_NOTE = 64 << 10;
const NOTE_NAME = /^notes\/([0-9a-f]{64})\/(\d{8}T\d{9}Z)-([0-9a-f]{16})$/;
/** A snapshot with more notes than this gets them merged into one by garbage collection. */
export const COMPACT_NOTES_ABOVE = 4;

export function emptyState(): SnapshotState {
  return { protected: false, verification: undefined };
}

/** `notes/<hex>/` for a snapshot: its manifest's name id (keyed, so names stay hidden). */
export function notePrefix(repo: Repository, snapshot: string): string {
  return `notes/${repo.snapshotKey(snapshot).slice('snapshots/'.length)}/`;
}

export async function writeNote(repo: Repository, snapshot: string, patch: NotePatch, at = new Date()): Promise<string> {
  const name = `${notePrefix(repo, snapshot)}${nameTime(at)}-${randomBytes(8).toString('hex')}`;
  const doc: NoteDocument = { format: 'tresor-note', version: 1, snapshot, time: at.toISOString(), set: patch };
  await repo.store.create(name, encodeMetaObject(repo.keys, name, Buffer.from(JSON.stringify(doc))));
  return name;
}

function validPatch(p: unknown): p is NotePatch {
  if (typeof p !== 'object' || p === null) return false;
  const x = p as NotePatch;
  if (x.protected !== undefined && typeof x.protected !== 'boolean') return false;
  const v = x.verification;
  return v === undefined || (typeof v === 'object' && v !== null && typeof v.time === 'string' && typeof v.ok === 'boolean'
    && typeof v.readData === 'boolean' && Number.isSafeInteger(v.damaged));
}

/** Reads and checks one note; the snapshot it names must be the one its object name says. */
async function readNote(repo: Repository, name: string, snapshot: string): Promise<NoteDocument> {
  const plain = decodeMetaObject(repo.keys, name, await repo.store.read(name), MAX_NOTE);
  const doc = JSON.parse(plain.toString('utf8')) as NoteDocument;
  if (doc?.format !== 'tresor-note' || doc.version !== 1 || doc.snapshot !== snapshot || !validPatch(doc.set)) {
    throw new Error(`note ${name} is not a valid note of snapshot ${snapshot}`);
  }
  return doc;
}

/** Note object names per snapshot name-id hex, each list sorted oldest first. */
export async function listNotes(repo: Repository): Promise<Map<string, string[]>> {
  const byKey = new Map<string, string[]>();
  for await (const b of repo.store.list('notes/')) {
    const m = NOTE_NAME.exec(b.name);
    if (!m) continue;
    let list = byKey.get(m[1]);
    if (!list) byKey.set(m[1], (list = []));
    list.push(b.name);
  }
  for (const list of byKey.values()) list.sort(compareNoteNames);
  return byKey;
}

function compareNoteNames(a: string, b: string): number {
  const ta = a.slice(a.lastIndexOf('/') + 1);
  const tb = b.slice(b.lastIndexOf('/') + 1);
  return ta < tb ? -1 : ta > tb ? 1 : 0;
}

export interface StatesResult {
  states: Map<string, SnapshotState>;
  /** Notes that could not be read (damaged or tampered with); they are ignored. */
  damaged: Array<{ object: string; error: string }>;
}

/** The current state of each of `snapshots` (names), from their notes. */
export async function readSnapshotStates(repo: Repository, snapshots: string[], listing?: Map<string, string[]>): Promise<StatesResult> {
  const notes = listing ?? await listNotes(repo);
  const states = new Map<string, SnapshotState>();
  const damaged: StatesResult['damaged'] = [];
  await mapLimit(snapshots, 16, async (snapshot) => {
    const key = notePrefix(repo, snapshot).slice('notes/'.length, -1);
    const state = emptyState();
    states.set(snapshot, state);
    const names = notes.get(key) ?? [];
    const docs = await mapLimit(names, 8, async (name) => {
      try {
        return await readNote(repo, name, snapshot);
      } catch (err) {
        if ((err as TresorError).code !== 'blob-not-found') damaged.push({ object: name, error: (err as Error).message });
        return undefined;
      }
    });
    for (const doc of docs) if (doc) applyPatch(state, doc.set);
  });
  return { states, damaged };
}

export function applyPatch(state: SnapshotState, patch: NotePatch): void {
  if (patch.protected !== undefined) state.protected = patch.protected;
  if (patch.verification !== undefined) state.verification = patch.verification;
}

export async function readSnapshotState(repo: Repository, snapshot: string): Promise<SnapshotState> {
  const prefix = notePrefix(repo, snapshot);
  const names: string[] = [];
  for await (const b of repo.store.list(prefix)) if (NOTE_NAME.test(b.name)) names.push(b.name);
  names.sort(compareNoteNames);
  const listing = new Map([[prefix.slice('notes/'.length, -1), names]]);
  return (await readSnapshotStates(repo, [snapshot], listing)).states.get(snapshot)!;
}

/** Deletes every note of a snapshot (after its manifest is gone). */
export async function deleteNotes(repo: Repository, snapshot: string): Promise<number> {
  const names: string[] = [];
  for await (const b of repo.store.list(notePrefix(repo, snapshot))) names.push(b.name);
  await mapLimit(names, 8, (n) => repo.store.delete(n));
  return names.length;
}

/**
 * Housekeeping for garbage collection: removes notes of snapshots that no longer exist (left by a
 * prune interrupted between deleting a manifest and its notes), and merges the notes of a
 * snapshot that has many into one. The merged note carries the time of the newest note it
 * replaces, so a note written meanwhile by someone else (later) still wins; it is durable before
 * the notes it replaces are deleted, so a crash in between only leaves equivalent duplicates.
 */
export async function tidyNotes(
  repo: Repository, existingKeys: Set<string>, nameOf: (key: string) => Promise<string | undefined>,
): Promise<{ orphansDeleted: number; merged: number }> {
  const listing = await listNotes(repo);
  let orphansDeleted = 0;
  let merged = 0;
  for (const [key, names] of listing) {
    if (!existingKeys.has(key)) {
      // A snapshot committed after the caller listed manifests is not an orphan.
      if (await repo.store.stat(`snapshots/${key}`)) continue;
      await mapLimit(names, 8, (n) => repo.store.delete(n));
      orphansDeleted += names.length;
      continue;
    }
    if (names.length <= COMPACT_NOTES_ABOVE) continue;
    const snapshot = await nameOf(key);
    if (snapshot === undefined) continue;
    const state = (await readSnapshotStates(repo, [snapshot], new Map([[key, names]]))).states.get(snapshot)!;
    const last = names.at(-1)!;
    const newest = parseNameTime(last.slice(last.lastIndexOf('/') + 1).split('-')[0]) ?? new Date();
    const patch: NotePatch = { protected: state.protected, ...(state.verification ? { verification: state.verification } : {}) };
    await writeNote(repo, snapshot, patch, newest);
    await mapLimit(names, 8, (n) => repo.store.delete(n));
    merged++;
  }
  return { orphansDeleted, merged };
}
