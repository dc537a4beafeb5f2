/**
 * The NBD wire protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
 * constants and pure encoders/decoders. No I/O here; src/nbd/client.ts drives the socket.
 *
 * Everything a server sends is untrusted. Every decoder checks the length it is given against the
 * structure it expects, and every length field the server controls is checked against a cap
 * BEFORE anything is allocated or read, so a broken or malicious server produces a clear
 * NbdError, never an absurd allocation, an out-of-bounds read or a hang.
 */
import { ExitCode, TresorError } from '../util/errors.ts';
import type { ErrorDetails } from '../util/errors.ts';

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/** 'NBDMAGIC': first 8 bytes from every server. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': newstyle negotiation; also prefixes every option the client sends. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Oldstyle negotiation (unsupported: no export names, no options). */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
export const NBD_OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

export const HandshakeFlag = {
  fixedNewstyle: 1 << 0,
  noZeroes: 1 << 1,
} as const;

export const ClientFlag = {
  fixedNewstyle: 1 << 0,
  noZeroes: 1 << 1,
} as const;

export const Option = {
  exportName: 1,
  abort: 2,
  list: 3,
  startTls: 5,
  info: 6,
  go: 7,
  structuredReply: 8,
  listMetaContext: 9,
  setMetaContext: 10,
} as const;

export const OptionReply = {
  ack: 1,
  server: 2,
  info: 3,
  metaContext: 4,
} as const;

/** Option error replies have bit 31 set. */
export const OPTION_REPLY_ERROR_BIT = 0x80000000;
export const OptionReplyError = {
  unsup: 0x80000001,
  policy: 0x80000002,
  invalid: 0x80000003,
  platform: 0x80000004,
  tlsReqd: 0x80000005,
  unknown: 0x80000006,
  shutdown: 0x80000007,
  blockSizeReqd: 0x80000008,
  tooBig: 0x80000009,
} as const;

const OPTION_REPLY_ERROR_NAMES: Record<number, string> = {
  [OptionReplyError.unsup]: 'NBD_REP_ERR_UNSUP',
  [OptionReplyError.policy]: 'NBD_REP_ERR_POLICY',
  [OptionReplyError.invalid]: 'NBD_REP_ERR_INVALID',
  [OptionReplyError.platform]: 'NBD_REP_ERR_PLATFORM',
  [OptionReplyError.tlsReqd]: 'NBD_REP_ERR_TLS_REQD',
  [OptionReplyError.unknown]: 'NBD_REP_ERR_UNKNOWN',
  [OptionReplyError.shutdown]: 'NBD_REP_ERR_SHUTDOWN',
  [OptionReplyError.blockSizeReqd]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [OptionReplyError.tooBig]: 'NBD_REP_ERR_TOO_BIG',
};

export function optionReplyErrorName(replyType: number): string {
  return OPTION_REPLY_ERROR_NAMES[replyType] ?? `option error 0x${replyType.toString(16)}`;
}

export const InfoType = {
  export: 0,
  name: 1,
  description: 2,
  blockSize: 3,
} as const;

/** Transmission flags (16 bits, sent with the export size). */
export const TransmissionFlag = {
  hasFlags: 1 << 0,
  readOnly: 1 << 1,
  sendFlush: 1 << 2,
  sendFua: 1 << 3,
  rotational: 1 << 4,
  sendTrim: 1 << 5,
  sendWriteZeroes: 1 << 6,
  sendDf: 1 << 7,
  canMultiConn: 1 << 8,
  sendResize: 1 << 9,
  sendCache: 1 << 10,
  sendFastZero: 1 << 11,
} as const;

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

export const Command = {
  read: 0,
  write: 1,
  disc: 2,
  flush: 3,
  trim: 4,
  cache: 5,
  writeZeroes: 6,
  blockStatus: 7,
} as const;

export const CommandFlag = {
  fua: 1 << 0,
  noHole: 1 << 1,
  df: 1 << 2,
  reqOne: 1 << 3,
  fastZero: 1 << 4,
} as const;

export const ReplyFlag = {
  done: 1 << 0,
} as const;

