//! Start-up, signals, reload and shutdown of `h8d`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use super::{sidecar, Daemon};
use crate::config::{DaemonConfig, ModeConfig};
use crate::identity::IdentityKey;

/// File name of the identity key inside the state directory.
pub const IDENTITY_FILE: &str = "identity.pem";

/// Options of `h8d` that are not in the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Config file.
    pub config: PathBuf,
    /// One-time enrollment code given on the command line or in the environment.
    pub enrollment_code: Option<String>,
}

/// Creates the state directory (0700) if needed and loads or creates the identity key.
pub fn prepare_state(config: &DaemonConfig) -> anyhow::Result<IdentityKey> {
    let dir = &config.state_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))?;
    }
    let path = dir.join(IDENTITY_FILE);
    let (key, created) = IdentityKey::load_or_create(&path)?;
    if created {
        info!(path = %path.display(), public_key = %crate::identity::public_key_text(&key.public()), "created identity key");
    }
    Ok(key)
}

/// Loads and validates the config, plus the side-car policy it names.
pub fn check_config(path: &Path) -> anyhow::Result<DaemonConfig> {
    let config = DaemonConfig::load(path)?;
    sidecar::load_policy(&config)?;
    Ok(config)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = check_config(&options.config)?;
    let identity = prepare_state(&config)?;
    let grace = Duration::from_secs(config.shutdown_grace_secs);

    // Install signal handlers before anything can be ready.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;

    let daemon = Daemon::start(config.clone(), identity)?;
    info!(name = %config.name, listen = %daemon.local_addr()?, mode = if config.is_sidecar() { "side-car" } else { "token-server" }, "h8d started");

    match &config.mode {
        ModeConfig::Sidecar(_) => {
            let rules = sidecar::load_policy(&config)?.unwrap_or_default();
            sidecar::install(&daemon, rules);
            tokio::spawn(sidecar::rotate(daemon.clone()));
        }
        ModeConfig::TokenServer(_) => {
            super::session::start(&daemon, options.enrollment_code.clone()).await?;
        }
    }

    // READY=1 only after the QUIC endpoint, the local API socket and the
    // forward listeners are bound and the session state is known.
    let api = crate::local_api::start(daemon.clone()).await?;
    crate::systemd::ready(&daemon.session_state().status_text());

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                info!("SIGHUP received, reloading the configuration");
                crate::systemd::reloading();
                // A failed reload is logged by `reload` itself.
                let _ = reload(&daemon).await;
                crate::systemd::reloaded(&daemon.session_state().status_text());
            }
        }
    }

    info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new streams, waiting for open streams"
    );
    crate::systemd::stopping("stopping: waiting for open streams");
    daemon.begin_shutdown();
    drop(api);
    let deadline = tokio::time::Instant::now() + grace;
    while daemon
        .shared
        .metrics
        .streams_active
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let remaining = daemon
        .shared
        .metrics
        .streams_active
        .load(std::sync::atomic::Ordering::Relaxed);
    if remaining > 0 {
        warn!(
            streams = remaining,
            "grace period over; closing open streams"
        );
    }
    daemon.close("daemon shutting down").await;
    info!("h8d stopped");
    Ok(())
}

/// Re-reads the config (and side-car policy); applies it only if valid.
/// A rejected reload is logged once here, and the running configuration stays.
pub async fn reload(daemon: &Daemon) -> anyhow::Result<()> {
    let result = apply_reload(daemon);
    if let Err(e) = &result {
        error!(error = %format!("{e:#}"), "configuration reload rejected; keeping the running configuration");
    }
    result
}

fn apply_reload(daemon: &Daemon) -> anyhow::Result<()> {
    let path = daemon.config().path.clone();
    let config = check_config(&path)?;
    let old = daemon.config();
    if config.name != old.name || config.listen != old.listen || config.state_dir != old.state_dir {
        anyhow::bail!(
            "name, listen and state_dir cannot change on reload; restart the daemon instead"
        );
    }
    if config.is_sidecar() != old.is_sidecar() {
        anyhow::bail!("the mode cannot change on reload; restart the daemon instead");
    }
    let rules = sidecar::load_policy(&config)?;
    daemon.apply_config(config);
    if let Some(rules) = rules {
        sidecar::install(daemon, rules);
    }
    info!(
        peers = daemon.config().peers.len(),
        services = daemon.config().services.len(),
        "configuration reloaded"
    );
    Ok(())
}
