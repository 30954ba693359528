// Where a platform keeps task results: the one piece of state exactly-once depends on.
// The platform writes a result here, durably, before it acknowledges it to the agent.

/** A task result as the platform keeps it. */
export interface StoredResult {
  /** The platform's task id (the key: one stored result per task id). */
  taskId: string;
  /** The 64-hex id of the agent that delivered it. */
  agentId: string;
  /** The result exactly as the agent sent it (the `result` field of its `result` message). */
  result: Record<string, unknown>;
  /** When the first delivery was stored (RFC 3339, UTC). */
  receivedAt: string;
  /** How many times an agent delivered a result for this task id (1 for the first). */
  deliveries: number;
}

/** What `put` did with a delivery. */
export type PutOutcome =
  /** The first result for this task id: stored. */
  | { kind: 'stored'; stored: StoredResult }
  /** A repeat from the same agent: the first result is kept, `deliveries` counted. */
  | { kind: 'repeat'; stored: StoredResult }
  /** A result for a task id whose stored result came from another agent: nothing changed. */
  | { kind: 'conflict'; stored: StoredResult };

/**
 * A durable map from task id to its first result.
 *
 * `put` must not resolve before the delivery is durable (written and synced): the platform
 * sends `ack` when it resolves, and an acknowledged result the store then loses is lost for
 * good. Every method may be called concurrently.
 */
export interface ResultStore {
  /** Opens the store (creates its file or table). Called once by `Platform.start`. */
  open(): Promise<void>;
  /** Records a delivery of `result` for `taskId` from `agentId`; the first one wins. */
  put(taskId: string, agentId: string, result: Record<string, unknown>): Promise<PutOutcome>;
  /** The stored result for a task id, or `undefined`. */
  get(taskId: string): Promise<StoredResult | undefined>;
  /** Releases files and connections. */
  close(): Promise<void>;
}
