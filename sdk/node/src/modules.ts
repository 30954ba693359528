// The module bytes the platform may be asked for (`need_module`): kept by SHA-256 while a run or a
// handler install that names them is in flight, and dropped when the last of those ends.

/** Module bytes by SHA-256 (hex), each counted by the runs and installs that hold it. */
export class Modules {
  private readonly held = new Map<string, { bytes: Uint8Array; refs: number }>();

  /** Holds `bytes` under `sha` for one more run or install. */
  retain(sha: string, bytes: Uint8Array): void {
    const m = this.held.get(sha);
    if (m === undefined) this.held.set(sha, { bytes, refs: 1 });
    else m.refs++;
  }

  /** Lets go of one hold on `sha` (nothing when `undefined`); the bytes go with the last. */
  release(sha: string | undefined): void {
    if (sha === undefined) return;
    const m = this.held.get(sha);
    if (m !== undefined && --m.refs === 0) this.held.delete(sha);
  }

  /** The bytes held under `sha`, or `undefined`. */
  get(sha: string): Uint8Array | undefined {
    return this.held.get(sha)?.bytes;
  }
}