export const ReplyType = {
  none: 0,
  offsetData: 1,
  offsetHole: 2,
  blockStatus: 5,
  error: 0x8001,
  errorOffset: 0x8002,
} as const;

/** Structured reply chunk types with bit 15 set are errors, even ones we do not know. */
export const REPLY_TYPE_ERROR_BIT = 0x8000;

/** `base:allocation` status flags. */
export const AllocationFlag = {
  hole: 1 << 0,
  zero: 1 << 1,
} as const;

/** `qemu:dirty-bitmap:NAME` status flag (QEMU docs/interop/nbd.rst). */
export const DIRTY_BITMAP_FLAG_DIRTY = 1 << 0;

export const BASE_ALLOCATION = 'base:allocation';
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** Error values the protocol defines (they are Linux errno values). */
const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

export function errnoName(value: number): string {
  return ERRNO_NAMES[value] ?? `errno ${value}`;
}

// ---------------------------------------------------------------------------------------------
// Sizes and caps
// ---------------------------------------------------------------------------------------------

export const GREETING_LENGTH = 18;
export const OPTION_REPLY_HEADER_LENGTH = 20;
export const EXPORT_NAME_REPLY_LENGTH = 10;
export const EXPORT_NAME_REPLY_PADDING = 124;
export const REQUEST_LENGTH = 28;
export const SIMPLE_REPLY_HEADER_LENGTH = 16;
export const STRUCTURED_REPLY_HEADER_LENGTH = 20;

/** Strings (names, messages) are at most 4096 bytes by the spec. */
export const MAX_STRING_LENGTH = 4096;
/** No option reply we understand is bigger than a string plus a few fields. */
export const MAX_OPTION_REPLY_PAYLOAD = 64 * 1024;
/** No structured reply chunk may make us allocate more than this. */
export const MAX_REPLY_PAYLOAD = 64 * 1024 * 1024;
/**
 * Block status payloads: qemu sends at most 1 MiB of descriptors per reply, nbdkit at most 1 Mi
 * descriptors (8 MiB). More is refused: each descriptor becomes an object on our side.
 */
export const MAX_BLOCK_STATUS_PAYLOAD = 4 + 8 * 1024 * 1024;
/** Error chunks carry a string and at most a few fixed fields. */
export const MAX_ERROR_CHUNK_PAYLOAD = 6 + MAX_STRING_LENGTH + 64;
/** Requests carry a 32-bit length. */
export const MAX_REQUEST_LENGTH = 0xffffffff;
/** Largest read the spec says every server must tolerate; our default cap per request. */
export const PORTABLE_MAX_READ = 32 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/**
 * Every failure of the NBD layer. `code` tells which kind:
 * - `nbd-server-error`: the server answered a request with an error (see `errno`, `offset`);
 * - `nbd-protocol`: the server broke the protocol (the connection is dropped);
 * - `nbd-disconnected`: the connection ended while requests were pending, or was closed;
 * - `nbd-timeout`: the server stopped answering;
 * - `nbd-handshake`: the server refused what we need (export, TLS, ...);
 * - `nbd-connect`: the transport could not be opened;
 * - `nbd-usage`: the caller asked for something impossible (range past the end, unknown context).
 */
export interface NbdErrorDetails extends ErrorDetails {
  server?: string;
  errno?: string;
  errnoValue?: number;
  offset?: number;
}

export class NbdError extends TresorError {
  /** Which server, as an NBD URI; empty for errors raised by pure decoders. */
  readonly server: string;
  /** The errno name the server sent (`EIO`, `EPERM`...), for `nbd-server-error`. */
  readonly errno: string | undefined;
  readonly errnoValue: number | undefined;
  /** Where the server says the error happened (NBD_REPLY_TYPE_ERROR_OFFSET). */
  readonly offset: number | undefined;

