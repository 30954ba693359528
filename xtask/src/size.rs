//! `cargo xtask size`: what the agent's binary weighs, whole, gzipped, and by ELF section.
//!
//! ```text
//! cargo xtask size [--bin-dir DIR]
//! ```
//!
//! Without `--bin-dir` it builds `target/release/bridge-daemon` first. The file is copied and
//! stripped (`strip`, a no-op on a release build, whose profile strips already; a baseline built
//! with symbols is measured as it would ship), compressed with `gzip -9` (what the platform
//! serves), and its sections are read with `size -A`. `cargo xtask bench` runs the same report
//! for the baseline build and the current one; the figures go to its summary.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use bridge_testkit::figures;

/// The section groups reported, in order: a name for people and the sections it sums.
const GROUPS: [(&str, &[&str]); 5] = [
    ("code (.text)", &[".text"]),
    (
        "unwind tables (.eh_frame, .eh_frame_hdr, .gcc_except_table)",
        &[".eh_frame", ".eh_frame_hdr", ".gcc_except_table"],
    ),
    ("constants (.rodata)", &[".rodata"]),
    (
        "relocations of the position-independent executable (.rela.dyn)",
        &[".rela.dyn"],
    ),
    ("relocated constants (.data.rel.ro)", &[".data.rel.ro"]),
];

/// `cargo xtask size [--bin-dir DIR]`.
pub fn command(root: &Path, rest: &[String], build: impl Fn() -> Result<()>) -> Result<()> {
    let dir = match rest {
        [] => {
            build()?;
            root.join("target/release")
        }
        [flag, dir] if flag == "--bin-dir" => dir.into(),
        _ => bail!("usage: cargo xtask size [--bin-dir DIR]"),
    };
    report(&dir)
}

/// Measures `DIR/bridge-daemon`, prints the report and records its figures.
pub fn report(dir: &Path) -> Result<()> {
    let binary = dir.join("bridge-daemon");
    if !binary.is_file() {
        bail!("{} is missing", binary.display());
    }
    let work = std::env::temp_dir().join(format!("bridge-size-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let stripped = work.join("bridge-daemon");
    std::fs::copy(&binary, &stripped).with_context(|| format!("copying {}", binary.display()))?;
    let result = measure(&binary, &stripped);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn measure(binary: &Path, stripped: &Path) -> Result<()> {
    let status = Command::new("strip")
        .arg(stripped)
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip {} failed: {status}", stripped.display());
    }
    let bytes = std::fs::metadata(stripped)?.len();
    let gzip = Command::new("gzip")
        .args(["-9", "-c"])
        .arg(stripped)
        .stderr(Stdio::inherit())
        .output()
        .context("running gzip")?;
    if !gzip.status.success() {
        bail!("gzip -9 {} failed: {}", stripped.display(), gzip.status);
    }
    let gzipped = gzip.stdout.len() as u64;
    let sections = sections(stripped)?;

    println!("{}", binary.display());
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    println!("  {:<66} {:>10}  ({bytes} B)", "stripped", mb(bytes));
    println!("  {:<66} {:>10}  ({gzipped} B)", "gzip -9", mb(gzipped));
    let mut counted = 0;
    for (name, members) in GROUPS {
        let sum: u64 = sections
            .iter()
            .filter(|(s, _)| members.contains(&s.as_str()))
            .map(|(_, b)| b)
            .sum();
        counted += sum;
        println!("  {name:<66} {:>10}", mb(sum));
    }
    let loaded: u64 = sections.iter().map(|(_, b)| b).sum();
    println!(
        "  {:<66} {:>10}",
        "other sections",
        mb(loaded.saturating_sub(counted))
    );
    figures::record("size.stripped_bytes", bytes as f64, "B");
    figures::record("size.gzip_bytes", gzipped as f64, "B");
    let text = sections
        .iter()
        .filter(|(s, _)| s == ".text")
        .map(|(_, b)| b)
        .sum::<u64>();
    figures::record("size.text_bytes", text as f64, "B");
    Ok(())
}

/// The sections of an ELF file and their sizes, from `size -A`.
fn sections(file: &Path) -> Result<Vec<(String, u64)>> {
    let out = Command::new("size")
        .arg("-A")
        .arg(file)
        .output()
        .context("running size -A (binutils)")?;
    if !out.status.success() {
        bail!("size -A {} failed: {}", file.display(), out.status);
    }
    let text = String::from_utf8(out.stdout).context("size -A printed something not UTF-8")?;
    Ok(parse_sections(&text))
}

/// Parses `size -A` output: a header, then `name size addr` lines, then `Total`.
fn parse_sections(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let size = fields.next()?.parse().ok()?;
            (name.starts_with('.')).then(|| (name.to_string(), size))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sections_of_size_a() {
        let text = "target/release/bridge-daemon  :\n\
                    section               size      addr\n\
                    .interp                 28       792\n\
                    .text              9876543   1234567\n\
                    .eh_frame           123456   4567890\n\
                    Total             10000027\n\n\n";
        assert_eq!(
            parse_sections(text),
            vec![
                (".interp".to_string(), 28),
                (".text".to_string(), 9_876_543),
                (".eh_frame".to_string(), 123_456),
            ]
        );
    }
}
