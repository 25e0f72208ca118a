//! Operations of the admin API: revocation, key rotation and listings.

use std::sync::{Arc, PoisonError};

use super::{check_name, ErrorKind, Service, ServiceError, MAX_AUDIT_LIMIT};
use crate::identity::{public_key_text, IdentityKey};
use crate::token::{KeyId, TokenSigner};
use crate::token_server::api::{
    AdminAppsResponse, AdminAuditResponse, AdminRevokeRequest, AdminRevokeResponse,
    AdminRotateKeyResponse, AdminSessionsResponse, ApplicationInfo, AuditEntry, SessionInfo,
};
use crate::token_server::store::{AuditEvent, RevokeTarget, SigningKeyRecord, StoreError};

impl Service {
    /// Revokes one session, resource server or token and increments the epoch.
    pub fn revoke(
        &self,
        request: &AdminRevokeRequest,
        now: u64,
    ) -> Result<AdminRevokeResponse, ServiceError> {
        let target = match (&request.session, &request.server, &request.token) {
            (Some(source_id), None, None) => RevokeTarget::Session(source_id.clone()),
            (None, Some(server), None) => {
                check_name("resource server name", server)?;
                RevokeTarget::Server(server.clone())
            }
            (None, None, Some(token_id)) => {
                let valid = token_id.len() == 32 && token_id.bytes().all(|b| b.is_ascii_hexdigit());
                if !valid {
                    return Err(ServiceError::bad_request(
                        "invalid_token_id",
                        format!("token id {token_id:?} is not 32 hex digits; copy it from `h8 admin audit`"),
                    ));
                }
                RevokeTarget::Token(token_id.to_ascii_lowercase())
            }
            _ => {
                return Err(ServiceError::bad_request(
                    "invalid_request",
                    "set exactly one of `session`, `server` or `token`",
                ))
            }
        };
        let revoked = match &target {
            RevokeTarget::Session(id) => format!("session {id}"),
            RevokeTarget::Server(name) => format!("resource server {name} and its sessions"),
            RevokeTarget::Token(id) => format!("token {id}"),
        };
        let audit = AuditEvent::new(
            now,
            "revoke",
            subject(&target),
            format!("revoked {revoked}"),
        );
        let epoch = match self.store().revoke(&target, now, audit) {
            Ok(epoch) => epoch,
            Err(StoreError::NotFound(message)) => {
                return Err(ServiceError::new(ErrorKind::NotFound, "not_found", message))
            }
            Err(error) => return Err(error.into()),
        };
        tracing::info!(target = %revoked, epoch, "revoked");
        Ok(AdminRevokeResponse { epoch, revoked })
    }

    /// Replaces the token-signing key. The old key stays in the published
    /// set until every token it signed has expired.
    pub fn rotate_key(&self, now: u64) -> Result<AdminRotateKeyResponse, ServiceError> {
        let Some(data_dir) = &self.data_dir else {
            return Err(ServiceError::new(
                ErrorKind::Internal,
                "internal",
                "this service has no data directory to store a new key in",
            ));
        };
        let failed = |error: anyhow::Error| {
            tracing::error!(error = %format!("{error:#}"), "key rotation failed");
            ServiceError::new(
                ErrorKind::Internal,
                "rotation_failed",
                format!("key rotation failed, the old key still signs: {error:#}"),
            )
        };

        // While the write lock is held no issuance can take the old key.
        // One that took it earlier may still record its token after the
        // retirement is committed. Its record raises the old key's
        // `last_token_expires_at`, which `keys` reads, so the key stays
        // published long enough. The value returned below is computed now
        // and can be short by such a late token, about a second.
        let mut signer = self.signer.write().unwrap_or_else(PoisonError::into_inner);
        let old_key_id = signer.key_id();
        let new_key = IdentityKey::generate();
        let new_key_id = KeyId::of(&new_key.public());

        // Order matters for crash recovery, see `DataDir::load_signing_key`:
        // file first, then the committed row, then the rename.
        data_dir
            .write_pending_signing_key(&new_key)
            .map_err(failed)?;
        let record = SigningKeyRecord {
            key_id: new_key_id.to_string(),
            public_key: new_key.public().to_bytes(),
            created_at: now,
            retired_at: None,
            last_token_expires_at: 0,
        };
        let audit = AuditEvent::new(
            now,
            "rotate_key",
            new_key_id.to_string(),
            format!("key {new_key_id} replaces key {old_key_id}"),
        );
        let retired = {
            let mut store = self.store();
            store.rotate_signing_key(&old_key_id.to_string(), &record, audit)?;
            store
                .signing_keys()?
                .into_iter()
                .find(|k| k.key_id == old_key_id.to_string())
        };
        data_dir.commit_pending_signing_key().map_err(failed)?;
        *signer = Arc::new(TokenSigner::new(new_key.signing_key().clone()));
        drop(signer);

        let published_until = retired.map_or(now, |k| {
            self.retired_key_published_until(now, k.last_token_expires_at)
        });
        tracing::info!(key_id = %new_key_id, retired_key_id = %old_key_id, published_until, "signing key rotated");
        Ok(AdminRotateKeyResponse {
            key_id: new_key_id.to_string(),
            public_key: public_key_text(&new_key.public()),
            retired_key_id: old_key_id.to_string(),
            retired_key_published_until: published_until,
        })
    }

    /// Lists the newest `limit` audit entries, newest first.
    pub fn audit(&self, limit: u64) -> Result<AdminAuditResponse, ServiceError> {
        let entries = self
            .store()
            .audit(limit.min(MAX_AUDIT_LIMIT))?
            .into_iter()
            .map(|r| AuditEntry {
                id: r.id,
                at: r.at,
                event: r.event,
                subject: r.subject,
                detail: r.detail,
            })
            .collect();
        Ok(AdminAuditResponse { entries })
    }

    /// Lists the policy's applications and their client identifiers.
    pub fn applications(&self) -> AdminAppsResponse {
        let state = self.policy();
        let applications = state
            .policy
            .applications
            .values()
            .map(|app| ApplicationInfo {
                name: app.name.clone(),
                client_id: state.client_ids.get(&app.name).cloned().unwrap_or_default(),
                servers: app.servers.iter().cloned().collect(),
            })
            .collect();
        AdminAppsResponse { applications }
    }

    /// Lists the sessions that have not expired at `now`.
    pub fn sessions(&self, now: u64) -> Result<AdminSessionsResponse, ServiceError> {
        let sessions = self
            .store()
            .live_sessions(now)?
            .into_iter()
            .map(|s| SessionInfo {
                source_id: s.source_id,
                server: s.server,
                created_at: s.created_at,
                expires_at: s.expires_at,
                revoked_at: s.revoked_at,
            })
            .collect();
        Ok(AdminSessionsResponse { sessions })
    }
}

fn subject(target: &RevokeTarget) -> String {
    match target {
        RevokeTarget::Session(id) | RevokeTarget::Server(id) | RevokeTarget::Token(id) => {
            id.clone()
        }
    }
}
