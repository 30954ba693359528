//! Parsing time arguments: RFC 3339 or unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

use bridge_signing::timefmt::parse_rfc3339;

/// Parses `2025-11-25T05:53:20Z` (any RFC 3339 offset) or unix seconds (`1764050000`).
pub fn parse_time(text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("{text:?} is too large for unix seconds"));
    }
    parse_rfc3339(text).map_err(|e| format!("{e} (or give unix seconds)"))
}

/// The current time in unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms() {
        assert_eq!(parse_time("1764050000"), Ok(1764050000));
        assert_eq!(parse_time("2025-11-25T05:53:20Z"), Ok(1764050000));
        assert!(parse_time("").is_err());
        assert!(parse_time("tomorrow").is_err());
        assert!(parse_time("99999999999999999999999").is_err());
    }
}
