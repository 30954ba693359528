// The protocol on the wire: its version, limits and field names, in this one module.
// Agent frames are decoded here with every check docs/protocol.md lists; platform frames are encoded here.

import type {
  AgentStats,
  AppliedLimits,
  AuditAt,
  AuditHead,
  ErrorBody as WireErrorBody,
  HandlerInfo,
  HostFacts,
  LimitRequest,
  PlatformMessage,
  RunResult,
  StatusReport,
  Truncation,
  UpdateReason,
  UpdateStatus,
} from './protocol.js';

export type { AgentStats, AppliedLimits, AuditAt, AuditHead, HandlerInfo, HostFacts, LimitRequest, RunResult, StatusReport, Truncation, UpdateReason, UpdateStatus };

/** The protocol version this SDK speaks (only this one: an agent offering only older ones is told `unsupported_version`). */
export const PROTOCOL_VERSION = 2;
/** The WebSocket path agents connect to. */
export const AGENT_PATH = '/agent';
/** Largest text frame, in bytes of UTF-8, both directions. */
export const MAX_TEXT_BYTES = 1024 * 1024;
/** Largest binary frame (a module upload). */
export const MAX_BINARY_BYTES = 32 * 1024 * 1024;
/** Deepest nesting of JSON arrays and objects in a message. */
export const MAX_DEPTH = 64;
/** Longest identifier (`id`, `task_id`, a handler name), in bytes of UTF-8. */
export const MAX_ID_BYTES = 256;
/** What the WebSocket layer accepts: a module upload and some room. */
export const MAX_WS_PAYLOAD = MAX_BINARY_BYTES + 64 * 1024;

/**
 * Refusal reasons the agent does not record: such a `result` answers one `run` only and is not
 * the task's result (not stored; the same task id may run later). `deadline_passed` is recorded
 * in one case (a queued task whose deadline passes); nothing ran either way, so it is treated
 * as not the task's result, as `bridgectl serve` does.
 */
export const UNRECORDED_REASONS: ReadonlySet<string> = new Set([
  'busy',
  'updating',
  'storage_full',
  'storage_error',
  'unknown_command',
  'deadline_passed',
]);

/** Error codes either end may send. */
export type ErrorCode = WireErrorBody['code'];

const ERROR_CODES: ReadonlySet<string> = new Set<ErrorCode>([
  'malformed',
  'unknown_type',
  'oversize',
  'too_deep',
  'unsupported_version',
  'unexpected',
  'module_mismatch',
  'binary_not_expected',
  'refused',
  'not_found',
]);

/** The body of an `error` message, as this SDK reads and writes it. */
export interface ErrorBody {
  /** The offending message's id, when it had a readable one. */
  id?: string;
  /** What kind of failure. */
  code: ErrorCode;
  /** For humans (a `refused` message starts with the machine-readable reason). */
  message: string;
}

/** Longest `version` in an `update_status` (a release manifest's limit), in bytes. */
export const MAX_VERSION_BYTES = 64;
/** Longest `detail` in an `update_status`, in bytes. */
export const MAX_DETAIL_BYTES = 1024;

/** Longest `stats.link.last_error` in a `status`, in bytes. */
export const MAX_LAST_ERROR_BYTES = 1024;

/** Whether `text` is a SHA-256 as the protocol writes it: exactly 64 lowercase hex digits. */
export function isSha256Hex(text: unknown): text is string {
  return typeof text === 'string' && /^[0-9a-f]{64}$/.test(text);
}

/** Where an update stands, as `update_status` says. */
export type UpdateState = UpdateStatus['state'];
const UPDATE_STATES: readonly UpdateState[] = ['refused', 'staged', 'succeeded', 'failed'];
const UPDATE_REASONS: readonly UpdateReason[] = [
  'malformed_manifest',
  'bad_signature',
  'unknown_key',
  'wrong_platform',
  'downgrade',
  'too_large',
  'mismatch',
  'unavailable',
  'unsupported',
  'in_progress',
  'storage',
  'exited',
  'not_confirmed',
  'not_started',
  'switch_failed',
];

