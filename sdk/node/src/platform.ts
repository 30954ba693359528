// The Platform: the server agents connect to (mutual TLS, enrollment, the version handshake), and what a
// platform does with them: run tasks and wait for their results, stored exactly once before they are acknowledged.
// The agents and their connections are here; the tasks (tasks.ts), the requests (requests.ts), the
// statuses (status.ts) and the module bytes they serve (modules.ts) are in their own modules.

import { EventEmitter } from 'node:events';
import { createServer, type Server } from 'node:https';
import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { WebSocketServer } from 'ws';

import { AuditStore, isAgentId, type AuditFlag } from './audit.js';
import { positive, stamp } from './checks.js';
import { bearer, DEFAULT_TOKEN_TTL_MS, REFUSAL_TEXT, Registry } from './enroll.js';
import { FileStore } from './file-store.js';
import { ensureStateDir } from './files.js';
import { Modules } from './modules.js';
import { Requests } from './requests.js';
import { CLOSE_REPLACED, IDLE_TIMEOUT_MS, Session, type Logger, type SessionHost } from './session.js';
import { Statuses } from './status.js';
import type { ResultStore, StoredResult } from './store.js';
import { Tasks } from './tasks.js';
import { agentIdOf, identityFromOptions, loadOrCreateIdentity } from './tls.js';
import { PlatformError, type AgentInfo, type PlatformEvents, type PlatformOptions, type RequestOptions, type RunOptions } from './api.js';
import { AGENT_PATH, encodeError, MAX_WS_PAYLOAD, type AgentMessage, type CancelOutcome, type ErrorBody, type HandlerInfo, type RunResult, type StatusReport } from './wire.js';

export { PlatformError } from './api.js';
export type { AgentInfo, Chunk, PlatformErrorCode, PlatformEvents, PlatformHooks, PlatformOptions, RequestOptions, RunOptions } from './api.js';

interface Live {
  session: Session | undefined;
  lastSeen: string | null;
  status: StatusReport | null;
  agentVersion: string | null;
}

const HTTP_TIMEOUT_MS = 10_000;

function parseListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(listen);
  const port = m === null ? NaN : Number(m[3]);
  if (m === null || port > 65535) throw new PlatformError('invalid', `listen must be HOST:PORT, not ${JSON.stringify(listen)}`);
  return { host: (m[1] ?? m[2]) as string, port };
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
  private readonly log: Logger;
  private readonly tokenTtlMs: number;
  private readonly live = new Map<string, Live>();
  private readonly sessions = new Set<Session>();
  private readonly tasks: Tasks;
  private readonly requests: Requests;
  private readonly statuses: Statuses;
  private readonly agentWaiters = new Set<{ id: string | undefined; resolve: (a: AgentInfo) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  /** Results and statuses being stored: close waits for them. */
  private readonly storing = new Set<Promise<void>>();
  private readonly modules = new Modules();
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
    this.log = args.options.log ?? (() => undefined);
    this.tokenTtlMs = args.options.tokenTtlMs ?? DEFAULT_TOKEN_TTL_MS;
    const log = this.log;
    const ensureOpen = () => this.ensureOpen();
    const connected = (agentId: string) => this.connected(agentId);
    this.tasks = new Tasks({
      store: this.store,
      modules: this.modules,
      log,
      hooks: args.options.hooks ?? {},
      onRoundTrip: args.options.onRoundTrip,
      ensureOpen,
      enrolled: (agentId) => this.enrolled(agentId),
      connected,
    });
    this.requests = new Requests({ modules: this.modules, log, ensureOpen, connected });
    this.statuses = new Statuses({
      audit: this.audit,
      log,
      emit: <K extends keyof PlatformEvents>(event: K, ...a: PlatformEvents[K]) => void (this.emit as (e: K, ...x: PlatformEvents[K]) => boolean)(event, ...a),
      keep: (agentId, status) => {
        this.liveOf(agentId).status = status;
      },
      track: (p) => this.track(p),
    });
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
      this.requests.failSession(older, 'replaced by a newer connection of the agent');
      older.close(CLOSE_REPLACED, 'replaced by a newer connection');
    }
    // Runs the agent has not answered may never have arrived: send them again.
    this.tasks.resend(session);
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
    this.requests.failSession(session, `the agent's connection ended: ${why}`);
    if (live?.session === session) {
      live.session = undefined;
      this.log('info', `agent disconnected: ${why}`, { agentId: session.agentId });
      this.emit('agentDisconnected', session.agentId, why);
    }
  }

  /** Keeps `p` (a result or status being stored) until it settles: close waits for it. */
  private track(p: Promise<void>): void {
    this.storing.add(p);
    void p.finally(() => this.storing.delete(p));
  }

  private onMessage(session: Session, m: AgentMessage): void {
    const agentId = session.agentId;
    const live = this.liveOf(agentId);
    live.lastSeen = stamp();
    switch (m.type) {
      case 'status':
        return this.statuses.onStatus(session, m.status);
      case 'need_module': {
        const module = this.modules.get(m.fileSha256);
        const answer =
          module !== undefined
            ? module
            : encodeError({ id: m.id, code: 'unexpected', message: `the platform has no module with SHA-256 ${m.fileSha256.slice(0, 64)}` });
        if (module === undefined) this.log('warn', 'the agent asked for an unknown module', { agentId, id: m.id });
        // Even the error is one the agent waits for: it must not be dropped.
        if (!session.reply(answer)) session.close(1008, 'too many module requests without reading the answers');
        return;
      }
      case 'accepted':
        return this.tasks.accepted(agentId, m.taskId, m.state);
      case 'chunk':
        return this.tasks.chunk(agentId, m);
      case 'cancel_reply':
        return this.requests.onReply(agentId, m.id, { kind: 'cancel', outcome: m.outcome });
      case 'handlers':
        return this.requests.onReply(agentId, m.id, { kind: 'handlers', handlers: m.handlers });
      case 'result':
        return this.track(this.tasks.onResult(session, m.id, m.taskId, m.result));
      case 'need_release':
        // This platform sends no `update`, so it has no release to serve; the error is an answer
        // the agent waits for (in order with module uploads): it must not be dropped.
        this.log('warn', 'the agent asked for a release (this platform serves none)', { agentId, id: m.id });
        if (!session.reply(encodeError({ id: m.id, code: 'not_found', message: `the platform serves no release (update ${m.id.slice(0, 64)})` }))) {
          session.close(1008, 'too many requests without reading the answers');
        }
        return;
      case 'update_status':
        return this.statuses.onUpdateStatus(session, m.status);
      case 'error':
        return this.onAgentError(agentId, m.error);
      case 'hello':
        return;
    }
  }

  /** An agent's `error`: ends the run or the request it answers, else it is logged. */
  private onAgentError(agentId: string, body: ErrorBody): void {
    if (body.id !== undefined && (this.tasks.refused(agentId, body.id, body) || this.requests.refused(agentId, body.id, body))) return;
    this.log('warn', `the agent reported an error: ${body.code}: ${body.message}`, { agentId, id: body.id });
  }

  // ---- tasks and requests --------------------------------------------------------------------

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
    return this.tasks.run(agentId, options);
  }

  /** Cancels a task (queued or running); resolves with the agent's outcome: `cancelling`, `dequeued`, `finished` or `unknown`. */
  async cancel(agentId: string, taskId: string, options: RequestOptions = {}): Promise<CancelOutcome> {
    return this.requests.cancel(agentId, taskId, options.waitMs);
  }

  /**
   * Installs (or replaces) the handler for a command name: `signedBytes` is a module signed for
   * that name. Resolves with the handlers after the change; rejects with `agent_error` (and
   * `reason`, e.g. `out_of_scope`) when the agent refuses it.
   */
  async installHandler(agentId: string, name: string, signedBytes: Uint8Array, options: RequestOptions & { signature?: Uint8Array } = {}): Promise<HandlerInfo[]> {
    return this.requests.installHandler(agentId, name, signedBytes, options.signature, options.waitMs);
  }

  /** Removes the handler for a command name; resolves with the handlers after the change (`agent_error` `not_found` when none). */
  async removeHandler(agentId: string, name: string, options: RequestOptions = {}): Promise<HandlerInfo[]> {
    return this.requests.removeHandler(agentId, name, options.waitMs);
  }

  /** The agent's installed handlers. */
  async handlers(agentId: string, options: RequestOptions = {}): Promise<HandlerInfo[]> {
    return this.requests.handlers(agentId, options.waitMs);
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
    this.tasks.failAll(closedError);
    this.requests.failAll(closedError);
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