//! The agent's audit log as its files lie on disk, for the tests that read or rewrite it.

use std::path::{Path, PathBuf};

/// The audit files (`*.jsonl`) of the agent whose state directory is `state`, in sequence
/// order: their names carry their first record's seq, zero-padded, so name order is seq order.
pub fn audit_files(state: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(state.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}
