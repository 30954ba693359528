//! Scans a log file from a granted (read-only) directory: counts lines by severity and
//! lists the most frequent error messages.
//!
//! Input: `{"path": "/logs/syslog", "top": 5, "since": "2024-05-01T12:00"}` — `top`
//! (default 5, at most 1000) and `since` are optional.
//!
//! Output:
//!
//! ```json
//! {"path": "/logs/syslog", "lines": 1200,
//!  "by_level": {"error": 12, "warn": 30, "info": 1100, "debug": 0, "other": 58},
//!  "top_errors": [{"message": "connection to #.#.#.# refused", "count": 9}]}
//! ```
//!
//! - A line's level is the first of these whole words (case-insensitive) in it: `ERROR` or
//!   `ERR` → error, `WARN` or `WARNING` → warn, `INFO` → info, `DEBUG` → debug; a line with
//!   none of them is "other".
//! - An error's message is the text after its level word (the whole line if nothing
//!   follows), with every run of digits collapsed to `#` and whitespace runs to one space,
//!   so that `timeout after 30s (attempt 2)` and `timeout after 5s (attempt 3)` count as
//!   one message. Ties are broken alphabetically.
//! - `since` (`YYYY-MM-DD`, optionally followed by `T` or a space and `HH:MM[:SS]`) skips
//!   lines stamped earlier. A line is stamped if it starts (after an optional `[`) with an
//!   ISO 8601 date-time; unstamped lines (stack traces…) go with the line before them.
//!   Times are compared as written, without time zones. The output then also has `since`
//!   and `skipped` (lines before it); `lines` counts only the lines scanned.
//!
//! The file is streamed line by line; lines longer than 64 KiB are cut, invalid UTF-8 is
//! replaced, and at most 10,000 distinct error messages are tracked (then
//! `"top_errors_approximate": true`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};

use bridge_guest::{ensure, fs, handler, info, Result};
use serde::{Deserialize, Serialize};

/// Longest line kept; the rest of a longer line is skipped.
const MAX_LINE: usize = 64 * 1024;
/// Longest normalized error message kept (in bytes, cut at a char boundary).
const MAX_MESSAGE: usize = 200;
/// Most distinct error messages counted.
const MAX_DISTINCT_ERRORS: usize = 10_000;
/// Largest `top` accepted.
const MAX_TOP: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    path: String,
    #[serde(default = "default_top")]
    top: usize,
    #[serde(default)]
    since: Option<String>,
}

fn default_top() -> usize {
    5
}

#[derive(Serialize, Default, Debug, PartialEq)]
struct ByLevel {
    error: u64,
    warn: u64,
    info: u64,
    debug: u64,
    other: u64,
}

#[derive(Serialize, Debug, PartialEq)]
struct TopError {
    message: String,
    count: u64,
}

#[derive(Serialize)]
struct Output {
    path: String,
    lines: u64,
    by_level: ByLevel,
    top_errors: Vec<TopError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    top_errors_approximate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

#[handler]
fn logscan(input: Input) -> Result<Output> {
    ensure!(
        input.top <= MAX_TOP,
        kind = "bad_input",
        "`top` must be at most {MAX_TOP}, got {}",
        input.top
    );
    let since = match &input.since {
        Some(since) => Some(normalize_since(since)?),
        None => None,
    };
    let file = fs::open(&input.path)?;
    let mut scan = Scan::new(since);
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    while next_line(&mut reader, &mut line).map_err(|err| fs::error(&input.path, "read", err))? {
        scan.line(&line);
    }
    info!(
        "scanned {} lines of {}: {} errors, {} distinct",
        scan.lines,
        input.path,
        scan.by_level.error,
        scan.errors.len()
    );
    let approximate = scan.errors_dropped;
    Ok(Output {
        path: input.path,
        lines: scan.lines,
        skipped: scan.since.as_ref().map(|_| scan.skipped),
        top_errors: scan.top(input.top),
        by_level: scan.by_level,
        since: input.since,
        top_errors_approximate: approximate,
    })
}

/// Reads the next line into `buf` (without its `\n` or `\r\n`), keeping at most
/// [`MAX_LINE`] bytes of it and skipping the rest. Returns false at end of file.
fn next_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    buf.clear();
    // `read_until` finds the newline with a fast `memchr`; `take` bounds the line.
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > MAX_LINE {
        buf.truncate(MAX_LINE);
        reader.skip_until(b'\n')?;
    }
    Ok(true)
}

