//! Resource limits for one run: what a task may ask for, what the agent allows, and the one
//! resolution ([`Bounds::resolve`]) that turns the two into the limits applied, for WASM and shell.
//!
//! Every limit has a **default** (used when nobody asks for anything) and a **ceiling**. A request
//! above the ceiling is clamped, never refused, and the result of the run names each limit that
//! was clamped (`limits.clamped`), so the platform can see it; a default above the ceiling is
//! lowered silently. A request of zero asks for nothing (the wire refuses it anyway).
//!
//! - A WASM run ([`Bounds::wasm`]): the defaults and **local maximums** of the operator's config
//!   ([`LimitPolicy`]), each maximum lowered further by a signed handler's declared
//!   capabilities (see `trust::grant`).
//! - A shell run ([`Bounds::shell`]): its rule's `timeout_ms` and `output_bytes` are both default
//!   and ceiling (a task may ask for less, never more); fuel and memory do not apply (reported
//!   as 0, a request for them is ignored).
//!
//! What a signed handler's claims refuse outright (an environment variable, a directory) is
//! appended to `clamped` after the limits, by the sandbox (see `sandbox::RunSpec::denied`).

pub use bridge_protocol::{AppliedLimits, LimitRequest, Limits};

/// The agent's local limit policy: defaults and maximums (from the config's `[sandbox]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitPolicy {
    /// Used for any limit nobody asks for.
    pub defaults: Limits,
    /// Hard ceilings: requests above them are clamped.
    pub maximums: Limits,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        LimitPolicy {
            defaults: Limits::DEFAULTS,
            maximums: Limits::MAXIMUMS,
        }
    }
}

impl LimitPolicy {
    /// Checks that every default lies within its maximum and nothing is zero.
    pub fn validate(&self) -> Result<(), String> {
        for (name, d, m) in self.pairs() {
            if m == 0 {
                return Err(format!(
                    "sandbox maximum `{name}` must be greater than zero"
                ));
            }
            if d == 0 || d > m {
                return Err(format!(
                    "sandbox default `{name}` = {d} must be between 1 and its maximum {m}"
                ));
            }
        }
        Ok(())
    }

    fn pairs(&self) -> [(&'static str, u64, u64); 4] {
        let (d, m) = (self.defaults, self.maximums);
        [
            ("fuel", d.fuel, m.fuel),
            ("memory_bytes", d.memory_bytes, m.memory_bytes),
            ("timeout_ms", d.timeout_ms, m.timeout_ms),
            ("output_bytes", d.output_bytes, m.output_bytes),
        ]
    }
}

/// One limit's bounds for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The value when the task asks for nothing (lowered to `ceiling` if above it).
    pub default: u64,
    /// The most a request gets.
    pub ceiling: u64,
}

/// The bounds of a run's four limits. `None`: the limit does not apply to this kind of run (a
/// shell command has no fuel or linear memory): it is reported as 0 and a request is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Fuel units.
    pub fuel: Option<Bound>,
    /// Linear memory, in bytes.
    pub memory_bytes: Option<Bound>,
    /// Wall-clock time, in milliseconds.
    pub timeout_ms: Option<Bound>,
    /// Bytes kept of each output stream.
    pub output_bytes: Option<Bound>,
}

impl Bounds {
    /// A WASM run's bounds: the policy's defaults, and its maximums lowered by `ceiling` (a
    /// signed handler's declared capabilities, capped by its key's `max`) where it says less.
    pub fn wasm(policy: &LimitPolicy, ceiling: Option<&LimitRequest>) -> Bounds {
        let c = ceiling.copied().unwrap_or_default();
        let (d, m) = (policy.defaults, policy.maximums);
        let bound = |default: u64, cap: Option<u64>, max: u64| {
            Some(Bound {
                default,
                ceiling: cap.map_or(max, |c| c.min(max)),
            })
        };
        Bounds {
            fuel: bound(d.fuel, c.fuel, m.fuel),
            memory_bytes: bound(d.memory_bytes, c.memory_bytes, m.memory_bytes),
            timeout_ms: bound(d.timeout_ms, c.timeout_ms, m.timeout_ms),
            output_bytes: bound(d.output_bytes, c.output_bytes, m.output_bytes),
        }
    }

    /// A shell run's bounds: the rule's time and output caps, each both default and ceiling.
    pub fn shell(timeout_ms: u64, output_bytes: u64) -> Bounds {
        let fixed = |v| {
            Some(Bound {
                default: v,
                ceiling: v,
            })
        };
        Bounds {
            fuel: None,
            memory_bytes: None,
            timeout_ms: fixed(timeout_ms),
            output_bytes: fixed(output_bytes),
        }
    }

