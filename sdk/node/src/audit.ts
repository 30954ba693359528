// What the platform saw of each agent's audit chain, one file per agent in the state directory
// (`audit/<agent id>.json`, the format `bridgectl serve` writes), and the flag raised when the
// chain on the machine was rewritten (docs/protocol.md, "The audit chain").
//
// Each `status` that carries `audit` is judged against what is stored (`judge`): **backwards**
// when `audit.seq` is lower than the stored latest seq; **fork** when a hash given for a seq the
// history holds differs from the stored one (`audit.hash` at the same seq, or `audit.at.hash`);
// **unverifiable** when `audit.at.hash` is `null` (for a seq above 0). Then the head is stored: the
// latest `{seq, hash}` and a history of the last 64 pairs, which follows the chain the agent
// reports now (pairs past a lower head are dropped, a differing hash replaces the stored one), so
// that once an operator clears a flag the same rewrite is not flagged again.
//
// Guarantees:
// * The first flag sticks: later statuses move the head and history on, never the flag; only
//   `clear` removes it.
// * A state that changes is written before the status is taken as judged: temporary file, fsync,
//   rename, fsync the directory. A flag therefore survives a restart.
// * Only agent ids of the form the platform derives (64 lowercase hex) name a file.
// * Bounded: a file is read only up to MAX_FILE_BYTES; one that is larger, does not parse, has
//   unknown fields, holds more than HISTORY pairs, pairs out of order or hashes that are not 64
//   lowercase hex is an error (reported, never a crash, never overwritten by a new status).
// * Memory: per agent only the latest head, the flag and a read error are kept (the history is
//   read from the file when a status is judged).
// * Reads and writes of one agent's state are serialized.

import { constants } from 'node:fs';
import { chmod, lstat, mkdir, open } from 'node:fs/promises';
import { join } from 'node:path';

import { writeFileAtomic } from './files.js';
import { isSha256Hex, utf8Bytes, type AuditHead } from './wire.js';

/** The directory, inside the state directory, of the audit states. */
export const AUDIT_DIR = 'audit';
/** How many `(seq, hash)` pairs are kept per agent. */
export const HISTORY = 64;
/** The largest state file read (64 pairs and a flag take about 10 KiB). */
export const MAX_FILE_BYTES = 32 * 1024;
/** The most bytes of a flag's detail stored. */
export const MAX_DETAIL_BYTES = 1024;

/** Why an agent's chain is flagged. */
export type AuditFlagKind = 'backwards' | 'fork' | 'unverifiable';
const KINDS: readonly AuditFlagKind[] = ['backwards', 'fork', 'unverifiable'];

/** A flag on an agent's audit chain, until an operator clears it. */
export interface AuditFlag {
  /** Why: `backwards`, `fork` or `unverifiable`. */
  kind: AuditFlagKind;
  /** What was seen, for people. */
  detail: string;
  /** The sequence number concerned. */
  seq: number;
  /** When it was raised (RFC 3339, UTC). */
  flaggedAt: string;
}

/** An agent's audit chain as the platform stored it. */
export interface AuditView {
  /** The latest seq stored. */
  seq: number;
  /** Its hash (64 lowercase hex). */
  hash: string;
  /** The flag, or `null`. */
  flag: AuditFlag | null;
}

/** One `(seq, hash)` of a chain, as reported. */
interface SeqHash {
  seq: number;
  hash: string;
}

/** The flag as stored (the file's field names are `bridgectl serve`'s). */
interface StoredFlag {
  kind: AuditFlagKind;
  detail: string;
  seq: number;
  flagged_at: string;
}

/** What is stored of one agent's chain. */
export interface AuditState {
  latest: SeqHash | null;
  /** The last HISTORY pairs seen, by increasing seq (the latest among them). */
  history: SeqHash[];
  flag: StoredFlag | null;
}

/** What is kept in memory per agent. */
type Cached = { view: AuditView | null } | { error: string };

