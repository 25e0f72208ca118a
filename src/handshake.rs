//! The connection handshake between two daemons, as a sans-IO state machine.
//!
//! The handshake runs on the first bidirectional stream of a QUIC connection
//! after TLS 1.3 has completed. Each side holds a token (a client token from
//! the token server, or a self-signed machine token) and the Ed25519 key the
//! token names, which is also the key of its TLS certificate.
//!
//! ```text
//! client                                            server
//!   ClientHello {versions, mode, token_c, eph_c}  ->
//!                 <- ServerHello {version, mode, token_s, eph_s, sig_s, mac_s}
//!   ClientFinish {sig_c, mac_c}                   ->
//!                                              <- Done | Reject
//! ```
//!
//! Both signatures and both MACs cover a transcript hash that starts with
//! the TLS exporter value of this QUIC connection, so a handshake cannot be
//! replayed on another connection. The MAC keys come from the X25519 secret
//! of the two ephemeral keys, which gives key confirmation and forward
//! secrecy that does not rest on TLS alone.
//!
//! The types follow the order of the protocol: [`Initiator`] becomes
//! [`InitiatorAwaitingDone`], [`Responder`] becomes
//! [`ResponderAwaitingFinish`]. Each `handle_*` method consumes its state, so
//! a message cannot be handled twice or out of order.

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use x25519_dalek::{PublicKey as X25519Public, StaticSecret};

use crate::token::{self, Claims, KeySet, TokenError, TokenKind, Validation};
use crate::wire::{
    self, ClientFinish, ClientHello, HandshakeFrame, Mode, Reject, RejectCode, ServerHello,
    ServerHelloCore, SUPPORTED_VERSIONS,
};

/// TLS exporter label that binds the handshake to its QUIC connection.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-h8-handshake-v1";
/// Length of the exporter value.
pub const EXPORTER_LEN: usize = 32;

const TRANSCRIPT_CONTEXT: &[u8] = b"h8 handshake v1\0";
const SERVER_SIGNATURE_CONTEXT: &[u8] = b"h8 server signature v1\0";
const CLIENT_SIGNATURE_CONTEXT: &[u8] = b"h8 client signature v1\0";
const KEY_CONTEXT: &[u8] = b"h8 confirmation keys v1\0";

type HmacSha256 = Hmac<Sha256>;

/// Trust anchor for verifying the peer's token.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Client tokens from a token server whose signing keys are known.
    TokenServer {
        /// Published signing keys of the token server.
        keys: KeySet,
        /// Issuer and leeway requirements.
        validation: Validation,
    },
    /// Machine tokens from peers whose identity keys are pinned by name.
    Sidecar {
        /// Pinned identity key per peer name.
        pinned: HashMap<String, VerifyingKey>,
        /// Allowed clock skew in seconds.
        leeway: u64,
    },
}

impl Trust {
    /// The mode this trust belongs to.
    pub fn mode(&self) -> Mode {
        match self {
            Trust::TokenServer { .. } => Mode::TokenServer,
            Trust::Sidecar { .. } => Mode::Sidecar,
        }
    }

    /// Verifies a peer's token at `now`.
    pub fn verify_token(&self, bytes: &[u8], now: u64) -> Result<Claims, Reject> {
        match self {
            Trust::TokenServer { keys, validation } => token::verify(bytes, keys, validation, now)
                .map(|v| v.claims)
                .map_err(token_reject),
            Trust::Sidecar { pinned, leeway } => {
                let claims = token::decode_unverified(bytes).map_err(token_reject)?;
                let Some(key) = pinned.get(&claims.server) else {
                    return Err(Reject::new(
                        RejectCode::NotPinned,
                        format!(
                            "peer {:?} is not listed with a pinned key in this daemon's config",
                            claims.server
                        ),
                    ));
                };
                let keys = KeySet::new([*key]);
                let validation = Validation {
                    kind: TokenKind::Machine,
                    issuer: Some(claims.server.clone()),
                    leeway: *leeway,
                };
                token::verify(bytes, &keys, &validation, now)
                    .map(|v| v.claims)
                    .map_err(|e| match e {
                        TokenError::UnknownKey(_) => Reject::new(
                            RejectCode::NotPinned,
                            format!(
                                "machine token of {:?} is signed by a key other than the one pinned for it",
                                claims.server
                            ),
                        ),
                        other => token_reject(other),
                    })
            }
        }
    }
}

