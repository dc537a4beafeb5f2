/**
 * jbd2 journal replay, in memory. A filesystem that was not cleanly unmounted (every crash-
 * consistent snapshot of a running guest) may hold its newest metadata only in the journal. The
 * kernel would replay it at mount; we cannot write to a snapshot, so the replay becomes an overlay:
 * a map from filesystem block to the journal block holding its newest committed copy, applied to
 * every read.
 *
 * Format (big-endian, Documentation/filesystems/ext4/journal.rst): a journal superblock, then a
 * circular log of descriptor blocks (tags naming the filesystem blocks whose copies follow),
 * revoke blocks and commit blocks, each with a 12-byte header (magic, type, transaction sequence).
 * Recovery follows the kernel's three passes: scan for the last committed transaction, collect
 * revocations, then map every tagged block not revoked by the same or a later transaction.
 * Transactions whose commit (or, with checksums v2/v3, whose descriptor or commit checksum)
 * is missing or wrong are not replayed; a data block whose tag checksum fails is skipped.
 */
import { crc32cUpdate } from '../util/crc32c.ts';

const JBD2_MAGIC = 0xc03b3998;
const BLOCK_TYPE = { descriptor: 1, commit: 2, superblockV1: 3, superblockV2: 4, revoke: 5 } as const;
const INCOMPAT = { revoke: 0x1, bit64: 0x2, asyncCommit: 0x4, csumV2: 0x8, csumV3: 0x10, fastCommit: 0x20 } as const;
const SUPPORTED_INCOMPAT = INCOMPAT.revoke | INCOMPAT.bit64 | INCOMPAT.asyncCommit | INCOMPAT.csumV2 | INCOMPAT.csumV3
  | INCOMPAT.fastCommit;
const TAG_FLAG = { escape: 1, sameUuid: 2, lastTag: 8 } as const;
/** Upper bound on transactions scanned: a journal holds far fewer. */
const MAX_TRANSACTIONS = 1 << 20;

export interface JournalAccess {
  blockSize: number;
  /** Number of blocks of the journal (its inode size / block size). */
  journalBlocks: number;
  /** Reads journal block `n` (logical block of the journal inode). */
  readJournalBlock(n: number): Promise<Buffer>;
  /** Filesystem blocks a tag may name: [0, blocksCount). */
  blocksCount: number;
}

export interface JournalOverlay {
  /** Filesystem block → where its newest committed copy is in the journal. */
  blocks: Map<number, { journalBlock: number; escaped: boolean }>;
  transactions: number;
  warnings: string[];
}

interface JournalSuper {
  blockSize: number;
  maxLen: number;
  /** End of the circular log: maxLen minus the fast-commit area. */
  logEnd: number;
  first: number;
  sequence: number;
  start: number;
  incompat: number;
  csumSeed: number;
}

interface Tag {
  fsBlock: number;
  flags: number;
  checksum: number;
}

/** Replays the journal into an overlay; undefined when the journal is clean. Throws only on I/O errors. */
export async function replayJournal(access: JournalAccess): Promise<JournalOverlay | undefined> {
  const warnings: string[] = [];
  const sb = parseJournalSuper(await access.readJournalBlock(0), access, warnings);
  if (!sb) return { blocks: new Map(), transactions: 0, warnings };
  if (sb.start === 0) return undefined;
  const log = new LogReader(access, sb);
  const committed = await scanPass(log, sb, warnings);
  if (committed.length === 0) return { blocks: new Map(), transactions: 0, warnings };
  const revoked = await revokePass(log, sb, committed);
  const blocks = await replayPass(log, sb, committed, revoked, access, warnings);
  return { blocks, transactions: committed.length, warnings };
}

