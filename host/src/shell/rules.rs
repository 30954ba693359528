//! Allowlist rules: what an operator allows the platform to run as a shell command, and the
//! checks on the extra arguments a task supplies.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::limits::{Bounds, LimitRequest, Limits};

/// Largest number of extra arguments a rule may allow.
pub const MAX_EXTRA_ARGS: usize = 256;

/// Longest single argument (fixed or extra), in bytes: Linux's `MAX_ARG_STRLEN` (128 KiB)
/// less its terminating NUL. A longer one would make `execve` fail with `E2BIG`.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// Largest command line: the program, the fixed and extra arguments and the rule's
/// environment (`NAME=VALUE`), each counted with its NUL. Well below Linux's limit for both
/// together (a quarter of the stack limit: 2 MiB with the usual 8 MiB).
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

/// One allowlisted command: `[[shell.rules]]` / `rules = [{ … }]` in the agent's config.
///
/// The command line is always `program` + `args` + the task's extra arguments, executed directly
/// (no shell, no expansion, no globbing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellRule {
    /// The name tasks use, like a handler name: `[a-z0-9][a-z0-9._-]{0,63}`.
    pub name: String,
    /// The absolute path of the program.
    pub program: PathBuf,
    /// Fixed arguments, always passed first, after `argv[0]` (the program path).
    #[serde(default)]
    pub args: Vec<String>,
    /// The extra arguments a task may append.
    #[serde(default)]
    pub extra_args: ExtraArgs,
    /// Wall-clock limit, milliseconds (default 10 000; at most the sandbox's built-in maximum).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Bytes kept of stdout and of stderr each (default 1 MiB; at most 16 MiB).
    #[serde(default = "default_output_bytes")]
    pub output_bytes: u64,
    /// The working directory (absolute; default `/`).
    #[serde(default = "default_cwd")]
    pub cwd: PathBuf,
    /// The whole environment of the command; nothing of the agent's environment is inherited.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run as this user (name or numeric uid); needs a root agent.
    #[serde(default)]
    pub user: Option<String>,
    /// Run with this group (name or numeric gid); default: the user's primary group.
    #[serde(default)]
    pub group: Option<String>,
}

/// The extra arguments a rule accepts: how many, and a pattern for each position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraArgs {
    /// At most this many extra arguments (default 0: none).
    #[serde(default)]
    pub max: usize,
    /// One regular expression per position; the last one also covers the positions after it.
    /// Each is matched against the whole argument (anchored for you).
    #[serde(default)]
    pub patterns: Vec<String>,
}

fn default_timeout_ms() -> u64 {
    Limits::DEFAULTS.timeout_ms
}

fn default_output_bytes() -> u64 {
    Limits::DEFAULTS.output_bytes
}

fn default_cwd() -> PathBuf {
    PathBuf::from("/")
}

/// Why a task's extra arguments were refused (nothing was run).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgRefusal {
    /// More extra arguments than the rule allows.
    #[error("{got} extra arguments given; the rule allows at most {max}")]
    TooMany {
        /// What the rule allows.
        max: usize,
        /// What the task gave.
        got: usize,
    },
    /// An argument is longer than [`MAX_ARG_BYTES`].
    #[error("extra argument {index} is {len} bytes long; at most {MAX_ARG_BYTES} are allowed (the kernel's limit for one argument)")]
    TooLong {
        /// Its position among the extra arguments (from 0).
        index: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// The whole command line would exceed [`MAX_COMMAND_BYTES`].
    #[error("the command line would be {total} bytes long (program, arguments and environment); at most {MAX_COMMAND_BYTES} are allowed")]
    CommandTooLong {
        /// Its size in bytes.
        total: usize,
    },
    /// An argument contains a NUL byte.
    #[error("extra argument {index} contains a NUL byte")]
    Nul {
        /// Its position among the extra arguments (from 0).
        index: usize,
    },
    /// An argument does not match its pattern.
    #[error("extra argument {index} {arg:?} does not match the pattern {pattern:?}")]
    Pattern {
        /// Its position among the extra arguments (from 0).
        index: usize,
        /// The argument.
        arg: String,
        /// The pattern it failed, as the rule wrote it.
        pattern: String,
    },
    /// The rule's own pattern does not compile (only for rules that skipped validation).
    #[error("the rule's pattern {pattern:?} is invalid: {error}")]
    BadPattern {
        /// The pattern, as the rule wrote it.
        pattern: String,
        /// The compiler's complaint.
        error: String,
    },
}

