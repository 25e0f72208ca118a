//! [`Store`] on SQLite through rusqlite.
//!
//! The schema sticks to `CREATE TABLE/INDEX IF NOT EXISTS`, TEXT, BIGINT and
//! BLOB columns and `INSERT ... ON CONFLICT`, which PostgreSQL also accepts
//! (with BYTEA for BLOB). Times are BIGINT so that they outlive 2038 on
//! PostgreSQL too. Audit ids are assigned in the transaction instead of
//! relying on SQLite's rowid.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};

use super::{
    AuditEvent, AuditRecord, EnrollmentCodeRecord, IssuedToken, Revocations, RevokeTarget,
    ServerRecord, SessionRecord, SigningKeyRecord, Store, StoreError,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applications (
    name TEXT PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_codes (
    code_hash BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    enrolled_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE IF NOT EXISTS challenges (
    challenge BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    source_id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    server_key BLOB NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX IF NOT EXISTS sessions_by_server ON sessions (server);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    server TEXT NOT NULL,
    application TEXT NOT NULL,
    key_id TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE IF NOT EXISTS signing_keys (
    key_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT,
    last_token_expires_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

const EPOCH: &str = "revocation_epoch";

/// A [`Store`] in one SQLite database file.
pub struct SqliteStore {
    connection: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies the schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path).map_err(|e| {
            StoreError::Backend(format!("cannot open database {}: {e}", path.display()))
        })?;
        // WAL lets readers proceed during a write; FULL sync keeps committed
        // revocations across a power loss.
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        Ok(SqliteStore { connection })
    }

    fn write(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn key32(bytes: Vec<u8>, column: &str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Backend(format!("stored {column} is not 32 bytes")))
}

fn append_audit(tx: &rusqlite::Transaction<'_>, audit: &AuditEvent) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO audit (id, at, event, subject, detail)
         SELECT COALESCE(MAX(id), 0) + 1, ?1, ?2, ?3, ?4 FROM audit",
    )?
    .execute(params![
        int(audit.at),
        audit.event,
        audit.subject,
        audit.detail
    ])?;
    Ok(())
}

fn bump_epoch(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    let current: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE name = ?1", [EPOCH], |row| {
            row.get(0)
        })
        .optional()?;
    let next = current.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
    tx.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        params![EPOCH, next.to_string()],
    )?;
    Ok(next)
}

fn session_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(SessionRecord, Vec<u8>)> {
    Ok((
        SessionRecord {
            source_id: row.get(0)?,
            server: row.get(1)?,
            server_key: [0; 32],
            created_at: uint(row.get(3)?),
            expires_at: uint(row.get(4)?),
            revoked_at: row.get::<_, Option<i64>>(5)?.map(uint),
        },
        row.get(2)?,
    ))
}

fn finish_session(
    (mut session, key): (SessionRecord, Vec<u8>),
) -> Result<SessionRecord, StoreError> {
    session.server_key = key32(key, "session key")?;
    Ok(session)
}

