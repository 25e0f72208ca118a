//! `h8 policy`: validate a side-car daemon's local policy file, and explain
//! the decision it makes for one peer and service.
//!
//! Exit codes: 0 when the file is valid (`check`) or the stream is allowed
//! (`explain`), 1 when `explain` finds no rule that allows it, 2 when the
//! file cannot be read or is invalid.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::policy::{parse_local_rules, Decision, Rule, RuleSet, ANY_SERVER};
use crate::source::SourceError;
use crate::token::ANY_SERVICE;

/// Name used for the default `to` of rules when `--server` is not given.
/// Validation does not depend on it.
const UNNAMED_SERVER: &str = "this-daemon";
/// Maximum number of near-miss rules listed by `explain`.
const MAX_NEAR_MISSES: usize = 10;

/// Arguments of `h8 policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The policy command.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// Subcommands of `h8 policy`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a local policy file. Errors are printed as
    /// file:line:column and exit with status 2.
    Check {
        /// The local policy file (the `policy` setting of `[sidecar]`).
        file: PathBuf,
        /// This daemon's resource server name (`name` in h8d.toml). Rules
        /// without `to` apply to it, and rules naming another server are reported.
        #[arg(long, value_name = "NAME")]
        server: Option<String>,
    },
    /// Show which rule allows PEER to open SERVICE on this daemon, by
    /// file:line, or why no rule does. Exits 0 when allowed, 1 when denied.
    Explain {
        /// The local policy file.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// This daemon's resource server name (`name` in h8d.toml).
        #[arg(long, value_name = "NAME")]
        server: String,
        /// Resource server name of the calling peer.
        peer: String,
        /// Service the peer opens on this daemon.
        service: String,
    },
}

/// Runs `h8 policy`.
pub fn run(args: PolicyArgs) -> ExitCode {
    match args.command {
        PolicyCommand::Check { file, server } => check(&file, server.as_deref()),
        PolicyCommand::Explain {
            policy,
            server,
            peer,
            service,
        } => explain_command(&policy, &server, &peer, &service),
    }
}

fn load(file: &Path, server: &str) -> Result<RuleSet, SourceError> {
    let text = std::fs::read_to_string(file).map_err(|e| SourceError {
        file: file.to_owned(),
        line: 1,
        column: 1,
        message: format!("cannot read the policy file: {e}"),
    })?;
    parse_local_rules(file, &text, server)
}

