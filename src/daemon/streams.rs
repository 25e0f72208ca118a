//! Streams between daemons: opening one to a peer's service, and
//! authorizing and dispatching the ones peers open here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::connection::{connection_to, read_frame, PeerConnection, INITIAL_STREAM_LIMIT};
use super::pipe::pipe;
use super::{unix_now, Daemon, PeerIdentity};
use crate::authorize::{authorize_stream, StreamRequest};
use crate::config::Target;
use crate::wire::{self, Reject, RejectCode, StreamHeader, StreamOpen, StreamReply, MAX_FRAME_LEN};

/// Maximum size of a stream open or reply frame.
pub(super) const MAX_OPEN_FRAME_LEN: usize = 1024;

/// Failure to open a stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The peer is not in the config.
    #[error("unknown peer {0:?}: it is not listed in [[peers]] of this daemon's config")]
    UnknownPeer(String),
    /// The peer (or this daemon) rejected the stream or the handshake.
    #[error("rejected: {0}")]
    Rejected(Reject),
    /// The peer could not be reached.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The peer did not answer in time.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// This daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// No such local service, or it is not an `accept` service.
    #[error("no accept service named {0:?} in this daemon's config")]
    UnknownService(String),
}

/// A stream to a peer's service that the peer accepted.
#[derive(Debug)]
pub struct OpenedStream {
    /// Sending half.
    pub send: quinn::SendStream,
    /// Receiving half.
    pub recv: quinn::RecvStream,
    /// Daemon that accepted it.
    pub peer: PeerIdentity,
    /// Keeps the connection's open-stream count while the stream lives.
    pub guard: StreamGuard,
}

/// An authorized stream from a peer, waiting for a local program.
#[derive(Debug)]
pub struct IncomingStream {
    /// Sending half.
    pub send: quinn::SendStream,
    /// Receiving half.
    pub recv: quinn::RecvStream,
    /// The verified caller.
    pub caller: PeerIdentity,
    /// Requested service.
    pub service: String,
    /// Keeps the connection's open-stream count while the stream lives.
    pub guard: StreamGuard,
}

impl IncomingStream {
    /// Sends the accept reply; raw bytes follow.
    pub async fn confirm(&mut self) -> Result<(), OpenError> {
        self.send
            .write_all(&wire::encode(&StreamReply::Accept))
            .await
            .map_err(|e| OpenError::Unreachable(format!("caller went away: {e}")))
    }
}

/// Counts a stream as open until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    connection: Arc<PeerConnection>,
    daemon: Daemon,
}

