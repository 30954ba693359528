//! The handler error type: a kind, a human message and the exit code they map to.

use std::borrow::Cow;
use std::fmt;

/// `Result<T, bridge_guest::Error>`, the return type of every handler.
///
/// ```
/// use bridge_guest::Result;
///
/// fn parse_port(text: &str) -> Result<u16> {
///     Ok(text.parse()?) // any std error converts with `?`
/// }
/// assert_eq!(parse_port("8080").unwrap(), 8080);
/// assert!(parse_port("eighty").is_err());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kind `?` and [`Error::new`] give: "the handler failed".
///
/// ```
/// assert_eq!(bridge_guest::Error::new("x").kind(), bridge_guest::KIND_FAILED);
/// ```
pub const KIND_FAILED: &str = "failed";
/// The kind for input that does not match what the handler expects (exit code 2).
///
/// ```
/// assert_eq!(bridge_guest::Error::bad_input("x").kind(), bridge_guest::KIND_BAD_INPUT);
/// ```
pub const KIND_BAD_INPUT: &str = "bad_input";
/// The kind for a path that exists in no directory granted to the handler, or that the
/// grant does not permit (e.g. writing to a read-only grant).
///
/// ```
/// use std::io::{Error, ErrorKind};
/// let err = bridge_guest::fs::error("/x", "read", Error::from(ErrorKind::PermissionDenied));
/// assert_eq!(err.kind(), bridge_guest::KIND_NOT_GRANTED);
/// ```
pub const KIND_NOT_GRANTED: &str = "not_granted";
/// The kind for a path inside a granted directory that does not exist.
///
/// ```no_run
/// let err = bridge_guest::fs::read("/data/missing.txt").unwrap_err();
/// assert_eq!(err.kind(), bridge_guest::KIND_NOT_FOUND); // when /data is granted
/// ```
pub const KIND_NOT_FOUND: &str = "not_found";
/// The kind for other I/O failures on a path (not a directory, invalid UTF-8, …).
///
/// ```
/// use std::io::{Error, ErrorKind};
/// let err = bridge_guest::fs::error("/data/a", "read", Error::from(ErrorKind::InvalidData));
/// assert_eq!(err.kind(), bridge_guest::KIND_IO);
/// ```
pub const KIND_IO: &str = "io";
/// The kind reported when the handler panics (exit code [`PANIC_EXIT_CODE`]).
///
/// ```
/// // What the SDK writes when a handler panics with "oops":
/// let err = bridge_guest::Error::with_kind(bridge_guest::KIND_PANIC, "handler panicked: oops")
///     .with_exit_code(bridge_guest::PANIC_EXIT_CODE);
/// assert_eq!(err.exit_code(), 101);
/// ```
pub const KIND_PANIC: &str = "panic";

/// Exit code for a failed handler (any kind but `bad_input`).
///
/// ```
/// assert_eq!(bridge_guest::Error::new("x").exit_code(), bridge_guest::FAILED_EXIT_CODE);
/// ```
pub const FAILED_EXIT_CODE: i32 = 1;
/// Exit code for input the handler cannot accept (kind `bad_input`).
///
/// ```
/// let err = bridge_guest::Error::bad_input("x");
/// assert_eq!(err.exit_code(), bridge_guest::BAD_INPUT_EXIT_CODE);
/// ```
pub const BAD_INPUT_EXIT_CODE: i32 = 2;
/// Exit code the SDK uses when the handler panics, like a native Rust program.
///
/// ```
/// assert_eq!(bridge_guest::PANIC_EXIT_CODE, 101);
/// ```
pub const PANIC_EXIT_CODE: i32 = 101;
/// The largest exit code a WASI preview 1 module may use: `proc_exit` with 126 or more is
/// not a valid exit status and hosts (wasmtime) turn it into a trap.
///
/// ```
/// use bridge_guest::{Error, MAX_EXIT_CODE};
/// assert_eq!(Error::new("x").with_exit_code(MAX_EXIT_CODE).exit_code(), 125);
/// assert_eq!(Error::new("x").with_exit_code(MAX_EXIT_CODE + 1).exit_code(), 1);
/// ```
pub const MAX_EXIT_CODE: i32 = 125;

