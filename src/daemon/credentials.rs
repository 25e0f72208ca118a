//! This daemon's current token and the trust it applies to peers.
//!
//! The session task (token-server mode) or the machine-token rotator
//! (side-car mode) replaces the credentials; handshakes and stream checks
//! read a snapshot. Readers never wait on a network call.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rand_core::{OsRng, RngCore as _};

use crate::authorize::{RevocationSet, StreamAuthority};
use crate::handshake::Trust;
use crate::identity::IdentityKey;
use crate::token::{Claims, TokenKind, TokenSigner, TOKEN_VERSION};

/// A consistent snapshot of what this daemon presents and accepts.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// This daemon's token, encoded.
    pub token: Vec<u8>,
    /// Claims of that token.
    pub claims: Claims,
    /// Trust used to verify peers' tokens.
    pub trust: Trust,
    /// Authority that decides incoming streams.
    pub authority: StreamAuthority,
}

/// Shared, replaceable credentials plus the revocation list.
#[derive(Debug, Default)]
pub struct CredentialStore {
    current: RwLock<Option<Arc<Credentials>>>,
    revocations: RwLock<Arc<RevocationSet>>,
}

impl CredentialStore {
    /// The current credentials, or `None` before the first token arrived.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the credentials.
    pub fn set(&self, credentials: Credentials) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(credentials));
    }

    /// The current revocation list.
    pub fn revocations(&self) -> Arc<RevocationSet> {
        self.revocations
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the revocation list.
    pub fn set_revocations(&self, revocations: RevocationSet) {
        *self
            .revocations
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(revocations);
    }
}

/// Signs a machine token for this daemon, valid from `now` for `lifetime` seconds.
pub fn machine_token(
    identity: &IdentityKey,
    name: &str,
    now: u64,
    lifetime: u64,
) -> (Vec<u8>, Claims) {
    let signer = TokenSigner::new(identity.signing_key().clone());
    let mut token_id = [0u8; 16];
    OsRng.fill_bytes(&mut token_id);
    let claims = Claims {
        version: TOKEN_VERSION,
        kind: TokenKind::Machine,
        key_id: signer.key_id(),
        issuer: name.to_owned(),
        client_id: String::new(),
        source_id: format!("machine:{name}"),
        server: name.to_owned(),
        server_key: identity.public().to_bytes(),
        grants: Vec::new(),
        issued_at: now,
        not_before: now,
        expires_at: now + lifetime,
        token_id,
    };
    let token = signer.sign(&claims);
    (token, claims)
}

/// Builds side-car trust from the pinned peer keys.
pub fn sidecar_trust(pinned: HashMap<String, ed25519_dalek::VerifyingKey>, leeway: u64) -> Trust {
    Trust::Sidecar { pinned, leeway }
}