  constructor(code: string, message: string, details: NbdErrorDetails = {}) {
    const { server, errno, errnoValue, offset, ...rest } = details;
    super(code, message, {
      exitCode: code === 'nbd-protocol' ? ExitCode.badInput : ExitCode.failure,
      ...rest,
      context: { ...(server === undefined ? {} : { server }), ...(errno === undefined ? {} : { errno }),
        ...(offset === undefined ? {} : { offset }), ...rest.context },
    });
    this.name = 'NbdError';
    this.server = server ?? '';
    this.errno = errno;
    this.errnoValue = errnoValue;
    this.offset = offset;
  }
}

export function protocolError(message: string, context: Record<string, unknown> = {}): NbdError {
  return new NbdError('nbd-protocol', message, {
    context,
    hint: 'the NBD server sent something the protocol does not allow; check the server and its version',
  });
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

function decodeString(bytes: Uint8Array, what: string): string {
  if (bytes.length > MAX_STRING_LENGTH) {
    throw protocolError(`${what} is ${bytes.length} bytes, more than the ${MAX_STRING_LENGTH} the protocol allows`);
  }
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    throw protocolError(`${what} is not valid UTF-8`);
  }
}

function encodeString(value: string, what: string): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  if (bytes.length > MAX_STRING_LENGTH) {
    throw new NbdError('nbd-usage', `${what} is ${bytes.length} bytes; NBD allows at most ${MAX_STRING_LENGTH}`);
  }
  if (bytes.includes(0)) throw new NbdError('nbd-usage', `${what} must not contain NUL characters`);
  return bytes;
}

/** A 64-bit unsigned value that must fit a JS number exactly (sizes, offsets). */
function readSafeUint64(buf: Buffer, at: number, what: string): number {
  const value = buf.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw protocolError(`${what} ${value} is larger than this client can address (2^53 - 1)`);
  }
  return Number(value);
}

function expectLength(buf: Uint8Array, expected: number, what: string): void {
  if (buf.length !== expected) {
    throw protocolError(`${what} has ${buf.length} bytes, expected ${expected}`);
  }
}

export function isPowerOfTwo(value: number): boolean {
  return value > 0 && Number.isInteger(value) && (value & (value - 1)) === 0;
}

// ---------------------------------------------------------------------------------------------
// Handshake encoders/decoders
// ---------------------------------------------------------------------------------------------

/** Parses the 18-byte newstyle greeting; returns the handshake flags. */
export function parseGreeting(buf: Buffer): { handshakeFlags: number } {
  expectLength(buf, GREETING_LENGTH, 'server greeting');
  if (buf.readBigUInt64BE(0) !== NBD_INIT_MAGIC) {
    throw protocolError('this is not an NBD server: the greeting does not start with NBDMAGIC');
  }
  const second = buf.readBigUInt64BE(8);
  if (second === NBD_OLDSTYLE_MAGIC) {
    throw new NbdError('nbd-handshake', 'the server speaks oldstyle NBD negotiation, which is not supported', {
      hint: 'run the server in newstyle mode (the default for qemu-nbd and nbdkit)',
    });
  }
  if (second !== NBD_OPTS_MAGIC) {
    throw protocolError(`unknown negotiation magic 0x${second.toString(16)} after NBDMAGIC`);
  }
  return { handshakeFlags: buf.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const buf = Buffer.alloc(4);
  buf.writeUInt32BE(flags >>> 0, 0);
  return buf;
}

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(16 + data.length);
  buf.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(data.length, 12);
  buf.set(data, 16);
  return buf;
}

/** Data of NBD_OPT_GO / NBD_OPT_INFO. */
export function encodeGoData(exportName: string, infoRequests: number[]): Buffer {
  const name = encodeString(exportName, 'export name');
  const buf = Buffer.alloc(4 + name.length + 2 + 2 * infoRequests.length);
  buf.writeUInt32BE(name.length, 0);
  name.copy(buf, 4);
  let at = 4 + name.length;
  buf.writeUInt16BE(infoRequests.length, at);
  at += 2;
  for (const info of infoRequests) {
    buf.writeUInt16BE(info, at);
    at += 2;
  }
  return buf;
}

/** Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT. */
export function encodeMetaContextData(exportName: string, queries: string[]): Buffer {
  const name = encodeString(exportName, 'export name');
  const encoded = queries.map((query) => encodeString(query, `metadata context query "${query}"`));
  const total = 4 + name.length + 4 + encoded.reduce((sum, q) => sum + 4 + q.length, 0);
  const buf = Buffer.alloc(total);
  buf.writeUInt32BE(name.length, 0);
  name.copy(buf, 4);
  let at = 4 + name.length;
  buf.writeUInt32BE(encoded.length, at);
  at += 4;
  for (const query of encoded) {
    buf.writeUInt32BE(query.length, at);
    query.copy(buf, at + 4);
    at += 4 + query.length;
  }
  return buf;
}

export function encodeExportNameData(exportName: string): Buffer {
  return encodeString(exportName, 'export name');
}

export interface OptionReplyHeader {
  option: number;
  replyType: number;
  length: number;
}

/**
 * Parses a 20-byte option reply header and checks it answers `expectedOption` and that its
 * payload length is within MAX_OPTION_REPLY_PAYLOAD (checked before the payload is read).
 */
export function parseOptionReplyHeader(buf: Buffer, expectedOption: number): OptionReplyHeader {
  expectLength(buf, OPTION_REPLY_HEADER_LENGTH, 'option reply header');
  const magic = buf.readBigUInt64BE(0);
  if (magic !== NBD_OPTION_REPLY_MAGIC) {
    throw protocolError(`bad option reply magic 0x${magic.toString(16)}`);
  }
  const option = buf.readUInt32BE(8);
  const replyType = buf.readUInt32BE(12);
  const length = buf.readUInt32BE(16);
  if (option !== expectedOption) {
    throw protocolError(`the server answered option ${option} while option ${expectedOption} was pending`);
  }
  if (length > MAX_OPTION_REPLY_PAYLOAD) {
    throw protocolError(`option reply of ${length} bytes exceeds the ${MAX_OPTION_REPLY_PAYLOAD}-byte limit`, {
      option, replyType,
    });
  }
  return { option, replyType, length };
}

export function isOptionError(replyType: number): boolean {
  return (replyType & OPTION_REPLY_ERROR_BIT) !== 0;
}

/** Error replies may carry a human-readable message; decode it leniently. */
export function decodeOptionErrorMessage(payload: Buffer): string {
  if (payload.length === 0) return '';
  return Buffer.from(payload.subarray(0, MAX_STRING_LENGTH)).toString('utf8').replace(/[\x00-\x1f]/g, ' ').trim();
}

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

export type InfoReply =
  | { type: 'export'; size: number; transmissionFlags: number }
  | { type: 'name'; name: string }
  | { type: 'description'; description: string }
  | { type: 'blockSize'; constraints: BlockSizeConstraints }
  | { type: 'unknown'; infoType: number };

/** Parses the payload of NBD_REP_INFO. */
export function parseInfoReply(payload: Buffer): InfoReply {
  if (payload.length < 2) throw protocolError(`NBD_REP_INFO of ${payload.length} bytes is too short`);
  const infoType = payload.readUInt16BE(0);
  switch (infoType) {
    case InfoType.export:
      expectLength(payload, 12, 'NBD_INFO_EXPORT');
      return { type: 'export', size: readSafeUint64(payload, 2, 'export size'), transmissionFlags: payload.readUInt16BE(10) };
    case InfoType.name:
      return { type: 'name', name: decodeString(payload.subarray(2), 'export name') };
    case InfoType.description:
      return { type: 'description', description: decodeString(payload.subarray(2), 'export description') };
    case InfoType.blockSize:
      expectLength(payload, 14, 'NBD_INFO_BLOCK_SIZE');
      return {
        type: 'blockSize',
        constraints: { minimum: payload.readUInt32BE(2), preferred: payload.readUInt32BE(6), maximum: payload.readUInt32BE(10) },
      };
    default:
      return { type: 'unknown', infoType };
  }
}

/**
 * Checks block size constraints against the spec's rules (minimum a power of two up to 64 KiB,
 * preferred a power of two, maximum a multiple of the minimum) — we align every request to the
 * minimum, so a nonsensical minimum would corrupt reads.
 */
