//! Persistent state of the token server behind a small [`Store`] trait.
//!
//! Each method that changes more than one row runs in one transaction, so a
//! crash never leaves, say, a used enrollment code without its enrollment.
//! The only implementation today is [`sqlite::SqliteStore`]; the schema uses
//! portable SQL so that a PostgreSQL store can follow.
//!
//! The store holds no secret: enrollment codes are stored as SHA-256 hashes
//! and signing keys only as public keys.

pub mod sqlite;

pub use sqlite::SqliteStore;

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or returned unexpected data.
    #[error("database error: {0}")]
    Backend(String),
    /// A row the operation needs does not exist.
    #[error("{0}")]
    NotFound(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Backend(error.to_string())
    }
}

/// An enrolled resource server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRecord {
    /// Resource server name.
    pub name: String,
    /// Enrolled Ed25519 public key.
    pub public_key: [u8; 32],
    /// Enrollment time.
    pub enrolled_at: u64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<u64>,
}

/// A session of a resource server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Source identifier.
    pub source_id: String,
    /// Resource server name.
    pub server: String,
    /// Key the server proved possession of when opening the session.
    pub server_key: [u8; 32],
    /// Creation time.
    pub created_at: u64,
    /// End of the session.
    pub expires_at: u64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<u64>,
}

/// An issued client token, without the token itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    /// Token id, hex.
    pub token_id: String,
    /// Source identifier of the session.
    pub source_id: String,
    /// Resource server name.
    pub server: String,
    /// Resource application name.
    pub application: String,
    /// Id of the signing key.
    pub key_id: String,
    /// Issue time.
    pub issued_at: u64,
    /// End of validity.
    pub expires_at: u64,
}

/// The public half of a token-signing key and its life cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// Key id, 16 hex digits.
    pub key_id: String,
    /// Ed25519 public key.
    pub public_key: [u8; 32],
    /// When the key started signing.
    pub created_at: u64,
    /// When the key stopped signing, or `None` for the current key.
    pub retired_at: Option<u64>,
    /// Latest expiry of any token the key signed, 0 if none.
    pub last_token_expires_at: u64,
}

/// A stored enrollment code, looked up by hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentCodeRecord {
    /// Resource server name the code was issued for.
    pub name: String,
    /// End of validity.
    pub expires_at: u64,
    /// When the code was used, if it was.
    pub used_at: Option<u64>,
}

/// The revocation lists at one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Current epoch.
    pub epoch: u64,
    /// Revoked sessions not yet expired.
    pub sources: Vec<String>,
    /// Revoked resource servers.
    pub servers: Vec<String>,
    /// Revoked tokens not yet expired, as hex ids.
    pub tokens: Vec<String>,
}

/// What [`Store::revoke`] revokes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One session, by source identifier.
    Session(String),
    /// A resource server and every session it has.
    Server(String),
    /// One token, by hex id.
    Token(String),
}

/// An audit row to append. Must never contain a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Event time.
    pub at: u64,
    /// Event type, such as `issue` or `deny`.
    pub event: &'static str,
    /// What the event is about.
    pub subject: String,
    /// Details in words.
    pub detail: String,
}

impl AuditEvent {
    /// Builds an event.
    pub fn new(
        at: u64,
        event: &'static str,
        subject: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        AuditEvent {
            at,
            event,
            subject: subject.into(),
            detail: detail.into(),
        }
    }
}

/// A stored audit row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number.
    pub id: u64,
    /// Event time.
    pub at: u64,
    /// Event type.
    pub event: String,
    /// What the event is about.
    pub subject: String,
    /// Details in words.
    pub detail: String,
}

/// Persistent state of the token server.
///
/// Methods take `now` instead of reading a clock. Every method that writes
/// also appends its audit event in the same transaction.
pub trait Store: Send {
    /// Reads a value from the key/value metadata table.
    fn meta(&mut self, name: &str) -> Result<Option<String>, StoreError>;
    /// Writes a value to the key/value metadata table.
    fn set_meta(&mut self, name: &str, value: &str) -> Result<(), StoreError>;

