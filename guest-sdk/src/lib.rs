//! Write bridge command handlers in Rust.
//!
//! A complete handler:
//!
//! ```
//! use bridge_guest::{handler, Result};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Input { name: Option<String> }
//! #[derive(Serialize)]
//! struct Reply { greeting: String }
//!
//! #[handler]
//! fn hello(input: Input) -> Result<Reply> {
//!     let name = input.name.unwrap_or_else(|| "world".into());
//!     Ok(Reply { greeting: format!("Hello, {name}!") })
//! }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip1` and hand the `.wasm` to the
//! bridge agent. Given the task input `{"name": "Ada"}` it answers
//! `{"greeting":"Hello, Ada!"}`.
//!
//! # What `#[handler]` does
//!
//! A handler is a WASI preview 1 command module. The bridge agent runs it with the task
//! input (one JSON document) on stdin, and reads one JSON value back from stdout. The
//! [`macro@handler`] attribute keeps your function and generates `fn main()` calling [`run`],
//! which:
//!
//! 1. reads all of stdin and deserializes it into your input type; if that fails it
//!    writes a `bad_input` error and exits with code 2. A task without input (stdin `null`
//!    or empty) is accepted by `Option<T>`, `()` and `serde_json::Value`, and also by a
//!    struct whose fields are all optional or `#[serde(default)]`: when the input type does
//!    not accept `null`, `{}` is tried instead;
//! 2. calls your function;
//! 3. on `Ok(output)`, writes `output` as JSON to stdout and exits 0; on `Err(error)`, writes
//!    `{"error":{"kind":"…","message":"…"}}` and exits with [`Error::exit_code`] (1, or 2 for
//!    `bad_input`);
//! 4. if your function panics, writes an error of kind `panic` and exits with code 101.
//!
//! The full contract, for any language with a WASI target, is in `docs/handler-abi.md` of
//! the bridge repository.
//!
//! # Errors
//!
//! [`Error`] works like `anyhow::Error`: `?` converts any standard error (kind `failed`),
//! [`bail!`] and [`ensure!`] return early, [`Context`] adds context. Give errors a kind the
//! platform can match on with [`Error::with_kind`] or `bail!(kind = "…", …)`; reject input
//! with [`Error::bad_input`].
//!
//! # Helpers
//!
//! - logging to stderr: [`info!`], [`warn!`], [`error!`], [`debug!`] (module [`log`]);
//! - the command line: [`args`], [`command_name`]; the granted environment: [`env()`];
//! - files in granted directories, with clear `not_granted` / `not_found` errors: [`fs`].
//!
//! Only write the result to stdout (the SDK does it): log to stderr.

#![warn(missing_docs)]

mod error;
pub mod fs;
pub mod log;

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use error::{
    Context, Error, Result, BAD_INPUT_EXIT_CODE, FAILED_EXIT_CODE, KIND_BAD_INPUT, KIND_FAILED,
    KIND_IO, KIND_NOT_FOUND, KIND_NOT_GRANTED, KIND_PANIC, MAX_EXIT_CODE, PANIC_EXIT_CODE,
};

/// Makes a function `fn name(input: I) -> bridge_guest::Result<O>` the handler's entry
/// point, by generating `fn main() { bridge_guest::run(name) }`.
///
/// `I` must implement `serde::de::DeserializeOwned` and `O` `serde::Serialize`. The
/// function must be a safe, non-async, non-generic free function with exactly one by-value
/// argument; anything else is a compile error saying what to change.
///
/// ```
/// use bridge_guest::{handler, Result};
///
/// #[handler]
/// fn double(n: i64) -> Result<i64> {
///     Ok(n * 2)
/// }
/// ```
///
/// A handler that takes no input takes `()` (or `serde_json::Value`), which accepts `null`
/// and empty stdin:
///
/// ```
/// use bridge_guest::{handler, Result};
///
/// #[handler]
/// fn now(_: ()) -> Result<u64> {
///     let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
///     Ok(since_epoch.as_secs())
/// }
/// ```
pub use bridge_guest_macros::handler;

/// The `serde` version the SDK uses, re-exported for `serde::Deserialize`-style paths.
///
/// ```
/// use bridge_guest::serde::de::DeserializeOwned;
/// fn takes<T: DeserializeOwned>() {}
/// takes::<String>();
/// ```
pub use serde;