impl Store for SqliteStore {
    fn meta(&mut self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .connection
            .query_row("SELECT value FROM meta WHERE name = ?1", [name], |row| {
                row.get(0)
            })
            .optional()?)
    }

    fn set_meta(&mut self, name: &str, value: &str) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO meta (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            params![name, value],
        )?;
        Ok(())
    }

    fn ensure_applications(
        &mut self,
        names: &[String],
        now: u64,
        new_client_id: &mut dyn FnMut() -> String,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let tx = self.write()?;
        let mut result = Vec::with_capacity(names.len());
        for name in names {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT client_id FROM applications WHERE name = ?1",
                    [name],
                    |row| row.get(0),
                )
                .optional()?;
            let client_id = match existing {
                Some(id) => id,
                None => {
                    let id = new_client_id();
                    tx.execute(
                        "INSERT INTO applications (name, client_id, created_at) VALUES (?1, ?2, ?3)",
                        params![name, id, int(now)],
                    )?;
                    append_audit(
                        &tx,
                        &AuditEvent::new(
                            now,
                            "policy",
                            name.as_str(),
                            format!("new application, client identifier {id}"),
                        ),
                    )?;
                    id
                }
            };
            result.push((name.clone(), client_id));
        }
        tx.commit()?;
        Ok(result)
    }

    fn insert_enrollment_code(
        &mut self,
        code_hash: &[u8; 32],
        name: &str,
        expires_at: u64,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO enrollment_codes (code_hash, name, created_at, expires_at, used_at)
             VALUES (?1, ?2, ?3, ?4, NULL)",
            params![&code_hash[..], name, int(audit.at), int(expires_at)],
        )?;
        append_audit(&tx, &audit)?;
        tx.commit()?;
        Ok(())
    }

    fn enrollment_code(
        &mut self,
        code_hash: &[u8; 32],
    ) -> Result<Option<EnrollmentCodeRecord>, StoreError> {
        Ok(self
            .connection
            .query_row(
                "SELECT name, expires_at, used_at FROM enrollment_codes WHERE code_hash = ?1",
                [&code_hash[..]],
                |row| {
                    Ok(EnrollmentCodeRecord {
                        name: row.get(0)?,
                        expires_at: uint(row.get(1)?),
                        used_at: row.get::<_, Option<i64>>(2)?.map(uint),
                    })
                },
            )
            .optional()?)
    }

    fn enroll(
        &mut self,
        code_hash: &[u8; 32],
        name: &str,
        public_key: &[u8; 32],
        now: u64,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        // The `used_at IS NULL` condition makes the code single-use even if
        // two enrollments race past the service's earlier check.
        let marked = tx.execute(
            "UPDATE enrollment_codes SET used_at = ?1
             WHERE code_hash = ?2 AND name = ?3 AND used_at IS NULL",
            params![int(now), &code_hash[..], name],
        )?;
        if marked != 1 {
            return Err(StoreError::NotFound(
                "enrollment code was used by another request".to_owned(),
            ));
        }
        tx.execute(
            "INSERT INTO servers (name, public_key, enrolled_at, revoked_at)
             VALUES (?1, ?2, ?3, NULL)
             ON CONFLICT (name) DO UPDATE SET public_key = excluded.public_key,
                 enrolled_at = excluded.enrolled_at, revoked_at = NULL",
            params![name, &public_key[..], int(now)],
        )?;
        append_audit(&tx, &audit)?;
        tx.commit()?;
        Ok(())
    }

    fn server(&mut self, name: &str) -> Result<Option<ServerRecord>, StoreError> {
        // Cached statements: these lookups run on every token request.
        let row = self
            .connection
            .prepare_cached(
                "SELECT name, public_key, enrolled_at, revoked_at FROM servers WHERE name = ?1",
            )?
            .query_row([name], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    uint(row.get(2)?),
                    row.get::<_, Option<i64>>(3)?.map(uint),
                ))
            })
            .optional()?;
        row.map(|(name, key, enrolled_at, revoked_at)| {
            Ok(ServerRecord {
                name,
                public_key: key32(key, "server key")?,
                enrolled_at,
                revoked_at,
            })
        })
        .transpose()
    }

    fn insert_challenge(
        &mut self,
        challenge: &[u8; 32],
        name: &str,
        expires_at: u64,
        now: u64,
        max_live: u64,
    ) -> Result<bool, StoreError> {
        let tx = self.write()?;
        tx.execute("DELETE FROM challenges WHERE expires_at <= ?1", [int(now)])?;
        let live: i64 = tx.query_row(
            "SELECT COUNT(*) FROM challenges WHERE name = ?1",
            [name],
            |row| row.get(0),
        )?;
        let evict = (uint(live) + 1).saturating_sub(max_live.max(1));
        if evict > 0 {
            tx.execute(
                "DELETE FROM challenges WHERE challenge IN \
                 (SELECT challenge FROM challenges WHERE name = ?1 ORDER BY expires_at LIMIT ?2)",
                params![name, int(evict)],
            )?;
        }
        tx.execute(
            "INSERT INTO challenges (challenge, name, expires_at) VALUES (?1, ?2, ?3)",
            params![&challenge[..], name, int(expires_at)],
        )?;
        tx.commit()?;
        Ok(evict > 0)
    }

    fn take_challenge(
        &mut self,
        challenge: &[u8; 32],
    ) -> Result<Option<(String, u64)>, StoreError> {
        let tx = self.write()?;
        let row = tx
            .query_row(
                "SELECT name, expires_at FROM challenges WHERE challenge = ?1",
                [&challenge[..]],
                |row| Ok((row.get::<_, String>(0)?, uint(row.get(1)?))),
            )
            .optional()?;
        tx.execute(
            "DELETE FROM challenges WHERE challenge = ?1",
            [&challenge[..]],
        )?;
        tx.commit()?;
        Ok(row)
    }

    fn insert_session(
        &mut self,
        session: &SessionRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO sessions (source_id, server, server_key, created_at, expires_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
            params![
                session.source_id,
                session.server,
                &session.server_key[..],
                int(session.created_at),
                int(session.expires_at)
            ],
        )?;
        append_audit(&tx, &audit)?;
        tx.commit()?;
        Ok(())
    }

    fn session(&mut self, source_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = self
            .connection
            .prepare_cached(
                "SELECT source_id, server, server_key, created_at, expires_at, revoked_at
                 FROM sessions WHERE source_id = ?1",
            )?
            .query_row([source_id], session_from_row)
            .optional()?;
        row.map(finish_session).transpose()
    }

    fn live_sessions(&mut self, now: u64) -> Result<Vec<SessionRecord>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT source_id, server, server_key, created_at, expires_at, revoked_at
             FROM sessions WHERE expires_at > ?1 ORDER BY created_at DESC, source_id",
        )?;
        let rows = statement.query_map([int(now)], session_from_row)?;
        let mut sessions = Vec::new();
        for row in rows {
            sessions.push(finish_session(row?)?);
        }
        Ok(sessions)
    }

    fn record_issues(&mut self, batch: &[(IssuedToken, AuditEvent)]) -> Result<(), StoreError> {
        let tx = self.write()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO tokens (token_id, source_id, server, application, key_id, issued_at, expires_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
            )?;
            let mut raise = tx.prepare_cached(
                "UPDATE signing_keys SET last_token_expires_at = ?1
                 WHERE key_id = ?2 AND last_token_expires_at < ?1",
            )?;
            for (token, audit) in batch {
                insert.execute(params![
                    token.token_id,
                    token.source_id,
                    token.server,
                    token.application,
                    token.key_id,
                    int(token.issued_at),
                    int(token.expires_at)
                ])?;
                raise.execute(params![int(token.expires_at), token.key_id])?;
                append_audit(&tx, audit)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn append_audit(&mut self, audit: AuditEvent) -> Result<(), StoreError> {
        let tx = self.write()?;
        append_audit(&tx, &audit)?;
        tx.commit()?;
        Ok(())
    }

    fn audit(&mut self, limit: u64) -> Result<Vec<AuditRecord>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT id, at, event, subject, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map([int(limit)], |row| {
            Ok(AuditRecord {
                id: uint(row.get(0)?),
                at: uint(row.get(1)?),
                event: row.get(2)?,
                subject: row.get(3)?,
                detail: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke(
        &mut self,
        target: &RevokeTarget,
        now: u64,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        let tx = self.write()?;
        let changed = match target {
            RevokeTarget::Session(source_id) => tx.execute(
                "UPDATE sessions SET revoked_at = ?1 WHERE source_id = ?2 AND revoked_at IS NULL",
                params![int(now), source_id],
            )?,
            RevokeTarget::Server(name) => {
                let changed = tx.execute(
                    "UPDATE servers SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
                    params![int(now), name],
                )?;
                // Revoking the sessions too keeps the server's tokens revoked
                // at the daemons after a later re-enrollment lifts the
                // server's own revocation.
                tx.execute(
                    "UPDATE sessions SET revoked_at = ?1
                     WHERE server = ?2 AND revoked_at IS NULL AND expires_at > ?1",
                    params![int(now), name],
                )?;
                changed
            }
            RevokeTarget::Token(token_id) => tx.execute(
                "UPDATE tokens SET revoked_at = ?1 WHERE token_id = ?2 AND revoked_at IS NULL",
                params![int(now), token_id],
            )?,
        };
        if changed == 0 {
            let message = match target {
                RevokeTarget::Session(id) => {
                    format!("no unrevoked session with source identifier {id:?}")
                }
                RevokeTarget::Server(name) => {
                    format!("no enrolled, unrevoked resource server named {name:?}")
                }
                RevokeTarget::Token(id) => format!("no unrevoked token with id {id:?}"),
            };
            return Err(StoreError::NotFound(message));
        }
        let epoch = bump_epoch(&tx)?;
        append_audit(&tx, &audit)?;
        tx.commit()?;
        Ok(epoch)
    }

    fn epoch(&mut self) -> Result<u64, StoreError> {
        Ok(self
            .meta(EPOCH)?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0))
    }

    fn revocations(&mut self, now: u64) -> Result<Revocations, StoreError> {
        let tx = self.connection.transaction()?;
        let strings =
            |sql: &str, params: &[&dyn rusqlite::ToSql]| -> Result<Vec<String>, StoreError> {
                let mut statement = tx.prepare(sql)?;
                let rows = statement.query_map(params, |row| row.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            };
        let now = int(now);
        let sources = strings(
            "SELECT source_id FROM sessions WHERE revoked_at IS NOT NULL AND expires_at > ?1 ORDER BY source_id",
            &[&now],
        )?;
        let servers = strings(
            "SELECT name FROM servers WHERE revoked_at IS NOT NULL ORDER BY name",
            &[],
        )?;
        let tokens = strings(
            "SELECT token_id FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ?1 ORDER BY token_id",
            &[&now],
        )?;
        let epoch: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE name = ?1", [EPOCH], |row| {
                row.get(0)
            })
            .optional()?;
        Ok(Revocations {
            epoch: epoch.and_then(|v| v.parse().ok()).unwrap_or(0),
            sources,
            servers,
            tokens,
        })
    }

    fn signing_keys(&mut self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT key_id, public_key, created_at, retired_at, last_token_expires_at
             FROM signing_keys ORDER BY created_at, key_id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                uint(row.get(2)?),
                row.get::<_, Option<i64>>(3)?.map(uint),
                uint(row.get(4)?),
            ))
        })?;
        let mut keys = Vec::new();
        for row in rows {
            let (key_id, public_key, created_at, retired_at, last_token_expires_at) = row?;
            keys.push(SigningKeyRecord {
                key_id,
                public_key: key32(public_key, "signing key")?,
                created_at,
                retired_at,
                last_token_expires_at,
            });
        }
        Ok(keys)
    }

    fn insert_signing_key(&mut self, key: &SigningKeyRecord) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO signing_keys (key_id, public_key, created_at, retired_at, last_token_expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                key.key_id,
                &key.public_key[..],
                int(key.created_at),
                key.retired_at.map(int),
                int(key.last_token_expires_at)
            ],
        )?;
        Ok(())
    }

    fn rotate_signing_key(
        &mut self,
        old_key_id: &str,
        new_key: &SigningKeyRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        let retired = tx.execute(
            "UPDATE signing_keys SET retired_at = ?1 WHERE key_id = ?2 AND retired_at IS NULL",
            params![int(new_key.created_at), old_key_id],
        )?;
        if retired != 1 {
            return Err(StoreError::NotFound(format!(
                "signing key {old_key_id} is not the current key"
            )));
        }
        tx.execute(
            "INSERT INTO signing_keys (key_id, public_key, created_at, retired_at, last_token_expires_at)
             VALUES (?1, ?2, ?3, NULL, 0)",
            params![new_key.key_id, &new_key.public_key[..], int(new_key.created_at)],
        )?;
        append_audit(&tx, &audit)?;
        tx.commit()?;
        Ok(())
    }

    fn purge_expired(&mut self, now: u64, grace: u64) -> Result<u64, StoreError> {
        let cutoff = int(now.saturating_sub(grace));
        let tx = self.write()?;
        let mut deleted = 0;
        for sql in [
            "DELETE FROM challenges WHERE expires_at <= ?1",
            "DELETE FROM enrollment_codes WHERE expires_at <= ?1",
            "DELETE FROM tokens WHERE expires_at <= ?1",
            "DELETE FROM sessions WHERE expires_at <= ?1",
        ] {
            deleted += tx.execute(sql, [cutoff])?;
        }
        tx.commit()?;
        Ok(deleted as u64)
    }
}

#[cfg(test)]
#[path = "sqlite_tests.rs"]
mod tests;
