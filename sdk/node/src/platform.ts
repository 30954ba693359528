// The Platform: the server agents connect to (mutual TLS, enrollment, the version handshake), and what a
// platform does with them: run tasks and wait for their results, stored exactly once before they are acknowledged.

import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createServer, type Server } from 'node:https';
import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { WebSocketServer } from 'ws';

import { AuditStore, isAgentId, type AuditFlag } from './audit.js';
import { bearer, DEFAULT_TOKEN_TTL_MS, REFUSAL_TEXT, Registry } from './enroll.js';
import { FileStore } from './file-store.js';
import { ensureStateDir } from './files.js';
import { CLOSE_REPLACED, IDLE_TIMEOUT_MS, Session, type Logger, type SessionHost } from './session.js';
import type { ResultStore, StoredResult } from './store.js';
import { agentIdOf, identityFromOptions, loadOrCreateIdentity } from './tls.js';
import { PlatformError, type AgentInfo, type Chunk, type PlatformEvents, type PlatformHooks, type PlatformOptions, type RequestOptions, type RunOptions } from './api.js';
import {
  AGENT_PATH,
  encodeCancel,
  encodeError,
  encodeInstallHandler,
  encodeListHandlers,
  encodeRemoveHandler,
  encodeRun,
  encodeUpdateAck,
  MAX_BINARY_BYTES,
  MAX_ID_BYTES,
  MAX_WS_PAYLOAD,
  UNRECORDED_REASONS,
  utf8Bytes,
  type AgentMessage,
  type CancelOutcome,
  type ErrorBody,
  type HandlerInfo,
  type LimitRequest,
  type RunResult,
  type StatusReport,
  type TaskState,
  type UpdateStatus,
} from './wire.js';

export { PlatformError } from './api.js';
export type { AgentInfo, Chunk, PlatformErrorCode, PlatformEvents, PlatformHooks, PlatformOptions, RequestOptions, RunOptions } from './api.js';

interface Waiter {
  resolve: (r: RunResult) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  onChunk: ((c: Chunk) => void) | undefined;
  nextSeq: number;
}

interface Task {
  taskId: string;
  agentId: string;
  runId: string;
  wire: string;
  fileSha256: string | undefined;
  accepted: boolean;
  state: TaskState | undefined;
  waiters: Set<Waiter>;
  /** When the `run` was last sent (`process.hrtime.bigint()`). */
  sentAt: bigint;
}

type Reply = { kind: 'cancel'; outcome: CancelOutcome } | { kind: 'handlers'; handlers: HandlerInfo[] };

