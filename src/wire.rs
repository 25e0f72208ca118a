//! Frames exchanged between daemons: the connection handshake and the
//! per-stream open exchange.
//!
//! Sans-IO. A frame is a 4-byte big-endian length followed by that many
//! bytes of postcard. Every frame is bounded by [`MAX_FRAME_LEN`]; a decoder
//! rejects a larger length before it buffers the body.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// ALPN protocol identifier for version 1 of the daemon-to-daemon protocol.
pub const ALPN_V1: &[u8] = b"h8/1";
/// Handshake versions this build speaks, highest first.
pub const SUPPORTED_VERSIONS: &[u8] = &[1];
/// Maximum size of a frame body in bytes.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Maximum length in bytes of a reason string in a rejection.
pub const MAX_REASON_LEN: usize = 512;

/// Trust model that vouches for the sender's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Client tokens signed by a token server.
    TokenServer,
    /// Machine tokens signed by each daemon, checked against pinned keys.
    Sidecar,
}

impl Mode {
    /// The mode's name as used in configs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::TokenServer => "token-server",
            Mode::Sidecar => "side-car",
        }
    }
}

/// First handshake message, from the connecting daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u8>,
    /// Client's mode.
    pub mode: Mode,
    /// Client's token, encoded.
    pub token: Vec<u8>,
    /// Client's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
}

/// The part of [`ServerHello`] that the server's signature covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHelloCore {
    /// Chosen protocol version.
    pub version: u8,
    /// Server's mode.
    pub mode: Mode,
    /// Server's token, encoded.
    pub token: Vec<u8>,
    /// Server's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
}

/// Second handshake message, from the accepting daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// Signed content.
    pub core: ServerHelloCore,
    /// Ed25519 signature over the transcript by the key the token names.
    pub signature: Vec<u8>,
    /// HMAC over the transcript with the key derived from the X25519 secret.
    pub confirm: [u8; 32],
}

/// Third handshake message, from the connecting daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFinish {
    /// Ed25519 signature over the transcript by the key the token names.
    pub signature: Vec<u8>,
    /// HMAC over the transcript with the key derived from the X25519 secret.
    pub confirm: [u8; 32],
}

/// Reason code of a rejected handshake or stream, as sent on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectCode {
    /// A frame could not be decoded or broke a limit.
    Malformed,
    /// No protocol version in common.
    VersionMismatch,
    /// One side uses a token server, the other side-car mode.
    ModeMismatch,
    /// The token failed verification (signature, structure, issuer).
    InvalidToken,
    /// The token is signed by a key this daemon does not trust.
    UnknownSigningKey,
    /// The token is expired or not yet valid.
    Expired,
    /// The token's session or resource server was revoked.
    Revoked,
    /// The token names another key than the one the peer proved it holds.
    KeyMismatch,
    /// A transcript signature or key confirmation failed.
    BadProof,
    /// The peer is not the resource server that was dialed.
    WrongPeer,
    /// In side-car mode, the peer's key is not pinned.
    NotPinned,
    /// The token grants no access to this service.
    OutOfScope,
    /// The local policy denies the stream.
    PolicyDenied,
    /// No such service on this daemon.
    UnknownService,
    /// The service exists but cannot take the stream now.
    ServiceUnavailable,
    /// Too many streams or handshakes in flight.
    Busy,
    /// The daemon is shutting down.
    ShuttingDown,
    /// Another connection between the same two daemons was kept.
    DuplicateConnection,
    /// The external authorizer could not be asked and the fallback denies.
    AuthorizerUnavailable,
    /// An internal error; the log holds details.
    Internal,
}

impl RejectCode {
    /// A short stable name for logs, metrics and HTTP bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::VersionMismatch => "version_mismatch",
            RejectCode::ModeMismatch => "mode_mismatch",
            RejectCode::InvalidToken => "invalid_token",
            RejectCode::UnknownSigningKey => "unknown_signing_key",
            RejectCode::Expired => "expired",
            RejectCode::Revoked => "revoked",
            RejectCode::KeyMismatch => "key_mismatch",
            RejectCode::BadProof => "bad_proof",
            RejectCode::WrongPeer => "wrong_peer",
            RejectCode::NotPinned => "not_pinned",
            RejectCode::OutOfScope => "out_of_scope",
            RejectCode::PolicyDenied => "policy_denied",
            RejectCode::UnknownService => "unknown_service",
            RejectCode::ServiceUnavailable => "service_unavailable",
            RejectCode::Busy => "busy",
            RejectCode::ShuttingDown => "shutting_down",
            RejectCode::DuplicateConnection => "duplicate_connection",
            RejectCode::AuthorizerUnavailable => "authorizer_unavailable",
            RejectCode::Internal => "internal",
        }
    }

    /// QUIC application error code used when closing a connection for this reason.
    pub fn close_code(self) -> u32 {
        0x100 + self as u32
    }
}