/// Maps a token verification error to a wire rejection.
pub fn token_reject(error: TokenError) -> Reject {
    let code = match &error {
        TokenError::UnknownKey(_) => RejectCode::UnknownSigningKey,
        TokenError::Expired { .. } | TokenError::NotYetValid { .. } => RejectCode::Expired,
        _ => RejectCode::InvalidToken,
    };
    Reject::new(code, error.to_string())
}

/// One daemon's name, identity key and token for a handshake.
#[derive(Clone)]
pub struct LocalIdentity {
    /// This daemon's resource server name.
    pub name: String,
    /// The identity key that this daemon's token and TLS certificate name.
    pub key: SigningKey,
    /// This daemon's current token, encoded.
    pub token: Vec<u8>,
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Facts about the QUIC connection that the driver supplies.
#[derive(Clone, Debug)]
pub struct ConnectionContext {
    /// TLS exporter output for [`EXPORTER_LABEL`], [`EXPORTER_LEN`] bytes.
    pub exporter: [u8; EXPORTER_LEN],
    /// Ed25519 key in the peer's TLS certificate.
    pub peer_tls_key: VerifyingKey,
}

/// The verified peer at the end of a handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Established {
    /// Negotiated protocol version.
    pub version: u8,
    /// The peer's verified token claims.
    pub peer: Claims,
}

/// A handshake failure: the rejection to send to the peer and to log.
pub type HandshakeError = Reject;

fn malformed(error: impl fmt::Display) -> Reject {
    Reject::new(RejectCode::Malformed, format!("handshake frame: {error}"))
}

fn decode_frame(body: &[u8]) -> Result<HandshakeFrame, Reject> {
    match wire::decode_body::<HandshakeFrame>(body).map_err(malformed)? {
        HandshakeFrame::Reject(reject) => Err(Reject::new(
            reject.code,
            format!("peer rejected the handshake: {}", reject.reason),
        )),
        frame => Ok(frame),
    }
}

fn transcript_hello(exporter: &[u8], hello: &ClientHello, core: &ServerHelloCore) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(TRANSCRIPT_CONTEXT);
    hash.update(exporter);
    for part in [
        postcard::to_stdvec(hello).unwrap_or_default(),
        postcard::to_stdvec(core).unwrap_or_default(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(&part);
    }
    hash.finalize().into()
}

fn transcript_finish(hello_hash: &[u8; 32], server: &ServerHello) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(hello_hash);
    hash.update((server.signature.len() as u64).to_be_bytes());
    hash.update(&server.signature);
    hash.update(server.confirm);
    hash.finalize().into()
}

struct ConfirmationKeys {
    server: [u8; 32],
    client: [u8; 32],
}

fn confirmation_keys(
    exporter: &[u8],
    secret: &StaticSecret,
    peer_ephemeral: &[u8; 32],
    hello_hash: &[u8; 32],
) -> Result<ConfirmationKeys, Reject> {
    let shared = secret.diffie_hellman(&X25519Public::from(*peer_ephemeral));
    if !shared.was_contributory() {
        return Err(Reject::new(
            RejectCode::BadProof,
            "ephemeral X25519 key is a low-order point",
        ));
    }
    let hkdf = hkdf::Hkdf::<Sha256>::new(Some(exporter), shared.as_bytes());
    let mut okm = [0u8; 64];
    let mut info = KEY_CONTEXT.to_vec();
    info.extend_from_slice(hello_hash);
    // 64 bytes is far below HKDF-SHA256's limit of 8160 bytes.
    hkdf.expand(&info, &mut okm)
        .map_err(|_| Reject::new(RejectCode::Internal, "HKDF expand failed"))?;
    let mut keys = ConfirmationKeys {
        server: [0; 32],
        client: [0; 32],
    };
    keys.server.copy_from_slice(&okm[..32]);
    keys.client.copy_from_slice(&okm[32..]);
    Ok(keys)
}