/// Compiles one rule pattern, anchored to the whole argument.
fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
}

/// Checks a task's extra arguments against `rule`: the count, NUL bytes, then each argument's
/// pattern. Runs nothing.
pub fn check_args(rule: &ShellRule, args: &[String]) -> Result<(), ArgRefusal> {
    let extra = &rule.extra_args;
    if args.len() > extra.max {
        return Err(ArgRefusal::TooMany {
            max: extra.max,
            got: args.len(),
        });
    }
    if let Some(index) = args.iter().position(|a| a.contains('\0')) {
        return Err(ArgRefusal::Nul { index });
    }
    if let Some((index, a)) = args
        .iter()
        .enumerate()
        .find(|(_, a)| a.len() > MAX_ARG_BYTES)
    {
        return Err(ArgRefusal::TooLong {
            index,
            len: a.len(),
        });
    }
    let total = rule.command_bytes() + args.iter().map(|a| a.len() + 1).sum::<usize>();
    if total > MAX_COMMAND_BYTES {
        return Err(ArgRefusal::CommandTooLong { total });
    }
    for (index, arg) in args.iter().enumerate() {
        let Some(pattern) = extra.patterns.get(index).or(extra.patterns.last()) else {
            // A rule allowing arguments without any pattern is invalid; refuse rather than pass.
            return Err(ArgRefusal::Pattern {
                index,
                arg: arg.clone(),
                pattern: String::new(),
            });
        };
        let re = compile(pattern).map_err(|e| ArgRefusal::BadPattern {
            pattern: pattern.clone(),
            error: e.to_string(),
        })?;
        if !re.is_match(arg) {
            return Err(ArgRefusal::Pattern {
                index,
                arg: arg.clone(),
                pattern: pattern.clone(),
            });
        }
    }
    Ok(())
}

/// Whether `name` is a valid rule name: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

impl ShellRule {
    /// A rule running `program` with no arguments and every default.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> ShellRule {
        ShellRule {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            extra_args: ExtraArgs::default(),
            timeout_ms: default_timeout_ms(),
            output_bytes: default_output_bytes(),
            cwd: default_cwd(),
            env: BTreeMap::new(),
            user: None,
            group: None,
        }
    }

    /// The limits of this rule's runs ([`Bounds::shell`]): its `timeout_ms` and `output_bytes`.
    pub fn bounds(&self) -> Bounds {
        Bounds::shell(self.timeout_ms, self.output_bytes)
    }

    /// This rule as a task's run of it: the task may ask for less time or output than the
    /// rule's, never more. Also returns the names of the limits asked above the rule's, for the
    /// result's `limits.clamped`.
    pub fn limited_to(&self, request: &LimitRequest) -> (ShellRule, Vec<String>) {
        let applied = self.bounds().resolve(request);
        let rule = ShellRule {
            timeout_ms: applied.limits.timeout_ms,
            output_bytes: applied.limits.output_bytes,
            ..self.clone()
        };
        (rule, applied.clamped)
    }

    /// The bytes of the rule's own part of the command line: program, fixed arguments and
    /// environment entries, each with its NUL (see [`MAX_COMMAND_BYTES`]).
    pub fn command_bytes(&self) -> usize {
        self.program.as_os_str().len()
            + 1
            + self.args.iter().map(|a| a.len() + 1).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
    }

    /// The checks that need nothing but the rule itself: name, absolute paths, no NUL anywhere,
    /// environment names, patterns compile, limits within the built-in maximums. Whether the
    /// program exists and the user resolves is checked when the rule runs.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if !valid_name(name) {
            return Err(format!(
                "shell rule name {name:?} must match [a-z0-9][a-z0-9._-]{{0,63}}"
            ));
        }
        let nul = |s: &str| s.contains('\0');
        let program = self.program.to_string_lossy();
        if !self.program.is_absolute() || nul(&program) {
            return Err(format!(
                "shell rule {name:?}: program {program:?} must be an absolute path"
            ));
        }
        let cwd = self.cwd.to_string_lossy();
        if !self.cwd.is_absolute() || nul(&cwd) {
            return Err(format!(
                "shell rule {name:?}: cwd {cwd:?} must be an absolute path"
            ));
        }
        if let Some(i) = self.args.iter().position(|a| nul(a)) {
            return Err(format!(
                "shell rule {name:?}: fixed argument {i} contains a NUL byte"
            ));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || nul(k) || nul(v) {
                return Err(format!(
                    "shell rule {name:?}: invalid environment variable {k:?}"
                ));
            }
        }
        let longest = self
            .args
            .iter()
            .map(String::len)
            .chain(self.env.iter().map(|(k, v)| k.len() + v.len() + 1))
            .chain([self.program.as_os_str().len()])
            .max()
            .unwrap_or(0);
        if longest > MAX_ARG_BYTES {
            return Err(format!(
                "shell rule {name:?}: an argument or environment entry is {longest} bytes long; at most {MAX_ARG_BYTES}"
            ));
        }
        if self.command_bytes() > MAX_COMMAND_BYTES {
            return Err(format!(
                "shell rule {name:?}: its program, arguments and environment take {} bytes; at most {MAX_COMMAND_BYTES}",
                self.command_bytes()
            ));
        }
        let extra = &self.extra_args;
        if extra.max > MAX_EXTRA_ARGS {
            return Err(format!(
                "shell rule {name:?}: extra_args.max is at most {MAX_EXTRA_ARGS}"
            ));
        }
        if extra.max > 0 && extra.patterns.is_empty() {
            return Err(format!(
                "shell rule {name:?}: extra_args.max = {} needs at least one pattern",
                extra.max
            ));
        }
        if extra.patterns.len() > extra.max {
            return Err(format!(
                "shell rule {name:?}: {} patterns for at most {} extra arguments",
                extra.patterns.len(),
                extra.max
            ));
        }
        for p in &extra.patterns {
            compile(p).map_err(|e| format!("shell rule {name:?}: invalid pattern {p:?}: {e}"))?;
        }
        let max = Limits::MAXIMUMS;
        if !(1..=max.timeout_ms).contains(&self.timeout_ms) {
            return Err(format!(
                "shell rule {name:?}: timeout_ms must be between 1 and {}",
                max.timeout_ms
            ));
        }
        if !(1..=max.output_bytes).contains(&self.output_bytes) {
            return Err(format!(
                "shell rule {name:?}: output_bytes must be between 1 and {}",
                max.output_bytes
            ));
        }
        for (key, value) in [("user", &self.user), ("group", &self.group)] {
            if let Some(v) = value {
                if v.is_empty() || nul(v) {
                    return Err(format!("shell rule {name:?}: invalid {key} {v:?}"));
                }
            }
        }
        Ok(())
    }
}

