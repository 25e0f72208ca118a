//! Token-server mode: enrollment, the session, client tokens and revocations.
//!
//! The daemon enrolls once, opens a session (source identifier), fetches
//! its client token and saves it in the state directory. Peers are served
//! from that token; the token server is not on the data path. A refresh
//! task renews the token at about two thirds of its lifetime, and a poller
//! follows the revocation list. While the token server is unreachable the
//! daemon is degraded: it keeps serving with the token it has.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand_core::{OsRng, RngCore as _};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::credentials::Credentials;
use super::{unix_now, Daemon, SessionState};
use crate::authorize::{RevocationSet, StreamAuthority};
use crate::config::{ModeConfig, TokenServerConfig};
use crate::handshake::Trust;
use crate::identity::{parse_public_key, public_key_text, read_secret_file, replace_secret_file};
use crate::token::{self, Claims, KeySet, TokenKind, Validation};
use crate::token_server::client::{ClientError, TokenServerClient};

/// File name of the saved session inside the state directory.
pub const SESSION_FILE: &str = "session.json";
/// Maximum wait between retries while the token server is unreachable.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Shortest wait between refreshes, so a short-lived token cannot cause a busy loop.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// What the daemon saves between restarts (mode 0600). The token is a
/// bearer of nothing without the identity key, but it is kept private anyway.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedSession {
    /// The name was enrolled with the token server.
    pub enrolled: bool,
    /// Source identifier of the current session.
    pub source_id: Option<String>,
    /// End of the session, seconds since the Unix epoch.
    pub session_expires_at: u64,
    /// Current client token, text form.
    pub token: Option<String>,
    /// Token issuer name.
    pub issuer: Option<String>,
    /// Published signing keys, standard base64.
    pub signing_keys: Vec<String>,
    /// Last revocation epoch seen.
    pub revocation_epoch: u64,
    /// Revoked source identifiers at that epoch.
    #[serde(default)]
    pub revoked_sources: Vec<String>,
    /// Revoked resource servers at that epoch.
    #[serde(default)]
    pub revoked_servers: Vec<String>,
    /// Revoked token ids at that epoch.
    #[serde(default)]
    pub revoked_tokens: Vec<String>,
}

impl SavedSession {
    /// Loads the saved session, or a default one when there is none.
    pub fn load(state_dir: &Path) -> anyhow::Result<SavedSession> {
        let path = state_dir.join(SESSION_FILE);
        if !path.exists() {
            return Ok(SavedSession::default());
        }
        let bytes = read_secret_file(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid saved session ({e}); remove it and enroll again",
                path.display()
            )
        })
    }

    fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        replace_secret_file(&state_dir.join(SESSION_FILE), &bytes)?;
        Ok(())
    }

    fn key_set(&self) -> KeySet {
        KeySet::new(
            self.signing_keys
                .iter()
                .filter_map(|k| parse_public_key(k).ok()),
        )
    }

    fn revocations(&self) -> RevocationSet {
        RevocationSet {
            epoch: self.revocation_epoch,
            sources: self.revoked_sources.iter().cloned().collect(),
            servers: self.revoked_servers.iter().cloned().collect(),
            tokens: self.revoked_tokens.iter().cloned().collect(),
        }
    }
}

/// Session task state.
struct Session {
    daemon: Daemon,
    config: TokenServerConfig,
    state_dir: PathBuf,
    client: TokenServerClient,
    saved: SavedSession,
}

fn token_config(daemon: &Daemon) -> anyhow::Result<TokenServerConfig> {
    match &daemon.config().mode {
        ModeConfig::TokenServer(config) => Ok(config.clone()),
        ModeConfig::Sidecar(_) => anyhow::bail!("the session task runs only in token-server mode"),
    }
}

fn read_code_file(path: &Path) -> anyhow::Result<String> {
    let bytes = read_secret_file(path)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}

/// Installs saved credentials, then tries the token server once, then
/// starts the refresh and revocation tasks. Fails only when the daemon can
/// never work: not enrolled and no way to enroll.
pub async fn start(daemon: &Daemon, enrollment_code: Option<String>) -> anyhow::Result<()> {
    let config = token_config(daemon)?;
    let state_dir = daemon.config().state_dir.clone();
    let client = TokenServerClient::new(&config.url, &config.tls_pin)?;
    let saved = SavedSession::load(&state_dir)?;
    let mut session = Session {
        daemon: daemon.clone(),
        config,
        state_dir,
        client,
        saved,
    };

    // 1. A saved, still valid token lets the daemon serve peers at once.
    daemon
        .shared
        .credentials
        .set_revocations(session.saved.revocations());
    let restored = session.install_saved();
    if restored {
        info!("restored the saved client token");
    }

    // 2. Enroll on first start.
    if !session.saved.enrolled {
        let code = match (enrollment_code, &session.config.enrollment_code_file) {
            (Some(code), _) => code,
            (None, Some(path)) => read_code_file(path)?,
            (None, None) => anyhow::bail!(
                "this daemon is not enrolled yet: run `h8 admin enroll {}` on the token server host and pass the code with --enrollment-code, H8_ENROLLMENT_CODE or enrollment_code_file",
                daemon.config().name
            ),
        };
        session.enroll(&code).await?;
    }

    // 3. Fetch keys, session and token now, so READY reflects the real state.
    match session.refresh().await {
        Ok(()) => daemon.set_session_state(SessionState::Active),
        Err(error) if restored => {
            daemon.set_session_state(SessionState::Degraded(format!(
                "token server unreachable: {error}"
            )));
        }
        Err(error) => {
            daemon.set_session_state(SessionState::Down(format!("no client token: {error}")));
        }
    }

    tokio::spawn(session.run());
    Ok(())
}

