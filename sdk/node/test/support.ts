// Shared test helpers: the real binaries from the environment, agents (`bridge-daemon run`) started
// against a Platform, modules signed with `bridgectl`, bounded waits, and every child killed at exit.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';

/** A required environment variable naming an existing path; fails with a clear message. */
function required(name: string, what: string): string {
  const v = process.env[name];
  if (v === undefined || v === '') {
    throw new Error(`${name} is not set: it must name ${what} (cargo xtask test-node sets it)`);
  }
  if (!existsSync(v)) throw new Error(`${name}=${v} does not exist: it must name ${what}`);
  return v;
}

/** Path of the `bridge-daemon` binary (`BRIDGE_DAEMON`). */
export function daemonBin(): string {
  return required('BRIDGE_DAEMON', 'the bridge-daemon binary');
}

/** Path of the `bridgectl` binary (`BRIDGECTL`). */
export function bridgectlBin(): string {
  return required('BRIDGECTL', 'the bridgectl binary');
}

/** Path of a built handler or fixture, e.g. `hello` (`BRIDGE_WASM_DIR/hello.wasm`). */
export function wasmPath(name: string): string {
  const dir = required('BRIDGE_WASM_DIR', 'the directory of built handlers (target/wasm/wasm32-wasip1/handler)');
  const path = join(dir, `${name}.wasm`);
  if (!existsSync(path)) throw new Error(`${path} does not exist: build the handlers (cargo xtask build-examples)`);
  return path;
}

const children = new Set<ChildProcess>();
const dirs: string[] = [];

