//! Per-stream authorization: the check every stream open goes through.
//!
//! Sans-IO and cheap: it reads the peer's claims that the handshake already
//! verified and compares names. No signature is checked per stream.

use std::collections::HashSet;
use std::sync::Arc;

use crate::policy::{Decision, RuleSet};
use crate::token::Claims;
use crate::wire::{Reject, RejectCode};

/// Where the decision for a stream comes from.
#[derive(Clone, Debug)]
pub enum StreamAuthority {
    /// Token-server mode: the grants inside the caller's client token.
    TokenScope,
    /// Side-car mode: this daemon's local rules.
    LocalPolicy(Arc<RuleSet>),
}

/// Revoked sessions, resource servers and tokens, as published by the token
/// server at `epoch`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationSet {
    /// Epoch of the list; grows with every revocation.
    pub epoch: u64,
    /// Revoked source identifiers.
    pub sources: HashSet<String>,
    /// Revoked resource server names.
    pub servers: HashSet<String>,
    /// Revoked token ids, lowercase hex.
    pub tokens: HashSet<String>,
}

impl RevocationSet {
    /// Reports why `claims` are revoked, or `None`.
    pub fn reason(&self, claims: &Claims) -> Option<String> {
        if self.sources.contains(&claims.source_id) {
            return Some(format!("session {} was revoked", claims.source_id));
        }
        if self.servers.contains(&claims.server) {
            return Some(format!("resource server {:?} was revoked", claims.server));
        }
        if !self.tokens.is_empty() && self.tokens.contains(&claims.token_id_hex()) {
            return Some(format!("token {} was revoked", claims.token_id_hex()));
        }
        None
    }
}

/// One stream open to decide.
#[derive(Debug)]
pub struct StreamRequest<'a> {
    /// Verified claims of the caller.
    pub caller: &'a Claims,
    /// This daemon's resource server name.
    pub local_name: &'a str,
    /// Requested service.
    pub service: &'a str,
    /// Current time, seconds since the Unix epoch.
    pub now: u64,
    /// Allowed clock skew in seconds.
    pub leeway: u64,
}

/// Decides a stream open: validity window, revocation, then scope or policy.
/// Whether the service exists is checked by the caller afterwards, so an
/// unauthorized peer learns nothing about which services exist.
pub fn authorize_stream(
    authority: &StreamAuthority,
    request: &StreamRequest<'_>,
    revocations: &RevocationSet,
) -> Result<Option<usize>, Reject> {
    // 1. The token must still be valid: connections outlive tokens.
    request
        .caller
        .check_time(request.now, request.leeway)
        .map_err(|e| Reject::new(RejectCode::Expired, e.to_string()))?;

    // 2. Revocation.
    if let Some(reason) = revocations.reason(request.caller) {
        return Err(Reject::new(RejectCode::Revoked, reason));
    }

    // 3. Scope or policy.
    match authority {
        StreamAuthority::TokenScope => {
            if request.caller.allows(request.local_name, request.service) {
                Ok(None)
            } else {
                Err(Reject::new(
                    RejectCode::OutOfScope,
                    format!(
                        "the client token of {:?} grants no access to service {:?} on {:?}",
                        request.caller.server, request.service, request.local_name
                    ),
                ))
            }
        }
        StreamAuthority::LocalPolicy(rules) => {
            match rules.decide(&request.caller.server, request.local_name, request.service) {
                Decision::Allow { rule } => Ok(Some(rule)),
                Decision::Deny { reason } => Err(Reject::new(RejectCode::PolicyDenied, reason)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Rule;
    use crate::token::{Grant, KeyId, TokenKind};

    fn claims() -> Claims {
        Claims {
            version: 1,
            kind: TokenKind::Client,
            key_id: KeyId([0; 8]),
            issuer: "tokend".to_owned(),
            client_id: "cid".to_owned(),
            source_id: "src_a".to_owned(),
            server: "server-a".to_owned(),
            server_key: [0; 32],
            grants: vec![Grant {
                peer: "server-b".to_owned(),
                services: vec!["orders".to_owned()],
            }],
            issued_at: 100,
            not_before: 100,
            expires_at: 200,
            token_id: [1; 16],
        }
    }

    fn request<'a>(caller: &'a Claims, service: &'a str, now: u64) -> StreamRequest<'a> {
        StreamRequest {
            caller,
            local_name: "server-b",
            service,
            now,
            leeway: 0,
        }
    }

    #[test]
    fn token_scope_decides() {
        let c = claims();
        let none = RevocationSet::default();
        assert_eq!(
            authorize_stream(
                &StreamAuthority::TokenScope,
                &request(&c, "orders", 150),
                &none
            ),
            Ok(None)
        );
        let err = authorize_stream(
            &StreamAuthority::TokenScope,
            &request(&c, "admin", 150),
            &none,
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::OutOfScope);
    }

    #[test]
    fn expired_token_is_rejected_per_stream() {
        let c = claims();
        let err = authorize_stream(
            &StreamAuthority::TokenScope,
            &request(&c, "orders", 200),
            &RevocationSet::default(),
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::Expired);
    }

    #[test]
    fn revoked_session_is_rejected() {
        let c = claims();
        let mut revoked = RevocationSet::default();
        revoked.sources.insert("src_a".to_owned());
        let err = authorize_stream(
            &StreamAuthority::TokenScope,
            &request(&c, "orders", 150),
            &revoked,
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::Revoked);
        assert!(err.reason.contains("src_a"));
    }

    #[test]
    fn local_policy_names_rule() {
        let c = claims();
        let rules = RuleSet::new(vec![Rule {
            from: "server-a".to_owned(),
            to: "server-b".to_owned(),
            services: vec!["metrics".to_owned()],
            origin: "local.toml:1".to_owned(),
        }]);
        let authority = StreamAuthority::LocalPolicy(Arc::new(rules));
        let none = RevocationSet::default();
        assert_eq!(
            authorize_stream(&authority, &request(&c, "metrics", 150), &none),
            Ok(Some(0))
        );
        let err = authorize_stream(&authority, &request(&c, "orders", 150), &none).unwrap_err();
        assert_eq!(err.code, RejectCode::PolicyDenied);
    }
}
