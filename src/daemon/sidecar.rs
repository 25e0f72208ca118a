//! Side-car mode: machine tokens signed by this daemon and a local policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::credentials::{machine_token, sidecar_trust, Credentials};
use super::{unix_now, Daemon, SessionState};
use crate::authorize::StreamAuthority;
use crate::config::{DaemonConfig, ModeConfig};
use crate::policy::{parse_local_rules, RuleSet};
use crate::source::SourceError;

/// Loads the local policy of a side-car config.
pub fn load_policy(config: &DaemonConfig) -> Result<Option<RuleSet>, SourceError> {
    let ModeConfig::Sidecar(sidecar) = &config.mode else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&sidecar.policy).map_err(|e| SourceError {
        file: sidecar.policy.clone(),
        line: 1,
        column: 1,
        message: format!("cannot read the local policy: {e}"),
    })?;
    parse_local_rules(&sidecar.policy, &text, &config.name).map(Some)
}

fn pinned_keys(config: &DaemonConfig) -> HashMap<String, ed25519_dalek::VerifyingKey> {
    config
        .peers
        .values()
        .filter_map(|peer| peer.public_key.map(|key| (peer.name.clone(), key)))
        .collect()
}

/// Signs a fresh machine token and installs it with the current policy.
pub fn install(daemon: &Daemon, rules: RuleSet) {
    let config = daemon.config();
    let ModeConfig::Sidecar(sidecar) = &config.mode else {
        return;
    };
    let (token, claims) = machine_token(
        &daemon.shared.identity,
        &config.name,
        unix_now(),
        sidecar.machine_token_lifetime_secs,
    );
    daemon.shared.credentials.set(Credentials {
        token,
        claims,
        trust: sidecar_trust(pinned_keys(&config), sidecar.leeway_secs),
        authority: StreamAuthority::LocalPolicy(Arc::new(rules)),
    });
    daemon.close_unpinned(&pinned_keys(&config));
    daemon.set_session_state(SessionState::Active);
}

/// Rotates the machine token at two thirds of its lifetime, so the old
/// token stays valid for the last third while peers receive the new one.
pub async fn rotate(daemon: Daemon) {
    loop {
        let config = daemon.config();
        let ModeConfig::Sidecar(sidecar) = &config.mode else {
            return;
        };
        let period = Duration::from_millis(sidecar.machine_token_lifetime_secs * 1000 * 2 / 3);
        let mut shutdown = daemon.shared.shutting_down.subscribe();
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = shutdown.wait_for(|down| *down) => return,
        }
        let Some(current) = daemon.shared.credentials.current() else {
            continue;
        };
        let rules = match &current.authority {
            StreamAuthority::LocalPolicy(rules) => (**rules).clone(),
            StreamAuthority::TokenScope => {
                warn!("side-car rotator found token-server credentials; stopping");
                return;
            }
        };
        install(&daemon, rules);
        info!(
            lifetime_secs = sidecar.machine_token_lifetime_secs,
            "machine token rotated"
        );
        daemon.push_token_update().await;
    }
}