/// A handler error: a machine-readable `kind`, a human `message`, and the exit code the
/// handler ends with.
///
/// On the wire (stdout) it becomes `{"error":{"kind":"<kind>","message":"<message>"}}`.
///
/// Like `anyhow::Error`, any `std::error::Error + Send + Sync + 'static` converts into it
/// with `?` (kind `failed`, message = the error and its sources joined by `": "`). For that
/// reason `Error` itself does not implement `std::error::Error`.
///
/// The exit code is 2 for kind `bad_input` and 1 for every other kind, unless set with
/// [`Error::with_exit_code`].
///
/// ```
/// use bridge_guest::Error;
///
/// let err = Error::with_kind("quota", "too many files");
/// assert_eq!(err.kind(), "quota");
/// assert_eq!(err.message(), "too many files");
/// assert_eq!(err.exit_code(), 1);
/// assert_eq!(err.to_string(), "too many files");
/// assert_eq!(
///     err.to_json().to_string(),
///     r#"{"error":{"kind":"quota","message":"too many files"}}"#
/// );
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    kind: Cow<'static, str>,
    message: String,
    exit_code: Option<i32>,
}

impl Error {
    /// An error of kind `failed` (exit code 1) with the given message.
    ///
    /// ```
    /// let err = bridge_guest::Error::new(format!("{} files could not be read", 3));
    /// assert_eq!(err.kind(), "failed");
    /// assert_eq!(err.message(), "3 files could not be read");
    /// ```
    pub fn new(message: impl Into<String>) -> Self {
        Self::with_kind(KIND_FAILED, message)
    }

    /// An error of an author-chosen kind. Use short `snake_case` words (`"not_found"`,
    /// `"quota"`): platforms match on them. Kind `bad_input` gets exit code 2, every other
    /// kind exit code 1.
    ///
    /// ```
    /// let err = bridge_guest::Error::with_kind("unsupported_format", "only CSV is supported");
    /// assert_eq!(err.kind(), "unsupported_format");
    /// assert_eq!(err.exit_code(), 1);
    /// ```
    pub fn with_kind(kind: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Error {
            kind: kind.into(),
            message: message.into(),
            exit_code: None,
        }
    }

    /// An error of kind `bad_input`: the task input does not match what the handler
    /// expects. The handler exits with code 2.
    ///
    /// ```
    /// let err = bridge_guest::Error::bad_input("`top` must be at least 1");
    /// assert_eq!(err.kind(), "bad_input");
    /// assert_eq!(err.exit_code(), 2);
    /// ```
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::with_kind(KIND_BAD_INPUT, message)
    }

    /// Sets the exit code the handler ends with. Codes outside `1..=125` are replaced by 1:
    /// 0 would mean success, and WASI hosts treat 126 and above as a trap.
    ///
    /// ```
    /// let err = bridge_guest::Error::new("partial result").with_exit_code(3);
    /// assert_eq!(err.exit_code(), 3);
    /// assert_eq!(bridge_guest::Error::new("x").with_exit_code(0).exit_code(), 1);
    /// ```
    #[must_use]
    pub fn with_exit_code(mut self, code: i32) -> Self {
        self.exit_code = Some(if (1..=MAX_EXIT_CODE).contains(&code) {
            code
        } else {
            FAILED_EXIT_CODE
        });
        self
    }

    /// The machine-readable kind, e.g. `"failed"`, `"bad_input"`, `"not_granted"`.
    ///
    /// ```
    /// assert_eq!(bridge_guest::Error::new("boom").kind(), "failed");
    /// ```
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The human-readable message.
    ///
    /// ```
    /// assert_eq!(bridge_guest::Error::new("boom").message(), "boom");
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The exit code the handler ends with when it returns this error: the one set with
    /// [`Error::with_exit_code`], else 2 for kind `bad_input` and 1 for any other kind.
    ///
    /// ```
    /// use bridge_guest::Error;
    /// assert_eq!(Error::new("x").exit_code(), 1);
    /// assert_eq!(Error::bad_input("x").exit_code(), 2);
    /// assert_eq!(Error::with_kind("bad_input", "x").exit_code(), 2);
    /// ```
    pub fn exit_code(&self) -> i32 {
        match self.exit_code {
            Some(code) => code,
            None if self.kind == KIND_BAD_INPUT => BAD_INPUT_EXIT_CODE,
            None => FAILED_EXIT_CODE,
        }
    }

    /// Prefixes the message with some context, keeping the kind and exit code:
    /// `"<context>: <message>"`. See also [`Context`].
    ///
    /// ```
    /// let err = bridge_guest::Error::new("disk full").context("saving report");
    /// assert_eq!(err.message(), "saving report: disk full");
    /// ```
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The error document written to stdout:
    /// `{"error":{"kind":"<kind>","message":"<message>"}}`.
    ///
    /// ```
    /// let json = bridge_guest::Error::bad_input("no path").to_json();
    /// assert_eq!(json["error"]["kind"], "bad_input");
    /// assert_eq!(json["error"]["message"], "no path");
    /// ```
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "kind": self.kind(), "message": self.message() }
        })
    }
}

