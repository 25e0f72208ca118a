//! The session daemon `h8d`: the async driver around the sans-IO core.
//!
//! ```text
//! Daemon ─┬─ credentials   session task (token server) or machine-token rotator
//!         ├─ endpoint      one quinn endpoint: accept loop + lazy connects
//!         │    └─ peers    one PeerConnection per peer, each with a stream accept loop
//!         ├─ services      incoming streams → unix:/tcp: targets or the accept queues
//!         └─ local_api     HTTP on a Unix socket (separate module)
//! ```

mod connection;
pub mod credentials;
mod external_authorizer;
pub mod forward;
pub mod forwards;
mod http_identity;
pub mod lifecycle;
pub mod pipe;
pub mod session;
pub mod sidecar;
mod streams;
pub mod tls;
mod token_update;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::{mpsc, watch, Mutex, Semaphore};

pub use self::connection::PeerConnection;
pub use self::streams::{IncomingStream, OpenError, OpenedStream};
use crate::config::DaemonConfig;
use crate::daemon::credentials::CredentialStore;
use crate::identity::IdentityKey;
use crate::token::Claims;

/// Seconds since the Unix epoch from the system clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The verified identity of the daemon at the other end of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Resource server name.
    pub name: String,
    /// Client identifier of its resource application (empty in side-car mode).
    pub client_id: String,
    /// Source identifier of its session (`machine:<name>` in side-car mode).
    pub source_id: String,
}

impl PeerIdentity {
    /// Extracts the identity from verified claims.
    pub fn from_claims(claims: &Claims) -> Self {
        PeerIdentity {
            name: claims.server.clone(),
            client_id: claims.client_id.clone(),
            source_id: claims.source_id.clone(),
        }
    }
}

/// Session state as shown by status and systemd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// No usable token yet.
    Starting,
    /// A valid token, and the token server (if any) reachable.
    Active,
    /// A valid token, but the token server is unreachable; peers are still served.
    Degraded(String),
    /// No valid token; streams cannot be opened or accepted.
    Down(String),
}

impl SessionState {
    /// Short name for JSON and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Active => "active",
            SessionState::Degraded(_) => "degraded",
            SessionState::Down(_) => "down",
        }
    }

    /// Text of the systemd `STATUS=` notification; says "degraded" while
    /// the token server is unreachable.
    pub fn status_text(&self) -> String {
        match self {
            SessionState::Active => "ready".to_owned(),
            SessionState::Degraded(reason) => format!("ready, degraded: {reason}"),
            SessionState::Starting => "ready, waiting for a token".to_owned(),
            SessionState::Down(reason) => format!("ready, down: {reason}"),
        }
    }
}

/// Counters exported as Prometheus metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Handshakes completed, both directions.
    pub handshakes_ok: AtomicU64,
    /// Handshakes that failed, both directions.
    pub handshakes_failed: AtomicU64,
    /// Streams opened towards peers and accepted by them.
    pub streams_opened: AtomicU64,
    /// Incoming streams accepted.
    pub streams_accepted: AtomicU64,
    /// Incoming streams rejected.
    pub streams_rejected: AtomicU64,
    /// Streams currently open, both directions.
    pub streams_active: AtomicU64,
    /// Bytes sent to peers on streams.
    pub bytes_sent: AtomicU64,
    /// Bytes received from peers on streams.
    pub bytes_received: AtomicU64,
}

