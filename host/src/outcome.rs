//! How a run ended, in a form the platform, the CLI and the tests all read the same way.
//!
//! The types live in [`bridge_protocol`] (they travel on the wire); they are re-exported here
//! because the sandbox produces them.

pub use bridge_protocol::{RunResult, Status, Truncation};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_serialize_in_snake_case() {
        for s in Status::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn refused_results_carry_the_reason() {
        let r = RunResult::refused(Status::InvalidModule, "not wasm");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "invalid_module");
        assert_eq!(v["error"], "not wasm");
        assert!(v["output"].is_null());
        assert!(v.get("reason").is_none());
    }
}
