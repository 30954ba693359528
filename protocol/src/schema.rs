//! The JSON Schema (draft 2020-12) of every message, generated from the types of this crate.
//!
//! `cargo xtask schema` writes [`agent_message`] to `protocol/schema/agent-message.schema.json`
//! and [`platform_message`] to `protocol/schema/platform-message.schema.json`; a test fails when
//! the checked-in files differ from what these functions generate. The schema is of version 2.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::{AgentMessage, PlatformMessage};

/// Where the schema files live, relative to the repository root.
pub const AGENT_FILE: &str = "protocol/schema/agent-message.schema.json";
/// See [`AGENT_FILE`].
pub const PLATFORM_FILE: &str = "protocol/schema/platform-message.schema.json";

/// The messages whose body is a struct of its own, by `type` tag, and the name of that struct:
/// its schema goes to `$defs` under that name (so generated types name it), and the message
/// refers to it.
const NAMED_BODIES: &[(&str, &str)] = &[
    ("status", "StatusReport"),
    ("run", "RunRequest"),
    ("error", "ErrorBody"),
    ("update_status", "UpdateStatus"),
];

fn generate<T: JsonSchema>(id: &str) -> String {
    let mut schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>();
    name_bodies(schema.as_object_mut().expect("a root schema is an object"));
    let mut schema = schema.to_value();
    drop_numeric_formats(&mut schema);
    schema
        .as_object_mut()
        .expect("a root schema is an object")
        .insert(
            "$id".into(),
            format!(
                "https://bridge.invalid/protocol/v{}/{id}",
                crate::PROTOCOL_VERSION
            )
            .into(),
        );
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}

/// Moves each message body of [`NAMED_BODIES`], which the generator writes inline next to the
/// `type` tag, to `$defs`: the message becomes `allOf` the body (a `$ref`) and its tag, with
/// `unevaluatedProperties: false` (the body's own schema then admits any other property, so
/// that the tag is not refused through it).
fn name_bodies(root: &mut Map<String, Value>) {
    let mut defs = Vec::new();
    let variants = root.get_mut("oneOf").and_then(Value::as_array_mut);
    for variant in variants.into_iter().flatten() {
        let tag = variant
            .pointer("/properties/type/const")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some((_, name)) = NAMED_BODIES.iter().find(|(t, _)| *t == tag) else {
            continue;
        };
        let mut body = variant.take();
        let b = body.as_object_mut().expect("a message schema is an object");
        let tag_schema = b
            .get_mut("properties")
            .and_then(Value::as_object_mut)
            .and_then(|p| p.remove("type"))
            .expect("a tagged message has a `type` property");
        if let Some(required) = b.get_mut("required").and_then(Value::as_array_mut) {
            required.retain(|r| r != "type");
        }
        b.remove("additionalProperties");
        *variant = json!({
            "description": b.get("description").cloned().unwrap_or_default(),
            "type": "object",
            "allOf": [
                { "$ref": format!("#/$defs/{name}") },
                {
                    "type": "object",
                    "properties": { "type": tag_schema },
                    "required": ["type"],
                },
            ],
            "unevaluatedProperties": false,
        });
        defs.push((name.to_string(), body));
    }
    if let Some(all) = root.get_mut("$defs").and_then(Value::as_object_mut) {
        all.extend(defs);
    }
}

/// Removes the `format`s the generator gives Rust's number types (`uint64`, `int32`,
/// `double`…): they are no JSON Schema format, and strict validators refuse unknown ones. The
/// bounds that matter stay (`minimum: 0` of the unsigned types).
fn drop_numeric_formats(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let numeric = map.get("format").and_then(Value::as_str).is_some_and(|f| {
                ["int", "uint", "float", "double"]
                    .iter()
                    .any(|p| f.starts_with(p))
            });
            if numeric {
                map.remove("format");
            }
            map.values_mut().for_each(drop_numeric_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_numeric_formats),
        _ => {}
    }
}

/// The schema of the messages the agent sends, as the checked-in file holds it.
pub fn agent_message() -> String {
    generate::<AgentMessage>("agent-message.schema.json")
}

/// The schema of the messages the platform sends, as the checked-in file holds it.
pub fn platform_message() -> String {
    generate::<PlatformMessage>("platform-message.schema.json")
}

/// Both files: (path relative to the repository root, contents).
pub fn files() -> [(&'static str, String); 2] {
    [
        (AGENT_FILE, agent_message()),
        (PLATFORM_FILE, platform_message()),
    ]
}