/** Where an accepted task is. */
export type TaskState = 'queued' | 'running' | 'finished';
/** What the agent found for a `cancel`. */
export type CancelOutcome = 'cancelling' | 'dequeued' | 'finished' | 'unknown';

/** A message from the agent, decoded and checked; hashes under version-neutral names. */
export type AgentMessage =
  | { type: 'hello'; versions: number[]; agentId: string; agentVersion: string }
  | { type: 'status'; status: StatusReport }
  | { type: 'need_module'; id: string; fileSha256: string }
  | { type: 'accepted'; id: string; taskId: string; state: TaskState }
  | { type: 'chunk'; taskId: string; seq: number; stream: 'stdout' | 'stderr'; data: string; droppedBytes: number }
  | { type: 'cancel_reply'; id: string; taskId: string; outcome: CancelOutcome }
  | { type: 'handlers'; id: string; handlers: HandlerInfo[] }
  | { type: 'result'; id: string; taskId: string; result: RunResult }
  | { type: 'need_release'; id: string; offset: number; length: number }
  | { type: 'update_status'; status: UpdateStatus }
  | { type: 'error'; error: ErrorBody };

/** Why a frame was not accepted: the `error` to answer with (unless `wasError`). */
export interface DecodeFailure {
  body: ErrorBody;
  /** The offending frame was itself an `error`: log it, never answer it. */
  wasError: boolean;
}

/** A `run` request, before encoding. */
export interface RunWire {
  id: string;
  taskId: string;
  command?: string;
  fileSha256?: string;
  signature?: string;
  input?: unknown;
  args?: string[];
  limits?: LimitRequest;
  notAfter?: string;
  idempotent?: boolean;
  stream?: boolean;
}

/** Bytes of UTF-8 in `s`. */
export function utf8Bytes(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

/** The deepest nesting of arrays and objects in `text`, counting brackets outside strings. */
export function jsonDepth(text: string): number {
  let depth = 0;
  let max = 0;
  let inString = false;
  let escaped = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (escaped) escaped = false;
      else if (c === 0x5c) escaped = true;
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) {
      inString = true;
    } else if (c === 0x5b || c === 0x7b) {
      depth++;
      if (depth > max) max = depth;
    } else if (c === 0x5d || c === 0x7d) {
      depth--;
    }
  }
  return max;
}

class Malformed extends Error {}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function only(o: Obj, what: string, allowed: readonly string[]): void {
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k)) throw new Malformed(`unknown field \`${k}\` in ${what}`);
  }
}

function str(o: Obj, k: string, what: string): string {
  const v = o[k];
  if (typeof v !== 'string') throw new Malformed(`${what}: \`${k}\` must be a string`);
  return v;
}

function ident(o: Obj, k: string, what: string): string {
  const v = str(o, k, what);
  if (utf8Bytes(v) > MAX_ID_BYTES) throw new Malformed(`${what}: \`${k}\` is longer than ${MAX_ID_BYTES} bytes`);
  return v;
}

function uint(o: Obj, k: string, what: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
    throw new Malformed(`${what}: \`${k}\` must be a non-negative integer`);
  }
  return v;
}

function num(o: Obj, k: string, what: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new Malformed(`${what}: \`${k}\` must be a number`);
  return v;
}

function oneOf<T extends string>(o: Obj, k: string, what: string, values: readonly T[]): T {
  const v = str(o, k, what);
  if (!(values as readonly string[]).includes(v)) {
    throw new Malformed(`${what}: \`${k}\` must be one of ${values.join(', ')}`);
  }
  return v as T;
}

function strings(o: Obj, k: string, what: string): string[] {
  const v = o[k];
  if (!Array.isArray(v) || !v.every((s) => typeof s === 'string')) {
    throw new Malformed(`${what}: \`${k}\` must be an array of strings`);
  }
  return v as string[];
}

