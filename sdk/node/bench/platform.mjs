// The platform benchmark: the Node SDK's Platform against `bridgectl serve`, one real agent
// each, measured in alternating rounds of one run. `cargo xtask bench-node` runs it.
//
// Both sides drive the same release `bridge-daemon` with the same configuration (durable
// journal, the signed `hello` handler installed: warm, compiled once), each agent on its own
// CPU, the platforms and this process on the other, as when the platform runs on another host.
//
// - Round trip of one warm `hello` task, one at a time. Measured inside the platform process,
//   from sending the `run` to holding the stored result: `bridgectl serve` reports it as
//   `round_trip_us` (its hub, send -> result stored); the Node Platform as the
//   `roundTripUs` it reports through `onRoundTrip` (send -> result stored). Medians of
//   every sample of every round.
// - Tasks per second with 32 and 128 tasks in flight: `bridgectl serve` through that many
//   control connections (each one run at a time), the Node Platform through that many
//   concurrent `platform.run` calls; completed tasks / elapsed time, median of the rounds.
//
// The two platforms do not store results alike: the Node SDK's FileStore fdatasyncs each
// result before acknowledging it (a platform crash or a power loss keeps it), `bridgectl serve`
// writes its log without fsync (a process crash keeps it, a power loss may not). So the Node
// platform is measured twice: as shipped (FileStore), and with a store in memory that keeps
// results without any write, which isolates what the SDK itself costs.
//
// Environment: BRIDGE_DAEMON, BRIDGECTL (release builds), BRIDGE_WASM_DIR; BRIDGE_BENCH_QUICK=1
// for 3 short rounds; BRIDGE_BENCH_AGENT_CPU / BRIDGE_BENCH_PLATFORM_CPU (defaults 0 and 1).

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir, cpus } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

