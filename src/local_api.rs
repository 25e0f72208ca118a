//! The local API: HTTP/1.1 on a Unix socket.

use crate::daemon::Daemon;

/// Keeps the local API running while alive.
#[derive(Debug)]
pub struct ApiHandle {
    _daemon: Daemon,
}

/// Binds the local API socket and serves it.
pub async fn start(daemon: Daemon) -> anyhow::Result<ApiHandle> {
    // TODO: bind the socket and serve the routes.
    Ok(ApiHandle { _daemon: daemon })
}
