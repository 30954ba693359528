//! Unix seconds to and from RFC 3339 text (UTC), for messages and command-line flags.

/// Formats unix seconds as RFC 3339 in UTC, e.g. `2025-11-25T05:53:20Z`.
pub fn format_rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses an RFC 3339 timestamp (`2025-11-25T05:53:20Z`, `2025-11-25T06:53:20.5+01:00`) to
/// unix seconds, dropping any fraction. Times before 1970 are refused.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("{text:?} is not an RFC 3339 timestamp: {why}");
    let b = text.as_bytes();
    if b.len() < 20 {
        return Err(bad("too short (expected e.g. 2025-11-25T05:53:20Z)"));
    }
    let num = |r: std::ops::Range<usize>| -> Result<u32, String> {
        let s = &text[r];
        if s.bytes().all(|c| c.is_ascii_digit()) {
            Ok(s.parse().expect("digits"))
        } else {
            Err(bad("expected digits"))
        }
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time"));
    }
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("empty fraction"));
        }
        rest = &frac[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return Err(bad("expected Z or an offset like +01:00"));
            }
            let (oh, om) = (
                num(text.len() - 5..text.len() - 3)?,
                num(text.len() - 2..text.len())?,
            );
            if oh > 23 || om > 59 {
                return Err(bad("no such offset"));
            }
            let o = i64::from(oh * 3600 + om * 60);
            if rb[0] == b'-' {
                -o
            } else {
                o
            }
        }
    };
    let days = days_from_civil(i64::from(year), month, day);
    let t = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset;
    u64::try_from(t).map_err(|_| bad("before 1970"))
}

fn is_leap(y: u32) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1764050000), "2025-11-25T05:53:20Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(parse_rfc3339("2025-11-25T05:53:20Z"), Ok(1764050000));
        assert_eq!(
            parse_rfc3339("2025-11-25t06:53:20.999+01:00"),
            Ok(1764050000)
        );
        assert_eq!(parse_rfc3339("2025-11-25 04:53:20-01:00"), Ok(1764050000));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Ok(951_782_400));
    }

    #[test]
    fn roundtrip() {
        for t in (0..5_000_000_000u64).step_by(86_400 * 37 + 12_345) {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t));
        }
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "1764050000",
            "2025-11-25",
            "2025-11-25T05:53:20",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-11-25T24:00:00Z",
            "2025-11-25T05:53:20.Z",
            "2025-11-25T05:53:20+0100",
            "1969-12-31T23:59:59Z",
            "2025-11-25T05:53:20ZZ",
            "２０２５-11-25T05:53:20Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
