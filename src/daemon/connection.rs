//! QUIC connections between daemons: binding, accepting, connecting, the
//! handshake driver, and keeping one connection per peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use quinn::{Endpoint, TransportConfig, VarInt};
use rand_core::{OsRng, RngCore as _};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Mutex;
use tracing::{debug, info, warn, Instrument as _};

use super::tls;
use super::{unix_now, Daemon, PeerStatus};
use crate::config::DaemonConfig;
use crate::handshake::{
    done_frame, reject_frame, ConnectionContext, Established, Initiator, LocalIdentity, Responder,
    EXPORTER_LABEL, EXPORTER_LEN,
};
use crate::identity::IdentityKey;
use crate::token::Claims;
use crate::wire::{self, Reject, RejectCode, MAX_FRAME_LEN};

/// Backoff after a failed connection attempt: 250 ms doubling up to 30 s.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Two connections established this close together are a simultaneous connect.
const DUPLICATE_RACE_WINDOW: Duration = Duration::from_secs(3);

/// A live, authenticated connection to a peer.
#[derive(Debug)]
pub struct PeerConnection {
    /// Short id for logs.
    pub id: u64,
    /// The QUIC connection.
    pub connection: quinn::Connection,
    /// The peer's resource server name.
    pub peer_name: String,
    /// The peer's verified claims; replaced when the peer sends a newer token.
    claims: RwLock<Arc<Claims>>,
    /// True when this daemon dialed the connection.
    pub initiated_here: bool,
    /// When the handshake completed.
    pub established_at: Instant,
    /// Streams open on this connection now.
    pub open_streams: AtomicU64,
}

impl PeerConnection {
    /// The peer's current verified claims.
    pub fn claims(&self) -> Arc<Claims> {
        self.claims
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the peer's claims after a verified token update.
    pub fn set_claims(&self, claims: Claims) {
        *self
            .claims
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(claims);
    }

    /// Closes the connection with a reason code and text.
    pub fn close(&self, code: RejectCode, reason: &str) {
        self.connection
            .close(code.close_code().into(), reason.as_bytes());
    }

    /// Round-trip time estimate of the connection.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
    }
}

/// Streams a peer may have open at once on a new connection. quinn keeps
/// state for every stream the peer is allowed to open, about 70 bytes each,
/// so the limit starts here and doubles as streams are used, up to
/// `max_streams_per_connection` (see `serve_connection`).
pub(super) const INITIAL_STREAM_LIMIT: u32 = 64;

fn transport(config: &DaemonConfig) -> anyhow::Result<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(config.quic.keepalive_secs)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(config.quic.idle_timeout_secs).try_into()?,
    ));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(
        config
            .quic
            .max_streams_per_connection
            .min(INITIAL_STREAM_LIMIT),
    ));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Larger flow-control windows than quinn's defaults so one stream can
    // fill a fast link; back-pressure still applies at these bounds.
    transport.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    transport.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    transport.send_window(32 * 1024 * 1024);
    Ok(transport)
}

/// Binds the daemon's QUIC endpoint on the configured address.
pub(super) fn bind_endpoint(
    config: &DaemonConfig,
    identity: &IdentityKey,
) -> anyhow::Result<Endpoint> {
    let (client_crypto, server_crypto) = tls::quic_crypto(identity, &config.name)
        .map_err(|e| anyhow::anyhow!("cannot build the TLS configuration: {e}"))?;
    let transport = Arc::new(transport(config)?);

    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);

    let mut endpoint = Endpoint::server(server, config.listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot bind the QUIC endpoint on UDP {}: {e}; is another daemon using this port?",
            config.listen
        )
    })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

fn exporter(connection: &quinn::Connection) -> Result<[u8; EXPORTER_LEN], Reject> {
    let mut output = [0u8; EXPORTER_LEN];
    connection
        .export_keying_material(&mut output, EXPORTER_LABEL, b"")
        .map_err(|_| Reject::new(RejectCode::Internal, "TLS exporter unavailable"))?;
    Ok(output)
}

fn context(connection: &quinn::Connection) -> Result<ConnectionContext, Reject> {
    let peer_tls_key = tls::peer_tls_key(connection).ok_or_else(|| {
        Reject::new(
            RejectCode::KeyMismatch,
            "peer presented no Ed25519 certificate",
        )
    })?;
    Ok(ConnectionContext {
        exporter: exporter(connection)?,
        peer_tls_key,
    })
}

fn ephemeral_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    seed
}