fn mac(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac =
        <HmacSha256 as hmac::Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn check_mac(key: &[u8; 32], data: &[u8], tag: &[u8; 32]) -> Result<(), Reject> {
    let mut mac =
        <HmacSha256 as hmac::Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.verify_slice(tag)
        .map_err(|_| Reject::new(RejectCode::BadProof, "key confirmation failed"))
}

fn sign(key: &SigningKey, context: &[u8], hash: &[u8; 32]) -> Vec<u8> {
    let mut message = context.to_vec();
    message.extend_from_slice(hash);
    key.sign(&message).to_bytes().to_vec()
}

fn check_signature(
    key: &[u8; 32],
    context: &[u8],
    hash: &[u8; 32],
    signature: &[u8],
) -> Result<(), Reject> {
    let bad = || Reject::new(RejectCode::BadProof, "transcript signature is invalid");
    let key = VerifyingKey::from_bytes(key).map_err(|_| bad())?;
    let signature = Signature::from_slice(signature).map_err(|_| bad())?;
    let mut message = context.to_vec();
    message.extend_from_slice(hash);
    key.verify_strict(&message, &signature).map_err(|_| bad())
}

fn check_mode(local: Mode, peer: Mode) -> Result<(), Reject> {
    if local == peer {
        return Ok(());
    }
    Err(Reject::new(
        RejectCode::ModeMismatch,
        format!(
            "peer runs in {} mode but this daemon runs in {} mode; configure both daemons with the same mode",
            peer.as_str(),
            local.as_str()
        ),
    ))
}

fn check_key_binding(claims: &Claims, context: &ConnectionContext) -> Result<(), Reject> {
    if claims.server_key == context.peer_tls_key.to_bytes() {
        return Ok(());
    }
    Err(Reject::new(
        RejectCode::KeyMismatch,
        format!(
            "token of {:?} names a different key than the peer's TLS certificate; the token may be copied from another daemon",
            claims.server
        ),
    ))
}

/// The connecting side, before the server's hello.
pub struct Initiator {
    local: LocalIdentity,
    trust: Trust,
    context: ConnectionContext,
    expected_peer: String,
    secret: StaticSecret,
    hello: ClientHello,
}

impl Initiator {
    /// Starts a handshake towards `expected_peer`. `ephemeral_seed` must be
    /// fresh random bytes; it becomes the X25519 ephemeral secret.
    ///
    /// Returns the state and the ClientHello frame to send.
    pub fn start(
        local: LocalIdentity,
        trust: Trust,
        context: ConnectionContext,
        expected_peer: impl Into<String>,
        ephemeral_seed: [u8; 32],
    ) -> (Self, Vec<u8>) {
        let secret = StaticSecret::from(ephemeral_seed);
        let hello = ClientHello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            mode: trust.mode(),
            token: local.token.clone(),
            ephemeral: X25519Public::from(&secret).to_bytes(),
        };
        let frame = wire::encode(&HandshakeFrame::ClientHello(hello.clone()));
        let state = Initiator {
            local,
            trust,
            context,
            expected_peer: expected_peer.into(),
            secret,
            hello,
        };
        (state, frame)
    }

    /// Handles the server's hello at `now`: verifies the server and returns
    /// the ClientFinish frame to send.
    pub fn handle_server_hello(
        self,
        body: &[u8],
        now: u64,
    ) -> Result<(InitiatorAwaitingDone, Vec<u8>), Reject> {
        // 1. Decode; a Reject from the server ends the handshake here.
        let HandshakeFrame::ServerHello(server) = decode_frame(body)? else {
            return Err(malformed("expected ServerHello"));
        };

        // 2. Version and mode: the version must be one this side offered.
        if !self.hello.versions.contains(&server.core.version) {
            return Err(Reject::new(
                RejectCode::VersionMismatch,
                format!(
                    "server chose version {} which was not offered",
                    server.core.version
                ),
            ));
        }
        check_mode(self.trust.mode(), server.core.mode)?;

        // 3. The server's token, its name and its key binding.
        let claims = self.trust.verify_token(&server.core.token, now)?;
        if claims.server != self.expected_peer {
            return Err(Reject::new(
                RejectCode::WrongPeer,
                format!(
                    "dialed {:?} but the peer's token is for {:?}; check the peer's address in the config",
                    self.expected_peer, claims.server
                ),
            ));
        }
        check_key_binding(&claims, &self.context)?;

        // 4. Proof of possession and key confirmation over the transcript.
        let hello_hash = transcript_hello(&self.context.exporter, &self.hello, &server.core);
        check_signature(
            &claims.server_key,
            SERVER_SIGNATURE_CONTEXT,
            &hello_hash,
            &server.signature,
        )?;
        let keys = confirmation_keys(
            &self.context.exporter,
            &self.secret,
            &server.core.ephemeral,
            &hello_hash,
        )?;
        check_mac(&keys.server, &hello_hash, &server.confirm)?;

        // 5. This side's proof.
        let finish_hash = transcript_finish(&hello_hash, &server);
        let finish = ClientFinish {
            signature: sign(&self.local.key, CLIENT_SIGNATURE_CONTEXT, &finish_hash),
            confirm: mac(&keys.client, &finish_hash),
        };
        let frame = wire::encode(&HandshakeFrame::ClientFinish(finish));
        let established = Established {
            version: server.core.version,
            peer: claims,
        };
        Ok((InitiatorAwaitingDone { established }, frame))
    }
}