function need(o: Obj, what: string, keys: readonly string[]): void {
  for (const k of keys) {
    if (!(k in o)) throw new Malformed(`${what}: missing field \`${k}\``);
  }
}

function decodeStatus(o: Obj): StatusReport {
  const what = 'status';
  only(o, what, ['type', 'agent_id', 'agent_version', 'host', 'running', 'agent_uptime_secs', 'stats', 'audit']);
  need(o, what, ['agent_id', 'agent_version', 'host', 'running', 'agent_uptime_secs']);
  const h = o.host;
  if (!isObj(h)) throw new Malformed('status: `host` must be an object');
  only(h, 'status.host', ['hostname', 'os', 'arch', 'uptime_secs', 'load']);
  const load = h.load;
  if (!Array.isArray(load) || load.length !== 3 || !load.every((n) => typeof n === 'number')) {
    throw new Malformed('status.host: `load` must be 3 numbers');
  }
  const running = strings(o, 'running', what);
  for (const r of running) {
    if (utf8Bytes(r) > MAX_ID_BYTES) throw new Malformed(`status: a running task id is longer than ${MAX_ID_BYTES} bytes`);
  }
  const status: StatusReport = {
    agent_id: str(o, 'agent_id', what),
    agent_version: str(o, 'agent_version', what),
    host: {
      hostname: str(h, 'hostname', 'status.host'),
      os: str(h, 'os', 'status.host'),
      arch: str(h, 'arch', 'status.host'),
      uptime_secs: uint(h, 'uptime_secs', 'status.host'),
      load: [load[0] as number, load[1] as number, load[2] as number],
    },
    running,
    agent_uptime_secs: uint(o, 'agent_uptime_secs', what),
  };
  if (o.stats !== undefined && o.stats !== null) status.stats = decodeStats(o.stats);
  if (o.audit !== undefined && o.audit !== null) status.audit = decodeAudit(o.audit);
  return status;
}

/** Every final status of a run (`tasks.finished` keys). */
const RUN_STATUSES: Readonly<Record<RunResult['status'], true>> = {
  ok: true,
  error: true,
  fuel_exhausted: true,
  memory_limit: true,
  timeout: true,
  stack_overflow: true,
  trap: true,
  invalid_module: true,
  rejected: true,
  cancelled: true,
  interrupted: true,
};

function obj(o: Obj, k: string, what: string): Obj {
  const v = o[k];
  if (!isObj(v)) throw new Malformed(`${what}: \`${k}\` must be an object`);
  return v;
}