impl fmt::Display for Error {
    /// Writes the message; with the alternate flag (`{:#}`), `kind: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{}: {}", self.kind, self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("exit_code", &self.exit_code())
            .finish()
    }
}

impl<E> From<E> for Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    /// Kind `failed`; the message is the error followed by its `source()` chain, joined by
    /// `": "`.
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            // Many errors already include their source's text; don't say it twice.
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Error::new(message)
    }
}

/// Adds context to errors, like `anyhow::Context`: works on any `Result` whose error
/// converts into [`Error`], and on `Option` (where `None` becomes an error of kind `failed`).
///
/// ```
/// use bridge_guest::{Context, Result};
///
/// fn port(text: &str) -> Result<u16> {
///     text.parse::<u16>().context("parsing the port")
/// }
/// assert!(port("x").unwrap_err().message().starts_with("parsing the port: "));
///
/// fn first(args: &[String]) -> Result<&String> {
///     args.first().with_context(|| format!("expected an argument, got {}", args.len()))
/// }
/// assert_eq!(first(&[]).unwrap_err().message(), "expected an argument, got 0");
/// ```
pub trait Context<T> {
    /// Wraps the error (or `None`) with a context message.
    ///
    /// ```
    /// use bridge_guest::Context;
    /// let err = "x".parse::<u8>().context("reading `limit`").unwrap_err();
    /// assert_eq!(err.message(), "reading `limit`: invalid digit found in string");
    /// ```
    fn context<C: fmt::Display>(self, context: C) -> Result<T>;

    /// Like [`Context::context`], computing the message only when there is an error.
    ///
    /// ```
    /// use bridge_guest::Context;
    /// let path = "/data/a.txt";
    /// let err = None::<u8>.with_context(|| format!("{path} is empty")).unwrap_err();
    /// assert_eq!(err.message(), "/data/a.txt is empty");
    /// ```
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: fmt::Display>(self, context: C) -> Result<T> {
        self.map_err(|err| err.into().context(context))
    }

    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|err| err.into().context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: fmt::Display>(self, context: C) -> Result<T> {
        self.ok_or_else(|| Error::new(context.to_string()))
    }

    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::new(f().to_string()))
    }
}

/// Returns early with an [`Error`].
///
/// - `bail!("format {}", args)`: kind `failed`, exit code 1;
/// - `bail!(kind = "quota", "format {}", args)`: an author-chosen kind;
/// - `bail!(err)`: any value that converts into [`Error`] (an `Error`, or a std error).
///
/// ```
/// use bridge_guest::{bail, Result};
///
/// fn check(n: u32) -> Result<u32> {
///     if n == 0 {
///         bail!(kind = "bad_input", "n must be positive");
///     }
///     if n > 100 {
///         bail!("n is too large: {n}");
///     }
///     Ok(n)
/// }
/// assert_eq!(check(0).unwrap_err().exit_code(), 2);
/// assert_eq!(check(101).unwrap_err().message(), "n is too large: 101");
/// ```
#[macro_export]
macro_rules! bail {
    (kind = $kind:expr, $($fmt:tt)+) => {
        return ::core::result::Result::Err($crate::Error::with_kind($kind, ::std::format!($($fmt)+)))
    };
    ($fmt:literal $(, $($arg:tt)*)?) => {
        return ::core::result::Result::Err($crate::Error::new(::std::format!($fmt $(, $($arg)*)?)))
    };
    ($err:expr $(,)?) => {
        return ::core::result::Result::Err(::core::convert::From::from($err))
    };
}

