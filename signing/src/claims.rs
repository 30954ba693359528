//! The signed claims: what a publisher states about a handler module (its name, version,
//! validity period and the capabilities it may be granted).

use serde::{Deserialize, Serialize};

/// The only claims format version (`"v"`) this crate understands.
pub const CLAIMS_VERSION: u32 = 1;

/// The largest claims document an envelope may carry, in bytes (64 KiB).
pub const MAX_CLAIMS_LEN: usize = 64 * 1024;

/// The claims a publisher signs, serialized as a UTF-8 JSON object.
///
/// Unknown fields are rejected when parsing (a verifier that does not understand a claim must
/// not silently ignore it), here and in [`Capabilities`] and [`DirGrant`].
///
/// ```json
/// {"v":1,"name":"hello","version":"1.0.0","issued_at":1764050000,"not_after":null,
///  "capabilities":{"fuel":1000000000,"env":["TZ"],"dirs":[{"path":"/data","write":false}]}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Claims format version; must be [`CLAIMS_VERSION`] (1).
    pub v: u32,
    /// The handler's name: `[a-z0-9][a-z0-9._-]{0,63}`. Trust policies scope keys by name.
    pub name: String,
    /// The handler's version, free-form (1 to 64 bytes, no control characters), e.g. `1.0.0`.
    pub version: String,
    /// When the signature was made, in unix seconds.
    pub issued_at: u64,
    /// The last second (unix) at which the signature is valid; `null` or absent: no expiry.
    #[serde(default)]
    pub not_after: Option<u64>,
    /// What the handler may be granted; absent means `{}` (nothing beyond the defaults).
    #[serde(default)]
    pub capabilities: Capabilities,
}

/// Capabilities: in claims, what a handler asks to be allowed; in a trust policy's `max`, the
/// most a key may grant.
///
/// In claims, an absent numeric field means "no more than the agent's default", and absent
/// `env`/`dirs` mean none: capabilities a handler did not declare are not granted.
/// In a policy's `max`, an absent field means "no ceiling beyond the agent's own", while an
/// empty `env`/`dirs` list means none may be granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Fuel units for one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Linear memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Wall-clock time for one run, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Bytes kept of each of stdout and stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// Names of host environment variables the handler may read (`[A-Za-z_][A-Za-z0-9_]*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Host directories the handler may open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirs: Option<Vec<DirGrant>>,
}

/// One directory a handler may access.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// Absolute path, `/`-separated, without `.`/`..`/empty components or a trailing `/`
    /// (except the root `/` itself). Matching against a policy is by exact string equality.
    pub path: String,
    /// Whether writes are allowed; absent means `false` (read-only).
    #[serde(default)]
    pub write: bool,
}

/// One of the four numeric limits a capability set can bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `fuel`
    Fuel,
    /// `memory_bytes`
    MemoryBytes,
    /// `timeout_ms`
    TimeoutMs,
    /// `output_bytes`
    OutputBytes,
}

impl Limit {
    /// All four, in the order they appear in the claims.
    pub const ALL: [Limit; 4] = [
        Limit::Fuel,
        Limit::MemoryBytes,
        Limit::TimeoutMs,
        Limit::OutputBytes,
    ];

    /// The JSON field name.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Fuel => "fuel",
            Limit::MemoryBytes => "memory_bytes",
            Limit::TimeoutMs => "timeout_ms",
            Limit::OutputBytes => "output_bytes",
        }
    }
}

impl Capabilities {
    /// The value of one numeric limit, if present.
    pub fn limit(&self, limit: Limit) -> Option<u64> {
        match limit {
            Limit::Fuel => self.fuel,
            Limit::MemoryBytes => self.memory_bytes,
            Limit::TimeoutMs => self.timeout_ms,
            Limit::OutputBytes => self.output_bytes,
        }
    }