/// The connecting side after its proof, waiting for the server's verdict.
#[derive(Debug)]
pub struct InitiatorAwaitingDone {
    established: Established,
}

impl InitiatorAwaitingDone {
    /// Handles the server's last frame: `Done` completes the handshake.
    pub fn handle_done(self, body: &[u8]) -> Result<Established, Reject> {
        match decode_frame(body)? {
            HandshakeFrame::Done => Ok(self.established),
            _ => Err(malformed("expected Done")),
        }
    }
}

/// The accepting side, before the client's hello.
pub struct Responder {
    local: LocalIdentity,
    trust: Trust,
    context: ConnectionContext,
    secret: StaticSecret,
}

impl Responder {
    /// Prepares to accept a handshake. `ephemeral_seed` must be fresh random bytes.
    pub fn new(
        local: LocalIdentity,
        trust: Trust,
        context: ConnectionContext,
        ephemeral_seed: [u8; 32],
    ) -> Self {
        Responder {
            local,
            trust,
            context,
            secret: StaticSecret::from(ephemeral_seed),
        }
    }

    /// Handles the client's hello at `now`: verifies the client's token and
    /// returns the ServerHello frame to send.
    pub fn handle_client_hello(
        self,
        body: &[u8],
        now: u64,
    ) -> Result<(ResponderAwaitingFinish, Vec<u8>), Reject> {
        // 1. Decode.
        let HandshakeFrame::ClientHello(hello) = decode_frame(body)? else {
            return Err(malformed("expected ClientHello"));
        };

        // 2. Highest version both sides speak, then mode.
        let Some(version) = SUPPORTED_VERSIONS
            .iter()
            .copied()
            .find(|v| hello.versions.contains(v))
        else {
            return Err(Reject::new(
                RejectCode::VersionMismatch,
                format!(
                    "client offers versions {:?}, this daemon speaks {:?}",
                    hello.versions, SUPPORTED_VERSIONS
                ),
            ));
        };
        check_mode(self.trust.mode(), hello.mode)?;

        // 3. The client's token and its key binding.
        let claims = self.trust.verify_token(&hello.token, now)?;
        check_key_binding(&claims, &self.context)?;

        // 4. This side's proof.
        let core = ServerHelloCore {
            version,
            mode: self.trust.mode(),
            token: self.local.token.clone(),
            ephemeral: X25519Public::from(&self.secret).to_bytes(),
        };
        let hello_hash = transcript_hello(&self.context.exporter, &hello, &core);
        let keys = confirmation_keys(
            &self.context.exporter,
            &self.secret,
            &hello.ephemeral,
            &hello_hash,
        )?;
        let server = ServerHello {
            core,
            signature: sign(&self.local.key, SERVER_SIGNATURE_CONTEXT, &hello_hash),
            confirm: mac(&keys.server, &hello_hash),
        };
        let finish_hash = transcript_finish(&hello_hash, &server);
        let frame = wire::encode(&HandshakeFrame::ServerHello(server));
        let state = ResponderAwaitingFinish {
            finish_hash,
            client_confirm_key: keys.client,
            established: Established {
                version,
                peer: claims,
            },
        };
        Ok((state, frame))
    }
}

/// The accepting side, waiting for the client's proof.
pub struct ResponderAwaitingFinish {
    finish_hash: [u8; 32],
    client_confirm_key: [u8; 32],
    established: Established,
}

impl ResponderAwaitingFinish {
    /// Handles the client's proof. On success the driver runs its own final
    /// checks (revocation, duplicate connections) and then sends
    /// [`done_frame`] or a rejection.
    pub fn handle_client_finish(self, body: &[u8]) -> Result<Established, Reject> {
        // 1. Decode.
        let HandshakeFrame::ClientFinish(finish) = decode_frame(body)? else {
            return Err(malformed("expected ClientFinish"));
        };

        // 2. Proof of possession of the key the client's token names.
        check_signature(
            &self.established.peer.server_key,
            CLIENT_SIGNATURE_CONTEXT,
            &self.finish_hash,
            &finish.signature,
        )?;

        // 3. Key confirmation: the client derived the same X25519 secret.
        check_mac(&self.client_confirm_key, &self.finish_hash, &finish.confirm)?;

        Ok(self.established)
    }
}

/// Encodes the frame that reports a successful handshake to the client.
pub fn done_frame() -> Vec<u8> {
    wire::encode(&HandshakeFrame::Done)
}

/// Encodes the frame that reports a failed handshake and its reason to the peer.
pub fn reject_frame(reject: &Reject) -> Vec<u8> {
    wire::encode(&HandshakeFrame::Reject(reject.clone()))
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
