//! Client and machine tokens: encoding, signing and verification.
//!
//! This module is sans-IO: it never reads a clock or touches a socket. Every
//! function that needs the time takes `now` in seconds since the Unix epoch.
//!
//! A token is a postcard-encoded [`Envelope`] that carries the
//! postcard-encoded [`Claims`] and an Ed25519 signature over
//! `SIGNING_CONTEXT || version || key id || claims`. The text form used in
//! HTTP bodies and files is unpadded base64url.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Token format version produced and accepted by this build.
pub const TOKEN_VERSION: u8 = 1;
/// Maximum encoded size of a token in bytes; larger input is rejected before decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Maximum number of peer grants in one token.
pub const MAX_GRANTS: usize = 256;
/// Maximum number of services in one grant.
pub const MAX_SERVICES_PER_GRANT: usize = 64;
/// Maximum length in bytes of every name carried in a token.
pub const MAX_NAME_LEN: usize = 128;
/// Service name that grants every service on a peer.
pub const ANY_SERVICE: &str = "*";

/// Domain separation for token signatures, so that no other h8 signature
/// (handshake transcripts, session challenges) can be replayed as a token.
const SIGNING_CONTEXT: &[u8] = b"h8 token signature v1\0";

/// Identifier of a signing key: the first 8 bytes of SHA-256 over the public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// Derives the key id of an Ed25519 public key.
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    /// Parses the 16-hex-digit form printed by [`fmt::Display`].
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(KeyId(bytes.try_into().ok()?))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Signer of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// Signed by a token server for a session.
    Client,
    /// Signed by a daemon for itself (side-car mode).
    Machine,
}

/// Permission to open the listed services on one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Resource server name of the peer, or `*` for every peer.
    pub peer: String,
    /// Service names on that peer; `*` grants every service.
    pub services: Vec<String>,
}

/// The signed content of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Token format version; equals the envelope's version.
    pub version: u8,
    /// Client token or machine token.
    pub kind: TokenKind,
    /// Key that signed the token; equals the envelope's key id.
    pub key_id: KeyId,
    /// Name of the token server (client tokens) or of the daemon (machine tokens).
    pub issuer: String,
    /// Client identifier of the resource application; empty for machine tokens.
    pub client_id: String,
    /// Source identifier of the session the token was issued to.
    pub source_id: String,
    /// Resource server name of the holder.
    pub server: String,
    /// Holder's Ed25519 public key: the holder must prove possession of it.
    pub server_key: [u8; 32],
    /// Peers and services the holder may reach.
    pub grants: Vec<Grant>,
    /// Issue time, seconds since the Unix epoch.
    pub issued_at: u64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: u64,
    /// End of validity (exclusive), seconds since the Unix epoch.
    pub expires_at: u64,
    /// Random token identifier, unique per issuance.
    pub token_id: [u8; 16],
}

impl Claims {
    /// Reports whether these claims let the holder open `service` on `peer`.
    pub fn allows(&self, peer: &str, service: &str) -> bool {
        self.grants.iter().any(|grant| {
            (grant.peer == peer || grant.peer == ANY_SERVICE)
                && grant
                    .services
                    .iter()
                    .any(|s| s == service || s == ANY_SERVICE)
        })
    }