/** `stats`: every field as the schema says, unknown fields refused, `last_error` within its bound. */
function decodeStats(v: unknown): AgentStats {
  const what = 'status.stats';
  if (!isObj(v)) throw new Malformed(`status: \`stats\` must be an object or null`);
  only(v, what, ['link', 'tasks', 'journal', 'store', 'rss_bytes']);
  need(v, what, ['link', 'tasks', 'journal', 'store', 'rss_bytes']);
  const l = obj(v, 'link', what);
  only(l, `${what}.link`, ['connected', 'since_unix_ms', 'heartbeat_rtt_ms', 'reconnects', 'last_error']);
  const link: AgentStats['link'] = {
    connected: bool(l, 'connected', `${what}.link`),
    since_unix_ms: l.since_unix_ms === undefined || l.since_unix_ms === null ? null : uint(l, 'since_unix_ms', `${what}.link`),
    heartbeat_rtt_ms: l.heartbeat_rtt_ms === undefined || l.heartbeat_rtt_ms === null ? null : num(l, 'heartbeat_rtt_ms', `${what}.link`),
    reconnects: uint(l, 'reconnects', `${what}.link`),
    last_error: l.last_error === undefined || l.last_error === null ? null : str(l, 'last_error', `${what}.link`),
  };
  if (link.last_error !== null && link.last_error !== undefined && utf8Bytes(link.last_error) > MAX_LAST_ERROR_BYTES) {
    throw new Malformed(`${what}.link: \`last_error\` is ${utf8Bytes(link.last_error)} bytes; the limit is ${MAX_LAST_ERROR_BYTES} bytes`);
  }
  const t = obj(v, 'tasks', what);
  only(t, `${what}.tasks`, ['running', 'queued', 'unacked', 'finished']);
  const f = obj(t, 'finished', `${what}.tasks`);
  const finished: Record<string, number> = {};
  for (const k of Object.keys(f)) {
    if (!Object.hasOwn(RUN_STATUSES, k)) throw new Malformed(`${what}.tasks.finished: \`${k.slice(0, 64)}\` is not a run status`);
    finished[k] = uint(f, k, `${what}.tasks.finished`);
  }
  const j = obj(v, 'journal', what);
  only(j, `${what}.journal`, ['bytes', 'records']);
  const s = obj(v, 'store', what);
  only(s, `${what}.store`, ['modules', 'module_bytes', 'compiled', 'compiled_bytes']);
  return {
    link,
    tasks: {
      running: uint(t, 'running', `${what}.tasks`),
      queued: uint(t, 'queued', `${what}.tasks`),
      unacked: uint(t, 'unacked', `${what}.tasks`),
      finished,
    },
    journal: { bytes: uint(j, 'bytes', `${what}.journal`), records: uint(j, 'records', `${what}.journal`) },
    store: {
      modules: uint(s, 'modules', `${what}.store`),
      module_bytes: uint(s, 'module_bytes', `${what}.store`),
      compiled: uint(s, 'compiled', `${what}.store`),
      compiled_bytes: uint(s, 'compiled_bytes', `${what}.store`),
    },
    rss_bytes: uint(v, 'rss_bytes', what),
  };
}

/** A sequence number the platform compares: an integer from 0 to 2^53 − 1 (exact in JavaScript). */
function seqOf(o: Obj, k: string, what: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new Malformed(`${what}: \`${k}\` must be an integer from 0 to 2^53 - 1`);
  }
  return v;
}

/** `audit`: the head, its hashes 64 lowercase hex, and `at` (the answer to `welcome.audit_seq`). */
function decodeAudit(v: unknown): AuditHead {
  const what = 'status.audit';
  if (!isObj(v)) throw new Malformed('status: `audit` must be an object or null');
  only(v, what, ['seq', 'hash', 'at']);
  need(v, what, ['seq', 'hash']);
  const head: AuditHead = { seq: seqOf(v, 'seq', what), hash: str(v, 'hash', what) };
  if (!isSha256Hex(head.hash)) throw new Malformed('status: `audit.hash` is not 64 lowercase hex');
  if (v.at !== undefined && v.at !== null) {
    const a = obj(v, 'at', what);
    only(a, `${what}.at`, ['seq', 'hash']);
    need(a, `${what}.at`, ['seq']);
    const at: AuditAt = { seq: seqOf(a, 'seq', `${what}.at`), hash: null };
    if (a.hash !== undefined && a.hash !== null) {
      if (!isSha256Hex(a.hash)) throw new Malformed('status: `audit.at.hash` is not 64 lowercase hex');
      at.hash = a.hash;
    }
    head.at = at;
  }
  return head;
}

function decodeHandler(h: unknown): HandlerInfo {
  const what = 'handlers[]';
  if (!isObj(h)) throw new Malformed('handlers: each handler must be an object');
  only(h, what, ['name', 'file_sha256', 'code_sha256', 'installed_at', 'key']);
  const out: HandlerInfo = {
    name: ident(h, 'name', what),
    file_sha256: str(h, 'file_sha256', what),
    code_sha256: str(h, 'code_sha256', what),
    installed_at: str(h, 'installed_at', what),
  };
  if (h.key !== undefined && h.key !== null) out.key = str(h, 'key', what);
  return out;
}

