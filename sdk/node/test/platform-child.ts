// A Platform in a process of its own, driven by JSON lines on stdin (one JSON answer per line on
// stdout), for the tests that kill the platform: CHILD_KILL_AFTER_STORE=TASK_ID SIGKILLs it after that result is stored, before the ack.
// CHILD_PG_CONFIG (a pg connection config, JSON) and CHILD_PG_TABLE make it keep results in a PgStore.

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

import { Platform, PgStore } from '../dist/index.js';

const stateDir = process.env.CHILD_STATE;
const listen = process.env.CHILD_LISTEN ?? '127.0.0.1:0';
const killAfter = process.env.CHILD_KILL_AFTER_STORE;
const pgConfig = process.env.CHILD_PG_CONFIG;
if (stateDir === undefined) throw new Error('CHILD_STATE is not set');

const platform = await Platform.start({
  listen,
  stateDir,
  store: pgConfig === undefined ? undefined : new PgStore(JSON.parse(pgConfig) as object, { table: process.env.CHILD_PG_TABLE }),
  hooks: {
    afterStore: (taskId) => {
      if (taskId === killAfter) process.kill(process.pid, 'SIGKILL');
    },
  },
  log: (level, message, fields) => process.stderr.write(`${level} ${message} ${JSON.stringify(fields ?? {})}\n`),
});

function answer(seq: unknown, body: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify({ seq, ...body }) + '\n');
}

answer(0, { started: true, url: platform.url, pin: platform.pin, port: platform.port });

type Request = { seq: number; cmd: string; [k: string]: unknown };

async function handle(r: Request): Promise<Record<string, unknown>> {
  switch (r.cmd) {
    case 'token':
      return { token: await platform.issueToken() };
    case 'waitAgent':
      return { agent: await platform.waitForAgent(r.id as string | undefined, { timeoutMs: 30_000 }) };
    case 'run':
      return {
        result: await platform.run(r.agentId as string, {
          module: readFileSync(r.module as string),
          input: r.input,
          taskId: r.taskId as string,
        }),
      };
    case 'handlers':
      return { handlers: await platform.handlers(r.agentId as string) };
    case 'result': {
      const want = (r.deliveries as number | undefined) ?? 1;
      const end = Date.now() + ((r.waitMs as number | undefined) ?? 0);
      for (;;) {
        const stored = await platform.result(r.taskId as string);
        if ((stored !== undefined && stored.deliveries >= want) || Date.now() >= end) return { stored: stored ?? null };
        await new Promise((res) => setTimeout(res, 25));
      }
    }
    default:
      throw new Error(`unknown cmd ${r.cmd}`);
  }
}

const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const r = JSON.parse(line) as Request;
  if (r.cmd === 'close') {
    // Stop reading stdin, close the platform, and let the process end by itself: a handle left
    // open by close() would keep it alive.
    lines.close();
    process.stdin.destroy();
    void platform.close().then(() => answer(r.seq, { closed: true }));
    return;
  }
  handle(r).then(
    (body) => answer(r.seq, body),
    (e: unknown) => answer(r.seq, { error: String((e as Error).message ?? e) }),
  );
});
