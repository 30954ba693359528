// A platform in a child process (platform-child.ts) and the line protocol the exactly-once
// tests drive it with: they kill it between storing a result and acknowledging it.

import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { Child } from './support.js';

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