impl Session {
    fn install_saved(&mut self) -> bool {
        let Some(text) = self.saved.token.clone() else {
            return false;
        };
        let Some(issuer) = self.saved.issuer.clone() else {
            return false;
        };
        match self.install(&text, &issuer, self.saved.key_set()) {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, "saved client token is not usable");
                false
            }
        }
    }

    /// Verifies this daemon's own token and makes it current.
    fn install(&self, text: &str, issuer: &str, keys: KeySet) -> anyhow::Result<()> {
        let bytes = token::from_text(text)?;
        let validation = Validation {
            kind: TokenKind::Client,
            issuer: Some(issuer.to_owned()),
            leeway: self.config.leeway_secs,
        };
        let verified = token::verify(&bytes, &keys, &validation, unix_now())?;
        let claims: Claims = verified.claims;
        let name = &self.daemon.config().name;
        if &claims.server != name
            || claims.server_key != self.daemon.shared.identity.public().to_bytes()
        {
            anyhow::bail!(
                "client token is for {:?} with another key; enroll this daemon again",
                claims.server
            );
        }
        self.daemon.shared.credentials.set(Credentials {
            token: bytes,
            claims,
            trust: Trust::TokenServer { keys, validation },
            authority: StreamAuthority::TokenScope,
        });
        Ok(())
    }

    async fn enroll(&mut self, code: &str) -> anyhow::Result<()> {
        let name = self.daemon.config().name.clone();
        let public = self.daemon.shared.identity.public();
        self.client.enroll(&name, code, &public).await.map_err(|e| {
            anyhow::anyhow!("enrollment of {name:?} failed: {e}; ask the token server operator for a new code with `h8 admin enroll {name}`")
        })?;
        info!(name = %name, public_key = %public_key_text(&public), "enrolled with the token server");
        self.saved.enrolled = true;
        self.saved.save(&self.state_dir)
    }

    /// Fetches keys, a session if needed, and a new client token.
    async fn refresh(&mut self) -> Result<(), ClientError> {
        let (issuer, mut keys) = self.client.key_set().await?;
        if let Some(expected) = &self.config.issuer {
            if &issuer != expected {
                return Err(ClientError::InvalidResponse(format!(
                    "token server calls itself {issuer:?} but the config expects {expected:?}"
                )));
            }
        }
        if !self.config.signing_keys.is_empty() {
            let pinned: HashSet<[u8; 32]> = self
                .config
                .signing_keys
                .iter()
                .map(|k| k.to_bytes())
                .collect();
            keys = KeySet::new(
                keys.iter()
                    .map(|(_, k)| *k)
                    .filter(|k| pinned.contains(&k.to_bytes())),
            );
        }

        let now = unix_now();
        let name = self.daemon.config().name.clone();
        let key = self.daemon.shared.identity.signing_key().clone();
        if self.saved.source_id.is_none() || self.saved.session_expires_at <= now + 60 {
            let session = self.client.open_session(&name, &key).await?;
            info!(source_id = %session.source_id, expires_at = session.expires_at, "session created");
            self.saved.source_id = Some(session.source_id);
            self.saved.session_expires_at = session.expires_at;
        }
        let source_id = self.saved.source_id.clone().unwrap_or_default();
        let response = match self
            .client
            .request_token(&source_id, &self.config.application, &key, now)
            .await
        {
            // An unknown or expired session: open a new one and retry once.
            Err(ClientError::Api {
                status: 401 | 404, ..
            }) => {
                let session = self.client.open_session(&name, &key).await?;
                info!(source_id = %session.source_id, "session re-created");
                self.saved.source_id = Some(session.source_id.clone());
                self.saved.session_expires_at = session.expires_at;
                self.client
                    .request_token(&session.source_id, &self.config.application, &key, now)
                    .await?
            }
            other => other?,
        };

        self.install(&response.token, &issuer, keys.clone())
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        info!(key_id = %response.key_id, expires_at = response.expires_at, application = %self.config.application, "client token received");
        self.saved.token = Some(response.token);
        self.saved.issuer = Some(issuer);
        self.saved.signing_keys = keys.iter().map(|(_, k)| public_key_text(k)).collect();
        if let Err(error) = self.saved.save(&self.state_dir) {
            warn!(%error, "cannot save the client token; a restart will need the token server");
        }
        Ok(())
    }

    fn refresh_delay(&self) -> Duration {
        let Some(credentials) = self.daemon.shared.credentials.current() else {
            return MIN_REFRESH;
        };
        let claims = &credentials.claims;
        let lifetime = claims.expires_at.saturating_sub(claims.issued_at);
        // Two thirds of the lifetime, minus up to a tenth of it as jitter so
        // that daemons started together do not refresh together.
        let jitter = if lifetime >= 10 {
            OsRng.next_u64() % (lifetime / 10)
        } else {
            0
        };
        let due = claims.issued_at + lifetime * 2 / 3 - jitter;
        Duration::from_secs(due.saturating_sub(unix_now())).max(MIN_REFRESH)
    }

    async fn poll_revocations(&mut self) -> Result<(), ClientError> {
        let current = self.daemon.shared.credentials.revocations();
        let response = self.client.revocations(Some(current.epoch)).await?;
        if !response.changed || response.epoch == current.epoch {
            return Ok(());
        }
        let set = RevocationSet {
            epoch: response.epoch,
            sources: response.sources.unwrap_or_default().into_iter().collect(),
            servers: response.servers.unwrap_or_default().into_iter().collect(),
            tokens: response.tokens.unwrap_or_default().into_iter().collect(),
        };
        info!(
            epoch = set.epoch,
            sources = set.sources.len(),
            servers = set.servers.len(),
            "revocation list updated"
        );
        self.saved.revocation_epoch = set.epoch;
        self.saved.revoked_sources = set.sources.iter().cloned().collect();
        self.saved.revoked_servers = set.servers.iter().cloned().collect();
        self.saved.revoked_tokens = set.tokens.iter().cloned().collect();
        let _ = self.saved.save(&self.state_dir);
        self.daemon.shared.credentials.set_revocations(set);
        self.daemon.close_revoked();
        Ok(())
    }

    fn mark_unreachable(&self, error: &ClientError) {
        let usable = self
            .daemon
            .shared
            .credentials
            .current()
            .is_some_and(|c| c.claims.check_time(unix_now(), 0).is_ok());
        if usable {
            self.daemon
                .set_session_state(SessionState::Degraded(format!(
                    "token server unreachable: {error}"
                )));
        } else {
            self.daemon.set_session_state(SessionState::Down(format!(
                "no valid client token: {error}"
            )));
        }
    }

    fn check_own_revocation(&self) {
        let Some(credentials) = self.daemon.shared.credentials.current() else {
            return;
        };
        if let Some(reason) = self
            .daemon
            .shared
            .credentials
            .revocations()
            .reason(&credentials.claims)
        {
            self.daemon.set_session_state(SessionState::Down(reason));
        }
    }

    /// Refreshes the token on schedule and polls revocations until shutdown.
    async fn run(mut self) {
        let mut shutdown = self.daemon.shared.shutting_down.subscribe();
        let poll = Duration::from_secs(self.config.revocation_poll_secs);
        let mut retry = Duration::from_secs(1);
        let mut next_refresh = tokio::time::Instant::now() + self.refresh_delay();
        let mut next_poll = tokio::time::Instant::now() + poll;
        loop {
            let wake = next_refresh.min(next_poll);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                _ = shutdown.wait_for(|down| *down) => return,
            }
            let now = tokio::time::Instant::now();
            if now >= next_poll {
                next_poll = now + poll;
                match self.poll_revocations().await {
                    Ok(()) => {
                        if matches!(self.daemon.session_state(), SessionState::Degraded(_)) {
                            // Reachable again; the next refresh confirms the token.
                            next_refresh = now;
                        }
                        self.check_own_revocation();
                    }
                    Err(error) => self.mark_unreachable(&error),
                }
            }
            if now >= next_refresh {
                match self.refresh().await {
                    Ok(()) => {
                        retry = Duration::from_secs(1);
                        self.daemon.set_session_state(SessionState::Active);
                        self.check_own_revocation();
                        self.daemon.push_token_update().await;
                        next_refresh = tokio::time::Instant::now() + self.refresh_delay();
                    }
                    Err(error) => {
                        if self.daemon.shared.credentials.current().is_some() {
                            warn!(%error, retry_secs = retry.as_secs(), "client token refresh failed; keeping the current token");
                        } else {
                            warn!(%error, retry_secs = retry.as_secs(), "fetching the first client token failed; retrying");
                        }
                        self.mark_unreachable(&error);
                        next_refresh = tokio::time::Instant::now() + retry;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            }
        }
    }
}
