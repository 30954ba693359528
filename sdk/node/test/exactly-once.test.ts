// Exactly once across a platform restart with the FileStore: the platform dies after storing a
// result and before acknowledging it; restarted on the same state, it gets the result again and keeps one.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';

import { crashAfterStoring, PlatformProcess, storedTwice } from './platform-process.js';
import { startAgent, tempDir, waitUntil } from './support.js';

interface LogLine {
  stored?: { task_id: string; agent: string; result: Record<string, unknown>; deliveries: number };
  delivered?: string;
}

function logLines(stateDir: string): LogLine[] {
  return readFileSync(join(stateDir, 'results.jsonl'), 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as LogLine);
}

describe('exactly once across a platform restart (FileStore)', { timeout: 120_000 }, () => {
  const cleanup: Array<() => Promise<void>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  it('keeps one result when the platform dies between storing it and acknowledging it', async () => {
    const stateDir = join(tempDir(), 'platform');
    const taskId = `once-${Date.now()}`;
    const { url, pin, port, agent, agentId, pub, module } = await crashAfterStoring((listen, kill) => new PlatformProcess(stateDir, listen, kill), taskId, cleanup);
    const before = logLines(stateDir);
    assert.equal(before.filter((l) => l.stored?.task_id === taskId).length, 1, 'stored before the kill');
    assert.equal(before.filter((l) => l.delivered === taskId).length, 0);

    // The same state and port: same key, same pin; the agent reconnects and sends the
    // unacknowledged result again.
    const second = new PlatformProcess(stateDir, `127.0.0.1:${port}`);
    cleanup.push(() => second.kill());
    const again = await second.started();
    assert.equal(again.pin, pin);
    assert.equal(again.url, url);
    const stored = await storedTwice(second, taskId);
    assert.equal(stored.deliveries, 2, `the agent sent the result again; agent log:\n${agent.log()}`);
    assert.equal(stored.agentId, agentId);
    assert.equal(stored.result.status, 'ok');
    assert.deepEqual(stored.result.output, { greeting: 'Hello, Ada!' });

    const lines = logLines(stateDir);
    assert.equal(lines.filter((l) => l.stored?.task_id === taskId).length, 1, 'exactly one stored entry');
    assert.equal(lines.filter((l) => l.delivered === taskId).length, 1, 'the repeat is counted, not stored');

    // The repeat was acknowledged: after another reconnect the agent does not send it again
    // (the handlers reply comes after the agent took the ack).
    await second.request({ cmd: 'handlers', agentId });
    await agent.terminate();
    const agent2 = startAgent({ url, pin }, { state: agent.state, trustedKey: pub.publicKey });
    cleanup.push(() => agent2.kill());
    await second.request({ cmd: 'waitAgent', id: agentId });
    const later = (await second.request({ cmd: 'run', agentId, module, taskId: `${taskId}-later`, input: {} })) as { result: { status: string } };
    assert.equal(later.result.status, 'ok');
    const final = (await second.request({ cmd: 'result', taskId })) as { stored: { deliveries: number } };
    assert.equal(final.stored.deliveries, 2);

    // close() leaves nothing open: the process ends by itself.
    await second.request({ cmd: 'close' });
    await waitUntil(10_000, 'the platform process to exit after close()', () => !second.alive(), () => second.log());
    assert.equal(second.exit().code, 0);
  });
});
