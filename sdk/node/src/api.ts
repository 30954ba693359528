// The Platform's public types: its options, what it reports (agents, chunks, events) and the
// error its calls reject with.

import type { AuditFlag, AuditView } from './audit.js';
import type { Refusal } from './enroll.js';
import type { Logger } from './session.js';
import type { ResultStore } from './store.js';
import type { TlsOptions } from './tls.js';
import type { ErrorBody, StatusReport, UpdateStatus } from './wire.js';

/** Hooks for tests. */
export interface PlatformHooks {
  /**
   * Awaited after a result is durably stored and before it is acknowledged to the agent (a test
   * may kill the process here to prove the result survives and is not duplicated).
   */
  afterStore?: (taskId: string) => void | Promise<void>;
}

/** How to start a {@link Platform}. */
export interface PlatformOptions {
  /** Where agents connect: `HOST:PORT` (`[::1]:PORT` for IPv6); port 0 picks a free one. */
  listen: string;
  /** The state directory (created 0700): server key and certificate, agents, tokens, results. */
  stateDir: string;
  /** Where results are kept; default a {@link FileStore} in `stateDir`. The platform opens and closes it. */
  store?: ResultStore;
  /** The platform's own key and certificate, instead of the self-signed pair in `stateDir`. */
  tls?: TlsOptions;
  /** Extra DNS names or IP addresses for the generated certificate. */
  hostnames?: string[];
  /** Default lifetime of the tokens {@link Platform.issueToken} mints, in ms (0: no expiry); default 24 h. */
  tokenTtlMs?: number;
  /**
   * Nothing heard from an agent (no message, ping or pong) for this long closes its connection
   * (close code 4001); default 90 s, three of the agent's 30 s heartbeats. Keep it above the
   * agents' `heartbeat_secs` (docs/configuration.md) times two; at least 1000.
   */
  idleTimeoutMs?: number;
  /** Test hooks. */
  hooks?: PlatformHooks;
  /** Where log messages go; default nowhere. */
  log?: Logger;
  /**
   * Called for each task result this process waited for: the microseconds from sending its
   * `run` to holding its result, stored (for measurements).
   */
  onRoundTrip?: (us: number, taskId: string) => void;
}

/** An agent the platform knows. */
export interface AgentInfo {
  /** The agent id: 64 lowercase hex, the SHA-256 of its certificate's public key. */
  id: string;
  /** Whether it is connected (and welcomed) now. */
  connected: boolean;
  /** When it enrolled (RFC 3339). */
  enrolledAt: string;
  /** When the platform last heard from it in this process (RFC 3339), or `null`. */
  lastSeen: string | null;
  /** Its latest `status`, or `null`. */
  status: StatusReport | null;
  /** The software version its latest `hello` named, or `null`. */
  agentVersion: string | null;
  /**
   * Its audit chain as the platform stored it from its statuses (`{ seq, hash, flag }`; `flag`
   * is `null` while nothing was seen), or `null` when no status with an audit head came from it
   * (or its stored state cannot be read: see `auditError`). Kept across restarts.
   */
  audit: AuditView | null;
  /** Why its stored audit state cannot be read (absent when it can). */
  auditError?: string;
}

/** A chunk of a streaming task's output. */
export interface Chunk {
  taskId: string;
  /** 0, 1, 2… per task across both streams. */
  seq: number;
  stream: 'stdout' | 'stderr';
  /** The bytes as UTF-8 text. */
  data: string;
  /** Bytes the agent did not stream since the previous chunk (still in the result's capture when they fit). */
  droppedBytes: number;
}