struct Scan {
    since: Option<String>,
    /// Whether the last stamped line was at or after `since` (unstamped lines follow it).
    in_range: bool,
    lines: u64,
    skipped: u64,
    by_level: ByLevel,
    errors: HashMap<String, u64>,
    errors_dropped: bool,
}

impl Scan {
    fn new(since: Option<String>) -> Scan {
        Scan {
            since,
            in_range: true,
            lines: 0,
            skipped: 0,
            by_level: ByLevel::default(),
            errors: HashMap::new(),
            errors_dropped: false,
        }
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(since) = &self.since {
            if let Some((stamp, len)) = timestamp(line) {
                // Compare at the precision of `since`: "2024-05-01T12:00:59" is in
                // "since 2024-05-01T12:00"; a shorter stamp sorts before a longer `since`.
                let prefix = &stamp[..len.min(since.len())];
                self.in_range = prefix >= since.as_bytes();
            }
            if !self.in_range {
                self.skipped += 1;
                return;
            }
        }
        self.lines += 1;
        match classify(line) {
            Some((Level::Error, rest)) => {
                self.by_level.error += 1;
                let message = normalize(if rest.trim_ascii().is_empty() {
                    line
                } else {
                    rest
                });
                if let Some(count) = self.errors.get_mut(&message) {
                    *count += 1;
                } else if self.errors.len() < MAX_DISTINCT_ERRORS {
                    self.errors.insert(message, 1);
                } else {
                    self.errors_dropped = true;
                }
            }
            Some((Level::Warn, _)) => self.by_level.warn += 1,
            Some((Level::Info, _)) => self.by_level.info += 1,
            Some((Level::Debug, _)) => self.by_level.debug += 1,
            None => self.by_level.other += 1,
        }
    }

    /// The `n` most frequent error messages, most frequent first, ties alphabetically.
    fn top(&self, n: usize) -> Vec<TopError> {
        let mut all: Vec<_> = self.errors.iter().collect();
        all.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        all.into_iter()
            .take(n)
            .map(|(message, &count)| TopError {
                message: message.clone(),
                count,
            })
            .collect()
    }
}

/// Which bytes belong to words: ASCII letters and digits, `_`, and every non-ASCII byte.
static WORD_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
        i += 1;
    }
    table
};

/// The level of a line (its first level word) and the text after that word. Words are runs
/// of ASCII letters, digits, `_` and non-ASCII bytes; the line is never decoded.
fn classify(line: &[u8]) -> Option<(Level, &[u8])> {
    let mut rest = line;
    loop {
        let start = rest.iter().position(|&b| WORD_BYTE[usize::from(b)])?;
        rest = &rest[start..];
        let len = rest
            .iter()
            .position(|&b| !WORD_BYTE[usize::from(b)])
            .unwrap_or(rest.len());
        let (word, after) = rest.split_at(len);
        if let Some(level) = level_word(word) {
            return Some((level, after));
        }
        rest = after;
    }
}

fn level_word(word: &[u8]) -> Option<Level> {
    let is = |name: &[u8]| word.eq_ignore_ascii_case(name);
    match word.len() {
        3 if is(b"err") => Some(Level::Error),
        5 if is(b"error") => Some(Level::Error),
        4 if is(b"warn") => Some(Level::Warn),
        7 if is(b"warning") => Some(Level::Warn),
        4 if is(b"info") => Some(Level::Info),
        5 if is(b"debug") => Some(Level::Debug),
        _ => None,
    }
}