/** The empty state. */
export function emptyState(): AuditState {
  return { latest: null, history: [], flag: null };
}

function hashOf(state: AuditState, seq: number): string | undefined {
  return state.history.find((p) => p.seq === seq)?.hash;
}

/** Sets `seq`'s hash in the history (replacing a different one), in seq order. */
function put(state: AuditState, seq: number, hash: string): void {
  const i = state.history.findIndex((p) => p.seq >= seq);
  if (i < 0) state.history.push({ seq, hash });
  else if (state.history[i]?.seq === seq) state.history[i] = { seq, hash };
  else state.history.splice(i, 0, { seq, hash });
}

/** Takes in a head (already judged): it becomes the latest, and the history follows its chain. */
export function take(state: AuditState, head: AuditHead): void {
  state.history = state.history.filter((p) => p.seq <= head.seq);
  const at = head.at;
  if (at !== undefined && at !== null && typeof at.hash === 'string' && at.seq <= head.seq) put(state, at.seq, at.hash);
  put(state, head.seq, head.hash);
  const excess = state.history.length - HISTORY;
  if (excess > 0) state.history.splice(0, excess);
  state.latest = { seq: head.seq, hash: head.hash };
}

/** Judges a head against what is stored: the flag it raises (kind, seq, detail), if any. */
export function judge(stored: AuditState, head: AuditHead): { kind: AuditFlagKind; seq: number; detail: string } | undefined {
  const at = head.at;
  if (at !== undefined && at !== null && at.seq > 0) {
    if (at.hash === undefined || at.hash === null) {
      return { kind: 'unverifiable', seq: at.seq, detail: `the agent no longer has record ${at.seq}, whose hash was stored` };
    }
    const before = hashOf(stored, at.seq);
    if (before !== undefined && before !== at.hash) {
      return { kind: 'fork', seq: at.seq, detail: `record ${at.seq} has hash ${at.hash}; ${before} was stored` };
    }
  }
  if (stored.latest !== null && head.seq < stored.latest.seq) {
    return { kind: 'backwards', seq: head.seq, detail: `the head is at seq ${head.seq}; seq ${stored.latest.seq} was stored` };
  }
  const before = hashOf(stored, head.seq);
  if (before !== undefined && before !== head.hash) {
    return { kind: 'fork', seq: head.seq, detail: `the head, record ${head.seq}, has hash ${head.hash}; ${before} was stored` };
  }
  return undefined;
}

/** Whether `id` has the form of the agent ids the platform derives: the only ones that name a file. */
export function isAgentId(id: unknown): id is string {
  return isSha256Hex(id);
}

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function fields(o: Obj, what: string, required: readonly string[], optional: readonly string[] = []): void {
  for (const k of Object.keys(o)) {
    if (!required.includes(k) && !optional.includes(k)) throw new Error(`unknown field \`${k.slice(0, 64)}\` in ${what}`);
  }
  for (const k of required) if (!(k in o)) throw new Error(`${what}: missing field \`${k}\``);
}

function seqField(o: Obj, what: string): number {
  const v = o.seq;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new Error(`${what}: \`seq\` must be an integer from 0 to 2^53 - 1`);
  return v;
}

function pair(v: unknown, what: string): SeqHash {
  if (!isObj(v)) throw new Error(`${what} must be an object`);
  fields(v, what, ['seq', 'hash']);
  const seq = seqField(v, what);
  if (!isSha256Hex(v.hash)) throw new Error(`seq ${seq}: the hash is not 64 lowercase hex`);
  return { seq, hash: v.hash };
}