impl StreamGuard {
    fn new(daemon: &Daemon, connection: Arc<PeerConnection>) -> Self {
        connection.open_streams.fetch_add(1, Ordering::Relaxed);
        daemon
            .shared
            .metrics
            .streams_active
            .fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            connection,
            daemon: daemon.clone(),
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.connection.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.daemon
            .shared
            .metrics
            .streams_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens a stream to `service` on `peer` and waits for the peer's verdict.
pub(super) async fn open_stream(
    daemon: &Daemon,
    peer: &str,
    service: &str,
) -> Result<OpenedStream, OpenError> {
    if daemon.is_shutting_down() {
        return Err(OpenError::ShuttingDown);
    }
    // A connection can be closed under us (duplicate resolution, peer
    // restart); one retry on a fresh connection covers that.
    let mut last_error = None;
    for _ in 0..2 {
        let connection = connection_to(daemon, peer).await?;
        match open_on(daemon, &connection, service).await {
            Ok(stream) => return Ok(stream),
            Err(OpenError::Unreachable(reason))
                if connection.connection.close_reason().is_some() =>
            {
                daemon
                    .shared
                    .connections
                    .remove_if(peer, |_, c| Arc::ptr_eq(c, &connection));
                last_error = Some(OpenError::Unreachable(reason));
            }
            Err(error) => return Err(error),
        }
    }
    Err(last_error
        .unwrap_or_else(|| OpenError::Unreachable(format!("connection to {peer:?} keeps closing"))))
}

async fn open_on(
    daemon: &Daemon,
    connection: &Arc<PeerConnection>,
    service: &str,
) -> Result<OpenedStream, OpenError> {
    let timeout = Duration::from_secs(daemon.config().quic.stream_open_timeout_secs);
    let peer = PeerIdentity::from_claims(&connection.claims());
    // Count the stream from the start, so a connection being replaced is not
    // closed under an open that is still waiting for its reply.
    let guard = StreamGuard::new(daemon, connection.clone());
    // Whether quinn gave us a stream: without one, the open waited for the
    // peer's concurrent stream limit, not for the peer's reply.
    let got_stream = std::sync::atomic::AtomicBool::new(false);
    let exchange = async {
        let (mut send, mut recv) = connection
            .connection
            .open_bi()
            .await
            .map_err(|e| OpenError::Unreachable(e.to_string()))?;
        got_stream.store(true, Ordering::Relaxed);
        let open = wire::encode(&StreamHeader::Open(StreamOpen {
            service: service.to_owned(),
        }));
        send.write_all(&open)
            .await
            .map_err(|e| OpenError::Unreachable(e.to_string()))?;
        let body = read_frame(&mut recv, MAX_OPEN_FRAME_LEN)
            .await
            .map_err(|reject| {
                OpenError::Unreachable(format!("no reply to the stream open: {}", reject.reason))
            })?;
        let reply: StreamReply = wire::decode_body(&body).map_err(|e| {
            OpenError::Rejected(Reject::new(
                RejectCode::Malformed,
                format!("invalid reply: {e}"),
            ))
        })?;
        match reply {
            StreamReply::Accept => Ok((send, recv)),
            StreamReply::Reject(reject) => Err(OpenError::Rejected(reject)),
        }
    };
    let (send, recv) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            if got_stream.load(Ordering::Relaxed) {
                OpenError::TimedOut(format!(
                    "peer {:?} did not answer the stream open within {} s",
                    peer.name,
                    timeout.as_secs()
                ))
            } else {
                OpenError::TimedOut(format!(
                    "no stream to peer {:?} became free within {} s: the connection is at the \
                     peer's limit of concurrent streams (its max_streams_per_connection); \
                     close idle streams or raise that limit on the peer",
                    peer.name,
                    timeout.as_secs()
                ))
            }
        })??;
    daemon
        .shared
        .metrics
        .streams_opened
        .fetch_add(1, Ordering::Relaxed);
    Ok(OpenedStream {
        send,
        recv,
        peer,
        guard,
    })
}

/// Waits for the next stream of an `accept` service.
pub(super) async fn accept_stream(
    daemon: &Daemon,
    service: &str,
    timeout: Duration,
) -> Result<IncomingStream, OpenError> {
    let receiver = daemon
        .shared
        .accept_queues
        .get(service)
        .map(|entry| entry.1.clone())
        .ok_or_else(|| OpenError::UnknownService(service.to_owned()))?;
    let mut shutdown = daemon.shared.shutting_down.subscribe();
    let mut receiver = tokio::select! {
        guard = receiver.lock() => guard,
        _ = shutdown.wait_for(|down| *down) => return Err(OpenError::ShuttingDown),
    };
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(timeout, receiver.recv()) => next,
            _ = shutdown.wait_for(|down| *down) => return Err(OpenError::ShuttingDown),
        };
        match next {
            Ok(Some(mut stream)) => {
                // The caller may have given up while the stream waited in the queue.
                if stream.confirm().await.is_ok() {
                    return Ok(stream);
                }
            }
            Ok(None) => return Err(OpenError::ShuttingDown),
            Err(_) => {
                return Err(OpenError::TimedOut(format!(
                    "no stream for service {service:?} arrived within {} s",
                    timeout.as_secs()
                )))
            }
        }
    }
}

