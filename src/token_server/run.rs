//! The `h8-tokend run` process: loads the data directory, binds the HTTPS
//! listener and the admin socket, and handles SIGHUP, SIGINT and SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::admin::{self, Reloader};
use super::config::{Config, DEFAULT_ISSUER};
use super::data_dir::{DataDir, ISSUER_META};
use super::http::{self, unix_now};
use super::service::{Service, ServiceError};
use super::store::{SigningKeyRecord, SqliteStore, Store};
use crate::policy::Policy;
use crate::source::SourceError;
use crate::token::{KeyId, TokenSigner};

/// How often expired rows are purged from the database.
const PURGE_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Contents of the `--ready-file`, written once both sockets are bound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Bound address of the HTTPS API, such as `127.0.0.1:41234`.
    pub listen: String,
    /// Path of the admin socket.
    pub admin_socket: PathBuf,
    /// TLS certificate pin, `sha256:<hex>`.
    pub tls_pin: String,
    /// Process id.
    pub pid: u32,
}

/// Reads and parses a policy file.
pub fn load_policy(path: &Path) -> Result<Policy, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|e| SourceError {
        file: path.to_owned(),
        line: 1,
        column: 1,
        message: format!("cannot read the policy file: {e}"),
    })?;
    Policy::parse(path, &text)
}

/// Reloads the policy from `path` into `service`. A file that fails to
/// parse leaves the old policy in force.
pub fn reload_policy(service: &Service, path: &Path) -> Result<usize, ServiceError> {
    let policy = load_policy(path).map_err(|error| {
        tracing::warn!(%error, "policy reload failed, the previous policy stays in force");
        ServiceError::bad_request(
            "invalid_policy",
            format!("policy not reloaded, the previous one stays in force: {error}"),
        )
    })?;
    let count = service.set_policy(policy, unix_now())?;
    tracing::info!(applications = count, path = %path.display(), "policy reloaded");
    Ok(count)
}

/// Rejects a data directory that group or others may enter: it holds the
/// database with sessions and enrollment-code hashes next to the keys.
fn check_private_directory(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;

    let mode = std::fs::metadata(root)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {mode:o}, open to group or others; run `chmod 700 {}` and start again",
            root.display(),
            root.display()
        );
    }
    Ok(())
}

/// Opens the data directory and builds the service.
pub fn open_service(config: &Config) -> anyhow::Result<Service> {
    let data_dir = DataDir::new(&config.data_dir);
    if !data_dir.database_path().exists() {
        bail!(
            "{} has no database; create the data directory with `h8-tokend init --data-dir {}`",
            data_dir.root().display(),
            data_dir.root().display()
        );
    }
    check_private_directory(data_dir.root())?;
    let database = data_dir.database_path();
    let mut store = SqliteStore::open(&database)?;
    let signing_key = data_dir.load_signing_key(&mut store)?;
    let key_id = KeyId::of(&signing_key.public()).to_string();
    match store.signing_keys()?.iter().find(|k| k.key_id == key_id) {
        Some(record) if record.retired_at.is_some() => bail!(
            "{} holds key {key_id}, which the database marks as retired; restore the current key file from a backup",
            data_dir.signing_key_path().display()
        ),
        Some(_) => {}
        None => {
            tracing::warn!(%key_id, "the signing key file contains a key missing from the database; publishing it as the current key");
            store.insert_signing_key(&SigningKeyRecord {
                key_id: key_id.clone(),
                public_key: signing_key.public().to_bytes(),
                created_at: unix_now(),
                retired_at: None,
                last_token_expires_at: 0,
            })?;
        }
    }

    let issuer = match &config.issuer {
        Some(issuer) => issuer.clone(),
        None => store
            .meta(ISSUER_META)?
            .unwrap_or_else(|| DEFAULT_ISSUER.to_owned()),
    };
    let policy = load_policy(&config.policy).map_err(|e| anyhow::anyhow!("{e}"))?;
    let service = Service::new(
        Box::new(store),
        policy,
        TokenSigner::new(signing_key.signing_key().clone()),
        issuer,
        config.lifetimes,
        Some(data_dir),
        unix_now(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .with_reader(Box::new(SqliteStore::open(&database)?));
    Ok(service)
}

fn tls_acceptor(data_dir: &DataDir) -> anyhow::Result<(TlsAcceptor, String)> {
    let (certificate, key, pin) = data_dir.load_tls()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot configure TLS")?
        .with_no_client_auth()
        .with_single_cert(vec![certificate], key)
        .context("the TLS key does not match the certificate")?;
    Ok((TlsAcceptor::from(Arc::new(config)), pin))
}

fn write_ready_file(path: &Path, info: &ReadyInfo) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let text = serde_json::to_string_pretty(info).context("cannot encode the ready file")?;
    std::fs::write(&temporary, text)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs the token server until SIGINT or SIGTERM.
pub async fn run(config: Config, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    let service = Arc::new(tokio::task::block_in_place(|| open_service(&config))?);
    let (acceptor, pin) = tls_acceptor(&DataDir::new(&config.data_dir))?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let listen = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let admin_listener = admin::bind_admin_socket(&config.admin_socket)?;

    let reload: Reloader = {
        let service = Arc::clone(&service);
        let path = config.policy.clone();
        Arc::new(move || reload_policy(&service, &path))
    };
    let (stop, stopped) = watch::channel(false);
    let public = tokio::spawn(http::serve_tls(
        listener,
        acceptor,
        http::router(Arc::clone(&service)),
        stopped.clone(),
    ));
    let admin_task = tokio::spawn(admin::serve_admin(
        admin_listener,
        admin::router(Arc::clone(&service), Arc::clone(&reload)),
        stopped.clone(),
    ));
    let purge = {
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(PURGE_INTERVAL);
            loop {
                interval.tick().await;
                let service = Arc::clone(&service);
                match http::blocking(move |now| service.purge_expired(now)).await {
                    Ok(0) => {}
                    Ok(rows) => tracing::debug!(rows, "purged expired rows"),
                    Err(error) => tracing::warn!(%error, "purging expired rows failed"),
                }
            }
        })
    };

    tracing::info!(
        %listen,
        admin_socket = %config.admin_socket.display(),
        tls_pin = %pin,
        issuer = %service.issuer(),
        "h8-tokend started"
    );
    if let Some(path) = &ready_file {
        write_ready_file(
            path,
            &ReadyInfo {
                listen: listen.to_string(),
                admin_socket: config.admin_socket.clone(),
                tls_pin: pin,
                pid: std::process::id(),
            },
        )?;
    }

    // The handlers are installed before READY=1, because systemd may send
    // SIGHUP as soon as it sees READY, and SIGHUP's default action ends the process.
    let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    crate::systemd::ready(&format!("serving on {listen}"));
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received, reloading the policy");
                crate::systemd::reloading();
                let reload = Arc::clone(&reload);
                // Failures are logged inside `reload_policy`.
                let _ = http::blocking(move |_| reload()).await;
                crate::systemd::reloaded(&format!("serving on {listen}"));
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }

    tracing::info!("h8-tokend stopping");
    crate::systemd::stopping("stopping");
    let _ = stop.send(true);
    purge.abort();
    let _ = public.await;
    let _ = admin_task.await;
    if let Err(error) = std::fs::remove_file(&config.admin_socket) {
        tracing::warn!(%error, path = %config.admin_socket.display(), "cannot remove the admin socket");
    }
    Ok(())
}