interface PendingRequest {
  agentId: string;
  session: Session;
  expects: Reply['kind'];
  fileSha256: string | undefined;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

interface Live {
  session: Session | undefined;
  lastSeen: string | null;
  status: StatusReport | null;
  agentVersion: string | null;
}

const DEFAULT_WAIT_MS = 60_000;
const DEFAULT_REQUEST_WAIT_MS = 30_000;
const HTTP_TIMEOUT_MS = 10_000;

function stamp(d = new Date()): string {
  return d.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

function requestId(prefix: string): string {
  return `${prefix}-${randomBytes(8).toString('hex')}`;
}

function parseListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(listen);
  const port = m === null ? NaN : Number(m[3]);
  if (m === null || port > 65535) throw new PlatformError('invalid', `listen must be HOST:PORT, not ${JSON.stringify(listen)}`);
  return { host: (m[1] ?? m[2]) as string, port };
}

function positive(name: string, v: number | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (!Number.isSafeInteger(v) || v < 1) throw new PlatformError('invalid', `${name} must be a positive integer`);
  return v;
}

function checkId(name: string, v: string): void {
  if (typeof v !== 'string' || v === '' || utf8Bytes(v) > MAX_ID_BYTES) {
    throw new PlatformError('invalid', `${name} must be a non-empty string of at most ${MAX_ID_BYTES} bytes`);
  }
}

function refuseUpgrade(socket: Duplex, status: number, body: string, refusal?: string): void {
  const text = body + '\n';
  const head = [
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}`,
    'Content-Type: text/plain; charset=utf-8',
    `Content-Length: ${Buffer.byteLength(text)}`,
    ...(refusal === undefined ? [] : [`X-Bridge-Refusal: ${refusal}`]),
    'Connection: close',
  ];
  socket.end(head.join('\r\n') + '\r\n\r\n' + text);
}

/**
 * The platform side of the bridge protocol: agents connect to it over mutual TLS, enroll with a
 * one-time token, and run what it sends. Every result is written to the store before the agent is
 * told to forget it, so each task's result is kept exactly once, across restarts of either end.
 *
 * ```ts
 * const platform = await Platform.start({ listen: '127.0.0.1:8443', stateDir: '/var/lib/my-platform' });
 * const token = await platform.issueToken();
 * // bridge-daemon run --server ${platform.url} --server-pin ${platform.pin} --token ${token}
 * const agent = await platform.waitForAgent(undefined, { timeoutMs: 60_000 });
 * const result = await platform.run(agent.id, { command: 'disk-usage', args: ['/var/log'] });
 * ```
 */
export class Platform extends EventEmitter<PlatformEvents> {
  /** Where agents connect: `wss://HOST:PORT/agent`. */
  readonly url: string;
  /** The server pin: the 64-hex SHA-256 of the server key's SPKI, as `bridge-daemon run --server-pin` takes it. */
  readonly pin: string;
  /** The port listened on. */
  readonly port: number;

  private readonly server: Server;
  private readonly wss: WebSocketServer;
  private readonly registry: Registry;
  private readonly store: ResultStore;
  private readonly audit: AuditStore;
  private readonly hooks: PlatformHooks;
  private readonly log: Logger;
  private readonly tokenTtlMs: number;
  private readonly onRoundTrip: ((us: number, taskId: string) => void) | undefined;
  private readonly live = new Map<string, Live>();
  private readonly sessions = new Set<Session>();
  private readonly tasks = new Map<string, Task>();
  private readonly runIds = new Map<string, string>();
  private readonly requests = new Map<string, PendingRequest>();
  private readonly modules = new Map<string, { bytes: Uint8Array; refs: number }>();
  private readonly agentWaiters = new Set<{ id: string | undefined; resolve: (a: AgentInfo) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private readonly storing = new Set<Promise<void>>();
  /** Per agent, the last of its statuses being judged: its statuses are taken in order. */
  private readonly statusQueues = new Map<string, Promise<void>>();
  private closed = false;
  private closing: Promise<void> | undefined;

  private constructor(args: {
    server: Server;
    registry: Registry;
    store: ResultStore;
    audit: AuditStore;
    pin: string;
    host: string;
    port: number;
    options: PlatformOptions;
  }) {
    super();
    this.server = args.server;
    this.registry = args.registry;
    this.store = args.store;
    this.audit = args.audit;
    this.pin = args.pin;
    this.port = args.port;
    const host = args.host.includes(':') ? `[${args.host}]` : args.host;
    this.url = `wss://${host}:${args.port}${AGENT_PATH}`;
    this.hooks = args.options.hooks ?? {};
    this.log = args.options.log ?? (() => undefined);
    this.tokenTtlMs = args.options.tokenTtlMs ?? DEFAULT_TOKEN_TTL_MS;
    this.onRoundTrip = args.options.onRoundTrip;
    this.sessionHost = {
      welcomed: (s) => this.onWelcomed(s),
      message: (s, m) => this.onMessage(s, m),
      closed: (s, why) => this.onClosed(s, why),
      log: (level, message, fields) => this.log(level, message, fields),
      idleTimeoutMs: args.options.idleTimeoutMs ?? IDLE_TIMEOUT_MS,
      auditSeq: (agentId) => this.audit.auditSeq(agentId),
    };
    this.wss = new WebSocketServer({ noServer: true, maxPayload: MAX_WS_PAYLOAD, perMessageDeflate: false, clientTracking: false });
    this.server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      this.onUpgrade(req, socket, head).catch((e: unknown) => {
        this.log('error', `upgrade failed: ${(e as Error).message}`);
        socket.destroy();
      });
    });
  }

  /**
   * Starts a platform: creates or reuses the state directory, its server key and certificate
   * (so the pin never changes), opens the store, and listens.
   */
  static async start(options: PlatformOptions): Promise<Platform> {
    const { host, port } = parseListen(options.listen);
    if (options.tokenTtlMs !== undefined && (!Number.isSafeInteger(options.tokenTtlMs) || options.tokenTtlMs < 0)) {
      throw new PlatformError('invalid', 'tokenTtlMs must be a non-negative integer');
    }
    if (options.idleTimeoutMs !== undefined && (!Number.isSafeInteger(options.idleTimeoutMs) || options.idleTimeoutMs < 1000)) {
      throw new PlatformError('invalid', 'idleTimeoutMs must be an integer of at least 1000');
    }
    await ensureStateDir(options.stateDir);
    const identity = options.tls !== undefined ? identityFromOptions(options.tls) : await loadOrCreateIdentity(options.stateDir, options.hostnames ?? []);
    const registry = await Registry.open(options.stateDir);
    const audit = await AuditStore.open(options.stateDir, registry.list().map((r) => r.id));
    const store = options.store ?? FileStore.inDir(options.stateDir);
    await store.open();
    const server = createServer({
      key: identity.key,
      cert: identity.cert,
      ...(identity.ca !== undefined ? { ca: identity.ca } : {}),
      requestCert: true,
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
      handshakeTimeout: HTTP_TIMEOUT_MS,
      headersTimeout: HTTP_TIMEOUT_MS,
      requestTimeout: HTTP_TIMEOUT_MS,
    });
    server.on('request', (req, res) => {
      const path = (req.url ?? '').split('?')[0];
      const status = path === AGENT_PATH ? 426 : 404;
      res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', Connection: 'close' });
      res.end(path === AGENT_PATH ? 'agents connect here with a WebSocket upgrade\n' : `not found: agents connect to ${AGENT_PATH}\n`);
    });
    server.on('tlsClientError', () => undefined);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (e) {
      await store.close();
      throw e;
    }
    const bound = (server.address() as AddressInfo).port;
    return new Platform({ server, registry, store, audit, pin: identity.pin, host, port: bound, options });
  }

