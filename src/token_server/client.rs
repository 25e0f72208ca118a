//! Async clients of the token server.
//!
//! [`TokenServerClient`] speaks to the public API over HTTPS and trusts
//! exactly one certificate, named by its pin `sha256:<hex of SHA-256 of the
//! DER certificate>` as printed by `h8-tokend init`. Host names and CAs play
//! no part. [`AdminClient`] speaks to the admin API over its Unix socket.
//!
//! [`TokenServerClient`] keeps up to [`MAX_IDLE_CONNECTIONS`] idle HTTP/1.1
//! connections and reuses them, so a burst of requests pays for one TLS
//! handshake per connection rather than one per request. [`AdminClient`]
//! opens a connection per request: an operator sends a few.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use super::api::{
    session_message, token_request_message, AdminAppsResponse, AdminAuditResponse,
    AdminEnrollRequest, AdminEnrollResponse, AdminReloadResponse, AdminRevokeRequest,
    AdminRevokeResponse, AdminRotateKeyResponse, AdminSessionsResponse, ChallengeRequest,
    ChallengeResponse, EnrollRequest, EnrollResponse, ErrorBody, KeysResponse, RevocationsResponse,
    SessionRequest, SessionResponse, TokenRequest, TokenResponse,
};
use crate::identity::{certificate_fingerprint, parse_public_key, public_key_text};
use crate::token::{KeyId, KeySet};

/// Maximum size of a response body the clients accept.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Time limit on one request, connection set-up included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections that one [`TokenServerClient`] (and its clones) keeps.
pub const MAX_IDLE_CONNECTIONS: usize = 8;

/// Idle time after which the client drops a connection instead of reusing
/// it: below the server's idle limit, so a reused connection is rarely
/// closed under a request.
const MAX_IDLE_TIME: Duration = Duration::from_secs(5);
/// Age after which the client stops reusing a connection: below the age at
/// which the server closes it.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(240);

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A kept connection between requests.
struct IdleConnection {
    sender: Sender,
    opened: Instant,
    idle_since: Instant,
}

/// Error from a client request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address or pin given to the client is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The connection could not be opened.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// Address or socket path.
        address: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TLS handshake failed, for example because the pin does not match.
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        /// Address of the token server.
        address: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP request failed: {0}")]
    Http(String),
    /// The request did not finish within [`REQUEST_TIMEOUT`].
    #[error("request to {0} timed out after {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    /// The server returned an error status.
    #[error("token server returned {status} {error}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        error: String,
        /// Message from the body.
        message: String,
    },
    /// The server's response could not be decoded.
    #[error("invalid response from the token server: {0}")]
    InvalidResponse(String),
}

/// A raw HTTP response: status and body.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Body bytes.
    pub body: Bytes,
}

/// Accepts exactly the certificate with the pinned fingerprint and still
/// verifies the TLS handshake signature with that certificate's key.
#[derive(Debug)]
pub struct PinnedCertVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCertVerifier {
    /// Builds a verifier for `pin`, which must be `sha256:` and 64 hex digits.
    pub fn new(pin: &str) -> Result<Self, ClientError> {
        let pin = pin.trim().to_ascii_lowercase();
        let valid = pin
            .strip_prefix("sha256:")
            .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(ClientError::InvalidArgument(format!(
                "TLS pin {pin:?} is invalid; use the `sha256:<64 hex digits>` value printed by `h8-tokend init`"
            )));
        }
        Ok(PinnedCertVerifier {
            pin,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = certificate_fingerprint(end_entity);
        if found == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate is {found}, but the pinned certificate is {}; check the token server pin",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client of the public HTTPS API.
#[derive(Clone)]
pub struct TokenServerClient {
    address: String,
    host: String,
    connector: TlsConnector,
    idle: Arc<std::sync::Mutex<Vec<IdleConnection>>>,
}

impl std::fmt::Debug for TokenServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServerClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl TokenServerClient {
    /// Builds a client for `address` (`host:port`, optionally prefixed with
    /// `https://`) that trusts only the certificate with fingerprint `pin`.
    pub fn new(address: &str, pin: &str) -> Result<Self, ClientError> {
        let address = address
            .trim()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        let host = match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                host.trim_start_matches('[').trim_end_matches(']').to_owned()
            }
            _ => {
                return Err(ClientError::InvalidArgument(format!(
                    "token server address {address:?} is invalid; use host:port, such as 127.0.0.1:8443"
                )))
            }
        };
        let verifier = PinnedCertVerifier::new(pin)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::InvalidArgument(format!("cannot configure TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(TokenServerClient {
            address,
            host,
            connector: TlsConnector::from(Arc::new(config)),
            idle: Arc::default(),
        })
    }

    /// Opens a new TLS connection and its HTTP/1.1 sender.
    async fn connect(&self) -> Result<(Sender, Instant), ClientError> {
        let tcp =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| ClientError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        // The name only fills SNI: the verifier checks the pin, not names.
        let name = ServerName::try_from(self.host.clone())
            .or_else(|_| ServerName::try_from("localhost".to_owned()))
            .map_err(|e| ClientError::InvalidArgument(format!("invalid TLS server name: {e}")))?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Tls {
                address: self.address.clone(),
                source,
            })?;
        Ok((handshake(tls).await?, Instant::now()))
    }

