//! Identity keys and the files that hold them.
//!
//! Every secret file h8 writes is created with mode 0600, and every secret
//! file it reads is rejected when its group or others may read it. Keys are
//! stored as PKCS#8 PEM, so `openssl pkey` can inspect them.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::OsRng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};

/// Errors reading or writing key and secret files.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file is readable by group or others.
    #[error("{path} has mode {mode:o}, readable by group or others; run `chmod 600 {path}` and start again")]
    InsecurePermissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file exists where a new one was to be created.
    #[error("{0} already exists; remove it first if you really mean to replace it")]
    AlreadyExists(String),
    /// The file does not hold a valid key.
    #[error("{path} does not contain a valid Ed25519 PKCS#8 PEM key: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// An I/O error on the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `path` with mode 0600 and writes `contents`; fails if it exists.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::AlreadyExists(path.display().to_string())
            } else {
                io_error(path)(e)
            }
        })?;
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Replaces `path` atomically with a new 0600 file holding `contents`.
pub fn replace_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyFileError> {
    let mut temporary = PathBuf::from(path);
    temporary.set_extension("tmp");
    let _ = fs::remove_file(&temporary);
    write_secret_file(&temporary, contents)?;
    fs::rename(&temporary, path).map_err(io_error(path))
}

/// Reads a secret file after checking that only its owner may read it.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::InsecurePermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    fs::read(path).map_err(io_error(path))
}

/// A daemon's or token server's Ed25519 identity key. Zeroized on drop and
/// printed redacted.
pub struct IdentityKey {
    key: SigningKey,
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey(public {})", public_key_text(&self.public()))
    }
}

impl IdentityKey {
    /// Generates a new random key.
    pub fn generate() -> Self {
        IdentityKey {
            key: SigningKey::generate(&mut OsRng),
        }
    }

    /// Wraps an existing signing key.
    pub fn from_signing_key(key: SigningKey) -> Self {
        IdentityKey { key }
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The public key.
    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Encodes the key as PKCS#8 DER.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        // Encoding a valid Ed25519 key to PKCS#8 has no failure case.
        self.key
            .to_pkcs8_der()
            .map(|doc| doc.as_bytes().to_vec())
            .unwrap_or_default()
    }

    /// Loads a key from a PEM file, rejecting insecure permissions.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_secret_file(path)?;
        let text = String::from_utf8(bytes).map_err(|_| KeyFileError::Invalid {
            path: path.display().to_string(),
            reason: "not UTF-8 text".to_owned(),
        })?;
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyFileError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(IdentityKey { key })
    }

    /// Writes the key to a new 0600 PEM file.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let pem = self
            .key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| KeyFileError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        write_secret_file(path, pem.as_bytes())
    }

    /// Loads the key at `path`, or creates and saves a new one if the file is missing.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyFileError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let key = Self::generate();
        key.save(path)?;
        Ok((key, true))
    }

    /// Builds a self-signed X.509 certificate for this key, valid for
    /// `subject` as a DNS name. TLS peers check the key inside, not the name.
    pub fn self_signed_certificate(
        &self,
        subject: &str,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), rcgen::Error> {
        let der = self.pkcs8_der();
        let pkcs8 = PrivatePkcs8KeyDer::from(der.clone());
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
        let mut params = rcgen::CertificateParams::new(vec![subject.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, subject);
        let certificate = params.self_signed(&key_pair)?;
        Ok((
            certificate.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
        ))
    }
}

/// Formats a public key as standard base64 of its 32 bytes, the form used in configs.
pub fn public_key_text(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Parses a public key in the form [`public_key_text`] prints.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| format!("public key {text:?} is not valid base64"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| format!("public key {text:?} is not 32 bytes"))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| format!("public key {text:?} is not a valid Ed25519 point"))
}

/// SHA-256 fingerprint of a DER certificate's public key bytes, as
/// `sha256:<hex>`: the token server's TLS pin.
pub fn certificate_fingerprint(certificate: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(certificate)))
}

/// Extracts the Ed25519 public key from a DER certificate, or `None` when
/// the certificate cannot be parsed or does not carry an Ed25519 key.
pub fn ed25519_key_of_certificate(certificate: &[u8]) -> Option<VerifyingKey> {
    use x509_cert::der::Decode as _;

    // id-Ed25519 from RFC 8410.
    const ED25519_OID: &str = "1.3.101.112";
    let certificate = x509_cert::Certificate::from_der(certificate).ok()?;
    let spki = certificate.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid.to_string() != ED25519_OID {
        return None;
    }
    let bytes: [u8; 32] = spki.subject_public_key.as_bytes()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_key_is_owner_only_and_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.pem");
        let key = IdentityKey::generate();
        key.save(&path).expect("save");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = IdentityKey::load(&path).expect("load");
        assert_eq!(loaded.public(), key.public());
        assert!(matches!(
            key.save(&path),
            Err(KeyFileError::AlreadyExists(_))
        ));
    }

    #[test]
    fn group_readable_key_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.pem");
        IdentityKey::generate().save(&path).expect("save");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = IdentityKey::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn certificate_carries_identity_key() {
        let key = IdentityKey::generate();
        let (certificate, _) = key
            .self_signed_certificate("server-a")
            .expect("certificate");
        assert_eq!(ed25519_key_of_certificate(&certificate), Some(key.public()));
    }

    #[test]
    fn public_key_text_round_trips() {
        let key = IdentityKey::generate().public();
        assert_eq!(parse_public_key(&public_key_text(&key)), Ok(key));
        assert!(parse_public_key("abc").is_err());
    }
}