    /// Returns the client identifier of each application in `names`,
    /// assigning `new_client_id()` to the ones seen for the first time.
    fn ensure_applications(
        &mut self,
        names: &[String],
        now: u64,
        new_client_id: &mut dyn FnMut() -> String,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// Stores the hash of a new enrollment code.
    fn insert_enrollment_code(
        &mut self,
        code_hash: &[u8; 32],
        name: &str,
        expires_at: u64,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;
    /// Looks up an enrollment code by hash.
    fn enrollment_code(
        &mut self,
        code_hash: &[u8; 32],
    ) -> Result<Option<EnrollmentCodeRecord>, StoreError>;
    /// Marks the code used and binds `name` to `public_key`, clearing any
    /// earlier revocation of the name. Fails with [`StoreError::NotFound`]
    /// when the code was used in the meantime.
    fn enroll(
        &mut self,
        code_hash: &[u8; 32],
        name: &str,
        public_key: &[u8; 32],
        now: u64,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;
    /// Looks up an enrolled resource server.
    fn server(&mut self, name: &str) -> Result<Option<ServerRecord>, StoreError>;

    /// Stores a session challenge after dropping expired ones. When `name`
    /// already has `max_live` live challenges, the oldest are dropped to make
    /// room, and the result is `true`.
    fn insert_challenge(
        &mut self,
        challenge: &[u8; 32],
        name: &str,
        expires_at: u64,
        now: u64,
        max_live: u64,
    ) -> Result<bool, StoreError>;
    /// Deletes a challenge and returns its name and expiry, if it existed.
    fn take_challenge(&mut self, challenge: &[u8; 32])
        -> Result<Option<(String, u64)>, StoreError>;

    /// Stores a new session.
    fn insert_session(
        &mut self,
        session: &SessionRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;
    /// Looks up a session.
    fn session(&mut self, source_id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Lists sessions that expire after `now`, newest first.
    fn live_sessions(&mut self, now: u64) -> Result<Vec<SessionRecord>, StoreError>;

    /// Records issued tokens, each with its audit event, and raises their
    /// signing keys' last expiry, all in one transaction: either every
    /// record of the batch is stored or none is.
    fn record_issues(&mut self, batch: &[(IssuedToken, AuditEvent)]) -> Result<(), StoreError>;
    /// Appends an audit event on its own, such as a denial.
    fn append_audit(&mut self, audit: AuditEvent) -> Result<(), StoreError>;
    /// Lists the newest `limit` audit rows, newest first.
    fn audit(&mut self, limit: u64) -> Result<Vec<AuditRecord>, StoreError>;

    /// Revokes a session, server or token and increments the epoch.
    /// Returns the new epoch. Fails with [`StoreError::NotFound`] for an
    /// unknown target.
    fn revoke(
        &mut self,
        target: &RevokeTarget,
        now: u64,
        audit: AuditEvent,
    ) -> Result<u64, StoreError>;
    /// Returns the current revocation epoch.
    fn epoch(&mut self) -> Result<u64, StoreError>;
    /// Returns the revocation lists, without entries expired at `now`.
    fn revocations(&mut self, now: u64) -> Result<Revocations, StoreError>;

    /// Lists every signing key, oldest first.
    fn signing_keys(&mut self) -> Result<Vec<SigningKeyRecord>, StoreError>;
    /// Adds a signing key, which becomes the current one.
    fn insert_signing_key(&mut self, key: &SigningKeyRecord) -> Result<(), StoreError>;
    /// Retires `old_key_id` at `now` and adds `new_key` as the current key.
    fn rotate_signing_key(
        &mut self,
        old_key_id: &str,
        new_key: &SigningKeyRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// Deletes challenges, codes, sessions and token records that expired
    /// more than `grace` seconds before `now`. Returns the number of rows.
    fn purge_expired(&mut self, now: u64, grace: u64) -> Result<u64, StoreError>;
}
