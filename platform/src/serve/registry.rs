//! Enrolled agents and enrollment tokens, persisted in the state directory.
//!
//! Guarantees:
//!
//! * Tokens are 32 random bytes (base64url, no padding). Only their SHA-256 is stored
//!   (`tokens.json`); a token enrolls at most one agent, once, before its expiry.
//! * An agent id, once enrolled, stays enrolled (`agents.json`) across restarts; an enrolled
//!   agent is admitted whatever token it presents, or none.
//! * State files are mode 0600 and replaced atomically (temporary file, then rename); a change
//!   that cannot be persisted is not applied.
//! * Timestamps are RFC 3339 UTC strings (`2025-11-25T05:53:20Z`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use bridge_signing::timefmt::{format_rfc3339, parse_rfc3339};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::timearg::now_unix;

/// File name of the enrolled agents.
pub const AGENTS_FILE: &str = "agents.json";
/// File name of the token hashes.
pub const TOKENS_FILE: &str = "tokens.json";
/// Mode of the state files.
pub const STATE_FILE_MODE: u32 = 0o600;
/// Unused tokens are forgotten this long after they expired (until then, presenting one is
/// answered `token_expired` rather than `token_invalid`).
pub const EXPIRED_TOKEN_RETENTION_SECS: u64 = 7 * 86_400;

/// An enrolled agent as stored and as listed by the control interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// The agent id (hex SHA-256 of its public key).
    pub id: String,
    /// When it enrolled.
    pub enrolled_at: String,
    /// When a message from it was last received (persisted at connect and disconnect).
    pub last_seen: String,
}

/// One issued token, by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    /// Hex SHA-256 of the token text.
    sha256: String,
    issued_at: String,
    #[serde(default)]
    expires_at: Option<String>,
    /// The agent id it enrolled.
    #[serde(default)]
    used_by: Option<String>,
    #[serde(default)]
    used_at: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentsFile {
    agents: Vec<AgentRecord>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokensFile {
    tokens: Vec<TokenRecord>,
}

/// Why an upgrade was refused; the wire name goes in the `X-Bridge-Refusal` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown agent and no `Authorization: Bearer` header.
    TokenMissing,
    /// A token this server never issued (or a malformed header).
    TokenInvalid,
    /// A token that already enrolled another agent.
    TokenUsed,
    /// A token past its expiry.
    TokenExpired,
}

impl Refusal {
    /// The wire name, e.g. `token_used`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TokenMissing => "token_missing",
            Refusal::TokenInvalid => "token_invalid",
            Refusal::TokenUsed => "token_used",
            Refusal::TokenExpired => "token_expired",
        }
    }

    /// A one-line explanation for the response body.
    pub fn explanation(self) -> &'static str {
        match self {
            Refusal::TokenMissing => {
                "this agent is not enrolled: present an enrollment token (Authorization: Bearer TOKEN)"
            }
            Refusal::TokenInvalid => "this enrollment token is not known to this platform",
            Refusal::TokenUsed => "this enrollment token has already enrolled another agent",
            Refusal::TokenExpired => "this enrollment token has expired",
        }
    }
}

/// The outcome of admitting an agent at upgrade time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Already enrolled.
    Known,
    /// Enrolled just now, with a token.
    Enrolled,
}

/// Why [`Registry::admit`] did not admit.
#[derive(Debug)]
pub enum AdmitError {
    /// The agent is refused (HTTP 401).
    Refused(Refusal),
    /// The enrollment could not be persisted (HTTP 500).
    Internal(anyhow::Error),
}

#[derive(Debug)]
struct State {
    agents: BTreeMap<String, AgentRecord>,
    tokens: Vec<TokenRecord>,
}

/// The enrolled agents and the tokens, in memory and in the state directory.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    state: Mutex<State>,
}

/// The SHA-256 (hex) of a token's text.
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn read_json<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).expect("state always serializes");
    text.push(b'\n');
    crate::files::write_atomic(path, &text, Some(STATE_FILE_MODE))
}

impl Registry {
    /// Opens the registry in `dir`, reading `agents.json` and `tokens.json` if they exist.
    /// A state file that does not parse is an error (nothing is silently forgotten).
    pub fn open(dir: &Path) -> Result<Registry> {
        let agents: AgentsFile = read_json(&dir.join(AGENTS_FILE))?;
        let tokens: TokensFile = read_json(&dir.join(TOKENS_FILE))?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                agents: agents
                    .agents
                    .into_iter()
                    .map(|a| (a.id.clone(), a))
                    .collect(),
                tokens: tokens.tokens,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save_agents(&self, state: &State) -> Result<()> {
        let file = AgentsFile {
            agents: state.agents.values().cloned().collect(),
        };
        write_json(&self.dir.join(AGENTS_FILE), &file)
    }

    fn save_tokens(&self, state: &State) -> Result<()> {
        let file = TokensFile {
            tokens: state.tokens.clone(),
        };
        write_json(&self.dir.join(TOKENS_FILE), &file)
    }

    /// Issues a new token valid for `ttl_secs` seconds (`None`: no expiry) and persists its
    /// hash. Unused tokens expired more than [`EXPIRED_TOKEN_RETENTION_SECS`] ago are dropped.
    pub fn issue_token(&self, ttl_secs: Option<u64>) -> Result<String> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let now = now_unix();
        let mut state = self.lock();
        let before = state.tokens.clone();
        state.tokens.retain(|t| {
            let expired_long_ago = t
                .expires_at
                .as_deref()
                .and_then(|e| parse_rfc3339(e).ok())
                .is_some_and(|e| e.saturating_add(EXPIRED_TOKEN_RETENTION_SECS) < now);
            t.used_by.is_some() || !expired_long_ago
        });
        state.tokens.push(TokenRecord {
            sha256: token_hash(&token),
            issued_at: format_rfc3339(now),
            expires_at: ttl_secs.map(|t| format_rfc3339(now.saturating_add(t))),
            used_by: None,
            used_at: None,
        });
        if let Err(e) = self.save_tokens(&state) {
            state.tokens = before;
            return Err(e);
        }
        Ok(token)
    }