/** Parses and checks a state file's text (the checks `bridgectl serve` makes). */
export function parseState(text: string): AuditState {
  const v = JSON.parse(text) as unknown;
  if (!isObj(v)) throw new Error('not a JSON object');
  fields(v, 'the state', ['history'], ['latest', 'flag']);
  if (!Array.isArray(v.history)) throw new Error('`history` must be an array');
  if (v.history.length > HISTORY) throw new Error(`holds ${v.history.length} pairs; at most ${HISTORY}`);
  const history = v.history.map((p) => pair(p, '`history[]`'));
  for (let i = 1; i < history.length; i++) {
    if ((history[i - 1] as SeqHash).seq >= (history[i] as SeqHash).seq) throw new Error('the history is not in increasing seq order');
  }
  const latest = v.latest === undefined || v.latest === null ? null : pair(v.latest, '`latest`');
  let flag: StoredFlag | null = null;
  if (v.flag !== undefined && v.flag !== null) {
    const f = v.flag;
    if (!isObj(f)) throw new Error('`flag` must be an object or null');
    fields(f, '`flag`', ['kind', 'detail', 'seq', 'flagged_at']);
    if (typeof f.kind !== 'string' || !(KINDS as readonly string[]).includes(f.kind)) throw new Error(`\`flag.kind\` must be one of ${KINDS.join(', ')}`);
    if (typeof f.detail !== 'string' || typeof f.flagged_at !== 'string') throw new Error('`flag.detail` and `flag.flagged_at` must be strings');
    flag = { kind: f.kind as AuditFlagKind, detail: f.detail, seq: seqField(f, '`flag`'), flagged_at: f.flagged_at };
  }
  return { latest, history, flag };
}

/** The flag as the API shows it. */
function apiFlag(f: StoredFlag): AuditFlag {
  return { kind: f.kind, detail: f.detail, seq: f.seq, flaggedAt: f.flagged_at };
}

function viewOf(state: AuditState): AuditView | null {
  if (state.latest === null) return null;
  return { seq: state.latest.seq, hash: state.latest.hash, flag: state.flag === null ? null : apiFlag(state.flag) };
}

/** `text` cut to at most `max` bytes of UTF-8 (at a character boundary). */
function cut(text: string, max: number): string {
  if (utf8Bytes(text) <= max) return text;
  let out = '';
  let bytes = 0;
  for (const ch of text) {
    const n = utf8Bytes(ch);
    if (bytes + n > max) break;
    out += ch;
    bytes += n;
  }
  return out;
}

