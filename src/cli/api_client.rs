//! HTTP/1.1 client for the local daemon's API socket.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::local_api::model::{ErrorBody, UPGRADE_PROTOCOL};

/// An upgraded API connection: raw bytes to and from the stream.
pub type StreamIo = TokioIo<hyper::upgrade::Upgraded>;

/// An error response of the API.
#[derive(Debug, thiserror::Error)]
#[error("h8d answered {status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Code from the JSON body, such as `policy_denied`.
    pub code: String,
    /// Message from the JSON body.
    pub message: String,
}

/// A client of one daemon's API socket; each request uses a new connection.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// Creates a client for the API socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        ApiClient {
            socket: socket.to_owned(),
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|error| {
            anyhow!(
                "cannot connect to {}: {error}; is h8d running? pass --socket PATH or set H8_SOCKET",
                self.socket.display()
            )
        })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake on {} failed", self.socket.display()))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    fn request(method: Method, path: &str) -> anyhow::Result<Request<Empty<Bytes>>> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "h8")
            .body(Empty::new())
            .with_context(|| format!("invalid request path {path:?}"))
    }

    async fn send(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> anyhow::Result<Response<hyper::body::Incoming>> {
        let path = request.uri().path().to_owned();
        let mut sender = self.connect().await?;
        sender
            .send_request(request)
            .await
            .with_context(|| format!("request {path} to {} failed", self.socket.display()))
    }

    /// Sends `GET path` and decodes the JSON response.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send(Self::request(Method::GET, path)?).await?;
        json_body(response, path).await
    }

    /// Sends `POST path` without a body and decodes the JSON response.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send(Self::request(Method::POST, path)?).await?;
        json_body(response, path).await
    }

    /// Sends `POST path` with `Upgrade: h8-stream` and returns the response
    /// headers and the raw connection after `101 Switching Protocols`.
    pub async fn upgrade(&self, path: &str) -> anyhow::Result<(HeaderMap, StreamIo)> {
        let mut request = Self::request(Method::POST, path)?;
        request.headers_mut().insert(
            CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        request.headers_mut().insert(
            UPGRADE,
            hyper::header::HeaderValue::from_static(UPGRADE_PROTOCOL),
        );
        let response = self.send(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(error_of(response, path).await);
        }
        let headers = response.headers().clone();
        let upgraded = hyper::upgrade::on(response)
            .await
            .with_context(|| format!("upgrade of {path} failed after 101 Switching Protocols"))?;
        Ok((headers, TokioIo::new(upgraded)))
    }
}

async fn json_body<T: DeserializeOwned>(
    response: Response<hyper::body::Incoming>,
    path: &str,
) -> anyhow::Result<T> {
    if !response.status().is_success() {
        return Err(error_of(response, path).await);
    }
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the response to {path} failed"))?
        .to_bytes();
    serde_json::from_slice(&body).with_context(|| {
        format!("response to {path} is not the expected JSON; do h8 and h8d have the same version?")
    })
}

async fn error_of(response: Response<hyper::body::Incoming>, path: &str) -> anyhow::Error {
    let status = response.status();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return anyhow!("h8d answered {status} to {path}, and reading the body failed: {error}")
        }
    };
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(body) => ApiError {
            status,
            code: body.error,
            message: body.message,
        }
        .into(),
        Err(_) => ApiError {
            status,
            code: String::new(),
            message: String::from_utf8_lossy(&body).trim().to_owned(),
        }
        .into(),
    }
}

/// Fails unless `path` is safe to put into a URL path segment.
pub fn check_segment(what: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty()
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("invalid {what} {value:?}: use ASCII letters, digits, '-', '_' or '.'");
    }
    Ok(())
}
