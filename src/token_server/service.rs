//! The token server's logic, independent of HTTP.
//!
//! Every method is synchronous, takes the current time as `now` (seconds
//! since the Unix epoch) and returns either an API response type or a
//! [`ServiceError`] that maps one-to-one onto an HTTP error. The HTTP layers
//! run these methods on the blocking thread pool because they touch SQLite.

mod admin;
mod group_commit;
mod issue;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand_core::{OsRng, RngCore as _};

use super::api::{KeysResponse, PublishedKey, RevocationsResponse};
use super::config::Lifetimes;
use super::data_dir::DataDir;
use super::store::{Store, StoreError};
use crate::policy::{valid_name, Policy};
use crate::token::TokenSigner;

/// Maximum live session challenges per resource server.
pub const MAX_LIVE_CHALLENGES: u64 = 16;
/// Maximum rows returned by one audit request.
pub const MAX_AUDIT_LIMIT: u64 = 10_000;
/// Maximum client clock skew on token requests, in seconds.
pub const MAX_TIMESTAMP_SKEW_SECS: u64 = 60;

/// The HTTP class of a [`ServiceError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is malformed.
    BadRequest,
    /// 403: the request is well-formed but not allowed.
    Forbidden,
    /// 404: the route or the named thing does not exist.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 413: the body is larger than [`super::api::MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// 408: the request, body included, took longer than the server allows.
    RequestTimeout,
    /// 415: the body is not declared as JSON.
    UnsupportedMediaType,
    /// 429: a per-name limit is reached.
    TooManyRequests,
    /// 500: the server failed.
    Internal,
}

/// A failed request: its class, a stable code and a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    /// HTTP class.
    pub kind: ErrorKind,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Description of what failed, on which value, and what to do.
    pub message: String,
}

impl ServiceError {
    /// Builds a 400 error.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, code, message)
    }

    /// Builds a 403 error.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, code, message)
    }

    /// Builds an error of any class.
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        ServiceError {
            kind,
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store operation failed");
        ServiceError::new(
            ErrorKind::Internal,
            "internal",
            "the token server's database failed; see the server log and retry later",
        )
    }
}

/// The policy in force and the client identifier of each application in it.
#[derive(Debug)]
pub struct PolicyState {
    /// The parsed policy.
    pub policy: Policy,
    /// Client identifier by application name.
    pub client_ids: BTreeMap<String, String>,
}

/// The token server's state and operations.
pub struct Service {
    store: Mutex<Box<dyn Store>>,
    /// A second connection for the lookups of token requests, so they do
    /// not wait behind a commit's fsync on `store`.
    reader: Option<Mutex<Box<dyn Store>>>,
    issues: group_commit::GroupCommit,
    policy: RwLock<Arc<PolicyState>>,
    signer: RwLock<Arc<TokenSigner>>,
    issuer: String,
    lifetimes: Lifetimes,
    data_dir: Option<DataDir>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("issuer", &self.issuer)
            .field("lifetimes", &self.lifetimes)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Builds the service and assigns client identifiers to the policy's
    /// new applications. `data_dir` is where `rotate_key` writes new keys;
    /// without one, rotation fails.
    pub fn new(
        store: Box<dyn Store>,
        policy: Policy,
        signer: TokenSigner,
        issuer: String,
        lifetimes: Lifetimes,
        data_dir: Option<DataDir>,
        now: u64,
    ) -> Result<Self, ServiceError> {
        let service = Service {
            store: Mutex::new(store),
            reader: None,
            issues: group_commit::GroupCommit::default(),
            policy: RwLock::new(Arc::new(PolicyState {
                policy: Policy::default(),
                client_ids: BTreeMap::new(),
            })),
            signer: RwLock::new(Arc::new(signer)),
            issuer,
            lifetimes,
            data_dir,
        };
        service.set_policy(policy, now)?;
        Ok(service)
    }

    /// Adds a second store on the same database for the lookups of token
    /// requests. It must see every committed write of the main store, as a
    /// second SQLite connection to the same file in WAL mode does.
    pub fn with_reader(mut self, reader: Box<dyn Store>) -> Self {
        self.reader = Some(Mutex::new(reader));
        self
    }