function stamp(d = new Date()): string {
  return d.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** Reads at most `max` bytes of `path`: `undefined` when it does not exist; larger is an error. */
async function readAtMost(path: string, max: number): Promise<Buffer | undefined> {
  let fd;
  try {
    fd = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  try {
    const buf = Buffer.alloc(max + 1);
    let got = 0;
    while (got < buf.length) {
      const { bytesRead } = await fd.read(buf, got, buf.length - got, got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got > max) throw new Error(`${path} is larger than ${max} bytes`);
    return buf.subarray(0, got);
  } finally {
    await fd.close();
  }
}

/** The agents' audit states in `STATE/audit/`. */
export class AuditStore {
  private readonly cache = new Map<string, Cached>();
  private readonly queues = new Map<string, Promise<unknown>>();

  private constructor(private readonly dir: string) {}

  /**
   * Opens (creating if needed, mode 0700; a symbolic link is refused) `stateDir/audit` and reads the state of each of
   * `agents`; a state that cannot be read is remembered as an error (the platform starts anyway).
   */
  static async open(stateDir: string, agents: readonly string[]): Promise<AuditStore> {
    const dir = join(stateDir, AUDIT_DIR);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await lstat(dir);
    if (st.isSymbolicLink() || !st.isDirectory()) throw new Error(`${dir} is not a directory (or is a symbolic link)`);
    await chmod(dir, 0o700);
    const store = new AuditStore(dir);
    for (const id of agents) await store.load(id);
    return store;
  }

  private path(agent: string): string {
    return join(this.dir, `${agent}.json`);
  }

  /** Runs `f` after every earlier read-modify-write of `agent`'s state. */
  private serial<T>(agent: string, f: () => Promise<T>): Promise<T> {
    const prev = this.queues.get(agent) ?? Promise.resolve();
    const next = prev.then(f, f);
    const tail = next.catch(() => undefined);
    this.queues.set(agent, tail);
    void tail.then(() => {
      if (this.queues.get(agent) === tail) this.queues.delete(agent);
    });
    return next;
  }

  /** What is stored for `agent` (the empty state when nothing is); an unreadable state rejects. */
  private async read(agent: string): Promise<AuditState> {
    if (!isAgentId(agent)) throw new Error(`not an agent id: ${JSON.stringify(String(agent).slice(0, 80))}`);
    const path = this.path(agent);
    let state: AuditState;
    try {
      const bytes = await readAtMost(path, MAX_FILE_BYTES);
      if (bytes === undefined) {
        this.cache.set(agent, { view: null });
        return emptyState();
      }
      try {
        state = parseState(bytes.toString('utf8'));
      } catch (e) {
        throw new Error(`${path} is not an audit state: ${(e as Error).message}`);
      }
    } catch (e) {
      this.cache.set(agent, { error: (e as Error).message });
      throw e;
    }
    this.cache.set(agent, { view: viewOf(state) });
    return state;
  }

  /** Reads `agent`'s state into memory (again); an unreadable one is remembered as an error. */
  load(agent: string): Promise<void> {
    return this.serial(agent, () => this.read(agent).then(() => undefined, () => undefined));
  }

  /** Whether `agent`'s state was read since the store opened. */
  isLoaded(agent: string): boolean {
    return this.cache.has(agent);
  }

  /** The latest seq stored for `agent`, for `welcome.audit_seq`: none when nothing is, when it is 0, or when the state cannot be read. */
  auditSeq(agent: string): number | undefined {
    const c = this.cache.get(agent);
    if (c === undefined || 'error' in c || c.view === null || c.view.seq === 0) return undefined;
    return c.view.seq;
  }

  /** `agent`'s chain as listed: `{ audit }` (`null` when nothing is stored) or `{ error }` when its state cannot be read. */
  view(agent: string): { audit: AuditView | null; error?: string } {
    const c = this.cache.get(agent);
    if (c === undefined) return { audit: null };
    if ('error' in c) return { audit: null, error: c.error };
    return { audit: c.view };
  }

  /**
   * Judges and stores the head of a status from `agent`; resolves with the flag raised now, if
   * any. An unreadable state rejects and is left as it is.
   */
  observe(agent: string, head: AuditHead): Promise<AuditFlag | undefined> {
    return this.serial(agent, async () => {
      const state = await this.read(agent);
      const before = JSON.stringify(state);
      let raised: AuditFlag | undefined;
      const verdict = judge(state, head);
      if (verdict !== undefined && state.flag === null) {
        state.flag = { kind: verdict.kind, detail: cut(verdict.detail, MAX_DETAIL_BYTES), seq: verdict.seq, flagged_at: stamp() };
        raised = apiFlag(state.flag);
      }
      take(state, head);
      if (JSON.stringify(state) !== before) await this.write(agent, state);
      return raised;
    });
  }

  /** Clears `agent`'s flag; resolves with the flag cleared (`null` if there was none). */
  clear(agent: string): Promise<AuditFlag | null> {
    return this.serial(agent, async () => {
      const state = await this.read(agent);
      const cleared = state.flag;
      if (cleared === null) return null;
      state.flag = null;
      await this.write(agent, state);
      return apiFlag(cleared);
    });
  }

  /** Waits for every pending read and write. */
  async settle(): Promise<void> {
    while (this.queues.size > 0) await Promise.all([...this.queues.values()]);
  }

  /** Replaces the state's file whole (temporary file, fsync, rename, fsync the directory), then the cached view. */
  private async write(agent: string, state: AuditState): Promise<void> {
    await writeFileAtomic(this.path(agent), JSON.stringify(state, null, 2) + '\n', 0o600);
    this.cache.set(agent, { view: viewOf(state) });
  }
}
