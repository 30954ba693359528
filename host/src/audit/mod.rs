//! The tamper-evident audit log: one record per task ended or refused, chained by SHA-256,
//! made in the journal's transaction that records the result (`crate::journal`), exported to
//! JSON-lines files in `STATE/audit/` with rotation, checked by `bridge-daemon audit verify`.
//! How it works: `docs/operations.md` (the audit log).
//!
//! `record` (the format and the chain), `files` (the files, read back), `verify` (the checks,
//! `tail`), `export` (the exporter thread), `cli` (the commands).

pub mod cli;
mod export;
mod files;
mod record;
mod verify;

pub use export::{start, AuditConfig, AuditSource};
pub use files::{file_name, list, MAX_FILE_BYTES_LIMIT};
pub use record::{format_time, hash_line, head_after, Facts, HandlerId, Head, Record, GENESIS};
pub use verify::{files_head, hash_of, tail, verify, Broken, Valid};
