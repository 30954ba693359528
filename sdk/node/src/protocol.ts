// The protocol's messages (version 2), generated from protocol/schema/*.schema.json by
// `npm run gen-types`. Do not edit: change the Rust wire types, run `cargo xtask schema`,
// then `npm run gen-types`.

/**
 * Messages the agent sends.
 */
export type AgentMessage =
  | {
      /**
       * The agent's id.
       */
      agent_id: string;
      /**
       * The agent's software version.
       */
      agent_version: string;
      type: 'hello';
      /**
       * Protocol versions, in order of preference.
       */
      versions: number[];
    }
  | (StatusReport & {
      type: 'status';
    })
  | {
      /**
       * SHA-256 (hex) of the module file wanted: the binary frame answering must hash to it.
       */
      file_sha256: string;
      /**
       * The `run` message this is for.
       */
      id: string;
      type: 'need_module';
    }
  | {
      /**
       * The `run` message this answers.
       */
      id: string;
      /**
       * Where the task is.
       */
      state: 'queued' | 'running' | 'finished';
      /**
       * The platform's task id.
       */
      task_id: string;
      type: 'accepted';
    }
  | {
      /**
       * The bytes, as text.
       */
      data: string;
      /**
       * Bytes not streamed since the previous chunk (rate or size bound); they are still in
       * the final result's head/tail capture when they fit there.
       */
      dropped_bytes?: number;
      /**
       * 0, 1, 2… per task, across both streams.
       */
      seq: number;
      /**
       * stdout or stderr.
       */
      stream: 'stdout' | 'stderr';
      /**
       * The platform's task id.
       */
      task_id: string;
      type: 'chunk';
    }
  | {
      /**
       * The `cancel` message this answers.
       */
      id: string;
      /**
       * What the agent found.
       */
      outcome: 'cancelling' | 'dequeued' | 'finished' | 'unknown';
      /**
       * The task id.
       */
      task_id: string;
      type: 'cancel_reply';
    }
  | {
      /**
       * Every installed handler, by name.
       */
      handlers: HandlerInfo[];
      /**
       * The message this answers.
       */
      id: string;
      type: 'handlers';
    }
  | {
      /**
       * The `run` message this answers.
       */
      id: string;
      result: RunResult;
      /**
       * The platform's task id.
       */
      task_id: string;
      type: 'result';
    }
  | {
      /**
       * The `update` this is for.
       */
      id: string;
      /**
       * How many bytes (at most `MAX_BINARY_BYTES`, 32 MiB, and never past the manifest's `size`).
       */
      length: number;
      /**
       * Where the bytes start in the release binary.
       */
      offset: number;
      type: 'need_release';
    }
  | (UpdateStatus & {
      type: 'update_status';
    })
  | (ErrorBody & {
      type: 'error';
    });
/**
 * Why an update was refused or failed.
 */
export type UpdateReason =
  | 'malformed_manifest'
  | 'bad_signature'
  | 'unknown_key'
  | 'wrong_platform'
  | 'downgrade'
  | 'too_large'
  | 'mismatch'
  | 'unavailable'
  | 'unsupported'
  | 'in_progress'
  | 'storage'
  | 'exited'
  | 'not_confirmed'
  | 'not_started'
  | 'switch_failed';

/**
 * Periodic status (also right after `welcome`).
 */
export interface StatusReport {
  /**
   * The agent's id (hex SHA-256 of its public key).
   */
  agent_id: string;
  /**
   * Seconds since the agent started.
   */
  agent_uptime_secs: number;
  /**
   * The agent's version.
   */
  agent_version: string;
  /**
   * The head of the agent's audit chain (absent from agents older than this field).
   */
  audit?: AuditHead | null;
  host: HostFacts;
  /**
   * Task ids running now.
   */
  running: string[];
  /**
   * What the agent is doing, has done since it started, and holds (absent from agents
   * older than this field).
   */
  stats?: AgentStats | null;
}
/**
 * The head of the agent's audit chain: the last record made durable.
 */
export interface AuditHead {
  /**
   * The agent's answer to the `audit_seq` of this connection's `welcome`: the hash of its
   * record of that sequence number as the chain now holds it. Absent when the `welcome`
   * named none.
   */
  at?: AuditAt | null;
  /**
   * SHA-256 (hex) of the last record's line (64 zeros when there is none).
   */
  hash: string;
  /**
   * The last record's sequence number (the first record is 1; 0: none yet).
   */
  seq: number;
}
/**
 * The hash of one record of the audit chain, as the agent now holds it.
 */
