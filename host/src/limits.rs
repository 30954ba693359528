//! Resource limits for one handler run: what a task may ask for, what the agent allows, and the
//! arithmetic that turns the two into the limits actually applied.
//!
//! Every limit has a **default** (used when nobody asks for anything) and a **local maximum** (set
//! by the agent's operator in its config). A request above the maximum is clamped, never refused,
//! and the result of the run names each limit that was clamped, so the platform can see it.
//! Signed handlers add a third bound (the capabilities their signature claims); see `signing`.

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

    /// Resolves a task's request against this policy and an optional ceiling (a signed handler's
    /// declared capabilities). Each limit is `min(request or default, ceiling, maximum)`; a
    /// request of zero is treated as "the default".
    pub fn apply(&self, request: &LimitRequest, ceiling: Option<&LimitRequest>) -> AppliedLimits {
        let mut clamped = Vec::new();
        let mut pick =
            |name: &str, asked: Option<u64>, default: u64, cap: Option<u64>, max: u64| {
                let asked = asked.filter(|v| *v > 0);
                let want = asked.unwrap_or(default);
                let bound = cap.map_or(max, |c| c.min(max));
                if want > bound {
                    // Only report a clamp when somebody actually asked for more; a default above a
                    // handler's declared ceiling is just the ceiling.
                    if asked.is_some() {
                        clamped.push(name.to_string());
                    }
                    bound
                } else {
                    want
                }
            };
        let c = ceiling.copied().unwrap_or_default();
        let (d, m) = (self.defaults, self.maximums);
        let limits = Limits {
            fuel: pick("fuel", request.fuel, d.fuel, c.fuel, m.fuel),
            memory_bytes: pick(
                "memory_bytes",
                request.memory_bytes,
                d.memory_bytes,
                c.memory_bytes,
                m.memory_bytes,
            ),
            timeout_ms: pick(
                "timeout_ms",
                request.timeout_ms,
                d.timeout_ms,
                c.timeout_ms,
                m.timeout_ms,
            ),
            output_bytes: pick(
                "output_bytes",
                request.output_bytes,
                d.output_bytes,
                c.output_bytes,
                m.output_bytes,
            ),
        };
        AppliedLimits { limits, clamped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_nothing_is_asked() {
        let applied = LimitPolicy::default().apply(&LimitRequest::default(), None);
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
        let applied = policy.apply(&req, None);
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
        let applied = policy.apply(&req, Some(&ceiling));
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
        let applied = LimitPolicy::default().apply(&req, None);
        assert_eq!(applied.limits.fuel, Limits::DEFAULTS.fuel);
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
