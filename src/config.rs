//! The session daemon's configuration file (`h8d.toml`).
//!
//! Unknown keys are errors, and every error names the file, line and column.
//! Durations are whole seconds unless a field's name says otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use toml::Spanned;

use crate::identity::parse_public_key;
use crate::policy::valid_name;
use crate::source::{read_toml, SourceError};

/// Default path of the local API socket.
pub const DEFAULT_API_SOCKET: &str = "/run/h8/h8d.sock";

/// The validated daemon configuration.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// File the configuration was read from.
    pub path: PathBuf,
    /// This daemon's resource server name.
    pub name: String,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// Directory for the identity key, saved token and key set (created 0700).
    pub state_dir: PathBuf,
    /// Token-server or side-car mode, with its settings.
    pub mode: ModeConfig,
    /// Local API settings.
    pub api: ApiConfig,
    /// QUIC and handshake limits.
    pub quic: QuicConfig,
    /// Peers by name.
    pub peers: BTreeMap<String, PeerConfig>,
    /// Services offered to peers, by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Local listeners that forward to a peer's service.
    pub forwards: Vec<ForwardConfig>,
    /// Seconds that open streams may keep running after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Log filter (tracing `EnvFilter` syntax) when `RUST_LOG` is unset.
    pub log_level: String,
    /// Threads of the async runtime; read at start only.
    pub worker_threads: usize,
}

/// Mode-specific settings.
#[derive(Clone, Debug)]
pub enum ModeConfig {
    /// Client tokens from a token server.
    TokenServer(TokenServerConfig),
    /// Machine tokens and a local policy.
    Sidecar(SidecarConfig),
}

/// Token server address, TLS pin and trust settings.
#[derive(Clone, Debug)]
pub struct TokenServerConfig {
    /// Base URL, `https://host:port`.
    pub url: String,
    /// Pin of the token server's TLS certificate, `sha256:<hex>`.
    pub tls_pin: String,
    /// Resource application whose client token this daemon fetches.
    pub application: String,
    /// Required token issuer; learned from the token server when unset.
    pub issuer: Option<String>,
    /// Signing keys to trust; when set, published keys outside this list are ignored.
    pub signing_keys: Vec<VerifyingKey>,
    /// File holding the one-time enrollment code for the first start.
    pub enrollment_code_file: Option<PathBuf>,
    /// Seconds between revocation-list polls.
    pub revocation_poll_secs: u64,
    /// Allowed clock skew in seconds when checking peers' tokens.
    pub leeway_secs: u64,
}

/// Side-car mode settings.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// Local policy file: which peers may open which local services.
    pub policy: PathBuf,
    /// Lifetime of each machine token in seconds; a new one is signed at two thirds of it.
    pub machine_token_lifetime_secs: u64,
    /// Allowed clock skew in seconds.
    pub leeway_secs: u64,
    /// Optional external authorizer asked per stream.
    pub authorizer: Option<AuthorizerConfig>,
}

/// External authorizer on a Unix socket.
#[derive(Clone, Debug)]
pub struct AuthorizerConfig {
    /// Unix socket of the authorizer's HTTP server.
    pub socket: PathBuf,
    /// Seconds a decision is cached.
    pub cache_ttl_secs: u64,
    /// Milliseconds to wait for a decision.
    pub timeout_ms: u64,
    /// Decision when the authorizer cannot be asked.
    pub fallback: Fallback,
}

/// Decision used when the external authorizer is unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Reject the stream (the default).
    Deny,
    /// Decide with the local policy file.
    LocalPolicy,
}

/// Local API settings.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660); the daemon's group when unset.
    pub group: Option<String>,
    /// When non-empty, only these user ids may call the API (root always may).
    pub allowed_uids: Vec<u32>,
    /// When non-empty, callers in these group ids may call the API too.
    pub allowed_gids: Vec<u32>,
}

