//! Per-run limits as they travel: what a task asks for, and what a run got.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One value for each per-run limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Fuel units (roughly one per executed wasm instruction).
    pub fuel: u64,
    /// Linear memory, in bytes, summed over the module's memories.
    pub memory_bytes: u64,
    /// Wall-clock time, in milliseconds.
    pub timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr; the rest is counted and dropped.
    pub output_bytes: u64,
}

impl Limits {
    /// The defaults a run gets when neither the task nor the handler asks for anything.
    pub const DEFAULTS: Limits = Limits {
        fuel: 1_000_000_000,
        memory_bytes: 64 << 20,
        timeout_ms: 10_000,
        output_bytes: 1 << 20,
    };

    /// The local maximums an agent allows unless its config says otherwise.
    pub const MAXIMUMS: Limits = Limits {
        fuel: 50_000_000_000,
        memory_bytes: 512 << 20,
        timeout_ms: 15 * 60 * 1000,
        output_bytes: 16 << 20,
    };
}

/// What a task (or a handler's signed claims) asks for; `None` means "the default".
///
/// On the wire it is an object whose fields are all optional; anything else (an array, which
/// serde would otherwise read as the fields in order) is refused, and so is a limit of 0: a
/// limit left out means the default, a present one means itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct LimitRequest {
    /// Requested fuel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub fuel: Option<u64>,
    /// Requested linear memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_bytes: Option<u64>,
    /// Requested wall-clock timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_ms: Option<u64>,
    /// Requested output cap in bytes (per stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub output_bytes: Option<u64>,
}

impl<'de> Deserialize<'de> for LimitRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, Visitor};

        /// The same fields, read the derived way once we know it is an object.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[serde(default)]
            fuel: Option<u64>,
            #[serde(default)]
            memory_bytes: Option<u64>,
            #[serde(default)]
            timeout_ms: Option<u64>,
            #[serde(default)]
            output_bytes: Option<u64>,
        }

        struct ObjectOnly;

        impl<'de> Visitor<'de> for ObjectOnly {
            type Value = Fields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of limits (fuel, memory_bytes, timeout_ms, output_bytes)")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Fields, A::Error> {
                Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        let f = deserializer.deserialize_map(ObjectOnly)?;
        for (name, value) in [
            ("fuel", f.fuel),
            ("memory_bytes", f.memory_bytes),
            ("timeout_ms", f.timeout_ms),
            ("output_bytes", f.output_bytes),
        ] {
            if value == Some(0) {
                return Err(D::Error::custom(format!(
                    "limit `{name}` is 0; a limit must be at least 1 (leave it out for the default)"
                )));
            }
        }
        Ok(LimitRequest {
            fuel: f.fuel,
            memory_bytes: f.memory_bytes,
            timeout_ms: f.timeout_ms,
            output_bytes: f.output_bytes,
        })
    }
}

/// The limits a run got, and which of them were lowered from what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppliedLimits {
    /// The values in force.
    #[serde(flatten)]
    pub limits: Limits,
    /// Names of the limits (`fuel`, `memory_bytes`, `timeout_ms`, `output_bytes`) that were
    /// clamped below the request, by the local maximum or by the handler's signed capabilities.
    pub clamped: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_request_is_an_object_of_positive_limits() {
        let r: LimitRequest = serde_json::from_str(r#"{"fuel":5,"timeout_ms":1}"#).unwrap();
        assert_eq!(
            (r.fuel, r.timeout_ms, r.memory_bytes),
            (Some(5), Some(1), None)
        );
        let empty: LimitRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, LimitRequest::default());
        let seq = serde_json::from_str::<LimitRequest>("[5]").unwrap_err();
        assert!(seq.to_string().contains("an object of limits"), "{seq}");
        for name in ["fuel", "memory_bytes", "timeout_ms", "output_bytes"] {
            let e =
                serde_json::from_str::<LimitRequest>(&format!(r#"{{"{name}":0}}"#)).unwrap_err();
            assert!(e.to_string().contains(&format!("`{name}` is 0")), "{e}");
        }
        assert!(serde_json::from_str::<LimitRequest>(r#"{"fuel":1,"cpu":2}"#).is_err());
        // What serializes reads back.
        let r = LimitRequest {
            fuel: Some(7),
            ..LimitRequest::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"fuel":7}"#);
        assert_eq!(serde_json::from_str::<LimitRequest>(&text).unwrap(), r);
    }
}
