//! JSON error responses and the HTTP status of each stream-open failure.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::model::ErrorBody;
use crate::daemon::OpenError;
use crate::wire::RejectCode;

/// An error response: status plus `{"error": code, "message": text}`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: String,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// Maps a failed stream open or accept. `target` names the stream, such
    /// as `service "echo" on peer "server-b"`.
    pub(super) fn from_open(error: &OpenError, target: &str) -> Self {
        match error {
            OpenError::UnknownPeer(peer) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_peer",
                format!(
                    "peer {peer:?} is not listed in [[peers]] of this daemon's config; \
                     add it and reload h8d (SIGHUP or POST /v1/reload)"
                ),
            ),
            OpenError::UnknownService(service) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_service",
                format!(
                    "no service {service:?} with target = \"accept\" in this daemon's config; \
                     add [services.{service}] target = \"accept\" and reload h8d"
                ),
            ),
            OpenError::Rejected(reject) => {
                let (status, hint) = reject_status(reject.code);
                ApiError::new(
                    status,
                    reject.code.as_str(),
                    format!("{target} was rejected: {}; {hint}", reject.reason),
                )
            }
            OpenError::Unreachable(reason) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "unreachable",
                format!(
                    "cannot reach {target}: {reason}; check that the peer's h8d runs and \
                     that its address in [[peers]] is right (h8 peers shows the last error)"
                ),
            ),
            OpenError::TimedOut(reason) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timed_out",
                format!(
                    "{target} timed out: {reason}; retry, or check the peer's load and network"
                ),
            ),
            OpenError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "h8d is shutting down and opens no new streams; retry once it has restarted",
            ),
        }
    }
}

/// HTTP status and a next step for each reason a peer or this daemon gives.
fn reject_status(code: RejectCode) -> (StatusCode, &'static str) {
    match code {
        RejectCode::UnknownService => (
            StatusCode::NOT_FOUND,
            "check the service name against [services] in the peer's config",
        ),
        RejectCode::OutOfScope => (
            StatusCode::FORBIDDEN,
            "this daemon's client token does not grant that service; ask the token-server \
             administrator to grant it in the policy (h8 token shows the grants)",
        ),
        RejectCode::PolicyDenied => (
            StatusCode::FORBIDDEN,
            "the peer's policy does not allow this daemon to open that service; add an \
             [[allow]] rule on the peer",
        ),
        RejectCode::Revoked => (
            StatusCode::FORBIDDEN,
            "the session or resource server was revoked; re-enroll this daemon",
        ),
        RejectCode::Expired => (
            StatusCode::FORBIDDEN,
            "a token is expired or not yet valid; check the clocks of both hosts and \
             whether h8d can reach its token server (h8 status)",
        ),
        RejectCode::NotPinned => (
            StatusCode::FORBIDDEN,
            "the peer's key is not pinned; check public_key in [[peers]] on both daemons",
        ),
        RejectCode::WrongPeer => (
            StatusCode::FORBIDDEN,
            "the daemons do not list each other; add each to the other's [[peers]] with the right address",
        ),
        RejectCode::KeyMismatch => (
            StatusCode::FORBIDDEN,
            "the peer's token names another key than its certificate; the token may be copied from another daemon",
        ),
        RejectCode::InvalidToken
        | RejectCode::UnknownSigningKey
        | RejectCode::BadProof
        | RejectCode::ModeMismatch
        | RejectCode::VersionMismatch => (
            StatusCode::FORBIDDEN,
            "the daemons do not trust each other; check that both use the same mode and \
             token server, and the peer's log",
        ),
        RejectCode::AuthorizerUnavailable => (
            StatusCode::FORBIDDEN,
            "the peer's external authorizer could not be asked; check it on the peer",
        ),
        RejectCode::Busy | RejectCode::ServiceUnavailable | RejectCode::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the peer cannot take the stream now; retry later or check the service's target \
             on the peer",
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "see the log of the peer's h8d for details",
        ),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}