    /// Issuer written into client tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Returns the policy in force.
    pub fn policy(&self) -> Arc<PolicyState> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the policy after assigning client identifiers to its new
    /// applications. Returns the number of applications.
    pub fn set_policy(&self, policy: Policy, now: u64) -> Result<usize, ServiceError> {
        let names: Vec<String> = policy.applications.keys().cloned().collect();
        let client_ids = self
            .store()
            .ensure_applications(&names, now, &mut || random_id("cid_", 12))?;
        let count = names.len();
        let state = Arc::new(PolicyState {
            policy,
            client_ids: client_ids.into_iter().collect(),
        });
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = state;
        Ok(count)
    }

    fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        // A panic while holding the lock leaves SQLite consistent, because
        // every change is one transaction, so the poisoned guard is usable.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns the store for lookups: the reader if there is one.
    fn reader(&self) -> MutexGuard<'_, Box<dyn Store>> {
        match &self.reader {
            Some(reader) => reader.lock().unwrap_or_else(PoisonError::into_inner),
            None => self.store(),
        }
    }

    fn signer(&self) -> Arc<TokenSigner> {
        Arc::clone(&self.signer.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Returns the published key set: the current key and every retired key
    /// that may still have signed a valid token at `now`.
    pub fn keys(&self, now: u64) -> Result<KeysResponse, ServiceError> {
        let records = self.store().signing_keys()?;
        let keys = records
            .into_iter()
            .filter(|key| match key.retired_at {
                None => true,
                Some(retired_at) => {
                    now < self.retired_key_published_until(retired_at, key.last_token_expires_at)
                }
            })
            .map(|key| PublishedKey {
                key_id: key.key_id,
                public_key: STANDARD.encode(key.public_key),
                retired_at: key.retired_at,
            })
            .collect();
        Ok(KeysResponse {
            issuer: self.issuer.clone(),
            keys,
        })
    }

    /// Returns when a key retired at `retired_at` leaves the published set:
    /// after the longest token lifetime, and never before the last token it
    /// signed expires.
    fn retired_key_published_until(&self, retired_at: u64, last_token_expires_at: u64) -> u64 {
        retired_at
            .saturating_add(self.lifetimes.token)
            .max(last_token_expires_at)
    }

    /// Returns the revocation lists, or only the epoch when `since` is the
    /// current epoch.
    pub fn revocations(
        &self,
        since: Option<u64>,
        now: u64,
    ) -> Result<RevocationsResponse, ServiceError> {
        let mut store = self.store();
        let epoch = store.epoch()?;
        if since == Some(epoch) {
            return Ok(RevocationsResponse {
                epoch,
                changed: false,
                ..RevocationsResponse::default()
            });
        }
        let lists = store.revocations(now)?;
        Ok(RevocationsResponse {
            epoch: lists.epoch,
            changed: true,
            sources: Some(lists.sources),
            servers: Some(lists.servers),
            tokens: Some(lists.tokens),
        })
    }

    /// Deletes rows that expired more than a day ago. Returns the number deleted.
    pub fn purge_expired(&self, now: u64) -> Result<u64, ServiceError> {
        Ok(self.store().purge_expired(now, 24 * 60 * 60)?)
    }
}

/// Returns `prefix` followed by `bytes` random bytes in unpadded base64url.
pub fn random_id(prefix: &str, bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buffer);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(buffer))
}

/// Checks a resource server or application name in a request.
fn check_name(field: &str, name: &str) -> Result<(), ServiceError> {
    if valid_name(name) && name != "*" {
        return Ok(());
    }
    Err(ServiceError::bad_request(
        "invalid_name",
        format!(
            "invalid {field} {:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.'",
            truncate(name)
        ),
    ))
}

/// Decodes standard base64 of exactly `N` bytes.
fn decode_fixed<const N: usize>(field: &str, text: &str) -> Result<[u8; N], ServiceError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| {
        ServiceError::bad_request(
            "invalid_encoding",
            format!("{field} is not valid standard base64"),
        )
    })?;
    bytes.try_into().map_err(|bytes: Vec<u8>| {
        ServiceError::bad_request(
            "invalid_encoding",
            format!("{field} is {} bytes, expected {N}", bytes.len()),
        )
    })
}

/// Shortens a client-supplied value for an error message.
fn truncate(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