/// The `serde_json` version the SDK uses, re-exported: handlers that accept or return
/// free-form JSON can use `bridge_guest::serde_json::Value`.
///
/// ```
/// use bridge_guest::serde_json::{json, Value};
/// let v: Value = json!({"files": 3});
/// assert_eq!(v["files"], 3);
/// ```
pub use serde_json;

/// Runs a handler under the bridge ABI; `#[handler]` generates the call.
///
/// Reads all of stdin, deserializes it into `I` (empty or all-whitespace stdin counts as
/// `null`; if `I` does not accept `null`, `{}` is tried), calls `handler`, writes the output or the error JSON (see [`invoke`]) to stdout
/// and returns (exit status 0) on success, or exits with the error's code. (Returning from
/// `main` ends a WASI command without `proc_exit`, which hosts implement as a trap: a
/// successful run costs the host less.) A panic in `handler` is reported as an error of kind `panic`
/// with exit code 101 (and the panic message on stderr).
///
/// ```no_run
/// fn main() {
///     bridge_guest::run(|words: Vec<String>| Ok(words.len()))
/// }
/// ```
#[allow(clippy::needless_doctest_main)] // the example shows the `main` #[handler] writes
pub fn run<I, O, F>(handler: F)
where
    I: DeserializeOwned,
    O: Serialize,
    F: FnOnce(I) -> Result<O>,
{
    install_panic_hook();
    let mut input = Vec::new();
    let outcome = match std::io::stdin().lock().read_to_end(&mut input) {
        Ok(_) => invoke(&input, handler),
        Err(err) => Outcome::from_error(&Error::new(format!("could not read stdin: {err}"))),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout
        .write_all(&outcome.stdout)
        .and_then(|()| stdout.flush())
    {
        crate::error!("could not write the result to stdout: {err}");
        std::process::exit(FAILED_EXIT_CODE);
    }
    drop(stdout);
    if outcome.exit_code != 0 {
        std::process::exit(outcome.exit_code)
    }
}

/// What a handler run produces: the bytes for stdout and the exit code.
///
/// ```
/// let outcome = bridge_guest::invoke(b"[1, 2]", |v: Vec<u8>| Ok(v.len()));
/// assert_eq!(outcome.exit_code, 0);
/// assert_eq!(outcome.stdout, b"2\n");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// One JSON document followed by `\n`: the output, or `{"error":{…}}`.
    pub stdout: Vec<u8>,
    /// 0 on success, otherwise [`Error::exit_code`].
    pub exit_code: i32,
}

impl Outcome {
    /// The outcome of a handler that failed with `error`.
    ///
    /// ```
    /// let outcome = bridge_guest::Outcome::from_error(&bridge_guest::Error::bad_input("no"));
    /// assert_eq!(outcome.exit_code, 2);
    /// assert_eq!(outcome.stdout, b"{\"error\":{\"kind\":\"bad_input\",\"message\":\"no\"}}\n");
    /// ```
    pub fn from_error(error: &Error) -> Outcome {
        let mut stdout = error.to_json().to_string().into_bytes();
        stdout.push(b'\n');
        Outcome {
            stdout,
            exit_code: error.exit_code(),
        }
    }

    /// The stdout bytes parsed back as JSON (for tests).
    ///
    /// ```
    /// let outcome = bridge_guest::invoke(b"null", |_: ()| Ok("hi"));
    /// assert_eq!(outcome.json(), serde_json::json!("hi"));
    /// ```
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout).expect("Outcome::stdout is always one JSON value")
    }
}

/// Runs `handler` on the given stdin bytes without touching the real stdin, stdout or
/// process: what [`run`] does, minus the I/O. Use it to test a handler natively, end to end
/// through its JSON.
///
/// - Input that is not JSON, or not the shape `I` expects: kind `bad_input`, exit code 2.
/// - `Ok(output)`: the output as JSON, exit code 0.
/// - `Err(error)`: `{"error":{"kind":…,"message":…}}`, exit code [`Error::exit_code`].
/// - Output that cannot be serialized: kind `failed`, exit code 1.
///
/// ```
/// use bridge_guest::{invoke, Result};
///
/// fn greet(name: String) -> Result<String> {
///     Ok(format!("Hello, {name}!"))
/// }
/// assert_eq!(invoke(br#""Ada""#, greet).stdout, b"\"Hello, Ada!\"\n");
///
/// let bad = invoke(b"42", greet);
/// assert_eq!(bad.exit_code, 2);
/// assert_eq!(bad.json()["error"]["kind"], "bad_input");
/// ```
pub fn invoke<I, O, F>(input: &[u8], handler: F) -> Outcome
where
    I: DeserializeOwned,
    O: Serialize,
    F: FnOnce(I) -> Result<O>,
{
    let result = parse_input::<I>(input)
        .and_then(handler)
        .and_then(|output| {
            serde_json::to_vec(&output).map_err(|err| {
                Error::new(format!(
                    "could not serialize the handler's output as JSON: {err}"
                ))
            })
        });
    match result {
        Ok(mut stdout) => {
            stdout.push(b'\n');
            Outcome {
                stdout,
                exit_code: 0,
            }
        }
        Err(error) => Outcome::from_error(&error),
    }
}

