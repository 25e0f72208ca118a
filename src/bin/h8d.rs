//! `h8d`, the h8 session daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use h8::daemon::lifecycle::{self, RunOptions};
use h8::telemetry::{self, LogFormat};

/// The h8 session daemon: authenticates and authorizes every stream between
/// resource servers.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file.
    #[arg(long, short, default_value = "/etc/h8/h8d.toml", env = "H8D_CONFIG")]
    config: PathBuf,
    /// Validate the config file (and the local policy it names), then exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// One-time enrollment code for the first start (token-server mode).
    #[arg(long, env = "H8_ENROLLMENT_CODE", hide_env_values = true)]
    enrollment_code: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "auto")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return match lifecycle::check_config(path) {
            Ok(_) => {
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(2)
            }
        };
    }

    // The daemon loads the config again and reports its errors; these two
    // settings are needed before it starts.
    let (level, threads) = h8::config::DaemonConfig::load(&args.config)
        .map(|c| (c.log_level, c.worker_threads))
        .unwrap_or_else(|_| ("info".to_owned(), 1));
    telemetry::init(args.log_format, &level);

    // One thread by default: each peer connection's packets are handled by
    // one quinn task anyway, and a single thread saves the cross-thread
    // wake-ups that a multi-threaded runtime pays on every hop.
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = RunOptions {
        config: args.config,
        enrollment_code: args.enrollment_code,
    };
    match runtime.block_on(lifecycle::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "h8d failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