/// Reads one length-prefixed frame body of at most `max` bytes.
pub(super) async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Vec<u8>, Reject> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| Reject::new(RejectCode::Malformed, format!("reading frame length: {e}")))?;
    let len = wire::frame_len(prefix, max)
        .map_err(|e| Reject::new(RejectCode::Malformed, e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| Reject::new(RejectCode::Malformed, format!("reading frame body: {e}")))?;
    Ok(body)
}

fn local_identity(daemon: &Daemon) -> Result<(LocalIdentity, crate::handshake::Trust), Reject> {
    let credentials = daemon.shared.credentials.current().ok_or_else(|| {
        Reject::new(
            RejectCode::ServiceUnavailable,
            "this daemon has no token yet",
        )
    })?;
    let local = LocalIdentity {
        name: daemon.config().name.clone(),
        key: daemon.shared.identity.signing_key().clone(),
        token: credentials.token.clone(),
    };
    Ok((local, credentials.trust.clone()))
}

/// Accepts incoming connections until the endpoint closes.
pub(super) async fn accept_loop(daemon: Daemon) {
    while let Some(incoming) = daemon.shared.endpoint.accept().await {
        let Ok(permit) = daemon.shared.handshake_permits.clone().try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "refusing connection: too many handshakes in progress");
            incoming.refuse();
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let timeout = Duration::from_secs(daemon.config().quic.handshake_timeout_secs);
            let result = tokio::time::timeout(timeout, accept_connection(&daemon, incoming)).await;
            drop(permit);
            match result {
                Ok(Ok(())) => {}
                Ok(Err(reject)) => {
                    daemon
                        .shared
                        .metrics
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, code = reject.code.as_str(), reason = %reject.reason, "incoming handshake failed");
                }
                Err(_) => {
                    daemon
                        .shared
                        .metrics
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, "incoming handshake timed out");
                }
            }
        });
    }
}

async fn accept_connection(daemon: &Daemon, incoming: quinn::Incoming) -> Result<(), Reject> {
    let connection = incoming.await.map_err(|e| {
        Reject::new(
            RejectCode::Malformed,
            format!("QUIC/TLS handshake failed: {e}"),
        )
    })?;
    let (mut send, mut recv) = connection
        .accept_bi()
        .await
        .map_err(|e| Reject::new(RejectCode::Malformed, format!("no handshake stream: {e}")))?;

    let result = async {
        let (local, trust) = local_identity(daemon)?;
        let responder = Responder::new(local, trust, context(&connection)?, ephemeral_seed());
        let hello = read_frame(&mut recv, MAX_FRAME_LEN).await?;
        let (responder, server_hello) = responder.handle_client_hello(&hello, unix_now())?;
        send.write_all(&server_hello)
            .await
            .map_err(|e| Reject::new(RejectCode::Malformed, e.to_string()))?;
        let finish = read_frame(&mut recv, MAX_FRAME_LEN).await?;
        let established = responder.handle_client_finish(&finish)?;
        check_established(daemon, &established)?;
        Ok(established)
    }
    .await;

    let established = match result {
        Ok(established) => established,
        Err(reject) => {
            let _ = send.write_all(&reject_frame(&reject)).await;
            let _ = send.finish();
            // Give the reject frame a moment to leave before the close.
            let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
            connection.close(reject.code.close_code().into(), reject.reason.as_bytes());
            return Err(reject);
        }
    };

    let peer_name = established.peer.server.clone();
    let registered = register(daemon, connection.clone(), established, false);
    match registered {
        Ok(peer) => {
            send.write_all(&done_frame())
                .await
                .map_err(|e| Reject::new(RejectCode::Malformed, e.to_string()))?;
            let _ = send.finish();
            info!(peer = %peer_name, conn = peer.id, remote = %connection.remote_address(), "peer connected (incoming)");
            Ok(())
        }
        Err(reject) => {
            let _ = send.write_all(&reject_frame(&reject)).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
            connection.close(reject.code.close_code().into(), reject.reason.as_bytes());
            debug!(peer = %peer_name, reason = %reject.reason, "incoming connection not kept");
            Ok(())
        }
    }
}

/// Checks that apply after both proofs: the peer is configured (and in
/// side-car mode pinned) and not revoked.
fn check_established(daemon: &Daemon, established: &Established) -> Result<(), Reject> {
    let config = daemon.config();
    let name = &established.peer.server;
    if !config.peers.contains_key(name) {
        return Err(Reject::new(
            RejectCode::WrongPeer,
            format!("{name:?} is not a configured peer of {:?}", config.name),
        ));
    }
    if let Some(reason) = daemon
        .shared
        .credentials
        .revocations()
        .reason(&established.peer)
    {
        return Err(Reject::new(RejectCode::Revoked, reason));
    }
    Ok(())
}