/// QUIC and handshake limits.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// Seconds between keep-alive packets on idle connections.
    pub keepalive_secs: u64,
    /// Seconds without traffic after which a connection is closed.
    pub idle_timeout_secs: u64,
    /// Seconds allowed for TLS plus the h8 handshake.
    pub handshake_timeout_secs: u64,
    /// Maximum handshakes in progress at once, all peers together.
    pub max_concurrent_handshakes: usize,
    /// Maximum concurrent incoming streams per connection.
    pub max_streams_per_connection: u32,
    /// Seconds to wait for the open reply on a new stream.
    pub stream_open_timeout_secs: u64,
}

/// One peer daemon.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Peer's resource server name.
    pub name: String,
    /// `host:port`; a DNS name is resolved again on every reconnect.
    pub address: String,
    /// Pinned identity key (side-car mode only).
    pub public_key: Option<VerifyingKey>,
}

/// Destination of a service's incoming streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Connect to a Unix socket.
    Unix(PathBuf),
    /// Connect to a TCP address (loopback or local network).
    Tcp(SocketAddr),
    /// Queue for a local program that accepts through the local API.
    Accept,
}

/// Form in which the caller's identity reaches the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityHeader {
    /// Nothing is added.
    #[default]
    None,
    /// A PROXY protocol v2 header with h8 TLVs precedes the bytes.
    ProxyV2,
    /// HTTP/1 request headers `H8-Peer`, `H8-Client-Id`, `H8-Source-Id` are set
    /// (and removed when the caller sends them itself).
    HttpHeaders,
}

/// A service offered to peers.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Service name.
    pub name: String,
    /// Destination of its streams.
    pub target: Target,
    /// Form in which the caller's identity is passed on.
    pub identity: IdentityHeader,
}

/// Listening address of a forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

/// A local listener whose connections are piped to a peer's service.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Listening address.
    pub listen: ListenAddress,
    /// Peer to reach.
    pub peer: String,
    /// Service on that peer.
    pub service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Spanned<String>,
    listen: Spanned<String>,
    state_dir: PathBuf,
    mode: Spanned<String>,
    #[serde(default)]
    token_server: Option<Spanned<RawTokenServer>>,
    #[serde(default)]
    sidecar: Option<Spanned<RawSidecar>>,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    quic: RawQuic,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    forwards: Vec<RawForward>,
    #[serde(default = "default_grace")]
    shutdown_grace_secs: u64,
    #[serde(default = "default_log_level")]
    log_level: Spanned<String>,
    #[serde(default = "default_worker_threads")]
    worker_threads: Spanned<u64>,
}

fn default_grace() -> u64 {
    10
}

/// Maximum value of `worker_threads`.
pub const MAX_WORKER_THREADS: u64 = 256;

fn default_worker_threads() -> Spanned<u64> {
    Spanned::new(0..0, 1)
}

fn default_log_level() -> Spanned<String> {
    Spanned::new(0..0, "info".to_owned())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenServer {
    url: Spanned<String>,
    tls_pin: Spanned<String>,
    application: Spanned<String>,
    issuer: Option<String>,
    #[serde(default)]
    signing_keys: Vec<Spanned<String>>,
    enrollment_code_file: Option<PathBuf>,
    #[serde(default = "default_revocation_poll")]
    revocation_poll_secs: u64,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
}

fn default_revocation_poll() -> u64 {
    5
}

fn default_leeway() -> u64 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    policy: PathBuf,
    #[serde(default = "default_machine_lifetime")]
    machine_token_lifetime_secs: Spanned<u64>,
    #[serde(default = "default_leeway")]
    leeway_secs: u64,
    authorizer: Option<RawAuthorizer>,
}

fn default_machine_lifetime() -> Spanned<u64> {
    Spanned::new(0..0, 900)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorizer {
    socket: PathBuf,
    #[serde(default = "default_cache_ttl")]
    cache_ttl_secs: u64,
    #[serde(default = "default_authorizer_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_fallback")]
    fallback: Fallback,
}

fn default_cache_ttl() -> u64 {
    5
}

fn default_authorizer_timeout() -> u64 {
    500
}

fn default_fallback() -> Fallback {
    Fallback::Deny
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    group: Option<String>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default)]
    allowed_gids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQuic {
    keepalive_secs: u64,
    idle_timeout_secs: u64,
    handshake_timeout_secs: u64,
    max_concurrent_handshakes: usize,
    max_streams_per_connection: u32,
    stream_open_timeout_secs: u64,
}

