// What the Platform does with a hostile or broken agent, played by a WebSocket client with its own
// client certificate: upgrade refusals, the handshake, every frame check, and the close codes.

import 'reflect-metadata';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { Platform, type AgentInfo } from '../dist/index.js';
import { Fake, identity, opened, type Identity } from './fake-agent.js';
import { tempDir, within } from './support.js';

describe('a hostile agent', { timeout: 60_000 }, () => {
  let platform: Platform;
  let fake: Identity;
  const open: Fake[] = [];

  before(async () => {
    platform = await Platform.start({ listen: '127.0.0.1:0', stateDir: join(tempDir(), 'platform') });
    fake = await identity();
  });

  after(async () => {
    await platform.close();
    for (const f of open) f.ws.terminate();
  });

  it('is refused without a certificate, token, or with a bad one, on the wrong path', async () => {
    assert.deepEqual(await Fake.open(platform.url, undefined), { status: 401, refusal: undefined });
    assert.deepEqual(await Fake.open(platform.url, fake), { status: 401, refusal: 'token_missing' });
    assert.deepEqual(await Fake.open(platform.url, fake, 'not-a-token'), { status: 401, refusal: 'token_invalid' });
    const short = await platform.issueToken({ ttlMs: 1 });
    await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(await Fake.open(platform.url, fake, short), { status: 401, refusal: 'token_expired' });
    const token = await platform.issueToken();
    assert.deepEqual(await Fake.open(platform.url.replace('/agent', '/other'), fake, token), { status: 404, refusal: undefined });
    assert.equal(platform.agents().length, 0);
  });

  it('gets error replies for every bad frame and the connection goes on; errors are never answered', async () => {
    const token = await platform.issueToken();
    const connected = new Promise<[AgentInfo, boolean]>((r) => platform.once('agentConnected', (a, e) => r([a, e])));
    const f = opened(await Fake.open(platform.url, fake, token));
    open.push(f);

    // Before hello: nothing but hello is processed.
    assert.equal((await f.errorFor({ type: 'status' })).code, 'malformed');
    assert.equal((await f.errorFor({ type: 'accepted', id: 'r1', task_id: 't', state: 'queued' })).code, 'unexpected');
    f.ws.send(Buffer.from([1, 2, 3]));
    assert.equal((await f.next()).code, 'binary_not_expected');

    f.hello(fake.id, [7, 2, 1]);
    const welcome = await f.next();
    assert.deepEqual(welcome, { type: 'welcome', version: 2, agent_id: fake.id, enrolled: true });
    const [agent, enrolled] = await within(5000, 'agentConnected', connected);
    assert.equal(agent.id, fake.id);
    assert.equal(enrolled, true);

    assert.equal((await f.errorFor('x'.repeat(1024 * 1024 + 1))).code, 'oversize');
    assert.equal((await f.errorFor('['.repeat(65) + ']'.repeat(65))).code, 'too_deep');
    assert.equal((await f.errorFor('{"type":"status", "x": "[[[[' + '['.repeat(100) + '"}')).code, 'malformed', 'brackets in strings do not count');
    assert.equal((await f.errorFor('not json')).code, 'malformed');
    assert.equal((await f.errorFor({ id: 'a' })).code, 'malformed');
    assert.deepEqual(await f.errorFor({ type: 'teleport', id: 'q1' }), { type: 'error', id: 'q1', code: 'unknown_type', message: 'unknown message type `teleport`' });
    const long = await f.errorFor({ type: 'accepted', id: 'i'.repeat(257), task_id: 't', state: 'queued' });
    assert.equal(long.code, 'malformed');
    assert.equal(long.id, undefined, 'an id over 256 bytes is not echoed');
    const extra = await f.errorFor({ type: 'accepted', id: 'r2', task_id: 't', state: 'queued', more: 1 });
    assert.deepEqual([extra.code, extra.id], ['malformed', 'r2']);
    assert.equal((await f.errorFor({ type: 'need_module', id: 'r3', file_sha256: 'ab'.repeat(32) })).code, 'unexpected');
    // Version 1's name is not version 2's.
    assert.equal((await f.errorFor({ type: 'need_module', id: 'r4', sha256: 'ab'.repeat(32) })).code, 'malformed');
    assert.equal((await f.errorFor({ type: 'hello', versions: [2], agent_id: fake.id, agent_version: 'x' })).code, 'unexpected');

    // An error, valid or not, gets no answer: the next reply is for the frame after it.
    f.send({ type: 'error', code: 'malformed', message: 'you' });
    f.send({ type: 'error', code: 'no_such_code', message: 'you' });
    f.send({ type: 'error', id: 5 });
    f.send({ type: 'teleport', id: 'after-errors' });
    assert.equal((await f.next()).id, 'after-errors');

    // A status is kept and announced.
    const status = new Promise<string>((r) => platform.once('status', (id) => r(id)));
    f.send({
      type: 'status',
      agent_id: fake.id,
      agent_version: 'fake',
      host: { hostname: 'h', os: 'linux', arch: 'x86_64', uptime_secs: 1, load: [0, 0, 0] },
      running: [],
      agent_uptime_secs: 1,
    });
    assert.equal(await within(5000, 'status', status), fake.id);
    assert.equal(platform.agents().find((a) => a.id === fake.id)?.status?.host.hostname, 'h');

    // A newer connection replaces this one (4000); the older's requests fail.
    const pending = platform.handlers(fake.id).then(
      () => new Error('handlers resolved'),
      (e: unknown) => e as Error,
    );
    await f.next(); // the list_handlers request
    const newer = opened(await Fake.open(platform.url, fake));
    open.push(newer);
    newer.hello(fake.id);
    assert.deepEqual(await newer.next(), { type: 'welcome', version: 2, agent_id: fake.id, enrolled: false });
    assert.equal((await within(5000, 'the older connection to close', f.closed)).code, 4000);
    assert.match((await pending).message, /replaced/);
  });

  it('stores a result before acknowledging it, acknowledges repeats, and only acknowledges unrecorded refusals', async () => {
    const me = await identity();
    const f = opened(await Fake.open(platform.url, me, await platform.issueToken()));
    open.push(f);
    f.hello(me.id);
    await f.next();
    const result = {
      status: 'ok',
      exit_code: 0,
      output: { n: 1 },
      stdout: '{"n":1}',
      stderr: '',
      truncated: { stdout: false, stderr: false, stdout_total_bytes: 7, stderr_total_bytes: 0 },
      fuel_consumed: 10,
      memory_peak_bytes: 65536,
      duration_ms: 0.5,
      limits: { fuel: 100, memory_bytes: 65536, timeout_ms: 1000, output_bytes: 1024, clamped: [] },
      error: null,
    };
    f.send({ type: 'result', id: 'run-x', task_id: 'fake-task-1', result });
    assert.deepEqual(await f.next(), { type: 'ack', task_ids: ['fake-task-1'] });
    const stored = await platform.result('fake-task-1');
    assert.deepEqual([stored?.agentId, stored?.deliveries, stored?.result], [me.id, 1, result]);
    f.send({ type: 'result', id: 'run-y', task_id: 'fake-task-1', result: { ...result, status: 'interrupted' } });
    assert.deepEqual(await f.next(), { type: 'ack', task_ids: ['fake-task-1'] });
    assert.deepEqual([(await platform.result('fake-task-1'))?.deliveries, (await platform.result('fake-task-1'))?.result.status], [2, 'ok']);

    for (const reason of ['busy', 'updating']) {
      const refusal = { ...result, status: 'rejected', exit_code: null, output: null, stdout: '', limits: null, error: reason, reason };
      f.send({ type: 'result', id: 'run-z', task_id: `fake-task-2-${reason}`, result: refusal });
      assert.deepEqual(await f.next(), { type: 'ack', task_ids: [`fake-task-2-${reason}`] });
      assert.equal(await platform.result(`fake-task-2-${reason}`), undefined, `a ${reason} refusal is not stored`);
    }

    const bad = await f.errorFor({ type: 'result', id: 'run-w', task_id: 'fake-task-3', result: { ...result, truncated: null } });
    assert.deepEqual([bad.code, bad.id], ['malformed', 'run-w']);
    assert.equal(await platform.result('fake-task-3'), undefined);
  });

  it('announces update_status as an update event, acknowledges verdicts only, and answers need_release with an error', async () => {
    const me = await identity();
    const f = opened(await Fake.open(platform.url, me, await platform.issueToken()));
    open.push(f);
    f.hello(me.id);
    await f.next();
    const seen: Array<[string, unknown]> = [];
    const listener = (agentId: string, status: unknown) => seen.push([agentId, status]);
    platform.on('update', listener);
    try {
      const id = 'update-6d2a8f4c1e9b3057';
      // `refused` and `staged` answer the update: announced, not acknowledged (the first
      // message back is the verdict's ack).
      const refused = { type: 'update_status', id: 'update-refused', state: 'refused', version: '0.0.9', agent_version: '0.1.0', reason: 'downgrade', detail: 'not newer' };
      const staged = { type: 'update_status', id: 'update-staged', state: 'staged', version: '0.2.0', agent_version: '0.1.0' };
      f.send(refused);
      f.send(staged);
      // A verdict is announced and acknowledged, every time it comes.
      const failed = { type: 'update_status', id, state: 'failed', version: '0.2.0', agent_version: '0.1.0', reason: 'exited', detail: 'x'.repeat(1024) };
      f.send(failed);
      assert.deepEqual(await f.next(), { type: 'update_ack', id });
      const succeeded = { type: 'update_status', id: 'update-2', state: 'succeeded', version: '0.2.0', agent_version: '0.2.0', reason: null, detail: null };
      f.send(succeeded);
      assert.deepEqual(await f.next(), { type: 'update_ack', id: 'update-2' });
      f.send(succeeded);
      assert.deepEqual(await f.next(), { type: 'update_ack', id: 'update-2' });
      const body = (m: Record<string, unknown>) => {
        const { type: _type, ...rest } = m;
        return Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== null));
      };
      assert.deepEqual(seen, [refused, staged, failed, succeeded, succeeded].map((m) => [me.id, body(m)]));

      // The SDK serves no release: the request is answered with an error naming it.
      const e = await f.errorFor({ type: 'need_release', id, offset: 0, length: 8388608 });
      assert.deepEqual([e.id, e.code], [id, 'not_found']);

      // Each field is checked: nothing is announced or acknowledged for a bad one.
      const count = seen.length;
      for (const [bad, why] of [
        [{ ...failed, state: 'done' }, 'an unknown state'],
        [{ ...failed, reason: 'gremlins' }, 'an unknown reason'],
        [{ ...failed, detail: 'x'.repeat(1025) }, 'a detail over 1024 bytes'],
        [{ ...failed, version: '1'.repeat(65) }, 'a version over 64 bytes'],
        [{ ...failed, extra: 1 }, 'an unknown field'],
        [{ type: 'update_status', id, state: 'failed', version: '0.2.0' }, 'no agent_version'],
        [{ type: 'need_release', id, offset: 0, length: 0 }, 'an empty piece'],
        [{ type: 'need_release', id, offset: 0, length: 32 * 1024 * 1024 + 1 }, 'a piece over MAX_BINARY_BYTES'],
        [{ type: 'need_release', id, offset: -1, length: 1 }, 'a negative offset'],
      ] as const) {
        const reply = await f.errorFor(bad);
        assert.deepEqual([reply.code, reply.id], ['malformed', id], why);
      }
      assert.equal(seen.length, count);

      // A listener that throws: the verdict is not acknowledged (the agent sends it again later).
      const throwing = () => {
        throw new Error('no room for the verdict');
      };
      platform.on('update', throwing);
      try {
        f.send(failed);
        f.send({ type: 'teleport', id: 'after-the-throw' });
        assert.equal((await f.next()).id, 'after-the-throw');
      } finally {
        platform.off('update', throwing);
      }
    } finally {
      platform.off('update', listener);
    }
  });

  it('acknowledges a flood of 4500 results sent before any ack, each task id once, in gathered acks within their bounds', async () => {
    const me = await identity();
    const f = opened(await Fake.open(platform.url, me, await platform.issueToken()));
    open.push(f);
    f.hello(me.id);
    await f.next();
    const result = {
      status: 'ok', exit_code: 0, output: null, stdout: '', stderr: '',
      truncated: { stdout: false, stderr: false, stdout_total_bytes: 0, stderr_total_bytes: 0 },
      fuel_consumed: 1, memory_peak_bytes: 0, duration_ms: 0.1, limits: null, error: null,
    };
    // 3000 short ids, then 1500 of 200 bytes. (The acks gather what arrives while results are
    // stored, about a hundred here: the 1000-id and 128 KiB bounds are checked, not reached.)
    const ids = [
      ...Array.from({ length: 3000 }, (_, i) => `flood-${i}`),
      ...Array.from({ length: 1500 }, (_, i) => `flood-long-${i}-`.padEnd(200, 'x')),
    ];
    for (const id of ids) f.send({ type: 'result', id: 'run-flood', task_id: id, result });
    const acked = new Map<string, number>();
    let largest = 0;
    while (acked.size < ids.length) {
      const m = await f.next(30_000);
      assert.equal(m.type, 'ack', JSON.stringify(m).slice(0, 200));
      const taskIds = m.task_ids as string[];
      const bytes = taskIds.reduce((n, t) => n + Buffer.byteLength(t), 0);
      assert.ok(taskIds.length <= 1000, `an ack of ${taskIds.length} task ids`);
      assert.ok(bytes <= 128 * 1024, `an ack of ${bytes} bytes of task ids`);
      largest = Math.max(largest, taskIds.length);
      for (const t of taskIds) acked.set(t, (acked.get(t) ?? 0) + 1);
    }
    assert.deepEqual([...acked.values()].filter((n) => n !== 1), [], 'each task id acknowledged once');
    assert.ok(largest > 1, 'the acks were gathered (one ack per result would not test the bounds)');
    assert.equal((await platform.result(ids[ids.length - 1] as string))?.deliveries, 1);
  });

  it('uploads modules on need_module, resends runs not accepted after a reconnect, and ends runs on errors and timeouts', async () => {
    const me = await identity();
    let f = opened(await Fake.open(platform.url, me, await platform.issueToken()));
    open.push(f);
    f.hello(me.id);
    await f.next();

    const module = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 42]);
    const sha = createHash('sha256').update(module).digest('hex');
    const chunks: number[] = [];
    const running = platform.run(me.id, { module, taskId: 'life-1', input: { a: 1 }, onChunk: (c) => chunks.push(c.seq) });
    const run = await f.next();
    assert.deepEqual(
      { ...run, id: undefined },
      { type: 'run', id: undefined, task_id: 'life-1', file_sha256: sha, input: { a: 1 }, stream: true },
    );
    f.send({ type: 'need_module', id: run.id, file_sha256: sha });
    const upload = (await f.next()).binary as Buffer;
    assert.deepEqual(new Uint8Array(upload), module);

    // Not accepted when the connection drops: sent again on the next one.
    f.ws.terminate();
    f = opened(await Fake.open(platform.url, me));
    open.push(f);
    f.hello(me.id);
    assert.equal((await f.next()).type, 'welcome');
    const resent = await f.next();
    assert.deepEqual([resent.type, resent.id, resent.task_id], ['run', run.id, 'life-1']);
    f.send({ type: 'accepted', id: run.id, task_id: 'life-1', state: 'running' });
    for (const seq of [0, 1, 1, 0, 2]) f.send({ type: 'chunk', task_id: 'life-1', seq, stream: 'stdout', data: `${seq}` });
    const result = {
      status: 'ok',
      exit_code: 0,
      output: null,
      stdout: '',
      stderr: '',
      truncated: { stdout: false, stderr: false, stdout_total_bytes: 0, stderr_total_bytes: 0 },
      fuel_consumed: 1,
      memory_peak_bytes: 0,
      duration_ms: 1,
      limits: null,
      error: null,
    };
    f.send({ type: 'result', id: run.id, task_id: 'life-1', result });
    assert.deepEqual(await within(5000, 'the run', running), result);
    assert.deepEqual(chunks, [0, 1, 2], 'chunks once each, in seq order');
    assert.deepEqual(await f.next(), { type: 'ack', task_ids: ['life-1'] });

    // An error naming the run ends it.
    const refused = platform.run(me.id, { command: 'x', taskId: 'life-2' }).then(
      () => undefined,
      (e: unknown) => e as Error & { code?: string },
    );
    const run2 = await f.next();
    f.send({ type: 'error', id: run2.id, code: 'malformed', message: 'no' });
    assert.equal((await refused)?.code, 'agent_error');

    // A run nobody waits for any more: its result is still stored and acknowledged.
    const late = platform.run(me.id, { command: 'x', taskId: 'life-3', waitMs: 50 }).then(
      () => undefined,
      (e: unknown) => e as Error & { code?: string },
    );
    const run3 = await f.next();
    assert.equal((await late)?.code, 'timeout');
    f.send({ type: 'result', id: run3.id, task_id: 'life-3', result });
    assert.deepEqual(await f.next(), { type: 'ack', task_ids: ['life-3'] });
    assert.equal((await platform.result('life-3'))?.deliveries, 1);
  });

  it('is told unsupported_version and closed (1008) when it offers no version the platform speaks (version 1 only included)', async () => {
    for (const versions of [[1], [3, 1]]) {
      const f = opened(await Fake.open(platform.url, fake));
      open.push(f);
      f.hello(fake.id, versions);
      const m = await f.next();
      assert.equal(m.code, 'unsupported_version');
      assert.equal(m.message, `this platform speaks protocol version 2; the agent offered [${versions.join(', ')}]`);
      assert.equal((await within(5000, 'the close', f.closed)).code, 1008);
    }
  });

  it('is closed with 1001 when the platform shuts down, and close() resolves', async () => {
    const f = opened(await Fake.open(platform.url, fake));
    open.push(f);
    f.hello(fake.id);
    await f.next();
    const waiting = platform.waitForAgent('f'.repeat(64), { timeoutMs: 60_000 }).then(
      () => undefined,
      (e: unknown) => e as Error & { code?: string },
    );
    const running = platform.run(fake.id, { command: 'x' }).then(
      () => undefined,
      (e: unknown) => e as Error & { code?: string },
    );
    await f.next(); // the run
    await within(10_000, 'close()', platform.close());
    assert.equal((await within(5000, 'the close', f.closed)).code, 1001);
    assert.equal((await waiting)?.code, 'closed');
    assert.equal((await running)?.code, 'closed');
    await assert.rejects(platform.issueToken(), /closed/);
  });

  it('is closed with 4001 when it goes silent past the idle timeout, and kept while it pings', async () => {
    const quiet = await Platform.start({ listen: '127.0.0.1:0', stateDir: join(tempDir(), 'platform'), idleTimeoutMs: 1500 });
    try {
      const token = await quiet.issueToken();
      const silent = opened(await Fake.open(quiet.url, fake, token));
      open.push(silent);
      silent.hello(fake.id);
      assert.equal((await silent.next()).type, 'welcome');
      const started = Date.now();
      const closed = await within(5000, 'the idle close', silent.closed);
      assert.equal(closed.code, 4001, JSON.stringify(closed));
      assert.ok(Date.now() - started >= 1400, `closed after ${Date.now() - started} ms, before the idle timeout`);
      // The same agent, pinging every 300 ms (as agents heartbeat), stays connected past it.
      const pinging = opened(await Fake.open(quiet.url, fake));
      open.push(pinging);
      pinging.hello(fake.id);
      assert.equal((await pinging.next()).type, 'welcome');
      const pings = setInterval(() => pinging.ws.ping(), 300);
      try {
        const outcome = await Promise.race([pinging.closed, new Promise((r) => setTimeout(() => r('open'), 3500))]);
        assert.equal(outcome, 'open', `a pinging agent was closed: ${JSON.stringify(outcome)}`);
      } finally {
        clearInterval(pings);
      }
    } finally {
      await quiet.close();
    }
  });
});
