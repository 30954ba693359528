// Enrollment: one-time tokens (only their SHA-256 kept, in tokens.json) and the enrolled agents
// (agents.json); the decision on each WebSocket upgrade, as docs/protocol.md § Enrollment states it.

import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';

import { readIfExists, writeFileAtomic } from './files.js';

/** File of the enrolled agents in the state directory. */
export const AGENTS_FILE = 'agents.json';
/** File of the token hashes in the state directory. */
export const TOKENS_FILE = 'tokens.json';
/** Default lifetime of a token: 24 hours. */
export const DEFAULT_TOKEN_TTL_MS = 24 * 3600 * 1000;

/** Why an upgrade is refused (the `X-Bridge-Refusal` header). */
export type Refusal = 'token_missing' | 'token_invalid' | 'token_used' | 'token_expired';

/** For the refusal's `text/plain` body. */
export const REFUSAL_TEXT: Readonly<Record<Refusal, string>> = {
  token_missing: 'this agent is not enrolled: present an enrollment token (Authorization: Bearer TOKEN)',
  token_invalid: 'this enrollment token is not known to this platform',
  token_used: 'this enrollment token has already enrolled another agent',
  token_expired: 'this enrollment token has expired',
};

/** An enrolled agent as recorded. */
export interface AgentRecord {
  id: string;
  /** RFC 3339, UTC. */
  enrolled_at: string;
}

interface TokenRecord {
  sha256: string;
  issued_at: string;
  expires_at: string | null;
  used_by: string | null;
  used_at: string | null;
}

/** The outcome of an upgrade's admission. */
export type Admission = { kind: 'known' } | { kind: 'enrolled' } | { kind: 'refused'; reason: Refusal };

/**
 * The bearer token of an `Authorization` header: `null` without one, `undefined` when the header
 * is not `Bearer <token>`.
 */
export function bearer(header: string | undefined): string | null | undefined {
  if (header === undefined) return null;
  const text = header.trim();
  const space = text.indexOf(' ');
  if (space < 0) return undefined;
  const scheme = text.slice(0, space);
  const token = text.slice(space + 1).trim();
  if (scheme.toLowerCase() !== 'bearer' || token === '') return undefined;
  return token;
}

function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** The enrolled agents and the issued tokens, persisted in the state directory. */
export class Registry {
  private agents = new Map<string, AgentRecord>();
  private tokens: TokenRecord[] = [];
  /** Serializes changes and their writes. */
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(private readonly dir: string) {}

  /** Reads `agents.json` and `tokens.json` (missing: empty). */
  static async open(dir: string): Promise<Registry> {
    const r = new Registry(dir);
    const agents = await readIfExists(join(dir, AGENTS_FILE), 'utf8');
    if (agents !== undefined) {
      for (const a of JSON.parse(agents) as AgentRecord[]) r.agents.set(a.id, a);
    }
    const tokens = await readIfExists(join(dir, TOKENS_FILE), 'utf8');
    if (tokens !== undefined) r.tokens = JSON.parse(tokens) as TokenRecord[];
    return r;
  }

  private serial<T>(f: () => Promise<T>): Promise<T> {
    const next = this.queue.then(f, f);
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** Whether the agent is enrolled. */
  isEnrolled(agentId: string): boolean {
    return this.agents.has(agentId);
  }

  /** The enrolled agents. */
  list(): AgentRecord[] {
    return [...this.agents.values()];
  }

  /** The record of one agent. */
  get(agentId: string): AgentRecord | undefined {
    return this.agents.get(agentId);
  }

  /** Mints a token valid `ttlMs` (0: no expiry); stores only its hash. */
  issueToken(ttlMs: number): Promise<string> {
    if (!Number.isSafeInteger(ttlMs) || ttlMs < 0) throw new RangeError('ttlMs must be a non-negative integer');
    return this.serial(async () => {
      const token = randomBytes(32).toString('base64url');
      const now = Date.now();
      const before = this.tokens;
      // Expired tokens that enrolled nobody are of no use any more: drop them.
      this.tokens = this.tokens.filter((t) => t.used_by !== null || t.expires_at === null || Date.parse(t.expires_at) > now);
      this.tokens.push({
        sha256: hashToken(token),
        issued_at: new Date(now).toISOString(),
        expires_at: ttlMs === 0 ? null : new Date(now + ttlMs).toISOString(),
        used_by: null,
        used_at: null,
      });
      try {
        await this.saveTokens();
      } catch (e) {
        this.tokens = before;
        throw e;
      }
      return token;
    });
  }

  /**
   * Decides whether `agentId` may connect with `token` (from {@link bearer}); enrolls it,
   * persisting both files, when it is new and the token good. Rejects when it cannot record.
   */
  admit(agentId: string, token: string | null | undefined): Promise<Admission> {
    return this.serial(async (): Promise<Admission> => {
      if (this.agents.has(agentId)) return { kind: 'known' };
      if (token === null) return { kind: 'refused', reason: 'token_missing' };
      if (token === undefined) return { kind: 'refused', reason: 'token_invalid' };
      const hash = hashToken(token);
      const record = this.tokens.find((t) => t.sha256 === hash);
      if (record === undefined) return { kind: 'refused', reason: 'token_invalid' };
      if (record.used_by !== null) return { kind: 'refused', reason: 'token_used' };
      const now = new Date();
      if (record.expires_at !== null && !(Date.parse(record.expires_at) > now.getTime())) {
        return { kind: 'refused', reason: 'token_expired' };
      }
      const stamp = now.toISOString().replace(/\.\d{3}Z$/, 'Z');
      record.used_by = agentId;
      record.used_at = stamp;
      this.agents.set(agentId, { id: agentId, enrolled_at: stamp });
      // Tokens first: if the agents file then fails, the token is spent but the agent can be
      // given a new one; the other order could let one token enroll two agents.
      try {
        await this.saveTokens();
        await this.saveAgents();
      } catch (e) {
        this.agents.delete(agentId);
        throw e;
      }
      return { kind: 'enrolled' };
    });
  }

  /** Waits for pending writes. */
  async settle(): Promise<void> {
    await this.queue;
  }

  private saveTokens(): Promise<void> {
    return writeFileAtomic(join(this.dir, TOKENS_FILE), JSON.stringify(this.tokens, null, 1) + '\n', 0o600);
  }

  private saveAgents(): Promise<void> {
    return writeFileAtomic(join(this.dir, AGENTS_FILE), JSON.stringify([...this.agents.values()], null, 1) + '\n', 0o600);
  }
}
