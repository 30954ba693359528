//! The checked-in JSON Schema files are exactly what the types generate.

use std::path::Path;

#[test]
fn the_checked_in_schema_files_are_the_generated_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for (file, generated) in bridge_protocol::schema::files() {
        let path = root.join(file);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} is not what the protocol types generate: run `cargo xtask schema` (and commit it)",
            path.display()
        );
    }
}
