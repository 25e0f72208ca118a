//! Enrollment, sessions and client token issuance.

use ed25519_dalek::{Signature, VerifyingKey};
use rand_core::{OsRng, RngCore as _};
use sha2::{Digest as _, Sha256};

use super::{check_name, decode_fixed, random_id, truncate, ErrorKind, Service, ServiceError};
use super::{MAX_LIVE_CHALLENGES, MAX_TIMESTAMP_SKEW_SECS};
use crate::identity::{parse_public_key, public_key_text};
use crate::token::{self, Claims, TokenKind, MAX_NAME_LEN};
use crate::token_server::api::{
    session_message, token_request_message, AdminEnrollRequest, AdminEnrollResponse,
    ChallengeRequest, ChallengeResponse, EnrollRequest, EnrollResponse, SessionRequest,
    SessionResponse, TokenRequest, TokenResponse,
};
use crate::token_server::config::MAX_LIFETIME_SECS;
use crate::token_server::store::{
    AuditEvent, IssuedToken, ServerRecord, SessionRecord, StoreError,
};

/// Maximum length of an enrollment code accepted in a request.
const MAX_CODE_LEN: usize = 128;

fn code_hash(code: &str) -> [u8; 32] {
    Sha256::digest(code.as_bytes()).into()
}

impl Service {
    /// Creates a one-time enrollment code for `request.name`. The code is
    /// returned once and only its SHA-256 is stored.
    pub fn create_enrollment_code(
        &self,
        request: &AdminEnrollRequest,
        now: u64,
    ) -> Result<AdminEnrollResponse, ServiceError> {
        check_name("resource server name", &request.name)?;
        let ttl = request.ttl_secs.unwrap_or(self.lifetimes.enrollment_code);
        if ttl == 0 || ttl > MAX_LIFETIME_SECS {
            return Err(ServiceError::bad_request(
                "invalid_ttl",
                format!("enrollment code lifetime {ttl} is out of range; use 1 to {MAX_LIFETIME_SECS} seconds"),
            ));
        }
        let code = random_id("h8e_", 16);
        let expires_at = now.saturating_add(ttl);
        self.store().insert_enrollment_code(
            &code_hash(&code),
            &request.name,
            expires_at,
            AuditEvent::new(
                now,
                "enroll_code",
                request.name.as_str(),
                format!("enrollment code created, expires at {expires_at}"),
            ),
        )?;
        tracing::info!(server = %request.name, expires_at, "enrollment code created");
        Ok(AdminEnrollResponse {
            name: request.name.clone(),
            enrollment_code: code,
            expires_at,
        })
    }

    /// Binds a resource server name to a public key, consuming the code.
    pub fn enroll(
        &self,
        request: &EnrollRequest,
        now: u64,
    ) -> Result<EnrollResponse, ServiceError> {
        check_name("resource server name", &request.name)?;
        let key = parse_public_key(&request.public_key)
            .map_err(|reason| ServiceError::bad_request("invalid_public_key", reason))?;
        if request.enrollment_code.is_empty() || request.enrollment_code.len() > MAX_CODE_LEN {
            return Err(ServiceError::bad_request(
                "invalid_enrollment_code",
                format!("enrollment code must be 1 to {MAX_CODE_LEN} bytes; copy it from `h8 admin enroll`"),
            ));
        }

        let hash = code_hash(&request.enrollment_code);
        let mut store = self.store();
        let Some(code) = store.enrollment_code(&hash)? else {
            return Err(ServiceError::forbidden(
                "code_unknown",
                format!(
                    "the enrollment code for {:?} is not known; check for typos or create a new one with `h8 admin enroll {}`",
                    request.name, request.name
                ),
            ));
        };
        if code.name != request.name {
            return Err(ServiceError::forbidden(
                "code_name_mismatch",
                format!(
                    "the enrollment code was issued for another resource server name, not {:?}; use the name given to `h8 admin enroll`",
                    request.name
                ),
            ));
        }
        if let Some(used_at) = code.used_at {
            return Err(code_used(&request.name, used_at));
        }
        if now >= code.expires_at {
            return Err(ServiceError::forbidden(
                "code_expired",
                format!(
                    "the enrollment code for {:?} expired at {}; create a new one with `h8 admin enroll {}`",
                    request.name, code.expires_at, request.name
                ),
            ));
        }

        let public_key = key.to_bytes();
        let audit = AuditEvent::new(
            now,
            "enroll",
            request.name.as_str(),
            format!("enrolled public key {}", request.public_key.trim()),
        );
        match store.enroll(&hash, &request.name, &public_key, now, audit) {
            Ok(()) => {}
            Err(StoreError::NotFound(_)) => return Err(code_used(&request.name, now)),
            Err(error) => return Err(error.into()),
        }
        tracing::info!(server = %request.name, "resource server enrolled");
        Ok(EnrollResponse {
            name: request.name.clone(),
            public_key: public_key_text(&key),
            enrolled_at: now,
        })
    }

