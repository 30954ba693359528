// The platform's view of agents' audit chains (docs/protocol.md, "The audit chain"), with agents
// played over mutual TLS that forge their chains: a growing chain is never flagged and
// `welcome.audit_seq` names the stored seq; backwards, fork at the same seq and in `audit.at`,
// unverifiable; the flag survives a restart until cleared; invalid statuses are refused and store
// nothing; a corrupt or oversized state file is an error, not a crash, and is left alone.

import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';

import { Platform, type AuditFlag, type StatusReport } from '../dist/index.js';
import { HISTORY, MAX_DETAIL_BYTES, MAX_FILE_BYTES, emptyState, judge, parseState, take } from '../dist/audit.js';
import { decodeAgentMessage } from '../dist/wire.js';
import { Fake, identity, opened, type Identity, type Msg } from './fake-agent.js';
import { tempDir, within } from './support.js';

/** A hash that differs for each `(n, chain)`. */
function h(n: number, chain: number): string {
  return chain.toString(16).padStart(2, '0') + n.toString(16).padStart(62, '0');
}

type At = { seq: number; hash: string | null };

function head(seq: number, chain: number, at?: At): { seq: number; hash: string; at?: At } {
  return { seq, hash: h(seq, chain), ...(at !== undefined ? { at } : {}) };
}

function status(id: string, extra: Record<string, unknown> = {}): Msg {
  return {
    type: 'status',
    agent_id: id,
    agent_version: 'fake',
    host: { hostname: 'h', os: 'linux', arch: 'x86_64', uptime_secs: 1, load: [0, 0, 0] },
    running: [],
    agent_uptime_secs: 1,
    ...extra,
  };
}

/** A platform, the flags it raised, and agents connected to it. */
class Bench {
  readonly flags: Array<[string, AuditFlag]> = [];
  private readonly open: Fake[] = [];

  private constructor(readonly platform: Platform, readonly stateDir: string) {
    platform.on('auditFlagged', (id, flag) => this.flags.push([id, flag]));
  }

  static async start(stateDir = join(tempDir(), 'platform')): Promise<Bench> {
    return new Bench(await Platform.start({ listen: '127.0.0.1:0', stateDir }), stateDir);
  }

  /** Connects `id` (enrolling it when new) and returns the agent and its `welcome`. */
  async connect(id: Identity): Promise<{ agent: Fake; welcome: Msg }> {
    const enrolled = this.platform.agents().some((a) => a.id === id.id);
    const agent = opened(await Fake.open(this.platform.url, id, enrolled ? undefined : await this.platform.issueToken()));
    this.open.push(agent);
    agent.hello(id.id);
    const welcome = await agent.next();
    assert.equal(welcome.type, 'welcome', JSON.stringify(welcome));
    return { agent, welcome };
  }

  /** Sends a status with `audit` and waits until the platform has judged and announced it. */
  async status(agent: Fake, id: string, audit: unknown): Promise<void> {
    const taken = new Promise<void>((resolve) => {
      const listener = (from: string) => {
        if (from !== id) return;
        this.platform.off('status', listener);
        resolve();
      };
      this.platform.on('status', listener);
    });
    agent.send(status(id, { audit }));
    await within(5000, 'the status to be taken', taken);
  }

  audit(id: string) {
    const a = this.platform.agents().find((x) => x.id === id);
    assert.ok(a !== undefined, `agent ${id} is not listed`);
    return a;
  }

  file(id: string): string {
    return join(this.stateDir, 'audit', `${id}.json`);
  }

  async close(): Promise<void> {
    await this.platform.close();
    for (const f of this.open) f.ws.terminate();
  }
}

const benches: Bench[] = [];
async function bench(stateDir?: string): Promise<Bench> {
  const b = await Bench.start(stateDir);
  benches.push(b);
  return b;
}

after(async () => {
  for (const b of benches) await b.close();
});