/// An error message for counting: leading separators dropped, digit runs → `#`,
/// whitespace runs → one space, invalid UTF-8 replaced, at most [`MAX_MESSAGE`] bytes.
fn normalize(text: &[u8]) -> String {
    let skip = text
        .iter()
        .take_while(|&&b| {
            b.is_ascii_whitespace() || matches!(b, b':' | b']' | b')' | b'>' | b'-' | b'|' | b'=')
        })
        .count();
    let text = String::from_utf8_lossy(text[skip..].trim_ascii_end());
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE));
    let mut last = None;
    for c in text.chars() {
        let c = if c.is_ascii_digit() {
            '#'
        } else if c.is_whitespace() {
            ' '
        } else {
            c
        };
        if (c == '#' || c == ' ') && last == Some(c) {
            continue;
        }
        if out.len() + c.len_utf8() > MAX_MESSAGE {
            break;
        }
        out.push(c);
        last = Some(c);
    }
    out
}

/// The ISO 8601 date-time a line starts with (after an optional `[`), as
/// `YYYY-MM-DDTHH:MM:SS` (a space separator becomes `T`), `YYYY-MM-DDTHH:MM` or
/// `YYYY-MM-DD`: the bytes and how many of them are the stamp.
fn timestamp(line: &[u8]) -> Option<([u8; 19], usize)> {
    let line = line.strip_prefix(b"[").unwrap_or(line);
    let mut head = [0u8; 19];
    let n = line.len().min(head.len());
    head[..n].copy_from_slice(&line[..n]);
    if n > 10 && head[10] == b' ' {
        head[10] = b'T';
    }
    // Longest form first: date and time with seconds, without, then the date alone.
    [19, 16, 10]
        .into_iter()
        .find(|&len| len <= n && is_stamp(&head[..len]))
        .map(|len| (head, len))
}

/// Whether `s` is `YYYY-MM-DD`, optionally followed by `THH:MM` and optionally `:SS`.
fn is_stamp(s: &[u8]) -> bool {
    let pattern = b"dddd-dd-ddTdd:dd:dd";
    if !matches!(s.len(), 10 | 16 | 19) {
        return false;
    }
    s.iter().zip(pattern).all(|(&c, &p)| match p {
        b'd' => c.is_ascii_digit(),
        _ => c == p,
    })
}

