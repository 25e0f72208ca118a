//! Side-car mode: machine tokens signed by this daemon and a local policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Signs a fresh machine token and installs it with `rules`, at start and on
/// reload. Cached decisions of the external authorizer are dropped too, so
/// the next stream sees the reloaded configuration.
pub fn install(daemon: &Daemon, rules: RuleSet) {
    daemon.shared.authorizer.clear_cache();
    renew(daemon, rules);
}

/// Signs a fresh machine token and installs it with `rules`; closes the
/// connections of peers whose key is no longer pinned.
fn renew(daemon: &Daemon, rules: RuleSet) {
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

/// Time from `now` (since the Unix epoch) until a token that expires at
/// `expires_at` (Unix seconds) and lives `lifetime_secs` must be replaced:
/// when a third of its lifetime is left. Counting from the expiry, not from
/// the signing, keeps that third whole although `issued_at` is rounded down
/// to the second.
pub fn rotation_delay(expires_at: u64, lifetime_secs: u64, now: Duration) -> Duration {
    let rotate_at_ms = expires_at
        .saturating_mul(1000)
        .saturating_sub(lifetime_secs.saturating_mul(1000) / 3);
    let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rotate_at_ms.saturating_sub(now_ms))
}

/// Rotates the machine token when a third of its lifetime is left, so the
/// old token stays valid while peers receive the new one.
pub async fn rotate(daemon: Daemon) {
    loop {
        let config = daemon.config();
        let ModeConfig::Sidecar(sidecar) = &config.mode else {
            return;
        };
        let lifetime = sidecar.machine_token_lifetime_secs;
        let delay = match daemon.shared.credentials.current() {
            Some(current) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                rotation_delay(current.claims.expires_at, lifetime, now)
            }
            None => Duration::from_millis(lifetime * 1000 * 2 / 3),
        };
        let mut shutdown = daemon.shared.shutting_down.subscribe();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
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
        // A reload may have signed a newer token while this task slept.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if !rotation_delay(current.claims.expires_at, lifetime, now).is_zero() {
            continue;
        }
        renew(&daemon, rules);
        info!(lifetime_secs = lifetime, "machine token rotated");
        daemon.push_token_update().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_leaves_a_third_of_the_lifetime() {
        // Signed at 1000.9 s: issued_at 1000, expires_at 1003.
        let delay = rotation_delay(1003, 3, Duration::from_millis(1_000_900));
        assert_eq!(delay, Duration::from_millis(1_100));
        let delay = rotation_delay(1900, 900, Duration::from_secs(1000));
        assert_eq!(delay, Duration::from_secs(600));
    }

    #[test]
    fn rotation_is_due_once_the_time_has_passed() {
        assert_eq!(
            rotation_delay(1003, 3, Duration::from_secs(1002)),
            Duration::ZERO
        );
        assert_eq!(
            rotation_delay(1003, 3, Duration::from_secs(5000)),
            Duration::ZERO
        );
    }
}