impl Default for RawQuic {
    fn default() -> Self {
        RawQuic {
            keepalive_secs: 10,
            idle_timeout_secs: 60,
            handshake_timeout_secs: 10,
            max_concurrent_handshakes: 64,
            max_streams_per_connection: 4096,
            stream_open_timeout_secs: 10,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    address: Spanned<String>,
    public_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    target: Spanned<String>,
    #[serde(default)]
    identity: IdentityHeader,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: Spanned<String>,
    peer: Spanned<String>,
    service: Spanned<String>,
}

/// Maximum number of peers in one config.
pub const MAX_PEERS: usize = 10_000;

impl DaemonConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, SourceError> {
        let (raw, text): (RawConfig, String) = read_toml(path)?;
        Self::from_raw(path, &text, raw)
    }

    /// Parses and validates config text; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SourceError> {
        let raw: RawConfig = crate::source::parse_toml(path, text)?;
        Self::from_raw(path, text, raw)
    }

    fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<Self, SourceError> {
        let error = |span: std::ops::Range<usize>, message: String| {
            SourceError::at(path, text, span.start, message)
        };
        let check_name = |name: &Spanned<String>, what: &str| -> Result<(), SourceError> {
            if valid_name(name.get_ref()) && name.get_ref() != "*" {
                Ok(())
            } else {
                Err(error(
                    name.span(),
                    format!(
                        "invalid {what} {:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.'",
                        name.get_ref()
                    ),
                ))
            }
        };

        check_name(&raw.name, "resource server name")?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(raw.log_level.get_ref()) {
            return Err(error(
                raw.log_level.span(),
                format!(
                    "invalid log_level {:?}: {e}; use a level such as \"info\" or directives such as \"h8=debug,info\"",
                    raw.log_level.get_ref()
                ),
            ));
        }
        let worker_threads = *raw.worker_threads.get_ref();
        if !(1..=MAX_WORKER_THREADS).contains(&worker_threads) {
            return Err(error(
                raw.worker_threads.span(),
                format!("worker_threads = {worker_threads} is out of range; use 1 to {MAX_WORKER_THREADS}"),
            ));
        }
        let listen: SocketAddr = raw.listen.get_ref().parse().map_err(|_| {
            error(
                raw.listen.span(),
                format!(
                    "invalid listen address {:?}: expected IP:PORT such as 127.0.0.1:7401",
                    raw.listen.get_ref()
                ),
            )
        })?;

        let mode = match raw.mode.get_ref().as_str() {
            "token-server" => {
                let Some(ts) = raw.token_server else {
                    return Err(error(
                        raw.mode.span(),
                        "mode \"token-server\" needs a [token_server] section".to_owned(),
                    ));
                };
                if let Some(sidecar) = &raw.sidecar {
                    return Err(error(
                        sidecar.span(),
                        "[sidecar] is only valid with mode = \"side-car\"".to_owned(),
                    ));
                }
                let ts = ts.into_inner();
                if !ts.url.get_ref().starts_with("https://") {
                    return Err(error(
                        ts.url.span(),
                        format!(
                            "token server url {:?} must start with https://",
                            ts.url.get_ref()
                        ),
                    ));
                }
                let pin = ts.tls_pin.get_ref();
                let valid_pin = pin.strip_prefix("sha256:").is_some_and(|hex| {
                    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
                });
                if !valid_pin {
                    return Err(error(
                        ts.tls_pin.span(),
                        "tls_pin must be \"sha256:\" followed by 64 hex digits, as printed by `h8-tokend init`".to_owned(),
                    ));
                }
                check_name(&ts.application, "resource application")?;
                let mut signing_keys = Vec::new();
                for key in &ts.signing_keys {
                    signing_keys
                        .push(parse_public_key(key.get_ref()).map_err(|e| error(key.span(), e))?);
                }
                ModeConfig::TokenServer(TokenServerConfig {
                    url: ts.url.into_inner().trim_end_matches('/').to_owned(),
                    tls_pin: pin.to_ascii_lowercase(),
                    application: ts.application.into_inner(),
                    issuer: ts.issuer,
                    signing_keys,
                    enrollment_code_file: ts.enrollment_code_file.map(|file| resolve(path, &file)),
                    revocation_poll_secs: ts.revocation_poll_secs.max(1),
                    leeway_secs: ts.leeway_secs,
                })
            }
            "side-car" => {
                let Some(sidecar) = raw.sidecar else {
                    return Err(error(
                        raw.mode.span(),
                        "mode \"side-car\" needs a [sidecar] section".to_owned(),
                    ));
                };
                if let Some(ts) = &raw.token_server {
                    return Err(error(
                        ts.span(),
                        "[token_server] is only valid with mode = \"token-server\"".to_owned(),
                    ));
                }
                let sidecar = sidecar.into_inner();
                let lifetime = *sidecar.machine_token_lifetime_secs.get_ref();
                if !(3..=86_400).contains(&lifetime) {
                    return Err(error(
                        sidecar.machine_token_lifetime_secs.span(),
                        format!("machine_token_lifetime_secs = {lifetime} is out of range; use 3 to 86400"),
                    ));
                }
                ModeConfig::Sidecar(SidecarConfig {
                    policy: resolve(path, &sidecar.policy),
                    machine_token_lifetime_secs: lifetime,
                    leeway_secs: sidecar.leeway_secs,
                    authorizer: sidecar.authorizer.map(|a| AuthorizerConfig {
                        socket: resolve(path, &a.socket),
                        cache_ttl_secs: a.cache_ttl_secs,
                        timeout_ms: a.timeout_ms.max(1),
                        fallback: a.fallback,
                    }),
                })
            }
            other => {
                return Err(error(
                    raw.mode.span(),
                    format!("unknown mode {other:?}: use \"token-server\" or \"side-car\""),
                ))
            }
        };

        let sidecar = matches!(mode, ModeConfig::Sidecar(_));
        if raw.peers.len() > MAX_PEERS {
            return Err(error(
                0..0,
                format!("{} peers, the maximum is {MAX_PEERS}", raw.peers.len()),
            ));
        }
        let mut peers = BTreeMap::new();
        for peer in raw.peers {
            check_name(&peer.name, "peer name")?;
            if peer.name.get_ref() == raw.name.get_ref() {
                return Err(error(
                    peer.name.span(),
                    "a daemon cannot list itself as a peer".to_owned(),
                ));
            }
            if !valid_host_port(peer.address.get_ref()) {
                return Err(error(
                    peer.address.span(),
                    format!(
                        "invalid peer address {:?}: expected host:port",
                        peer.address.get_ref()
                    ),
                ));
            }
            let public_key = match (&peer.public_key, sidecar) {
                (Some(key), true) => Some(parse_public_key(key.get_ref()).map_err(|e| error(key.span(), e))?),
                (None, true) => {
                    return Err(error(
                        peer.name.span(),
                        format!(
                            "peer {:?} has no public_key; side-car mode pins every peer's key (`h8 keygen` prints one)",
                            peer.name.get_ref()
                        ),
                    ))
                }
                (Some(key), false) => {
                    return Err(error(
                        key.span(),
                        "public_key is only used in side-car mode; in token-server mode the client token names the key".to_owned(),
                    ))
                }
                (None, false) => None,
            };
            let name = peer.name.get_ref().clone();
            if peers.contains_key(&name) {
                return Err(error(
                    peer.name.span(),
                    format!("peer {name:?} is listed twice"),
                ));
            }
            peers.insert(
                name.clone(),
                PeerConfig {
                    name,
                    address: peer.address.into_inner(),
                    public_key,
                },
            );
        }

        let mut services = BTreeMap::new();
        for (name, service) in raw.services {
            let span = service.span();
            if !valid_name(&name) || name == "*" {
                return Err(error(span, format!("invalid service name {name:?}")));
            }
            let service = service.into_inner();
            let target = parse_target(service.target.get_ref(), path)
                .map_err(|e| error(service.target.span(), e))?;
            if target == Target::Accept && service.identity != IdentityHeader::None {
                return Err(error(
                    service.target.span(),
                    "identity headers apply to forwarded services; accepted streams carry identity in the API response".to_owned(),
                ));
            }
            services.insert(
                name.clone(),
                ServiceConfig {
                    name,
                    target,
                    identity: service.identity,
                },
            );
        }

        let mut forwards = Vec::new();
        for forward in raw.forwards {
            let listen = parse_listen(forward.listen.get_ref(), path)
                .map_err(|e| error(forward.listen.span(), e))?;
            if !peers.contains_key(forward.peer.get_ref()) {
                return Err(error(
                    forward.peer.span(),
                    format!(
                        "forward names peer {:?}, which is not in [[peers]]",
                        forward.peer.get_ref()
                    ),
                ));
            }
            check_name(&forward.service, "service name")?;
            forwards.push(ForwardConfig {
                listen,
                peer: forward.peer.into_inner(),
                service: forward.service.into_inner(),
            });
        }

        Ok(DaemonConfig {
            path: path.to_owned(),
            name: raw.name.into_inner(),
            listen,
            state_dir: resolve(path, &raw.state_dir),
            mode,
            api: ApiConfig {
                socket: raw
                    .api
                    .socket
                    .map_or_else(|| PathBuf::from(DEFAULT_API_SOCKET), |s| resolve(path, &s)),
                group: raw.api.group,
                allowed_uids: raw.api.allowed_uids,
                allowed_gids: raw.api.allowed_gids,
            },
            quic: QuicConfig {
                keepalive_secs: raw.quic.keepalive_secs.max(1),
                idle_timeout_secs: raw.quic.idle_timeout_secs.max(2),
                handshake_timeout_secs: raw.quic.handshake_timeout_secs.max(1),
                max_concurrent_handshakes: raw.quic.max_concurrent_handshakes.max(1),
                max_streams_per_connection: raw.quic.max_streams_per_connection.max(1),
                stream_open_timeout_secs: raw.quic.stream_open_timeout_secs.max(1),
            },
            peers,
            services,
            forwards,
            shutdown_grace_secs: raw.shutdown_grace_secs,
            log_level: raw.log_level.into_inner(),
            worker_threads: usize::try_from(worker_threads).unwrap_or(1),
        })
    }

