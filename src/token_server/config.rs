//! The token server's configuration file, `h8-tokend.toml`.
//!
//! Relative paths in the file are resolved against the file's directory.
//! Unknown keys and out-of-range values are rejected with
//! `file:line:column: message`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::policy::valid_name;
use crate::source::{parse_toml, SourceError};

/// Issuer written into client tokens when the configuration names none.
pub const DEFAULT_ISSUER: &str = "h8-tokend";
/// Address of the public HTTPS API when the configuration names none.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Path of the admin socket when the configuration names none.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/h8-tokend/admin.sock";
/// Default lifetime of an enrollment code: 15 minutes.
pub const DEFAULT_ENROLLMENT_CODE_SECS: u64 = 15 * 60;
/// Default lifetime of a session challenge: 1 minute.
pub const DEFAULT_CHALLENGE_SECS: u64 = 60;
/// Default lifetime of a session: 24 hours.
pub const DEFAULT_SESSION_SECS: u64 = 24 * 60 * 60;
/// Default lifetime of a client token: 1 hour.
pub const DEFAULT_TOKEN_SECS: u64 = 60 * 60;
/// Upper bound on every configured lifetime: 30 days.
pub const MAX_LIFETIME_SECS: u64 = 30 * 24 * 60 * 60;

/// Validated token server configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Directory created by `h8-tokend init`.
    pub data_dir: PathBuf,
    /// Address of the public HTTPS API.
    pub listen: SocketAddr,
    /// Path of the admin Unix socket.
    pub admin_socket: PathBuf,
    /// Path of the policy file.
    pub policy: PathBuf,
    /// Issuer in client tokens; `None` keeps the one chosen at `init`.
    pub issuer: Option<String>,
    /// Lifetimes in seconds.
    pub lifetimes: Lifetimes,
}

/// Lifetimes of the things the token server hands out, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// Enrollment codes, unless `h8 admin enroll --ttl` says otherwise.
    pub enrollment_code: u64,
    /// Session challenges.
    pub challenge: u64,
    /// Sessions.
    pub session: u64,
    /// Client tokens; never beyond the session's end.
    pub token: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            enrollment_code: DEFAULT_ENROLLMENT_CODE_SECS,
            challenge: DEFAULT_CHALLENGE_SECS,
            session: DEFAULT_SESSION_SECS,
            token: DEFAULT_TOKEN_SECS,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Spanned<String>,
    policy: Spanned<String>,
    listen: Option<Spanned<String>>,
    admin_socket: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    enrollment_code_lifetime_secs: Option<Spanned<u64>>,
    challenge_lifetime_secs: Option<Spanned<u64>>,
    session_lifetime_secs: Option<Spanned<u64>>,
    token_lifetime_secs: Option<Spanned<u64>>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(file: &Path) -> Result<Config, SourceError> {
        let text = std::fs::read_to_string(file).map_err(|e| SourceError {
            file: file.to_owned(),
            line: 1,
            column: 1,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Config::parse(file, &text)
    }

    /// Parses and validates configuration text read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Config, SourceError> {
        let raw: RawConfig = parse_toml(file, text)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let path = |value: &Spanned<String>| -> Result<PathBuf, SourceError> {
            if value.get_ref().is_empty() {
                return Err(SourceError::at(
                    file,
                    text,
                    value.span().start,
                    "path is empty; give a file or directory path",
                ));
            }
            Ok(base.join(value.get_ref()))
        };

        let listen = match &raw.listen {
            Some(value) => value.get_ref().parse().map_err(|_| {
                SourceError::at(
                    file,
                    text,
                    value.span().start,
                    format!(
                        "invalid listen address {:?}; use IP:PORT, such as \"0.0.0.0:8443\" or \"[::1]:8443\"",
                        value.get_ref()
                    ),
                )
            })?,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| SourceError::at(file, text, 0, "invalid built-in listen address"))?,
        };

        let issuer = match &raw.issuer {
            Some(value) if !valid_name(value.get_ref()) || value.get_ref() == "*" => {
                return Err(SourceError::at(
                    file,
                    text,
                    value.span().start,
                    format!(
                        "invalid issuer {:?}; use 1 to 128 ASCII letters, digits, '-', '_' or '.'",
                        value.get_ref()
                    ),
                ))
            }
            Some(value) => Some(value.get_ref().clone()),
            None => None,
        };

        let lifetime = |value: &Option<Spanned<u64>>, key: &str, default: u64| {
            let Some(value) = value else {
                return Ok(default);
            };
            let secs = *value.get_ref();
            if secs == 0 || secs > MAX_LIFETIME_SECS {
                return Err(SourceError::at(
                    file,
                    text,
                    value.span().start,
                    format!("{key} is {secs}; use 1 to {MAX_LIFETIME_SECS} seconds"),
                ));
            }
            Ok(secs)
        };
        let lifetimes = Lifetimes {
            enrollment_code: lifetime(
                &raw.enrollment_code_lifetime_secs,
                "enrollment_code_lifetime_secs",
                DEFAULT_ENROLLMENT_CODE_SECS,
            )?,
            challenge: lifetime(
                &raw.challenge_lifetime_secs,
                "challenge_lifetime_secs",
                DEFAULT_CHALLENGE_SECS,
            )?,
            session: lifetime(
                &raw.session_lifetime_secs,
                "session_lifetime_secs",
                DEFAULT_SESSION_SECS,
            )?,
            token: lifetime(
                &raw.token_lifetime_secs,
                "token_lifetime_secs",
                DEFAULT_TOKEN_SECS,
            )?,
        };

        Ok(Config {
            data_dir: path(&raw.data_dir)?,
            listen,
            admin_socket: match &raw.admin_socket {
                Some(value) => path(value)?,
                None => PathBuf::from(DEFAULT_ADMIN_SOCKET),
            },
            policy: path(&raw.policy)?,
            issuer,
            lifetimes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_uses_defaults() {
        let text = "data_dir = \"data\"\npolicy = \"/etc/h8/policy.toml\"\n";
        let config = Config::parse(Path::new("/etc/h8/h8-tokend.toml"), text).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("/etc/h8/data"));
        assert_eq!(config.policy, PathBuf::from("/etc/h8/policy.toml"));
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(config.issuer, None);
        assert_eq!(config.lifetimes, Lifetimes::default());
    }

    #[test]
    fn unknown_key_has_position() {
        let text = "data_dir = \"d\"\npolicy = \"p\"\nlisten_port = 1\n";
        let err = Config::parse(Path::new("t.toml"), text)
            .expect_err("the configuration should be rejected");
        assert_eq!((err.line, err.column), (3, 1), "{err}");
        assert!(err.message.contains("listen_port"), "{err}");
    }

    #[test]
    fn bad_values_have_positions() {
        let cases = [
            ("listen = \"localhost\"\n", "invalid listen address"),
            ("token_lifetime_secs = 0\n", "token_lifetime_secs is 0"),
            ("issuer = \"a b\"\n", "invalid issuer"),
        ];
        for (line, expected) in cases {
            let text = format!("data_dir = \"d\"\npolicy = \"p\"\n{line}");
            let err = Config::parse(Path::new("t.toml"), &text)
                .expect_err("the configuration should be rejected");
            assert_eq!(err.line, 3, "{err}");
            assert!(err.message.contains(expected), "{err}");
        }
    }
}
