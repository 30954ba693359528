// What agents report of themselves: each `status` (the audit head it carries judged and stored
// first, an agent's statuses taken in order) and each `update_status` (announced, then acknowledged).

import type { PlatformEvents } from './api.js';
import type { AuditFlag, AuditStore } from './audit.js';
import type { Logger, Session } from './session.js';
import { encodeUpdateAck, type StatusReport, type UpdateStatus } from './wire.js';

/** The events statuses raise. */
type StatusEvent = 'auditFlagged' | 'status' | 'update';

/** What the status intake takes from the Platform. */
export interface StatusHost {
  readonly audit: AuditStore;
  readonly log: Logger;
  /** Emits a Platform event; throws what a listener throws. */
  emit<K extends StatusEvent>(event: K, ...args: PlatformEvents[K]): void;
  /** Keeps the agent's latest status (what `Platform.agents` shows). */
  keep(agentId: string, status: StatusReport): void;
  /** Something being stored: the Platform's close waits for it. */
  track(p: Promise<void>): void;
}

/** Takes the agents' statuses and update statuses. */
export class Statuses {
  /** Per agent, the last of its statuses being judged: its statuses are taken in order. */
  private readonly queues = new Map<string, Promise<void>>();

  constructor(private readonly host: StatusHost) {}

  /**
   * Takes a status (checked when decoded) after the agent's earlier ones: judges and stores the
   * audit head it carries (written before the status is announced), then keeps and announces it.
   * Reading pauses while too many results and statuses are being stored.
   */
  onStatus(session: Session, status: StatusReport): void {
    const agentId = session.agentId;
    if (status.agent_id !== agentId) this.host.log('warn', 'status names another agent id', { agentId });
    session.storingStarted();
    const before = this.queues.get(agentId) ?? Promise.resolve();
    const p = before.then(() => this.take(agentId, status)).finally(() => session.storingEnded());
    this.queues.set(agentId, p);
    this.host.track(p);
    void p.finally(() => {
      if (this.queues.get(agentId) === p) this.queues.delete(agentId);
    });
  }

  /** Announces an update's status; acknowledges a verdict once every listener has returned. */
  onUpdateStatus(session: Session, status: UpdateStatus): void {
    const agentId = session.agentId;
    this.host.log(status.state === 'failed' || status.state === 'refused' ? 'warn' : 'info', `update ${status.state}`, {
      agentId,
      id: status.id,
      version: status.version,
      agentVersion: status.agent_version,
      reason: status.reason ?? undefined,
    });
    try {
      this.host.emit('update', agentId, status);
    } catch (e) {
      // Not acknowledged: the agent sends the verdict again after its next reconnect.
      this.host.log('error', `an update listener threw (the verdict is not acknowledged): ${(e as Error).message}`, { agentId, id: status.id });
      return;
    }
    if (status.state === 'succeeded' || status.state === 'failed') {
      // Dropped when the agent does not read its replies: it sends the verdict again later.
      if (!session.reply(encodeUpdateAck(status.id))) this.host.log('warn', 'the reply queue is full: an update_ack is dropped', { agentId, id: status.id });
    }
  }

  private async take(agentId: string, status: StatusReport): Promise<void> {
    let raised: AuditFlag | undefined;
    if (status.audit !== undefined && status.audit !== null) {
      try {
        raised = await this.host.audit.observe(agentId, status.audit);
      } catch (e) {
        this.host.log('error', `cannot store the audit head: ${(e as Error).message}`, { agentId });
      }
    }
    this.host.keep(agentId, status);
    if (raised !== undefined) {
      this.host.log('warn', `audit chain flagged ${raised.kind}: ${raised.detail}`, { agentId, kind: raised.kind, seq: raised.seq });
      this.emitSafely('auditFlagged', agentId, raised);
    }
    this.emitSafely('status', agentId, status);
  }

  /** Emits an event whose listeners' exceptions are logged, not thrown. */
  private emitSafely<K extends 'auditFlagged' | 'status'>(event: K, ...args: PlatformEvents[K]): void {
    try {
      this.host.emit(event, ...args);
    } catch (e) {
      this.host.log('error', `a ${event} listener threw: ${(e as Error).message}`, { agentId: args[0] });
    }
  }
}