  // ---- connections ---------------------------------------------------------------------------

  private async onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const peer = `${req.socket.remoteAddress ?? '?'}:${req.socket.remotePort ?? '?'}`;
    if (this.closed) return void refuseUpgrade(socket, 503, 'the platform is shutting down');
    const path = (req.url ?? '').split('?')[0];
    if (path !== AGENT_PATH) return void refuseUpgrade(socket, 404, `not found: agents connect to ${AGENT_PATH}`);
    const cert = (req.socket as TLSSocket).getPeerCertificate(false);
    if (cert === null || cert.raw === undefined || cert.raw.length === 0) {
      return void refuseUpgrade(socket, 401, 'agents connect here with their TLS client certificate (mutual TLS); none was presented');
    }
    const agentId = agentIdOf(cert.raw);
    let admission;
    try {
      admission = await this.registry.admit(agentId, bearer(req.headers.authorization));
    } catch (e) {
      this.log('error', `cannot record an enrollment: ${(e as Error).message}`, { agentId });
      return void refuseUpgrade(socket, 500, 'the platform could not record the enrollment');
    }
    if (admission.kind === 'refused') {
      this.log('warn', `refused the upgrade: ${admission.reason}`, { agentId, peer, reason: admission.reason });
      refuseUpgrade(socket, 401, REFUSAL_TEXT[admission.reason], admission.reason);
      this.emit('refused', { agentId, reason: admission.reason, peer });
      return;
    }
    if (admission.kind === 'enrolled') this.log('info', 'enrolled a new agent', { agentId, peer });
    // The `welcome` names the audit seq stored for the agent: its state must be in memory.
    if (!this.audit.isLoaded(agentId)) await this.audit.load(agentId);
    if (this.closed || socket.destroyed) return void socket.destroy();
    this.wss.handleUpgrade(req, socket, head, (ws) => {
      const session = new Session(ws, agentId, admission.kind === 'enrolled', this.sessionHost);
      this.sessions.add(session);
      this.log('info', 'agent connected', { agentId, peer });
    });
  }

  private readonly sessionHost: SessionHost;

  private liveOf(agentId: string): Live {
    let l = this.live.get(agentId);
    if (l === undefined) {
      l = { session: undefined, lastSeen: null, status: null, agentVersion: null };
      this.live.set(agentId, l);
    }
    return l;
  }

  private onWelcomed(session: Session): void {
    if (this.closed) return session.close(1001, 'the platform is shutting down');
    const live = this.liveOf(session.agentId);
    const older = live.session;
    live.session = session;
    live.lastSeen = stamp();
    live.agentVersion = session.agentVersion;
    if (older !== undefined && older !== session) {
      this.log('info', 'a newer connection replaces this one', { agentId: session.agentId });
      this.failRequests(older, 'replaced by a newer connection of the agent');
      older.close(CLOSE_REPLACED, 'replaced by a newer connection');
    }
    // Runs the agent has not answered may never have arrived: send them again.
    for (const task of this.tasks.values()) {
      if (task.agentId === session.agentId && !task.accepted && session.send(task.wire)) task.sentAt = process.hrtime.bigint();
    }
    const info = this.info(session.agentId);
    if (info !== undefined) {
      this.emit('agentConnected', info, session.enrolled);
      for (const w of this.agentWaiters) {
        if (w.id === undefined || w.id === info.id) {
          this.agentWaiters.delete(w);
          clearTimeout(w.timer);
          w.resolve(info);
        }
      }
    }
  }

  private onClosed(session: Session, why: string): void {
    this.sessions.delete(session);
    const live = this.live.get(session.agentId);
    this.failRequests(session, `the agent's connection ended: ${why}`);
    if (live?.session === session) {
      live.session = undefined;
      this.log('info', `agent disconnected: ${why}`, { agentId: session.agentId });
      this.emit('agentDisconnected', session.agentId, why);
    }
  }

  private failRequests(session: Session, why: string): void {
    for (const [id, r] of this.requests) {
      if (r.session === session) this.endRequest(id, r, new PlatformError('disconnected', why));
    }
  }

  private onMessage(session: Session, m: AgentMessage): void {
    const agentId = session.agentId;
    const live = this.liveOf(agentId);
    live.lastSeen = stamp();
    switch (m.type) {
      case 'status':
        return this.onStatus(session, m.status);
      case 'need_module': {
        const module = this.modules.get(m.fileSha256);
        const answer =
          module !== undefined
            ? module.bytes
            : encodeError({ id: m.id, code: 'unexpected', message: `the platform has no module with SHA-256 ${m.fileSha256.slice(0, 64)}` });
        if (module === undefined) this.log('warn', 'the agent asked for an unknown module', { agentId, id: m.id });
        // Even the error is one the agent waits for: it must not be dropped.
        if (!session.reply(answer)) session.close(1008, 'too many module requests without reading the answers');
        return;
      }
      case 'accepted': {
        const task = this.tasks.get(m.taskId);
        if (task !== undefined && task.agentId === agentId) {
          task.accepted = true;
          task.state = m.state;
        }
        return;
      }
      case 'chunk': {
        const task = this.tasks.get(m.taskId);
        if (task === undefined || task.agentId !== agentId) return;
        const chunk: Chunk = { taskId: m.taskId, seq: m.seq, stream: m.stream, data: m.data, droppedBytes: m.droppedBytes };
        for (const w of task.waiters) {
          if (w.onChunk === undefined || m.seq < w.nextSeq) continue;
          w.nextSeq = m.seq + 1;
          try {
            w.onChunk(chunk);
          } catch (e) {
            this.log('error', `onChunk threw: ${(e as Error).message}`, { taskId: m.taskId });
          }
        }
        return;
      }
      case 'cancel_reply':
        return this.onReply(agentId, m.id, { kind: 'cancel', outcome: m.outcome });
      case 'handlers':
        return this.onReply(agentId, m.id, { kind: 'handlers', handlers: m.handlers });
      case 'result': {
        const p = this.onResult(session, m.id, m.taskId, m.result);
        this.storing.add(p);
        void p.finally(() => this.storing.delete(p));
        return;
      }
      case 'need_release':
        // This platform sends no `update`, so it has no release to serve; the error is an answer
        // the agent waits for (in order with module uploads): it must not be dropped.
        this.log('warn', 'the agent asked for a release (this platform serves none)', { agentId, id: m.id });
        if (!session.reply(encodeError({ id: m.id, code: 'not_found', message: `the platform serves no release (update ${m.id.slice(0, 64)})` }))) {
          session.close(1008, 'too many requests without reading the answers');
        }
        return;
      case 'update_status':
        return this.onUpdateStatus(session, m.status);
      case 'error':
        return this.onAgentError(agentId, m.error);
      case 'hello':
        return;
    }
  }

  /**
   * Takes a status (checked when decoded) after the agent's earlier ones: judges and stores the
   * audit head it carries (written before the status is announced), then keeps and announces it.
   * Reading pauses while too many results and statuses are being stored.
   */
  private onStatus(session: Session, status: StatusReport): void {
    const agentId = session.agentId;
    if (status.agent_id !== agentId) this.log('warn', 'status names another agent id', { agentId });
    session.storingStarted();
    const before = this.statusQueues.get(agentId) ?? Promise.resolve();
    const p = before.then(() => this.takeStatus(agentId, status)).finally(() => session.storingEnded());
    this.statusQueues.set(agentId, p);
    this.storing.add(p);
    void p.finally(() => {
      this.storing.delete(p);
      if (this.statusQueues.get(agentId) === p) this.statusQueues.delete(agentId);
    });
  }

  private async takeStatus(agentId: string, status: StatusReport): Promise<void> {
    let raised: AuditFlag | undefined;
    if (status.audit !== undefined && status.audit !== null) {
      try {
        raised = await this.audit.observe(agentId, status.audit);
      } catch (e) {
        this.log('error', `cannot store the audit head: ${(e as Error).message}`, { agentId });
      }
    }
    this.liveOf(agentId).status = status;
    if (raised !== undefined) {
      this.log('warn', `audit chain flagged ${raised.kind}: ${raised.detail}`, { agentId, kind: raised.kind, seq: raised.seq });
      this.emitSafely('auditFlagged', agentId, raised);
    }
    this.emitSafely('status', agentId, status);
  }

  /** Emits an event whose listeners' exceptions are logged, not thrown. */
  private emitSafely<K extends 'auditFlagged' | 'status'>(event: K, ...args: PlatformEvents[K]): void {
    try {
      (this.emit as (e: K, ...a: PlatformEvents[K]) => boolean)(event, ...args);
    } catch (e) {
      this.log('error', `a ${event} listener threw: ${(e as Error).message}`, { agentId: args[0] });
    }
  }

  /** Announces an update's status; acknowledges a verdict once every listener has returned. */
  private onUpdateStatus(session: Session, status: UpdateStatus): void {
    const agentId = session.agentId;
    this.log(status.state === 'failed' || status.state === 'refused' ? 'warn' : 'info', `update ${status.state}`, {
      agentId,
      id: status.id,
      version: status.version,
      agentVersion: status.agent_version,
      reason: status.reason ?? undefined,
    });
    try {
      this.emit('update', agentId, status);
    } catch (e) {
      // Not acknowledged: the agent sends the verdict again after its next reconnect.
      this.log('error', `an update listener threw (the verdict is not acknowledged): ${(e as Error).message}`, { agentId, id: status.id });
      return;
    }
    if (status.state === 'succeeded' || status.state === 'failed') {
      // Dropped when the agent does not read its replies: it sends the verdict again later.
      if (!session.reply(encodeUpdateAck(status.id))) this.log('warn', 'the reply queue is full: an update_ack is dropped', { agentId, id: status.id });
    }
  }

  private onReply(agentId: string, id: string, reply: Reply): void {
    const r = this.requests.get(id);
    if (r === undefined || r.agentId !== agentId || r.expects !== reply.kind) {
      this.log('warn', `${reply.kind === 'cancel' ? 'cancel_reply' : 'handlers'} for no waiting request (ignored)`, { agentId, id });
      return;
    }
    this.requests.delete(id);
    clearTimeout(r.timer);
    this.release(r.fileSha256);
    r.resolve(reply);
  }

  private onAgentError(agentId: string, body: ErrorBody): void {
    const why = `${body.code}: ${body.message}`;
    if (body.id !== undefined) {
      const taskId = this.runIds.get(body.id);
      const task = taskId === undefined ? undefined : this.tasks.get(taskId);
      if (task !== undefined && task.agentId === agentId) {
        this.log('warn', `the agent refused a run: ${why}`, { agentId, taskId });
        this.endTask(task, (w) => w.reject(new PlatformError('agent_error', `the agent answered the run with an error: ${why}`, body)));
        return;
      }
      const r = this.requests.get(body.id);
      if (r !== undefined && r.agentId === agentId) {
        this.endRequest(body.id, r, new PlatformError('agent_error', `the agent refused: ${why}`, body));
        return;
      }
    }
    this.log('warn', `the agent reported an error: ${why}`, { agentId, id: body.id });
  }

  /** Stores a result, then acknowledges it (a refusal the agent does not record is acknowledged, not stored). */
  private async onResult(session: Session, runId: string, taskId: string, result: RunResult): Promise<void> {
    const agentId = session.agentId;
    session.storingStarted();
    try {
      if (result.status === 'rejected' && typeof result.reason === 'string' && UNRECORDED_REASONS.has(result.reason)) {
        session.ack(taskId);
        const task = this.tasks.get(taskId);
        if (task !== undefined && task.agentId === agentId && task.runId === runId) this.finish(task, result);
        return;
      }
      const outcome = await this.store.put(taskId, agentId, result as unknown as Record<string, unknown>);
      await this.hooks.afterStore?.(taskId);
      session.ack(taskId);
      const task = this.tasks.get(taskId);
      if (outcome.kind === 'conflict') {
        this.log('warn', 'a result for a task id whose stored result came from another agent (acknowledged, not stored)', { agentId, taskId, storedFrom: outcome.stored.agentId });
        if (task !== undefined && task.agentId === agentId) {
          this.endTask(task, (w) => w.reject(new PlatformError('conflict', `task ${taskId}: the stored result came from agent ${outcome.stored.agentId}`)));
        }
        return;
      }
      if (task !== undefined && task.agentId === agentId) this.finish(task, outcome.stored.result as unknown as RunResult);
    } catch (e) {
      this.log('error', `cannot store a result (not acknowledged; the agent will send it again): ${(e as Error).message}`, { agentId, taskId });
    } finally {
      session.storingEnded();
    }
  }

  // ---- tasks and requests --------------------------------------------------------------------

  private retain(sha: string, bytes: Uint8Array): void {
    const m = this.modules.get(sha);
    if (m === undefined) this.modules.set(sha, { bytes, refs: 1 });
    else m.refs++;
  }

  private release(sha: string | undefined): void {
    if (sha === undefined) return;
    const m = this.modules.get(sha);
    if (m !== undefined && --m.refs === 0) this.modules.delete(sha);
  }

  /** Ends a task with its result. */
  private finish(task: Task, result: RunResult): void {
    if (this.onRoundTrip !== undefined && this.tasks.get(task.taskId) === task) {
      const us = Number((process.hrtime.bigint() - task.sentAt) / 1000n);
      try {
        this.onRoundTrip(us, task.taskId);
      } catch (e) {
        this.log('error', `onRoundTrip threw: ${(e as Error).message}`);
      }
    }
    this.endTask(task, (w) => w.resolve(result));
  }

  private endTask(task: Task, settle: (w: Waiter) => void): void {
    if (this.tasks.get(task.taskId) === task) {
      this.tasks.delete(task.taskId);
      this.runIds.delete(task.runId);
      this.release(task.fileSha256);
    }
    for (const w of task.waiters) {
      clearTimeout(w.timer);
      settle(w);
    }
    task.waiters.clear();
  }

  private endRequest(id: string, r: PendingRequest, error: Error): void {
    if (this.requests.get(id) !== r) return;
    this.requests.delete(id);
    clearTimeout(r.timer);
    this.release(r.fileSha256);
    r.reject(error);
  }

  private ensureOpen(): void {
    if (this.closed) throw new PlatformError('closed', 'the platform is closed');
  }

  private enrolled(agentId: string): void {
    if (typeof agentId !== 'string' || !this.registry.isEnrolled(agentId)) {
      throw new PlatformError('unknown_agent', `no enrolled agent has the id ${String(agentId).slice(0, 80)}`);
    }
  }

  private connected(agentId: string): Session {
    this.enrolled(agentId);
    const s = this.live.get(agentId)?.session;
    if (s === undefined || s.closing) throw new PlatformError('not_connected', `agent ${agentId} is not connected`);
    return s;
  }

  /**
   * Runs a task on an agent and resolves with its result, as the agent sends it. The result is
   * stored before it is acknowledged; a task id whose result is already stored (from this agent)
   * is answered from the store without sending anything. A `run` of a task id already in flight to
   * this agent waits for that task's result (its own options are not sent). A refusal that is
   * not the task's result (`rejected` with reason `busy`, `updating`, `storage_full`, `storage_error`,
   * `unknown_command`, `deadline_passed`) resolves the run but is not stored.
   *
   * Rejects with a {@link PlatformError}: `unknown_agent`, `not_connected` (when it must be sent),
   * `timeout` (after `waitMs`; the result is still stored when it comes), `agent_error` (the agent
   * answered the `run` with an `error`), `conflict`, `invalid`, `closed`.
   */
  async run(agentId: string, options: RunOptions): Promise<RunResult> {
    this.ensureOpen();
    const o = options;
    if ((o.command === undefined) === (o.module === undefined)) throw new PlatformError('invalid', 'give exactly one of command and module');
    if (o.command !== undefined) checkId('command', o.command);
    if (o.module !== undefined) {
      if (!(o.module instanceof Uint8Array)) throw new PlatformError('invalid', 'module must be a Uint8Array');
      if (o.module.length > MAX_BINARY_BYTES) throw new PlatformError('invalid', `module is larger than ${MAX_BINARY_BYTES} bytes`);
    }
    if (o.signature !== undefined && o.module === undefined) throw new PlatformError('invalid', 'signature goes with module');
    if (o.args !== undefined && (!Array.isArray(o.args) || !o.args.every((a) => typeof a === 'string'))) {
      throw new PlatformError('invalid', 'args must be an array of strings');
    }
    const taskId = o.taskId ?? randomUUID();
    checkId('taskId', taskId);
    const limits: LimitRequest = {};
    const fuel = positive('fuel', o.fuel);
    const memoryMiB = positive('memoryMiB', o.memoryMiB);
    const timeoutMs = positive('timeoutMs', o.timeoutMs);
    const outputBytes = positive('outputBytes', o.outputBytes);
    if (fuel !== undefined) limits.fuel = fuel;
    if (memoryMiB !== undefined) limits.memory_bytes = memoryMiB * 1024 * 1024;
    if (timeoutMs !== undefined) limits.timeout_ms = timeoutMs;
    if (outputBytes !== undefined) limits.output_bytes = outputBytes;
    let notAfter: string | undefined;
    if (o.notAfter !== undefined) {
      const d = o.notAfter instanceof Date ? o.notAfter : new Date(o.notAfter);
      if (Number.isNaN(d.getTime())) throw new PlatformError('invalid', 'notAfter is not a date');
      notAfter = stamp(d);
    }
    const waitMs = positive('waitMs', o.waitMs) ?? Math.max(DEFAULT_WAIT_MS, (timeoutMs ?? 0) + 30_000);
    let input: unknown = o.input ?? null;
    if (input !== null) {
      const text = JSON.stringify(input);
      if (text === undefined) throw new PlatformError('invalid', 'input is not JSON');
      input = JSON.parse(text) as unknown;
    }
    this.enrolled(agentId);

    const stored = await this.store.get(taskId);
    if (stored !== undefined) {
      if (stored.agentId === agentId) return stored.result as unknown as RunResult;
      throw new PlatformError('conflict', `task ${taskId}: its stored result came from agent ${stored.agentId} (task ids are global)`);
    }
    this.ensureOpen();
    let task = this.tasks.get(taskId);
    if (task !== undefined && task.agentId !== agentId) throw new PlatformError('conflict', `task ${taskId} is in flight on agent ${task.agentId}`);
    if (task === undefined) {
      const session = this.connected(agentId);
      const runId = requestId('run');
      const fileSha256 = o.module === undefined ? undefined : createHash('sha256').update(o.module).digest('hex');
      const wire = encodeRun({
        id: runId,
        taskId,
        ...(o.command !== undefined ? { command: o.command } : {}),
        ...(fileSha256 !== undefined ? { fileSha256 } : {}),
        ...(o.signature !== undefined ? { signature: Buffer.from(o.signature).toString('base64') } : {}),
        input,
        ...(o.args !== undefined ? { args: o.args } : {}),
        limits,
        ...(notAfter !== undefined ? { notAfter } : {}),
        idempotent: o.idempotent === true,
        stream: o.onChunk !== undefined,
      });
      if (utf8Bytes(wire) > 1024 * 1024) throw new PlatformError('invalid', 'the run message is larger than 1 MiB (input too large?)');
      if (fileSha256 !== undefined && o.module !== undefined) this.retain(fileSha256, o.module);
      task = { taskId, agentId, runId, wire, fileSha256, accepted: false, state: undefined, waiters: new Set(), sentAt: process.hrtime.bigint() };
      this.tasks.set(taskId, task);
      this.runIds.set(runId, taskId);
      session.send(wire);
    }
    const t = task;
    return new Promise<RunResult>((resolve, reject) => {
      const w: Waiter = {
        resolve,
        reject,
        onChunk: o.onChunk,
        nextSeq: 0,
        timer: setTimeout(() => {
          t.waiters.delete(w);
          if (t.waiters.size === 0) this.endTask(t, () => undefined);
          reject(new PlatformError('timeout', `no result for task ${taskId} within ${waitMs} ms`));
        }, waitMs),
      };
      t.waiters.add(w);
    });
  }

  private request(agentId: string, expects: Reply['kind'], prefix: string, encode: (id: string) => string, waitMs: number | undefined, module?: { sha: string; bytes: Uint8Array }): Promise<Reply> {
    this.ensureOpen();
    const wait = positive('waitMs', waitMs) ?? DEFAULT_REQUEST_WAIT_MS;
    const session = this.connected(agentId);
    const id = requestId(prefix);
    return new Promise<Reply>((resolve, reject) => {
      const r: PendingRequest = {
        agentId,
        session,
        expects,
        fileSha256: module?.sha,
        resolve,
        reject,
        timer: setTimeout(() => this.endRequest(id, r, new PlatformError('timeout', `no reply from agent ${agentId} within ${wait} ms`)), wait),
      };
      if (module !== undefined) this.retain(module.sha, module.bytes);
      this.requests.set(id, r);
      session.send(encode(id));
    });
  }

  /** Cancels a task (queued or running); resolves with the agent's outcome: `cancelling`, `dequeued`, `finished` or `unknown`. */
  async cancel(agentId: string, taskId: string, options: RequestOptions = {}): Promise<CancelOutcome> {
    checkId('taskId', taskId);
    const r = await this.request(agentId, 'cancel', 'cancel', (id) => encodeCancel(id, taskId), options.waitMs);
    if (r.kind !== 'cancel') throw new Error('unreachable');
    return r.outcome;
  }

  /**
   * Installs (or replaces) the handler for a command name: `signedBytes` is a module signed for
   * that name. Resolves with the handlers after the change; rejects with `agent_error` (and
   * `reason`, e.g. `out_of_scope`) when the agent refuses it.
   */
  async installHandler(agentId: string, name: string, signedBytes: Uint8Array, options: RequestOptions & { signature?: Uint8Array } = {}): Promise<HandlerInfo[]> {
    checkId('name', name);
    if (!(signedBytes instanceof Uint8Array) || signedBytes.length > MAX_BINARY_BYTES) {
      throw new PlatformError('invalid', `signedBytes must be a Uint8Array of at most ${MAX_BINARY_BYTES} bytes`);
    }
    const sha = createHash('sha256').update(signedBytes).digest('hex');
    const signature = options.signature === undefined ? undefined : Buffer.from(options.signature).toString('base64');
    const r = await this.request(agentId, 'handlers', 'install', (id) => encodeInstallHandler(id, name, sha, signature), options.waitMs, { sha, bytes: signedBytes });
    if (r.kind !== 'handlers') throw new Error('unreachable');
    return r.handlers;
  }

  /** Removes the handler for a command name; resolves with the handlers after the change (`agent_error` `not_found` when none). */
  async removeHandler(agentId: string, name: string, options: RequestOptions = {}): Promise<HandlerInfo[]> {
    checkId('name', name);
    const r = await this.request(agentId, 'handlers', 'remove', (id) => encodeRemoveHandler(id, name), options.waitMs);
    if (r.kind !== 'handlers') throw new Error('unreachable');
    return r.handlers;
  }

  /** The agent's installed handlers. */
  async handlers(agentId: string, options: RequestOptions = {}): Promise<HandlerInfo[]> {
    const r = await this.request(agentId, 'handlers', 'handlers', (id) => encodeListHandlers(id), options.waitMs);
    if (r.kind !== 'handlers') throw new Error('unreachable');
    return r.handlers;
  }

  /** The stored result of a task id (from the store), or `undefined`. */
  async result(taskId: string): Promise<StoredResult | undefined> {
    this.ensureOpen();
    return this.store.get(taskId);
  }

  // ---- agents and tokens ---------------------------------------------------------------------

  /** Mints a one-time enrollment token valid `ttlMs` (default `tokenTtlMs`, 24 h; 0: no expiry). Only its hash is stored. */
  async issueToken(options: { ttlMs?: number } = {}): Promise<string> {
    this.ensureOpen();
    return this.registry.issueToken(options.ttlMs ?? this.tokenTtlMs);
  }

  private info(id: string): AgentInfo | undefined {
    const record = this.registry.get(id);
    if (record === undefined) return undefined;
    const live = this.live.get(id);
    const audit = this.audit.view(id);
    return {
      id,
      connected: live?.session !== undefined,
      enrolledAt: record.enrolled_at,
      lastSeen: live?.lastSeen ?? null,
      status: live?.status ?? null,
      agentVersion: live?.agentVersion ?? null,
      audit: audit.audit,
      ...(audit.error !== undefined ? { auditError: audit.error } : {}),
    };
  }

  /**
   * Clears the audit flag of an enrolled agent once its cause is understood; resolves with the
   * flag cleared (`null` if there was none). From then on its chain is judged from the head it
   * reports now. Rejects with `unknown_agent`, `closed`, or the error that keeps its stored state
   * from being read or written (the file is left as it is).
   */
  async clearAuditFlag(agentId: string): Promise<AuditFlag | null> {
    this.ensureOpen();
    this.enrolled(agentId);
    if (!isAgentId(agentId)) throw new PlatformError('unknown_agent', `no enrolled agent has the id ${String(agentId).slice(0, 80)}`);
    const cleared = await this.audit.clear(agentId);
    if (cleared !== null) this.log('info', 'audit flag cleared', { agentId, kind: cleared.kind, seq: cleared.seq });
    return cleared;
  }

  /** Every enrolled agent. */
  agents(): AgentInfo[] {
    return this.registry.list().flatMap((r) => this.info(r.id) ?? []);
  }

  /**
   * Resolves with the agent once it is connected: the agent `id`, or without an id any agent
   * (one connected now, else the next to connect). Rejects with `timeout` after `timeoutMs`
   * (default 30 s).
   */
  async waitForAgent(id?: string, options: { timeoutMs?: number } = {}): Promise<AgentInfo> {
    this.ensureOpen();
    const now = id === undefined ? this.agents().find((a) => a.connected) : this.info(id);
    if (now?.connected === true) return now;
    const timeoutMs = positive('timeoutMs', options.timeoutMs) ?? 30_000;
    return new Promise((resolve, reject) => {
      const w = {
        id,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.agentWaiters.delete(w);
          reject(new PlatformError('timeout', `${id === undefined ? 'no agent' : `agent ${id}`} connected within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.agentWaiters.add(w);
    });
  }

  /**
   * Stops: refuses new connections, closes every agent connection (1001), rejects what waits
   * (`closed`), lets results being stored finish (and be acknowledged), closes the store. Leaves
   * no handle open.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    this.closed = true;
    const serverClosed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeAllConnections();
    await Promise.allSettled([...this.storing]);
    const closedError = () => new PlatformError('closed', 'the platform was closed');
    for (const task of [...this.tasks.values()]) this.endTask(task, (w) => w.reject(closedError()));
    for (const [id, r] of [...this.requests]) this.endRequest(id, r, closedError());
    for (const w of this.agentWaiters) {
      clearTimeout(w.timer);
      w.reject(closedError());
    }
    this.agentWaiters.clear();
    const sessions = [...this.sessions];
    for (const s of sessions) s.close(1001, 'the platform is shutting down');
    await Promise.all(sessions.map((s) => s.whenEnded()));
    this.wss.close();
    await serverClosed;
    await Promise.allSettled([...this.storing]);
    await this.audit.settle();
    await this.registry.settle();
    await this.store.close();
  }
}