    /// Reports whether this daemon runs in side-car mode.
    pub fn is_sidecar(&self) -> bool {
        matches!(self.mode, ModeConfig::Sidecar(_))
    }
}

/// Resolves a relative path against the directory of the config file.
fn resolve(config: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_owned();
    }
    config
        .parent()
        .map_or_else(|| path.to_owned(), |dir| dir.join(path))
}

fn valid_host_port(address: &str) -> bool {
    if address.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
}

fn parse_target(text: &str, config: &Path) -> Result<Target, String> {
    if text == "accept" {
        return Ok(Target::Accept);
    }
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(Target::Unix(resolve(config, Path::new(path))));
    }
    if let Some(address) = text.strip_prefix("tcp:") {
        return address.parse().map(Target::Tcp).map_err(|_| {
            format!("invalid TCP target {address:?}: expected IP:PORT such as 127.0.0.1:8080")
        });
    }
    Err(format!(
        "invalid target {text:?}: use \"unix:/path\", \"tcp:IP:PORT\" or \"accept\""
    ))
}

fn parse_listen(text: &str, config: &Path) -> Result<ListenAddress, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(ListenAddress::Unix(resolve(config, Path::new(path))));
    }
    if let Some(address) = text.strip_prefix("tcp:") {
        let address: SocketAddr = address.parse().map_err(|_| {
            format!("invalid listen address {address:?}: expected IP:PORT such as 127.0.0.1:9000")
        })?;
        if !address.ip().is_loopback() {
            return Err(format!(
                "forward listens on {address}, which is not a loopback address; anyone who can reach it would act as this daemon"
            ));
        }
        return Ok(ListenAddress::Tcp(address));
    }
    Err(format!(
        "invalid listen {text:?}: use \"unix:/path\" or \"tcp:127.0.0.1:PORT\""
    ))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