/// Registers an established connection, keeping one per peer.
///
/// When both daemons dial each other at once, each side keeps the
/// connection dialed by the daemon whose name sorts first, so both keep the
/// same one.
fn register(
    daemon: &Daemon,
    connection: quinn::Connection,
    established: Established,
    initiated_here: bool,
) -> Result<Arc<PeerConnection>, Reject> {
    let local_name = daemon.config().name.clone();
    let peer_name = established.peer.server.clone();
    let winner_is_local = local_name < peer_name;
    let candidate = Arc::new(PeerConnection {
        id: daemon.next_connection_id(),
        connection,
        peer_name: peer_name.clone(),
        claims: RwLock::new(Arc::new(established.peer)),
        initiated_here,
        established_at: Instant::now(),
        open_streams: AtomicU64::new(0),
    });

    let mut replaced = None;
    {
        let mut entry = daemon
            .shared
            .connections
            .entry(peer_name.clone())
            .or_insert_with(|| candidate.clone());
        let existing = entry.value().clone();
        if !Arc::ptr_eq(&existing, &candidate) {
            if existing.connection.close_reason().is_none() {
                // Only a race of two fresh connections is settled by name. An
                // older connection loses to a new one: the peer dialing again
                // means it restarted or lost the old connection.
                let candidate_preferred = candidate.initiated_here == winner_is_local;
                let existing_preferred = existing.initiated_here == winner_is_local;
                let racing = existing.established_at.elapsed() < DUPLICATE_RACE_WINDOW;
                if existing_preferred && !candidate_preferred && racing {
                    return Err(Reject::new(
                        RejectCode::DuplicateConnection,
                        format!("a connection with {peer_name:?} already exists"),
                    ));
                }
                replaced = Some(existing);
            }
            *entry.value_mut() = candidate.clone();
        }
    }
    if let Some(old) = replaced {
        debug!(peer = %peer_name, old = old.id, new = candidate.id, "replacing duplicate connection");
        old.close(
            RejectCode::DuplicateConnection,
            "replaced by the connection dialed by the lower name",
        );
    }
    daemon
        .shared
        .metrics
        .handshakes_ok
        .fetch_add(1, Ordering::Relaxed);
    daemon
        .shared
        .peer_status
        .insert(peer_name.clone(), PeerStatus::default());

    let serving = daemon.clone();
    let peer = candidate.clone();
    let span = tracing::info_span!("peer", peer = %peer_name, conn = candidate.id);
    tokio::spawn(super::streams::serve_connection(serving, peer).instrument(span));
    Ok(candidate)
}

/// Returns the live connection to `peer`, dialing it if there is none.
pub(super) async fn connection_to(
    daemon: &Daemon,
    peer: &str,
) -> Result<Arc<PeerConnection>, super::OpenError> {
    use super::OpenError;

    if let Some(existing) = live(daemon, peer) {
        return Ok(existing);
    }
    let config = daemon.config();
    let Some(peer_config) = config.peers.get(peer).cloned() else {
        return Err(OpenError::UnknownPeer(peer.to_owned()));
    };

    let lock = daemon
        .shared
        .connect_locks
        .entry(peer.to_owned())
        .or_insert_with(|| Arc::new(Mutex::new(())))
        .clone();
    let _guard = lock.lock().await;
    if let Some(existing) = live(daemon, peer) {
        return Ok(existing);
    }

    // Back off after recent failures, so a dead peer is not dialed per stream.
    if let Some(status) = daemon.shared.peer_status.get(peer) {
        if let Some(failed_at) = status.last_failure {
            let backoff = backoff(status.failures);
            if failed_at.elapsed() < backoff {
                return Err(OpenError::Unreachable(format!(
                    "{}; retrying after {} ms",
                    status.last_error.clone().unwrap_or_default(),
                    (backoff - failed_at.elapsed()).as_millis()
                )));
            }
        }
    }

    let timeout = Duration::from_secs(config.quic.handshake_timeout_secs);
    let result = tokio::time::timeout(
        timeout,
        dial(daemon, &peer_config.name, &peer_config.address),
    )
    .await;
    let result = match result {
        Ok(result) => result,
        Err(_) => Err(OpenError::TimedOut(format!(
            "connecting to peer {peer:?} at {} timed out after {} s",
            peer_config.address,
            timeout.as_secs()
        ))),
    };
    match &result {
        Ok(_) => {
            daemon
                .shared
                .peer_status
                .insert(peer.to_owned(), PeerStatus::default());
        }
        Err(error) => {
            daemon
                .shared
                .metrics
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            let mut status = daemon
                .shared
                .peer_status
                .entry(peer.to_owned())
                .or_default();
            status.failures = status.failures.saturating_add(1);
            status.last_failure = Some(Instant::now());
            status.last_error = Some(error.to_string());
            warn!(peer, error = %error, "connecting to peer failed");
        }
    }
    result
}

fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let millis = 250u64.saturating_mul(1 << (failures - 2).min(10));
    Duration::from_millis(millis).min(MAX_BACKOFF)
}

fn live(daemon: &Daemon, peer: &str) -> Option<Arc<PeerConnection>> {
    let entry = daemon.shared.connections.get(peer)?;
    if entry.connection.close_reason().is_none() {
        Some(entry.clone())
    } else {
        None
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, String> {
    let mut addresses = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve {address:?}: {e}"))?;
    addresses
        .next()
        .ok_or_else(|| format!("{address:?} resolved to no address"))
}

async fn dial(
    daemon: &Daemon,
    peer: &str,
    address: &str,
) -> Result<Arc<PeerConnection>, super::OpenError> {
    use super::OpenError;

    let (local, trust) = local_identity(daemon).map_err(OpenError::Rejected)?;
    let remote = resolve(address).await.map_err(OpenError::Unreachable)?;
    let connecting = daemon.shared.endpoint.connect(remote, "h8").map_err(|e| {
        OpenError::Unreachable(format!("cannot connect to {peer:?} at {remote}: {e}"))
    })?;
    let connection = connecting.await.map_err(|e| {
        OpenError::Unreachable(format!(
            "QUIC connection to {peer:?} at {remote} failed: {e}"
        ))
    })?;

    let handshake = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| Reject::new(RejectCode::Malformed, e.to_string()))?;
        let (initiator, hello) =
            Initiator::start(local, trust, context(&connection)?, peer, ephemeral_seed());
        send.write_all(&hello)
            .await
            .map_err(|e| Reject::new(RejectCode::Malformed, e.to_string()))?;
        let server_hello = read_frame(&mut recv, MAX_FRAME_LEN).await?;
        let (initiator, finish) = match initiator.handle_server_hello(&server_hello, unix_now()) {
            Ok(next) => next,
            Err(reject) => {
                let _ = send.write_all(&reject_frame(&reject)).await;
                let _ = send.finish();
                return Err(reject);
            }
        };
        send.write_all(&finish)
            .await
            .map_err(|e| Reject::new(RejectCode::Malformed, e.to_string()))?;
        let _ = send.shutdown().await;
        let done = read_frame(&mut recv, MAX_FRAME_LEN).await?;
        initiator.handle_done(&done)
    }
    .await;

    // The peer may close this connection as a duplicate before its reject
    // frame is read; the close code then says what the frame would have.
    let handshake = handshake.map_err(|reject| match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == RejectCode::DuplicateConnection.close_code().into() =>
        {
            Reject::new(
                RejectCode::DuplicateConnection,
                format!(
                    "the peer closed this connection as a duplicate: {}",
                    reject.reason
                ),
            )
        }
        _ => reject,
    });
    let established = match handshake {
        Ok(established) => established,
        Err(reject) if reject.code == RejectCode::DuplicateConnection => {
            connection.close(reject.code.close_code().into(), b"duplicate");
            // The peer kept the connection it dialed to us; wait for it to register here.
            for _ in 0..100 {
                if let Some(existing) = live(daemon, peer) {
                    return Ok(existing);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Err(OpenError::Rejected(reject));
        }
        Err(reject) => {
            connection.close(reject.code.close_code().into(), reject.reason.as_bytes());
            return Err(OpenError::Rejected(reject));
        }
    };

    match register(daemon, connection.clone(), established, true) {
        Ok(peer_connection) => {
            info!(peer, conn = peer_connection.id, %remote, "peer connected (outgoing)");
            Ok(peer_connection)
        }
        Err(reject) => {
            connection.close(reject.code.close_code().into(), reject.reason.as_bytes());
            live(daemon, peer).ok_or(OpenError::Rejected(reject))
        }
    }
}
