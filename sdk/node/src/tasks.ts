// The tasks in flight: `run` (checked, sent, re-sent after a reconnect, joined by a second `run` of
// the same task id), what the agent says of them (accepted, chunks, a refusal) and their results,
// stored before they are acknowledged and handed to whoever waits.

import { createHash, randomUUID } from 'node:crypto';

import { PlatformError, type Chunk, type PlatformHooks, type RunOptions } from './api.js';
import { checkId, positive, requestId, stamp } from './checks.js';
import type { Modules } from './modules.js';
import type { Logger, Session } from './session.js';
import type { ResultStore } from './store.js';
import { encodeRun, MAX_BINARY_BYTES, UNRECORDED_REASONS, utf8Bytes, type AgentMessage, type ErrorBody, type LimitRequest, type RunResult, type TaskState } from './wire.js';

const DEFAULT_WAIT_MS = 60_000;

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

/** What the tasks take from the Platform. */
export interface TaskHost {
  readonly store: ResultStore;
  readonly modules: Modules;
  readonly log: Logger;
  readonly hooks: PlatformHooks;
  readonly onRoundTrip: ((us: number, taskId: string) => void) | undefined;
  /** Throws `closed` once the platform is closing. */
  ensureOpen(): void;
  /** Throws `unknown_agent` unless the agent is enrolled. */
  enrolled(agentId: string): void;
  /** The agent's live connection; throws `unknown_agent` or `not_connected`. */
  connected(agentId: string): Session;
}

/** The tasks in flight, by task id (and by the id of their `run`). */
export class Tasks {
  private readonly tasks = new Map<string, Task>();
  private readonly runIds = new Map<string, string>();

  constructor(private readonly host: TaskHost) {}

  /** Runs a task (`Platform.run`): checks the options, answers from the store, or sends (or joins) the task, then waits for its result. */
  async run(agentId: string, options: RunOptions): Promise<RunResult> {
    const host = this.host;
    host.ensureOpen();
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
    host.enrolled(agentId);

    const stored = await host.store.get(taskId);
    if (stored !== undefined) {
      if (stored.agentId === agentId) return stored.result as unknown as RunResult;
      throw new PlatformError('conflict', `task ${taskId}: its stored result came from agent ${stored.agentId} (task ids are global)`);
    }
    host.ensureOpen();
    let task = this.tasks.get(taskId);
    if (task !== undefined && task.agentId !== agentId) throw new PlatformError('conflict', `task ${taskId} is in flight on agent ${task.agentId}`);
    if (task === undefined) {
      const session = host.connected(agentId);
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
      if (fileSha256 !== undefined && o.module !== undefined) host.modules.retain(fileSha256, o.module);
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

  /** A new connection of the agent: the runs it has not answered may never have arrived, so they are sent again. */
  resend(session: Session): void {
    for (const task of this.tasks.values()) {
      if (task.agentId === session.agentId && !task.accepted && session.send(task.wire)) task.sentAt = process.hrtime.bigint();
    }
  }

  /** The agent's `accepted` for a task. */
  accepted(agentId: string, taskId: string, state: TaskState): void {
    const task = this.tasks.get(taskId);
    if (task !== undefined && task.agentId === agentId) {
      task.accepted = true;
      task.state = state;
    }
  }

  /** A `chunk` of a task's output: handed, in order and once, to each waiter that streams. */
  chunk(agentId: string, m: Extract<AgentMessage, { type: 'chunk' }>): void {
    const task = this.tasks.get(m.taskId);
    if (task === undefined || task.agentId !== agentId) return;
    const chunk: Chunk = { taskId: m.taskId, seq: m.seq, stream: m.stream, data: m.data, droppedBytes: m.droppedBytes };
    for (const w of task.waiters) {
      if (w.onChunk === undefined || m.seq < w.nextSeq) continue;
      w.nextSeq = m.seq + 1;
      try {
        w.onChunk(chunk);
      } catch (e) {
        this.host.log('error', `onChunk threw: ${(e as Error).message}`, { taskId: m.taskId });
      }
    }
  }

  /** An `error` the agent answered a `run` with (`id` is the run's): rejects its waiters (`agent_error`). False when `id` names no run of this agent. */
  refused(agentId: string, id: string, body: ErrorBody): boolean {
    const taskId = this.runIds.get(id);
    const task = taskId === undefined ? undefined : this.tasks.get(taskId);
    if (task === undefined || task.agentId !== agentId) return false;
    const why = `${body.code}: ${body.message}`;
    this.host.log('warn', `the agent refused a run: ${why}`, { agentId, taskId });
    this.endTask(task, (w) => w.reject(new PlatformError('agent_error', `the agent answered the run with an error: ${why}`, body)));
    return true;
  }

  /** Stores a result, then acknowledges it (a refusal the agent does not record is acknowledged, not stored). */
  async onResult(session: Session, runId: string, taskId: string, result: RunResult): Promise<void> {
    const agentId = session.agentId;
    session.storingStarted();
    try {
      if (result.status === 'rejected' && typeof result.reason === 'string' && UNRECORDED_REASONS.has(result.reason)) {
        session.ack(taskId);
        const task = this.tasks.get(taskId);
        if (task !== undefined && task.agentId === agentId && task.runId === runId) this.finish(task, result);
        return;
      }
      const outcome = await this.host.store.put(taskId, agentId, result as unknown as Record<string, unknown>);
      await this.host.hooks.afterStore?.(taskId);
      session.ack(taskId);
      const task = this.tasks.get(taskId);
      if (outcome.kind === 'conflict') {
        this.host.log('warn', 'a result for a task id whose stored result came from another agent (acknowledged, not stored)', { agentId, taskId, storedFrom: outcome.stored.agentId });
        if (task !== undefined && task.agentId === agentId) {
          this.endTask(task, (w) => w.reject(new PlatformError('conflict', `task ${taskId}: the stored result came from agent ${outcome.stored.agentId}`)));
        }
        return;
      }
      if (task !== undefined && task.agentId === agentId) this.finish(task, outcome.stored.result as unknown as RunResult);
    } catch (e) {
      this.host.log('error', `cannot store a result (not acknowledged; the agent will send it again): ${(e as Error).message}`, { agentId, taskId });
    } finally {
      session.storingEnded();
    }
  }

  /** Ends every task, rejecting its waiters with `error()`. */
  failAll(error: () => Error): void {
    for (const task of [...this.tasks.values()]) this.endTask(task, (w) => w.reject(error()));
  }

  /** Ends a task with its result. */
  private finish(task: Task, result: RunResult): void {
    const onRoundTrip = this.host.onRoundTrip;
    if (onRoundTrip !== undefined && this.tasks.get(task.taskId) === task) {
      const us = Number((process.hrtime.bigint() - task.sentAt) / 1000n);
      try {
        onRoundTrip(us, task.taskId);
      } catch (e) {
        this.host.log('error', `onRoundTrip threw: ${(e as Error).message}`);
      }
    }
    this.endTask(task, (w) => w.resolve(result));
  }

  private endTask(task: Task, settle: (w: Waiter) => void): void {
    if (this.tasks.get(task.taskId) === task) {
      this.tasks.delete(task.taskId);
      this.runIds.delete(task.runId);
      this.host.modules.release(task.fileSha256);
    }
    for (const w of task.waiters) {
      clearTimeout(w.timer);
      settle(w);
    }
    task.waiters.clear();
  }
}