describe('audit chains', { timeout: 120_000 }, () => {
  it('a growing chain is never flagged, and welcome.audit_seq names the stored seq (none for 0)', async () => {
    const b = await bench();
    const me = await identity();
    let { agent, welcome } = await b.connect(me);
    assert.equal('audit_seq' in welcome, false, 'nothing stored: no audit_seq');
    assert.equal(b.audit(me.id).audit, null);

    await b.status(agent, me.id, head(0, 0));
    assert.deepEqual(b.audit(me.id).audit, { seq: 0, hash: h(0, 0), flag: null });
    agent.ws.terminate();
    ({ agent, welcome } = await b.connect(me));
    assert.equal('audit_seq' in welcome, false, 'seq 0 names no record: no audit_seq');

    for (let seq = 1; seq <= 70; seq++) {
      await b.status(agent, me.id, head(seq, 0, seq > 1 ? { seq: seq - 1, hash: h(seq - 1, 0) } : undefined));
      // The same head again (no task since the last status) is fine too.
      if (seq % 10 === 0) await b.status(agent, me.id, head(seq, 0));
    }
    agent.ws.terminate();
    ({ agent, welcome } = await b.connect(me));
    assert.equal(welcome.audit_seq, 70);
    await b.status(agent, me.id, head(72, 0, { seq: 70, hash: h(70, 0) }));
    assert.deepEqual(b.flags, []);
    assert.deepEqual(b.audit(me.id).audit, { seq: 72, hash: h(72, 0), flag: null });

    // Stored as bridgectl serve stores it: the last 64 pairs, 0600 in a 0700 directory.
    const stored = parseState(readFileSync(b.file(me.id), 'utf8'));
    assert.equal(stored.history.length, HISTORY);
    assert.deepEqual(stored.history.map((p) => p.seq), [...Array.from({ length: 63 }, (_, i) => i + 8), 72]);
    assert.deepEqual(stored.latest, { seq: 72, hash: h(72, 0) });
    assert.equal(statSync(b.file(me.id)).mode & 0o777, 0o600);
    assert.equal(statSync(join(b.stateDir, 'audit')).mode & 0o777, 0o700);
  });

  it('flags backwards, fork at the same seq, fork in audit.at, and unverifiable, once each (the first flag sticks)', async () => {
    const b = await bench();
    const cases: Array<[string, (agent: Fake, id: Identity) => Promise<Fake>, { kind: string; seq: number }]> = [
      ['backwards', async (agent, id) => (await b.status(agent, id.id, head(7, 0)), agent), { kind: 'backwards', seq: 7 }],
      ['fork at the same seq', async (agent, id) => (await b.status(agent, id.id, head(9, 1)), agent), { kind: 'fork', seq: 9 }],
      [
        'fork in audit.at',
        async (agent, id) => {
          agent.ws.terminate();
          const { agent: again, welcome } = await b.connect(id);
          assert.equal(welcome.audit_seq, 9);
          // A seq the platform never stored cannot fork; seq 0 names no record.
          await b.status(again, id.id, head(12, 1, { seq: 7, hash: h(7, 1) }));
          await b.status(again, id.id, head(12, 1, { seq: 0, hash: null }));
          assert.deepEqual(b.flags, [], 'nothing to flag yet');
          await b.status(again, id.id, head(12, 1, { seq: 5, hash: h(5, 1) }));
          return again;
        },
        { kind: 'fork', seq: 5 },
      ],
      [
        'unverifiable',
        async (agent, id) => {
          agent.ws.terminate();
          const { agent: again } = await b.connect(id);
          await b.status(again, id.id, head(12, 0, { seq: 9, hash: null }));
          return again;
        },
        { kind: 'unverifiable', seq: 9 },
      ],
    ];
    for (const [what, rewrite, expected] of cases) {
      b.flags.length = 0;
      const me = await identity();
      const { agent } = await b.connect(me);
      await b.status(agent, me.id, head(5, 0));
      await b.status(agent, me.id, head(9, 0));
      const now = await rewrite(agent, me);
      assert.equal(b.flags.length, 1, `${what}: ${JSON.stringify(b.flags)}`);
      const [flagged, flag] = b.flags[0] as [string, AuditFlag];
      assert.equal(flagged, me.id);
      assert.deepEqual({ kind: flag.kind, seq: flag.seq }, expected, what);
      assert.match(flag.flaggedAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
      assert.deepEqual(b.audit(me.id).audit?.flag, flag, what);
      // Later rewrites move the head on, not the flag, and raise nothing.
      await b.status(now, me.id, head(3, 2));
      assert.equal(b.flags.length, 1, what);
      assert.deepEqual(b.audit(me.id).audit, { seq: 3, hash: h(3, 2), flag });
    }
  });

  it('keeps the flag across a restart until clearAuditFlag; the cleared chain is then judged from its new head', async () => {
    const stateDir = join(tempDir(), 'platform');
    const first = await bench(stateDir);
    const me = await identity();
    const { agent } = await first.connect(me);
    await first.status(agent, me.id, head(9, 0));
    await first.status(agent, me.id, head(9, 1));
    const flag = first.flags[0]?.[1];
    assert.equal(flag?.kind, 'fork');
    await first.close();

    const second = await bench(stateDir);
    assert.deepEqual(second.audit(me.id).audit, { seq: 9, hash: h(9, 1), flag });
    let { agent: again, welcome } = await second.connect(me);
    assert.equal(welcome.audit_seq, 9);
    await assert.rejects(second.platform.clearAuditFlag('f'.repeat(64)), { code: 'unknown_agent' });
    assert.deepEqual(await second.platform.clearAuditFlag(me.id), flag);
    assert.equal(await second.platform.clearAuditFlag(me.id), null, 'nothing left to clear');
    assert.equal(second.audit(me.id).audit?.flag, null);
    // The rewritten chain, growing, is not flagged again.
    await second.status(again, me.id, head(11, 1, { seq: 9, hash: h(9, 1) }));
    assert.deepEqual(second.flags, []);
    await second.close();

    const third = await bench(stateDir);
    assert.deepEqual(third.audit(me.id).audit, { seq: 11, hash: h(11, 1), flag: null });
    ({ agent: again, welcome } = await third.connect(me));
    assert.equal(welcome.audit_seq, 11);
  });

  it('refuses invalid statuses as malformed and stores nothing of them', async () => {
    const b = await bench();
    const me = await identity();
    const { agent } = await b.connect(me);
    await b.status(agent, me.id, head(4, 0));
    const good = h(4, 0);
    const stats = {
      link: { connected: true, since_unix_ms: 1, heartbeat_rtt_ms: 0.5, reconnects: 0, last_error: 'é'.repeat(512) },
      tasks: { running: 0, queued: 0, unacked: 0, finished: { ok: 1, rejected: 2 } },
      journal: { bytes: 1, records: 1 },
      store: { modules: 0, module_bytes: 0, compiled: 0, compiled_bytes: 0 },
      rss_bytes: 1,
    };
    const statuses: StatusReport[] = [];
    const listener = (_id: string, s: StatusReport) => statuses.push(s);
    b.platform.on('status', listener);
    try {
      const bad: Array<[string, Record<string, unknown>]> = [
        ['an upper-case hash', { audit: { seq: 5, hash: 'AB'.repeat(32) } }],
        ['a hash of 63 hex', { audit: { seq: 5, hash: good.slice(1) } }],
        ['a hash of 65 hex', { audit: { seq: 5, hash: good + '0' } }],
        ['a hash that is not a string', { audit: { seq: 5, hash: 4 } }],
        ['a hash that is not hex', { audit: { seq: 5, hash: 'zz'.repeat(32) } }],
        ['a bad audit.at.hash', { audit: { seq: 5, hash: good, at: { seq: 4, hash: 'AB'.repeat(32) } } }],
        ['a negative seq', { audit: { seq: -1, hash: good } }],
        ['a seq past 2^53 - 1', { audit: { seq: 2 ** 53, hash: good } }],
        ['a fractional seq', { audit: { seq: 4.5, hash: good } }],
        ['an unknown field in audit', { audit: { seq: 5, hash: good, extra: 1 } }],
        ['an unknown field in audit.at', { audit: { seq: 5, hash: good, at: { seq: 4, hash: good, extra: 1 } } }],
        ['audit not an object', { audit: 'head' }],
        ['a last_error of 1025 bytes', { stats: { ...stats, link: { ...stats.link, last_error: 'x'.repeat(1025) } } }],
        ['an unknown field in stats', { stats: { ...stats, extra: 1 } }],
        ['an unknown run status in finished', { stats: { ...stats, tasks: { ...stats.tasks, finished: { done: 1 } } } }],
        ['a missing stats field', { stats: { ...stats, journal: { bytes: 1 } } }],
      ];
      for (const [what, extra] of bad) {
        agent.send(status(me.id, { ...extra }));
        const reply = await agent.next();
        assert.deepEqual([reply.type, reply.code], ['error', 'malformed'], what);
        assert.match(String(reply.message), /status/, what);
      }
      // The next status is taken; none of the bad ones was.
      await b.status(agent, me.id, head(4, 0));
      assert.equal(statuses.length, 1);
      assert.deepEqual(b.audit(me.id).audit, { seq: 4, hash: good, flag: null });
      assert.deepEqual(b.flags, []);

      // At the bounds: accepted (a 1024-byte last_error, seq 2^53 - 1), with stats kept as sent.
      const at = { stats, audit: { seq: Number.MAX_SAFE_INTEGER, hash: good, at: { seq: 4, hash: good } } };
      const taken = new Promise<void>((r) => b.platform.once('status', () => r()));
      agent.send(status(me.id, at));
      await within(5000, 'the status at the bounds', taken);
      assert.deepEqual(b.audit(me.id).status?.stats, stats);
      assert.equal(b.audit(me.id).audit?.seq, Number.MAX_SAFE_INTEGER);
    } finally {
      b.platform.off('status', listener);
    }
  });

  it('decodes the status examples of docs/protocol.md, with their stats and audit head', () => {
    const doc = readFileSync(new URL('../../../docs/protocol.md', import.meta.url), 'utf8');
    const examples = [...doc.matchAll(/```json agent:status\n([\s\S]*?)```/g)].map((m) => m[1] as string);
    assert.ok(examples.length >= 2, `${examples.length} status examples`);
    for (const text of examples) {
      const decoded = decodeAgentMessage(text.trim());
      assert.ok(decoded.ok, JSON.stringify(decoded));
      const { type: _type, ...sent } = JSON.parse(text) as Record<string, unknown>;
      assert.deepEqual(decoded.message, { type: 'status', status: sent });
    }
  });

  it('reports a corrupt or oversized state file as an error, never overwrites it, and starts anyway', async () => {
    const stateDir = join(tempDir(), 'platform');
    const first = await bench(stateDir);
    const me = await identity();
    const { agent } = await first.connect(me);
    await first.status(agent, me.id, head(3, 0));
    await first.close();
    const path = first.file(me.id);
    const full = (() => {
      const state = emptyState();
      for (let seq = 1; seq <= HISTORY; seq++) take(state, head(seq, 0));
      return { ...state, flag: { kind: 'fork', detail: 'é'.repeat(MAX_DETAIL_BYTES / 2), seq: Number.MAX_SAFE_INTEGER, flagged_at: '2026-12-04T01:00:00Z' } };
    })();
    const fullText = JSON.stringify(full, null, 2) + '\n';
    assert.ok(Buffer.byteLength(fullText) < MAX_FILE_BYTES, 'a full state fits the read bound');
    const cases: Array<[string, string]> = [
      ['not JSON', 'not json'],
      ['an unknown field', '{"latest":null,"history":[],"flag":null,"extra":1}'],
      ['65 pairs', JSON.stringify({ latest: null, history: Array.from({ length: HISTORY + 1 }, (_, i) => ({ seq: i + 1, hash: h(i + 1, 0) })), flag: null })],
      ['pairs out of order', JSON.stringify({ latest: null, history: [{ seq: 2, hash: h(2, 0) }, { seq: 1, hash: h(1, 0) }], flag: null })],
      ['a bad hash', JSON.stringify({ latest: null, history: [{ seq: 1, hash: '0A'.repeat(32) }], flag: null })],
      ['an unknown flag kind', JSON.stringify({ ...full, flag: { ...full.flag, kind: 'odd' } })],
      ['past the read bound', ' '.repeat(MAX_FILE_BYTES + 1)],
      ['blank, at the read bound', ' '.repeat(MAX_FILE_BYTES)],
    ];
    for (const [what, text] of cases) {
      writeFileSync(path, text);
      const b = await bench(stateDir);
      const listed = b.audit(me.id);
      assert.equal(listed.audit, null, what);
      assert.ok(listed.auditError !== undefined && listed.auditError.length > 0, what);
      if (what === 'blank, at the read bound') assert.match(listed.auditError, /not an audit state/);
      if (what === 'past the read bound') assert.match(listed.auditError, /larger than 32768 bytes/);
      const { agent: again, welcome } = await b.connect(me);
      assert.equal('audit_seq' in welcome, false, what);
      await b.status(again, me.id, head(4, 0));
      await assert.rejects(b.platform.clearAuditFlag(me.id), what);
      assert.equal(readFileSync(path, 'utf8'), text, `${what}: left as it was`);
      assert.deepEqual(b.flags, [], what);
      await b.close();
    }
    // The full state is read back whole.
    writeFileSync(path, fullText);
    const b = await bench(stateDir);
    assert.deepEqual(b.audit(me.id).audit, { seq: HISTORY, hash: h(HISTORY, 0), flag: { kind: 'fork', detail: full.flag.detail, seq: Number.MAX_SAFE_INTEGER, flaggedAt: full.flag.flagged_at } });
    assert.deepEqual(parseState(fullText), full);
  });

  it('refuses to start when STATE/audit is a symbolic link', async () => {
    const stateDir = join(tempDir(), 'platform');
    mkdirSync(stateDir, { mode: 0o700 });
    symlinkSync(tempDir(), join(stateDir, 'audit'));
    await assert.rejects(Platform.start({ listen: '127.0.0.1:0', stateDir }), /symbolic link/);
  });

  it('judges as bridgectl serve does: the history follows the chain reported now', () => {
    const state = emptyState();
    for (const seq of [3, 5, 9]) take(state, head(seq, 0));
    // Rewritten from seq 4 on and shorter: the pairs past the head go, the head's replaces.
    take(state, head(4, 1));
    assert.deepEqual(state.history, [
      { seq: 3, hash: h(3, 0) },
      { seq: 4, hash: h(4, 1) },
    ]);
    assert.equal(judge(state, head(9, 1, { seq: 4, hash: h(4, 1) })), undefined);
    assert.equal(judge(state, head(9, 1, { seq: 3, hash: h(3, 1) }))?.kind, 'fork');
  });
});