    /// Resolves a task's request: each limit is `min(request or default, ceiling)`, and
    /// `clamped` names, in the order fuel, memory, time, output, each one asked above its
    /// ceiling.
    pub fn resolve(&self, request: &LimitRequest) -> AppliedLimits {
        let mut clamped = Vec::new();
        let mut pick = |name: &str, bound: Option<Bound>, asked: Option<u64>| {
            let Some(b) = bound else { return 0 };
            let asked = asked.filter(|v| *v > 0);
            let want = asked.unwrap_or(b.default);
            if want <= b.ceiling {
                return want;
            }
            // Only a request is clamped; a default above a handler's ceiling is just the ceiling.
            if asked.is_some() {
                clamped.push(name.to_string());
            }
            b.ceiling
        };
        let limits = Limits {
            fuel: pick("fuel", self.fuel, request.fuel),
            memory_bytes: pick("memory_bytes", self.memory_bytes, request.memory_bytes),
            timeout_ms: pick("timeout_ms", self.timeout_ms, request.timeout_ms),
            output_bytes: pick("output_bytes", self.output_bytes, request.output_bytes),
        };
        AppliedLimits { limits, clamped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_nothing_is_asked() {
        let applied = Bounds::wasm(&LimitPolicy::default(), None).resolve(&LimitRequest::default());
        assert_eq!(applied.limits, Limits::DEFAULTS);
        assert!(applied.clamped.is_empty());
    }

    #[test]
    fn requests_above_the_maximum_are_clamped_and_reported() {
        let policy = LimitPolicy::default();
        let req = LimitRequest {
            fuel: Some(u64::MAX),
            memory_bytes: Some(1 << 20),
            timeout_ms: Some(10 * 60 * 60 * 1000),
            output_bytes: None,
        };
        let applied = Bounds::wasm(&policy, None).resolve(&req);
        assert_eq!(applied.limits.fuel, Limits::MAXIMUMS.fuel);
        assert_eq!(applied.limits.memory_bytes, 1 << 20);
        assert_eq!(applied.limits.timeout_ms, Limits::MAXIMUMS.timeout_ms);
        assert_eq!(applied.limits.output_bytes, Limits::DEFAULTS.output_bytes);
        assert_eq!(applied.clamped, vec!["fuel", "timeout_ms"]);
    }

    #[test]
    fn a_ceiling_bounds_requests_and_defaults() {
        let policy = LimitPolicy::default();
        let ceiling = LimitRequest {
            fuel: Some(1000),
            memory_bytes: Some(1 << 20),
            ..Default::default()
        };
        let req = LimitRequest {
            fuel: Some(5000),
            ..Default::default()
        };
        let applied = Bounds::wasm(&policy, Some(&ceiling)).resolve(&req);
        assert_eq!(applied.limits.fuel, 1000);
        // The default (64 MiB) is above the ceiling: bounded, but not reported as a clamp.
        assert_eq!(applied.limits.memory_bytes, 1 << 20);
        assert_eq!(applied.clamped, vec!["fuel"]);
    }

    #[test]
    fn zero_means_default() {
        let req = LimitRequest {
            fuel: Some(0),
            ..Default::default()
        };
        let applied = Bounds::wasm(&LimitPolicy::default(), None).resolve(&req);
        assert_eq!(applied.limits.fuel, Limits::DEFAULTS.fuel);
    }

    #[test]
    fn a_shell_rule_bounds_time_and_output_only() {
        let bounds = Bounds::shell(10_000, 4096);
        let nothing = bounds.resolve(&LimitRequest::default());
        assert_eq!(
            nothing.limits,
            Limits {
                fuel: 0,
                memory_bytes: 0,
                timeout_ms: 10_000,
                output_bytes: 4096
            }
        );
        assert!(nothing.clamped.is_empty());
        let less = bounds.resolve(&LimitRequest {
            timeout_ms: Some(500),
            output_bytes: Some(4096),
            ..Default::default()
        });
        assert_eq!(
            (less.limits.timeout_ms, less.limits.output_bytes),
            (500, 4096)
        );
        assert!(
            less.clamped.is_empty(),
            "asking the rule's value is no clamp"
        );
        let more = bounds.resolve(&LimitRequest {
            fuel: Some(5),
            memory_bytes: Some(1 << 20),
            timeout_ms: Some(20_000),
            output_bytes: Some(1 << 20),
        });
        assert_eq!(more.limits.timeout_ms, 10_000);
        assert_eq!(more.limits.output_bytes, 4096);
        assert_eq!((more.limits.fuel, more.limits.memory_bytes), (0, 0));
        assert_eq!(
            more.clamped,
            vec!["timeout_ms", "output_bytes"],
            "fuel and memory do not apply to a shell run: ignored, not clamped"
        );
    }

    #[test]
    fn validate_rejects_defaults_above_maximums() {
        let mut policy = LimitPolicy::default();
        policy.defaults.fuel = policy.maximums.fuel + 1;
        assert!(policy.validate().unwrap_err().contains("fuel"));
        policy = LimitPolicy::default();
        policy.maximums.timeout_ms = 0;
        assert!(policy.validate().is_err());
    }
}