/// The validated rules, by name.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    rules: HashMap<String, ShellRule>,
}

impl Allowlist {
    /// Validates every rule and checks that names are unique.
    pub fn new(rules: impl IntoIterator<Item = ShellRule>) -> Result<Allowlist, String> {
        let mut map = HashMap::new();
        for rule in rules {
            rule.validate()?;
            if map.contains_key(&rule.name) {
                return Err(format!("shell rule {:?} is defined twice", rule.name));
            }
            map.insert(rule.name.clone(), rule);
        }
        Ok(Allowlist { rules: map })
    }

    /// The rule called `name`.
    pub fn get(&self, name: &str) -> Option<&ShellRule> {
        self.rules.get(name)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (the shell fallback is off).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.rules.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(max: usize, patterns: &[&str]) -> ShellRule {
        let mut r = ShellRule::new("t", "/bin/echo");
        r.extra_args = ExtraArgs {
            max,
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        };
        r
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn names_are_like_handler_names() {
        for ok in ["a", "disk-usage", "0.x_y-z", &"a".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn counts_and_nul_are_checked_first() {
        let r = rule(1, &["[a-z]+"]);
        assert_eq!(check_args(&r, &[]), Ok(()));
        assert_eq!(
            check_args(&r, &s(&["a", "b"])),
            Err(ArgRefusal::TooMany { max: 1, got: 2 })
        );
        assert_eq!(
            check_args(&rule(2, &[".*"]), &s(&["ok", "a\0b"])),
            Err(ArgRefusal::Nul { index: 1 })
        );
        let none = ShellRule::new("t", "/bin/true");
        assert!(matches!(
            check_args(&none, &s(&["x"])),
            Err(ArgRefusal::TooMany { max: 0, got: 1 })
        ));
    }

    #[test]
    fn lengths_are_checked_before_patterns() {
        let r = rule(2, &["a*"]);
        let long = "a".repeat(MAX_ARG_BYTES);
        assert_eq!(check_args(&r, std::slice::from_ref(&long)), Ok(()));
        assert_eq!(
            check_args(&r, &[long.clone() + "a"]),
            Err(ArgRefusal::TooLong {
                index: 0,
                len: MAX_ARG_BYTES + 1
            })
        );
        let many = rule(16, &["a*"]);
        let args = vec!["a".repeat(120_000); 9];
        assert!(matches!(
            check_args(&many, &args),
            Err(ArgRefusal::CommandTooLong { total }) if total > MAX_COMMAND_BYTES
        ));
        let mut fixed = rule(0, &[]);
        fixed.args = vec!["x".repeat(MAX_ARG_BYTES + 1)];
        assert!(fixed.validate().unwrap_err().contains("bytes long"));
        fixed.args = vec!["x".repeat(100_000); 11];
        assert!(fixed.validate().unwrap_err().contains("at most 1048576"));
    }

    #[test]
    fn patterns_are_anchored_and_the_last_one_repeats() {
        let r = rule(3, &["-[a-z]", "[0-9]+"]);
        assert_eq!(check_args(&r, &s(&["-v", "1", "22"])), Ok(()));
        // Unanchored in the rule, anchored in effect: no partial matches.
        let err = check_args(&r, &s(&["-v", "1x"])).unwrap_err();
        assert_eq!(
            err,
            ArgRefusal::Pattern {
                index: 1,
                arg: "1x".into(),
                pattern: "[0-9]+".into()
            }
        );
        assert!(check_args(&r, &s(&["-v", "1", "x"])).is_err());
        assert!(check_args(&r, &s(&["x-v"])).is_err());
        // An alternation cannot escape the anchors.
        let alt = rule(1, &["a|b"]);
        assert!(check_args(&alt, &s(&["a"])).is_ok());
        assert!(check_args(&alt, &s(&["ab"])).is_err());
        // A trailing newline is not "the end"; explicit anchors are harmless.
        let path = rule(1, &["^/var/log(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"]);
        for good in ["/var/log", "/var/log/syslog", "/var/log/nginx/access.log.1"] {
            assert!(check_args(&path, &s(&[good])).is_ok(), "{good:?}");
        }
        for bad in [
            "/var/log/syslog\n",
            "/var/log/../../etc",
            "/var/log/.hidden",
            "/var/log/a;id",
            "/var/log/$(id)",
            "-rf",
            "",
        ] {
            assert!(check_args(&path, &s(&[bad])).is_err(), "{bad:?}");
        }
        // A sloppy pattern is the author's problem: `.` in a component admits `..`.
        let sloppy = rule(1, &["/var/log(/[A-Za-z0-9._-]+)*"]);
        assert!(check_args(&sloppy, &s(&["/var/log/../../etc"])).is_ok());
    }

    #[test]
    fn rules_are_validated() {
        assert!(rule(2, &["x"]).validate().is_ok());
        let mut r = rule(0, &[]);
        r.program = "bin/echo".into();
        assert!(r.validate().unwrap_err().contains("absolute"));
        let mut r = rule(0, &[]);
        r.cwd = "tmp".into();
        assert!(r.validate().is_err());
        assert!(rule(1, &[]).validate().unwrap_err().contains("pattern"));
        assert!(rule(1, &["a", "b"]).validate().is_err());
        assert!(rule(1, &["("])
            .validate()
            .unwrap_err()
            .contains("invalid pattern"));
        let mut r = rule(0, &[]);
        r.timeout_ms = 0;
        assert!(r.validate().is_err());
        r.timeout_ms = Limits::MAXIMUMS.timeout_ms + 1;
        assert!(r.validate().is_err());
        let mut r = rule(0, &[]);
        r.output_bytes = Limits::MAXIMUMS.output_bytes + 1;
        assert!(r.validate().is_err());
        let mut r = rule(0, &[]);
        r.env.insert("A=B".into(), "x".into());
        assert!(r.validate().is_err());
        let mut r = rule(0, &[]);
        r.args.push("a\0".into());
        assert!(r.validate().is_err());
        let mut r = rule(0, &[]);
        r.name = "Bad".into();
        assert!(r.validate().is_err());
        let mut r = rule(0, &[]);
        r.user = Some(String::new());
        assert!(r.validate().is_err());
    }

    #[test]
    fn the_allowlist_refuses_duplicates() {
        let a = Allowlist::new([rule(0, &[]), ShellRule::new("u", "/bin/true")]).unwrap();
        assert_eq!(a.names(), ["t", "u"]);
        assert!(a.get("t").is_some() && a.get("v").is_none());
        let err = Allowlist::new([rule(0, &[]), rule(0, &[])]).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }
}
