//! The authorization policy model and its evaluator.
//!
//! One model serves both modes. A token server holds a [`Policy`]: resource
//! applications, the resource servers authorized for each and its allow
//! rules; it turns the rules into the grants of a client token. A side-car
//! daemon holds a bare [`RuleSet`] and asks it per stream. Either way a rule
//! `from -> to : services` means the same thing: resource server `from` may
//! open those services on resource server `to`.
//!
//! Sans-IO: parsing takes text, evaluation takes names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::source::{parse_toml, SourceError};
use crate::token::{Grant, ANY_SERVICE, MAX_GRANTS, MAX_NAME_LEN, MAX_SERVICES_PER_GRANT};

/// Wildcard for `from` or `to`: any resource server.
pub const ANY_SERVER: &str = "*";
/// Maximum number of rules in one rule set.
pub const MAX_RULES: usize = 100_000;

/// One allow rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Caller: a resource server name or `*`.
    pub from: String,
    /// Callee: a resource server name or `*`.
    pub to: String,
    /// Services the caller may open on the callee; `*` is every service.
    pub services: Vec<String>,
    /// Source location of the rule, as `file:line`, for explanations.
    pub origin: String,
}

impl Rule {
    fn covers_service(&self, service: &str) -> bool {
        self.services
            .iter()
            .any(|s| s == service || s == ANY_SERVICE)
    }
}

/// Outcome of evaluating a rule set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the rule at this index.
    Allow {
        /// Index of the first matching rule.
        rule: usize,
    },
    /// No rule allows it.
    Deny {
        /// Why, in words fit for a log line or an HTTP body.
        reason: String,
    },
}

/// An indexed list of allow rules. Lookups cost a few hash probes however
/// many rules there are.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    by_pair: HashMap<(String, String), Vec<usize>>,
}

impl RuleSet {
    /// Builds the index over `rules`.
    pub fn new(rules: Vec<Rule>) -> Self {
        let mut by_pair: HashMap<(String, String), Vec<usize>> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            by_pair
                .entry((rule.from.clone(), rule.to.clone()))
                .or_default()
                .push(i);
        }
        RuleSet { rules, by_pair }
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Decides whether `from` may open `service` on `to`. The first rule in
    /// file order that matches wins, so explanations are stable.
    pub fn decide(&self, from: &str, to: &str, service: &str) -> Decision {
        let mut best: Option<usize> = None;
        for key_from in [from, ANY_SERVER] {
            for key_to in [to, ANY_SERVER] {
                let Some(candidates) = self.by_pair.get(&(key_from.to_owned(), key_to.to_owned()))
                else {
                    continue;
                };
                let found = candidates
                    .iter()
                    .copied()
                    .find(|&i| self.rules[i].covers_service(service));
                if let Some(i) = found {
                    best = Some(best.map_or(i, |b| b.min(i)));
                }
            }
        }
        match best {
            Some(rule) => Decision::Allow { rule },
            None => Decision::Deny {
                reason: format!("no rule allows {from:?} to open service {service:?} on {to:?}"),
            },
        }
    }

    /// Collects the grants that `from` holds: one per callee, services merged.
    pub fn grants_for(&self, from: &str) -> Vec<Grant> {
        let mut by_peer: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for rule in &self.rules {
            if rule.from == from || rule.from == ANY_SERVER {
                let services = by_peer.entry(rule.to.as_str()).or_default();
                services.extend(rule.services.iter().map(String::as_str));
            }
        }
        by_peer
            .into_iter()
            .map(|(peer, services)| {
                let services = if services.contains(ANY_SERVICE) {
                    vec![ANY_SERVICE.to_owned()]
                } else {
                    services.into_iter().map(str::to_owned).collect()
                };
                Grant {
                    peer: peer.to_owned(),
                    services,
                }
            })
            .collect()
    }
}

/// A resource application and what its resource servers may do.
#[derive(Clone, Debug)]
pub struct Application {
    /// Application name, as in the policy file.
    pub name: String,
    /// Resource servers authorized for the application.
    pub servers: BTreeSet<String>,
    /// Allow rules between those servers.
    pub rules: RuleSet,
}

/// The token server's policy: every resource application.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Applications by name.
    pub applications: BTreeMap<String, Application>,
}

/// Reason a client token was not issued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyDenial {
    /// The resource application is not in the policy.
    #[error("resource application {0:?} is not in the policy")]
    UnknownApplication(String),
    /// The resource server is not authorized for the application.
    #[error(
        "resource server {server:?} is not authorized for resource application {application:?}"
    )]
    ServerNotAuthorized {
        /// Application asked for.
        application: String,
        /// Server that asked.
        server: String,
    },
}

impl Policy {
    /// Returns the grants of `server` in `application`, or why it gets none.
    pub fn scope(&self, application: &str, server: &str) -> Result<Vec<Grant>, PolicyDenial> {
        let app = self
            .applications
            .get(application)
            .ok_or_else(|| PolicyDenial::UnknownApplication(application.to_owned()))?;
        if !app.servers.contains(server) {
            return Err(PolicyDenial::ServerNotAuthorized {
                application: application.to_owned(),
                server: server.to_owned(),
            });
        }
        Ok(app.rules.grants_for(server))
    }