impl Metrics {
    /// Adds the bytes of a finished stream to the byte counters.
    pub fn record_pipe(&self, stats: &pipe::PipeStats) {
        self.bytes_sent.fetch_add(stats.sent, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(stats.received, Ordering::Relaxed);
    }
}

/// Per-peer bookkeeping shown by `h8 peers`.
#[derive(Debug, Default)]
pub struct PeerStatus {
    /// Last connection or handshake error, if any.
    pub last_error: Option<String>,
    /// When the last connection attempt failed.
    pub last_failure: Option<Instant>,
    /// Consecutive failed attempts, for backoff.
    pub failures: u32,
}

/// A pending incoming stream for a service whose target is `accept`.
pub type AcceptQueue = mpsc::Sender<IncomingStream>;

/// Both ends of a service's accept queue; local callers take turns on the receiver.
pub type AcceptQueuePair = (AcceptQueue, Arc<Mutex<mpsc::Receiver<IncomingStream>>>);

/// State shared by every task of one daemon.
pub struct Shared {
    /// Current configuration; replaced on reload.
    pub config: RwLock<Arc<DaemonConfig>>,
    /// This daemon's identity key.
    pub identity: Arc<IdentityKey>,
    /// Current token, trust and revocations.
    pub credentials: CredentialStore,
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// Live connections by peer name.
    pub connections: DashMap<String, Arc<PeerConnection>>,
    /// Serializes connection attempts per peer.
    pub(crate) connect_locks: DashMap<String, Arc<Mutex<()>>>,
    /// Per-peer status.
    pub peer_status: DashMap<String, PeerStatus>,
    /// Queues of incoming streams for `accept` services, by service name.
    pub accept_queues: DashMap<String, AcceptQueuePair>,
    /// Limits handshakes in progress.
    pub(crate) handshake_permits: Arc<Semaphore>,
    /// Session state.
    pub session: RwLock<SessionState>,
    /// Counters.
    pub metrics: Metrics,
    /// Start time, for uptime.
    pub started: Instant,
    /// True once shutdown began: no new streams.
    pub shutting_down: watch::Sender<bool>,
    /// Decision cache and warning limiter of the side-car external authorizer.
    pub(crate) authorizer: external_authorizer::AuthorizerState,
    next_connection_id: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// A running daemon. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Daemon {
    /// Shared state.
    pub shared: Arc<Shared>,
}

/// Depth of each `accept` service's queue of waiting streams.
pub const ACCEPT_QUEUE_DEPTH: usize = 64;

impl Daemon {
    /// Binds the QUIC endpoint and starts accepting connections. Credentials
    /// must be installed (by the session task or the rotator) before peers
    /// can be served.
    pub fn start(config: DaemonConfig, identity: IdentityKey) -> anyhow::Result<Daemon> {
        let identity = Arc::new(identity);
        let endpoint = connection::bind_endpoint(&config, &identity)?;
        let handshake_permits = Arc::new(Semaphore::new(config.quic.max_concurrent_handshakes));
        let shared = Arc::new(Shared {
            config: RwLock::new(Arc::new(config)),
            identity,
            credentials: CredentialStore::default(),
            endpoint,
            connections: DashMap::new(),
            connect_locks: DashMap::new(),
            peer_status: DashMap::new(),
            accept_queues: DashMap::new(),
            handshake_permits,
            session: RwLock::new(SessionState::Starting),
            metrics: Metrics::default(),
            started: Instant::now(),
            shutting_down: watch::channel(false).0,
            authorizer: external_authorizer::AuthorizerState::default(),
            next_connection_id: AtomicU64::new(1),
        });
        let daemon = Daemon { shared };
        daemon.sync_accept_queues();
        tokio::spawn(connection::accept_loop(daemon.clone()));
        Ok(daemon)
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<DaemonConfig> {
        self.shared
            .config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// The session state.
    pub fn session_state(&self) -> SessionState {
        self.shared
            .session
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets the session state and logs changes.
    pub fn set_session_state(&self, state: SessionState) {
        let mut current = self
            .shared
            .session
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current != state {
            match &state {
                SessionState::Degraded(reason) | SessionState::Down(reason) => {
                    tracing::warn!(state = state.as_str(), %reason, "session state changed");
                }
                _ => tracing::info!(state = state.as_str(), "session state changed"),
            }
            crate::systemd::status(&state.status_text());
            *current = state;
        }
    }

    /// Reports whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shared.shutting_down.borrow()
    }

    /// Opens an authorized stream to `service` on `peer`.
    pub async fn open_stream(&self, peer: &str, service: &str) -> Result<OpenedStream, OpenError> {
        streams::open_stream(self, peer, service).await
    }

    /// Waits for the next incoming stream of an `accept` service, up to `timeout`.
    pub async fn accept_stream(
        &self,
        service: &str,
        timeout: Duration,
    ) -> Result<IncomingStream, OpenError> {
        streams::accept_stream(self, service, timeout).await
    }

    /// Sends this daemon's current token to every connected peer; called
    /// after a refresh or rotation.
    pub async fn push_token_update(&self) {
        token_update::push(self).await;
    }

    /// Pipes a stream to a local byte stream until both directions end,
    /// counting the bytes in the metrics.
    pub async fn pipe<L>(
        &self,
        local: L,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<pipe::PipeStats, pipe::PipeError>
    where
        L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        streams::pipe_counted(self, local, send, recv).await
    }

    /// Replaces the configuration after a successful reload: peers and
    /// services that were removed are dropped, unchanged ones are untouched.
    pub fn apply_config(&self, config: DaemonConfig) {
        let removed: Vec<String> = {
            let old = self.config();
            old.peers
                .keys()
                .filter(|name| match config.peers.get(*name) {
                    None => true,
                    Some(new) => {
                        new.address != old.peers[*name].address
                            || new.public_key != old.peers[*name].public_key
                    }
                })
                .cloned()
                .collect()
        };
        *self
            .shared
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        for name in removed {
            if let Some((_, connection)) = self.shared.connections.remove(&name) {
                tracing::info!(peer = %name, "closing connection to a peer removed or changed by reload");
                connection.close(
                    crate::wire::RejectCode::ShuttingDown,
                    "peer removed from config",
                );
            }
        }
        self.sync_accept_queues();
    }

    fn sync_accept_queues(&self) {
        let config = self.config();
        let wanted: Vec<String> = config
            .services
            .values()
            .filter(|s| s.target == crate::config::Target::Accept)
            .map(|s| s.name.clone())
            .collect();
        self.shared
            .accept_queues
            .retain(|name, _| wanted.contains(name));
        for name in wanted {
            self.shared.accept_queues.entry(name).or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE_DEPTH);
                (sender, Arc::new(Mutex::new(receiver)))
            });
        }
    }