function optional<T>(o: Obj, k: string, check: (o: Obj, k: string, what: string) => T, what: string): void {
  if (o[k] !== undefined && o[k] !== null) check(o, k, what);
}

function bool(o: Obj, k: string, what: string): boolean {
  if (typeof o[k] !== 'boolean') throw new Malformed(`${what}: \`${k}\` must be a boolean`);
  return o[k] as boolean;
}

function int(o: Obj, k: string, what: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new Malformed(`${what}: \`${k}\` must be an integer`);
  return v;
}

function decodeResult(r: unknown): RunResult {
  const what = 'result.result';
  if (!isObj(r)) throw new Malformed('result: `result` must be an object');
  need(r, what, ['status', 'output', 'stdout', 'stderr', 'truncated', 'memory_peak_bytes', 'duration_ms']);
  str(r, 'status', what);
  optional(r, 'exit_code', int, what);
  str(r, 'stdout', what);
  str(r, 'stderr', what);
  const t = r.truncated;
  if (!isObj(t)) throw new Malformed(`${what}: \`truncated\` must be an object`);
  bool(t, 'stdout', `${what}.truncated`);
  bool(t, 'stderr', `${what}.truncated`);
  uint(t, 'stdout_total_bytes', `${what}.truncated`);
  uint(t, 'stderr_total_bytes', `${what}.truncated`);
  optional(r, 'fuel_consumed', uint, what);
  uint(r, 'memory_peak_bytes', what);
  num(r, 'duration_ms', what);
  const limits = r.limits;
  if (limits !== undefined && limits !== null) {
    if (!isObj(limits)) throw new Malformed(`${what}: \`limits\` must be an object or null`);
    for (const k of ['fuel', 'memory_bytes', 'timeout_ms', 'output_bytes']) uint(limits, k, `${what}.limits`);
    strings(limits, 'clamped', `${what}.limits`);
  }
  optional(r, 'error', str, what);
  optional(r, 'reason', str, what);
  optional(r, 'file_sha256', str, what);
  optional(r, 'code_sha256', str, what);
  optional(r, 'evicted', bool, what);
  optional(r, 'cgroup', bool, what);
  return r as unknown as RunResult;
}

function decodeUpdateStatus(o: Obj): UpdateStatus {
  const what = 'update_status';
  only(o, what, ['type', 'id', 'state', 'version', 'agent_version', 'reason', 'detail']);
  need(o, what, ['id', 'state', 'version', 'agent_version']);
  const status: UpdateStatus = {
    id: ident(o, 'id', what),
    state: oneOf(o, 'state', what, UPDATE_STATES),
    version: str(o, 'version', what),
    agent_version: str(o, 'agent_version', what),
  };
  if (utf8Bytes(status.version) > MAX_VERSION_BYTES) throw new Malformed(`${what}: \`version\` is longer than ${MAX_VERSION_BYTES} bytes`);
  if (o.reason !== undefined && o.reason !== null) status.reason = oneOf(o, 'reason', what, UPDATE_REASONS);
  if (o.detail !== undefined && o.detail !== null) {
    status.detail = str(o, 'detail', what);
    if (utf8Bytes(status.detail) > MAX_DETAIL_BYTES) throw new Malformed(`${what}: \`detail\` is longer than ${MAX_DETAIL_BYTES} bytes`);
  }
  return status;
}

