//! Subcommand implementations of the `h8` command-line tool.

pub mod admin;
pub mod api_client;
pub mod daemon;
pub mod demo;
pub mod keygen;
pub mod policy;
