//! What can go wrong: `JournalError` for callers, and inside the writer whether a failure is one
//! operation's alone or the whole transaction's (and whether the database must be reopened).

/// Why the journal could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// Not enough space: the filesystem is (nearly) full or the journal reached its size limit.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// Any other failure (redb, I/O, an unknown task id…), with its message.
    #[error("journal: {0}")]
    Io(String),
}

pub(super) type Res<T> = Result<T, JournalError>;

/// How an operation inside a transaction failed.
pub(super) enum Fail {
    /// Alone (an unknown task id, a value that does not decode): the other operations of the
    /// batch go on, and this one is answered with the error.
    Alone(JournalError),
    /// Taking the whole transaction with it (a redb error): every operation of the batch is
    /// answered with it.
    Transaction(redb::Error),
}

macro_rules! fails_the_transaction {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Fail {
                Fail::Transaction(e.into())
            }
        }
    )*};
}
fails_the_transaction!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

/// Splits an operation's outcome into its answer and the transaction's failure, if any.
pub(super) fn split<T>(r: Result<T, Fail>) -> (Res<T>, Option<redb::Error>) {
    match r {
        Ok(v) => (Ok(v), None),
        Err(Fail::Alone(e)) => (Err(e), None),
        Err(Fail::Transaction(e)) => (Err(JournalError::Io(e.to_string())), Some(e)),
    }
}

/// Whether an I/O error means "no space" (ENOSPC, EDQUOT, EFBIG).
pub(super) fn io_is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
        )
}

/// A redb error as a [`JournalError`], and whether the database must be reopened (redb fails
/// every later operation after an I/O error).
pub(super) fn classify(e: redb::Error) -> (JournalError, bool) {
    match e {
        redb::Error::Io(io) => {
            let msg = io.to_string();
            if io_is_full(&io) {
                (JournalError::StorageFull(msg), true)
            } else {
                (JournalError::Io(msg), true)
            }
        }
        redb::Error::PreviousIo | redb::Error::DatabaseClosed => {
            (JournalError::Io(e.to_string()), true)
        }
        other => (JournalError::Io(other.to_string()), false),
    }
}

pub(super) fn db_error(e: impl Into<redb::Error>) -> JournalError {
    classify(e.into()).0
}