/// Accepts the streams a peer opens on `connection` until it closes.
pub(super) async fn serve_connection(daemon: Daemon, connection: Arc<PeerConnection>) {
    let max_limit = daemon.config().quic.max_streams_per_connection;
    let mut limit = max_limit.min(INITIAL_STREAM_LIMIT);
    loop {
        let (send, recv) = match connection.connection.accept_bi().await {
            Ok(stream) => {
                // Raise the peer's stream limit once half of it is in use,
                // so a busy connection does not wait for credit while an
                // idle one keeps little stream state.
                let open = connection.open_streams.load(Ordering::Relaxed) + 1;
                // `open` counts this daemon's own streams on the connection
                // too, which only raises the limit sooner.
                if limit < max_limit && open * 2 >= u64::from(limit) {
                    limit = limit.saturating_mul(2).min(max_limit);
                    connection
                        .connection
                        .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(limit));
                    debug!(limit, "raised the peer's concurrent stream limit");
                }
                stream
            }
            Err(e) => {
                debug!(error = %e, "connection closed");
                daemon
                    .shared
                    .connections
                    .remove_if(&connection.peer_name, |_, c| Arc::ptr_eq(c, &connection));
                return;
            }
        };
        // Counted here, not in the task, so that the limit check above
        // counts every stream accepted so far, even before its task runs.
        let guard = StreamGuard::new(&daemon, connection.clone());
        let daemon = daemon.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            handle_stream(daemon, connection, send, recv, guard).await;
        });
    }
}

async fn reject(
    daemon: &Daemon,
    send: &mut quinn::SendStream,
    peer: &str,
    service: &str,
    reject: Reject,
) {
    daemon
        .shared
        .metrics
        .streams_rejected
        .fetch_add(1, Ordering::Relaxed);
    info!(peer, service, code = reject.code.as_str(), reason = %reject.reason, "stream rejected");
    let _ = send
        .write_all(&wire::encode(&StreamReply::Reject(reject)))
        .await;
    let _ = send.finish();
}

