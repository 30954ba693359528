// The requests to an agent that wait for its reply: cancel a task, install, remove and list
// handlers; each ends with the reply, the agent's `error`, a timeout, or the end of its connection.

import { createHash } from 'node:crypto';

import { PlatformError } from './api.js';
import { checkId, positive, requestId } from './checks.js';
import type { Modules } from './modules.js';
import type { Logger, Session } from './session.js';
import { encodeCancel, encodeInstallHandler, encodeListHandlers, encodeRemoveHandler, MAX_BINARY_BYTES, type CancelOutcome, type ErrorBody, type HandlerInfo } from './wire.js';

const DEFAULT_REQUEST_WAIT_MS = 30_000;

/** A reply the agent sends to a request. */
export type Reply = { kind: 'cancel'; outcome: CancelOutcome } | { kind: 'handlers'; handlers: HandlerInfo[] };

interface PendingRequest {
  agentId: string;
  session: Session;
  expects: Reply['kind'];
  fileSha256: string | undefined;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/** What the requests take from the Platform. */
export interface RequestHost {
  readonly modules: Modules;
  readonly log: Logger;
  /** Throws `closed` once the platform is closing. */
  ensureOpen(): void;
  /** The agent's live connection; throws `unknown_agent` or `not_connected`. */
  connected(agentId: string): Session;
}

/** The requests waiting for the agent's reply, by request id. */
export class Requests {
  private readonly pending = new Map<string, PendingRequest>();

  constructor(private readonly host: RequestHost) {}

  /** Asks the agent to cancel a task (`Platform.cancel`); resolves with its outcome. */
  async cancel(agentId: string, taskId: string, waitMs: number | undefined): Promise<CancelOutcome> {
    checkId('taskId', taskId);
    const r = await this.request(agentId, 'cancel', 'cancel', (id) => encodeCancel(id, taskId), waitMs);
    if (r.kind !== 'cancel') throw new Error('unreachable');
    return r.outcome;
  }

  /** Installs a handler (`Platform.installHandler`): the module bytes are held for the agent's `need_module` until the request ends. */
  async installHandler(agentId: string, name: string, signedBytes: Uint8Array, signature: Uint8Array | undefined, waitMs: number | undefined): Promise<HandlerInfo[]> {
    checkId('name', name);
    if (!(signedBytes instanceof Uint8Array) || signedBytes.length > MAX_BINARY_BYTES) {
      throw new PlatformError('invalid', `signedBytes must be a Uint8Array of at most ${MAX_BINARY_BYTES} bytes`);
    }
    const sha = createHash('sha256').update(signedBytes).digest('hex');
    const sig = signature === undefined ? undefined : Buffer.from(signature).toString('base64');
    const r = await this.request(agentId, 'handlers', 'install', (id) => encodeInstallHandler(id, name, sha, sig), waitMs, { sha, bytes: signedBytes });
    if (r.kind !== 'handlers') throw new Error('unreachable');
    return r.handlers;
  }

  /** Removes a handler (`Platform.removeHandler`); resolves with the handlers after the change. */
  async removeHandler(agentId: string, name: string, waitMs: number | undefined): Promise<HandlerInfo[]> {
    checkId('name', name);
    const r = await this.request(agentId, 'handlers', 'remove', (id) => encodeRemoveHandler(id, name), waitMs);
    if (r.kind !== 'handlers') throw new Error('unreachable');
    return r.handlers;
  }

  /** Lists the agent's handlers (`Platform.handlers`). */
  async handlers(agentId: string, waitMs: number | undefined): Promise<HandlerInfo[]> {
    const r = await this.request(agentId, 'handlers', 'handlers', (id) => encodeListHandlers(id), waitMs);
    if (r.kind !== 'handlers') throw new Error('unreachable');
    return r.handlers;
  }

  /** A `cancel_reply` or `handlers` from the agent: ends the request it answers (logged and ignored when none waits for it). */
  onReply(agentId: string, id: string, reply: Reply): void {
    const r = this.pending.get(id);
    if (r === undefined || r.agentId !== agentId || r.expects !== reply.kind) {
      this.host.log('warn', `${reply.kind === 'cancel' ? 'cancel_reply' : 'handlers'} for no waiting request (ignored)`, { agentId, id });
      return;
    }
    this.pending.delete(id);
    clearTimeout(r.timer);
    this.host.modules.release(r.fileSha256);
    r.resolve(reply);
  }

  /** An `error` the agent answered a request with: rejects it (`agent_error`). False when `id` names no request to this agent. */
  refused(agentId: string, id: string, body: ErrorBody): boolean {
    const r = this.pending.get(id);
    if (r === undefined || r.agentId !== agentId) return false;
    this.end(id, r, new PlatformError('agent_error', `the agent refused: ${body.code}: ${body.message}`, body));
    return true;
  }

  /** The connection a request was sent on ended (or was replaced): rejects each such request (`disconnected`). */
  failSession(session: Session, why: string): void {
    for (const [id, r] of this.pending) {
      if (r.session === session) this.end(id, r, new PlatformError('disconnected', why));
    }
  }

  /** Rejects every request with `error()`. */
  failAll(error: () => Error): void {
    for (const [id, r] of [...this.pending]) this.end(id, r, error());
  }

  private request(agentId: string, expects: Reply['kind'], prefix: string, encode: (id: string) => string, waitMs: number | undefined, module?: { sha: string; bytes: Uint8Array }): Promise<Reply> {
    this.host.ensureOpen();
    const wait = positive('waitMs', waitMs) ?? DEFAULT_REQUEST_WAIT_MS;
    const session = this.host.connected(agentId);
    const id = requestId(prefix);
    return new Promise<Reply>((resolve, reject) => {
      const r: PendingRequest = {
        agentId,
        session,
        expects,
        fileSha256: module?.sha,
        resolve,
        reject,
        timer: setTimeout(() => this.end(id, r, new PlatformError('timeout', `no reply from agent ${agentId} within ${wait} ms`)), wait),
      };
      if (module !== undefined) this.host.modules.retain(module.sha, module.bytes);
      this.pending.set(id, r);
      session.send(encode(id));
    });
  }

  private end(id: string, r: PendingRequest, error: Error): void {
    if (this.pending.get(id) !== r) return;
    this.pending.delete(id);
    clearTimeout(r.timer);
    this.host.modules.release(r.fileSha256);
    r.reject(error);
  }
}
