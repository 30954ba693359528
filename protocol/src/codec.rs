//! Decoding with limits: every text frame from the other end is hostile until checked.
//!
//! [`decode`] checks the size, the nesting depth and the `type` tag before handing the text to
//! serde, so each failure has its own [`ErrorCode`] and a message the other end can act on. The
//! connection survives every one of them; the caller answers with an `error` message.

use serde::de::DeserializeOwned;

use crate::messages::{ErrorBody, ErrorCode};

/// Why a frame was not accepted; converts into the `error` reply to send back.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The `id` of the offending message, if one could be read.
    pub id: Option<String>,
    /// What kind of failure.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

impl DecodeError {
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
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Decodes one text frame into `M`, whose known `type` tags are `types`.
pub fn decode<M: DeserializeOwned>(text: &str, types: &[&str]) -> Result<M, DecodeError> {
    let fail = |id: Option<String>, code, message: String| DecodeError { id, code, message };
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
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| fail(None, ErrorCode::Malformed, format!("not JSON: {e}")))?;
    let id = value.get("id").and_then(|v| v.as_str()).map(str::to_string);
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(fail(
            id,
            ErrorCode::Malformed,
            "the message has no string `type` field".into(),
        ));
    };
    if !types.contains(&kind) {
        return Err(fail(
            id,
            ErrorCode::UnknownType,
            format!(
                "unknown message type {kind:?}; this end understands {}",
                types.join(", ")
            ),
        ));
    }
    let kind = kind.to_string();
    serde_json::from_value(value).map_err(|e| {
        fail(
            id,
            ErrorCode::Malformed,
            format!("bad `{kind}` message: {e}"),
        )
    })
}

/// Encodes a message as one text frame.
pub fn encode<M: serde::Serialize>(message: &M) -> String {
    serde_json::to_string(message).expect("protocol messages always serialize")
}