/** What to run: exactly one of `command` and `module`. */
export interface RunOptions {
  /** A command: a handler installed on the agent, else one of its allowlisted shell rules. */
  command?: string;
  /** A module: the signed file's bytes (sent when the agent asks for them). */
  module?: Uint8Array;
  /** With `module`: a detached signature (the `.sig` file's bytes). */
  signature?: Uint8Array;
  /** The task input (a handler's stdin); default null. */
  input?: unknown;
  /** argv[1..] for a handler, or the extra arguments of a shell rule. */
  args?: string[];
  /** The task id (at most 256 bytes); default a random UUID. A task id whose result is stored is answered from the store. */
  taskId?: string;
  /** The task's wall-clock limit (`limits.timeout_ms`). */
  timeoutMs?: number;
  /** Fuel limit. */
  fuel?: number;
  /** Memory limit, in MiB. */
  memoryMiB?: number;
  /** Output capture limit, in bytes. */
  outputBytes?: number;
  /** The task must not start after this time. */
  notAfter?: Date | string;
  /** The task may run again if the agent dies while it runs. */
  idempotent?: boolean;
  /** Streams the output while the task runs (chunks in `seq` order; best effort). */
  onChunk?: (chunk: Chunk) => void;
  /** How long to wait for the result; default 60 s, or `timeoutMs` + 30 s if larger. */
  waitMs?: number;
}

/** Options of the requests other than `run`. */
export interface RequestOptions {
  /** How long to wait for the agent's reply; default 30 s. */
  waitMs?: number;
}

/** Why an SDK call failed. */
export type PlatformErrorCode =
  /** The agent id is not enrolled. */
  | 'unknown_agent'
  /** The agent is not connected. */
  | 'not_connected'
  /** No answer within the wait. */
  | 'timeout'
  /** The agent's connection ended before its reply (requests other than `run`). */
  | 'disconnected'
  /** The platform was closed. */
  | 'closed'
  /** The agent answered with an `error` (see `agentError`). */
  | 'agent_error'
  /** The task id belongs to another agent. */
  | 'conflict'
  /** A bad argument. */
  | 'invalid';

/** The error SDK calls reject with. */
export class PlatformError extends Error {
  /** What failed. */
  readonly code: PlatformErrorCode;
  /** With `agent_error`: the agent's `error` (`code` such as `refused`, `not_found`). */
  readonly agentError: ErrorBody | undefined;
  /** With an agent's `refused`: the machine-readable reason that starts its message (e.g. `out_of_scope`). */
  readonly reason: string | undefined;

  constructor(code: PlatformErrorCode, message: string, agentError?: ErrorBody) {
    super(message);
    this.name = 'PlatformError';
    this.code = code;
    this.agentError = agentError;
    this.reason = agentError?.code === 'refused' ? agentError.message.split(/[:\s]/, 1)[0] : undefined;
  }
}

/** The platform's events. */
export interface PlatformEvents {
  /** An agent was welcomed (`enrolled`: this connection enrolled it). */
  agentConnected: [agent: AgentInfo, enrolled: boolean];
  /** An agent's connection ended. */
  agentDisconnected: [agentId: string, why: string];
  /** An agent sent `status` (announced once the audit head it carries is judged and stored). */
  status: [agentId: string, status: StatusReport];
  /**
   * A status showed that the agent's audit chain was rewritten (`backwards`, `fork`) or can no
   * longer be checked (`unverifiable`): the flag is stored, and stays until
   * {@link Platform.clearAuditFlag}. Raised once; later statuses do not raise another.
   */
  auditFlagged: [agentId: string, flag: AuditFlag];
  /**
   * An agent sent `update_status`: where an update of it stands (`refused`, `staged`) or its
   * verdict (`succeeded`, `failed`), which the SDK acknowledges (`update_ack`) once the listeners
   * have returned (not when one throws). The agent sends a verdict again after every reconnect
   * until it is acknowledged, so the same verdict may come more than once. The SDK does not
   * send updates (nor serve releases: a `need_release` is answered with an `error`).
   */
  update: [agentId: string, status: UpdateStatus];
  /** An upgrade was refused (HTTP 401 and `X-Bridge-Refusal: reason`). */
  refused: [refusal: { agentId: string; reason: Refusal; peer: string }];
}
