// The FileStore by itself: first result wins, repeats counted, conflicts refused, everything read back
// after a reopen, a torn last line (a crash while writing) dropped, a corrupt line refused.

import assert from 'node:assert/strict';
import { appendFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';

import { FileStore } from '../dist/index.js';
import { tempDir } from './support.js';

const A = 'a'.repeat(64);
const B = 'b'.repeat(64);

describe('FileStore', { timeout: 30_000 }, () => {
  it('keeps the first result per task id, counts repeats, refuses another agent, and reads it all back', async () => {
    const path = join(tempDir(), 'results.jsonl');
    const store = new FileStore(path);
    await store.open();
    assert.equal(statSync(path).mode & 0o777, 0o600);
    const first = await store.put('t1', A, { status: 'ok', n: 1 });
    assert.equal(first.kind, 'stored');
    assert.equal(first.stored.deliveries, 1);
    const repeat = await store.put('t1', A, { status: 'interrupted' });
    assert.equal(repeat.kind, 'repeat');
    assert.deepEqual(repeat.stored.result, { status: 'ok', n: 1 });
    assert.equal(repeat.stored.deliveries, 2);
    const conflict = await store.put('t1', B, { status: 'ok' });
    assert.equal(conflict.kind, 'conflict');
    assert.equal(conflict.stored.agentId, A);
    // Many at once: one group commit or several, each resolved once on disk.
    const many = await Promise.all(Array.from({ length: 200 }, (_, i) => store.put(`m${i}`, B, { status: 'ok', i })));
    assert.ok(many.every((o) => o.kind === 'stored'));
    await store.close();

    const again = new FileStore(path);
    await again.open();
    const t1 = await again.get('t1');
    assert.deepEqual(
      { agentId: t1?.agentId, result: t1?.result, deliveries: t1?.deliveries },
      { agentId: A, result: { status: 'ok', n: 1 }, deliveries: 2 },
    );
    assert.deepEqual((await again.get('m199'))?.result, { status: 'ok', i: 199 });
    assert.equal(await again.get('nope'), undefined);
    await again.close();
    assert.equal(readFileSync(path, 'utf8').split('\n').filter((l) => l !== '').length, 202);
  });

  it('drops a torn last line and goes on writing whole lines', async () => {
    const path = join(tempDir(), 'results.jsonl');
    const store = new FileStore(path);
    await store.open();
    await store.put('t1', A, { status: 'ok' });
    await store.close();
    appendFileSync(path, '{"stored":{"task_id":"t2","agent":"');
    const again = new FileStore(path);
    await again.open();
    assert.equal(await again.get('t2'), undefined);
    await again.put('t3', A, { status: 'ok' });
    await again.close();
    const lines = readFileSync(path, 'utf8').split('\n');
    assert.equal(lines.length, 3, 'two lines and the final newline');
    for (const l of lines.slice(0, 2)) JSON.parse(l);
  });

  it('refuses to open a log with a corrupt line', async () => {
    const path = join(tempDir(), 'results.jsonl');
    writeFileSync(path, '{"delivered":"x"}\nnot json\n{"delivered":"y"}\n');
    await assert.rejects(new FileStore(path).open(), /results\.jsonl:2: not JSON/);
  });
});
