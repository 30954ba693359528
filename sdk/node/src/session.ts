// One agent connection after the upgrade: the `hello` within 10 s and the `welcome`, every frame
// checked, idle and stalled-writer timeouts, and a writer that never makes reading wait (bounded queues).

import type { WebSocket, RawData } from 'ws';

import {
  decodeAgentMessage,
  encodeAck,
  encodeError,
  encodeWelcome,
  MAX_TEXT_BYTES,
  PROTOCOL_VERSION,
  type AgentMessage,
  type ErrorBody,
} from './wire.js';

/** No `hello` within this long: close (1008). */
export const HELLO_TIMEOUT_MS = 10_000;
/** Nothing heard for this long (3 of the agent's 30 s heartbeats): close (4001); the default of `idleTimeoutMs`. */
export const IDLE_TIMEOUT_MS = 90_000;
/** A write the agent does not take within this long closes the connection. */
export const SEND_TIMEOUT_MS = 30_000;
/** Close code: a newer connection of the same agent replaced this one. */
export const CLOSE_REPLACED = 4000;
/** Close code: nothing received for the idle timeout. */
export const CLOSE_IDLE = 4001;
/** How many replies to the agent's messages (errors, module uploads) may wait for the writer. */
export const REPLY_QUEUE = 1024;
/** Results being stored at once for one connection before reading pauses. */
export const MAX_STORING = 64;
/** The writer sends queued replies and acks only while less than this is buffered. */
const HIGH_WATER = 1024 * 1024;
/** At most this many task ids, and bytes of task ids, in one `ack`. */
const ACK_BATCH = 1000;
const ACK_BATCH_BYTES = 128 * 1024;
/** How often the idle and writer timeouts are checked. */
const CHECK_EVERY_MS = 1000;
/** How long a closing connection may take before it is dropped. */
const CLOSE_GRACE_MS = 2000;

/** Log levels of the SDK's messages. */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
/** Where the SDK's log messages go. */
export type Logger = (level: LogLevel, message: string, fields?: Record<string, unknown>) => void;

/** What a session tells the platform. */
export interface SessionHost {
  /** The agent said `hello` with a version we speak and was welcomed. */
  welcomed(session: Session): void;
  /** A checked message after `welcome` (never `hello`). */
  message(session: Session, message: AgentMessage): void;
  /** The connection ended (after `welcomed` or not). */
  closed(session: Session, why: string): void;
  log: Logger;
  /** Nothing heard from an agent for this long closes its connection (4001). */
  idleTimeoutMs: number;
  /** The latest audit seq stored for the agent, which its `welcome` names (`audit_seq`); none: left out. */
  auditSeq(agentId: string): number | undefined;
}

/** One agent connection. */
export class Session {
  /** The agent id, from the client certificate. */
  readonly agentId: string;
  /** This connection enrolled the agent. */
  readonly enrolled: boolean;
  /** What the agent's `hello` said it runs. */
  agentVersion = '';
  /** `welcome` was sent. */
  welcomed = false;
  /** The connection ended or is ending. */
  closing = false;

  private readonly ws: WebSocket;
  private readonly host: SessionHost;
  private readonly replies: Array<string | Uint8Array> = [];
  private readonly acks = new Set<string>();
  private droppedErrors = 0;
  private storing = 0;
  private lastHeard = Date.now();
  private lastWrite = Date.now();
  private helloTimer: NodeJS.Timeout | undefined;
  private checkTimer: NodeJS.Timeout | undefined;
  private closeTimer: NodeJS.Timeout | undefined;
  private pumpScheduled = false;
  private ended = false;

  constructor(ws: WebSocket, agentId: string, enrolled: boolean, host: SessionHost) {
    this.ws = ws;
    this.agentId = agentId;
    this.enrolled = enrolled;
    this.host = host;
    ws.on('message', (data, isBinary) => this.onFrame(data, isBinary));
    ws.on('ping', () => this.heard());
    ws.on('pong', () => this.heard());
    ws.on('error', (e) => this.host.log('warn', `connection error: ${e.message}`, { agentId }));
    ws.on('close', (code, reason) => this.onClose(`closed (${code}${reason.length > 0 ? `: ${reason.toString()}` : ''})`));
    this.helloTimer = setTimeout(() => {
      this.host.log('warn', 'no hello within 10 s', { agentId });
      this.close(1008, 'no hello within 10 s');
    }, HELLO_TIMEOUT_MS);
    this.checkTimer = setInterval(() => this.check(), CHECK_EVERY_MS);
  }

  private heard(): void {
    this.lastHeard = Date.now();
  }

  private check(): void {
    const now = Date.now();
    if (now - this.lastHeard >= this.host.idleTimeoutMs) {
      const why = `nothing received for ${this.host.idleTimeoutMs / 1000} s`;
      this.host.log('warn', `${why}: closing`, { agentId: this.agentId });
      this.close(CLOSE_IDLE, why);
    } else if (this.ws.bufferedAmount > 0 && now - this.lastWrite >= SEND_TIMEOUT_MS) {
      this.host.log('warn', 'the agent does not take what is written: closing', { agentId: this.agentId });
      this.close(1008, 'the agent does not read');
    }
  }