fn check(file: &Path, server: Option<&str>) -> ExitCode {
    let rules = match load(file, server.unwrap_or(UNNAMED_SERVER)) {
        Ok(rules) => rules,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    if let Some(server) = server {
        for line in unused_rules(&rules, server) {
            eprintln!("{line}");
        }
    }
    println!("{}: valid, {} rules", file.display(), rules.rules().len());
    ExitCode::SUCCESS
}

/// Warnings for rules whose `to` names a server other than `server`: the
/// daemon named `server` never applies them.
fn unused_rules(rules: &RuleSet, server: &str) -> Vec<String> {
    rules
        .rules()
        .iter()
        .filter(|rule| rule.to != server && rule.to != ANY_SERVER)
        .map(|rule| {
            format!(
                "{}: warning: rule applies to resource server {:?}, not {server:?}; this daemon never uses it",
                rule.origin, rule.to
            )
        })
        .collect()
}

fn explain_command(file: &Path, server: &str, peer: &str, service: &str) -> ExitCode {
    let rules = match load(file, server) {
        Ok(rules) => rules,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let explanation = explain(&rules, server, peer, service);
    for line in &explanation.lines {
        println!("{line}");
    }
    if explanation.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The decision for one stream, in words.
#[derive(Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Whether a rule allows the stream.
    pub allowed: bool,
    /// The deciding rule, or the reason and the rules that nearly match.
    pub lines: Vec<String>,
}

/// Explains whether `peer` may open `service` on `server` under `rules`.
pub fn explain(rules: &RuleSet, server: &str, peer: &str, service: &str) -> Explanation {
    match rules.decide(peer, server, service) {
        Decision::Allow { rule } => {
            let rule = &rules.rules()[rule];
            Explanation {
                allowed: true,
                lines: vec![format!(
                    "allowed: {} allows {:?} to open {} on {:?}",
                    rule.origin,
                    rule.from,
                    services_text(rule),
                    rule.to
                )],
            }
        }
        Decision::Deny { reason } => {
            let mut lines = vec![format!("denied: {reason}")];
            let near = near_misses(rules, server, peer, service);
            if near.is_empty() {
                lines.push(format!(
                    "no rule names {peer:?} or \"*\" in `from` together with {server:?} or \"*\" in `to`, or service {service:?} or \"*\""
                ));
            }
            let hidden = near.len().saturating_sub(MAX_NEAR_MISSES);
            lines.extend(near.into_iter().take(MAX_NEAR_MISSES));
            if hidden > 0 {
                lines.push(format!("... and {hidden} more rules that nearly match"));
            }
            lines.push(format!(
                "to allow it, add to the policy file:\n  [[allow]]\n  from = {peer:?}\n  services = [{service:?}]"
            ));
            Explanation {
                allowed: false,
                lines,
            }
        }
    }
}

/// Rules that match two of caller, callee and service, each with what differs.
fn near_misses(rules: &RuleSet, server: &str, peer: &str, service: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for rule in rules.rules() {
        let from_matches = rule.from == peer || rule.from == ANY_SERVER;
        let to_matches = rule.to == server || rule.to == ANY_SERVER;
        let service_matches = rule
            .services
            .iter()
            .any(|s| s == service || s == ANY_SERVICE);
        let line = match (from_matches, to_matches, service_matches) {
            (true, true, false) => format!(
                "{}: allows {:?} only {} on {:?}",
                rule.origin,
                rule.from,
                services_text(rule),
                rule.to
            ),
            (true, false, true) => format!(
                "{}: applies to resource server {:?}, not {server:?}",
                rule.origin, rule.to
            ),
            (false, true, true) => format!(
                "{}: allows service {service:?} for caller {:?}, not {peer:?}",
                rule.origin, rule.from
            ),
            _ => continue,
        };
        lines.push(line);
    }
    lines
}

fn services_text(rule: &Rule) -> String {
    if rule.services.iter().any(|s| s == ANY_SERVICE) {
        return "every service".to_owned();
    }
    let names: Vec<String> = rule.services.iter().map(|s| format!("{s:?}")).collect();
    format!("services {}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[allow]]
from = "server-a"
services = ["echo"]

[[allow]]
from = "*"
services = ["metrics"]

[[allow]]
from = "server-c"
to = "server-z"
services = ["echo"]
"#;

    fn rules() -> RuleSet {
        parse_local_rules(Path::new("local.toml"), POLICY, "server-b").expect("valid policy")
    }

    #[test]
    fn explain_names_the_allowing_rule() {
        let explanation = explain(&rules(), "server-b", "server-a", "echo");
        assert!(explanation.allowed);
        assert!(
            explanation.lines[0].starts_with("allowed: local.toml:3 "),
            "{:?}",
            explanation.lines
        );
    }

    #[test]
    fn explain_wildcard_caller() {
        let explanation = explain(&rules(), "server-b", "server-q", "metrics");
        assert!(explanation.allowed);
        assert!(
            explanation.lines[0].contains("local.toml:7"),
            "{:?}",
            explanation.lines
        );
    }

    #[test]
    fn explain_denial_lists_near_misses() {
        let explanation = explain(&rules(), "server-b", "server-a", "admin");
        assert!(!explanation.allowed);
        let text = explanation.lines.join("\n");
        assert!(
            text.starts_with("denied: no rule allows \"server-a\""),
            "{text}"
        );
        assert!(
            text.contains("local.toml:3: allows \"server-a\" only services \"echo\""),
            "{text}"
        );
        assert!(
            text.contains("local.toml:7: allows \"*\" only services \"metrics\""),
            "{text}"
        );
    }

    #[test]
    fn explain_denial_names_rule_for_other_server() {
        let explanation = explain(&rules(), "server-b", "server-c", "echo");
        assert!(!explanation.allowed);
        let text = explanation.lines.join("\n");
        assert!(
            text.contains("local.toml:11: applies to resource server \"server-z\""),
            "{text}"
        );
        assert!(
            text.contains("local.toml:3: allows service \"echo\" for caller \"server-a\""),
            "{text}"
        );
    }

    #[test]
    fn explain_denial_without_any_related_rule() {
        let empty = RuleSet::default();
        let explanation = explain(&empty, "server-b", "server-a", "echo");
        assert!(!explanation.allowed);
        assert!(
            explanation.lines[1].starts_with("no rule names \"server-a\""),
            "{:?}",
            explanation.lines
        );
    }

    #[test]
    fn check_warns_about_rules_for_other_servers() {
        let warnings = unused_rules(&rules(), "server-b");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("local.toml:11: warning:"),
            "{}",
            warnings[0]
        );
    }
}
