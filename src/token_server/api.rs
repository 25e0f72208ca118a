//! JSON request and response types of the token server, shared by the
//! server and its clients, and the byte strings that clients sign.
//!
//! Requests reject unknown fields so that a misspelt field fails loudly
//! instead of being ignored. Times are seconds since the Unix epoch. Keys,
//! challenges and signatures are standard base64; source identifiers,
//! client identifiers and tokens are opaque text.

use serde::{Deserialize, Serialize};

/// Maximum size of a request body, on both the public and the admin API.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Domain separation prefix of the session signature.
pub const SESSION_CONTEXT: &[u8] = b"h8 session v1\0";
/// Domain separation prefix of the token request signature.
pub const TOKEN_REQUEST_CONTEXT: &[u8] = b"h8 token request v1\0";

/// Builds the message a resource server signs to open a session:
/// `"h8 session v1\0" || challenge || name`.
pub fn session_message(challenge: &[u8], name: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(SESSION_CONTEXT.len() + challenge.len() + name.len());
    message.extend_from_slice(SESSION_CONTEXT);
    message.extend_from_slice(challenge);
    message.extend_from_slice(name.as_bytes());
    message
}

/// Builds the message a resource server signs to request a client token:
/// `"h8 token request v1\0" || source_id || 0x00 || application || 0x00 ||
/// timestamp as 8 bytes big-endian`.
pub fn token_request_message(source_id: &str, application: &str, timestamp: u64) -> Vec<u8> {
    let mut message =
        Vec::with_capacity(TOKEN_REQUEST_CONTEXT.len() + source_id.len() + application.len() + 10);
    message.extend_from_slice(TOKEN_REQUEST_CONTEXT);
    message.extend_from_slice(source_id.as_bytes());
    message.push(0);
    message.extend_from_slice(application.as_bytes());
    message.push(0);
    message.extend_from_slice(&timestamp.to_be_bytes());
    message
}

/// Body of every 4xx and 5xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, such as `code_expired`.
    pub error: String,
    /// Description of what failed, on which value, and what to do.
    pub message: String,
}

/// One published token-signing key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    /// Key id: 16 hex digits, as in [`crate::token::KeyId`].
    pub key_id: String,
    /// Ed25519 public key, standard base64 of 32 bytes.
    pub public_key: String,
    /// When the key stopped signing, or `None` for the current key.
    pub retired_at: Option<u64>,
}

/// Response of `GET /v1/keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysResponse {
    /// Issuer name written into every client token.
    pub issuer: String,
    /// The current key and every retired key whose tokens may still be valid.
    pub keys: Vec<PublishedKey>,
}

/// Request of `POST /v1/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// Resource server name the code was issued for.
    pub name: String,
    /// One-time enrollment code from `h8 admin enroll`.
    pub enrollment_code: String,
    /// The resource server's Ed25519 public key, standard base64.
    pub public_key: String,
}

/// Response of `POST /v1/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// Enrolled resource server name.
    pub name: String,
    /// Public key now bound to the name.
    pub public_key: String,
    /// Enrollment time.
    pub enrolled_at: u64,
}

/// Request of `POST /v1/session/challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// Enrolled resource server name.
    pub name: String,
}

/// Response of `POST /v1/session/challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// 32 random bytes, standard base64; usable once.
    pub challenge: String,
    /// End of the challenge's validity.
    pub expires_at: u64,
}

/// Request of `POST /v1/session`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// Enrolled resource server name.
    pub name: String,
    /// The challenge from `POST /v1/session/challenge`, as returned.
    pub challenge: String,
    /// Ed25519 signature over [`session_message`], standard base64.
    pub signature: String,
}

/// Response of `POST /v1/session`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResponse {
    /// Source identifier of the new session.
    pub source_id: String,
    /// End of the session.
    pub expires_at: u64,
}

/// Request of `POST /v1/token`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Source identifier of a live session.
    pub source_id: String,
    /// Resource application name from the policy.
    pub application: String,
    /// Client clock at signing; must be within 60 seconds of the server's.
    pub timestamp: u64,
    /// Ed25519 signature over [`token_request_message`], standard base64.
    pub signature: String,
}

