//! The local API: HTTP/1.1 on a Unix socket, for resource servers and the
//! `h8` command-line tool on the same host.
//!
//! ```text
//! local_api ─┬─ socket     bind (or take from systemd), stale-socket check, mode and group
//!            ├─ server     accept loop, SO_PEERCRED check, hyper limits
//!            ├─ routes     /v1/status, /v1/peers, /v1/token, /v1/reload, /metrics
//!            ├─ upgrade    /v1/connect and /v1/accept: 101 Switching Protocols, then raw bytes
//!            ├─ errors     JSON error bodies and the HTTP status of each OpenError
//!            └─ model      JSON bodies, shared with the `h8` client
//! ```
//!
//! `docs/API.md` lists every route with a `curl` example.

mod errors;
mod metrics;
pub mod model;
mod routes;
mod server;
pub mod socket;
mod upgrade;

use std::path::Path;

use tokio::task::JoinHandle;

use crate::daemon::forwards::ForwardSet;
use crate::daemon::Daemon;

/// Keeps the local API and the `[[forwards]]` listeners running while alive.
/// Dropping it stops accepting new API connections and closes the forward
/// listeners; streams already piped keep running until they end.
#[derive(Debug)]
pub struct ApiHandle {
    accept_task: JoinHandle<()>,
    socket: socket::BoundSocket,
    forwards: ForwardSet,
}

impl ApiHandle {
    /// Path of the API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// Stops accepting API connections and closes the forward listeners.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.forwards.stop();
    }
}

/// Binds the local API socket (or takes the one systemd passed), serves it,
/// and starts the `[[forwards]]` listeners.
pub async fn start(daemon: Daemon) -> anyhow::Result<ApiHandle> {
    let config = daemon.config();
    let (listener, socket) = socket::listen_api(&config.api)?;
    let forwards = crate::daemon::forwards::start(&daemon)?;
    tracing::info!(
        socket = %socket.path.display(),
        systemd = socket.from_systemd,
        "local API listening"
    );
    let accept_task = tokio::spawn(server::accept_loop(
        daemon,
        listener,
        forwards.reload_trigger(),
    ));
    Ok(ApiHandle {
        accept_task,
        socket,
        forwards,
    })
}
