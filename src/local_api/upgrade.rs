//! `POST /v1/connect/{peer}/{service}` and `POST /v1/accept/{service}`:
//! the stream is opened (or accepted) first, then the HTTP connection is
//! upgraded to `h8-stream` and carries raw bytes both ways.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{CONNECTION, UPGRADE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::errors::ApiError;
use super::model::{HEADER_CLIENT_ID, HEADER_PEER, HEADER_SOURCE_ID, UPGRADE_PROTOCOL};
use crate::daemon::pipe::LOCAL_ERROR_CODE;
use crate::daemon::Daemon;

/// Default and maximum wait of `/v1/accept`, in seconds.
const DEFAULT_ACCEPT_TIMEOUT_SECS: u64 = 30;
const MAX_ACCEPT_TIMEOUT_SECS: u64 = 3600;

/// Query of `/v1/accept`.
#[derive(Debug, Deserialize)]
pub(super) struct AcceptQuery {
    timeout_secs: Option<u64>,
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers
        .get(UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    connection_upgrade && protocol
}

fn missing_upgrade(path: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "upgrade_required",
        format!(
            "{path} carries a raw byte stream and needs the headers \
             'Connection: Upgrade' and 'Upgrade: {UPGRADE_PROTOCOL}', for example \
             curl --unix-socket SOCKET -N -X POST -H 'Connection: Upgrade' \
             -H 'Upgrade: {UPGRADE_PROTOCOL}' http://h8{path}; or use h8 connect"
        ),
    )
}

fn switching_protocols() -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    response
}

/// Waits for hyper to hand over the connection after the 101 response,
/// then pipes it to the QUIC stream until both directions end.
fn spawn_pipe<G: Send + 'static>(
    daemon: Daemon,
    request: &mut Request,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    guard: G,
    stream_name: String,
) {
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                warn!(stream = %stream_name, %error, "local API client left before the upgrade completed");
                // Reset, because a dropped send stream would look like a clean end to the peer.
                let _ = send.reset(LOCAL_ERROR_CODE.into());
                let _ = recv.stop(LOCAL_ERROR_CODE.into());
                return;
            }
        };
        match daemon.pipe(TokioIo::new(upgraded), send, recv).await {
            Ok(stats) => {
                debug!(stream = %stream_name, sent = stats.sent, received = stats.received, "stream ended")
            }
            Err(error) => info!(stream = %stream_name, %error, "stream ended with an error"),
        }
        drop(guard);
    });
}

/// Rejects a peer or service name that no config could contain, before it
/// reaches a log line: names from the URL are caller input.
fn invalid_name(kind: &str, name: &str) -> Option<Response> {
    if crate::policy::valid_name(name) && name != "*" {
        return None;
    }
    let shown: String = name.chars().take(64).collect();
    Some(
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!(
                "{kind} name {shown:?} is invalid; names are 1 to 128 ASCII letters, digits, '-', '_' or '.'"
            ),
        )
        .into_response(),
    )
}

/// `POST /v1/connect/{peer}/{service}`.
pub(super) async fn connect(
    State(daemon): State<Daemon>,
    Path((peer, service)): Path<(String, String)>,
    mut request: Request,
) -> Response {
    if !wants_upgrade(request.headers()) {
        return missing_upgrade(request.uri().path()).into_response();
    }
    if let Some(response) =
        invalid_name("peer", &peer).or_else(|| invalid_name("service", &service))
    {
        return response;
    }
    let stream_name = format!("service {service:?} on peer {peer:?}");
    let opened = match daemon.open_stream(&peer, &service).await {
        Ok(opened) => opened,
        Err(error) => {
            info!(peer = %peer, service = %service, %error, "stream open through the local API failed");
            return ApiError::from_open(&error, &stream_name).into_response();
        }
    };
    debug!(peer = %peer, service = %service, "stream opened through the local API");
    let mut response = switching_protocols();
    if let Ok(value) = HeaderValue::from_str(&opened.peer.name) {
        response.headers_mut().insert(HEADER_PEER, value);
    }
    spawn_pipe(
        daemon,
        &mut request,
        opened.send,
        opened.recv,
        opened.guard,
        stream_name,
    );
    response
}

/// `POST /v1/accept/{service}?timeout_secs=N`.
pub(super) async fn accept(
    State(daemon): State<Daemon>,
    Path(service): Path<String>,
    query: Result<Query<AcceptQuery>, QueryRejection>,
    mut request: Request,
) -> Response {
    if !wants_upgrade(request.headers()) {
        return missing_upgrade(request.uri().path()).into_response();
    }
    if let Some(response) = invalid_name("service", &service) {
        return response;
    }
    let timeout_secs = match query {
        Ok(Query(query)) => query.timeout_secs.unwrap_or(DEFAULT_ACCEPT_TIMEOUT_SECS),
        Err(rejection) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("{rejection}; use ?timeout_secs=N with N whole seconds"),
            )
            .into_response()
        }
    };
    if timeout_secs == 0 || timeout_secs > MAX_ACCEPT_TIMEOUT_SECS {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "timeout_secs = {timeout_secs} is out of range; use 1 to {MAX_ACCEPT_TIMEOUT_SECS}"
            ),
        )
        .into_response();
    }
    let stream_name = format!("accepted stream of service {service:?}");
    let incoming = match daemon
        .accept_stream(&service, Duration::from_secs(timeout_secs))
        .await
    {
        Ok(incoming) => incoming,
        Err(error) => return ApiError::from_open(&error, &stream_name).into_response(),
    };
    let caller = incoming.caller.clone();
    debug!(peer = %caller.name, service = %service, "stream accepted through the local API");
    let mut response = switching_protocols();
    let identity = [
        (HEADER_PEER, &caller.name),
        (HEADER_CLIENT_ID, &caller.client_id),
        (HEADER_SOURCE_ID, &caller.source_id),
    ];
    for (name, value) in identity {
        match HeaderValue::from_str(value) {
            Ok(value) => {
                response.headers_mut().insert(name, value);
            }
            Err(_) => {
                warn!(header = name, value = %value, "identity is not a valid header value; omitted")
            }
        }
    }
    let stream_name = format!("stream of service {service:?} from peer {:?}", caller.name);
    spawn_pipe(
        daemon,
        &mut request,
        incoming.send,
        incoming.recv,
        incoming.guard,
        stream_name,
    );
    response
}