/// Returns early with an [`Error`] unless a condition holds.
///
/// - `ensure!(cond)`: message "condition failed: `cond`", kind `failed`;
/// - `ensure!(cond, "format {}", args)`: kind `failed`;
/// - `ensure!(cond, kind = "bad_input", "format {}", args)`: an author-chosen kind.
///
/// ```
/// use bridge_guest::{ensure, Result};
///
/// fn top(n: usize) -> Result<usize> {
///     ensure!(n >= 1, kind = "bad_input", "`top` must be at least 1, got {n}");
///     ensure!(n <= 1000);
///     Ok(n)
/// }
/// assert_eq!(top(0).unwrap_err().kind(), "bad_input");
/// assert_eq!(top(5000).unwrap_err().message(), "condition failed: `n <= 1000`");
/// ```
#[macro_export]
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        if !$cond {
            return ::core::result::Result::Err($crate::Error::new(::std::concat!(
                "condition failed: `",
                ::std::stringify!($cond),
                "`"
            )));
        }
    };
    ($cond:expr, $($rest:tt)+) => {
        if !$cond {
            $crate::bail!($($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug)]
    struct Outer(io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("loading config")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn std_errors_convert_with_their_source_chain() {
        let err: Error = Outer(io::Error::other("disk on fire")).into();
        assert_eq!(err.kind(), "failed");
        assert_eq!(err.message(), "loading config: disk on fire");
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn question_mark_works_on_std_errors() {
        fn parse(s: &str) -> Result<i32> {
            Ok(s.parse::<i32>()?)
        }
        let err = parse("nope").unwrap_err();
        assert_eq!(err.kind(), "failed");
        assert_eq!(err.message(), "invalid digit found in string");
    }

    #[test]
    fn exit_codes_follow_the_kind_unless_set() {
        assert_eq!(Error::new("x").exit_code(), 1);
        assert_eq!(Error::bad_input("x").exit_code(), 2);
        assert_eq!(Error::with_kind("quota", "x").exit_code(), 1);
        assert_eq!(Error::new("x").with_exit_code(42).exit_code(), 42);
        assert_eq!(Error::new("x").with_exit_code(125).exit_code(), 125);
        assert_eq!(Error::new("x").with_exit_code(126).exit_code(), 1);
        assert_eq!(Error::new("x").with_exit_code(-1).exit_code(), 1);
        assert_eq!(Error::bad_input("x").with_exit_code(0).exit_code(), 1);
    }

    #[test]
    fn json_shape() {
        let err = Error::with_kind("not_found", "no \"such\" file\n");
        let text = err.to_json().to_string();
        assert_eq!(
            text,
            r#"{"error":{"kind":"not_found","message":"no \"such\" file\n"}}"#
        );
    }

    #[test]
    fn display_and_debug() {
        let err = Error::with_kind("quota", "too big");
        assert_eq!(format!("{err}"), "too big");
        assert_eq!(format!("{err:#}"), "quota: too big");
        assert_eq!(
            format!("{err:?}"),
            r#"Error { kind: "quota", message: "too big", exit_code: 1 }"#
        );
    }

    #[test]
    fn context_keeps_kind_and_code() {
        let err = Err::<(), _>(Error::bad_input("missing `path`"))
            .context("input")
            .unwrap_err();
        assert_eq!(err.kind(), "bad_input");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(err.message(), "input: missing `path`");
    }

    #[test]
    fn bail_and_ensure_forms() {
        fn f(n: i32) -> Result<i32> {
            ensure!(n != 1);
            ensure!(n != 2, "two is {}", "wrong");
            ensure!(n != 3, kind = "three", "got {n}");
            if n == 4 {
                bail!(Error::with_kind("four", "four"));
            }
            if n == 5 {
                bail!(io::Error::other("io five"));
            }
            if n == 6 {
                bail!("six");
            }
            Ok(n)
        }
        assert_eq!(f(1).unwrap_err().message(), "condition failed: `n != 1`");
        assert_eq!(f(2).unwrap_err().message(), "two is wrong");
        let e3 = f(3).unwrap_err();
        assert_eq!((e3.kind(), e3.message()), ("three", "got 3"));
        assert_eq!(f(4).unwrap_err().kind(), "four");
        assert_eq!(f(5).unwrap_err().message(), "io five");
        assert_eq!(f(6).unwrap_err().message(), "six");
        assert_eq!(f(7).unwrap(), 7);
    }
}
