//! `h8`: the command-line tool for h8 daemons and the token server.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use h8::cli::admin::AdminArgs;
use h8::cli::daemon::{ConnectArgs, ShowArgs};

/// Command-line tool for h8 daemons and the h8 token server.
#[derive(Debug, Parser)]
#[command(name = "h8", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Administer the token server over its admin socket.
    Admin(AdminArgs),
    /// Show the local daemon's status: session, token expiry, uptime.
    Status(ShowArgs),
    /// List the local daemon's peers with connection state, RTT and last error.
    Peers(ShowArgs),
    /// Open a stream to a service on a peer and connect it to standard input
    /// and output, like nc.
    Connect(ConnectArgs),
    /// Show the decoded claims of the local daemon's token (never the token itself).
    Token(ShowArgs),
    /// Run a token server and two daemons on 127.0.0.1 in a temporary
    /// directory, send traffic between them, and keep them running until
    /// Ctrl-C (or exit after one run with --once).
    Demo(h8::cli::demo::DemoArgs),
    /// Create a daemon identity key (mode 0600) and print its public key
    /// for pinning, or print the public key of an existing key file.
    Keygen(h8::cli::keygen::KeygenArgs),
    /// Validate a side-car local policy file or explain its decisions.
    Policy(h8::cli::policy::PolicyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Admin(args) => run(h8::cli::admin::run(args)),
        Command::Status(args) => run(h8::cli::daemon::status(args)),
        Command::Peers(args) => run(h8::cli::daemon::peers(args)),
        Command::Connect(args) => run(h8::cli::daemon::connect(args)),
        Command::Token(args) => run(h8::cli::daemon::token(args)),
        Command::Keygen(args) => h8::cli::keygen::run(args),
        Command::Policy(args) => h8::cli::policy::run(args),
        Command::Demo(args) => run(h8::cli::demo::run(args)),
    }
}

fn run(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(command);
    // A read of standard input may still block a runtime thread after an
    // error; do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
