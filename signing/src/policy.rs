//! The agent's trust policy: which keys may sign handlers, for which names, up to which
//! capabilities, and which key ids are revoked.
//!
//! In the agent's TOML config (the table the host deserializes a [`TrustPolicy`] from):
//!
//! ```toml
//! revoked = ["0123456789abcdef0123456789abcdef"]
//!
//! [[keys]]
//! key = "ed25519:ebVWLo_mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ"
//! label = "release key"                  # optional, shown in messages
//! names = ["hello", "log*"]              # optional; absent = any name
//! max = { fuel = 2000000000, env = ["TZ"], dirs = [{ path = "/data", write = false }] }  # optional
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::claims::{is_handler_name, Capabilities, Claims, ClaimsError, Limit};
use crate::keys::{KeyId, PublicKey};

/// A trust policy that cannot be built: a duplicate key, a bad name pattern or a bad `max`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The same public key is listed twice.
    #[error("key {0} is listed more than once in the trust policy")]
    DuplicateKey(KeyId),
    /// A `names` entry is neither a handler name nor a prefix followed by one `*`.
    #[error("name pattern {0:?} is invalid: expected a handler name, or a prefix of one followed by a single trailing '*'")]
    BadNamePattern(String),
    /// A `max` has an invalid env name or dir path.
    #[error("invalid max for key {key_id}: {source}")]
    BadMax {
        /// The key whose `max` is invalid.
        key_id: KeyId,
        /// What is wrong with it.
        source: ClaimsError,
    },
}

/// A pattern for handler names: an exact name (`hello`), or a prefix followed by a single
/// trailing `*` (`log*` matches `log`, `logscan`...; `*` alone matches every name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamePattern(String);

impl NamePattern {
    /// Parses and checks a pattern.
    pub fn new(pattern: &str) -> Result<NamePattern, PolicyError> {
        let ok = match pattern.strip_suffix('*') {
            // A prefix must be the start of some valid name.
            Some(prefix) => prefix.is_empty() || is_handler_name(&format!("{prefix}x")),
            None => is_handler_name(pattern),
        };
        if ok {
            Ok(NamePattern(pattern.to_string()))
        } else {
            Err(PolicyError::BadNamePattern(pattern.to_string()))
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.0,
        }
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for NamePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NamePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NamePattern::new(&s).map_err(serde::de::Error::custom)
    }
}

/// One key the agent trusts, with what it may sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// The public key, `ed25519:...` in text form.
    pub key: PublicKey,
    /// A human label for messages and logs (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The handler names this key may sign; `None` (absent): any name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<NamePattern>>,
    /// Ceilings on the capabilities this key may grant; `None` (absent): none beyond the
    /// agent's own. Within it, an absent field is likewise unbounded, while an empty `env` or
    /// `dirs` list allows none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Capabilities>,
}

impl TrustedKey {
    /// Trusts `key` for any name, with no ceilings of its own.
    pub fn new(key: PublicKey) -> TrustedKey {
        TrustedKey {
            key,
            label: None,
            names: None,
            max: None,
        }
    }

    /// Sets a label.
    pub fn with_label(mut self, label: impl Into<String>) -> TrustedKey {
        self.label = Some(label.into());
        self
    }

    /// Restricts the key to names matching one of `patterns` (see [`NamePattern`]).
    pub fn with_names<I, S>(mut self, patterns: I) -> Result<TrustedKey, PolicyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.names = Some(
            patterns
                .into_iter()
                .map(|p| NamePattern::new(p.as_ref()))
                .collect::<Result<_, _>>()?,
        );
        Ok(self)
    }

    /// Sets the capability ceilings.
    pub fn with_max(mut self, max: Capabilities) -> Result<TrustedKey, PolicyError> {
        max.validate().map_err(|source| PolicyError::BadMax {
            key_id: self.key.key_id(),
            source,
        })?;
        self.max = Some(max);
        Ok(self)
    }

    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        self.key.key_id()
    }

    /// Whether this key may sign a handler called `name`.
    pub fn allows_name(&self, name: &str) -> bool {
        self.names
            .as_ref()
            .is_none_or(|pats| pats.iter().any(|p| p.matches(name)))
    }

    /// How messages name this key: its id, and its label if it has one.
    pub(crate) fn describe(&self) -> String {
        match &self.label {
            Some(l) => format!("{} ({l:?})", self.key_id()),
            None => self.key_id().to_string(),
        }
    }

    /// Checks `claims` against this key's names and ceilings; the error says what is out of
    /// scope.
    pub fn check_scope(&self, claims: &Claims) -> Result<(), String> {
        if !self.allows_name(&claims.name) {
            let pats: Vec<&str> = self
                .names
                .iter()
                .flatten()
                .map(NamePattern::as_str)
                .collect();
            return Err(format!(
                "key {} may not sign a handler named {:?} (allowed names: {})",
                self.describe(),
                claims.name,
                if pats.is_empty() {
                    "none".to_string()
                } else {
                    pats.join(", ")
                }
            ));
        }
        let Some(max) = &self.max else {
            return Ok(());
        };
        let caps = &claims.capabilities;
        for limit in Limit::ALL {
            if let (Some(asked), Some(ceiling)) = (caps.limit(limit), max.limit(limit)) {
                if asked > ceiling {
                    return Err(format!(
                        "capability {} = {asked} exceeds the maximum {ceiling} key {} may grant",
                        limit.name(),
                        self.describe()
                    ));
                }
            }
        }
        if let Some(allowed) = &max.env {
            for var in caps.env.iter().flatten() {
                if !allowed.contains(var) {
                    return Err(format!(
                        "capability env {var:?} is not among the variables key {} may grant ({})",
                        self.describe(),
                        list_or_none(allowed.iter().map(String::as_str))
                    ));
                }
            }
        }
        if let Some(allowed) = &max.dirs {
            for dir in caps.dirs.iter().flatten() {
                let ok = allowed
                    .iter()
                    .any(|a| a.path == dir.path && (a.write || !dir.write));
                if !ok {
                    let access = if dir.write { "read-write" } else { "read-only" };
                    return Err(format!(
                        "capability dir {:?} ({access}) is not among the directories key {} may grant ({})",
                        dir.path,
                        self.describe(),
                        list_or_none(allowed.iter().map(|a| if a.write {
                            format!("{} rw", a.path)
                        } else {
                            format!("{} ro", a.path)
                        }))
                    ));
                }
            }
        }
        Ok(())
    }
}