    /// Takes an idle connection that is still open, if there is one.
    async fn take_idle(&self) -> Option<(Sender, Instant)> {
        // Let connection tasks process any close that arrived while this
        // task ran, so a connection the server closed is seen as closed.
        tokio::task::yield_now().await;
        loop {
            let mut idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if idle.idle_since.elapsed() < MAX_IDLE_TIME
                && !idle.sender.is_closed()
                && idle.sender.ready().await.is_ok()
            {
                return Some((idle.sender, idle.opened));
            }
        }
    }

    fn put_idle(&self, sender: Sender, opened: Instant) {
        if sender.is_closed() || opened.elapsed() >= MAX_CONNECTION_AGE {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|c| c.idle_since.elapsed() < MAX_IDLE_TIME);
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(IdleConnection {
                sender,
                opened,
                idle_since: Instant::now(),
            });
        }
    }

    /// Sends one request and returns the raw response, whatever its status.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let body = Bytes::from(body);
        let request =
            || build_request(&self.host, method.clone(), path, content_type, body.clone());
        let work = async {
            // A kept connection may have been closed by the server since its
            // last use, for example by a restart. The request then goes out
            // once more on a new connection. The server can have acted on the
            // first copy only if it died after acting and before responding.
            if let Some((mut sender, opened)) = self.take_idle().await {
                match sender.try_send_request(request()?).await {
                    Ok(response) => {
                        let response = read_response(response).await?;
                        self.put_idle(sender, opened);
                        return Ok(response);
                    }
                    Err(error) => {
                        tracing::debug!(error = %error.into_error(), "a kept connection to the token server failed; retrying on a new one");
                    }
                }
            }
            let request = request()?;
            let (mut sender, opened) = self.connect().await?;
            let response = exchange(&mut sender, request).await?;
            self.put_idle(sender, opened);
            Ok(response)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| ClientError::Timeout(self.address.clone()))?
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        decode(self.send_raw(Method::GET, path, None, Vec::new()).await?)
    }

    async fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        request: &T,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Http(e.to_string()))?;
        decode(
            self.send_raw(Method::POST, path, Some("application/json"), body)
                .await?,
        )
    }

    /// `GET /v1/keys`: the published signing keys.
    pub async fn keys(&self) -> Result<KeysResponse, ClientError> {
        self.get("/v1/keys").await
    }

    /// Fetches `/v1/keys` and returns the issuer and the keys as a [`KeySet`].
    pub async fn key_set(&self) -> Result<(String, KeySet), ClientError> {
        let response = self.keys().await?;
        let mut set = KeySet::default();
        for key in &response.keys {
            let public = parse_public_key(&key.public_key).map_err(ClientError::InvalidResponse)?;
            if KeyId::of(&public).to_string() != key.key_id {
                return Err(ClientError::InvalidResponse(format!(
                    "key id {} does not match its public key",
                    key.key_id
                )));
            }
            set.insert(public);
        }
        Ok((response.issuer, set))
    }

    /// `POST /v1/enroll`: binds `name` to `public_key` with a one-time code.
    pub async fn enroll(
        &self,
        name: &str,
        enrollment_code: &str,
        public_key: &VerifyingKey,
    ) -> Result<EnrollResponse, ClientError> {
        let request = EnrollRequest {
            name: name.to_owned(),
            enrollment_code: enrollment_code.to_owned(),
            public_key: public_key_text(public_key),
        };
        self.post("/v1/enroll", &request).await
    }

    /// `POST /v1/session/challenge`.
    pub async fn challenge(&self, name: &str) -> Result<ChallengeResponse, ClientError> {
        self.post(
            "/v1/session/challenge",
            &ChallengeRequest {
                name: name.to_owned(),
            },
        )
        .await
    }

    /// `POST /v1/session` with an already signed request.
    pub async fn session(&self, request: &SessionRequest) -> Result<SessionResponse, ClientError> {
        self.post("/v1/session", request).await
    }

    /// Opens a session: fetches a challenge, signs it with `key` and sends it.
    pub async fn open_session(
        &self,
        name: &str,
        key: &SigningKey,
    ) -> Result<SessionResponse, ClientError> {
        let challenge = self.challenge(name).await?;
        let bytes = STANDARD
            .decode(&challenge.challenge)
            .map_err(|_| ClientError::InvalidResponse("challenge is not base64".to_owned()))?;
        let signature = key.sign(&session_message(&bytes, name));
        self.session(&SessionRequest {
            name: name.to_owned(),
            challenge: challenge.challenge,
            signature: STANDARD.encode(signature.to_bytes()),
        })
        .await
    }

    /// `POST /v1/token` with an already signed request.
    pub async fn token(&self, request: &TokenRequest) -> Result<TokenResponse, ClientError> {
        self.post("/v1/token", request).await
    }

    /// Requests a client token for `application`, signing with `key` at
    /// `timestamp` (seconds since the Unix epoch, the caller's clock).
    pub async fn request_token(
        &self,
        source_id: &str,
        application: &str,
        key: &SigningKey,
        timestamp: u64,
    ) -> Result<TokenResponse, ClientError> {
        let signature = key.sign(&token_request_message(source_id, application, timestamp));
        self.token(&TokenRequest {
            source_id: source_id.to_owned(),
            application: application.to_owned(),
            timestamp,
            signature: STANDARD.encode(signature.to_bytes()),
        })
        .await
    }

    /// `GET /v1/revocations`, with `since` set to the last epoch seen, if any.
    pub async fn revocations(
        &self,
        since: Option<u64>,
    ) -> Result<RevocationsResponse, ClientError> {
        match since {
            Some(epoch) => self.get(&format!("/v1/revocations?since={epoch}")).await,
            None => self.get("/v1/revocations").await,
        }
    }
}

