//! Log lines on stderr, which the host captures (bounded) next to the result.
//!
//! Every record is written as `LEVEL message` lines, one per line of the message, with the
//! level in lower case: `info scanned 3 files`. Use the macros [`info!`](crate::info),
//! [`warn!`](crate::warn), [`error!`](crate::error) and [`debug!`](crate::debug):
//!
//! ```
//! use bridge_guest::{debug, info, warn};
//!
//! let files = 3;
//! info!("scanned {files} files");          // stderr: "info scanned 3 files"
//! warn!("{} files were skipped", 1);       // stderr: "warn 1 files were skipped"
//! debug!("details that the host may drop"); // stderr: "debug details that …"
//! ```
//!
//! stdout is reserved for the one JSON result: never log there.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// The severity of a log line, from most to least severe.
///
/// ```
/// use bridge_guest::log::Level;
/// assert_eq!(Level::Warn.as_str(), "warn");
/// assert!(Level::Error < Level::Debug);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something looks wrong but the handler goes on.
    Warn = 2,
    /// Progress worth knowing about.
    Info = 3,
    /// Details for debugging.
    Debug = 4,
}

impl Level {
    /// The lower-case word that starts each line: `error`, `warn`, `info`, `debug`.
    ///
    /// ```
    /// assert_eq!(bridge_guest::log::Level::Info.as_str(), "info");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    fn from_u8(value: u8) -> Level {
        match value {
            1 => Level::Error,
            2 => Level::Warn,
            3 => Level::Info,
            _ => Level::Debug,
        }
    }
}

impl fmt::Display for Level {
    /// Writes [`Level::as_str`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Debug as u8);

/// Sets the most verbose level that is written; lines below it are skipped. The default is
/// [`Level::Debug`] (everything).
///
/// ```
/// use bridge_guest::log::{self, Level};
/// log::set_max_level(Level::Info);
/// bridge_guest::debug!("not written");
/// assert_eq!(log::max_level(), Level::Info);
/// # log::set_max_level(Level::Debug);
/// ```
pub fn set_max_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// The most verbose level that is written (see [`set_max_level`]).
///
/// ```
/// use bridge_guest::log::{self, Level};
/// if log::max_level() >= Level::Debug {
///     bridge_guest::debug!("expensive detail: {}", 42);
/// }
/// ```
pub fn max_level() -> Level {
    Level::from_u8(MAX_LEVEL.load(Ordering::Relaxed))
}

/// Writes one record to stderr as `LEVEL message` lines. The macros call this; errors
/// writing to stderr are ignored (logging never fails the handler).
///
/// ```
/// use bridge_guest::log::{write, Level};
/// write(Level::Info, format_args!("scanned {} files", 3)); // "info scanned 3 files"
/// ```
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if level > max_level() {
        return;
    }
    let record = format_record(level, &args.to_string());
    // One write for the whole record keeps its lines together.
    let _ = std::io::stderr().lock().write_all(record.as_bytes());
}

/// Formats a record: every line of `message` prefixed with the level and a space, each
/// ending in `\n`. An empty message gives one line with just the level.
///
/// ```
/// use bridge_guest::log::{format_record, Level};
/// assert_eq!(format_record(Level::Warn, "a\nb"), "warn a\nwarn b\n");
/// ```
pub fn format_record(level: Level, message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 8);
    let mut lines = message.lines().peekable();
    if lines.peek().is_none() {
        out.push_str(level.as_str());
        out.push('\n');
    }
    for line in lines {
        out.push_str(level.as_str());
        out.push(' ');
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Logs an `error` line to stderr, with `format!` syntax.
///
/// ```
/// bridge_guest::error!("could not parse {}: {}", "a.log", "bad header");
/// ```
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log::write($crate::log::Level::Error, ::core::format_args!($($arg)+))
    };
}

/// Logs a `warn` line to stderr, with `format!` syntax.
///
/// ```
/// bridge_guest::warn!("skipping {}: not a regular file", "/data/dev");
/// ```
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log::write($crate::log::Level::Warn, ::core::format_args!($($arg)+))
    };
}

/// Logs an `info` line to stderr, with `format!` syntax.
///
/// ```
/// let n = 3;
/// bridge_guest::info!("scanned {n} files"); // "info scanned 3 files"
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log::write($crate::log::Level::Info, ::core::format_args!($($arg)+))
    };
}

/// Logs a `debug` line to stderr, with `format!` syntax.
///
/// ```
/// bridge_guest::debug!("input: {:?}", vec![1, 2, 3]);
/// ```
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log::write($crate::log::Level::Debug, ::core::format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_level_prefixed_lines() {
        assert_eq!(
            format_record(Level::Info, "scanned 3 files"),
            "info scanned 3 files\n"
        );
        assert_eq!(
            format_record(Level::Error, "a\r\nb\n"),
            "error a\nerror b\n"
        );
        assert_eq!(format_record(Level::Debug, ""), "debug\n");
    }

    #[test]
    fn levels_order_and_names() {
        assert!(Level::Error < Level::Warn && Level::Warn < Level::Info);
        assert!(Level::Info < Level::Debug);
        for level in [Level::Error, Level::Warn, Level::Info, Level::Debug] {
            assert_eq!(Level::from_u8(level as u8), level);
            assert_eq!(level.to_string(), level.as_str());
        }
    }
}
