// The Platform against the real agent: enrollment, token reuse, modules, handlers, streaming,
// cancel, repeated task ids, unknown commands, and the acknowledgement that drains the agent's outbox.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { Platform, PlatformError, type AgentInfo, type Chunk, type RunResult } from '../dist/index.js';
import { publisher, signed, startAgent, tempDir, waitUntil, within, type Agent, type Publisher } from './support.js';

describe('a Platform with a real agent', { timeout: 180_000 }, () => {
  let platform: Platform;
  let stateDir: string;
  let agent: Agent;
  let agentId: string;
  let pub: Publisher;
  let token: string;
  const connected: Array<{ agent: AgentInfo; enrolled: boolean }> = [];
  const refused: Array<{ agentId: string; reason: string }> = [];
  const logs: string[] = [];

  before(async () => {
    stateDir = join(tempDir(), 'platform');
    platform = await Platform.start({
      listen: '127.0.0.1:0',
      stateDir,
      log: (level, message, fields) => logs.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`),
    });
    platform.on('agentConnected', (a, enrolled) => connected.push({ agent: a, enrolled }));
    platform.on('refused', (r) => refused.push(r));
    pub = publisher();
    token = await platform.issueToken({ ttlMs: 600_000 });
    agent = startAgent(platform, { token, trustedKey: pub.publicKey });
    agentId = await agent.id();
    await within(30_000, 'the agent to connect', platform.waitForAgent(agentId, { timeoutMs: 30_000 }));
  });

  after(async () => {
    await agent?.kill();
    await platform?.close();
  });

  it('enrolls an agent with a one-time token, and keeps only its hash', async () => {
    assert.match(platform.url, /^wss:\/\/127\.0\.0\.1:\d+\/agent$/);
    assert.match(platform.pin, /^[0-9a-f]{64}$/);
    assert.match(agentId, /^[0-9a-f]{64}$/);
    const first = connected.find((c) => c.agent.id === agentId);
    assert.ok(first, 'agentConnected for the agent');
    assert.equal(first.enrolled, true);
    const listed = platform.agents().find((a) => a.id === agentId);
    assert.ok(listed?.connected);
    const tokens = readFileSync(join(stateDir, 'tokens.json'), 'utf8');
    assert.ok(!tokens.includes(token), 'tokens.json must not hold the token itself');
    assert.match(readFileSync(join(stateDir, 'agents.json'), 'utf8'), new RegExp(agentId));
  });

  it('refuses a used token to another agent (401 token_used), and says so', async () => {
    const second = startAgent(platform, { token, trustedKey: pub.publicKey });
    try {
      const secondId = await second.id();
      await waitUntil(20_000, 'a token_used refusal', () => refused.some((r) => r.agentId === secondId && r.reason === 'token_used'));
      await second.waitLog(/token_used/, 20_000);
      assert.ok(logs.some((l) => l.includes('token_used') && l.includes(secondId)), 'the SDK logs the refusal');
      assert.equal(platform.agents().some((a) => a.id === secondId), false, 'the second agent is not enrolled');
    } finally {
      await second.kill();
    }
  });

  it('runs a signed module, stores its result and acknowledges it (the outbox drains)', async () => {
    const taskId = `module-${Date.now()}`;
    const module = signed(pub, 'hello');
    const result = await platform.run(agentId, { module, input: { name: 'Ada' }, taskId });
    assert.equal(result.status, 'ok', JSON.stringify(result));
    assert.deepEqual(result.output, { greeting: 'Hello, Ada!' });
    assert.equal(result.file_sha256, createHash('sha256').update(module).digest('hex'));
    assert.match(result.code_sha256 ?? '', /^[0-9a-f]{64}$/);
    const stored = await platform.result(taskId);
    assert.equal(stored?.agentId, agentId);
    assert.equal(stored?.deliveries, 1);

    // An unacknowledged result would be sent again on the agent's next connection. A request
    // answered after the ack (one connection's messages take effect in order) shows the agent
    // has it before it stops (SIGTERM: its journal writes what is queued).
    await platform.handlers(agentId);
    await agent.terminate();
    agent = startAgent(platform, { state: agent.state, trustedKey: pub.publicKey });
    await within(30_000, 'the agent to reconnect', platform.waitForAgent(agentId, { timeoutMs: 30_000 }));
    // A task after the reconnect: its result comes after whatever the outbox held.
    const later = await platform.run(agentId, { module: signed(pub, 'hello'), input: { name: 'Bob' } });
    assert.equal(later.status, 'ok');
    assert.equal((await platform.result(taskId))?.deliveries, 1, 'the acknowledged result was not sent again');
  });

  it('installs a named handler and runs it by name; refuses one whose claims name another command', async () => {
    const module = signed(pub, 'hello', 'greet');
    const handlers = await platform.installHandler(agentId, 'greet', module);
    assert.deepEqual(handlers.map((h) => h.name), ['greet']);
    assert.equal(handlers[0]?.file_sha256, createHash('sha256').update(module).digest('hex'), 'file_sha256: the uploaded bytes');
    assert.match(handlers[0]?.code_sha256 ?? '', /^[0-9a-f]{64}$/);
    assert.notEqual(handlers[0]?.code_sha256, handlers[0]?.file_sha256, 'code_sha256: the module without its signature');
    assert.deepEqual((await platform.handlers(agentId)).map((h) => h.name), ['greet']);
    const result = await platform.run(agentId, { command: 'greet', input: { name: 'Grace' } });
    assert.equal(result.status, 'ok', JSON.stringify(result));
    assert.deepEqual(result.output, { greeting: 'Hello, Grace!' });

    await assert.rejects(platform.installHandler(agentId, 'other', signed(pub, 'hello', 'greet')), (e: unknown) => {
      assert.ok(e instanceof PlatformError);
      assert.equal(e.code, 'agent_error');
      assert.equal(e.agentError?.code, 'refused');
      assert.equal(e.reason, 'name_mismatch');
      return true;
    });
    assert.deepEqual(await platform.removeHandler(agentId, 'greet'), []);
    await assert.rejects(platform.removeHandler(agentId, 'greet'), (e: unknown) => e instanceof PlatformError && e.agentError?.code === 'not_found');
  });

  it('streams output chunks in seq order before the result', async () => {
    const chunks: Chunk[] = [];
    const result = await platform.run(agentId, {
      module: signed(pub, 'ticker'),
      input: { lines: 5, ms: 30 },
      onChunk: (c) => chunks.push(c),
    });
    assert.equal(result.status, 'ok', JSON.stringify(result));
    assert.ok(chunks.length > 0, 'chunks came');
    assert.deepEqual(
      chunks.map((c) => c.seq),
      chunks.map((_, i) => i),
    );
    const out = chunks.filter((c) => c.stream === 'stdout').map((c) => c.data).join('');
    assert.equal(out, 'tick 0\ntick 1\ntick 2\ntick 3\ntick 4\n');
    assert.equal(out, result.stdout);
  });

  it('cancels a running task: cancelling, then the result says cancelled', async () => {
    const taskId = `cancel-${Date.now()}`;
    let running!: () => void;
    const firstChunk = new Promise<void>((r) => (running = r));
    const pending = platform.run(agentId, {
      module: signed(pub, 'ticker'),
      input: { lines: 100_000, ms: 50 },
      taskId,
      onChunk: () => running(),
    });
    await within(20_000, 'the task to start', firstChunk);
    assert.equal(await platform.cancel(agentId, taskId), 'cancelling');
    const result = await within(20_000, 'the cancelled result', pending);
    assert.equal(result.status, 'cancelled', JSON.stringify(result));
    assert.equal((await platform.result(taskId))?.result.status, 'cancelled');
    assert.equal(await platform.cancel(agentId, taskId), 'finished');
  });

  it('answers a repeated task id with the first result without running it again', async () => {
    const taskId = `repeat-${Date.now()}`;
    const first = await platform.run(agentId, { module: signed(pub, 'hello'), input: { name: 'Ada' }, taskId });
    assert.equal(first.status, 'ok');
    const again: RunResult = await platform.run(agentId, { module: signed(pub, 'hello'), input: { name: 'Eve' }, taskId });
    assert.deepEqual(again, first);
    assert.deepEqual(again.output, { greeting: 'Hello, Ada!' });
    assert.equal((await platform.result(taskId))?.deliveries, 1);

    // Answered from the store, not by the agent: it works with the agent gone, where sending
    // would fail (not_connected).
    await agent.terminate();
    await waitUntil(10_000, 'the agent to be disconnected', () => platform.agents().find((a) => a.id === agentId)?.connected === false);
    assert.deepEqual(await platform.run(agentId, { module: signed(pub, 'hello'), input: { name: 'Eve' }, taskId }), first);
    await assert.rejects(platform.run(agentId, { module: signed(pub, 'hello') }), (e: unknown) => e instanceof PlatformError && e.code === 'not_connected');
    agent = startAgent(platform, { state: agent.state, trustedKey: pub.publicKey });
    await within(30_000, 'the agent to reconnect', platform.waitForAgent(agentId, { timeoutMs: 30_000 }));
  });

  it('refuses a task past its deadline (deadline_passed), and does not store the refusal', async () => {
    const taskId = `late-${Date.now()}`;
    const result = await platform.run(agentId, { module: signed(pub, 'hello'), taskId, notAfter: new Date(Date.now() - 60_000) });
    assert.equal(result.status, 'rejected', JSON.stringify(result));
    assert.equal(result.reason, 'deadline_passed');
    assert.equal(await platform.result(taskId), undefined);
    // Not the task's result: the same task id runs later.
    const ran = await platform.run(agentId, { module: signed(pub, 'hello'), taskId });
    assert.equal(ran.status, 'ok');
    assert.equal((await platform.result(taskId))?.result.status, 'ok');
  });

  it('refuses an unknown command with its reason, and does not store the refusal', async () => {
    const taskId = `unknown-${Date.now()}`;
    const result = await platform.run(agentId, { command: 'no-such-command', taskId });
    assert.equal(result.status, 'rejected');
    assert.equal(result.reason, 'unknown_command');
    assert.equal(await platform.result(taskId), undefined);
  });
});
