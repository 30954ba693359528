//! Decoding with limits: every text frame from the other end is hostile until checked.
//!
//! [`decode`] checks the size, the nesting depth and the `type` tag before handing the text to
//! serde, so each failure has its own [`ErrorCode`] and a message the other end can act on. The
//! connection survives every one of them; the caller answers with an `error` message.

use serde::de::DeserializeOwned;

use crate::messages::{ErrorBody, ErrorCode};
use crate::v1::Versioned;

/// Why a frame was not accepted; converts into the `error` reply to send back.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The `id` of the offending message, if one could be read.
    pub id: Option<String>,
    /// What kind of failure.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The message's `type`, if one could be read (a known type or not). An `error` is never
    /// answered with an `error`, even one that does not decode.
    pub kind: Option<String>,
}

impl DecodeError {
    /// Whether the offending message was itself an `error`, which must not be answered.
    pub fn was_error(&self) -> bool {
        self.kind.as_deref() == Some("error")
    }

    /// The `error` message body answering this failure.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            id: self.id.clone(),
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for DecodeError {}

/// The deepest nesting of arrays and objects in `text`, counting only brackets outside strings.
pub fn json_depth(text: &str) -> usize {
    let mut measure = Measure::default();
    measure.feed(text.as_bytes());
    measure.max_depth()
}

/// Measures JSON as it is written: its length and its deepest nesting (as [`json_depth`]
/// counts it), without keeping it. `serde_json::to_writer(&mut measure, &value)` tells how
/// large `encode(&value)` would be.
#[derive(Debug, Default)]
pub struct Measure {
    len: usize,
    depth: usize,
    max: usize,
    in_string: bool,
    escaped: bool,
}

impl Measure {
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The deepest nesting seen so far.
    pub fn max_depth(&self) -> usize {
        self.max
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        for &b in bytes {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.max = self.max.max(self.depth);
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
    }
}

impl std::io::Write for Measure {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn fail(id: Option<String>, code: ErrorCode, message: String) -> DecodeError {
    DecodeError {
        id,
        code,
        message,
        kind: None,
    }
}

/// The checks made before any parsing: the frame's size and its nesting depth.
fn check_frame(text: &str) -> Result<(), DecodeError> {
    if text.len() > crate::MAX_TEXT_BYTES {
        return Err(fail(
            None,
            ErrorCode::Oversize,
            format!(
                "a text message of {} bytes exceeds the limit of {} bytes",
                text.len(),
                crate::MAX_TEXT_BYTES
            ),
        ));
    }
    let depth = json_depth(text);
    if depth > crate::MAX_DEPTH {
        return Err(fail(
            None,
            ErrorCode::TooDeep,
            format!(
                "the message nests {depth} levels deep; the limit is {}",
                crate::MAX_DEPTH
            ),
        ));
    }
    Ok(())
}

/// Decodes one text frame of the current protocol version into `M`, whose known `type` tags
/// are `types`.
pub fn decode<M: DeserializeOwned>(text: &str, types: &[&str]) -> Result<M, DecodeError> {
    check_frame(text)?;
    // The common case, a well-formed message of a known type, in one pass. Anything else
    // takes the path below, which accepts exactly what this does and more (a duplicate key,
    // last one wins), and says precisely what is wrong.
    if let Ok(message) = serde_json::from_str::<M>(text) {
        return Ok(message);
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| fail(None, ErrorCode::Malformed, format!("not JSON: {e}")))?;
    decode_value(value, types)
}

/// Decodes one text frame of protocol `version` into `M`: a version-1 frame is rewritten into
/// the version-2 shape first ([`crate::v1`]).
pub fn decode_version<M: DeserializeOwned + Versioned>(
    text: &str,
    types: &[&str],
    version: u32,
) -> Result<M, DecodeError> {
    if version != 1 {
        let message = decode(text, types)?;
        // The types read the version-1 names too (for journals written before version 2);
        // on a version-2 connection they are refused, as the schema refuses them.
        if text.contains(crate::v1::V1_ONLY_NAME) {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
                if let Some(kind) = M::uses_v1_name(&value) {
                    let id = value
                        .get("id")
                        .and_then(|v| v.as_str())
                        .filter(|id| id.len() <= crate::MAX_ID_BYTES)
                        .map(str::to_string);
                    return Err(DecodeError {
                        kind: Some(kind.to_string()),
                        ..fail(
                            id,
                            ErrorCode::Malformed,
                            format!(
                                "bad `{kind}` message: unknown field `{}`: version 2 calls it `file_sha256`",
                                crate::v1::V1_ONLY_NAME
                            ),
                        )
                    });
                }
            }
        }
        return Ok(message);
    }
    check_frame(text)?;
    let mut value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| fail(None, ErrorCode::Malformed, format!("not JSON: {e}")))?;
    M::from_v1(&mut value);
    // Version 1 has no self-update messages: they are unknown types there.
    let types: Vec<&str> = types
        .iter()
        .copied()
        .filter(|t| crate::v1::carries(1, t))
        .collect();
    decode_value(value, &types)
}

/// Decodes a parsed message, saying precisely what is wrong with it.
fn decode_value<M: DeserializeOwned>(
    value: serde_json::Value,
    types: &[&str],
) -> Result<M, DecodeError> {
    // An id too long to be one is not echoed back.
    let id = value
        .get("id")
        .and_then(|v| v.as_str())
        .filter(|id| id.len() <= crate::MAX_ID_BYTES)
        .map(str::to_string);
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(fail(
            id,
            ErrorCode::Malformed,
            "the message has no string `type` field".into(),
        ));
    };
    // The type as read, bounded like an id (it is only ever compared and logged).
    let kind_read = Some(kind.chars().take(64).collect::<String>());
    if !types.contains(&kind) {
        let message = format!(
            "unknown message type {:?}; this end understands {}",
            kind_read.as_deref().unwrap_or_default(),
            types.join(", ")
        );
        return Err(DecodeError {
            kind: kind_read,
            ..fail(id, ErrorCode::UnknownType, message)
        });
    }
    let kind = kind.to_string();
    serde_json::from_value(value).map_err(|e| DecodeError {
        kind: Some(kind.clone()),
        ..fail(
            id,
            ErrorCode::Malformed,
            format!("bad `{kind}` message: {e}"),
        )
    })
}