fn list_or_none<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    let v: Vec<String> = items.map(|s| s.as_ref().to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    keys: Vec<TrustedKey>,
    #[serde(default)]
    revoked: Vec<KeyId>,
}

/// Which keys an agent trusts to sign handlers, and which key ids are revoked.
///
/// Deserializes (serde, unknown fields rejected) from a table with two optional fields:
/// `keys`, an array of [`TrustedKey`] tables, and `revoked`, an array of key ids (32 hex
/// characters). A key listed twice, a bad name pattern or a bad `max` fails deserialization.
/// The default policy trusts nothing, so every signed module is rejected as `unknown_key`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicy", into = "RawPolicy")]
pub struct TrustPolicy {
    keys: Vec<TrustedKey>,
    revoked: BTreeSet<KeyId>,
}

impl TryFrom<RawPolicy> for TrustPolicy {
    type Error = PolicyError;
    fn try_from(raw: RawPolicy) -> Result<Self, PolicyError> {
        let mut policy = TrustPolicy::new();
        for key in raw.keys {
            if let Some(max) = &key.max {
                max.validate().map_err(|source| PolicyError::BadMax {
                    key_id: key.key_id(),
                    source,
                })?;
            }
            policy = policy.trust(key)?;
        }
        for id in raw.revoked {
            policy = policy.revoke(id);
        }
        Ok(policy)
    }
}

impl From<TrustPolicy> for RawPolicy {
    fn from(p: TrustPolicy) -> RawPolicy {
        RawPolicy {
            keys: p.keys,
            revoked: p.revoked.into_iter().collect(),
        }
    }
}

impl TrustPolicy {
    /// An empty policy (trusts no key).
    pub fn new() -> TrustPolicy {
        TrustPolicy::default()
    }

    /// Adds a trusted key; fails if the same key is already trusted.
    pub fn trust(mut self, key: TrustedKey) -> Result<TrustPolicy, PolicyError> {
        if self.keys.iter().any(|k| k.key == key.key) {
            return Err(PolicyError::DuplicateKey(key.key_id()));
        }
        self.keys.push(key);
        Ok(self)
    }

    /// Revokes a key id: signatures by it are rejected as `revoked_key` even if the key is
    /// also listed as trusted.
    pub fn revoke(mut self, key_id: KeyId) -> TrustPolicy {
        self.revoked.insert(key_id);
        self
    }

    /// The trusted keys, in the order given.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// The revoked key ids.
    pub fn revoked(&self) -> impl Iterator<Item = &KeyId> {
        self.revoked.iter()
    }

    /// Whether `key_id` is revoked.
    pub fn is_revoked(&self, key_id: &KeyId) -> bool {
        self.revoked.contains(key_id)
    }

    /// The trusted key with id `key_id`, if any.
    pub fn find(&self, key_id: &KeyId) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key_id() == *key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::DirGrant;
    use crate::keys::KeyPair;

    fn pk(n: u8) -> PublicKey {
        KeyPair::from_seed(&[n; 32]).public_key()
    }