function decodeFields(type: string, o: Obj): AgentMessage {
  switch (type) {
    case 'hello': {
      only(o, type, ['type', 'versions', 'agent_id', 'agent_version']);
      const v = o.versions;
      if (!Array.isArray(v) || v.length > 64 || !v.every((n) => Number.isInteger(n) && (n as number) >= 0)) {
        throw new Malformed('hello: `versions` must be an array of at most 64 non-negative integers');
      }
      return { type, versions: v as number[], agentId: str(o, 'agent_id', type), agentVersion: str(o, 'agent_version', type) };
    }
    case 'status':
      return { type, status: decodeStatus(o) };
    case 'need_module':
      only(o, type, ['type', 'id', 'file_sha256']);
      return { type, id: ident(o, 'id', type), fileSha256: str(o, 'file_sha256', type) };
    case 'accepted':
      only(o, type, ['type', 'id', 'task_id', 'state']);
      return {
        type,
        id: ident(o, 'id', type),
        taskId: ident(o, 'task_id', type),
        state: oneOf(o, 'state', type, ['queued', 'running', 'finished'] as const),
      };
    case 'chunk': {
      only(o, type, ['type', 'task_id', 'seq', 'stream', 'data', 'dropped_bytes']);
      const dropped = o.dropped_bytes === undefined ? 0 : uint(o, 'dropped_bytes', type);
      return {
        type,
        taskId: ident(o, 'task_id', type),
        seq: uint(o, 'seq', type),
        stream: oneOf(o, 'stream', type, ['stdout', 'stderr'] as const),
        data: str(o, 'data', type),
        droppedBytes: dropped,
      };
    }
    case 'cancel_reply':
      only(o, type, ['type', 'id', 'task_id', 'outcome']);
      return {
        type,
        id: ident(o, 'id', type),
        taskId: ident(o, 'task_id', type),
        outcome: oneOf(o, 'outcome', type, ['cancelling', 'dequeued', 'finished', 'unknown'] as const),
      };
    case 'handlers': {
      only(o, type, ['type', 'id', 'handlers']);
      const hs = o.handlers;
      if (!Array.isArray(hs)) throw new Malformed('handlers: `handlers` must be an array');
      return { type, id: ident(o, 'id', type), handlers: hs.map(decodeHandler) };
    }
    case 'result':
      only(o, type, ['type', 'id', 'task_id', 'result']);
      need(o, type, ['result']);
      return { type, id: ident(o, 'id', type), taskId: ident(o, 'task_id', type), result: decodeResult(o.result) };
    case 'need_release': {
      only(o, type, ['type', 'id', 'offset', 'length']);
      need(o, type, ['offset', 'length']);
      const length = uint(o, 'length', type);
      if (length < 1 || length > MAX_BINARY_BYTES) throw new Malformed(`need_release: \`length\` must be 1 to ${MAX_BINARY_BYTES}`);
      return { type, id: ident(o, 'id', type), offset: uint(o, 'offset', type), length };
    }
    case 'update_status':
      return { type, status: decodeUpdateStatus(o) };
    case 'error': {
      only(o, type, ['type', 'id', 'code', 'message']);
      const code = str(o, 'code', type);
      if (!ERROR_CODES.has(code)) throw new Malformed(`error: unknown code \`${code}\``);
      const body: ErrorBody = { code: code as ErrorCode, message: str(o, 'message', type) };
      if (o.id !== undefined && o.id !== null) body.id = ident(o, 'id', type);
      return { type, error: body };
    }
    default:
      throw new Error(`unreachable: ${type}`);
  }
}

const AGENT_TYPES: ReadonlySet<string> = new Set([
  'hello',
  'status',
  'need_module',
  'accepted',
  'chunk',
  'cancel_reply',
  'handlers',
  'result',
  'need_release',
  'update_status',
  'error',
]);

/**
 * Decodes one text frame from an agent, checking in the protocol's order: size, depth, JSON,
 * a string `type`, a known `type`, the fields.
 */
