//! The router and the plain JSON routes: status, peers, token, reload.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tokio::sync::Notify;

use super::errors::ApiError;
use super::model::{GrantInfo, PeerInfo, PeerList, ReloadSummary, Status, TokenInfo};
use super::{metrics, upgrade};
use crate::daemon::{unix_now, Daemon, SessionState};
use crate::token::TokenKind;

/// Wakes the `[[forwards]]` supervisor after a reload through the API.
#[derive(Clone, Debug)]
pub(super) struct ForwardsTrigger(pub(super) Arc<Notify>);

/// Builds the API router.
pub(super) fn router(daemon: Daemon, forwards: Arc<Notify>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/token", get(token))
        .route("/v1/reload", post(reload))
        .route("/v1/connect/{peer}/{service}", post(upgrade::connect))
        .route("/v1/accept/{service}", post(upgrade::accept))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/metrics", get(metrics::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(ForwardsTrigger(forwards)))
        .with_state(daemon)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route {}; the routes are /v1/status, /v1/peers, /v1/token, /v1/reload, \
             /v1/connect/PEER/SERVICE, /v1/accept/SERVICE and /metrics (see docs/API.md)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not accept this method; use GET for status, peers, token and metrics, \
             POST for reload, connect and accept",
            uri.path()
        ),
    )
}

fn seconds_left(expires_at: u64) -> u64 {
    expires_at.saturating_sub(unix_now())
}

async fn status(State(daemon): State<Daemon>) -> Json<Status> {
    let config = daemon.config();
    let state = daemon.session_state();
    let degraded_reason = match &state {
        SessionState::Active => None,
        SessionState::Starting => Some("waiting for the first token".to_owned()),
        SessionState::Degraded(reason) | SessionState::Down(reason) => Some(reason.clone()),
    };
    let claims = daemon
        .shared
        .credentials
        .current()
        .map(|c| c.claims.clone());
    Json(Status {
        name: config.name.clone(),
        mode: if config.is_sidecar() {
            "side-car"
        } else {
            "token-server"
        }
        .to_owned(),
        session_state: state.as_str().to_owned(),
        degraded: state != SessionState::Active,
        degraded_reason,
        source_id: claims.as_ref().map(|c| c.source_id.clone()),
        client_id: claims.as_ref().map(|c| c.client_id.clone()),
        token_expires_at: claims.as_ref().map(|c| c.expires_at),
        token_expires_in_secs: claims.as_ref().map(|c| seconds_left(c.expires_at)),
        uptime_secs: daemon.shared.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        listen: daemon
            .local_addr()
            .map_or_else(|_| config.listen.to_string(), |a| a.to_string()),
        peers: config.peers.len(),
        streams_active: daemon.shared.metrics.streams_active.load(Ordering::Relaxed),
    })
}

/// Collects the state of every configured peer; also used by the metrics.
pub(super) fn peer_infos(daemon: &Daemon) -> Vec<PeerInfo> {
    let config = daemon.config();
    config
        .peers
        .values()
        .map(|peer| {
            let connection = daemon
                .shared
                .connections
                .get(&peer.name)
                .map(|c| c.value().clone())
                .filter(|c| c.connection.close_reason().is_none());
            let (failures, last_error) = daemon
                .shared
                .peer_status
                .get(&peer.name)
                .map_or((0, None), |s| (s.failures, s.last_error.clone()));
            let state = match (&connection, failures) {
                (Some(_), _) => "connected",
                (None, 0) => "idle",
                (None, _) => "failed",
            };
            PeerInfo {
                name: peer.name.clone(),
                address: peer.address.clone(),
                state: state.to_owned(),
                rtt_ms: connection.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
                open_streams: connection
                    .as_ref()
                    .map_or(0, |c| c.open_streams.load(Ordering::Relaxed)),
                last_error,
            }
        })
        .collect()
}

async fn peers(State(daemon): State<Daemon>) -> Json<PeerList> {
    Json(PeerList {
        peers: peer_infos(&daemon),
    })
}

async fn token(State(daemon): State<Daemon>) -> Result<Json<TokenInfo>, ApiError> {
    let Some(credentials) = daemon.shared.credentials.current() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_token",
            "h8d has no token yet; h8 status shows why (enrollment, token server reachability)",
        ));
    };
    let claims = &credentials.claims;
    let server_key = ed25519_dalek::VerifyingKey::from_bytes(&claims.server_key).map_or_else(
        |_| hex::encode(claims.server_key),
        |key| crate::identity::public_key_text(&key),
    );
    Ok(Json(TokenInfo {
        kind: match claims.kind {
            TokenKind::Client => "client",
            TokenKind::Machine => "machine",
        }
        .to_owned(),
        issuer: claims.issuer.clone(),
        key_id: claims.key_id.to_string(),
        client_id: claims.client_id.clone(),
        source_id: claims.source_id.clone(),
        server: claims.server.clone(),
        server_key,
        grants: claims
            .grants
            .iter()
            .map(|g| GrantInfo {
                peer: g.peer.clone(),
                services: g.services.clone(),
            })
            .collect(),
        issued_at: claims.issued_at,
        not_before: claims.not_before,
        expires_at: claims.expires_at,
        expires_in_secs: seconds_left(claims.expires_at),
        token_id: claims.token_id_hex(),
    }))
}

async fn reload(
    State(daemon): State<Daemon>,
    Extension(forwards): Extension<ForwardsTrigger>,
) -> Response {
    match crate::daemon::lifecycle::reload(&daemon).await {
        Ok(()) => {
            forwards.0.notify_one();
            let config = daemon.config();
            Json(ReloadSummary {
                reloaded: true,
                peers: config.peers.len(),
                services: config.services.len(),
                forwards: config.forwards.len(),
            })
            .into_response()
        }
        Err(error) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "reload_rejected",
            format!(
                "{error:#}; the running configuration is unchanged, fix the file and reload again"
            ),
        )
        .into_response(),
    }
}