export function validateBlockSize(constraints: BlockSizeConstraints, exportSize: number): BlockSizeConstraints {
  const { minimum, preferred, maximum } = constraints;
  if (!isPowerOfTwo(minimum) || minimum > 65536) {
    throw protocolError(`minimum block size ${minimum} is not a power of two up to 65536`, { ...constraints });
  }
  if (!isPowerOfTwo(preferred) || preferred < minimum) {
    throw protocolError(`preferred block size ${preferred} is not a power of two at least the minimum ${minimum}`, { ...constraints });
  }
  if (maximum < minimum || (maximum !== 0xffffffff && maximum % minimum !== 0)) {
    throw protocolError(`maximum block size ${maximum} is not a multiple of the minimum ${minimum}`, { ...constraints });
  }
  if (exportSize % minimum !== 0) {
    throw protocolError(`export size ${exportSize} is not a multiple of the minimum block size ${minimum}`, { ...constraints });
  }
  return { minimum, preferred, maximum };
}

/** Parses the payload of NBD_REP_META_CONTEXT. */
export function parseMetaContextReply(payload: Buffer): { id: number; name: string } {
  if (payload.length < 5) throw protocolError(`NBD_REP_META_CONTEXT of ${payload.length} bytes is too short`);
  return { id: payload.readUInt32BE(0), name: decodeString(payload.subarray(4), 'metadata context name') };
}

/** Parses what NBD_OPT_EXPORT_NAME returns (without the optional 124 bytes of padding). */
export function parseExportNameReply(buf: Buffer): { size: number; transmissionFlags: number } {
  expectLength(buf, EXPORT_NAME_REPLY_LENGTH, 'NBD_OPT_EXPORT_NAME reply');
  return { size: readSafeUint64(buf, 0, 'export size'), transmissionFlags: buf.readUInt16BE(8) };
}

// ---------------------------------------------------------------------------------------------
// Transmission encoders/decoders
// ---------------------------------------------------------------------------------------------

