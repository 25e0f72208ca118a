//! TLS configuration for the QUIC endpoint.
//!
//! Daemons present self-signed certificates derived from their identity keys;
//! no certificate authority is involved. The verifiers here accept any
//! well-formed Ed25519 certificate and check the TLS 1.3 handshake signature
//! against it. Who the peer is, and whether its key is the one its token
//! names, is decided afterwards by the h8 handshake.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};

use crate::identity::{ed25519_key_of_certificate, IdentityKey};
use crate::wire::ALPN_V1;

/// The one crypto provider h8 uses for every TLS connection.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct PeerCertificateVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerCertificateVerifier {
    fn new() -> Self {
        PeerCertificateVerifier {
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check_certificate(
        certificate: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), TlsError> {
        if !intermediates.is_empty() {
            return Err(TlsError::General(
                "h8 peers present exactly one self-signed certificate".to_owned(),
            ));
        }
        if ed25519_key_of_certificate(certificate).is_none() {
            return Err(TlsError::General(
                "peer certificate does not carry an Ed25519 key".to_owned(),
            ));
        }
        Ok(())
    }

    fn check_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        if signature.scheme != SignatureScheme::ED25519 {
            return Err(TlsError::PeerIncompatible(
                rustls::PeerIncompatible::NoSignatureSchemesInCommon,
            ));
        }
        verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }
}

impl ServerCertVerifier for PeerCertificateVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Self::check_certificate(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerCertificateVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        Self::check_certificate(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Builds the QUIC client and server TLS configs for an identity.
pub fn quic_crypto(
    identity: &IdentityKey,
    name: &str,
) -> Result<(QuicClientConfig, QuicServerConfig), Box<dyn std::error::Error + Send + Sync>> {
    let (certificate, key): (CertificateDer<'static>, PrivateKeyDer<'static>) =
        identity.self_signed_certificate(name)?;
    let verifier = Arc::new(PeerCertificateVerifier::new());

    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(vec![certificate.clone()], key.clone_key())?;
    client.alpn_protocols = vec![ALPN_V1.to_vec()];

    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![certificate], key)?;
    server.alpn_protocols = vec![ALPN_V1.to_vec()];
    server.max_early_data_size = 0;

    Ok((
        QuicClientConfig::try_from(client)?,
        QuicServerConfig::try_from(server)?,
    ))
}

/// Extracts the Ed25519 key of the peer's TLS certificate on a connection.
pub fn peer_tls_key(connection: &quinn::Connection) -> Option<ed25519_dalek::VerifyingKey> {
    let identity = connection.peer_identity()?;
    let certificates = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    ed25519_key_of_certificate(certificates.first()?)
}
