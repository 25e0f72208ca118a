//! The optional external authorizer asked per stream in side-car mode.
//!
//! The local policy decides first, in `authorize::authorize_stream`; only a
//! stream it allows reaches [`check`]. So a stream needs both the local policy
//! and the authorizer to allow it. When the authorizer cannot be asked
//! (socket missing, timeout, non-200 status, invalid JSON), the configured
//! fallback applies: `deny` rejects the stream with `AuthorizerUnavailable`,
//! `local-policy` lets the local policy's allow stand alone.
//!
//! The protocol is one HTTP/1.1 request per decision on the authorizer's Unix
//! socket: `POST /v1/authorize` with a JSON [`AuthorizeRequest`], answered by
//! `200` and a JSON [`AuthorizeResponse`]. Allow and deny answers are cached
//! per (peer, source id, service) for `cache_ttl_secs`; failures are not.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::Daemon;
use crate::config::{Fallback, ModeConfig};
use crate::token::Claims;
use crate::wire::{Reject, RejectCode};

/// Maximum number of cached decisions. When the cache is full and no entry
/// has expired, new decisions are not cached until entries expire.
pub(crate) const MAX_CACHE_ENTRIES: usize = 10_000;
/// Maximum size of the authorizer's response body.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Maximum length of the authorizer's reason that is passed on to the peer.
/// The whole stream reply must fit in a 1 KiB frame.
const MAX_REASON_CHARS: usize = 200;
/// Minimum time between two warnings about an unavailable authorizer.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Request path on the authorizer's socket.
pub(crate) const AUTHORIZE_PATH: &str = "/v1/authorize";

/// Body of `POST /v1/authorize`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuthorizeRequest {
    /// Resource server name of the calling peer, verified by its pinned key.
    pub(crate) peer: String,
    /// Client identifier from the caller's token (empty for machine tokens).
    pub(crate) client_id: String,
    /// Source identifier from the caller's token (`machine:<peer>`).
    pub(crate) source_id: String,
    /// Requested service on this daemon.
    pub(crate) service: String,
    /// This daemon's resource server name.
    pub(crate) local_server: String,
}

/// Body of the authorizer's `200` response. Unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct AuthorizeResponse {
    /// Whether the stream may be opened.
    pub(crate) allow: bool,
    /// Why; passed on to the caller in the rejection.
    #[serde(default)]
    pub(crate) reason: String,
}

/// The authorizer's decision on one stream, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The authorizer allows the stream.
    Allow,
    /// The authorizer denies the stream, with its reason.
    Deny(String),
    /// The authorizer could not be asked, with the error for the local log.
    Unavailable(String),
}

/// Combines the authorizer's verdict with the fallback, for a stream the
/// local policy already allowed.
pub(crate) fn decide(
    verdict: &Verdict,
    fallback: Fallback,
    peer: &str,
    service: &str,
    local_server: &str,
) -> Result<(), Reject> {
    match (verdict, fallback) {
        (Verdict::Allow, _) => Ok(()),
        (Verdict::Deny(reason), _) => {
            let reason = if reason.trim().is_empty() {
                "no reason given"
            } else {
                reason.as_str()
            };
            Err(Reject::new(
                RejectCode::PolicyDenied,
                format!(
                    "the external authorizer of {local_server:?} denies {peer:?} service {service:?}: {}",
                    truncate(reason, MAX_REASON_CHARS)
                ),
            ))
        }
        (Verdict::Unavailable(_), Fallback::LocalPolicy) => Ok(()),
        // The error itself stays in the local log: it names local paths.
        (Verdict::Unavailable(_), Fallback::Deny) => Err(Reject::new(
            RejectCode::AuthorizerUnavailable,
            format!(
                "the external authorizer of {local_server:?} is unavailable and its fallback is \"deny\""
            ),
        )),
    }
}

fn truncate(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// Cache key: the caller's resource server and session, and the service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    peer: String,
    source_id: String,
    service: String,
}

impl CacheKey {
    pub(crate) fn new(caller: &Claims, service: &str) -> Self {
        CacheKey {
            peer: caller.server.clone(),
            source_id: caller.source_id.clone(),
            service: service.to_owned(),
        }
    }
}

/// Allow and deny decisions with the time each was stored. Sans-IO: callers
/// pass the current time and the TTL.
#[derive(Debug)]
pub(crate) struct DecisionCache {
    entries: DashMap<CacheKey, (Instant, Verdict)>,
    capacity: usize,
}

impl DecisionCache {
    pub(crate) fn new(capacity: usize) -> Self {
        DecisionCache {
            entries: DashMap::new(),
            capacity,
        }
    }

    /// Returns the cached decision for `key` if it is younger than `ttl`.
    pub(crate) fn get(&self, key: &CacheKey, ttl: Duration, now: Instant) -> Option<Verdict> {
        let entry = self.entries.get(key)?;
        let (stored_at, verdict) = entry.value();
        if now.saturating_duration_since(*stored_at) < ttl {
            Some(verdict.clone())
        } else {
            None
        }
    }

