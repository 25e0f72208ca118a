//! The public HTTPS API: routes, JSON handling and the TLS accept loop.
//!
//! Every error is a JSON [`ErrorBody`] with a 4xx or 5xx status. Request
//! bodies must be `application/json` and at most [`MAX_BODY_BYTES`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt as _, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::api::{
    ChallengeRequest, EnrollRequest, ErrorBody, SessionRequest, TokenRequest, MAX_BODY_BYTES,
};
use super::service::{ErrorKind, Service, ServiceError};

/// Maximum concurrent connections per listener; further connections wait in
/// the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers. It also closes a
/// kept-alive connection that stays idle this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time one request may take once its headers are in, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Age after which a connection closes once its current request is done.
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(300);

/// Returns the current time in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message,
        };
        (status_of(self.kind), Json(body)).into_response()
    }
}

/// A JSON request body: checked for content type and size, then parsed.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ServiceError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ServiceError> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ServiceError::new(
                ErrorKind::UnsupportedMediaType,
                "unsupported_media_type",
                format!("content-type is {content_type:?}; send the body as JSON with `content-type: application/json`"),
            ));
        }
        let bytes = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                return Err(ServiceError::new(
                    ErrorKind::PayloadTooLarge,
                    "body_too_large",
                    format!("request body exceeds {MAX_BODY_BYTES} bytes; send a smaller body"),
                ))
            }
            Err(error) => {
                return Err(ServiceError::bad_request(
                    "body_unreadable",
                    format!("cannot read the request body: {error}"),
                ))
            }
        };
        let value = serde_json::from_slice(&bytes).map_err(|error| {
            ServiceError::bad_request(
                "invalid_json",
                format!("request body is not valid JSON for this route: {error}"),
            )
        })?;
        Ok(JsonBody(value))
    }
}

/// Runs a service method on the blocking thread pool, because it touches SQLite.
pub async fn blocking<R: Send + 'static>(
    call: impl FnOnce(u64) -> Result<R, ServiceError> + Send + 'static,
) -> Result<R, ServiceError> {
    tokio::task::spawn_blocking(move || call(unix_now()))
        .await
        .unwrap_or_else(|error| {
            tracing::error!(%error, "request handler panicked or was cancelled");
            Err(ServiceError::new(
                ErrorKind::Internal,
                "internal",
                "the request handler failed; see the server log",
            ))
        })
}

/// Builds the public API router.
pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/keys", get(keys))
        .route("/v1/enroll", post(enroll))
        .route("/v1/session/challenge", post(challenge))
        .route("/v1/session", post(session))
        .route("/v1/token", post(token))
        .route("/v1/revocations", get(revocations))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(bounded))
        .with_state(service)
}

/// Fallback for unknown routes.
pub async fn not_found() -> ServiceError {
    ServiceError::new(
        ErrorKind::NotFound,
        "not_found",
        "no such route; see docs/TOKEN_SERVER.md for the API",
    )
}

/// Fallback for known routes with the wrong method.
pub async fn method_not_allowed() -> ServiceError {
    ServiceError::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        "this route does not accept this method; see docs/TOKEN_SERVER.md for the API",
    )
}

type Shared = State<Arc<Service>>;

async fn keys(State(service): Shared) -> Result<Response, ServiceError> {
    let keys = blocking(move |now| service.keys(now)).await?;
    Ok(Json(keys).into_response())
}

async fn enroll(
    State(service): Shared,
    JsonBody(request): JsonBody<EnrollRequest>,
) -> Result<Response, ServiceError> {
    let response = blocking(move |now| service.enroll(&request, now)).await?;
    Ok(Json(response).into_response())
}

async fn challenge(
    State(service): Shared,
    JsonBody(request): JsonBody<ChallengeRequest>,
) -> Result<Response, ServiceError> {
    let response = blocking(move |now| service.challenge(&request, now)).await?;
    Ok(Json(response).into_response())
}

async fn session(
    State(service): Shared,
    JsonBody(request): JsonBody<SessionRequest>,
) -> Result<Response, ServiceError> {
    let response = blocking(move |now| service.open_session(&request, now)).await?;
    Ok(Json(response).into_response())
}

async fn token(
    State(service): Shared,
    JsonBody(request): JsonBody<TokenRequest>,
) -> Result<Response, ServiceError> {
    let response = blocking(move |now| service.issue_token(&request, now)).await?;
    Ok(Json(response).into_response())
}

async fn revocations(
    State(service): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ServiceError> {
    let since = query_u64(query.as_deref(), "since")?;
    let response = blocking(move |now| service.revocations(since, now)).await?;
    Ok(Json(response).into_response())
}

/// Reads an optional unsigned integer parameter from a query string and
/// rejects any other parameter.
pub fn query_u64(query: Option<&str>, name: &str) -> Result<Option<u64>, ServiceError> {
    let mut value = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, text) = pair.split_once('=').unwrap_or((pair, ""));
        if key != name {
            return Err(ServiceError::bad_request(
                "invalid_query",
                format!("unknown query parameter {key:?}; this route accepts only `{name}`"),
            ));
        }
        let parsed = text.parse::<u64>().map_err(|_| {
            ServiceError::bad_request(
                "invalid_query",
                format!("query parameter `{name}` is {text:?}; use a non-negative integer"),
            )
        })?;
        value = Some(parsed);
    }
    Ok(value)
}

/// Bounds the time of one request (a layer of both routers), so a body sent a byte at a time cannot
/// hold a connection and its handler: the header timeout alone does not.
pub async fn bounded(request: Request, next: Next) -> Response {
    // NOTE: work already handed to the blocking pool runs on after a
    // timeout, so a token can be issued and recorded although its caller
    // got 408.
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ServiceError::new(
            ErrorKind::RequestTimeout,
            "request_timeout",
            format!(
                "the request was not complete within {} s; send the whole body at once and retry",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Serves `router` on one accepted connection with HTTP/1.1 keep-alive.
///
/// The routers' [`bounded`] layer limits each request to
/// [`REQUEST_TIMEOUT`], and [`HEADER_READ_TIMEOUT`] closes an idle
/// connection. A connection closes after the request that runs when it
/// reaches [`CONNECTION_MAX_AGE`].
pub async fn serve_connection<I>(io: I, router: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = tokio::time::sleep(CONNECTION_MAX_AGE) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(REQUEST_TIMEOUT, connection).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::debug!("connection closed: a request outlived the connection's age limit");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Accepts TLS connections on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE; back off instead of spinning.
                tracing::warn!(%error, "accept failed on the HTTPS listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(tls, router).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
