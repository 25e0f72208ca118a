//! Accept loop of the API socket: caller check by SO_PEERCRED, then one
//! HTTP/1.1 connection per client with bounded heads and bodies.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::CONTENT_LENGTH;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse as _;
use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use super::errors::ApiError;
use crate::config::ApiConfig;
use crate::daemon::Daemon;

/// Maximum request body in bytes, by `Content-Length`. No route reads a
/// body today, so this only keeps a client from making hyper drain one.
pub(super) const MAX_REQUEST_BODY: u64 = 64 * 1024;
/// Maximum bytes hyper buffers for a request head (line plus headers).
const MAX_HEAD_LEN: usize = 64 * 1024;
/// Maximum number of request headers.
const MAX_HEADERS: usize = 64;
/// Time a client has to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum API connections served at once; further clients wait in the
/// listen backlog.
const MAX_CONNECTIONS: usize = 1024;

/// The process at the other end of an API connection, from SO_PEERCRED.
#[derive(Clone, Copy, Debug)]
struct Caller {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

/// Reports whether `caller` may use the API: everyone when both allow lists
/// are empty, otherwise root, listed user ids and listed primary group ids.
fn is_allowed(api: &ApiConfig, caller: Caller) -> bool {
    if api.allowed_uids.is_empty() && api.allowed_gids.is_empty() {
        return true;
    }
    caller.uid == 0
        || api.allowed_uids.contains(&caller.uid)
        || api.allowed_gids.contains(&caller.gid)
}

pub(super) async fn accept_loop(daemon: Daemon, listener: UnixListener, forwards: Arc<Notify>) {
    let router = super::routes::router(daemon.clone(), forwards);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Typically EMFILE: wait instead of spinning on the error.
                warn!(%error, "cannot accept a local API connection; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let caller = match stream.peer_cred() {
            Ok(credentials) => Caller {
                uid: credentials.uid(),
                gid: credentials.gid(),
                pid: credentials.pid(),
            },
            Err(error) => {
                warn!(%error, "cannot read SO_PEERCRED of a local API client; closing it");
                continue;
            }
        };
        let allowed = is_allowed(&daemon.config().api, caller);
        debug!(
            uid = caller.uid,
            gid = caller.gid,
            pid = caller.pid,
            allowed,
            "local API connection"
        );
        let router = router.clone();
        tokio::spawn(async move {
            serve_connection(stream, router, caller, allowed).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: UnixStream, router: Router, caller: Caller, allowed: bool) {
    let tower = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let tower = tower.clone();
        async move {
            if !allowed {
                info!(
                    uid = caller.uid,
                    gid = caller.gid,
                    pid = caller.pid,
                    path = %request.uri().path(),
                    "local API request rejected: caller not in allowed_uids or allowed_gids"
                );
                let error = ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "user id {} (group id {}) may not use this API; add it to \
                         api.allowed_uids or api.allowed_gids in h8d's config",
                        caller.uid, caller.gid
                    ),
                );
                return Ok::<_, Infallible>(error.into_response());
            }
            if let Some(length) = content_length(&request) {
                if length > MAX_REQUEST_BODY {
                    let error = ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!(
                            "request body of {length} bytes is larger than the limit of \
                             {MAX_REQUEST_BODY}; the API routes take no body"
                        ),
                    );
                    return Ok(error.into_response());
                }
            }
            tower.call(request).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_LEN)
        .max_headers(MAX_HEADERS);
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        debug!(uid = caller.uid, pid = caller.pid, %error, "local API connection ended with an error");
    }
}

fn content_length(request: &Request<Incoming>) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