    /// Checks the validity window at `now`, allowing `leeway` seconds of clock skew.
    pub fn check_time(&self, now: u64, leeway: u64) -> Result<(), TokenError> {
        if now.saturating_add(leeway) < self.not_before {
            return Err(TokenError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        if now >= self.expires_at.saturating_add(leeway) {
            return Err(TokenError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        Ok(())
    }

    /// Returns the token id as lowercase hex, the form used in logs and the store.
    pub fn token_id_hex(&self) -> String {
        hex::encode(self.token_id)
    }

    fn check_bounds(&self) -> Result<(), TokenError> {
        let names = [
            ("issuer", &self.issuer),
            ("client identifier", &self.client_id),
            ("source identifier", &self.source_id),
            ("resource server", &self.server),
        ];
        for (field, value) in names {
            if value.len() > MAX_NAME_LEN {
                return Err(TokenError::Malformed(format!(
                    "{field} is {} bytes long, the maximum is {MAX_NAME_LEN}",
                    value.len()
                )));
            }
        }
        if self.grants.len() > MAX_GRANTS {
            return Err(TokenError::Malformed(format!(
                "{} grants, the maximum is {MAX_GRANTS}",
                self.grants.len()
            )));
        }
        for grant in &self.grants {
            if grant.peer.len() > MAX_NAME_LEN
                || grant.services.len() > MAX_SERVICES_PER_GRANT
                || grant.services.iter().any(|s| s.len() > MAX_NAME_LEN)
            {
                return Err(TokenError::Malformed(format!(
                    "grant for peer {:?} exceeds the name or service limits",
                    truncate(&grant.peer)
                )));
            }
        }
        if self.expires_at <= self.not_before {
            return Err(TokenError::Malformed(
                "expiry is not after not-before".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Outer, signed wrapper of the claims.
#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u8,
    key_id: KeyId,
    claims: Vec<u8>,
    signature: Vec<u8>,
}

/// Token rejection reason. Each variant names one failed check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The encoded token exceeds [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes, the maximum is {max}")]
    TooLarge {
        /// Size of the rejected input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a token or violate a structural limit.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The text form is not valid base64url.
    #[error("token text is not valid unpadded base64url")]
    InvalidText,
    /// The token uses a format version this build does not know.
    #[error("unsupported token version {found}, this build accepts version {TOKEN_VERSION}")]
    UnsupportedVersion {
        /// Version in the token.
        found: u8,
    },
    /// No key with this id is in the verifier's key set.
    #[error("token is signed by unknown key {0}; check the pinned token-server keys")]
    UnknownKey(KeyId),
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token's expiry is in the past.
    #[error("token expired at {expires_at} (now {now})")]
    Expired {
        /// Expiry in the token.
        expires_at: u64,
        /// Time of the check.
        now: u64,
    },
    /// The token's not-before is in the future.
    #[error("token is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// Not-before in the token.
        not_before: u64,
        /// Time of the check.
        now: u64,
    },
    /// The issuer is not the expected one.
    #[error("token issuer is {found:?}, expected {expected:?}")]
    WrongIssuer {
        /// Expected issuer.
        expected: String,
        /// Issuer in the token.
        found: String,
    },
    /// A machine token where a client token was expected, or the reverse.
    #[error("expected a {expected:?} token, got a {found:?} token")]
    WrongKind {
        /// Expected kind.
        expected: TokenKind,
        /// Kind in the token.
        found: TokenKind,
    },
    /// A machine token whose signing key is not the key it names.
    #[error("machine token is not signed by the key it names")]
    NotSelfSigned,
}

/// A set of trusted signing keys, looked up by key id.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<(KeyId, VerifyingKey)>,
}

impl KeySet {
    /// Builds a key set from public keys.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        let mut set = KeySet::default();
        for key in keys {
            set.insert(key);
        }
        set
    }

    /// Adds a key; a key already present is kept once.
    pub fn insert(&mut self, key: VerifyingKey) {
        let id = KeyId::of(&key);
        if self.get(&id).is_none() {
            self.keys.push((id, key));
        }
    }

    /// Looks up a key by id.
    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }

    /// Iterates over the keys and their ids.
    pub fn iter(&self) -> impl Iterator<Item = (&KeyId, &VerifyingKey)> {
        self.keys.iter().map(|(id, key)| (id, key))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Reports whether the set has no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Requirements a verifier applies to a token besides a valid signature.
#[derive(Clone, Debug)]
pub struct Validation {
    /// Required kind.
    pub kind: TokenKind,
    /// Required issuer, or `None` to accept any issuer the key set trusts.
    pub issuer: Option<String>,
    /// Allowed clock skew in seconds, applied to both ends of the window.
    pub leeway: u64,
}

impl Validation {
    /// Validation of client tokens from `issuer` with the default leeway of 30 seconds.
    pub fn client(issuer: impl Into<String>) -> Self {
        Validation {
            kind: TokenKind::Client,
            issuer: Some(issuer.into()),
            leeway: 30,
        }
    }
}

/// A token whose signature, structure and validity window were checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The verified claims.
    pub claims: Claims,
}

/// Signs tokens with one Ed25519 key.
pub struct TokenSigner {
    key: SigningKey,
    key_id: KeyId,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Wraps a signing key.
    pub fn new(key: SigningKey) -> Self {
        let key_id = KeyId::of(&key.verifying_key());
        TokenSigner { key, key_id }
    }

    /// Id of the signing key.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Public half of the signing key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Encodes and signs `claims`. The claims' version and key id are set
    /// from this signer, so a caller cannot produce an inconsistent token.
    pub fn sign(&self, claims: &Claims) -> Vec<u8> {
        let mut claims = claims.clone();
        claims.version = TOKEN_VERSION;
        claims.key_id = self.key_id;
        // Encoding a struct of strings, vectors and integers into a Vec cannot fail.
        let claim_bytes = postcard::to_stdvec(&claims).unwrap_or_default();
        let signature = self
            .key
            .sign(&signed_message(TOKEN_VERSION, &self.key_id, &claim_bytes));
        let envelope = Envelope {
            version: TOKEN_VERSION,
            key_id: self.key_id,
            claims: claim_bytes,
            signature: signature.to_bytes().to_vec(),
        };
        postcard::to_stdvec(&envelope).unwrap_or_default()
    }
}

fn signed_message(version: u8, key_id: &KeyId, claims: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + 9 + claims.len());
    message.extend_from_slice(SIGNING_CONTEXT);
    message.push(version);
    message.extend_from_slice(&key_id.0);
    message.extend_from_slice(claims);
    message
}

/// Decodes a token without verifying its signature.
///
/// Only for display (`h8 token`): never authorize on the result.
pub fn decode_unverified(bytes: &[u8]) -> Result<Claims, TokenError> {
    let envelope = decode_envelope(bytes)?;
    decode_claims(&envelope)
}

fn decode_envelope(bytes: &[u8]) -> Result<Envelope, TokenError> {
    if bytes.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge {
            len: bytes.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let (envelope, rest): (Envelope, _) = postcard::take_from_bytes(bytes)
        .map_err(|e| TokenError::Malformed(format!("envelope: {e}")))?;
    if !rest.is_empty() {
        return Err(TokenError::Malformed(format!(
            "{} trailing bytes after the envelope",
            rest.len()
        )));
    }
    if envelope.version != TOKEN_VERSION {
        return Err(TokenError::UnsupportedVersion {
            found: envelope.version,
        });
    }
    if envelope.signature.len() != 64 {
        return Err(TokenError::Malformed(format!(
            "signature is {} bytes, expected 64",
            envelope.signature.len()
        )));
    }
    Ok(envelope)
}

fn decode_claims(envelope: &Envelope) -> Result<Claims, TokenError> {
    let (claims, rest): (Claims, _) = postcard::take_from_bytes(&envelope.claims)
        .map_err(|e| TokenError::Malformed(format!("claims: {e}")))?;
    if !rest.is_empty() {
        return Err(TokenError::Malformed(format!(
            "{} trailing bytes after the claims",
            rest.len()
        )));
    }
    if claims.version != envelope.version || claims.key_id != envelope.key_id {
        return Err(TokenError::Malformed(
            "claims disagree with the envelope on version or key id".to_owned(),
        ));
    }
    claims.check_bounds()?;
    Ok(claims)
}

/// Verifies a token: size and structure, signature against `keys`, kind,
/// issuer and validity window at `now`.
///
/// Scope is checked per stream with [`Claims::allows`], not here.
pub fn verify(
    bytes: &[u8],
    keys: &KeySet,
    validation: &Validation,
    now: u64,
) -> Result<VerifiedToken, TokenError> {
    // 1. Bounded decode of the envelope.
    let envelope = decode_envelope(bytes)?;

    // 2. Signature, before any claim is trusted or even parsed.
    let key = keys
        .get(&envelope.key_id)
        .ok_or(TokenError::UnknownKey(envelope.key_id))?;
    let signature =
        Signature::from_slice(&envelope.signature).map_err(|_| TokenError::BadSignature)?;
    let message = signed_message(envelope.version, &envelope.key_id, &envelope.claims);
    key.verify_strict(&message, &signature)
        .map_err(|_| TokenError::BadSignature)?;

    // 3. Claims structure and limits.
    let claims = decode_claims(&envelope)?;

    // 4. Kind and issuer.
    if claims.kind != validation.kind {
        return Err(TokenError::WrongKind {
            expected: validation.kind,
            found: claims.kind,
        });
    }
    if claims.kind == TokenKind::Machine && claims.server_key != key.to_bytes() {
        return Err(TokenError::NotSelfSigned);
    }
    if let Some(expected) = &validation.issuer {
        if &claims.issuer != expected {
            return Err(TokenError::WrongIssuer {
                expected: expected.clone(),
                found: truncate(&claims.issuer).to_owned(),
            });
        }
    }

    // 5. Validity window.
    claims.check_time(now, validation.leeway)?;

    Ok(VerifiedToken { claims })
}

/// Encodes a token in its text form (unpadded base64url).
pub fn to_text(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes the text form of a token, bounded by [`MAX_TOKEN_LEN`].
pub fn from_text(text: &str) -> Result<Vec<u8>, TokenError> {
    let text = text.trim();
    if text.len() > MAX_TOKEN_LEN * 4 / 3 + 4 {
        return Err(TokenError::TooLarge {
            len: text.len() * 3 / 4,
            max: MAX_TOKEN_LEN,
        });
    }
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| TokenError::InvalidText)
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
#[path = "token_tests.rs"]
mod tests;