/// Validates `since` and puts it in the form [`timestamp`] returns.
fn normalize_since(since: &str) -> Result<String> {
    let trimmed = since.trim();
    let normalized: String = trimmed
        .chars()
        .enumerate()
        .map(|(i, c)| if i == 10 && c == ' ' { 'T' } else { c })
        .collect();
    ensure!(
        is_stamp(normalized.as_bytes()),
        kind = "bad_input",
        "`since` must look like 2024-05-01, 2024-05-01T12:00 or 2024-05-01 12:00:30, got {since:?}"
    );
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_whole_words_case_insensitive_first_wins() {
        let level = |l: &str| classify(l.as_bytes()).map(|(level, _)| level);
        assert_eq!(level("2024-05-01 ERROR disk full"), Some(Level::Error));
        assert_eq!(level("[err] x"), Some(Level::Error));
        assert_eq!(level("level=Warning msg=slow"), Some(Level::Warn));
        assert_eq!(level("<warn> x"), Some(Level::Warn));
        assert_eq!(level("INFO retrying after error"), Some(Level::Info));
        assert_eq!(level("debug: x"), Some(Level::Debug));
        assert_eq!(level("3 errors were found"), None);
        assert_eq!(level("information"), None);
        assert_eq!(level("ERROR_CODE=5"), None);
        assert_eq!(level(""), None);
        assert_eq!(level("error"), Some(Level::Error));
    }

    #[test]
    fn error_messages_are_normalized() {
        let msg = |l: &str| {
            let (_, rest) = classify(l.as_bytes()).unwrap();
            normalize(if rest.trim_ascii().is_empty() {
                l.as_bytes()
            } else {
                rest
            })
        };
        assert_eq!(
            msg("2024-05-01T10:00:00Z app[123]: ERROR: timeout after 30s   (attempt 2)"),
            "timeout after #s (attempt #)"
        );
        assert_eq!(
            msg("[ERROR] connection to 10.0.0.1 refused"),
            "connection to #.#.#.# refused"
        );
        assert_eq!(msg("12:00 error"), "#:# error");
        assert_eq!(normalize("é".repeat(300).as_bytes()).len(), MAX_MESSAGE);
        assert_eq!(normalize(b"bad \xff byte"), "bad \u{fffd} byte");
    }

    #[test]
    fn counts_and_top_errors() {
        let mut scan = Scan::new(None);
        for line in [
            "ERROR disk 1 full",
            "ERROR disk 2 full",
            "WARN slow",
            "INFO ok",
            "debug x",
            "plain",
            "ERROR b",
            "ERROR a",
        ] {
            scan.line(line.as_bytes());
        }
        assert_eq!(scan.lines, 8);
        assert_eq!(
            scan.by_level,
            ByLevel {
                error: 4,
                warn: 1,
                info: 1,
                debug: 1,
                other: 1
            }
        );
        assert_eq!(
            scan.top(2),
            vec![
                TopError {
                    message: "disk # full".into(),
                    count: 2
                },
                TopError {
                    message: "a".into(),
                    count: 1
                },
            ]
        );
        assert!(scan.top(0).is_empty());
    }

    #[test]
    fn since_skips_earlier_lines_and_their_continuations() {
        let mut scan = Scan::new(Some(normalize_since("2024-05-01 12:00").unwrap()));
        for line in [
            "2024-05-01T11:59:59Z ERROR old",
            "    at old frame",
            "2024-05-01 12:00:30 ERROR new",
            "    at new frame",
            "[2024-05-02T00:00:00] INFO later",
        ] {
            scan.line(line.as_bytes());
        }
        assert_eq!((scan.lines, scan.skipped), (3, 2));
        let stamp = |l: &str| timestamp(l.as_bytes()).map(|(b, n)| b[..n].to_vec());
        assert_eq!(stamp("2024-05-01 ERROR x").unwrap(), b"2024-05-01");
        assert_eq!(stamp("2024-05-01 12:00 x").unwrap(), b"2024-05-01T12:00");
        assert_eq!(stamp("2024-05-01").unwrap(), b"2024-05-01");
        assert_eq!(stamp("May  1 12:00:00 host x"), None);
        assert_eq!(scan.by_level.error, 1);
        assert!(normalize_since("yesterday").is_err());
        assert_eq!(normalize_since("2024-05-01").unwrap(), "2024-05-01");
    }

    #[test]
    fn lines_are_streamed_with_a_length_cap() {
        let long = "x".repeat(MAX_LINE + 10);
        let text = format!("a\r\n{long}\nlast");
        let mut reader = BufReader::with_capacity(16, text.as_bytes());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while next_line(&mut reader, &mut buf).unwrap() {
            lines.push(buf.len());
        }
        assert_eq!(lines, [1, MAX_LINE, 4]);
    }

    #[test]
    fn scans_a_real_file() {
        let path = std::env::temp_dir().join(format!("logscan-test-{}.log", std::process::id()));
        std::fs::write(&path, "INFO start\nERROR boom 1\nERROR boom 22\n").unwrap();
        let out = logscan(Input {
            path: path.to_string_lossy().into_owned(),
            top: 5,
            since: None,
        })
        .unwrap();
        assert_eq!(out.lines, 3);
        assert_eq!(
            out.top_errors,
            vec![TopError {
                message: "boom #".into(),
                count: 2
            }]
        );
        std::fs::remove_file(&path).unwrap();
        assert!(logscan(Input {
            path: "/x".into(),
            top: 5000,
            since: None
        })
        .is_err());
    }
}