export interface Request {
  flags: number;
  type: number;
  handle: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(request: Request): Buffer {
  if (!Number.isSafeInteger(request.offset) || request.offset < 0) {
    throw new NbdError('nbd-usage', `request offset ${request.offset} is not a non-negative integer`);
  }
  if (!Number.isInteger(request.length) || request.length < 0 || request.length > MAX_REQUEST_LENGTH) {
    throw new NbdError('nbd-usage', `request length ${request.length} does not fit in 32 bits`);
  }
  const buf = Buffer.alloc(REQUEST_LENGTH);
  buf.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  buf.writeUInt16BE(request.flags, 4);
  buf.writeUInt16BE(request.type, 6);
  buf.writeBigUInt64BE(request.handle, 8);
  buf.writeBigUInt64BE(BigInt(request.offset), 16);
  buf.writeUInt32BE(request.length, 24);
  return buf;
}

/** Simple reply header, after its 4-byte magic: 12 bytes. */
export function parseSimpleReplyRest(buf: Buffer): { error: number; handle: bigint } {
  expectLength(buf, SIMPLE_REPLY_HEADER_LENGTH - 4, 'simple reply header');
  return { error: buf.readUInt32BE(0), handle: buf.readBigUInt64BE(4) };
}

export interface ChunkHeader {
  flags: number;
  type: number;
  handle: bigint;
  length: number;
}

/** Structured reply chunk header, after its 4-byte magic: 16 bytes. */
export function parseChunkHeaderRest(buf: Buffer): ChunkHeader {
  expectLength(buf, STRUCTURED_REPLY_HEADER_LENGTH - 4, 'structured reply header');
  return { flags: buf.readUInt16BE(0), type: buf.readUInt16BE(2), handle: buf.readBigUInt64BE(4), length: buf.readUInt32BE(12) };
}

export function isErrorChunk(type: number): boolean {
  return (type & REPLY_TYPE_ERROR_BIT) !== 0;
}

export function replyTypeName(type: number): string {
  switch (type) {
    case ReplyType.none: return 'NBD_REPLY_TYPE_NONE';
    case ReplyType.offsetData: return 'NBD_REPLY_TYPE_OFFSET_DATA';
    case ReplyType.offsetHole: return 'NBD_REPLY_TYPE_OFFSET_HOLE';
    case ReplyType.blockStatus: return 'NBD_REPLY_TYPE_BLOCK_STATUS';
    case ReplyType.error: return 'NBD_REPLY_TYPE_ERROR';
    case ReplyType.errorOffset: return 'NBD_REPLY_TYPE_ERROR_OFFSET';
    default: return `reply type 0x${type.toString(16)}`;
  }
}

/**
 * The largest payload a chunk of this type may legitimately carry for a request of
 * `requestLength` bytes; checked against the header before the payload is read.
 */
export function maxChunkPayload(type: number, requestLength: number): number {
  switch (type) {
    case ReplyType.none: return 0;
    case ReplyType.offsetHole: return 12;
    case ReplyType.offsetData: return Math.min(MAX_REPLY_PAYLOAD, 8 + requestLength);
    case ReplyType.blockStatus: return MAX_BLOCK_STATUS_PAYLOAD;
    default: return isErrorChunk(type) ? MAX_ERROR_CHUNK_PAYLOAD : 0;
  }
}

export function parseOffsetHole(payload: Buffer): { offset: number; length: number } {
  expectLength(payload, 12, 'NBD_REPLY_TYPE_OFFSET_HOLE');
  const length = payload.readUInt32BE(8);
  if (length === 0) throw protocolError('NBD_REPLY_TYPE_OFFSET_HOLE with a hole size of 0');
  return { offset: readSafeUint64(payload, 0, 'hole offset'), length };
}

/** The first 8 bytes of an OFFSET_DATA payload. */
export function parseOffsetDataOffset(prefix: Buffer): number {
  expectLength(prefix, 8, 'NBD_REPLY_TYPE_OFFSET_DATA offset');
  return readSafeUint64(prefix, 0, 'data offset');
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function parseBlockStatusPayload(payload: Buffer): { contextId: number; descriptors: StatusDescriptor[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw protocolError(`NBD_REPLY_TYPE_BLOCK_STATUS payload of ${payload.length} bytes is not 4 + a positive multiple of 8`);
  }
  const contextId = payload.readUInt32BE(0);
  const descriptors: StatusDescriptor[] = [];
  for (let at = 4; at < payload.length; at += 8) {
    const length = payload.readUInt32BE(at);
    if (length === 0) throw protocolError('block status descriptor with length 0', { contextId });
    descriptors.push({ length, flags: payload.readUInt32BE(at + 4) });
  }
  return { contextId, descriptors };
}

export interface ErrorChunk {
  errnoValue: number;
  message: string;
  offset: number | undefined;
}

/**
 * Parses any error chunk (bit 15 set): error, message length, message, then for ERROR_OFFSET an
 * offset. The message length must fit in the chunk.
 */
export function parseErrorChunk(type: number, payload: Buffer): ErrorChunk {
  if (payload.length < 6) throw protocolError(`${replyTypeName(type)} payload of ${payload.length} bytes is too short`);
  const errnoValue = payload.readUInt32BE(0);
  const messageLength = payload.readUInt16BE(4);
  const trailer = type === ReplyType.errorOffset ? 8 : 0;
  if (6 + messageLength + trailer > payload.length) {
    throw protocolError(`${replyTypeName(type)} message length ${messageLength} does not fit in a ${payload.length}-byte chunk`);
  }
  if (type === ReplyType.errorOffset && payload.length !== 6 + messageLength + 8) {
    throw protocolError(`NBD_REPLY_TYPE_ERROR_OFFSET of ${payload.length} bytes does not match its message length ${messageLength}`);
  }
  const message = Buffer.from(payload.subarray(6, 6 + messageLength)).toString('utf8').replace(/[\x00-\x1f]/g, ' ').trim();
  const offset = type === ReplyType.errorOffset ? readSafeUint64(payload, 6 + messageLength, 'error offset') : undefined;
  return { errnoValue, message, offset };
}