    /// Parses a token-server policy file.
    pub fn parse(file: &Path, text: &str) -> Result<Policy, SourceError> {
        let raw: RawPolicy = parse_toml(file, text)?;
        let mut applications = BTreeMap::new();
        for (name, app) in raw.applications {
            check_name(file, text, &name, None)?;
            let mut servers = BTreeSet::new();
            for server in &app.servers {
                check_name(file, text, server.get_ref(), Some(server.span()))?;
                servers.insert(server.get_ref().clone());
            }
            let known = |s: &Spanned<String>| -> Result<(), SourceError> {
                if s.get_ref() == ANY_SERVER || servers.contains(s.get_ref()) {
                    Ok(())
                } else {
                    Err(SourceError::at(
                        file,
                        text,
                        s.span().start,
                        format!(
                            "resource server {:?} is not listed in applications.{name}.servers; add it there or fix the name",
                            s.get_ref()
                        ),
                    ))
                }
            };
            for rule in &app.allow {
                known(&rule.from)?;
                if let Some(to) = &rule.to {
                    known(to)?;
                }
            }
            let rules = convert_rules(file, text, app.allow, None)?;
            applications.insert(
                name.clone(),
                Application {
                    name,
                    servers,
                    rules,
                },
            );
        }
        Ok(Policy { applications })
    }
}

/// Parses a side-car daemon's local policy. Rules without `to` apply to
/// `local_server`, the daemon's own resource server name.
pub fn parse_local_rules(
    file: &Path,
    text: &str,
    local_server: &str,
) -> Result<RuleSet, SourceError> {
    let raw: RawLocalPolicy = parse_toml(file, text)?;
    convert_rules(file, text, raw.allow, Some(local_server))
}

fn convert_rules(
    file: &Path,
    text: &str,
    raw: Vec<RawRule>,
    default_to: Option<&str>,
) -> Result<RuleSet, SourceError> {
    if raw.len() > MAX_RULES {
        return Err(SourceError::at(
            file,
            text,
            0,
            format!("{} rules, the maximum is {MAX_RULES}", raw.len()),
        ));
    }
    let mut rules = Vec::with_capacity(raw.len());
    for rule in raw {
        let start = rule.from.span().start;
        let to = match (&rule.to, default_to) {
            (Some(to), _) => to.get_ref().clone(),
            (None, Some(local)) => local.to_owned(),
            (None, None) => {
                return Err(SourceError::at(
                    file,
                    text,
                    start,
                    "rule has no `to`; name the resource server that the caller may reach",
                ))
            }
        };
        check_name(file, text, rule.from.get_ref(), Some(rule.from.span()))?;
        if rule.services.is_empty() {
            return Err(SourceError::at(
                file,
                text,
                start,
                "rule has an empty `services` list; list service names or \"*\"",
            ));
        }
        if rule.services.len() > MAX_SERVICES_PER_GRANT {
            return Err(SourceError::at(
                file,
                text,
                start,
                format!(
                    "rule lists {} services, the maximum is {MAX_SERVICES_PER_GRANT}",
                    rule.services.len()
                ),
            ));
        }
        for service in &rule.services {
            check_name(file, text, service.get_ref(), Some(service.span()))?;
        }
        let (line, _) = crate::source::line_column(text, start);
        rules.push(Rule {
            from: rule.from.into_inner(),
            to,
            services: rule.services.into_iter().map(Spanned::into_inner).collect(),
            origin: format!("{}:{line}", file.display()),
        });
    }
    let set = RuleSet::new(rules);
    let peers: BTreeSet<&str> = set.rules.iter().map(|r| r.to.as_str()).collect();
    if peers.len() > MAX_GRANTS {
        return Err(SourceError::at(
            file,
            text,
            0,
            format!(
                "rules name {} distinct callees, the maximum is {MAX_GRANTS}",
                peers.len()
            ),
        ));
    }
    Ok(set)
}

/// Checks a resource server, application or service name: 1 to 128 bytes
/// of ASCII letters, digits, `-`, `_` and `.`, or the wildcard `*`.
pub fn valid_name(name: &str) -> bool {
    name == "*"
        || (!name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

fn check_name(
    file: &Path,
    text: &str,
    name: &str,
    span: Option<std::ops::Range<usize>>,
) -> Result<(), SourceError> {
    if valid_name(name) {
        return Ok(());
    }
    Err(SourceError::at_span(
        file,
        text,
        span,
        format!(
            "invalid name {name:?}: use 1 to {MAX_NAME_LEN} ASCII letters, digits, '-', '_' or '.'"
        ),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    applications: BTreeMap<String, RawApplication>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApplication {
    servers: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalPolicy {
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Spanned<String>,
    to: Option<Spanned<String>>,
    services: Vec<Spanned<String>>,
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
