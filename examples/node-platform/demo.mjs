// The Node quick start, end to end on 127.0.0.1: the example platform (Express +
// @bridge/platform), a real agent, a handler signed in JavaScript, installed, and run
// through the web API. `cargo xtask node-demo` runs it with the binaries it builds.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { Platform, keygen, sign } from '@bridge/platform';
import { createApp } from './app.mjs';

const need = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set: run this with \`cargo xtask node-demo\``);
  return process.env[name];
};
const daemon = need('BRIDGE_DAEMON');
const wasmDir = need('BRIDGE_WASM_DIR');
const dir = mkdtempSync(join(tmpdir(), 'bridge-node-demo-'));
const step = (text) => console.log(`\n== ${text}`);

step('start the platform (agents: mutual TLS on a free port) and its web API');
const platform = await Platform.start({ listen: '127.0.0.1:0', stateDir: join(dir, 'platform') });
const http = createApp(platform).listen(0, '127.0.0.1');
await new Promise((r) => http.once('listening', r));
const api = `http://127.0.0.1:${http.address().port}`;
console.log(`agents connect to ${platform.url}; server pin ${platform.pin}; web API ${api}`);

step('a publisher key, and the hello handler signed with it (in JavaScript)');
const publisher = keygen();
writeFileSync(join(dir, 'publisher.key.pub'), publisher.publicKey + '\n');
const signed = sign(readFileSync(join(wasmDir, 'hello.wasm')), publisher.privateKey, {
  name: 'hello',
  version: '1.0.0',
});
console.log(`key ${publisher.keyId}; signed module ${signed.length} bytes`);

step('enroll an agent with a one-time token; it trusts the publisher key');
const token = await platform.issueToken({ ttlMs: 600_000 });
const agent = spawn(
  daemon,
  ['run', '--state', join(dir, 'agent'), '--server', platform.url, '--server-pin', platform.pin,
    '--token', token, '--trusted-key', publisher.publicKey],
  { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, RUST_LOG: 'warn' } },
);
const { id } = await platform.waitForAgent(undefined, { timeoutMs: 30_000 });
console.log(`agent ${id} connected`);

step('install the signed module as the command "hello"');
const handlers = await platform.installHandler(id, 'hello', signed);
console.log(JSON.stringify(handlers));

step(`POST ${api}/agents/${id.slice(0, 12)}…/run {"command":"hello","input":{"name":"Ada"}}`);
const response = await fetch(`${api}/agents/${id}/run`, {
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify({ command: 'hello', input: { name: 'Ada' }, taskId: 'demo-hello-1' }),
});
const result = await response.json();
console.log(`HTTP ${response.status}: status ${result.status}, output ${JSON.stringify(result.output)}`);

step('the stored result: GET /results/demo-hello-1');
const stored = await (await fetch(`${api}/results/demo-hello-1`)).json();
console.log(`stored once: agent ${stored.agentId.slice(0, 12)}…, deliveries ${stored.deliveries}`);

step('stop');
agent.kill('SIGTERM');
await new Promise((r) => agent.once('exit', r));
http.close();
await platform.close();
rmSync(dir, { recursive: true, force: true });
if (result.status !== 'ok' || result.output?.greeting !== 'Hello, Ada!') {
  console.error('the demo did not get the expected result');
  process.exit(1);
}
console.log('done');