/// Client of the admin API on the Unix socket.
#[derive(Clone, Debug)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// Builds a client for the admin socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AdminClient {
            socket: socket.into(),
        }
    }

    /// Returns the socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the raw response, whatever its status.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let address = self.socket.display().to_string();
        let work = async {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ClientError::Connect {
                        address: address.clone(),
                        source,
                    })?;
            let request = build_request("localhost", method, path, content_type, body.into())?;
            let mut sender = handshake(stream).await?;
            exchange(&mut sender, request).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| ClientError::Timeout(address.clone()))?
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        decode(self.send_raw(Method::GET, path, None, Vec::new()).await?)
    }

    async fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        request: &T,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Http(e.to_string()))?;
        decode(
            self.send_raw(Method::POST, path, Some("application/json"), body)
                .await?,
        )
    }

    /// Creates a one-time enrollment code for `name`, valid for `ttl_secs`
    /// or the server's default.
    pub async fn enroll(
        &self,
        name: &str,
        ttl_secs: Option<u64>,
    ) -> Result<AdminEnrollResponse, ClientError> {
        self.post(
            "/v1/admin/enroll",
            &AdminEnrollRequest {
                name: name.to_owned(),
                ttl_secs,
            },
        )
        .await
    }

    /// Revokes a session, resource server or token.
    pub async fn revoke(
        &self,
        request: &AdminRevokeRequest,
    ) -> Result<AdminRevokeResponse, ClientError> {
        self.post("/v1/admin/revoke", request).await
    }

    /// Rotates the token-signing key.
    pub async fn rotate_key(&self) -> Result<AdminRotateKeyResponse, ClientError> {
        self.post("/v1/admin/rotate-key", &serde_json::json!({}))
            .await
    }

    /// Reloads the policy file.
    pub async fn reload(&self) -> Result<AdminReloadResponse, ClientError> {
        self.post("/v1/admin/reload", &serde_json::json!({})).await
    }

    /// Lists the newest `limit` audit entries.
    pub async fn audit(&self, limit: u64) -> Result<AdminAuditResponse, ClientError> {
        self.get(&format!("/v1/admin/audit?limit={limit}")).await
    }

    /// Lists applications and their client identifiers.
    pub async fn apps(&self) -> Result<AdminAppsResponse, ClientError> {
        self.get("/v1/admin/apps").await
    }

    /// Lists sessions that have not expired.
    pub async fn sessions(&self) -> Result<AdminSessionsResponse, ClientError> {
        self.get("/v1/admin/sessions").await
    }
}

/// Starts HTTP/1.1 on `io` and drives the connection in its own task.
async fn handshake<I>(io: I) -> Result<Sender, ClientError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "token server connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `request` on `sender` and reads the whole response.
async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> Result<RawResponse, ClientError> {
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    read_response(response).await
}

fn build_request(
    host: &str,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if let Some(content_type) = content_type {
        builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
    }
    builder
        .body(Full::new(body))
        .map_err(|e| ClientError::Http(e.to_string()))
}

async fn read_response(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<RawResponse, ClientError> {
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| ClientError::Http(format!("cannot read the response body: {e}")))?
        .to_bytes();
    Ok(RawResponse { status, body })
}

fn decode<R: DeserializeOwned>(response: RawResponse) -> Result<R, ClientError> {
    if !response.status.is_success() {
        let body: ErrorBody =
            serde_json::from_slice(&response.body).unwrap_or_else(|_| ErrorBody {
                error: "unknown".to_owned(),
                message: String::from_utf8_lossy(&response.body)
                    .chars()
                    .take(200)
                    .collect(),
            });
        return Err(ClientError::Api {
            status: response.status.as_u16(),
            error: body.error,
            message: body.message,
        });
    }
    serde_json::from_slice(&response.body).map_err(|e| ClientError::InvalidResponse(e.to_string()))
}
