// The PostgreSQL result store: one table, one row per task id, written by a single
// INSERT ... ON CONFLICT statement so that concurrent deliveries of one task keep one row.

import pg from 'pg';

import type { PutOutcome, ResultStore, StoredResult } from './store.js';

/** Options of {@link PgStore}. */
export interface PgStoreOptions {
  /**
   * The table to keep results in, created by `open()` when missing: a name, or `schema.name`,
   * each part `[A-Za-z_][A-Za-z0-9_]*` (at most 63 characters). Default `bridge_results`.
   */
  table?: string;
}

/** The columns every query reads, in the form {@link rowToStored} parses. */
const COLUMNS =
  "task_id, agent_id, result::text AS result, to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS received_at, deliveries";

interface Row {
  task_id: string;
  agent_id: string;
  result: string;
  received_at: string;
  deliveries: number | string;
}

/**
 * A {@link ResultStore} in PostgreSQL, for platforms that already run it (uses `pg`).
 *
 * The table (`bridge_results` unless told otherwise):
 *
 * ```sql
 * CREATE TABLE bridge_results (
 *   task_id     text PRIMARY KEY,
 *   agent_id    text NOT NULL,
 *   result      json NOT NULL,         -- exactly as the agent sent it (json, not jsonb: kept verbatim)
 *   received_at timestamptz NOT NULL,  -- when the first delivery was stored
 *   deliveries  integer NOT NULL       -- 1 for the first delivery, counted up by repeats
 * )
 * ```
 *
 * `put` is one statement, `INSERT ... ON CONFLICT (task_id) DO UPDATE SET deliveries =
 * deliveries + 1 WHERE agent_id matches`, committed (autocommit) before it resolves: concurrent
 * deliveries of one task id store exactly one row, a repeat from the same agent counts
 * `deliveries`, and a delivery from another agent changes nothing. `open()` refuses a server
 * whose `synchronous_commit` is `off`, where a committed row could be lost after a crash.
 */
export class PgStore implements ResultStore {
  readonly #pool: pg.Pool;
  readonly #ownsPool: boolean;
  readonly #table: string;

  /**
   * @param connection a `postgres://` connection string, a `pg` pool config, or a `pg.Pool` the
   *   platform already has (then `close()` leaves it open).
   * @param options the table name.
   */
  constructor(connection: string | pg.PoolConfig | pg.Pool, options: PgStoreOptions = {}) {
    this.#table = quoteTable(options.table ?? 'bridge_results');
    if (connection instanceof pg.Pool) {
      this.#pool = connection;
      this.#ownsPool = false;
    } else {
      this.#pool = new pg.Pool(typeof connection === 'string' ? { connectionString: connection } : connection);
      this.#ownsPool = true;
      // An idle client's connection error (the server restarting) must not crash the process;
      // the next query gets a fresh connection or fails with the error.
      this.#pool.on('error', () => {});
    }
  }

  /** Creates the table if it is missing and checks that the server commits durably. */
  async open(): Promise<void> {
    const { rows } = await this.#pool.query<{ synchronous_commit: string }>('SHOW synchronous_commit');
    if (rows[0]?.synchronous_commit === 'off') {
      throw new Error(
        'PgStore: synchronous_commit is off for this connection: a result acknowledged to an agent could be lost after a server crash; set it to on (or local, remote_write, remote_apply)',
      );
    }
    try {
      await this.#pool.query(
        `CREATE TABLE IF NOT EXISTS ${this.#table} (
           task_id text PRIMARY KEY,
           agent_id text NOT NULL,
           result json NOT NULL,
           received_at timestamptz NOT NULL,
           deliveries integer NOT NULL)`,
      );
    } catch (e) {
      // Two processes creating the table at once: the loser of the race on the catalog gets
      // unique_violation, duplicate_table or duplicate_object (its row type); the table exists.
      if (!(isPgError(e) && ['23505', '42P07', '42710'].includes(e.code))) {
        throw e;
      }
    }
    // An existing table of another shape fails here, at start, rather than at the first result.
    await this.#pool.query(`SELECT ${COLUMNS} FROM ${this.#table} LIMIT 0`);
  }

  /** Records a delivery; the first result for a task id wins. Resolves once committed. */
  async put(taskId: string, agentId: string, result: Record<string, unknown>): Promise<PutOutcome> {
    checkText(taskId, 'task id');
    checkText(agentId, 'agent id');
    if (typeof result !== 'object' || result === null || Array.isArray(result)) {
      throw new TypeError('PgStore.put: the result must be a JSON object');
    }
    const json = JSON.stringify(result);
    const inserted = await this.#pool.query<Row>(
      `INSERT INTO ${this.#table} AS t (task_id, agent_id, result, received_at, deliveries)
       VALUES ($1, $2, $3::json, $4::timestamptz, 1)
       ON CONFLICT (task_id) DO UPDATE SET deliveries = t.deliveries + 1 WHERE t.agent_id = EXCLUDED.agent_id
       RETURNING ${COLUMNS}`,
      [taskId, agentId, json, new Date().toISOString()],
    );
    const row = inserted.rows[0];
    if (row !== undefined) {
      const stored = rowToStored(row);
      // A new row starts at 1; the update path always makes it at least 2.
      return { kind: stored.deliveries === 1 ? 'stored' : 'repeat', stored };
    }
    // The WHERE refused the update: the stored result came from another agent. Rows are never
    // deleted, so it is still there.
    const existing = await this.get(taskId);
    if (existing === undefined) {
      throw new Error(`PgStore.put: task ${JSON.stringify(taskId)} conflicted but its row is gone (was the table changed by hand?)`);
    }
    return { kind: 'conflict', stored: existing };
  }

  /** The stored result for a task id, or `undefined`. */
  async get(taskId: string): Promise<StoredResult | undefined> {
    checkText(taskId, 'task id');
    const { rows } = await this.#pool.query<Row>(`SELECT ${COLUMNS} FROM ${this.#table} WHERE task_id = $1`, [taskId]);
    const row = rows[0];
    return row === undefined ? undefined : rowToStored(row);
  }

  /** Closes the pool (unless it was given to the constructor). */
  async close(): Promise<void> {
    if (this.#ownsPool) {
      await this.#pool.end();
    }
  }
}

function rowToStored(row: Row): StoredResult {
  return {
    taskId: row.task_id,
    agentId: row.agent_id,
    result: JSON.parse(row.result) as Record<string, unknown>,
    receivedAt: row.received_at,
    deliveries: Number(row.deliveries),
  };
}

/** PostgreSQL text cannot hold NUL; refuse it clearly rather than fail inside the driver. */
function checkText(value: string, what: string): void {
  if (typeof value !== 'string' || value.includes('\0')) {
    throw new TypeError(`PgStore: the ${what} must be a string without NUL characters`);
  }
}

function quoteTable(name: string): string {
  const parts = name.split('.');
  if (parts.length > 2 || !parts.every((p) => /^[A-Za-z_][A-Za-z0-9_]{0,62}$/.test(p))) {
    throw new TypeError(`PgStore: table ${JSON.stringify(name)} is not NAME or SCHEMA.NAME ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters each)`);
  }
  return parts.map((p) => `"${p}"`).join('.');
}

function isPgError(e: unknown): e is { code: string } {
  return typeof e === 'object' && e !== null && typeof (e as { code?: unknown }).code === 'string';
}
