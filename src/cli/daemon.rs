//! `h8 status`, `h8 peers`, `h8 token` and `h8 connect`: user commands
//! against the local daemon's API socket.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncWriteExt as _, BufReader};

use super::admin::format_time;
use super::api_client::{check_segment, ApiClient};
use crate::config::DEFAULT_API_SOCKET;
use crate::local_api::model::{PeerList, Status, TokenInfo};

/// Buffer size for `h8 connect` in each direction.
const COPY_BUFFER_LEN: usize = 256 * 1024;

/// Location of the daemon's API socket.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Path of h8d's API socket.
    #[arg(long, env = "H8_SOCKET", default_value = DEFAULT_API_SOCKET)]
    pub socket: PathBuf,
}

/// Arguments of `h8 status`, `h8 peers` and `h8 token`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// API socket.
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Print the daemon's JSON response instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `h8 connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// API socket.
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Peer's resource server name, as in [[peers]] of h8d's config.
    pub peer: String,
    /// Service on that peer.
    pub service: String,
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Formats a duration in seconds as `1h 2m 3s`.
pub fn format_duration(secs: u64) -> String {
    let (hours, minutes, seconds) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, _) => format!("{minutes}m {seconds}s"),
        _ => format!("{hours}h {minutes}m {seconds}s"),
    }
}

fn or_dash(value: Option<&str>) -> &str {
    match value {
        Some("") | None => "-",
        Some(value) => value,
    }
}

/// Runs `h8 status`.
pub async fn status(args: ShowArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.socket.socket);
    let status: Status = client.get("/v1/status").await?;
    if args.json {
        return print_json(&status);
    }
    let session = match &status.degraded_reason {
        Some(reason) => format!("{} ({reason})", status.session_state),
        None => status.session_state.clone(),
    };
    let token = match (status.token_expires_at, status.token_expires_in_secs) {
        (Some(at), Some(0)) => format!("expired at {}", format_time(at)),
        (Some(at), Some(left)) => {
            format!("expires {} (in {})", format_time(at), format_duration(left))
        }
        _ => "none".to_owned(),
    };
    println!("Name:       {}", status.name);
    println!("Mode:       {}", status.mode);
    println!("Session:    {session}");
    println!("Source ID:  {}", or_dash(status.source_id.as_deref()));
    println!("Client ID:  {}", or_dash(status.client_id.as_deref()));
    println!("Token:      {token}");
    println!("Listen:     {}", status.listen);
    println!("Peers:      {}", status.peers);
    println!("Streams:    {} open", status.streams_active);
    println!("Uptime:     {}", format_duration(status.uptime_secs));
    println!("Version:    {}", status.version);
    Ok(())
}

/// Runs `h8 peers`.
pub async fn peers(args: ShowArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.socket.socket);
    let list: PeerList = client.get("/v1/peers").await?;
    if args.json {
        return print_json(&list);
    }
    if list.peers.is_empty() {
        println!("No peers configured; add [[peers]] to h8d's config.");
        return Ok(());
    }
    println!(
        "{:<24}  {:<28}  {:<9}  {:>8}  {:>7}  LAST ERROR",
        "NAME", "ADDRESS", "STATE", "RTT", "STREAMS"
    );
    for peer in list.peers {
        let rtt = peer
            .rtt_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}ms"));
        println!(
            "{:<24}  {:<28}  {:<9}  {:>8}  {:>7}  {}",
            peer.name,
            peer.address,
            peer.state,
            rtt,
            peer.open_streams,
            or_dash(peer.last_error.as_deref())
        );
    }
    Ok(())
}

/// Runs `h8 token`: the decoded claims of the daemon's token, never the token itself.
pub async fn token(args: ShowArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.socket.socket);
    let token: TokenInfo = client.get("/v1/token").await?;
    if args.json {
        return print_json(&token);
    }
    let expiry = if token.expires_in_secs == 0 {
        format!("{} (expired)", format_time(token.expires_at))
    } else {
        format!(
            "{} (in {})",
            format_time(token.expires_at),
            format_duration(token.expires_in_secs)
        )
    };
    println!("Kind:        {}", token.kind);
    println!("Issuer:      {}", token.issuer);
    println!("Server:      {}", token.server);
    println!("Server key:  {}", token.server_key);
    println!("Client ID:   {}", or_dash(Some(&token.client_id)));
    println!("Source ID:   {}", token.source_id);
    println!("Token ID:    {}", token.token_id);
    println!("Signing key: {}", token.key_id);
    println!("Issued:      {}", format_time(token.issued_at));
    println!("Valid from:  {}", format_time(token.not_before));
    println!("Expires:     {expiry}");
    if token.grants.is_empty() {
        println!("Grants:      none (side-car mode: each peer's local policy decides)");
    } else {
        println!("Grants:");
        for grant in &token.grants {
            println!("  {}: {}", grant.peer, grant.services.join(", "));
        }
    }
    Ok(())
}

/// Runs `h8 connect`: standard input goes to the stream and the stream to
/// standard output. End of input half-closes the stream; the command exits
/// when both directions have ended.
pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    check_segment("peer name", &args.peer)?;
    check_segment("service name", &args.service)?;
    let client = ApiClient::new(&args.socket.socket);
    let path = format!("/v1/connect/{}/{}", args.peer, args.service);
    let (_, io) = client.upgrade(&path).await.with_context(|| {
        format!(
            "cannot open service {:?} on peer {:?}",
            args.service, args.peer
        )
    })?;
    let (read, mut write) = tokio::io::split(io);

    let upload = async {
        let mut stdin = BufReader::with_capacity(COPY_BUFFER_LEN, tokio::io::stdin());
        tokio::io::copy_buf(&mut stdin, &mut write)
            .await
            .context("sending standard input to the stream failed")?;
        write
            .shutdown()
            .await
            .context("closing the sending direction of the stream failed")?;
        anyhow::Ok(())
    };
    let download = async {
        let mut read = BufReader::with_capacity(COPY_BUFFER_LEN, read);
        let mut stdout = tokio::io::stdout();
        tokio::io::copy_buf(&mut read, &mut stdout)
            .await
            .context("copying the stream to standard output failed")?;
        stdout
            .flush()
            .await
            .context("flushing standard output failed")?;
        anyhow::Ok(())
    };
    tokio::try_join!(upload, download)?;
    Ok(())
}
