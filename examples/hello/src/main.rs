//! The smallest bridge handler: `{"name": "Ada"}` → `{"greeting": "Hello, Ada!"}`.
//!
//! Input `null` (a task without input) or `{}` greets the world.

use bridge_guest::{handler, Result};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    name: Option<String>,
}
#[derive(Serialize)]
struct Reply {
    greeting: String,
}

#[handler]
fn hello(input: Input) -> Result<Reply> {
    let name = input.name.unwrap_or_else(|| "world".into());
    Ok(Reply {
        greeting: format!("Hello, {name}!"),
    })
}