    #[test]
    fn name_patterns() {
        let p = NamePattern::new("log*").unwrap();
        assert!(p.matches("log"));
        assert!(p.matches("logscan"));
        assert!(!p.matches("lo"));
        assert!(NamePattern::new("*").unwrap().matches("anything"));
        assert!(NamePattern::new("hello").unwrap().matches("hello"));
        assert!(!NamePattern::new("hello").unwrap().matches("hello2"));
        assert!(NamePattern::new("a.b-*").is_ok());
        for bad in ["", "*log", "l*g", "log**", "Log*", "-x*", "a b"] {
            assert!(NamePattern::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn from_toml() {
        let k1 = pk(1);
        let k2 = pk(2);
        let text = format!(
            r#"
            revoked = ["{}"]
            [[keys]]
            key = "{k1}"
            label = "release"
            names = ["hello", "log*"]
            max = {{ fuel = 5, memory_bytes = 6, env = ["TZ"], dirs = [{{ path = "/data", write = true }}] }}
            [[keys]]
            key = "{k2}"
            "#,
            k2.key_id()
        );
        let p: TrustPolicy = toml::from_str(&text).unwrap();
        assert_eq!(p.keys().len(), 2);
        assert!(p.is_revoked(&k2.key_id()));
        let t = p.find(&k1.key_id()).unwrap();
        assert_eq!(t.label.as_deref(), Some("release"));
        assert_eq!(t.max.as_ref().unwrap().fuel, Some(5));
        assert_eq!(
            t.max.as_ref().unwrap().dirs.as_ref().unwrap()[0],
            DirGrant {
                path: "/data".into(),
                write: true
            }
        );
        assert!(p.find(&k2.key_id()).unwrap().names.is_none());
        // Round trip through serde.
        let again: TrustPolicy = toml::from_str(&toml::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
        // Empty table: trusts nothing.
        let empty: TrustPolicy = toml::from_str("").unwrap();
        assert_eq!(empty, TrustPolicy::new());
    }

    #[test]
    fn bad_toml() {
        let k1 = pk(1);
        for bad in [
            format!("[[keys]]\nkey = \"{k1}\"\nextra = 1"),
            format!("[[keys]]\nkey = \"{k1}\"\nmax = {{ network = true }}"),
            format!("[[keys]]\nkey = \"{k1}\"\nnames = [\"*x\"]"),
            format!("[[keys]]\nkey = \"{k1}\"\nmax = {{ env = [\"A=B\"] }}"),
            format!("[[keys]]\nkey = \"{k1}\"\n[[keys]]\nkey = \"{k1}\""),
            "[[keys]]\nkey = \"ed25519:short\"".to_string(),
            "revoked = [\"nothex\"]".to_string(),
            "trusted = []".to_string(),
        ] {
            assert!(toml::from_str::<TrustPolicy>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builder() {
        let p = TrustPolicy::new()
            .trust(
                TrustedKey::new(pk(1))
                    .with_label("a")
                    .with_names(["x*"])
                    .unwrap(),
            )
            .unwrap()
            .revoke(pk(3).key_id());
        assert!(p.trust(TrustedKey::new(pk(1))).is_err());
        assert!(TrustedKey::new(pk(1)).with_names(["*x"]).is_err());
        let max = Capabilities {
            dirs: Some(vec![DirGrant {
                path: "../x".into(),
                write: false,
            }]),
            ..Default::default()
        };
        assert!(TrustedKey::new(pk(1)).with_max(max).is_err());
    }

    #[test]
    fn scope() {
        let key = TrustedKey::new(pk(1))
            .with_names(["hello"])
            .unwrap()
            .with_max(Capabilities {
                fuel: Some(100),
                env: Some(vec!["TZ".into()]),
                dirs: Some(vec![DirGrant {
                    path: "/data".into(),
                    write: false,
                }]),
                ..Default::default()
            })
            .unwrap();
        let mut c = Claims::new("hello", "1", 0);
        assert!(key.check_scope(&c).is_ok());
        c.capabilities.fuel = Some(100);
        c.capabilities.memory_bytes = Some(u64::MAX); // no ceiling on memory
        c.capabilities.env = Some(vec!["TZ".into()]);
        c.capabilities.dirs = Some(vec![DirGrant {
            path: "/data".into(),
            write: false,
        }]);
        assert!(key.check_scope(&c).is_ok());
        let mut over = c.clone();
        over.capabilities.fuel = Some(101);
        assert!(key.check_scope(&over).unwrap_err().contains("fuel = 101"));
        let mut over = c.clone();
        over.capabilities.env = Some(vec!["HOME".into()]);
        assert!(key.check_scope(&over).unwrap_err().contains("HOME"));
        let mut over = c.clone();
        over.capabilities.dirs.as_mut().unwrap()[0].write = true;
        assert!(key.check_scope(&over).unwrap_err().contains("read-write"));
        let mut over = c.clone();
        over.capabilities.dirs.as_mut().unwrap()[0].path = "/data/sub".into();
        assert!(key.check_scope(&over).is_err());
        let mut other = c.clone();
        other.name = "hello2".into();
        assert!(key.check_scope(&other).unwrap_err().contains("hello2"));
    }
}
