//! One audit record: what it says about a task, its line (compact JSON, keys in a fixed order)
//! and the chain (each line names the SHA-256 of the line before it).

use bridge_protocol::{RunRequest, RunResult, Status};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev` of the first record: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line accepted when reading the files back. A record is a few hundred bytes;
/// a shell command's argv is at most `MAX_COMMAND_BYTES` (1 MiB), which JSON escaping can
/// make at most six times longer.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// A handler's name and version, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerId {
    pub name: String,
    pub version: String,
}

/// What a task ran, as known where it resolved and ran: threaded to where its result is
/// recorded. Everything in it goes into the task's audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// `wasm` or `shell`; `None` when the command never resolved.
    pub kind: Option<&'static str>,
    pub command: Option<String>,
    pub file_sha256: Option<String>,
    pub handler: Option<HandlerId>,
    /// The signing key's id.
    pub signer: Option<String>,
    /// A shell command's program and its whole argv (fixed and task arguments).
    pub program: Option<String>,
    pub argv: Option<Vec<String>>,
    /// Guest paths of the directories granted.
    pub dirs: Vec<String>,
    /// Names of the environment variables granted (never their values).
    pub env: Vec<String>,
}

impl Facts {
    /// What the request alone tells (for a path that knows nothing more).
    pub fn of_request(req: &RunRequest) -> Facts {
        Facts {
            kind: (req.command.is_none() && req.file_sha256.is_some()).then_some("wasm"),
            command: req.command.clone(),
            file_sha256: req.file_sha256.clone(),
            ..Facts::default()
        }
    }
}

/// A record as written, one line of an audit file. The field order is the line's key order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub prev: String,
    pub time: String,
    pub task_id: String,
    /// `ended` or `refused`.
    pub event: String,
    pub kind: Option<String>,
    pub command: Option<String>,
    pub file_sha256: Option<String>,
    pub code_sha256: Option<String>,
    pub handler: Option<HandlerId>,
    pub signer: Option<String>,
    pub program: Option<String>,
    pub argv: Option<Vec<String>>,
    pub dirs: Vec<String>,
    pub env: Vec<String>,
    pub status: String,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub fuel: Option<u64>,
}

/// Where the chain is: the last record's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Default for Head {
    fn default() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// SHA-256 (hex) of a line (without its `\n`).
pub fn hash_line(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// RFC 3339 UTC with milliseconds.
pub fn format_time(unix_ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

impl Record {
    /// The record of a task's result (`refused` when the task was refused, `ended`
    /// otherwise), the next after `head`.
    pub fn of(head: &Head, unix_ms: u64, task_id: &str, facts: &Facts, r: &RunResult) -> Record {
        let refused = r.status == Status::Rejected;
        Record {
            seq: head.seq + 1,
            prev: head.hash.clone(),
            time: format_time(unix_ms),
            task_id: task_id.to_string(),
            event: if refused { "refused" } else { "ended" }.to_string(),
            kind: facts.kind.map(str::to_string),
            command: facts.command.clone(),
            file_sha256: r.file_sha256.clone().or_else(|| facts.file_sha256.clone()),
            code_sha256: r.code_sha256.clone(),
            handler: facts.handler.clone(),
            signer: facts.signer.clone(),
            program: facts.program.clone(),
            argv: facts.argv.clone(),
            dirs: facts.dirs.clone(),
            env: facts.env.clone(),
            status: r.status.as_str().to_string(),
            reason: r.reason.clone(),
            exit_code: r.exit_code,
            duration_ms: r.duration_ms.max(0.0).round() as u64,
            fuel: r.fuel_consumed,
        }
    }

    /// The record's line, without its `\n`.
    pub fn line(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serializes")
    }

    /// Parses one line (without its `\n`); the line must be exactly what [`Record::line`]
    /// writes for the record it holds (so a reformatted line is reported, not accepted).
    pub fn parse(line: &[u8]) -> Result<Record, String> {
        if line.len() > MAX_LINE_BYTES {
            return Err(format!(
                "the line is {} bytes, more than {MAX_LINE_BYTES}",
                line.len()
            ));
        }
        let r: Record = serde_json::from_slice(line).map_err(|e| format!("not a record: {e}"))?;
        if r.line() != line {
            return Err("the line is not in the record format (key order, spacing)".into());
        }
        if r.prev.len() != 64 || !r.prev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("prev is not a SHA-256 in hex".into());
        }
        Ok(r)
    }
}

/// The head after the record `line` (of sequence number `seq`).
pub fn head_after(seq: u64, line: &[u8]) -> Head {
    Head {
        seq,
        hash: hash_line(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Status) -> RunResult {
        let mut r = RunResult::refused(status, "no");
        r.exit_code = Some(0);
        r.duration_ms = 12.6;
        r.fuel_consumed = Some(42);
        r.reason = None;
        r
    }

    #[test]
    fn a_line_has_its_keys_in_order_and_chains() {
        let facts = Facts {
            kind: Some("shell"),
            command: Some("disk-usage".into()),
            program: Some("/usr/bin/du".into()),
            argv: Some(vec!["/usr/bin/du".into(), "-s".into()]),
            env: vec!["LANG".into()],
            ..Facts::default()
        };
        let first = Record::of(&Head::default(), 0, "t1", &facts, &result(Status::Ok));
        let line = first.line();
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(
            text.starts_with(&format!(
                r#"{{"seq":1,"prev":"{GENESIS}","time":"1970-01-01T00:00:00.000Z","task_id":"t1","event":"ended","kind":"shell","command":"disk-usage","#
            )),
            "{text}"
        );
        assert!(
            text.ends_with(
                r#""status":"ok","reason":null,"exit_code":0,"duration_ms":13,"fuel":42}"#
            ),
            "{text}"
        );
        assert_eq!(Record::parse(&line).unwrap(), first);
        let head = head_after(1, &line);
        let second = Record::of(
            &head,
            1500,
            "t2",
            &Facts::default(),
            &result(Status::Rejected),
        );
        assert_eq!(second.seq, 2);
        assert_eq!(second.prev, hash_line(&line));
        assert_eq!(second.event, "refused");
        assert_eq!(second.time, "1970-01-01T00:00:01.500Z");
        assert_eq!(second.kind, None);
    }

    #[test]
    fn the_parser_refuses_what_the_writer_would_not_write() {
        let r = Record::of(
            &Head::default(),
            0,
            "t",
            &Facts::default(),
            &result(Status::Ok),
        );
        let line = String::from_utf8(r.line()).unwrap();
        // Spacing, another key order, an unknown key, a torn line, a bad prev, too long.
        let spaced = line.replacen(r#""seq":1"#, r#""seq": 1"#, 1);
        let reordered = line
            .replacen(r#"{"seq":1,"#, "{", 1)
            .replacen('}', r#","seq":1}"#, 1);
        let unknown = line.replacen('{', r#"{"x":1,"#, 1);
        let torn = &line[..line.len() - 5];
        let bad_prev = line.replacen(GENESIS, &"g".repeat(64), 1);
        for bad in [spaced.as_str(), &reordered, &unknown, torn, &bad_prev] {
            assert!(Record::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(Record::parse(&vec![b' '; MAX_LINE_BYTES + 1]).is_err());
        assert!(Record::parse(line.as_bytes()).is_ok());
    }
}
