//! `cargo xtask deps`: the `use` edges between the modules of each crate (host, platform), read
//! from the source, and a failure if any modules import each other in a circle.
//!
//! An edge is drawn between siblings: `agent/task.rs` naming `crate::journal::Accept` is an edge
//! `agent → journal` among the crate's top-level modules; naming `super::order::Turn` is an
//! edge `task → order` among `agent`'s modules. A child naming its parent (`super::Agent`) or
//! a parent its child is how Rust modules are built, not a dependency between concepts. Test code
//! (`#[cfg(test)]` modules and files) is left out: tests may reach across a crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The crates whose modules are checked.
const CRATES: &[(&str, &str)] = &[
    ("bridge-host", "host/src"),
    ("bridge-platform", "platform/src"),
];

type ModPath = Vec<String>;

pub fn check(root: &Path) -> Result<()> {
    let mut circles = Vec::new();
    for (name, dir) in CRATES {
        let files = without_test_modules(sources(&root.join(dir))?)?;
        let modules: BTreeSet<ModPath> = files.iter().map(|(m, _)| m.clone()).collect();
        // Per parent module: its children's edges.
        let mut graphs: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for (module, path) in &files {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            for target in references(module, &code_of(&text)) {
                let target = longest_module(&modules, &target);
                let common = module
                    .iter()
                    .zip(&target)
                    .take_while(|(a, b)| a == b)
                    .count();
                if common == module.len() || common == target.len() {
                    continue; // itself, an ancestor or a descendant
                }
                graphs
                    .entry(module[..common].to_vec())
                    .or_default()
                    .entry(module[common].clone())
                    .or_default()
                    .insert(target[common].clone());
            }
        }
        for (parent, graph) in &graphs {
            let label = if parent.is_empty() {
                name.to_string()
            } else {
                format!("{name}::{}", parent.join("::"))
            };
            println!("{label}");
            for (from, to) in graph {
                let to: Vec<&str> = to.iter().map(String::as_str).collect();
                println!("  {from} → {}", to.join(", "));
            }
            for circle in circles_in(graph) {
                circles.push(format!("{label}: {{{}}}", circle.join(", ")));
            }
        }
    }
    if !circles.is_empty() {
        bail!(
            "modules that import each other in a circle:\n  {}",
            circles.join("\n  ")
        );
    }
    println!("no import cycles");
    Ok(())
}

/// Every `.rs` file under `dir` with its module path (`agent/task.rs` → `agent::task`).
fn sources(dir: &Path) -> Result<Vec<(ModPath, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("main.rs") {
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .expect("under dir")
                .with_extension("");
            let mut module: ModPath = rel
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            out.push((module, path));
        }
    }
    out.sort();
    Ok(out)
}

/// `files` without the modules their parent declares `#[cfg(test)] mod name;`.
fn without_test_modules(files: Vec<(ModPath, PathBuf)>) -> Result<Vec<(ModPath, PathBuf)>> {
    let mut tests = BTreeSet::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path)?;
        let mut lines = text.lines().map(str::trim);
        while let Some(line) = lines.next() {
            if line != "#[cfg(test)]" {
                continue;
            }
            let next = lines.next().unwrap_or_default();
            if let Some(name) = next
                .strip_prefix("mod ")
                .or_else(|| next.strip_prefix("pub mod "))
                .and_then(|n| n.strip_suffix(';'))
            {
                let mut child = module.clone();
                child.push(name.to_string());
                tests.insert(child);
            }
        }
    }
    Ok(files
        .into_iter()
        .filter(|(m, _)| !tests.contains(m))
        .collect())
}

/// The text without comments (line comments; doc links are not imports) and without its
/// `#[cfg(test)] mod tests { … }` (by convention, at the end of the file).
fn code_of(text: &str) -> String {
    let mut code = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        code.push(match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        });
    }
    code.join("\n")
}

/// The module paths `code` in `module` names through `crate::` and `super::` (`super::super::`
/// too), including the items of `use crate::{a::X, b::{Y, Z}}` groups.
fn references(module: &ModPath, code: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // the second `super::` of `super::super::`, or an identifier
            }
            let mut base = if prefix == "crate::" {
                Vec::new()
            } else {
                parent_of(module)
            };
            let mut path = rest;
            while let Some(next) = path.strip_prefix("super::") {
                base = parent_of(&base);
                path = next;
            }
            group_items(&base, path, &mut out);
        }
    }
    out
}

/// The paths `path` names after `base`: itself, or each item of a `{…}` group (nested groups
/// too).
fn group_items(base: &ModPath, path: &str, out: &mut Vec<ModPath>) {
    let Some(group) = path.strip_prefix('{') else {
        out.push(join(base, path));
        return;
    };
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                item(base, &group[start..i], out);
                return;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                item(base, &group[start..i], out);
                start = i + 1;
            }
            _ => {}
        }
    }
}

/// One item of a group: `a::b::X` or `a::{X, Y}`.
fn item(base: &ModPath, text: &str, out: &mut Vec<ModPath>) {
    let text = text.trim();
    match text.find("::{") {
        Some(i) => group_items(&join(base, &text[..i]), &text[i + 2..], out),
        None => out.push(join(base, text)),
    }
}

fn parent_of(module: &ModPath) -> ModPath {
    let mut p = module.clone();
    p.pop();
    p
}

/// `base` followed by the leading `a::b::c` of `path`.
fn join(base: &ModPath, path: &str) -> ModPath {
    let mut out = base.clone();
    for seg in path.split("::") {
        let ident: String = seg
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() || ident == "self" {
            break;
        }
        out.push(ident.clone());
        if ident.len() != seg.len() {
            break;
        }
    }
    out
}

/// The longest prefix of `path` that is a module.
fn longest_module(modules: &BTreeSet<ModPath>, path: &ModPath) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_default()
}

/// The circles in `graph` (its strongly connected components of more than one module).
fn circles_in(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let nodes: Vec<&String> = graph.keys().collect();
    let reaches = |from: &String, to: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            for next in graph.get(n).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next) {
                    stack.push(next);
                }
            }
        }
        false
    };
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for a in &nodes {
        if done.contains(*a) {
            continue;
        }
        let mut circle: Vec<String> = nodes
            .iter()
            .filter(|b| *b != a && reaches(a, b) && reaches(b, a))
            .map(|b| b.to_string())
            .collect();
        if !circle.is_empty() {
            circle.insert(0, a.to_string());
            done.extend(circle.iter().cloned());
            out.push(circle);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> ModPath {
        p.split("::").map(str::to_string).collect()
    }

    #[test]
    fn paths_groups_and_parents_are_read() {
        let module = path("agent::task");
        let code = "use crate::{journal::{Accept, x::Y}, outbox};\n\
                    use super::order::Turn; let a = super::super::link::Peer;\n\
                    fn f() { crate::memory::trim(); } // crate::not_this";
        let found = references(&module, &code_of(code));
        let want = [
            "journal::Accept",
            "journal::x::Y",
            "outbox",
            "memory::trim",
            "agent::order::Turn",
            "link::Peer",
        ];
        for w in want {
            assert!(found.contains(&path(w)), "{w} in {found:?}");
        }
        assert!(!found.iter().any(|p| p.contains(&"not_this".to_string())));
    }

    #[test]
    fn a_circle_is_found_and_a_chain_is_not() {
        let graph = |edges: &[(&str, &str)]| {
            let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                g.entry(a.to_string()).or_default().insert(b.to_string());
            }
            g
        };
        assert!(circles_in(&graph(&[("a", "b"), ("b", "c")])).is_empty());
        let circles = circles_in(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]));
        assert_eq!(circles, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    }
}