/// Encodes a message as one text frame of the current protocol version.
pub fn encode<M: serde::Serialize>(message: &M) -> String {
    serde_json::to_string(message).expect("protocol messages always serialize")
}

/// A text frame already encoded in the current version (by [`encode`]), as protocol `version`
/// writes it: the same text for version 2, rewritten for version 1.
pub fn text_for_version<M: Versioned>(text: String, version: u32) -> String {
    if version != 1 {
        return text;
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(mut value) => {
            M::to_v1(&mut value);
            serde_json::to_string(&value).expect("JSON values always serialize")
        }
        Err(_) => text,
    }
}

/// Encodes a message as one text frame of protocol `version` (a version-1 frame is rewritten
/// from the version-2 shape, [`crate::v1`]).
pub fn encode_version<M: serde::Serialize + Versioned>(message: &M, version: u32) -> String {
    if version != 1 {
        return encode(message);
    }
    let mut value = serde_json::to_value(message).expect("protocol messages always serialize");
    M::to_v1(&mut value);
    serde_json::to_string(&value).expect("JSON values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::PlatformMessage;

    fn decode_platform(text: &str) -> Result<PlatformMessage, DecodeError> {
        decode::<PlatformMessage>(text, PlatformMessage::TYPES)
    }

    #[test]
    fn a_good_message_decodes_and_a_bad_one_says_what_is_wrong() {
        let ack = PlatformMessage::Ack {
            task_ids: vec!["t1".into()],
        };
        assert_eq!(decode_platform(&encode(&ack)).unwrap(), ack);
        // A repeated key: the last one wins, as JSON parsers commonly do.
        assert_eq!(
            decode_platform(r#"{"type":"ack","task_ids":["x"],"task_ids":["t1"]}"#).unwrap(),
            ack
        );

        let e = decode_platform(r#"{"type":"launch","id":"m1"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::UnknownType, Some("m1"))
        );
        assert!(e.message.contains("\"launch\""), "{e}");
        let e = decode_platform(r#"{"id":"m2"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::Malformed, Some("m2"))
        );
        assert!(e.message.contains("no string `type`"), "{e}");
        let e = decode_platform(r#"{"type":"ack","id":"m3","task_ids":"t1"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::Malformed, Some("m3"))
        );
        assert!(e.message.contains("bad `ack` message"), "{e}");
        let e = decode_platform(r#"{"type":"ack","#).unwrap_err();
        assert_eq!((e.code, e.id.as_deref()), (ErrorCode::Malformed, None));
        assert!(e.message.starts_with("not JSON"), "{e}");
        let deep = format!(
            "{}{}",
            "[".repeat(crate::MAX_DEPTH + 1),
            "]".repeat(crate::MAX_DEPTH + 1)
        );
        assert_eq!(decode_platform(&deep).unwrap_err().code, ErrorCode::TooDeep);
        let big = format!(
            r#"{{"type":"ack","task_ids":["{}"]}}"#,
            "x".repeat(crate::MAX_TEXT_BYTES)
        );
        assert_eq!(decode_platform(&big).unwrap_err().code, ErrorCode::Oversize);
    }
}