fn parse_input<I: DeserializeOwned>(input: &[u8]) -> Result<I> {
    let trimmed = input.trim_ascii();
    let input: &[u8] = if trimmed.is_empty() { b"null" } else { input };
    let parsed = serde_json::from_slice(input);
    if parsed.is_err() && (trimmed.is_empty() || trimmed == b"null") {
        // No input: a struct whose fields are all optional accepts it as `{}`.
        if let Ok(value) = serde_json::from_slice(b"{}") {
            return Ok(value);
        }
    }
    parsed.map_err(|err| {
        use serde_json::error::Category;
        let what = match err.classify() {
            Category::Data => "the task input does not match what this handler expects",
            Category::Syntax | Category::Eof | Category::Io => "the task input is not valid JSON",
        };
        Error::bad_input(format!("{what}: {err}"))
    })
}

/// Reports a panic as the ABI's error document (kind `panic`, exit code 101) instead of a
/// bare trap, keeping the message and location on stderr.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        crate::error!("handler panicked{location}: {message}");
        let error = Error::with_kind(KIND_PANIC, format!("handler panicked: {message}"))
            .with_exit_code(PANIC_EXIT_CODE);
        let outcome = Outcome::from_error(&error);
        let _ = std::io::stdout().write_all(&outcome.stdout);
        let _ = std::io::stdout().flush();
        std::process::exit(outcome.exit_code);
    }));
}

/// The task's arguments: `argv[1..]`. (Arguments that are not valid UTF-8 are converted
/// lossily.)
///
/// ```
/// let args: Vec<String> = bridge_guest::args();
/// if let Some(first) = args.first() {
///     bridge_guest::info!("first argument: {first}");
/// }
/// ```
pub fn args() -> Vec<String> {
    std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect()
}