/// A rejection with its code and a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{} ({reason})", code.as_str())]
pub struct Reject {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// Human-readable reason, at most [`MAX_REASON_LEN`] bytes.
    pub reason: String,
}

impl Reject {
    /// Builds a rejection, truncating the reason to [`MAX_REASON_LEN`].
    pub fn new(code: RejectCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Reject { code, reason }
    }
}

/// Frames on a connection's handshake stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandshakeFrame {
    /// Client's opening message.
    ClientHello(ClientHello),
    /// Server's reply.
    ServerHello(ServerHello),
    /// Client's proof.
    ClientFinish(ClientFinish),
    /// Server accepted the client; streams may be opened.
    Done,
    /// Either side rejects the handshake.
    Reject(Reject),
}

/// First frame on every data stream, from the opener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Service to open on the accepting daemon.
    pub service: String,
}

/// A newer token for the sender, verified like the one in the handshake.
/// Sent when a daemon's token is refreshed or rotated, so connections
/// outlive the tokens they started with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUpdate {
    /// The new token, encoded.
    pub token: Vec<u8>,
}

/// First frame on every stream after the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamHeader {
    /// Open a service.
    Open(StreamOpen),
    /// Replace the sender's token on this connection.
    TokenUpdate(TokenUpdate),
}

/// The acceptor's reply to a [`StreamHeader`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamReply {
    /// The stream is authorized; raw bytes follow in both directions.
    Accept,
    /// The stream is refused.
    Reject(Reject),
}

/// Errors decoding frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The body is not a valid message of the expected type.
    #[error("invalid frame body: {0}")]
    Invalid(String),
    /// The stream ended inside a frame.
    #[error("stream ended after {buffered} bytes of an incomplete frame")]
    Truncated {
        /// Bytes buffered when the stream ended.
        buffered: usize,
    },
}

/// Encodes `message` as one frame: 4-byte big-endian length, then postcard.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut frame = vec![0; 4];
    // Serializing the plain data types of this module into a Vec cannot fail.
    let body = postcard::to_extend(message, Vec::new()).unwrap_or_default();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decodes one frame body (without its length prefix). Trailing bytes are an error.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Invalid(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(message)
}

/// Reads the length prefix of a frame, checking it against `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Splits frames out of a byte stream fed in pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// Creates a decoder that rejects frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buffer: Vec::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Returns the next complete frame body, `None` if more bytes are needed.
    pub fn next_body(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buffer.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_len(*prefix, self.max)?;
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buffer[4..4 + len].to_vec();
        self.buffer.drain(..4 + len);
        Ok(Some(body))
    }

    /// Returns and decodes the next complete frame.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_body()? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Takes the bytes after the last complete frame: data that followed the
    /// framed prefix of a stream.
    pub fn into_remainder(self) -> Vec<u8> {
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn frame_split_across_pushes_decodes() {
        let frame = encode(&StreamOpen {
            service: "orders".to_owned(),
        });
        let mut decoder = FrameDecoder::default();
        decoder.push(&frame[..3]);
        assert_eq!(decoder.next_message::<StreamOpen>(), Ok(None));
        decoder.push(&frame[3..]);
        decoder.push(b"payload");
        let open = decoder
            .next_message::<StreamOpen>()
            .expect("valid")
            .expect("complete");
        assert_eq!(open.service, "orders");
        assert_eq!(decoder.into_remainder(), b"payload");
    }

    #[test]
    fn oversized_length_is_rejected_before_body() {
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&101u32.to_be_bytes());
        assert_eq!(
            decoder.next_body(),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
    }

    #[test]
    fn trailing_bytes_in_body_are_rejected() {
        let mut body = postcard::to_stdvec(&StreamReply::Accept).expect("encode");
        body.push(0);
        assert!(matches!(
            decode_body::<StreamReply>(&body),
            Err(FrameError::Invalid(_))
        ));
    }

    #[test]
    fn reject_reason_is_truncated() {
        let reject = Reject::new(RejectCode::Internal, "é".repeat(600));
        assert!(reject.reason.len() <= MAX_REASON_LEN);
    }

    proptest! {
        #[test]
        fn handshake_frames_round_trip(token in proptest::collection::vec(any::<u8>(), 0..2000), eph in any::<[u8; 32]>()) {
            let frame = HandshakeFrame::ClientHello(ClientHello {
                versions: vec![1],
                mode: Mode::TokenServer,
                token,
                ephemeral: eph,
            });
            let mut decoder = FrameDecoder::default();
            decoder.push(&encode(&frame));
            prop_assert_eq!(decoder.next_message::<HandshakeFrame>().expect("valid"), Some(frame));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut decoder = FrameDecoder::default();
            decoder.push(&bytes);
            let _ = decoder.next_message::<HandshakeFrame>();
            let _ = decode_body::<StreamOpen>(&bytes);
            let _ = decode_body::<StreamHeader>(&bytes);
            let _ = decode_body::<StreamReply>(&bytes);
        }
    }
}