    /// Hands out a single-use challenge for opening a session.
    pub fn challenge(
        &self,
        request: &ChallengeRequest,
        now: u64,
    ) -> Result<ChallengeResponse, ServiceError> {
        check_name("resource server name", &request.name)?;
        let mut store = self.store();
        let server = store.server(&request.name)?;
        live_server(&request.name, server.as_ref())?;

        let mut challenge = [0u8; 32];
        OsRng.fill_bytes(&mut challenge);
        let expires_at = now.saturating_add(self.lifetimes.challenge);
        // The cap bounds storage. A new challenge evicts the oldest rather
        // than being refused, so a third party requesting challenges for a
        // name cannot lock its daemon out of sessions; at worst it races the
        // daemon's own challenge, which the daemon then requests again.
        let evicted = store.insert_challenge(
            &challenge,
            &request.name,
            expires_at,
            now,
            MAX_LIVE_CHALLENGES,
        )?;
        if evicted {
            tracing::debug!(server = %request.name, "evicted the oldest unused session challenge");
        }
        Ok(ChallengeResponse {
            challenge: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                challenge,
            ),
            expires_at,
        })
    }

    /// Opens a session for a resource server that signed a challenge.
    pub fn open_session(
        &self,
        request: &SessionRequest,
        now: u64,
    ) -> Result<SessionResponse, ServiceError> {
        check_name("resource server name", &request.name)?;
        let challenge: [u8; 32] = decode_fixed("challenge", &request.challenge)?;
        let signature: [u8; 64] = decode_fixed("signature", &request.signature)?;

        let mut store = self.store();
        let Some((challenge_name, expires_at)) = store.take_challenge(&challenge)? else {
            return Err(ServiceError::forbidden(
                "challenge_unknown",
                "the challenge is unknown or was already used; request a new one from POST /v1/session/challenge",
            ));
        };
        if challenge_name != request.name {
            return Err(ServiceError::forbidden(
                "challenge_name_mismatch",
                format!("the challenge was issued for another resource server, not {:?}; request one for this name", request.name),
            ));
        }
        if now >= expires_at {
            return Err(ServiceError::forbidden(
                "challenge_expired",
                format!("the challenge expired at {expires_at}; request a new one and sign it within {} seconds", self.lifetimes.challenge),
            ));
        }
        let server = store.server(&request.name)?;
        let server = live_server(&request.name, server.as_ref())?;
        verify_signature(
            &server.public_key,
            &session_message(&challenge, &request.name),
            &signature,
            &request.name,
        )?;

        let session = SessionRecord {
            source_id: random_id("src_", 16),
            server: request.name.clone(),
            server_key: server.public_key,
            created_at: now,
            expires_at: now.saturating_add(self.lifetimes.session),
            revoked_at: None,
        };
        store.insert_session(
            &session,
            AuditEvent::new(
                now,
                "session",
                session.source_id.as_str(),
                format!(
                    "session opened by {}, expires at {}",
                    session.server, session.expires_at
                ),
            ),
        )?;
        tracing::info!(server = %session.server, source_id = %session.source_id, "session opened");
        Ok(SessionResponse {
            source_id: session.source_id,
            expires_at: session.expires_at,
        })
    }

    /// Issues a client token to a live session whose resource server the
    /// policy authorizes for the application.
    pub fn issue_token(
        &self,
        request: &TokenRequest,
        now: u64,
    ) -> Result<TokenResponse, ServiceError> {
        if request.source_id.is_empty() || request.source_id.len() > MAX_NAME_LEN {
            return Err(ServiceError::bad_request(
                "invalid_source_id",
                format!("source identifier must be 1 to {MAX_NAME_LEN} bytes; use the one from POST /v1/session"),
            ));
        }
        check_name("resource application name", &request.application)?;
        let signature: [u8; 64] = decode_fixed("signature", &request.signature)?;
        if now.abs_diff(request.timestamp) > MAX_TIMESTAMP_SKEW_SECS {
            return Err(ServiceError::forbidden(
                "timestamp_skew",
                format!(
                    "request timestamp {} is more than {MAX_TIMESTAMP_SKEW_SECS} seconds from the server's time {now}; fix the client clock (NTP) and sign again",
                    request.timestamp
                ),
            ));
        }

        // The store is locked per lookup, not across the signature checks,
        // so concurrent requests verify and sign in parallel.
        let Some(session) = self.reader().session(&request.source_id)? else {
            return Err(ServiceError::forbidden(
                "session_unknown",
                format!(
                    "no session has source identifier {:?}; open one with POST /v1/session",
                    truncate(&request.source_id)
                ),
            ));
        };
        verify_signature(
            &session.server_key,
            &token_request_message(&request.source_id, &request.application, request.timestamp),
            &signature,
            &session.server,
        )?;

        // From here the caller is authenticated, so denials are audited.
        let deny = |code: &'static str, message: String| {
            let audit = AuditEvent::new(
                now,
                "deny",
                session.source_id.as_str(),
                format!("{} for {}: {message}", session.server, request.application),
            );
            if let Err(error) = self.store().append_audit(audit) {
                tracing::error!(%error, "cannot record a denial in the audit table");
            }
            tracing::info!(server = %session.server, source_id = %session.source_id, application = %request.application, reason = %message, "token denied");
            ServiceError::forbidden(code, message)
        };

        if let Some(revoked_at) = session.revoked_at {
            return Err(deny(
                "session_revoked",
                format!(
                    "session {} was revoked at {revoked_at}; open a new session",
                    session.source_id
                ),
            ));
        }
        if now >= session.expires_at {
            return Err(deny(
                "session_expired",
                format!(
                    "session {} expired at {}; open a new session",
                    session.source_id, session.expires_at
                ),
            ));
        }
        let server = self.reader().server(&session.server)?;
        match server {
            Some(server) if server.revoked_at.is_some() => {
                return Err(deny(
                    "server_revoked",
                    format!(
                        "resource server {:?} is revoked; ask the operator to enroll it again",
                        session.server
                    ),
                ));
            }
            Some(server) if server.public_key != session.server_key => {
                return Err(deny("session_stale", format!("resource server {:?} was enrolled again with another key after this session opened; open a new session", session.server)));
            }
            Some(_) => {}
            None => {
                return Err(deny(
                    "server_unknown",
                    format!("resource server {:?} is no longer enrolled", session.server),
                ));
            }
        }

        let policy = self.policy();
        let grants = match policy.policy.scope(&request.application, &session.server) {
            Ok(grants) => grants,
            Err(denial) => {
                return Err(deny(
                    "not_authorized",
                    format!("{denial}; change the policy file if it should be"),
                ))
            }
        };
        let Some(client_id) = policy.client_ids.get(&request.application) else {
            return Err(ServiceError::new(
                ErrorKind::Internal,
                "internal",
                format!(
                    "resource application {:?} has no client identifier; reload the policy",
                    request.application
                ),
            ));
        };

        let signer = self.signer();
        let mut token_id = [0u8; 16];
        OsRng.fill_bytes(&mut token_id);
        let claims = Claims {
            version: token::TOKEN_VERSION,
            kind: TokenKind::Client,
            key_id: signer.key_id(),
            issuer: self.issuer.clone(),
            client_id: client_id.clone(),
            source_id: session.source_id.clone(),
            server: session.server.clone(),
            server_key: session.server_key,
            grants,
            issued_at: now,
            not_before: now,
            expires_at: now
                .saturating_add(self.lifetimes.token)
                .min(session.expires_at),
            token_id,
        };
        let token = token::to_text(&signer.sign(&claims));
        let issued = IssuedToken {
            token_id: claims.token_id_hex(),
            source_id: session.source_id.clone(),
            server: session.server.clone(),
            application: request.application.clone(),
            key_id: signer.key_id().to_string(),
            issued_at: now,
            expires_at: claims.expires_at,
        };
        let audit = AuditEvent::new(
            now,
            "issue",
            session.source_id.as_str(),
            format!(
                "token {} for {} in {}, key {}, expires at {}",
                issued.token_id,
                issued.server,
                issued.application,
                issued.key_id,
                issued.expires_at
            ),
        );
        let key_id = issued.key_id.clone();
        let (server, source_id, application, token_id) = (
            issued.server.clone(),
            issued.source_id.clone(),
            issued.application.clone(),
            issued.token_id.clone(),
        );
        self.issues
            .record((issued, audit), |batch| self.store().record_issues(batch))?;
        tracing::info!(%server, %source_id, %application, %token_id, "token issued");
        Ok(TokenResponse {
            token,
            expires_at: claims.expires_at,
            key_id,
        })
    }
}