export interface AuditAt {
  /**
   * SHA-256 (hex) of that record's line; `null` when the agent no longer has it (its file
   * was rotated away) or never had it.
   */
  hash?: string | null;
  /**
   * The record's sequence number (the `welcome`'s `audit_seq`).
   */
  seq: number;
}
/**
 * Facts about its host.
 */
export interface HostFacts {
  /**
   * CPU architecture (`x86_64`, `aarch64`…).
   */
  arch: string;
  /**
   * The host name.
   */
  hostname: string;
  /**
   * The 1, 5 and 15 minute load averages.
   *
   * @minItems 3
   * @maxItems 3
   */
  load: [number, number, number];
  /**
   * Operating system (`linux`…).
   */
  os: string;
  /**
   * Seconds since the host booted.
   */
  uptime_secs: number;
}
/**
 * What the agent is doing, has done since it started, and holds.
 */
export interface AgentStats {
  journal: JournalStats;
  link: LinkStats;
  /**
   * The agent process's resident memory, in bytes.
   */
  rss_bytes: number;
  store: StoreStats;
  tasks: TaskStats;
}
/**
 * The task journal.
 */
export interface JournalStats {
  /**
   * The journal file's size, in bytes.
   */
  bytes: number;
  /**
   * Task records it holds.
   */
  records: number;
}
/**
 * The platform connection.
 */
export interface LinkStats {
  /**
   * Whether the agent is connected (handshake done) now.
   */
  connected: boolean;
  /**
   * The round trip of the last answered heartbeat (WebSocket ping to pong), in
   * milliseconds; `null` before the first.
   */
  heartbeat_rtt_ms?: number | null;
  /**
   * Why the last connection or attempt ended (at most 1024 bytes); `null` if none has.
   */
  last_error?: string | null;
  /**
   * Connections established since the agent started, after the first.
   */
  reconnects: number;
  /**
   * Since when (Unix time, milliseconds) it has been connected, or disconnected; `null`
   * before the first attempt ended.
   */
  since_unix_ms?: number | null;
}
/**
 * The module store and the compiled-module cache.
 */
export interface StoreStats {
  /**
   * Compiled artifacts kept on disk.
   */
  compiled: number;
  /**
   * Their size, in bytes.
   */
  compiled_bytes: number;
  /**
   * Their size, in bytes.
   */
  module_bytes: number;
  /**
   * Module files kept in the store.
   */
  modules: number;
}
/**
 * Tasks now and since the agent started.
 */
export interface TaskStats {
  /**
   * Tasks that ended since the agent started, by final status (statuses with none are
   * absent). Refusals the agent does not record count under `rejected` too.
   */
  finished: {
    [k: string]: number;
  };
  /**
   * Tasks accepted and waiting for a slot.
   */
  queued: number;
  /**
   * Tasks running now.
   */
  running: number;
  /**
   * Results recorded and not yet acknowledged by the platform.
   */
  unacked: number;
}
/**
 * One installed handler, as `handlers` lists it.
 */
export interface HandlerInfo {
  /**
   * SHA-256 (hex) of the module without its signature sections: what the signature covers.
   * Always sent by a version-2 agent; absent only when read from a version-1 agent.
   */
  code_sha256: string;
  /**
   * SHA-256 (hex) of the module file as uploaded (what `install_handler` named).
   */
  file_sha256: string;
  /**
   * When it was installed (RFC 3339, UTC).
   */
  installed_at: string;
  /**
   * The id of the key that signed the module (32 hex characters).
   */
  key?: string | null;
  /**
   * The command name.
   */
  name: string;
}
/**
 * What happened.
 */