process.on('exit', () => {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

// Once a file's tests are done, its process must end by itself: a handle left open (a timer, a
// socket, a child) would keep it alive, and the runner would wait forever.
after(() => {
  setTimeout(() => {
    const left = (process as unknown as { getActiveResourcesInfo?: () => string[] }).getActiveResourcesInfo?.() ?? [];
    process.stderr.write(`the test process did not exit 10 s after its tests: open handles ${JSON.stringify(left)}\n`);
    process.exit(1);
  }, 10_000).unref();
});

/** A fresh temporary directory, removed at exit. */
export function tempDir(prefix = 'bridge-node-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** Rejects with `what` if `p` does not settle within `ms`. */
export async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `cond` every 25 ms until it is true; fails after `ms` with `what` (and `detail()`). */
export async function waitUntil(ms: number, what: string, cond: () => boolean | Promise<boolean>, detail?: () => string): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}${detail !== undefined ? `\n${detail()}` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A child process whose stderr (and stdout) is collected, killed at exit. */
export class Child {
  readonly proc: ChildProcess;
  private output = '';
  private readonly exited: Promise<void>;

  /** Complete lines of its stdout, when started with `lines`. */
  readonly lines: string[] = [];
  private partial = '';

  constructor(
    readonly name: string,
    command: string,
    args: readonly string[],
    options: { env?: NodeJS.ProcessEnv; stdin?: boolean; lines?: boolean } = {},
  ) {
    this.proc = spawn(command, args, {
      stdio: [options.stdin === true ? 'pipe' : 'ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...options.env },
    });
    children.add(this.proc);
    const collect = (b: Buffer) => {
      this.output += b.toString('utf8');
      // Bounded: keep the last 1 MiB.
      if (this.output.length > 2 << 20) this.output = this.output.slice(-(1 << 20));
    };
    this.proc.stderr?.on('data', collect);
    if (options.lines === true) {
      this.proc.stdout?.on('data', (b: Buffer) => {
        const parts = (this.partial + b.toString('utf8')).split('\n');
        this.partial = parts.pop() ?? '';
        this.lines.push(...parts);
      });
    } else {
      this.proc.stdout?.on('data', collect);
    }
    this.exited = new Promise((resolve) => {
      this.proc.on('exit', () => {
        children.delete(this.proc);
        resolve();
      });
    });
  }

  /** What it wrote so far. */
  log(): string {
    return this.output;
  }

  /** Waits until its output matches `re` (at most `ms`). */
  async waitLog(re: RegExp, ms: number): Promise<void> {
    await waitUntil(ms, `${this.name} to log ${re}`, () => re.test(this.output), () => `${this.name} log:\n${this.output}`);
  }

  /** Waits (at most `ms`) for a stdout line (started with `lines`) that `match` accepts, and returns it. */
  async line(ms: number, what: string, match: (line: string) => boolean): Promise<string> {
    let found: string | undefined;
    await waitUntil(ms, `${this.name}: ${what}`, () => (found = this.lines.find(match)) !== undefined || !this.alive(), () => `stderr:\n${this.output}`);
    if (found === undefined) throw new Error(`${this.name} exited before ${what}; stderr:\n${this.output}`);
    return found;
  }

  /** Writes one line to its stdin (started with `stdin`). */
  writeLine(line: string): void {
    this.proc.stdin?.write(line + '\n');
  }

  /** How it exited: the code, or the signal. */
  exit(): { code: number | null; signal: NodeJS.Signals | null } {
    return { code: this.proc.exitCode, signal: this.proc.signalCode };
  }

  /** Whether it is still running. */
  alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Waits for it to exit (at most `ms`). */
  async waitExit(ms: number): Promise<void> {
    await within(ms, `${this.name} to exit`, this.exited);
  }

  /** SIGKILL, and waits for the exit. */
  async kill(): Promise<void> {
    if (this.alive()) this.proc.kill('SIGKILL');
    await this.waitExit(10_000);
  }

  /** SIGTERM, and waits for the exit (at most 20 s). */
  async terminate(): Promise<void> {
    if (this.alive()) this.proc.kill('SIGTERM');
    await this.waitExit(20_000);
  }
}

/** Where an agent connects. */
export interface Target {
  url: string;
  pin: string;
}

/** How to start an agent. */
export interface AgentOptions {
  /** Its state directory (default: a fresh one). */
  state?: string;
  /** An enrollment token. */
  token?: string;
  /** A publisher key to trust (`ed25519:…`). */
  trustedKey?: string;
  /** A configuration file's text (TOML). */
  config?: string;
  /** More `bridge-daemon run` arguments. */
  args?: string[];
}

/** A running `bridge-daemon run`. */
export class Agent extends Child {
  constructor(readonly state: string, args: string[]) {
    super('bridge-daemon run', daemonBin(), ['run', '--state', state, ...args], { env: { RUST_LOG: 'info' } });
  }

  /** The agent id in its state directory (waiting up to 20 s for the agent to create it). */
  async id(): Promise<string> {
    let last = '';
    let id = '';
    await waitUntil(
      20_000,
      `the agent's identity in ${this.state}`,
      () => {
        const out = spawnSync(daemonBin(), ['identity', '--state', this.state], { encoding: 'utf8' });
        last = out.stderr;
        id = out.stdout.trim();
        return out.status === 0 && /^[0-9a-f]{64}$/.test(id);
      },
      () => `${last}\nagent log:\n${this.log()}`,
    );
    return id;
  }
}

/** Starts an agent against `target`, reconnecting within a second when the link drops. */
export function startAgent(target: Target, options: AgentOptions = {}): Agent {
  const state = options.state ?? join(tempDir('bridge-agent-'), 'state');
  const args = ['--server', target.url, '--server-pin', target.pin, '--reconnect-max-secs', '1'];
  if (options.token !== undefined) args.push('--token', options.token);
  if (options.trustedKey !== undefined) args.push('--trusted-key', options.trustedKey);
  if (options.config !== undefined) {
    const path = join(tempDir('bridge-agent-config-'), 'agent.toml');
    writeFileSync(path, options.config);
    args.push('--config', path);
  }
  args.push(...(options.args ?? []));
  return new Agent(state, args);
}

/** A publisher key made by `bridgectl keygen`. */
export interface Publisher {
  /** The private key file. */
  keyFile: string;
  /** `ed25519:…`, as `--trusted-key` takes it. */
  publicKey: string;
}

function bridgectl(args: string[]): Record<string, unknown> {
  const out = spawnSync(bridgectlBin(), args, { encoding: 'utf8' });
  if (out.status !== 0) throw new Error(`bridgectl ${args.join(' ')} failed (${out.status}): ${out.stderr}`);
  return JSON.parse(out.stdout) as Record<string, unknown>;
}

/** A fresh publisher key (`bridgectl keygen`). */
export function publisher(): Publisher {
  const keyFile = join(tempDir('bridge-key-'), 'publisher.key');
  const out = bridgectl(['keygen', '--out', keyFile]);
  return { keyFile, publicKey: String(out.public_key) };
}

/** The built module `module` signed by `pub` with claims naming it `name` (`bridgectl sign`): the signed file's bytes. */
export function signed(pub: Publisher, module: string, name = module, extra: string[] = []): Uint8Array {
  const out = join(tempDir('bridge-signed-'), `${name}.signed.wasm`);
  bridgectl(['sign', '--key', pub.keyFile, '--name', name, '--version', '1.0.0', '--out', out, ...extra, wasmPath(module)]);
  return readFileSync(out);
}