function parseJournalSuper(block: Buffer, access: JournalAccess, warnings: string[]): JournalSuper | undefined {
  const type = block.readUInt32BE(4);
  if (block.readUInt32BE(0) !== JBD2_MAGIC || (type !== BLOCK_TYPE.superblockV1 && type !== BLOCK_TYPE.superblockV2)) {
    warnings.push('the journal superblock is damaged: the journal was not replayed');
    return undefined;
  }
  const v2 = type === BLOCK_TYPE.superblockV2;
  const maxLen = block.readUInt32BE(0x10);
  const sb: JournalSuper = {
    blockSize: block.readUInt32BE(0x0c),
    maxLen,
    logEnd: maxLen,
    first: block.readUInt32BE(0x14),
    sequence: block.readUInt32BE(0x18),
    start: block.readUInt32BE(0x1c),
    incompat: v2 ? block.readUInt32BE(0x28) : 0,
    csumSeed: 0,
  };
  if (sb.blockSize !== access.blockSize || sb.maxLen > access.journalBlocks || sb.first < 1 || sb.first >= sb.maxLen
    || (sb.start !== 0 && (sb.start < sb.first || sb.start >= sb.maxLen))) {
    warnings.push('the journal superblock has inconsistent geometry: the journal was not replayed');
    return undefined;
  }
  if ((sb.incompat & ~SUPPORTED_INCOMPAT) !== 0) {
    warnings.push(`the journal uses unknown features 0x${(sb.incompat & ~SUPPORTED_INCOMPAT).toString(16)}: not replayed`);
    return undefined;
  }
  if (sb.incompat & (INCOMPAT.csumV2 | INCOMPAT.csumV3)) {
    const copy = Buffer.from(block.subarray(0, 1024));
    copy.writeUInt32BE(0, 0xfc);
    if (crc32cUpdate(0xffffffff, copy) !== block.readUInt32BE(0xfc)) {
      warnings.push('the journal superblock checksum does not match: the journal was not replayed');
      return undefined;
    }
    sb.csumSeed = crc32cUpdate(0xffffffff, block.subarray(0x30, 0x40));
  }
  if (sb.incompat & INCOMPAT.fastCommit) {
    // The fast-commit area sits at the end of the journal; its records are not replayed here.
    sb.logEnd = sb.maxLen - (block.readUInt32BE(0x54) || 256);
    if (sb.logEnd <= sb.first || (sb.start !== 0 && sb.start >= sb.logEnd)) {
      warnings.push('the journal fast-commit area is inconsistent: the journal was not replayed');
      return undefined;
    }
    if (sb.start !== 0) warnings.push('fast-commit journal records are not replayed: the newest changes may be missing');
  }
  return sb;
}

function hasChecksums(sb: JournalSuper): boolean {
  return (sb.incompat & (INCOMPAT.csumV2 | INCOMPAT.csumV3)) !== 0;
}

function tagBytes(sb: JournalSuper): number {
  if (sb.incompat & INCOMPAT.csumV3) return 16;
  let size = 12;
  if (sb.incompat & INCOMPAT.csumV2) size += 2;
  return sb.incompat & INCOMPAT.bit64 ? size : size - 4;
}

/** Walks the circular log area [first, maxLen). */
class LogReader {
  private readonly access: JournalAccess;
  private readonly sb: JournalSuper;

  constructor(access: JournalAccess, sb: JournalSuper) {
    this.access = access;
    this.sb = sb;
  }

  advance(position: number, count: number): number {
    const span = this.sb.logEnd - this.sb.first;
    return this.sb.first + ((position - this.sb.first + count) % span);
  }

  read(position: number): Promise<Buffer> {
    return this.access.readJournalBlock(position);
  }
}

interface Transaction {
  sequence: number;
  /** Log positions of its descriptor and revoke blocks. */
  descriptors: number[];
  revokes: number[];
}

function parseTags(block: Buffer, sb: JournalSuper): Tag[] | undefined {
  const size = tagBytes(sb);
  const end = block.length - (hasChecksums(sb) ? 4 : 0);
  const tags: Tag[] = [];
  let at = 12;
  while (at + size <= end) {
    const v3 = (sb.incompat & INCOMPAT.csumV3) !== 0;
    const low = block.readUInt32BE(at);
    const flags = v3 ? block.readUInt32BE(at + 4) : block.readUInt16BE(at + 6);
    const high = sb.incompat & INCOMPAT.bit64 ? block.readUInt32BE(at + 8) : 0;
    const checksum = v3 ? block.readUInt32BE(at + 12) : block.readUInt16BE(at + 4);
    tags.push({ fsBlock: high * 2 ** 32 + low, flags, checksum });
    at += size + (flags & TAG_FLAG.sameUuid ? 0 : 16);
    if (flags & TAG_FLAG.lastTag) return tags;
  }
  return tags.length > 0 ? tags : undefined;
}

function blockTailOk(block: Buffer, sb: JournalSuper): boolean {
  if (!hasChecksums(sb)) return true;
  const stored = block.readUInt32BE(block.length - 4);
  const copy = Buffer.from(block);
  copy.writeUInt32BE(0, copy.length - 4);
  return crc32cUpdate(sb.csumSeed, copy) === stored;
}

function commitOk(block: Buffer, sb: JournalSuper): boolean {
  if (!hasChecksums(sb)) return true;
  // h_chksum[0] of the commit header, at byte 16.
  const stored = block.readUInt32BE(16);
  const copy = Buffer.from(block);
  copy.writeUInt32BE(0, 16);
  return crc32cUpdate(sb.csumSeed, copy) === stored;
}