import { Platform } from '../dist/index.js';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (cargo xtask bench-node sets it)`);
  return v;
};
const DAEMON = env('BRIDGE_DAEMON');
const BRIDGECTL = env('BRIDGECTL');
const WASM = env('BRIDGE_WASM_DIR');
const QUICK = !!process.env.BRIDGE_BENCH_QUICK;
const ROUNDS = QUICK ? 3 : 5;
const RT_SAMPLES = QUICK ? 100 : 300;
const TP_SECS = QUICK ? 2 : 5;
const LEVELS = [32, 128];
const split = cpus().length >= 2;
const AGENT_CPU = process.env.BRIDGE_BENCH_AGENT_CPU ?? '0';
const PLATFORM_CPU = process.env.BRIDGE_BENCH_PLATFORM_CPU ?? '1';

const children = [];
process.on('exit', () => children.forEach((c) => c.kill('SIGKILL')));

function pinned(cpu, cmd, args) {
  return split ? ['taskset', ['-c', cpu, cmd, ...args]] : [cmd, args];
}

function start(cpu, cmd, args, extraEnv = {}) {
  const [c, a] = pinned(cpu, cmd, args);
  const child = spawn(c, a, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: 'warn', ...extraEnv },
  });
  children.push(child);
  child.log = '';
  child.stderr.on('data', (d) => {
    child.log = (child.log + d).slice(-20000);
  });
  return child;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

/** One control connection to `bridgectl serve`: a request, then its response line. */
class Control {
  constructor(path) {
    this.socket = connect(path);
    this.lines = createInterface({ input: this.socket })[Symbol.asyncIterator]();
  }
  async request(obj) {
    this.socket.write(JSON.stringify(obj) + '\n');
    const { value, done } = await this.lines.next();
    if (done) throw new Error('the control connection closed');
    return JSON.parse(value);
  }
  close() {
    this.socket.destroy();
  }
}

async function firstLine(stream) {
  for await (const line of createInterface({ input: stream })) return line;
  throw new Error('no line');
}

async function until(what, f, ms = 30000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const dir = mkdtempSync(join(tmpdir(), 'bridge-bench-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

// A publisher key and the signed hello handler.
execFileSync(BRIDGECTL, ['keygen', '--out', join(dir, 'publisher.key')]);
const publicKey = readFileSync(join(dir, 'publisher.key.pub'), 'utf8').trim();
execFileSync(BRIDGECTL, [
  'sign', join(WASM, 'hello.wasm'), '--key', join(dir, 'publisher.key'), '--name', 'hello',
  '-o', join(dir, 'hello.signed.wasm'),
]);
const hello = readFileSync(join(dir, 'hello.signed.wasm'));
const most = Math.max(...LEVELS);
writeFileSync(
  join(dir, 'agent.toml'),
  `[agent]\nmax_concurrent_tasks = ${most}\nqueue_capacity = ${most * 4}\n`,
);
const agentArgs = (url, pin, token, state) => [
  'run', '--state', state, '--server', url, '--server-pin', pin, '--token', token,
  '--trusted-key', publicKey, '--config', join(dir, 'agent.toml'),
];

// The Rust platform and its agent.
const serve = start(PLATFORM_CPU, BRIDGECTL, [
  'serve', '--listen', '127.0.0.1:0', '--state', join(dir, 'rust-platform'),
]);
const info = JSON.parse(await firstLine(serve.stdout));
start(AGENT_CPU, DAEMON, agentArgs(info.url, info.server_pin, info.token, join(dir, 'rust-agent')));
const control = new Control(info.control);
const rustAgent = await until('the agent on bridgectl serve', async () => {
  const r = await control.request({ cmd: 'agents' });
  return r.agents?.find((a) => a.connected)?.id;
});
const installed = await control.request({
  cmd: 'install_handler', agent: rustAgent, name: 'hello', module: hello.toString('base64'),
});
if (!installed.ok) throw new Error(`install on bridgectl serve: ${installed.error}`);

/** A ResultStore in memory: the same first-wins rule, nothing written (see the header). */
class MemoryStore {
  results = new Map();
  async open() {}
  async close() {}
  async get(taskId) {
    return this.results.get(taskId);
  }
  async put(taskId, agentId, result) {
    const stored = this.results.get(taskId);
    if (!stored) {
      const first = { taskId, agentId, result, receivedAt: new Date().toISOString(), deliveries: 1 };
      this.results.set(taskId, first);
      return { kind: 'stored', stored: first };
    }
    if (stored.agentId !== agentId) return { kind: 'conflict', stored };
    stored.deliveries++;
    return { kind: 'repeat', stored };
  }
}

// The Node platforms (in this process) and their agents.
async function nodeSide(name, store) {
  let lastRoundTripUs = 0;
  const platform = await Platform.start({
    listen: '127.0.0.1:0',
    stateDir: join(dir, `node-platform-${name}`),
    store,
    onRoundTrip: (us) => {
      lastRoundTripUs = us;
    },
  });
  const token = await platform.issueToken();
  start(AGENT_CPU, DAEMON, agentArgs(platform.url, platform.pin, token, join(dir, `node-agent-${name}`)));
  const agent = (await platform.waitForAgent(undefined, { timeoutMs: 30000 })).id;
  await platform.installHandler(agent, 'hello', hello);
  return {
    name: store ? 'Node SDK, memory' : 'Node SDK',
    platform,
    async once() {
      const r = await platform.run(agent, { command: 'hello', input: { name: 'Ada' } });
      if (r.status !== 'ok') throw new Error(`Node platform run: ${JSON.stringify(r)}`);
      return lastRoundTripUs;
    },
    async connections(n) {
      return { runs: Array.from({ length: n }, () => () => this.once()), close: () => {} };
    },
  };
}
const node = await nodeSide('file');
const nodeMemory = await nodeSide('memory', new MemoryStore());

const rust = {
  name: 'bridgectl serve',
  async once(c = control) {
    const r = await c.request({ cmd: 'run', agent: rustAgent, command: 'hello', input: { name: 'Ada' } });
    if (!r.ok || r.result.status !== 'ok') throw new Error(`bridgectl serve run: ${JSON.stringify(r)}`);
    return r.round_trip_us;
  },
  async connections(n) {
    const cs = Array.from({ length: n }, () => new Control(info.control));
    return { runs: cs.map((c) => () => this.once(c)), close: () => cs.forEach((c) => c.close()) };
  },
};
const sides = [rust, node, nodeMemory];
for (const side of sides) for (let i = 0; i < 30; i++) await side.once();

async function throughput(side, level, secs) {
  const { runs, close } = await side.connections(level);
  let done = 0;
  const end = performance.now() + secs * 1000;
  const t0 = performance.now();
  await Promise.all(
    runs.map(async (run) => {
      while (performance.now() < end) {
        await run();
        done++;
      }
    }),
  );
  const elapsed = (performance.now() - t0) / 1000;
  close();
  return done / elapsed;
}

console.log(
  `bridge platform benchmark (${QUICK ? 'quick' : 'full'}): ${ROUNDS} rounds; round trip: ${RT_SAMPLES} warm hello tasks one at a time; throughput: ${TP_SECS} s at ${LEVELS.join(' and ')} in flight`,
);
console.log(
  split
    ? `the agents on CPU ${AGENT_CPU}; the platforms and this process on CPU ${PLATFORM_CPU}`
    : 'one CPU: everything shares it',
);
const seen = new Map(sides.map((s) => [s.name, { rt: [], rtRounds: [], tp: new Map(LEVELS.map((l) => [l, []])) }]));
for (let round = 1; round <= ROUNDS; round++) {
  console.log(`round ${round}:`);
  // Rotate which side goes first, so none always follows another.
  const order = sides.map((_, i) => sides[(i + round) % sides.length]);
  for (const side of order) {
    const s = seen.get(side.name);
    const xs = [];
    for (let i = 0; i < RT_SAMPLES; i++) xs.push(await side.once());
    s.rt.push(...xs);
    s.rtRounds.push(median(xs));
    console.log(`  ${side.name.padEnd(16)} round trip median ${median(xs).toFixed(0)} us`);
  }
  for (const level of LEVELS) {
    for (const side of order) {
      const rate = await throughput(side, level, TP_SECS);
      seen.get(side.name).tp.get(level).push(rate);
      console.log(`  ${side.name.padEnd(16)} ${String(level).padStart(3)} in flight  ${rate.toFixed(0)} tasks/s`);
    }
  }
}
console.log('\nmedians (Node/Rust: the ratio to bridgectl serve):');
const rtRust = median(seen.get(rust.name).rt);
console.log(`  round trip (warm hello)  ${rust.name.padEnd(16)} ${rtRust.toFixed(0).padStart(6)} us`);
for (const side of [node, nodeMemory]) {
  const rt = median(seen.get(side.name).rt);
  console.log(`  round trip (warm hello)  ${side.name.padEnd(16)} ${rt.toFixed(0).padStart(6)} us   Node/Rust ${(rt / rtRust).toFixed(2)}x (target <= 2x: ${rt <= 2 * rtRust ? 'met' : 'NOT met'})`);
}
for (const level of LEVELS) {
  const a = median(seen.get(rust.name).tp.get(level));
  console.log(`  ${String(level).padStart(3)} in flight           ${rust.name.padEnd(16)} ${a.toFixed(0).padStart(6)} tasks/s`);
  for (const side of [node, nodeMemory]) {
    const b = median(seen.get(side.name).tp.get(level));
    console.log(`  ${String(level).padStart(3)} in flight           ${side.name.padEnd(16)} ${b.toFixed(0).padStart(6)} tasks/s   Node/Rust ${(b / a).toFixed(2)}`);
  }
}
control.close();
await node.platform.close();
await nodeMemory.platform.close();
process.exit(0);