/// Response of `POST /v1/token`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The client token, in the text form of [`crate::token::to_text`].
    pub token: String,
    /// End of the token's validity.
    pub expires_at: u64,
    /// Id of the key that signed the token.
    pub key_id: String,
}

/// Response of `GET /v1/revocations?since=EPOCH`.
///
/// When `since` equals the current epoch only `epoch` and `changed: false`
/// are sent; otherwise the full lists follow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationsResponse {
    /// Current revocation epoch; it increases with every revocation.
    pub epoch: u64,
    /// Whether the lists changed since the requested epoch.
    pub changed: bool,
    /// Revoked source identifiers whose sessions have not yet expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// Revoked resource server names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<Vec<String>>,
    /// Revoked token ids (hex) whose tokens have not yet expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<String>>,
}

/// Request of admin `POST /v1/admin/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminEnrollRequest {
    /// Resource server name to enroll.
    pub name: String,
    /// Lifetime of the code in seconds; the configured default when absent.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// Response of admin `POST /v1/admin/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminEnrollResponse {
    /// Resource server name the code is for.
    pub name: String,
    /// The one-time enrollment code. The server stores only its SHA-256.
    pub enrollment_code: String,
    /// End of the code's validity.
    pub expires_at: u64,
}

/// Request of admin `POST /v1/admin/revoke`: exactly one field is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRevokeRequest {
    /// Source identifier of the session to revoke.
    #[serde(default)]
    pub session: Option<String>,
    /// Resource server to revoke, with all its sessions.
    #[serde(default)]
    pub server: Option<String>,
    /// Token id (32 hex digits) to revoke.
    #[serde(default)]
    pub token: Option<String>,
}

/// Response of admin `POST /v1/admin/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRevokeResponse {
    /// Revocation epoch after the change.
    pub epoch: u64,
    /// Description of the revoked session, server or token.
    pub revoked: String,
}

/// Response of admin `POST /v1/admin/rotate-key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRotateKeyResponse {
    /// Id of the new signing key.
    pub key_id: String,
    /// Public half of the new signing key, standard base64.
    pub public_key: String,
    /// Id of the retired key.
    pub retired_key_id: String,
    /// Earliest time at which the retired key may leave `GET /v1/keys`; a
    /// token recorded after the rotation can keep it there a little longer.
    pub retired_key_published_until: u64,
}

/// One audit entry. Never contains a token, key or enrollment code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number, increasing.
    pub id: u64,
    /// Event time.
    pub at: u64,
    /// Event type: `enroll_code`, `enroll`, `session`, `issue`, `deny`,
    /// `revoke`, `rotate_key`, `policy`.
    pub event: String,
    /// Resource server, source identifier or key id the event is about.
    pub subject: String,
    /// Details in words.
    pub detail: String,
}

/// Response of admin `GET /v1/admin/audit?limit=N`, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminAuditResponse {
    /// The entries.
    pub entries: Vec<AuditEntry>,
}

/// One resource application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationInfo {
    /// Application name from the policy.
    pub name: String,
    /// Client identifier, stable across reloads and restarts.
    pub client_id: String,
    /// Resource servers authorized for the application.
    pub servers: Vec<String>,
}

/// Response of admin `GET /v1/admin/apps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminAppsResponse {
    /// Applications in the current policy, by name.
    pub applications: Vec<ApplicationInfo>,
}

/// One session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Source identifier.
    pub source_id: String,
    /// Resource server that opened it.
    pub server: String,
    /// Creation time.
    pub created_at: u64,
    /// End of the session.
    pub expires_at: u64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<u64>,
}

/// Response of admin `GET /v1/admin/sessions`: sessions not yet expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSessionsResponse {
    /// The sessions, newest first.
    pub sessions: Vec<SessionInfo>,
}

/// Response of admin `POST /v1/admin/reload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminReloadResponse {
    /// Number of applications in the policy now in force.
    pub applications: usize,
}
