// Exactly once across a platform restart with the PgStore: the platform process dies after the
// result is committed to PostgreSQL and before it is acknowledged; restarted on the same state and
// database, it gets the result again from the agent, and the table holds exactly one row for it.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import pg from 'pg';

import { startPg, type PgServer } from './pg.js';
import { crashAfterStoring, PlatformProcess, storedTwice } from './platform-process.js';
import { startAgent, tempDir, waitUntil } from './support.js';

const TABLE = 'platform_results';

/** A platform process keeping its results in the test's PostgreSQL. */
function pgPlatform(stateDir: string, listen: string, server: PgServer, killAfterStore?: string): PlatformProcess {
  return new PlatformProcess(stateDir, listen, killAfterStore, {
    CHILD_PG_CONFIG: JSON.stringify(server.config()),
    CHILD_PG_TABLE: TABLE,
  });
}

describe('exactly once across a platform restart (PgStore)', { timeout: 180_000 }, () => {
  let server: PgServer;
  const cleanup: Array<() => Promise<void>> = [];
  before(async () => {
    server = await startPg();
  });
  after(async () => {
    for (const c of cleanup.reverse()) {
      await c();
    }
    await server?.stop();
  });

  /** The table's rows for a task id, read by a connection of the test's own. */
  async function rows(taskId: string): Promise<{ agent_id: string; deliveries: number; status: string }[]> {
    const client = new pg.Client(server.config());
    await client.connect();
    try {
      const r = await client.query<{ agent_id: string; deliveries: number; status: string }>(
        `SELECT agent_id, deliveries, result->>'status' AS status FROM ${TABLE} WHERE task_id = $1`,
        [taskId],
      );
      return r.rows;
    } finally {
      await client.end();
    }
  }

  it('keeps one row when the platform dies between committing a result and acknowledging it', async () => {
    const stateDir = join(tempDir(), 'platform');
    const taskId = `once-pg-${Date.now()}`;
    const { url, pin, port, agent, agentId, pub, module } = await crashAfterStoring((listen, kill) => pgPlatform(stateDir, listen, server, kill), taskId, cleanup);
    assert.deepEqual(await rows(taskId), [{ agent_id: agentId, deliveries: 1, status: 'ok' }], 'committed before the kill');
    assert.equal(existsSync(join(stateDir, 'results.jsonl')), false, 'the results went to PostgreSQL, not the file store');

    const second = pgPlatform(stateDir, `127.0.0.1:${port}`, server);
    cleanup.push(() => second.kill());
    const again = await second.started();
    assert.equal(again.pin, pin);
    const stored = await storedTwice(second, taskId);
    assert.equal(stored.deliveries, 2, `the agent sent the result again; agent log:\n${agent.log()}`);
    assert.equal(stored.agentId, agentId);
    assert.deepEqual(stored.result.output, { greeting: 'Hello, Ada!' });
    assert.deepEqual(await rows(taskId), [{ agent_id: agentId, deliveries: 2, status: 'ok' }], 'exactly one row, the repeat counted');

    // The repeat was acknowledged: after another reconnect the agent does not send it again.
    await agent.terminate();
    const agent2 = startAgent({ url, pin }, { state: agent.state, trustedKey: pub.publicKey });
    cleanup.push(() => agent2.kill());
    await second.request({ cmd: 'waitAgent', id: agentId });
    const later = (await second.request({ cmd: 'run', agentId, module, taskId: `${taskId}-later`, input: {} })) as { result: { status: string } };
    assert.equal(later.result.status, 'ok');
    assert.equal((await rows(`${taskId}-later`)).length, 1);
    assert.equal((await rows(taskId))[0]?.deliveries, 2);

    // close() closes the store's pool too: the process ends by itself.
    await second.request({ cmd: 'close' });
    await waitUntil(10_000, 'the platform process to exit after close()', () => !second.alive(), () => second.log());
    assert.equal(second.exit().code, 0);
  });
});
