// The checks of what callers pass to the Platform's methods (ids, positive integers), and the
// request ids and timestamps it sends.

import { randomBytes } from 'node:crypto';

import { PlatformError } from './api.js';
import { MAX_ID_BYTES, utf8Bytes } from './wire.js';

/** A timestamp as the wire carries it: RFC 3339 UTC, whole seconds. */
export function stamp(d = new Date()): string {
  return d.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** A fresh request id: `prefix-` and 16 random hex digits. */
export function requestId(prefix: string): string {
  return `${prefix}-${randomBytes(8).toString('hex')}`;
}

/** `v` when it is a positive safe integer (or `undefined`); otherwise throws `invalid`. */
export function positive(name: string, v: number | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (!Number.isSafeInteger(v) || v < 1) throw new PlatformError('invalid', `${name} must be a positive integer`);
  return v;
}

/** Throws `invalid` unless `v` is a non-empty string of at most `MAX_ID_BYTES` bytes. */
export function checkId(name: string, v: string): void {
  if (typeof v !== 'string' || v === '' || utf8Bytes(v) > MAX_ID_BYTES) {
    throw new PlatformError('invalid', `${name} must be a non-empty string of at most ${MAX_ID_BYTES} bytes`);
  }
}
