//! `h8-tokend`: the h8 token server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use h8::telemetry::{self, LogFormat};
use h8::token_server::config::{
    Config, Lifetimes, DEFAULT_ADMIN_SOCKET, DEFAULT_ISSUER, DEFAULT_LISTEN,
};
use h8::token_server::data_dir::DataDir;
use h8::token_server::http::unix_now;
use h8::token_server::run::{load_policy, run};

/// The h8 token server: enrolls resource servers, opens sessions and issues
/// client tokens.
#[derive(Debug, Parser)]
#[command(name = "h8-tokend", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `auto` is human-readable on a terminal and without
    /// timestamps under the systemd journal; `json` is one object per line.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data directory with a signing key, TLS key and certificate,
    /// and database, then print the values daemons must pin.
    Init {
        /// Directory to create (mode 0700); must not exist or be empty.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Issuer name written into client tokens.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_ISSUER)]
        issuer: String,
    },
    /// Run the token server.
    Run(RunArgs),
    /// Validate a configuration file and its policy file, then exit.
    /// Exits with status 2 on the first error.
    CheckConfig {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// Either `--config FILE`, or `--data-dir DIR --policy FILE`; flags given
/// with `--config` override the file.
#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file (h8-tokend.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory created by `h8-tokend init`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Policy file.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Address of the HTTPS API, IP:PORT; port 0 picks a free port
    /// (default 0.0.0.0:8443).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Path of the admin socket (default /run/h8-tokend/admin.sock).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Write the bound address, admin socket path and TLS pin as JSON to
    /// this file once the server accepts connections.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    match cli.command {
        Command::Init { data_dir, issuer } => init(data_dir, &issuer),
        Command::Run(args) => run_server(args),
        Command::CheckConfig { config } => check_config(&config),
    }
}

fn init(data_dir: PathBuf, issuer: &str) -> ExitCode {
    if !h8::policy::valid_name(issuer) || issuer == "*" {
        eprintln!(
            "error: invalid issuer {issuer:?}; use 1 to 128 ASCII letters, digits, '-', '_' or '.'"
        );
        return ExitCode::from(2);
    }
    match DataDir::new(&data_dir).init(issuer, unix_now()) {
        Ok(report) => {
            println!("Created {}", data_dir.display());
            println!("issuer      = {}", report.issuer);
            println!("tls_pin     = {}", report.tls_pin);
            println!(
                "signing key = {} public key {}",
                report.key_id, report.public_key
            );
            println!("Daemons pin the TLS pin to reach this server and trust tokens from its published keys.");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_config(args: &RunArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => {
            let (Some(data_dir), Some(policy)) = (&args.data_dir, &args.policy) else {
                return Err(
                    "give --config FILE, or both --data-dir DIR and --policy FILE".to_owned(),
                );
            };
            Config {
                data_dir: data_dir.clone(),
                listen: DEFAULT_LISTEN
                    .parse()
                    .map_err(|_| "invalid built-in listen address".to_owned())?,
                admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
                policy: policy.clone(),
                issuer: None,
                lifetimes: Lifetimes::default(),
            }
        }
    };
    if let Some(data_dir) = &args.data_dir {
        config.data_dir = data_dir.clone();
    }
    if let Some(policy) = &args.policy {
        config.policy = policy.clone();
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin_socket) = &args.admin_socket {
        config.admin_socket = admin_socket.clone();
    }
    Ok(config)
}

fn run_server(args: RunArgs) -> ExitCode {
    let config = match build_config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, args.ready_file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "h8-tokend failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    match load_policy(&config.policy) {
        Ok(policy) => {
            println!(
                "{}: valid; policy {} has {} applications",
                path.display(),
                config.policy.display(),
                policy.applications.len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(2)
        }
    }
}
