// A platform in a child process (platform-child.ts) and the line protocol the exactly-once
// tests drive it with: they kill it between storing a result and acknowledging it.

import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { Child, publisher, signed, startAgent, tempDir, type Agent, type Publisher } from './support.js';

const CHILD = join(dirname(fileURLToPath(import.meta.url)), 'platform-child.js');

/** A platform process; `env` adds to its environment (e.g. a PgStore's settings). */
export class PlatformProcess extends Child {
  private seq = 0;

  constructor(stateDir: string, listen: string, killAfterStore?: string, env: Record<string, string> = {}) {
    super('platform', process.execPath, [CHILD], {
      env: { CHILD_STATE: stateDir, CHILD_LISTEN: listen, CHILD_KILL_AFTER_STORE: killAfterStore ?? '', ...env },
      stdin: true,
      lines: true,
    });
  }

  async started(): Promise<{ url: string; pin: string; port: number }> {
    const line = await this.line(20_000, 'the start line', (l) => l.includes('"started":true'));
    return JSON.parse(line) as { url: string; pin: string; port: number };
  }

  /** Sends a request; its answer is read with {@link answer}. */
  send(request: Record<string, unknown>): number {
    const seq = ++this.seq;
    this.writeLine(JSON.stringify({ seq, ...request }));
    return seq;
  }

  async answer(seq: number, ms: number): Promise<Record<string, unknown>> {
    const line = await this.line(ms, `the answer to request ${seq}`, (l) => (JSON.parse(l) as { seq: number }).seq === seq);
    const body = JSON.parse(line) as Record<string, unknown>;
    if (body.error !== undefined) throw new Error(`platform: ${String(body.error)}\n${this.log()}`);
    return body;
  }

  async request(request: Record<string, unknown>, ms = 30_000): Promise<Record<string, unknown>> {
    return this.answer(this.send(request), ms);
  }
}

/** What {@link crashAfterStoring} leaves: the dead platform's address, its agent, the module run. */
export interface Crashed {
  url: string;
  pin: string;
  port: number;
  agent: Agent;
  agentId: string;
  pub: Publisher;
  /** The signed module's path, as the child's `run` takes it. */
  module: string;
}

/**
 * Starts a platform (`start`, told to kill itself after storing `taskId`'s result), enrolls a
 * real agent, runs hello as `taskId`, and waits for the platform's SIGKILL: the result is
 * stored and was never acknowledged.
 */
export async function crashAfterStoring(
  start: (listen: string, killAfterStore?: string) => PlatformProcess,
  taskId: string,
  cleanup: Array<() => Promise<void>>,
): Promise<Crashed> {
  const pub = publisher();
  const module = join(tempDir(), 'hello.signed.wasm');
  writeFileSync(module, signed(pub, 'hello'));
  const first = start('127.0.0.1:0', taskId);
  cleanup.push(() => first.kill());
  const { url, pin, port } = await first.started();
  const { token } = (await first.request({ cmd: 'token' })) as { token: string };
  const agent = startAgent({ url, pin }, { token, trustedKey: pub.publicKey });
  cleanup.push(() => agent.kill());
  const agentId = await agent.id();
  await first.request({ cmd: 'waitAgent', id: agentId });
  first.send({ cmd: 'run', agentId, module, taskId, input: { name: 'Ada' } });
  await first.waitExit(30_000);
  assert.equal(first.exit().signal, 'SIGKILL', `the platform killed itself after storing; its log:\n${first.log()}`);
  return { url, pin, port, agent, agentId, pub, module };
}

/** The stored result as `result()` returns it, once its second delivery is counted (at most 30 s). */
export async function storedTwice(platform: PlatformProcess, taskId: string): Promise<{ agentId: string; deliveries: number; result: { status: string; output: unknown } }> {
  const { stored } = (await platform.request({ cmd: 'result', taskId, deliveries: 2, waitMs: 30_000 }, 40_000)) as {
    stored: { agentId: string; deliveries: number; result: { status: string; output: unknown } } | null;
  };
  assert.ok(stored, 'result() returns the stored result');
  return stored;
}
