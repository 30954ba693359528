//! What a task runs and the run itself: a command resolves to an installed handler, else to a
//! shell rule; a handler runs in the WASM sandbox, a shell rule as a supervised process tree.

use bridge_protocol::{RunRequest, RunResult};
use tokio_util::sync::CancellationToken;

use super::modules::{decode_signature, parse_sha};
use super::refusal::Refusal;
use super::Agent;
use crate::audit::{Facts, HandlerId};
use crate::observe::TaskKind;
use crate::shell::ShellRule;
use crate::stream::StreamTap;
use crate::trust::{grant, Prepared};

/// Where a task resolved.
#[derive(Clone)]
pub(super) enum Target {
    /// A module, by hash, with the signature to check it against.
    Module {
        sha256: String,
        signature: Option<String>,
    },
    /// A module verified and compiled already (found in the trust cache).
    Ready { sha256: String, prepared: Prepared },
    /// A shell rule.
    Shell(ShellRule),
}

impl Target {
    /// How a task resolved to this runs: a module (by hash or as a handler) in the sandbox, or
    /// a shell rule.
    pub(super) fn kind(&self) -> TaskKind {
        match self {
            Target::Module { .. } | Target::Ready { .. } => TaskKind::Wasm,
            Target::Shell(_) => TaskKind::Shell,
        }
    }
}

impl Agent {
    /// What `req` runs: its command resolved (an installed handler, else a shell rule), or the
    /// module it names. `None` for a command that resolves to nothing.
    pub(super) fn resolve(&self, req: &RunRequest) -> Option<Target> {
        match (&req.command, &req.file_sha256) {
            (Some(name), _) => {
                if let Some(h) = self.journal.handler(name) {
                    return Some(Target::Module {
                        sha256: h.file_sha256,
                        signature: h.signature,
                    });
                }
                self.shell.get(name).cloned().map(Target::Shell)
            }
            (None, Some(sha)) => Some(Target::Module {
                sha256: sha.clone(),
                signature: req.signature.clone(),
            }),
            (None, None) => None,
        }
    }

    /// `target` as [`Target::Ready`] if it may run while its acceptance is being recorded:
    /// a WASM handler already verified and compiled (no module to fetch), for a task that does
    /// not stream. A handler run by the agent gets no directories and no environment (see
    /// [`Agent::run_module`]): its only effect is its result, and that is not sent before the
    /// acceptance is on disk. If the agent dies first, nothing of the run was seen by anyone,
    /// and the platform, which got no `accepted`, sends the task again: it runs as if for the
    /// first time. Shell commands, module fetches and streamed output are effects: those wait.
    pub(super) fn ready_now(&self, req: &RunRequest, target: &Target) -> Option<Target> {
        let Target::Module { sha256, signature } = target else {
            return None;
        };
        if req.stream {
            return None;
        }
        let sha = parse_sha(sha256)?;
        let detached = decode_signature(signature.as_deref()).ok()?;
        let prepared = self
            .trust
            .cached(&self.sandbox, &sha, detached.as_deref())?;
        Some(Target::Ready {
            sha256: sha256.clone(),
            prepared,
        })
    }

    /// What a task that resolved to `target` runs, for its audit record: a shell command's
    /// program, argv and environment's names; a module's hash, handler and signer (known once
    /// it was verified: before its run if it was ready, after it otherwise, from the trust
    /// cache).
    pub(super) fn audit_facts(&self, req: &RunRequest, target: &Target) -> Facts {
        let mut facts = Facts {
            command: req.command.clone(),
            ..Facts::default()
        };
        let (sha256, prepared) = match target {
            Target::Shell(rule) => {
                let program = rule.program.display().to_string();
                let mut argv = vec![program.clone()];
                argv.extend(rule.args.iter().cloned());
                argv.extend(req.args.iter().cloned());
                facts.kind = Some("shell");
                facts.program = Some(program);
                facts.argv = Some(argv);
                facts.env = rule.env.keys().cloned().collect();
                return facts;
            }
            Target::Ready { sha256, prepared } => (sha256, Some(prepared.clone())),
            Target::Module { sha256, signature } => {
                let cached = parse_sha(sha256).and_then(|sha| {
                    let detached = decode_signature(signature.as_deref()).ok()?;
                    self.trust.cached(&self.sandbox, &sha, detached.as_deref())
                });
                (sha256, cached)
            }
        };
        facts.kind = Some("wasm");
        facts.file_sha256 = Some(sha256.clone());
        if let Some(verified) = prepared.as_ref().and_then(|p| p.verified.as_deref()) {
            facts.handler = Some(HandlerId {
                name: verified.claims.name.clone(),
                version: verified.claims.version.clone(),
            });
            facts.signer = Some(verified.key_id.to_string());
        }
        facts
    }

    /// Runs `target` for `req` until it ends or `cancel` (a handler still being fetched or
    /// prepared is abandoned; a running one stops at its next epoch tick).
    pub(super) async fn execute(
        &self,
        req: &RunRequest,
        target: Target,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        let (sha256, signature, ready) = match target {
            Target::Shell(rule) => return self.run_shell(rule, req, cancel, tap).await,
            Target::Module { sha256, signature } => (sha256, signature, None),
            Target::Ready { sha256, prepared } => (sha256, None, Some(prepared)),
        };
        let run = async {
            let prepared = match ready {
                Some(prepared) => prepared,
                None => match self.prepare(&req.id, &sha256, signature.as_deref()).await {
                    Ok(prepared) => prepared,
                    Err(refusal) => return refusal.into_result(),
                },
            };
            self.run_module(req, prepared, cancel.clone(), tap).await
        };
        tokio::select! {
            biased;
            r = run => r,
            _ = cancel.cancelled() => {
                let mut r = Refusal::CancelledBeforeStart.into_result();
                r.file_sha256 = Some(sha256);
                r
            }
        }
    }

    async fn run_shell(
        &self,
        rule: ShellRule,
        req: &RunRequest,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        // A task may ask for less time or output than the rule allows, never more.
        let (rule, clamped) = rule.limited_to(&req.limits);
        let mut result =
            crate::shell::run_streamed(&rule, &req.args, cancel, self.cgroup_root.as_deref(), tap)
                .await;
        if let Some(l) = result.limits.as_mut() {
            l.clamped.extend(clamped);
        }
        result
    }

    /// Runs a verified, compiled module in the sandbox, with the limits its claims grant.
    async fn run_module(
        &self,
        req: &RunRequest,
        prepared: Prepared,
        cancel: CancellationToken,
        tap: Option<StreamTap>,
    ) -> RunResult {
        let defaults = self.sandbox.config().limits.defaults;
        let verified = prepared.verified.as_deref();
        let name = verified.map_or_else(|| "handler".to_string(), |v| v.claims.name.clone());
        let input = serde_json::to_vec(&req.input).unwrap_or_else(|_| b"null".to_vec());
        let mut spec = grant(verified, req.limits, &defaults, Vec::new(), Vec::new())
            .into_spec(input, name, &req.args);
        spec.cancel = Some(cancel);
        spec.tap = tap;
        let mut result = match self.sandbox.run(&prepared.module, spec).await {
            Ok(r) => r,
            Err(e) => Refusal::SetupFailed(format!("{e:#}")).into_result(),
        };
        result.code_sha256 = verified.map(|v| v.module_sha256_hex());
        result
    }
}
