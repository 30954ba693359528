// The protocol's JSON Schema against its two other copies: the generated TypeScript types
// (src/protocol.ts must be what the schema generates) and the examples in docs/protocol.md
// (each must validate against the schema of its direction); and the SDK's hand-kept list of
// refusals the agent does not record against the document's.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Ajv2020 } from 'ajv/dist/2020.js';

import { UNRECORDED_REASONS } from '../dist/wire.js';

const repo = (p: string) => fileURLToPath(new URL(`../../../${p}`, import.meta.url));
/** Ajv with the numeric formats the Rust generator writes (`uint64`, `uint32`, `double`…). */
function ajv(): Ajv2020 {
  const a = new Ajv2020({ allErrors: true, strict: false });
  const range = (max: number) => ({ type: 'number' as const, validate: (n: number) => Number.isInteger(n) && n >= 0 && n <= max });
  a.addFormat('uint64', range(Number.MAX_SAFE_INTEGER));
  a.addFormat('uint32', range(2 ** 32 - 1));
  a.addFormat('uint', range(Number.MAX_SAFE_INTEGER));
  a.addFormat('double', { type: 'number', validate: () => true });
  a.addFormat('float', { type: 'number', validate: () => true });
  return a;
}

const schema = (name: string) =>
  JSON.parse(readFileSync(repo(`protocol/schema/${name}.schema.json`), 'utf8')) as object;

test('src/protocol.ts is what the schema generates', () => {
  // Exits non-zero, naming the fix, when they differ.
  execFileSync(process.execPath, [repo('sdk/node/scripts/gen-types.mjs'), '--check'], {
    stdio: 'pipe',
  });
});

test('every example in docs/protocol.md validates against the schema', () => {
  const a = ajv();
  const validate = {
    agent: a.compile(schema('agent-message')),
    platform: a.compile(schema('platform-message')),
  };
  const doc = readFileSync(repo('docs/protocol.md'), 'utf8');
  const blocks = [...doc.matchAll(/```json (agent|platform):(\w+)\n([\s\S]*?)```/g)];
  assert.ok(blocks.length >= 17, `only ${blocks.length} examples found`);
  const types = { agent: new Set<string>(), platform: new Set<string>() };
  for (const [, side, type, body] of blocks) {
    const dir = side as 'agent' | 'platform';
    const message = JSON.parse(body) as { type: string };
    assert.equal(message.type, type, `an example tagged ${side}:${type} is a ${message.type}`);
    const ok = validate[dir](message);
    assert.ok(ok, `${side}:${type} example does not match the schema: ${JSON.stringify(validate[dir].errors)}\n${body}`);
    types[dir].add(type);
  }
  // A message type without an example fails (the schema lists them as its `oneOf`).
  for (const dir of ['agent', 'platform'] as const) {
    const all = (schema(`${dir}-message`) as { oneOf?: { properties?: { type?: { const?: string } } }[] }).oneOf ?? [];
    for (const variant of all) {
      const t = variant.properties?.type?.const;
      if (t) assert.ok(types[dir].has(t), `docs/protocol.md has no ${dir}:${t} example`);
    }
  }
});

test("the SDK's unrecorded refusals are those docs/protocol.md says the agent does not record", () => {
  const doc = readFileSync(repo('docs/protocol.md'), 'utf8');
  const table = doc.split('| `reason` (with `rejected`) | recorded | meaning |')[1]?.split('\n\n')[0] ?? '';
  const unrecorded = [...table.matchAll(/^\| `(\w+)` \| no[ |]/gm)].map((m) => m[1]);
  assert.ok(unrecorded.includes('busy'), `the table was not found: ${unrecorded.join(', ')}`);
  assert.deepEqual([...UNRECORDED_REASONS], unrecorded);
});

test('the schema refuses what the agent refuses', () => {
  const a = ajv();
  const platform = a.compile(schema('platform-message'));
  const agent = a.compile(schema('agent-message'));
  const run = { type: 'run', id: 'r1', task_id: 't1', command: 'hello' };
  assert.ok(platform(run), JSON.stringify(platform.errors));
  assert.ok(!platform({ ...run, surprise: true }), 'an unknown field is refused');
  assert.ok(!platform({ type: 'run', id: 'r1' }), 'a missing task_id is refused');
  assert.ok(!platform({ ...run, type: 'launch' }), 'an unknown type is refused');
  assert.ok(!platform({ ...run, limits: { fuel: -1 } }), 'a negative limit is refused');
  assert.ok(!platform({ ...run, id: 'x'.repeat(257) }), 'an id over 256 bytes is refused');
  const status = {
    type: 'status', agent_id: 'a', agent_version: '0.1.0', running: [], agent_uptime_secs: 1,
    host: { hostname: 'h', os: 'linux', arch: 'x86_64', uptime_secs: 1, load: [0, 0, 0] },
  };
  assert.ok(agent(status), JSON.stringify(agent.errors));
  assert.ok(!agent({ ...status, extra: 1 }), 'a status with an unknown field is refused');
  assert.ok(!agent({ type: 'need_module', id: 'r', sha256: 'ab' }), 'the version-1 name is refused');
});
