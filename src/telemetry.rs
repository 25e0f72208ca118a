//! Log output: one format per audience.
//!
//! - a terminal gets human-readable lines with timestamps and colours;
//! - `--log-format json` gets one JSON object per line;
//! - under systemd's journal (`JOURNAL_STREAM` is set) plain lines without
//!   timestamps, because the journal adds its own.
//!
//! `RUST_LOG` overrides the level given by the config or the default.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Requested log format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human on a terminal, plain under journald, otherwise human without colours.
    Auto,
    /// Human-readable with timestamps.
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `default_level` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Auto if journald => builder
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .try_init(),
        LogFormat::Auto | LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A subscriber installed earlier (tests) is kept.
    let _ = result;
}
