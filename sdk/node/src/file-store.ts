// FileStore: the embedded ResultStore, an append-only JSON-lines file (`results.jsonl`) fsynced
// before `put` resolves and read back on open; the first result per task id wins.

import { open, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';

import { syncDir } from './files.js';
import type { PutOutcome, ResultStore, StoredResult } from './store.js';

/** File name of the results log in the state directory. */
export const RESULTS_FILE = 'results.jsonl';

/** One line of the log: a first delivery, or a repeat of a stored one. */
type Line =
  | { stored: { task_id: string; agent: string; result: Record<string, unknown>; received_at: string; deliveries: number } }
  | { delivered: string };

interface Pending {
  line: string;
  resolve: () => void;
  reject: (e: Error) => void;
}

/**
 * A {@link ResultStore} in one append-only file, one JSON object per line: `{"stored": {task_id,
 * agent, result, received_at, deliveries}}` for a first delivery, `{"delivered": task_id}` for
 * each repeat (the format `bridgectl serve` writes). Every result is kept in memory too.
 *
 * Writes are group-committed: the lines of the `put`s that arrive while one `fsync` runs are
 * written and synced together, and each `put` resolves once its line is on disk. After a write
 * fails, the store refuses every further `put` (its file may hold a partial line): reopen it.
 */
export class FileStore implements ResultStore {
  /** The log's path. */
  readonly path: string;
  private readonly results = new Map<string, StoredResult>();
  private file: FileHandle | undefined;
  private pending: Pending[] = [];
  private flushing: Promise<void> | undefined;
  private failed: Error | undefined;

  /** A store in `path`, or in `<dir>/results.jsonl` when given a directory via {@link FileStore.inDir}. */
  constructor(path: string) {
    this.path = path;
  }

  /** The store at `<stateDir>/results.jsonl`. */
  static inDir(stateDir: string): FileStore {
    return new FileStore(join(stateDir, RESULTS_FILE));
  }

  /** Opens (creates, 0600) the log and reads it back. A torn last line (a crash while writing) is dropped. */
  async open(): Promise<void> {
    if (this.file !== undefined) throw new Error('FileStore is already open');
    const file = await open(this.path, 'a+', 0o600);
    try {
      const text = await file.readFile('utf8');
      const end = text.lastIndexOf('\n') + 1;
      if (end < text.length) await file.truncate(end);
      let lineNo = 0;
      for (const raw of text.slice(0, end).split('\n')) {
        lineNo++;
        if (raw === '') continue;
        let line: Line;
        try {
          line = JSON.parse(raw) as Line;
        } catch {
          throw new Error(`${this.path}:${lineNo}: not JSON`);
        }
        this.replay(line, `${this.path}:${lineNo}`);
      }
      await file.sync();
      await syncDir(dirname(this.path));
    } catch (e) {
      await file.close();
      throw e;
    }
    this.file = file;
  }

  private replay(line: Line, where: string): void {
    if ('stored' in line && typeof line.stored === 'object' && line.stored !== null) {
      const s = line.stored;
      if (typeof s.task_id !== 'string' || typeof s.agent !== 'string' || typeof s.received_at !== 'string') {
        throw new Error(`${where}: a stored result without task_id, agent or received_at`);
      }
      if (!this.results.has(s.task_id)) {
        this.results.set(s.task_id, {
          taskId: s.task_id,
          agentId: s.agent,
          result: s.result,
          receivedAt: s.received_at,
          deliveries: typeof s.deliveries === 'number' ? s.deliveries : 1,
        });
      }
    } else if ('delivered' in line && typeof line.delivered === 'string') {
      const s = this.results.get(line.delivered);
      if (s !== undefined) s.deliveries++;
    } else {
      throw new Error(`${where}: neither {"stored": …} nor {"delivered": …}`);
    }
  }

  /** Records a delivery; resolves once it is on disk. */
  async put(taskId: string, agentId: string, result: Record<string, unknown>): Promise<PutOutcome> {
    if (this.file === undefined) throw new Error('FileStore is not open');
    if (this.failed !== undefined) throw new Error(`FileStore failed earlier: ${this.failed.message}`);
    const existing = this.results.get(taskId);
    let outcome: PutOutcome;
    let line: string;
    if (existing === undefined) {
      const stored: StoredResult = {
        taskId,
        agentId,
        result,
        receivedAt: new Date().toISOString().replace(/\.\d{3}Z$/, 'Z'),
        deliveries: 1,
      };
      this.results.set(taskId, stored);
      line = JSON.stringify({
        stored: { task_id: taskId, agent: agentId, result, received_at: stored.receivedAt, deliveries: 1 },
      });
      outcome = { kind: 'stored', stored };
    } else if (existing.agentId !== agentId) {
      return { kind: 'conflict', stored: { ...existing } };
    } else {
      existing.deliveries++;
      line = JSON.stringify({ delivered: taskId });
      outcome = { kind: 'repeat', stored: existing };
    }
    await new Promise<void>((resolve, reject) => {
      this.pending.push({ line: line + '\n', resolve, reject });
      this.flushing ??= this.flush();
    });
    return { kind: outcome.kind, stored: { ...outcome.stored } } as PutOutcome;
  }

  private async flush(): Promise<void> {
    // The puts that arrive while a batch is written and synced form the next batch.
    await Promise.resolve();
    while (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      try {
        if (this.failed !== undefined) throw this.failed;
        const file = this.file;
        if (file === undefined) throw new Error('FileStore was closed');
        await file.writeFile(batch.map((p) => p.line).join(''), 'utf8');
        await file.datasync();
        for (const p of batch) p.resolve();
      } catch (e) {
        this.failed ??= e as Error;
        for (const p of batch) p.reject(e as Error);
      }
    }
    this.flushing = undefined;
  }

  /** The stored result for a task id. */
  async get(taskId: string): Promise<StoredResult | undefined> {
    const s = this.results.get(taskId);
    return s === undefined ? undefined : { ...s };
  }

  /** Waits for pending writes, then closes the file. */
  async close(): Promise<void> {
    while (this.flushing !== undefined) await this.flushing;
    const file = this.file;
    this.file = undefined;
    await file?.close();
  }
}