fn code_used(name: &str, used_at: u64) -> ServiceError {
    ServiceError::forbidden(
        "code_used",
        format!("the enrollment code for {name:?} was already used at {used_at}; codes work once, so create a new one with `h8 admin enroll {name}`"),
    )
}

fn live_server<'a>(
    name: &str,
    server: Option<&'a ServerRecord>,
) -> Result<&'a ServerRecord, ServiceError> {
    match server {
        None => Err(ServiceError::forbidden(
            "server_unknown",
            format!("resource server {name:?} is not enrolled; enroll it with a code from `h8 admin enroll {name}`"),
        )),
        Some(server) if server.revoked_at.is_some() => Err(ServiceError::forbidden(
            "server_revoked",
            format!("resource server {name:?} is revoked; ask the operator for a new enrollment code"),
        )),
        Some(server) => Ok(server),
    }
}

fn verify_signature(
    key: &[u8; 32],
    message: &[u8],
    signature: &[u8; 64],
    name: &str,
) -> Result<(), ServiceError> {
    let invalid = || {
        ServiceError::forbidden(
            "signature_invalid",
            format!("the signature does not verify with the key enrolled for {name:?}; sign with that key over the documented message"),
        )
    };
    let key = VerifyingKey::from_bytes(key).map_err(|_| invalid())?;
    key.verify_strict(message, &Signature::from_bytes(signature))
        .map_err(|_| invalid())
}
