//! Token updates on live connections: a daemon sends its refreshed or
//! rotated token to every connected peer, and verifies the ones it receives.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::connection::{read_frame, PeerConnection};
use super::streams::MAX_OPEN_FRAME_LEN;
use super::{unix_now, Daemon};
use crate::wire::{self, Reject, RejectCode, StreamHeader, StreamReply};

/// Verifies a peer's newer token and installs it on the connection. The
/// TLS key of the connection is fixed, so the new token must name the same
/// key and resource server as the one verified in the handshake.
pub(super) fn accept(
    daemon: &Daemon,
    connection: &PeerConnection,
    token: &[u8],
) -> Result<(), Reject> {
    let credentials = daemon
        .shared
        .credentials
        .current()
        .ok_or_else(|| Reject::new(RejectCode::ServiceUnavailable, "no credentials"))?;
    let claims = credentials.trust.verify_token(token, unix_now())?;
    let current = connection.claims();
    if claims.server != current.server || claims.server_key != current.server_key {
        return Err(Reject::new(
            RejectCode::KeyMismatch,
            "updated token names another resource server or key than this connection's",
        ));
    }
    if let Some(reason) = daemon.shared.credentials.revocations().reason(&claims) {
        return Err(Reject::new(RejectCode::Revoked, reason));
    }
    debug!(peer = %connection.peer_name, expires_at = claims.expires_at, "peer token updated");
    connection.set_claims(claims);
    Ok(())
}

/// Sends this daemon's current token to every connected peer.
pub(super) async fn push(daemon: &Daemon) {
    let Some(credentials) = daemon.shared.credentials.current() else {
        return;
    };
    let connections: Vec<Arc<PeerConnection>> = daemon
        .shared
        .connections
        .iter()
        .map(|e| e.value().clone())
        .collect();
    for connection in connections {
        let token = credentials.token.clone();
        tokio::spawn(async move {
            let result = async {
                let (mut send, mut recv) = connection
                    .connection
                    .open_bi()
                    .await
                    .map_err(|e| e.to_string())?;
                let frame = wire::encode(&StreamHeader::TokenUpdate(wire::TokenUpdate { token }));
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
                let _ = send.finish();
                let body = read_frame(&mut recv, MAX_OPEN_FRAME_LEN)
                    .await
                    .map_err(|r| r.reason)?;
                match wire::decode_body::<StreamReply>(&body).map_err(|e| e.to_string())? {
                    StreamReply::Accept => Ok(()),
                    StreamReply::Reject(reject) => Err(reject.to_string()),
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), result).await {
                Ok(Ok(())) => debug!(peer = %connection.peer_name, "token update delivered"),
                Ok(Err(error)) => {
                    warn!(peer = %connection.peer_name, %error, "token update failed")
                }
                Err(_) => warn!(peer = %connection.peer_name, "token update timed out"),
            }
        });
    }
}
