//! `h8`: the command-line tool for h8 daemons and the token server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use h8::cli::admin::AdminArgs;

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
    /// Show the local daemon's status.
    Status,
    /// List the local daemon's peers.
    Peers,
    /// Open a connection to a service on a peer.
    Connect,
    /// Show the local daemon's current client token.
    Token,
    /// Run a local demonstration.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Admin(args) => return run_admin(args),
        Command::Status => "status",
        Command::Peers => "peers",
        Command::Connect => "connect",
        Command::Token => "token",
        Command::Demo => "demo",
    };
    eprintln!("h8 {name}: not implemented yet");
    ExitCode::FAILURE
}

fn run_admin(args: AdminArgs) -> ExitCode {
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
    match runtime.block_on(h8::cli::admin::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