    /// Checks the syntax of `env` names and `dirs` paths.
    pub fn validate(&self) -> Result<(), ClaimsError> {
        for name in self.env.iter().flatten() {
            if !is_env_name(name) {
                return Err(ClaimsError::Invalid(format!(
                    "env name {name:?} is not [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
        }
        for dir in self.dirs.iter().flatten() {
            if !is_clean_abs_path(&dir.path) {
                return Err(ClaimsError::Invalid(format!(
                    "dir path {:?} is not a clean absolute path (no '.', '..', empty components or trailing '/')",
                    dir.path
                )));
            }
        }
        Ok(())
    }
}

/// Claims that cannot be parsed or break a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// Not a JSON object of the expected shape (including unknown fields).
    #[error("claims are not valid JSON of the expected shape: {0}")]
    Json(String),
    /// Parsed, but a value breaks a rule (version, name syntax, size...).
    #[error("invalid claims: {0}")]
    Invalid(String),
}

impl Claims {
    /// Claims for `name` at `version`, issued at `issued_at` (unix seconds), with no expiry and
    /// no capabilities.
    pub fn new(name: impl Into<String>, version: impl Into<String>, issued_at: u64) -> Claims {
        Claims {
            v: CLAIMS_VERSION,
            name: name.into(),
            version: version.into(),
            issued_at,
            not_after: None,
            capabilities: Capabilities::default(),
        }
    }

    /// Parses and validates a claims document (the exact bytes that were signed).
    pub fn from_json(bytes: &[u8]) -> Result<Claims, ClaimsError> {
        if bytes.len() > MAX_CLAIMS_LEN {
            return Err(ClaimsError::Invalid(format!(
                "claims are {} bytes, more than the {MAX_CLAIMS_LEN} allowed",
                bytes.len()
            )));
        }
        let claims: Claims =
            serde_json::from_slice(bytes).map_err(|e| ClaimsError::Json(e.to_string()))?;
        claims.validate()?;
        Ok(claims)
    }

    /// Serializes to compact JSON (fields in declaration order, absent capabilities left out).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("claims always serialize")
    }

    /// Checks every rule a verifier applies to parsed claims.
    pub fn validate(&self) -> Result<(), ClaimsError> {
        if self.v != CLAIMS_VERSION {
            return Err(ClaimsError::Invalid(format!(
                "claims version {} is not supported (expected {CLAIMS_VERSION})",
                self.v
            )));
        }
        if !is_handler_name(&self.name) {
            return Err(ClaimsError::Invalid(format!(
                "name {:?} is not [a-z0-9][a-z0-9._-]{{0,63}}",
                self.name
            )));
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || self.version.chars().any(char::is_control)
        {
            return Err(ClaimsError::Invalid(format!(
                "version {:?} must be 1 to 64 bytes without control characters",
                self.version
            )));
        }
        self.capabilities.validate()
    }
}

/// Whether `name` matches `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn is_handler_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

fn is_clean_abs_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !path.contains('\0')
        && rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_from_the_docs_parses() {
        let json = br#"{"v":1,"name":"hello","version":"1.0.0","issued_at":1764050000,"not_after":null,
   "capabilities":{"fuel":1000000000,"memory_bytes":67108864,"timeout_ms":10000,"output_bytes":1048576,
                   "env":["TZ"],"dirs":[{"path":"/data","write":false}]}}"#;
        let c = Claims::from_json(json).unwrap();
        assert_eq!(c.name, "hello");
        assert_eq!(c.capabilities.fuel, Some(1_000_000_000));
        assert_eq!(c.capabilities.env.as_deref(), Some(&["TZ".to_string()][..]));
        assert_eq!(Claims::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn serialization_is_stable() {
        let mut c = Claims::new("hello", "1.0.0", 1764050000);
        c.capabilities.fuel = Some(1_000_000_000);
        assert_eq!(
            String::from_utf8(c.to_json()).unwrap(),
            r#"{"v":1,"name":"hello","version":"1.0.0","issued_at":1764050000,"not_after":null,"capabilities":{"fuel":1000000000}}"#
        );
    }

    #[test]
    fn optional_fields() {
        let c = Claims::from_json(br#"{"v":1,"name":"x","version":"1","issued_at":0}"#).unwrap();
        assert_eq!(c.not_after, None);
        assert_eq!(c.capabilities, Capabilities::default());
        let c = Claims::from_json(
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"dirs":[{"path":"/d"}]}}"#,
        )
        .unwrap();
        assert!(!c.capabilities.dirs.unwrap()[0].write);
    }

    #[test]
    fn rejections() {
        for bad in [
            &br#"{"v":1,"name":"x","version":"1","issued_at":0,"extra":1}"#[..],
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"net":true}}"#,
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"dirs":[{"path":"/d","exec":true}]}}"#,
            br#"{"v":2,"name":"x","version":"1","issued_at":0}"#,
            br#"{"v":1,"name":"X","version":"1","issued_at":0}"#,
            br#"{"v":1,"name":"-x","version":"1","issued_at":0}"#,
            br#"{"v":1,"name":"","version":"1","issued_at":0}"#,
            br#"{"v":1,"name":"x","version":"","issued_at":0}"#,
            br#"{"v":1,"name":"x","version":"1","issued_at":-1}"#,
            br#"{"v":1,"name":"x","issued_at":0}"#,
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"env":["A=B"]}}"#,
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"dirs":[{"path":"/a/../etc"}]}}"#,
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"dirs":[{"path":"rel"}]}}"#,
            br#"{"v":1,"name":"x","version":"1","issued_at":0,"capabilities":{"dirs":[{"path":"/a/"}]}}"#,
            b"[]",
            b"\xff",
        ] {
            assert!(Claims::from_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn names() {
        assert!(is_handler_name("hello"));
        assert!(is_handler_name("0log.scan_v2-x"));
        assert!(is_handler_name(&"a".repeat(64)));
        assert!(!is_handler_name(&"a".repeat(65)));
        assert!(!is_handler_name("Hello"));
        assert!(!is_handler_name(".x"));
        assert!(!is_handler_name("a b"));
    }
}
