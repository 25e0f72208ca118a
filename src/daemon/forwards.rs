//! Outgoing `[[forwards]]`: local listeners whose connections are piped to
//! a peer's service.
//!
//! Each accepted connection opens one stream with [`Daemon::open_stream`].
//! When the open or the pipe fails, a TCP connection is closed with a reset
//! (`SO_LINGER` 0), so the local program sees an error and not a clean end.
//! Unix sockets have no reset: the program sees the socket close, and a
//! write gets `EPIPE`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::Daemon;
use crate::config::{DaemonConfig, ListenAddress};
use crate::local_api::socket::{bind_unix, BoundSocket};

/// Interval at which the forward list is compared with the config, so that
/// a reload by SIGHUP is picked up. A reload through the API wakes the
/// supervisor at once.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// One forward, as it is compared across reloads.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ForwardKey {
    listen: ListenAddress,
    peer: String,
    service: String,
}

impl std::fmt::Display for ForwardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.listen {
            ListenAddress::Unix(path) => write!(f, "unix:{}", path.display())?,
            ListenAddress::Tcp(address) => write!(f, "tcp:{address}")?,
        }
        write!(f, " -> {}/{}", self.peer, self.service)
    }
}

fn configured_forwards(config: &DaemonConfig) -> Vec<ForwardKey> {
    config
        .forwards
        .iter()
        .map(|forward| ForwardKey {
            listen: forward.listen.clone(),
            peer: forward.peer.clone(),
            service: forward.service.clone(),
        })
        .collect()
}

/// A listening forward; its socket file goes when it is dropped.
struct RunningForward {
    key: ForwardKey,
    task: JoinHandle<()>,
    _socket: Option<BoundSocket>,
}

impl Drop for RunningForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RunningForward {
    /// Stops accepting and waits until the listener is closed, so that the
    /// address can be bound again right away.
    async fn stop(mut self) {
        self.task.abort();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
        info!(forward = %self.key, "forward stopped");
    }
}

/// The running forwards. Stopping (or dropping) it closes every listener;
/// streams already piped keep running until they end.
#[derive(Debug)]
pub struct ForwardSet {
    supervisor: JoinHandle<()>,
    trigger: Arc<Notify>,
}

impl ForwardSet {
    /// Returns a handle that makes the supervisor compare the forwards with
    /// the config now instead of at its next poll.
    pub fn reload_trigger(&self) -> Arc<Notify> {
        self.trigger.clone()
    }

    /// Closes every forward listener.
    pub fn stop(&self) {
        self.supervisor.abort();
    }
}

impl Drop for ForwardSet {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

/// Binds every configured forward and starts accepting. A forward that
/// cannot bind fails the start; after a reload such a forward is logged
/// and skipped until the forward list changes again.
pub fn start(daemon: &Daemon) -> anyhow::Result<ForwardSet> {
    let keys = configured_forwards(&daemon.config());
    let mut running = Vec::with_capacity(keys.len());
    for key in &keys {
        running.push(listen(daemon, key.clone())?);
    }
    let trigger = Arc::new(Notify::new());
    let supervisor = tokio::spawn(supervise(daemon.clone(), keys, running, trigger.clone()));
    Ok(ForwardSet {
        supervisor,
        trigger,
    })
}

async fn supervise(
    daemon: Daemon,
    mut applied: Vec<ForwardKey>,
    mut running: Vec<RunningForward>,
    trigger: Arc<Notify>,
) {
    let mut shutdown = daemon.shared.shutting_down.subscribe();
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = trigger.notified() => {}
            _ = shutdown.wait_for(|down| *down) => return,
        }
        let keys = configured_forwards(&daemon.config());
        if keys == applied {
            continue;
        }
        // Stop removed forwards first, so that a changed forward can bind its address again.
        let (kept, removed): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|r| keys.contains(&r.key));
        running = kept;
        for forward in removed {
            forward.stop().await;
        }
        for key in &keys {
            if running.iter().any(|r| &r.key == key) {
                continue;
            }
            match listen(&daemon, key.clone()) {
                Ok(forward) => running.push(forward),
                Err(error) => {
                    error!(forward = %key, error = %format!("{error:#}"), "cannot start forward; fix the config and reload")
                }
            }
        }
        applied = keys;
    }
}

fn listen(daemon: &Daemon, key: ForwardKey) -> anyhow::Result<RunningForward> {
    let group = daemon.config().api.group.clone();
    let (task, socket) = match &key.listen {
        ListenAddress::Unix(path) => {
            let (listener, socket) = bind_unix(path, group.as_deref())?;
            let task = tokio::spawn(accept_unix(daemon.clone(), listener, key.clone()));
            (task, Some(socket))
        }
        ListenAddress::Tcp(address) => {
            let listener = std::net::TcpListener::bind(address).map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {address} for forward {key}: {e}; is the port in use?"
                )
            })?;
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            let task = tokio::spawn(accept_tcp(daemon.clone(), listener, key.clone()));
            (task, None)
        }
    };
    info!(forward = %key, "forward listening");
    Ok(RunningForward {
        key,
        task,
        _socket: socket,
    })
}

async fn accept_unix(daemon: Daemon, listener: UnixListener, key: ForwardKey) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let daemon = daemon.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    // Unix sockets cannot be reset; closing is all there is.
                    let _ = forward_connection(&daemon, &mut stream, &key).await;
                });
            }
            Err(error) => accept_failed(&key, &error).await,
        }
    }
}

async fn accept_tcp(daemon: Daemon, listener: TcpListener, key: ForwardKey) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let daemon = daemon.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    if forward_connection(&daemon, &mut stream, &key)
                        .await
                        .is_err()
                    {
                        if let Err(error) = stream.set_zero_linger() {
                            debug!(forward = %key, %error, "cannot set SO_LINGER 0 to reset the connection");
                        }
                    }
                });
            }
            Err(error) => accept_failed(&key, &error).await,
        }
    }
}

async fn accept_failed(key: &ForwardKey, error: &std::io::Error) {
    // Typically EMFILE: wait instead of spinning on the error.
    warn!(forward = %key, %error, "cannot accept a forward connection; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Opens the stream and pipes `local` to it. `Err` means the local side
/// should see a failure.
async fn forward_connection<S>(daemon: &Daemon, local: &mut S, key: &ForwardKey) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opened = match daemon.open_stream(&key.peer, &key.service).await {
        Ok(opened) => opened,
        Err(error) => {
            warn!(forward = %key, %error, "forward cannot open its stream; closing the local connection");
            return Err(());
        }
    };
    let result = daemon.pipe(&mut *local, opened.send, opened.recv).await;
    drop(opened.guard);
    match result {
        Ok(stats) => {
            debug!(forward = %key, sent = stats.sent, received = stats.received, "forwarded connection ended");
            Ok(())
        }
        Err(error) => {
            info!(forward = %key, %error, "forwarded connection failed");
            Err(())
        }
    }
}
