//! Parsing time arguments: RFC 3339 or unix seconds, and durations (`90s`, `10m`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Parses a duration: a whole number followed by `ms`, `s`, `m` or `h` (`500ms`, `90s`, `10m`,
/// `1h`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 90s, 10m, 1h)"))?;
    let millis = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: the unit is one of ms, s, m, h")),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "m",
            "1.5s",
            "-1s",
            "10 m",
            "10d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
