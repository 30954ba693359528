//! Installed handlers: put and removed through the writer (so that they survive restarts), and
//! looked up in the index, which keeps them in memory (asked for every task naming a command).

use tokio::sync::oneshot;

use super::error::{Fail, JournalError};
use super::index::Change;
use super::queue::Op;
use super::records::HandlerRecord;
use super::schema::encode;
use super::tables::Tables;
use super::{lock, Journal};

impl Journal {
    /// Records (or replaces) an installed handler; committed before this returns.
    pub async fn put_handler(&self, h: HandlerRecord) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::PutHandler { handler: h, reply }, rx).await
    }

    /// Removes an installed handler; committed before this returns. `false` if there was none
    /// of that name.
    pub async fn remove_handler(&self, name: &str) -> Result<bool, JournalError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::RemoveHandler {
            name: name.to_string(),
            reply,
        };
        self.call(op, rx).await
    }

    /// Every installed handler, sorted by name.
    pub fn handlers(&self) -> Vec<HandlerRecord> {
        lock(&self.inner.shared.index)
            .handlers
            .values()
            .cloned()
            .collect()
    }

    /// One installed handler.
    pub fn handler(&self, name: &str) -> Option<HandlerRecord> {
        lock(&self.inner.shared.index).handlers.get(name).cloned()
    }
}

/// Writes a handler record, in the writer's transaction.
pub(super) fn put_handler_in(
    t: &mut Tables<'_>,
    handler: HandlerRecord,
    changes: &mut Vec<Change>,
) -> Result<(), Fail> {
    let bytes = encode("handler", &handler.name, &handler).map_err(Fail::Alone)?;
    t.put_handler(handler.name.as_str(), bytes.as_slice())?;
    t.written += bytes.len() as u64;
    changes.push(Change::PutHandler(handler));
    Ok(())
}

/// Removes a handler record, in the writer's transaction; whether there was one.
pub(super) fn remove_handler_in(
    t: &mut Tables<'_>,
    name: String,
    changes: &mut Vec<Change>,
) -> Result<bool, Fail> {
    let removed = t.del_handler(name.as_str())?;
    changes.push(Change::RemoveHandler(name));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::testkit::*;

    #[tokio::test]
    async fn handlers_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (j, _) = open(&cfg);
        let handler = |name: &str| HandlerRecord {
            name: name.to_string(),
            file_sha256: "ab".repeat(32),
            code_sha256: Some("ef".repeat(32)),
            signature: Some("c2ln".into()),
            installed_at: "2024-01-01T00:00:00Z".into(),
            key: Some("sha256:00".into()),
        };
        j.put_handler(handler("zeta")).await.unwrap();
        j.put_handler(handler("alpha")).await.unwrap();
        j.put_handler(handler("mid")).await.unwrap();
        let mut replaced = handler("mid");
        replaced.file_sha256 = "cd".repeat(32);
        j.put_handler(replaced.clone()).await.unwrap();
        let names = |j: &Journal| j.handlers().into_iter().map(|h| h.name).collect::<Vec<_>>();
        assert_eq!(names(&j), ["alpha", "mid", "zeta"]);
        assert_eq!(j.handler("mid"), Some(replaced.clone()));
        assert!(j.remove_handler("zeta").await.unwrap());
        assert!(!j.remove_handler("zeta").await.unwrap());
        assert!(j.handler("zeta").is_none());
        drop(j);
        let (j, _) = open(&cfg);
        assert_eq!(names(&j), ["alpha", "mid"]);
        assert_eq!(j.handler("mid"), Some(replaced));
        assert_eq!(j.handler("alpha"), Some(handler("alpha")));
    }
}