    /// Closes every connection whose peer token is revoked by the current list.
    pub fn close_revoked(&self) {
        let revocations = self.shared.credentials.revocations();
        let revoked: Vec<(String, String)> = self
            .shared
            .connections
            .iter()
            .filter_map(|entry| {
                revocations
                    .reason(&entry.claims())
                    .map(|reason| (entry.key().clone(), reason))
            })
            .collect();
        for (name, reason) in revoked {
            if let Some((_, connection)) = self.shared.connections.remove(&name) {
                tracing::warn!(peer = %name, %reason, "closing connection of a revoked peer");
                connection.close(crate::wire::RejectCode::Revoked, &reason);
            }
        }
    }

    /// Closes connections whose peer key is no longer pinned (side-car reload).
    pub fn close_unpinned(&self, pinned: &HashMap<String, ed25519_dalek::VerifyingKey>) {
        let stale: Vec<String> = self
            .shared
            .connections
            .iter()
            .filter(|entry| {
                pinned.get(entry.key()).map(|k| k.to_bytes()) != Some(entry.claims().server_key)
            })
            .map(|entry| entry.key().clone())
            .collect();
        for name in stale {
            if let Some((_, connection)) = self.shared.connections.remove(&name) {
                tracing::info!(peer = %name, "closing connection: peer key no longer pinned");
                connection.close(
                    crate::wire::RejectCode::NotPinned,
                    "peer key no longer pinned",
                );
            }
        }
    }

    /// Begins shutdown: no new streams or connections are accepted.
    pub fn begin_shutdown(&self) {
        self.shared.shutting_down.send_replace(true);
        self.shared.endpoint.set_server_config(None);
    }

    /// Closes every connection and the endpoint.
    pub async fn close(&self, reason: &str) {
        for entry in self.shared.connections.iter() {
            entry.close(crate::wire::RejectCode::ShuttingDown, reason);
        }
        self.shared.connections.clear();
        self.shared.endpoint.close(
            crate::wire::RejectCode::ShuttingDown.close_code().into(),
            reason.as_bytes(),
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.shared.endpoint.wait_idle()).await;
    }

    fn next_connection_id(&self) -> u64 {
        self.shared
            .next_connection_id
            .fetch_add(1, Ordering::Relaxed)
    }
}
