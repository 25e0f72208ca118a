//! The token server's data directory: key files, TLS material and database.
//!
//! Layout, all created by `h8-tokend init` with mode 0700 for the directory
//! and 0600 for secrets:
//!
//! - `signing-key.pem`: current token-signing key (PKCS#8 PEM);
//! - `signing-key.pem.new`: a key being rotated in, present only briefly;
//! - `tls-key.pem`, `tls-cert.pem`: key and self-signed certificate of the
//!   HTTPS API;
//! - `h8-tokend.db`: the SQLite database.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::store::{SigningKeyRecord, SqliteStore, Store};
use crate::identity::{certificate_fingerprint, public_key_text, IdentityKey};
use crate::token::KeyId;

/// Metadata name under which `init` stores the issuer.
pub const ISSUER_META: &str = "issuer";

/// What `init` created, for printing.
#[derive(Clone, Debug)]
pub struct InitReport {
    /// Issuer stored in the database.
    pub issuer: String,
    /// TLS certificate pin, `sha256:<hex>`.
    pub tls_pin: String,
    /// Id of the token-signing key.
    pub key_id: KeyId,
    /// Public half of the token-signing key, standard base64.
    pub public_key: String,
}

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Names a data directory; nothing is read until a method needs it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the current token-signing key.
    pub fn signing_key_path(&self) -> PathBuf {
        self.root.join("signing-key.pem")
    }

    /// Path of a signing key during rotation.
    pub fn pending_signing_key_path(&self) -> PathBuf {
        self.root.join("signing-key.pem.new")
    }

    /// Path of the TLS private key.
    pub fn tls_key_path(&self) -> PathBuf {
        self.root.join("tls-key.pem")
    }

    /// Path of the TLS certificate.
    pub fn tls_cert_path(&self) -> PathBuf {
        self.root.join("tls-cert.pem")
    }

    /// Path of the SQLite database.
    pub fn database_path(&self) -> PathBuf {
        self.root.join("h8-tokend.db")
    }

    /// Creates the data directory with fresh keys, certificate and
    /// database. Fails if the directory exists and is not empty.
    pub fn init(&self, issuer: &str, now: u64) -> anyhow::Result<InitReport> {
        if self.root.exists() {
            let mut entries = fs::read_dir(&self.root)
                .with_context(|| format!("cannot read {}", self.root.display()))?;
            if entries.next().is_some() {
                bail!(
                    "data directory {} already exists and is not empty; choose another \
                     --data-dir, or remove it first if you really mean to discard its keys",
                    self.root.display()
                );
            }
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot set mode 0700 on {}", self.root.display()))?;
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.root)
                .with_context(|| format!("cannot create {}", self.root.display()))?;
        }

        let signing_key = IdentityKey::generate();
        signing_key.save(&self.signing_key_path())?;

        let tls_key = IdentityKey::generate();
        tls_key.save(&self.tls_key_path())?;
        let (certificate, _) = tls_key
            .self_signed_certificate("localhost")
            .context("cannot build the TLS certificate")?;
        fs::write(self.tls_cert_path(), certificate_pem(&certificate))
            .with_context(|| format!("cannot write {}", self.tls_cert_path().display()))?;

        let mut store = SqliteStore::open(&self.database_path())?;
        store.set_meta(ISSUER_META, issuer)?;
        let key_id = KeyId::of(&signing_key.public());
        store.insert_signing_key(&SigningKeyRecord {
            key_id: key_id.to_string(),
            public_key: signing_key.public().to_bytes(),
            created_at: now,
            retired_at: None,
            last_token_expires_at: 0,
        })?;

        Ok(InitReport {
            issuer: issuer.to_owned(),
            tls_pin: certificate_fingerprint(&certificate),
            key_id,
            public_key: public_key_text(&signing_key.public()),
        })
    }

    /// Loads the TLS certificate and key. Returns them with the pin.
    pub fn load_tls(
        &self,
    ) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>, String)> {
        let key = IdentityKey::load(&self.tls_key_path())?;
        let path = self.tls_cert_path();
        let pem = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let certificate = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .with_context(|| format!("{} contains no PEM certificate", path.display()))?
            .with_context(|| format!("{} contains an invalid PEM certificate", path.display()))?;
        let pin = certificate_fingerprint(&certificate);
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der()));
        Ok((certificate, private, pin))
    }

    /// Loads the current signing key, first finishing a rotation that a
    /// crash interrupted. A pending key whose row the store holds as the
    /// current key was committed, so it replaces the old file; any other
    /// pending key belongs to a rotation that never committed and is deleted.
    pub fn load_signing_key(&self, store: &mut dyn Store) -> anyhow::Result<IdentityKey> {
        let pending = self.pending_signing_key_path();
        if pending.exists() {
            let key = IdentityKey::load(&pending)?;
            let id = KeyId::of(&key.public()).to_string();
            let committed = store
                .signing_keys()?
                .iter()
                .any(|k| k.key_id == id && k.retired_at.is_none());
            if committed {
                self.commit_pending_signing_key()?;
                tracing::warn!(key_id = %id, "finished a key rotation interrupted by a restart");
            } else {
                fs::remove_file(&pending)
                    .with_context(|| format!("cannot remove {}", pending.display()))?;
                tracing::warn!(key_id = %id, "discarded the key of a rotation that never committed");
            }
        }
        let key = IdentityKey::load(&self.signing_key_path())?;
        Ok(key)
    }

    /// Writes the next signing key to the pending path.
    pub fn write_pending_signing_key(&self, key: &IdentityKey) -> anyhow::Result<()> {
        let pending = self.pending_signing_key_path();
        // A leftover from a failed rotation has no committed row, so it is safe to drop.
        let _ = fs::remove_file(&pending);
        key.save(&pending)?;
        Ok(())
    }

    /// Makes the pending signing key the current one.
    pub fn commit_pending_signing_key(&self) -> anyhow::Result<()> {
        fs::rename(self.pending_signing_key_path(), self.signing_key_path()).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.pending_signing_key_path().display(),
                self.signing_key_path().display()
            )
        })
    }
}

/// Encodes a DER certificate as PEM.
pub fn certificate_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}
