//! JSON bodies of the local API, shared by the daemon and the `h8` client.

use serde::{Deserialize, Serialize};

/// Name of the `Upgrade` protocol for raw streams.
pub const UPGRADE_PROTOCOL: &str = "h8-stream";
/// Response header of `/v1/accept`: the caller's resource server name.
pub const HEADER_PEER: &str = "h8-peer";
/// Response header of `/v1/accept`: the caller's client identifier.
pub const HEADER_CLIENT_ID: &str = "h8-client-id";
/// Response header of `/v1/accept`: the caller's source identifier.
pub const HEADER_SOURCE_ID: &str = "h8-source-id";

/// Body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, such as `unknown_peer` or `policy_denied`.
    pub error: String,
    /// What failed and what to do next.
    pub message: String,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// This daemon's resource server name.
    pub name: String,
    /// `token-server` or `side-car`.
    pub mode: String,
    /// `starting`, `active`, `degraded` or `down`.
    pub session_state: String,
    /// True unless the session is active.
    pub degraded: bool,
    /// Why the session is not active.
    pub degraded_reason: Option<String>,
    /// Source identifier of this daemon's session.
    pub source_id: Option<String>,
    /// Client identifier of this daemon's resource application (empty in side-car mode).
    pub client_id: Option<String>,
    /// Expiry of this daemon's token, seconds since the Unix epoch.
    pub token_expires_at: Option<u64>,
    /// Seconds until the token expires; 0 once expired.
    pub token_expires_in_secs: Option<u64>,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Version of `h8d`.
    pub version: String,
    /// Bound QUIC address.
    pub listen: String,
    /// Peers in the config.
    pub peers: usize,
    /// Streams open now, both directions.
    pub streams_active: u64,
}

/// `GET /v1/peers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerList {
    /// Peers in config order (sorted by name).
    pub peers: Vec<PeerInfo>,
}

/// One peer in `GET /v1/peers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer's resource server name.
    pub name: String,
    /// Configured `host:port`.
    pub address: String,
    /// `connected`, `idle` (no connection yet) or `failed` (last attempt failed).
    pub state: String,
    /// Round-trip time estimate in milliseconds while connected.
    pub rtt_ms: Option<f64>,
    /// Streams open on the connection now.
    pub open_streams: u64,
    /// Last connection or handshake error.
    pub last_error: Option<String>,
}

/// `GET /v1/token`: the decoded claims of this daemon's own token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    /// `client` (from a token server) or `machine` (self-signed, side-car mode).
    pub kind: String,
    /// Token server name, or this daemon's name for machine tokens.
    pub issuer: String,
    /// Key id of the signing key, 16 hex digits.
    pub key_id: String,
    /// Client identifier of the resource application.
    pub client_id: String,
    /// Source identifier of the session.
    pub source_id: String,
    /// Resource server name the token was issued to.
    pub server: String,
    /// The holder's Ed25519 public key, base64.
    pub server_key: String,
    /// Peers and services the token grants.
    pub grants: Vec<GrantInfo>,
    /// Issue time, seconds since the Unix epoch.
    pub issued_at: u64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: u64,
    /// End of validity, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Seconds until expiry; 0 once expired.
    pub expires_in_secs: u64,
    /// Token id, 32 hex digits.
    pub token_id: String,
}

/// One grant of a token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Peer name or `*`.
    pub peer: String,
    /// Service names or `*`.
    pub services: Vec<String>,
}

/// `POST /v1/reload` on success.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadSummary {
    /// Always true in a 200 response.
    pub reloaded: bool,
    /// Peers in the new config.
    pub peers: usize,
    /// Services in the new config.
    pub services: usize,
    /// Forwards in the new config.
    pub forwards: usize,
}
