//! Caller identity as HTTP request headers for HTTP services.

use std::pin::Pin;

use super::forward::LocalIo;
use super::pipe::{pipe, PipeError, PipeStats};
use super::PeerIdentity;

/// Serves an HTTP/1 stream to the backend, setting identity headers on every request.
pub(super) async fn serve(
    local: Pin<Box<dyn LocalIo>>,
    caller: &PeerIdentity,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<PipeStats, PipeError> {
    let _ = caller;
    // TODO: parse requests and set H8-Peer, H8-Client-Id and H8-Source-Id; this passes bytes unchanged.
    pipe(local, send, recv, Vec::new()).await
}