/** Pass 1: find the committed transactions, from s_start with sequence s_sequence on. */
async function scanPass(log: LogReader, sb: JournalSuper, warnings: string[]): Promise<Transaction[]> {
  const committed: Transaction[] = [];
  let position = sb.start;
  let sequence = sb.sequence;
  let current: Transaction = { sequence, descriptors: [], revokes: [] };
  let blocksInLog = 0;
  const logSpan = sb.logEnd - sb.first;
  while (committed.length < MAX_TRANSACTIONS && blocksInLog < logSpan) {
    const block = await log.read(position);
    if (block.readUInt32BE(0) !== JBD2_MAGIC || block.readUInt32BE(8) !== sequence) break;
    const type = block.readUInt32BE(4);
    if (type === BLOCK_TYPE.descriptor) {
      if (!blockTailOk(block, sb)) {
        warnings.push(`journal transaction ${sequence}: descriptor checksum mismatch, not replayed`);
        break;
      }
      const tags = parseTags(block, sb);
      if (!tags) break;
      current.descriptors.push(position);
      position = log.advance(position, 1 + tags.length);
      blocksInLog += 1 + tags.length;
    } else if (type === BLOCK_TYPE.revoke) {
      current.revokes.push(position);
      position = log.advance(position, 1);
      blocksInLog++;
    } else if (type === BLOCK_TYPE.commit) {
      if (!commitOk(block, sb)) {
        warnings.push(`journal transaction ${sequence}: commit checksum mismatch, not replayed`);
        break;
      }
      committed.push(current);
      sequence = (sequence + 1) >>> 0;
      current = { sequence, descriptors: [], revokes: [] };
      position = log.advance(position, 1);
      blocksInLog++;
    } else {
      break;
    }
  }
  return committed;
}

/** Pass 2: block → newest transaction that revoked it. */
async function revokePass(log: LogReader, sb: JournalSuper, committed: Transaction[]): Promise<Map<number, number>> {
  const revoked = new Map<number, number>();
  const recordSize = sb.incompat & INCOMPAT.bit64 ? 8 : 4;
  for (const tx of committed) {
    for (const position of tx.revokes) {
      const block = await log.read(position);
      if (!blockTailOk(block, sb)) continue;
      const used = Math.min(block.readUInt32BE(12), block.length - (hasChecksums(sb) ? 4 : 0));
      for (let at = 16; at + recordSize <= used; at += recordSize) {
        const fsBlock = recordSize === 8 ? block.readUInt32BE(at) * 2 ** 32 + block.readUInt32BE(at + 4) : block.readUInt32BE(at);
        revoked.set(fsBlock, Math.max(revoked.get(fsBlock) ?? 0, tx.sequence));
      }
    }
  }
  return revoked;
}

/** Pass 3: map each tagged block to its newest copy, unless revoked by a later transaction. */
async function replayPass(log: LogReader, sb: JournalSuper, committed: Transaction[], revoked: Map<number, number>,
  access: JournalAccess, warnings: string[]): Promise<Map<number, { journalBlock: number; escaped: boolean }>> {
  const blocks = new Map<number, { journalBlock: number; escaped: boolean }>();
  for (const tx of committed) {
    for (const position of tx.descriptors) {
      const tags = parseTags(await log.read(position), sb) ?? [];
      let dataPosition = position;
      for (const tag of tags) {
        dataPosition = log.advance(dataPosition, 1);
        const revokedBy = revoked.get(tag.fsBlock);
        if (revokedBy !== undefined && revokedBy >= tx.sequence) continue;
        if (tag.fsBlock >= access.blocksCount) {
          warnings.push(`journal transaction ${tx.sequence} names block ${tag.fsBlock}, outside the filesystem: skipped`);
          continue;
        }
        if (hasChecksums(sb) && !(await dataChecksumOk(log, sb, tx.sequence, dataPosition, tag))) {
          warnings.push(`journal transaction ${tx.sequence}: copy of block ${tag.fsBlock} fails its checksum: skipped`);
          continue;
        }
        blocks.set(tag.fsBlock, { journalBlock: dataPosition, escaped: (tag.flags & TAG_FLAG.escape) !== 0 });
      }
    }
  }
  return blocks;
}

async function dataChecksumOk(log: LogReader, sb: JournalSuper, sequence: number, position: number, tag: Tag): Promise<boolean> {
  const data = await log.read(position);
  const seq = Buffer.alloc(4);
  seq.writeUInt32BE(sequence);
  const csum = crc32cUpdate(crc32cUpdate(sb.csumSeed, seq), data);
  return sb.incompat & INCOMPAT.csumV3 ? csum === tag.checksum : (csum & 0xffff) === tag.checksum;
}

/** Applies the escape rule: a logged block whose first word was the jbd2 magic had it zeroed. */
export function unescapeJournalBlock(data: Buffer, escaped: boolean): Buffer {
  if (!escaped) return data;
  const copy = Buffer.from(data);
  copy.writeUInt32BE(JBD2_MAGIC, 0);
  return copy;
}