  private onFrame(data: RawData, isBinary: boolean): void {
    this.heard();
    if (this.closing) return;
    if (isBinary) {
      this.error({ code: 'binary_not_expected', message: 'agents send no binary frames' });
      return;
    }
    const buf = Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
    if (buf.length > MAX_TEXT_BYTES) {
      this.error({ code: 'oversize', message: `a text frame of ${buf.length} bytes; the limit is ${MAX_TEXT_BYTES}` });
      return;
    }
    const decoded = decodeAgentMessage(buf.toString('utf8'));
    if (!decoded.ok) {
      if (decoded.wasError) {
        this.host.log('warn', `an error from the agent that does not decode: ${decoded.body.message}`, { agentId: this.agentId });
      } else {
        this.host.log('warn', `undecodable message: ${decoded.body.code}: ${decoded.body.message}`, { agentId: this.agentId });
        this.error(decoded.body);
      }
      return;
    }
    const m = decoded.message;
    if (!this.welcomed) {
      this.beforeWelcome(m);
    } else if (m.type === 'hello') {
      this.error({ code: 'unexpected', message: '`hello` was already received on this connection' });
    } else {
      this.host.message(this, m);
    }
  }

  private beforeWelcome(m: AgentMessage): void {
    if (m.type === 'error') {
      this.host.log('warn', `the agent reported an error before hello: ${m.error.code}: ${m.error.message}`, { agentId: this.agentId });
      return;
    }
    if (m.type !== 'hello') {
      this.error({ code: 'unexpected', message: 'the first message must be `hello`' });
      return;
    }
    clearTimeout(this.helloTimer);
    this.helloTimer = undefined;
    if (m.agentId !== this.agentId) {
      this.host.log('warn', "hello names another agent id; using the certificate's", { agentId: this.agentId, claimed: m.agentId.slice(0, 64) });
    }
    if (!m.versions.includes(PROTOCOL_VERSION)) {
      const body: ErrorBody = {
        code: 'unsupported_version',
        message: `this platform speaks protocol version ${PROTOCOL_VERSION}; the agent offered [${m.versions.join(', ')}]`,
      };
      this.host.log('warn', body.message, { agentId: this.agentId });
      this.ws.send(encodeError(body));
      this.close(1008, 'unsupported protocol version');
      return;
    }
    this.agentVersion = m.agentVersion.slice(0, 256);
    this.welcomed = true;
    this.write(encodeWelcome(this.agentId, this.enrolled, this.host.auditSeq(this.agentId)));
    this.host.welcomed(this);
  }

  private onClose(why: string): void {
    if (this.ended) return;
    this.ended = true;
    this.closing = true;
    clearTimeout(this.helloTimer);
    clearInterval(this.checkTimer);
    clearTimeout(this.closeTimer);
    this.replies.length = 0;
    this.acks.clear();
    this.host.closed(this, why);
  }

  /** Closes the connection with `code`; drops it if the close does not complete within 2 s. */
  close(code: number, reason: string): void {
    if (this.closing) return;
    this.closing = true;
    try {
      this.ws.close(code, reason);
    } catch {
      this.ws.terminate();
    }
    this.closeTimer = setTimeout(() => this.ws.terminate(), CLOSE_GRACE_MS);
  }

  /** A promise settled once the connection has ended. */
  whenEnded(): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise((resolve) => this.ws.once('close', () => resolve()));
  }

  private write(data: string | Uint8Array): void {
    this.ws.send(data, (err) => {
      if (err === undefined || err === null) this.lastWrite = Date.now();
      this.schedulePump();
    });
  }

  /**
   * Sends a platform request now (the caller bounds how many it makes), after the acks queued
   * before it: the agent acts on them first. False once closing.
   */
  send(text: string): boolean {
    if (this.closing || !this.welcomed) return false;
    while (this.acks.size > 0) this.write(this.nextAck());
    this.write(text);
    return true;
  }

  /** Queues a reply the agent waits for (a module, or the error instead); false when the queue is full. */
  reply(data: string | Uint8Array): boolean {
    if (this.closing) return true;
    if (this.replies.length >= REPLY_QUEUE) return false;
    this.replies.push(data);
    this.schedulePump();
    return true;
  }

  /** Queues an `error` for the agent; dropped (and counted) when the reply queue is full. */
  error(body: ErrorBody): void {
    if (!this.reply(encodeError(body))) {
      this.droppedErrors++;
      if (this.droppedErrors === 1) this.host.log('warn', 'the agent does not read its error replies: dropping them', { agentId: this.agentId });
    }
  }

  /** Queues an acknowledgement of `taskId` (merged with one already waiting). */
  ack(taskId: string): void {
    if (this.closing) return;
    this.acks.add(taskId);
    this.schedulePump();
  }

  /** A result is being stored: reading pauses while {@link MAX_STORING} are. */
  storingStarted(): void {
    this.storing++;
    if (this.storing === MAX_STORING) this.ws.pause();
  }

  /** A result was stored (or failed to be). */
  storingEnded(): void {
    this.storing--;
    if (this.storing === MAX_STORING - 1 && !this.closing) this.ws.resume();
  }

  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pump(): void {
    while (!this.closing && this.ws.bufferedAmount < HIGH_WATER) {
      const next = this.replies.shift();
      if (next !== undefined) {
        this.write(next);
        continue;
      }
      if (this.acks.size === 0) return;
      this.write(this.nextAck());
    }
  }

  /** An `ack` of the oldest queued task ids (at most 1000, 128 KiB of ids), taken off the queue. */
  private nextAck(): string {
    const ids: string[] = [];
    let bytes = 0;
    for (const id of this.acks) {
      if (ids.length >= ACK_BATCH || (ids.length > 0 && bytes + id.length > ACK_BATCH_BYTES)) break;
      ids.push(id);
      bytes += id.length;
    }
    for (const id of ids) this.acks.delete(id);
    return encodeAck(ids);
  }
}
