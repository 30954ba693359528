// The public API of @bridge/platform: the Platform, the result stores, and the protocol's types.
// A plain list of exports: each module adds its own lines.

export { Platform, PlatformError } from './platform.js';
export type { AgentInfo, Chunk, PlatformErrorCode, PlatformEvents, PlatformHooks, PlatformOptions, RequestOptions, RunOptions } from './platform.js';
export type { Logger, LogLevel } from './session.js';
export type { Refusal } from './enroll.js';
export { AUDIT_DIR, HISTORY as AUDIT_HISTORY } from './audit.js';
export type { AuditFlag, AuditFlagKind, AuditView } from './audit.js';
export type { TlsOptions } from './tls.js';
export { FileStore } from './file-store.js';
export type { PutOutcome, ResultStore, StoredResult } from './store.js';
export { MAX_BINARY_BYTES, MAX_DEPTH, MAX_ID_BYTES, MAX_LAST_ERROR_BYTES, MAX_TEXT_BYTES, PROTOCOL_VERSION } from './wire.js';
export type { AgentStats, AppliedLimits, AuditAt, AuditHead, CancelOutcome, ErrorBody, ErrorCode, HandlerInfo, HostFacts, RunResult, StatusReport, TaskState, UpdateReason, UpdateState, UpdateStatus } from './wire.js';
export { PgStore } from './pg-store.js';
export type { PgStoreOptions } from './pg-store.js';
export { SignError, claimsToJson, codeSha256, fileSha256, keyId, keyPairFromSeed, keygen, publicKeyOf, sign, signWithDetails, stripSignatures } from './sign.js';
export type { Capabilities, ClaimsInput, DirGrant, KeyPair, SignErrorCode, SignOptions, SignResult, U64 } from './sign.js';