export interface RunResult {
  /**
   * `true` when a cgroup bounded the run: a shell command that ran inside a task cgroup of
   * its own, killed as a whole when the run ended. Absent (false) for WASM handlers and for
   * shell commands bounded by their supervisor alone.
   */
  cgroup?: boolean;
  /**
   * SHA-256 (hex) of the module without its signature sections (what a signature covers),
   * when the agent parsed the module.
   */
  code_sha256?: string | null;
  /**
   * Wall-clock time from instantiation to the end of the run, in milliseconds.
   */
  duration_ms: number;
  /**
   * A human-readable reason when `status` is not `ok`.
   */
  error?: string | null;
  /**
   * `true` when the agent no longer holds this result's output: `output`, `stdout` and
   * `stderr` are empty, everything else is as the run ended. The agent answers so to a
   * repeated task id whose result was acknowledged and then evicted to keep its journal
   * within its size limit, and stores a result so when the journal has no room for its
   * output. Absent (false) otherwise.
   */
  evicted?: boolean;
  /**
   * The handler's exit code, when it exited (`ok` and `error`); `null` otherwise.
   */
  exit_code?: number | null;
  /**
   * SHA-256 (hex) of the module file that was run or refused (the bytes as uploaded), when
   * the task named a module. (Version 1 and journals written before version 2 call it
   * `module_sha256`.)
   */
  file_sha256?: string | null;
  /**
   * Fuel the run consumed (`null` when the module never started).
   */
  fuel_consumed?: number | null;
  /**
   * The limits in force (`null` when the module was refused before limits were resolved).
   */
  limits?: AppliedLimits | null;
  /**
   * Peak linear memory the run reached, in bytes.
   */
  memory_peak_bytes: number;
  /**
   * The handler's stdout parsed as JSON, or `null` when it is empty, truncated or not JSON.
   */
  output: {
    [k: string]: unknown;
  };
  /**
   * With `status: rejected`, the machine-readable refusal reason (`unsigned`,
   * `bad_signature`…; the list is `REASONS`).
   */
  reason?:
    | 'busy'
    | 'updating'
    | 'storage_full'
    | 'storage_error'
    | 'unknown_command'
    | 'deadline_passed'
    | 'module_unavailable'
    | 'unsigned'
    | 'bad_signature'
    | 'unknown_key'
    | 'revoked_key'
    | 'expired'
    | 'not_yet_valid'
    | 'out_of_scope'
    | 'malformed_signature'
    | 'invalid_rule'
    | 'bad_argument'
    | 'rule_unavailable'
    | null;
  /**
   * Every way a handler run can end. Serialized in `snake_case` (`"fuel_exhausted"`…).
   */
  status:
    | 'ok'
    | 'error'
    | 'fuel_exhausted'
    | 'memory_limit'
    | 'timeout'
    | 'stack_overflow'
    | 'trap'
    | 'invalid_module'
    | 'rejected'
    | 'cancelled'
    | 'interrupted';
  /**
   * What was kept of stderr (lossy UTF-8).
   */
  stderr: string;
  /**
   * What was kept of stdout (lossy UTF-8).
   */
  stdout: string;
  truncated: Truncation;
}
/**
 * The limits a run got, and which of them were lowered from what was asked.
 */
export interface AppliedLimits {
  /**
   * Names of the limits (`fuel`, `memory_bytes`, `timeout_ms`, `output_bytes`) that were
   * clamped below the request, by the local maximum or by the handler's signed capabilities.
   */
  clamped: string[];
  /**
   * Fuel units (roughly one per executed wasm instruction).
   */
  fuel: number;
  /**
   * Linear memory, in bytes, summed over the module's memories.
   */
  memory_bytes: number;
  /**
   * Bytes kept of each of stdout and stderr; the rest is counted and dropped.
   */
  output_bytes: number;
  /**
   * Wall-clock time, in milliseconds.
   */
  timeout_ms: number;
}
/**
 * Whether output was cut, with the total byte counts.
 */
export interface Truncation {
  /**
   * stderr produced more than the cap.
   */
  stderr: boolean;
  /**
   * Everything the handler wrote to stderr, kept or not.
   */
  stderr_total_bytes: number;
  /**
   * stdout produced more than the cap.
   */
  stdout: boolean;
  /**
   * Everything the handler wrote to stdout, kept or not.
   */
  stdout_total_bytes: number;
}
/**
 * Where an update stands: `refused` and `staged` answer an `update`; `succeeded` and
 * `failed` are its verdict, kept by the agent and sent after every reconnect until the
 * platform answers `update_ack`.
 */
export interface UpdateStatus {
  /**
   * The version of the agent sending this.
   */
  agent_version: string;
  /**
   * What happened, for people (at most 1024 bytes).
   */
  detail?: string | null;
  /**
   * The `update` message's id.
   */
  id: string;
  /**
   * Why, for `refused` and `failed`.
   */
  reason?: UpdateReason | null;
  /**
   * Where it stands.
   */
  state: 'refused' | 'staged' | 'succeeded' | 'failed';
  /**
   * The version the update is to (from its manifest; empty when the manifest did not parse).
   */
  version: string;
}
/**
 * Something the agent could not accept.
 */
export interface ErrorBody {
  /**
   * What kind of error.
   */
  code:
    | 'malformed'
    | 'unknown_type'
    | 'oversize'
    | 'too_deep'
    | 'unsupported_version'
    | 'unexpected'
    | 'module_mismatch'
    | 'binary_not_expected'
    | 'refused'
    | 'not_found';
  /**
   * The `id` of the message this answers, when it had a readable one.
   */
  id?: string | null;
  /**
   * A human-readable explanation.
   */
  message: string;
}