    /// Decides whether `agent_id` may connect, presenting `token` (the bearer token, if any).
    /// Enrolls it (persisting both files) when it is new and the token is good.
    pub fn admit(&self, agent_id: &str, token: Option<&str>) -> Result<Admission, AdmitError> {
        let mut state = self.lock();
        if state.agents.contains_key(agent_id) {
            return Ok(Admission::Known);
        }
        let token = token.ok_or(AdmitError::Refused(Refusal::TokenMissing))?;
        let hash = token_hash(token);
        let now = now_unix();
        let index = state
            .tokens
            .iter()
            .position(|t| t.sha256 == hash)
            .ok_or(AdmitError::Refused(Refusal::TokenInvalid))?;
        let record = &state.tokens[index];
        if record.used_by.is_some() {
            return Err(AdmitError::Refused(Refusal::TokenUsed));
        }
        let expired = record
            .expires_at
            .as_deref()
            .map(|e| parse_rfc3339(e).map_or(true, |e| now >= e))
            .unwrap_or(false);
        if expired {
            return Err(AdmitError::Refused(Refusal::TokenExpired));
        }
        let stamp = format_rfc3339(now);
        state.tokens[index].used_by = Some(agent_id.to_string());
        state.tokens[index].used_at = Some(stamp.clone());
        state.agents.insert(
            agent_id.to_string(),
            AgentRecord {
                id: agent_id.to_string(),
                enrolled_at: stamp.clone(),
                last_seen: stamp,
            },
        );
        // Tokens first: if the agents file then fails, the token is spent but the agent can be
        // given a new one; the other order could let one token enroll two agents.
        let saved = self
            .save_tokens(&state)
            .and_then(|()| self.save_agents(&state));
        if let Err(e) = saved {
            state.agents.remove(agent_id);
            state.tokens[index].used_by = None;
            state.tokens[index].used_at = None;
            return Err(AdmitError::Internal(e));
        }
        Ok(Admission::Enrolled)
    }

    /// Whether `agent_id` is enrolled.
    pub fn is_enrolled(&self, agent_id: &str) -> bool {
        self.lock().agents.contains_key(agent_id)
    }

    /// Records that `agent_id` was heard from now; with `persist`, also writes `agents.json`
    /// (failures are logged, not returned: this is bookkeeping).
    pub fn touch(&self, agent_id: &str, persist: bool) {
        let mut state = self.lock();
        let Some(agent) = state.agents.get_mut(agent_id) else {
            return;
        };
        agent.last_seen = format_rfc3339(now_unix());
        if persist {
            if let Err(e) = self.save_agents(&state) {
                tracing::warn!(agent_id, "cannot persist last_seen: {e:#}");
            }
        }
    }

    /// Every enrolled agent, ordered by id.
    pub fn agents(&self) -> Vec<AgentRecord> {
        self.lock().agents.values().cloned().collect()
    }

    /// One enrolled agent.
    pub fn agent(&self, agent_id: &str) -> Option<AgentRecord> {
        self.lock().agents.get(agent_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn tokens_enroll_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let token = reg.issue_token(Some(3600)).unwrap();
        assert_eq!(token.len(), 43);
        let refused = |r: Result<Admission, AdmitError>| match r {
            Err(AdmitError::Refused(x)) => x,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(refused(reg.admit("a", None)), Refusal::TokenMissing);
        assert_eq!(refused(reg.admit("a", Some("nope"))), Refusal::TokenInvalid);
        assert_eq!(reg.admit("a", Some(&token)).unwrap(), Admission::Enrolled);
        assert_eq!(reg.admit("a", None).unwrap(), Admission::Known);
        assert_eq!(refused(reg.admit("b", Some(&token))), Refusal::TokenUsed);
        let expired = reg.issue_token(Some(0)).unwrap();
        assert_eq!(
            refused(reg.admit("b", Some(&expired))),
            Refusal::TokenExpired
        );
        for f in [AGENTS_FILE, TOKENS_FILE] {
            let meta = std::fs::metadata(dir.path().join(f)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(!text.contains(&token), "{f} holds only hashes");
        }
        drop(reg);
        let reg = Registry::open(dir.path()).unwrap();
        assert!(reg.is_enrolled("a"));
        assert_eq!(refused(reg.admit("b", Some(&token))), Refusal::TokenUsed);
        assert_eq!(reg.agents().len(), 1);
    }
}