    /// Stores an allow or deny decision. `Unavailable` is never stored, and
    /// nothing is stored when `ttl` is zero or the cache is full of fresh
    /// entries.
    pub(crate) fn insert(&self, key: CacheKey, verdict: &Verdict, ttl: Duration, now: Instant) {
        if ttl.is_zero() || matches!(verdict, Verdict::Unavailable(_)) {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries
                .retain(|_, (stored_at, _)| now.saturating_duration_since(*stored_at) < ttl);
            if self.entries.len() >= self.capacity {
                return;
            }
        }
        self.entries.insert(key, (now, verdict.clone()));
    }

    /// Drops every cached decision.
    pub(crate) fn clear(&self) {
        self.entries.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Lets one warning through per interval and counts the ones held back.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    /// Returns `Some(number of warnings held back since the last one)` when a
    /// warning may be logged at `now`, or `None` when it is held back.
    pub(crate) fn permit(&self, now: Instant, interval: Duration) -> Option<u64> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some(at) if now.saturating_duration_since(at) < interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Per-daemon state of the external authorizer client.
#[derive(Debug)]
pub(crate) struct AuthorizerState {
    cache: DecisionCache,
    warnings: WarnLimiter,
}

impl Default for AuthorizerState {
    fn default() -> Self {
        AuthorizerState {
            cache: DecisionCache::new(MAX_CACHE_ENTRIES),
            warnings: WarnLimiter::default(),
        }
    }
}

impl AuthorizerState {
    /// Drops every cached decision, so the next stream asks the authorizer.
    pub(crate) fn clear_cache(&self) {
        self.cache.clear();
    }
}

/// Asks the external authorizer, when one is configured, whether `caller`
/// may open `service`. The local policy has already allowed the stream.
/// Without an authorizer, and in token-server mode, every stream passes.
pub(super) async fn check(daemon: &Daemon, caller: &Claims, service: &str) -> Result<(), Reject> {
    let config = daemon.config();
    let ModeConfig::Sidecar(sidecar) = &config.mode else {
        return Ok(());
    };
    let Some(authorizer) = &sidecar.authorizer else {
        return Ok(());
    };
    let state = &daemon.shared.authorizer;
    let key = CacheKey::new(caller, service);
    let ttl = Duration::from_secs(authorizer.cache_ttl_secs);

    let verdict = match state.cache.get(&key, ttl, Instant::now()) {
        Some(verdict) => verdict,
        None => {
            let request = AuthorizeRequest {
                peer: caller.server.clone(),
                client_id: caller.client_id.clone(),
                source_id: caller.source_id.clone(),
                service: service.to_owned(),
                local_server: config.name.clone(),
            };
            let timeout = Duration::from_millis(authorizer.timeout_ms);
            let verdict = ask(&authorizer.socket, &request, timeout).await;
            state.cache.insert(key, &verdict, ttl, Instant::now());
            verdict
        }
    };

    if let Verdict::Unavailable(error) = &verdict {
        let fallback = match authorizer.fallback {
            Fallback::Deny => "deny",
            Fallback::LocalPolicy => "local-policy",
        };
        match state.warnings.permit(Instant::now(), WARN_INTERVAL) {
            Some(suppressed) => warn!(
                socket = %authorizer.socket.display(),
                %error,
                fallback,
                peer = %caller.server,
                service,
                suppressed,
                "external authorizer unavailable; applying the fallback"
            ),
            None => {
                debug!(%error, fallback, peer = %caller.server, service, "external authorizer unavailable")
            }
        }
    }
    decide(
        &verdict,
        authorizer.fallback,
        &caller.server,
        service,
        &config.name,
    )
}

/// Sends one request to the authorizer on `socket`, bounded by `timeout`
/// from connect to the end of the response body.
pub(crate) async fn ask(socket: &Path, request: &AuthorizeRequest, timeout: Duration) -> Verdict {
    match tokio::time::timeout(timeout, exchange(socket, request)).await {
        Ok(Ok(response)) if response.allow => Verdict::Allow,
        Ok(Ok(response)) => Verdict::Deny(response.reason),
        Ok(Err(error)) => Verdict::Unavailable(error),
        Err(_) => Verdict::Unavailable(format!(
            "no answer from {} within {} ms",
            socket.display(),
            timeout.as_millis()
        )),
    }
}

async fn exchange(socket: &Path, request: &AuthorizeRequest) -> Result<AuthorizeResponse, String> {
    let body =
        serde_json::to_vec(request).map_err(|e| format!("cannot encode the request: {e}"))?;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake on {} failed: {e}", socket.display()))?;

    let http_request = Request::post(AUTHORIZE_PATH)
        .header(HOST, "h8-authorizer")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = async {
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| format!("request to {} failed: {e}", socket.display()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the response from {} failed: {e}", socket.display()))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };

    // The connection future drives the I/O; run it next to the request and
    // keep waiting for the response if the connection ends first.
    let mut connection = std::pin::pin!(connection);
    let mut response = std::pin::pin!(response);
    let (status, body) = tokio::select! {
        result = &mut response => result?,
        driven = &mut connection => match driven {
            Ok(()) => response.await?,
            Err(e) => return Err(format!("connection to {} failed: {e}", socket.display())),
        },
    };

    if status != StatusCode::OK {
        return Err(format!(
            "{} answered {status}; expected 200 with {{\"allow\": true|false}}",
            socket.display()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        format!(
            "invalid response from {}: {e}; expected {{\"allow\": true|false, \"reason\": \"...\"}}",
            socket.display()
        )
    })
}

#[cfg(test)]
#[path = "external_authorizer_tests.rs"]
mod tests;