/**
 * Messages the platform sends.
 */
export type PlatformMessage =
  | {
      /**
       * The agent id the platform derived from the agent's TLS client certificate.
       */
      agent_id: string;
      /**
       * The sequence number of the newest audit record whose hash the platform has stored
       * for this agent (from an earlier `status`). The agent answers with that record's hash
       * as its chain now holds it (`status.audit.at`), so a rewritten chain shows. Absent
       * when the platform has stored none.
       */
      audit_seq?: number | null;
      /**
       * Whether this connection enrolled the agent (first contact with a token).
       */
      enrolled: boolean;
      type: 'welcome';
      /**
       * The protocol version both ends now speak.
       */
      version: number;
    }
  | (RunRequest & {
      type: 'run';
    })
  | {
      /**
       * Correlates the `cancel_reply`.
       */
      id: string;
      /**
       * The task to stop.
       */
      task_id: string;
      type: 'cancel';
    }
  | {
      /**
       * Task ids whose `result` the platform has stored.
       */
      task_ids: string[];
      type: 'ack';
    }
  | {
      /**
       * SHA-256 (hex) of the module file (the signed file, as uploaded).
       */
      file_sha256: string;
      /**
       * Correlates the reply (`handlers` or `error`; `need_module` first if the agent lacks the bytes).
       */
      id: string;
      /**
       * The command name.
       */
      name: string;
      /**
       * A detached signature (base64), when the module has no embedded one.
       */
      signature?: string | null;
      type: 'install_handler';
    }
  | {
      /**
       * Correlates the reply.
       */
      id: string;
      /**
       * The command name.
       */
      name: string;
      type: 'remove_handler';
    }
  | {
      /**
       * Correlates the reply.
       */
      id: string;
      type: 'list_handlers';
    }
  | {
      /**
       * Allow a release older than the running version (the agent's config must allow it too).
       */
      allow_downgrade?: boolean;
      /**
       * How long running tasks may take to finish before the agent restarts (default: the
       * agent's `update.drain_timeout_secs`).
       */
      drain_timeout_ms?: number | null;
      /**
       * Correlates `need_release` and `update_status`.
       */
      id: string;
      /**
       * The signed release manifest, as `bridgectl release sign` wrote it (at most 4096 bytes).
       */
      manifest: string;
      type: 'update';
    }
  | {
      /**
       * The update's id.
       */
      id: string;
      type: 'update_ack';
    }
  | (ErrorBody & {
      type: 'error';
    });

/**
 * Run a task.
 */
export interface RunRequest {
  /**
   * argv\[1..\] for the handler, or the extra arguments for a shell rule.
   */
  args?: string[];
  /**
   * The command to run (an installed handler or a shell rule).
   */
  command?: string | null;
  /**
   * SHA-256 (hex) of the exact bytes of a module file to run directly (the signed file,
   * embedded signature included). The agent runs what it has under that hash, or answers
   * `need_module` and waits for a binary frame holding exactly those bytes. (Version 1 and
   * journals written before version 2 call it `module_sha256`.)
   */
  file_sha256?: string | null;
  /**
   * Correlates the replies (`accepted`, `result`, `error`, `need_module`).
   */
  id: string;
  /**
   * The task may run again after the agent died while running it (instead of ending as
   * `interrupted`).
   */
  idempotent?: boolean;
  /**
   * The task input: any JSON value, given to a handler on stdin (shell commands get
   * `/dev/null`).
   */
  input?: {
    [k: string]: unknown;
  };
  limits?: LimitRequest;
  /**
   * RFC 3339 time after which the task must not start (`rejected`, reason
   * `deadline_passed`).
   */
  not_after?: string | null;
  /**
   * A detached signature (base64 of the envelope), when the module has no embedded one.
   */
  signature?: string | null;
  /**
   * Send stdout/stderr as `chunk` messages while the task runs.
   */
  stream?: boolean;
  /**
   * The platform's task id. The agent runs a task id at most once: a `run` repeating a task
   * id it has seen is answered from its journal (the stored result, or the current state).
   */
  task_id: string;
}
/**
 * Requested limits (clamped by the agent).
 */
export interface LimitRequest {
  /**
   * Requested fuel.
   */
  fuel?: number | null;
  /**
   * Requested linear memory in bytes.
   */
  memory_bytes?: number | null;
  /**
   * Requested output cap in bytes (per stream).
   */
  output_bytes?: number | null;
  /**
   * Requested wall-clock timeout in milliseconds.
   */
  timeout_ms?: number | null;
}
/**
 * Something the platform could not accept.
 */