export function decodeAgentMessage(text: string): { ok: true; message: AgentMessage } | ({ ok: false } & DecodeFailure) {
  const fail = (code: ErrorCode, message: string, id?: string, kind?: string) => {
    const body: ErrorBody = { code, message };
    if (id !== undefined) body.id = id;
    return { ok: false as const, body, wasError: kind === 'error' };
  };
  const bytes = utf8Bytes(text);
  if (bytes > MAX_TEXT_BYTES) return fail('oversize', `a text frame of ${bytes} bytes; the limit is ${MAX_TEXT_BYTES}`);
  if (jsonDepth(text) > MAX_DEPTH) return fail('too_deep', `JSON nested deeper than ${MAX_DEPTH}`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return fail('malformed', `not JSON: ${(e as Error).message}`);
  }
  if (!isObj(value)) return fail('malformed', 'a message must be a JSON object');
  const rawId = value.id;
  const id = typeof rawId === 'string' && utf8Bytes(rawId) <= MAX_ID_BYTES ? rawId : undefined;
  const type = value.type;
  if (typeof type !== 'string') return fail('malformed', 'a message needs a string `type`', id);
  if (!AGENT_TYPES.has(type)) {
    return fail('unknown_type', `unknown message type \`${type.slice(0, 64)}\``, id, type);
  }
  try {
    return { ok: true, message: decodeFields(type, value) };
  } catch (e) {
    if (e instanceof Malformed) return fail('malformed', e.message, id, type);
    throw e;
  }
}

/** A platform message of type `T`, as the generated protocol types define it. */
type Out<T extends PlatformMessage['type']> = Extract<PlatformMessage, { type: T }>;

function encode(m: PlatformMessage): string {
  return JSON.stringify(m);
}

/** `welcome`; `auditSeq` (the latest audit seq stored for the agent) is left out when none or 0. */
export function encodeWelcome(agentId: string, enrolled: boolean, auditSeq?: number): string {
  const m: Out<'welcome'> = { type: 'welcome', version: PROTOCOL_VERSION, agent_id: agentId, enrolled };
  if (auditSeq !== undefined && auditSeq > 0) m.audit_seq = auditSeq;
  return encode(m);
}

/** `error`. */
export function encodeError(body: ErrorBody): string {
  const m: Out<'error'> = { type: 'error', ...(body.id !== undefined ? { id: body.id } : {}), code: body.code, message: body.message };
  return encode(m);
}

/** `run`. */
export function encodeRun(r: RunWire): string {
  const m: Out<'run'> = { type: 'run', id: r.id, task_id: r.taskId };
  if (r.command !== undefined) m.command = r.command;
  if (r.fileSha256 !== undefined) m.file_sha256 = r.fileSha256;
  if (r.signature !== undefined) m.signature = r.signature;
  // Any JSON value (the generated type says object: a quirk of the schema for a JSON value).
  m.input = (r.input ?? null) as Out<'run'>['input'];
  if (r.args !== undefined && r.args.length > 0) m.args = r.args;
  if (r.limits !== undefined && Object.keys(r.limits).length > 0) m.limits = r.limits;
  if (r.notAfter !== undefined) m.not_after = r.notAfter;
  if (r.idempotent === true) m.idempotent = true;
  if (r.stream === true) m.stream = true;
  return encode(m);
}

/** `cancel`. */
export function encodeCancel(id: string, taskId: string): string {
  const m: Out<'cancel'> = { type: 'cancel', id, task_id: taskId };
  return encode(m);
}

/** `ack`. */
export function encodeAck(taskIds: string[]): string {
  const m: Out<'ack'> = { type: 'ack', task_ids: taskIds };
  return encode(m);
}

/** `install_handler`. */
export function encodeInstallHandler(id: string, name: string, fileSha256: string, signature?: string): string {
  const m: Out<'install_handler'> = { type: 'install_handler', id, name, file_sha256: fileSha256 };
  if (signature !== undefined) m.signature = signature;
  return encode(m);
}

/** `remove_handler`. */
export function encodeRemoveHandler(id: string, name: string): string {
  const m: Out<'remove_handler'> = { type: 'remove_handler', id, name };
  return encode(m);
}

/** `update_ack`: the verdict of the update `id` is recorded. */
export function encodeUpdateAck(id: string): string {
  const m: Out<'update_ack'> = { type: 'update_ack', id };
  return encode(m);
}

/** `list_handlers`. */
export function encodeListHandlers(id: string): string {
  const m: Out<'list_handlers'> = { type: 'list_handlers', id };
  return encode(m);
}
