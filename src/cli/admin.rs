//! `h8 admin`: operator commands against the token server's admin socket.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::token_server::api::AdminRevokeRequest;
use crate::token_server::client::AdminClient;
use crate::token_server::config::DEFAULT_ADMIN_SOCKET;

/// Arguments of `h8 admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Path of the token server's admin socket.
    #[arg(long, env = "H8_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
    pub socket: PathBuf,
    /// Print the server's JSON response instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The admin command.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Subcommands of `h8 admin`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a one-time enrollment code for a resource server. The code is
    /// shown only here.
    Enroll {
        /// Resource server name, such as `server-a`.
        name: String,
        /// Lifetime of the code in seconds (default: the server's setting, 900).
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
    },
    /// Revoke a session, a resource server (with its sessions) or a token.
    Revoke(RevokeArgs),
    /// Replace the token-signing key. The old key stays published until its
    /// tokens expire.
    RotateKey,
    /// Show the audit log, newest first. Never shows secrets.
    Audit {
        /// Number of entries.
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// List resource applications and their client identifiers.
    Apps,
    /// List sessions that have not expired.
    Sessions,
    /// Reload the policy file; a file with errors leaves the old policy in force.
    Reload,
}

/// Target of `h8 admin revoke`: exactly one option is required.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RevokeArgs {
    /// Source identifier of the session, such as `src_...`.
    #[arg(long, value_name = "SOURCE_ID")]
    pub session: Option<String>,
    /// Resource server name; all its sessions are revoked too.
    #[arg(long, value_name = "NAME")]
    pub server: Option<String>,
    /// Token id, 32 hex digits, as shown by `h8 admin audit`.
    #[arg(long, value_name = "TOKEN_ID")]
    pub token: Option<String>,
}

/// Runs `h8 admin` and prints the result to stdout.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::new(&args.socket);
    let socket = args.socket.display().to_string();
    let context = || format!("admin request to {socket} failed");
    match args.command {
        AdminCommand::Enroll { name, ttl } => {
            let response = client.enroll(&name, ttl).await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "Enrollment code for {}: {}",
                response.name, response.enrollment_code
            );
            println!(
                "Valid until {} ({}); it works once.",
                format_time(response.expires_at),
                response.expires_at
            );
        }
        AdminCommand::Revoke(target) => {
            let request = AdminRevokeRequest {
                session: target.session,
                server: target.server,
                token: target.token,
            };
            let response = client.revoke(&request).await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "Revoked {}; revocation epoch is now {}.",
                response.revoked, response.epoch
            );
        }
        AdminCommand::RotateKey => {
            let response = client.rotate_key().await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "New signing key {} (public key {}).",
                response.key_id, response.public_key
            );
            println!(
                "Key {} is retired and stays published until {}.",
                response.retired_key_id,
                format_time(response.retired_key_published_until)
            );
        }
        AdminCommand::Audit { limit } => {
            let response = client.audit(limit).await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "{:>6}  {:<20}  {:<11}  {:<28}  DETAIL",
                "ID", "TIME", "EVENT", "SUBJECT"
            );
            for entry in response.entries {
                println!(
                    "{:>6}  {:<20}  {:<11}  {:<28}  {}",
                    entry.id,
                    format_time(entry.at),
                    entry.event,
                    entry.subject,
                    entry.detail
                );
            }
        }
        AdminCommand::Apps => {
            let response = client.apps().await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!("{:<24}  {:<24}  SERVERS", "APPLICATION", "CLIENT ID");
            for app in response.applications {
                println!(
                    "{:<24}  {:<24}  {}",
                    app.name,
                    app.client_id,
                    app.servers.join(", ")
                );
            }
        }
        AdminCommand::Sessions => {
            let response = client.sessions().await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!(
                "{:<28}  {:<20}  {:<20}  {:<20}  REVOKED",
                "SOURCE ID", "SERVER", "CREATED", "EXPIRES"
            );
            for session in response.sessions {
                println!(
                    "{:<28}  {:<20}  {:<20}  {:<20}  {}",
                    session.source_id,
                    session.server,
                    format_time(session.created_at),
                    format_time(session.expires_at),
                    session
                        .revoked_at
                        .map_or_else(|| "-".to_owned(), format_time)
                );
            }
        }
        AdminCommand::Reload => {
            let response = client.reload().await.with_context(context)?;
            if args.json {
                return print_json(&response);
            }
            println!("Policy reloaded: {} applications.", response.applications);
        }
    }
    Ok(())
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Formats seconds since the Unix epoch as UTC `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Civil-from-days conversion by Howard Hinnant, for the proleptic
    // Gregorian calendar; `days` counts from 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_time_matches_known_dates() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