/// The command name the handler was invoked as: `argv[0]` (empty if the host passed no
/// arguments at all).
///
/// ```
/// let name = bridge_guest::command_name();
/// bridge_guest::debug!("running as {name}");
/// ```
pub fn command_name() -> String {
    std::env::args_os()
        .next()
        .map(|arg| arg.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An environment variable, if the policy granted it and it is valid UTF-8. Handlers get
/// no environment variables by default.
///
/// ```
/// let region = bridge_guest::env("REGION").unwrap_or_else(|| "default".into());
/// ```
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Compile-fail checks for `#[handler]` misuse (doc tests of a private item).
///
/// ```compile_fail
/// #[bridge_guest::handler]
/// struct NotAFunction;
/// ```
///
/// ```compile_fail
/// #[bridge_guest::handler]
/// fn two(a: u8, b: u8) -> bridge_guest::Result<u8> { Ok(a + b) }
/// ```
///
/// ```compile_fail
/// #[bridge_guest::handler]
/// fn none() -> bridge_guest::Result<u8> { Ok(1) }
/// ```
///
/// ```compile_fail
/// #[bridge_guest::handler]
/// fn not_a_result(a: u8) -> u8 { a }
/// ```
///
/// ```compile_fail
/// #[bridge_guest::handler]
/// fn borrowed(a: &str) -> bridge_guest::Result<usize> { Ok(a.len()) }
/// ```
///
/// ```
/// #[bridge_guest::handler]
/// fn fine(a: String) -> bridge_guest::Result<usize> { Ok(a.len()) }
/// ```
#[allow(dead_code)]
fn handler_misuse_does_not_compile() {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Deserialize)]
    struct Input {
        name: Option<String>,
    }
    #[derive(Serialize)]
    struct Reply {
        greeting: String,
    }

    fn hello(input: Input) -> Result<Reply> {
        let name = input.name.unwrap_or_else(|| "world".into());
        ensure!(name != "nobody", kind = "no_one", "cannot greet {name}");
        Ok(Reply {
            greeting: format!("Hello, {name}!"),
        })
    }

    #[test]
    fn ok_output_is_one_json_line_and_exit_0() {
        let out = invoke(br#"{"name":"Ada"}"#, hello);
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout, b"{\"greeting\":\"Hello, Ada!\"}\n");
    }

    #[test]
    fn empty_and_whitespace_stdin_are_null() {
        for input in [&b""[..], b"  \n", b"null"] {
            let out = invoke(input, |v: Option<Input>| Ok(v.is_none()));
            assert_eq!((out.exit_code, out.json()), (0, json!(true)));
            let out = invoke(input, |(): ()| Ok("unit"));
            assert_eq!(out.json(), json!("unit"));
        }
    }

    #[test]
    fn no_input_is_tried_as_an_empty_object() {
        for input in [&b""[..], b"null", b" null\n"] {
            let out = invoke(input, hello);
            assert_eq!(out.json(), json!({"greeting": "Hello, world!"}));
        }
        #[derive(Deserialize)]
        struct Needs {
            path: String,
        }
        let out = invoke(b"null", |n: Needs| Ok(n.path));
        assert_eq!(out.exit_code, 2);
        let msg = out.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("invalid type: null"), "{msg}");
        // `{}` is only a fallback for a missing input, not for other mismatches.
        assert_eq!(invoke(b"[]", hello).exit_code, 2);
    }

    #[test]
    fn invalid_json_is_bad_input_exit_2() {
        let out = invoke(b"{not json", hello);
        assert_eq!(out.exit_code, 2);
        let v = out.json();
        assert_eq!(v["error"]["kind"], "bad_input");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("the task input is not valid JSON: "),
            "{msg}"
        );
    }

    #[test]
    fn wrong_shape_is_bad_input_exit_2() {
        let out = invoke(br#"{"name": 5}"#, hello);
        assert_eq!(out.exit_code, 2);
        let msg = out.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            msg.starts_with("the task input does not match what this handler expects: "),
            "{msg}"
        );
        assert!(msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn trailing_garbage_is_bad_input() {
        let out = invoke(b"{} {}", hello);
        assert_eq!(out.exit_code, 2);
    }

    #[test]
    fn handler_errors_keep_kind_message_and_code() {
        let out = invoke(br#"{"name":"nobody"}"#, hello);
        assert_eq!(out.exit_code, 1);
        assert_eq!(
            out.json(),
            json!({"error": {"kind": "no_one", "message": "cannot greet nobody"}})
        );

        let out = invoke(b"null", |_: ()| -> Result<()> {
            Err(Error::bad_input("need a path"))
        });
        assert_eq!(out.exit_code, 2);

        let out = invoke(b"null", |_: ()| -> Result<()> {
            Err(Error::with_kind("partial", "half done").with_exit_code(7))
        });
        assert_eq!(out.exit_code, 7);
        assert_eq!(out.json()["error"]["kind"], "partial");
    }

    #[test]
    fn question_mark_errors_are_failed_exit_1() {
        let out = invoke(br#""12x""#, |s: String| Ok(s.parse::<u32>()?));
        assert_eq!(out.exit_code, 1);
        assert_eq!(
            out.json(),
            json!({"error": {"kind": "failed", "message": "invalid digit found in string"}})
        );
    }

    #[test]
    fn unserializable_output_is_failed() {
        use std::collections::HashMap;
        let out = invoke(b"null", |_: ()| {
            let mut map = HashMap::new();
            map.insert(vec![1u8], 1u8); // non-string map keys are not JSON
            Ok(map)
        });
        assert_eq!(out.exit_code, 1);
        let msg = out.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            msg.starts_with("could not serialize the handler's output"),
            "{msg}"
        );
    }

    #[test]
    fn error_outcome_is_exactly_the_abi_document() {
        let out = Outcome::from_error(&Error::with_kind("failed", "x \"y\""));
        assert_eq!(
            std::str::from_utf8(&out.stdout).unwrap(),
            "{\"error\":{\"kind\":\"failed\",\"message\":\"x \\\"y\\\"\"}}\n"
        );
    }
}
