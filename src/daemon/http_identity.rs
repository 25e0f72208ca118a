//! Caller identity as HTTP request headers for HTTP services
//! (`identity = "http-headers"`).
//!
//! The stream from the peer is served as HTTP/1.1. Every request loses any
//! `H8-Peer`, `H8-Client-Id` and `H8-Source-Id` headers the caller sent, gets
//! them set from the verified caller, and is sent to the backend over the
//! connection already made to the service's target.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;
use tracing::debug;

use super::forward::LocalIo;
use super::pipe::{PipeError, PipeStats, LOCAL_ERROR_CODE};
use super::PeerIdentity;

/// Request headers that carry the caller's identity to the backend.
const IDENTITY_HEADERS: [&str; 3] = ["h8-peer", "h8-client-id", "h8-source-id"];

/// Time the caller has to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum bytes buffered for one request head.
const MAX_HEAD_LEN: usize = 64 * 1024;

type Body = Either<Incoming, Full<Bytes>>;

/// Serves an HTTP/1 stream to the backend, setting identity headers on every request.
pub(super) async fn serve(
    local: Pin<Box<dyn LocalIo>>,
    caller: &PeerIdentity,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<PipeStats, PipeError> {
    let identity = match identity_values(caller) {
        Ok(identity) => Arc::new(identity),
        Err(error) => {
            let _ = send.reset(LOCAL_ERROR_CODE.into());
            let _ = recv.stop(LOCAL_ERROR_CODE.into());
            return Err(PipeError::Local(error));
        }
    };
    let (sender, backend) = match hyper::client::conn::http1::handshake(TokioIo::new(local)).await {
        Ok(pair) => pair,
        Err(error) => {
            let _ = send.reset(LOCAL_ERROR_CODE.into());
            let _ = recv.stop(LOCAL_ERROR_CODE.into());
            return Err(PipeError::Local(io::Error::other(error)));
        }
    };
    tokio::spawn(async move {
        if let Err(error) = backend.await {
            debug!(%error, "backend HTTP connection ended with an error");
        }
    });

    let sender = Arc::new(Mutex::new(sender));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let sender = sender.clone();
        let identity = identity.clone();
        async move { Ok::<_, std::convert::Infallible>(forward(&sender, &identity, request).await) }
    });

    let counted = Counted::new(tokio::io::join(recv, send));
    let stats = counted.stats.clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_LEN)
        .half_close(true);
    let result = builder
        .serve_connection(TokioIo::new(counted), service)
        .await;
    let stats = PipeStats {
        sent: stats.written.load(Ordering::Relaxed),
        received: stats.read.load(Ordering::Relaxed),
    };
    // NOTE: on an error the QUIC stream is dropped with the connection, which
    // quinn turns into a clean finish; hyper has already sent a 4xx/5xx response
    // where the HTTP framing allowed one.
    result.map_err(|error| PipeError::Peer(format!("HTTP from the caller failed: {error}")))?;
    Ok(stats)
}

fn identity_values(caller: &PeerIdentity) -> io::Result<[(HeaderName, HeaderValue); 3]> {
    let value = |text: &str| {
        HeaderValue::from_str(text).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("caller identity {text:?} is not a valid HTTP header value"),
            )
        })
    };
    Ok([
        (
            HeaderName::from_static(IDENTITY_HEADERS[0]),
            value(&caller.name)?,
        ),
        (
            HeaderName::from_static(IDENTITY_HEADERS[1]),
            value(&caller.client_id)?,
        ),
        (
            HeaderName::from_static(IDENTITY_HEADERS[2]),
            value(&caller.source_id)?,
        ),
    ])
}

async fn forward(
    sender: &Mutex<hyper::client::conn::http1::SendRequest<Incoming>>,
    identity: &[(HeaderName, HeaderValue); 3],
    mut request: Request<Incoming>,
) -> Response<Body> {
    let headers = request.headers_mut();
    for (name, value) in identity {
        // `insert` replaces every value the caller sent under this name.
        headers.insert(name.clone(), value.clone());
    }
    let mut sender = sender.lock().await;
    if let Err(error) = sender.ready().await {
        return bad_gateway(&format!("the backend closed its connection: {error}"));
    }
    match sender.send_request(request).await {
        Ok(response) => {
            let closes = backend_closes(&response);
            let mut response = response.map(Either::Left);
            if closes {
                // The backend connection cannot carry another request, so the
                // caller must not send one on this stream either.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        Err(error) => bad_gateway(&format!("the backend failed to answer: {error}")),
    }
}

/// Reports whether the backend closes its connection after `response`.
fn backend_closes<B>(response: &Response<B>) -> bool {
    let has_token = |token: &str| {
        response
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token("close") || (response.version() <= Version::HTTP_10 && !has_token("keep-alive"))
}

fn bad_gateway(reason: &str) -> Response<Body> {
    debug!(%reason, "HTTP identity forwarding failed");
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "h8d: {reason}; check the service's target on this host\n"
    )))));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

#[derive(Debug, Default)]
struct ByteCounts {
    read: AtomicU64,
    written: AtomicU64,
}

/// Counts the bytes read from and written to the QUIC stream.
struct Counted<T> {
    inner: T,
    stats: Arc<ByteCounts>,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        Counted {
            inner,
            stats: Arc::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.stats.read.fetch_add(read, Ordering::Relaxed);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &result {
            self.stats
                .written
                .fetch_add(*written as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