async fn handle_stream(
    daemon: Daemon,
    connection: Arc<PeerConnection>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    guard: StreamGuard,
) {
    let peer = connection.peer_name.clone();
    let caller_claims = connection.claims();
    let config = daemon.config();

    // 1. Read the open frame, bounded in size and time.
    let timeout = Duration::from_secs(config.quic.stream_open_timeout_secs);
    let header = match tokio::time::timeout(timeout, read_frame(&mut recv, MAX_FRAME_LEN)).await {
        Ok(Ok(body)) => wire::decode_body::<StreamHeader>(&body).map_err(|e| {
            Reject::new(
                RejectCode::Malformed,
                format!("invalid stream open frame: {e}"),
            )
        }),
        Ok(Err(reject)) => Err(reject),
        Err(_) => Err(Reject::new(
            RejectCode::Malformed,
            "no stream open frame in time",
        )),
    };
    let service = match header {
        Ok(StreamHeader::Open(open)) => open.service,
        Ok(StreamHeader::TokenUpdate(update)) => {
            match super::token_update::accept(&daemon, &connection, &update.token) {
                Ok(()) => {
                    let _ = send.write_all(&wire::encode(&StreamReply::Accept)).await;
                    let _ = send.finish();
                }
                Err(error) => {
                    warn!(peer = %peer, code = error.code.as_str(), reason = %error.reason, "token update rejected");
                    let _ = send
                        .write_all(&wire::encode(&StreamReply::Reject(error)))
                        .await;
                    let _ = send.finish();
                }
            }
            return;
        }
        Err(error) => {
            reject(&daemon, &mut send, &peer, "?", error).await;
            return;
        }
    };

    if daemon.is_shutting_down() {
        reject(
            &daemon,
            &mut send,
            &peer,
            &service,
            Reject::new(RejectCode::ShuttingDown, "daemon is shutting down"),
        )
        .await;
        return;
    }

    // 2. Authorize against the caller's verified token: no signature here.
    let Some(credentials) = daemon.shared.credentials.current() else {
        reject(
            &daemon,
            &mut send,
            &peer,
            &service,
            Reject::new(RejectCode::ServiceUnavailable, "no credentials"),
        )
        .await;
        return;
    };
    let leeway = match &credentials.trust {
        crate::handshake::Trust::TokenServer { validation, .. } => validation.leeway,
        crate::handshake::Trust::Sidecar { leeway, .. } => *leeway,
    };
    let request = StreamRequest {
        caller: &caller_claims,
        local_name: &config.name,
        service: &service,
        now: unix_now(),
        leeway,
    };
    let revocations = daemon.shared.credentials.revocations();
    let verdict = authorize_stream(&credentials.authority, &request, &revocations);
    if let Err(error) = verdict {
        if error.code == RejectCode::Revoked {
            daemon.close_revoked();
        }
        reject(&daemon, &mut send, &peer, &service, error).await;
        return;
    }
    let verdict = match super::external_authorizer::check(&daemon, &caller_claims, &service).await {
        Ok(()) => Ok(()),
        Err(error) => Err(error),
    };
    if let Err(error) = verdict {
        reject(&daemon, &mut send, &peer, &service, error).await;
        return;
    }

    // 3. The service must exist here.
    let Some(service_config) = config.services.get(&service).cloned() else {
        let error = Reject::new(
            RejectCode::UnknownService,
            format!("service {service:?} is not configured on {:?}", config.name),
        );
        reject(&daemon, &mut send, &peer, &service, error).await;
        return;
    };
    let caller = PeerIdentity::from_claims(&connection.claims());

    // 4. Dispatch.
    match &service_config.target {
        Target::Accept => {
            let Some(queue) = daemon
                .shared
                .accept_queues
                .get(&service)
                .map(|q| q.0.clone())
            else {
                reject(
                    &daemon,
                    &mut send,
                    &peer,
                    &service,
                    Reject::new(RejectCode::ServiceUnavailable, "no accept queue"),
                )
                .await;
                return;
            };
            let stream = IncomingStream {
                send,
                recv,
                caller,
                service: service.clone(),
                guard,
            };
            if let Err(error) = queue.try_send(stream) {
                let mut stream = match error {
                    tokio::sync::mpsc::error::TrySendError::Full(s)
                    | tokio::sync::mpsc::error::TrySendError::Closed(s) => s,
                };
                let error = Reject::new(
                    RejectCode::Busy,
                    format!("accept queue of service {service:?} is full"),
                );
                reject(&daemon, &mut stream.send, &peer, &service, error).await;
            } else {
                daemon
                    .shared
                    .metrics
                    .streams_accepted
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Target::Unix(_) | Target::Tcp(_) => {
            let local = match super::forward::connect_target(&service_config.target).await {
                Ok(local) => local,
                Err(error) => {
                    warn!(service, error = %error, "cannot reach the service's target");
                    let error = Reject::new(
                        RejectCode::ServiceUnavailable,
                        format!(
                            "service {service:?} is configured but its target is not reachable"
                        ),
                    );
                    reject(&daemon, &mut send, &peer, &service, error).await;
                    return;
                }
            };
            if send
                .write_all(&wire::encode(&StreamReply::Accept))
                .await
                .is_err()
            {
                return;
            }
            daemon
                .shared
                .metrics
                .streams_accepted
                .fetch_add(1, Ordering::Relaxed);
            debug!(peer = %peer, service, "stream accepted");
            let caller_address = connection.connection.remote_address();
            let local_address = daemon.local_addr().unwrap_or(config.listen);
            let result = super::forward::serve(
                local,
                service_config.identity,
                &caller,
                caller_address,
                local_address,
                send,
                recv,
            )
            .await;
            match result {
                Ok(stats) => daemon.shared.metrics.record_pipe(&stats),
                Err(error) => {
                    debug!(peer = %peer, service, error = %error, "stream ended with an error")
                }
            }
            drop(guard);
        }
    }
}

/// Pipes an accepted or opened stream to a local byte stream, counting bytes.
pub(super) async fn pipe_counted<L>(
    daemon: &Daemon,
    local: L,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<super::pipe::PipeStats, super::pipe::PipeError>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let result = pipe(local, send, recv, Vec::new()).await;
    if let Ok(stats) = &result {
        daemon.shared.metrics.record_pipe(stats);
    }
    result
}
