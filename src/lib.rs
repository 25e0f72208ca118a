//! h8: a peer-to-peer authorization daemon.
//!
//! The sans-IO core ([`token`], [`policy`], [`wire`], [`handshake`]) is pure:
//! bytes and the current time go in, decisions and bytes come out. The async
//! drivers around it ([`daemon`], [`local_api`], [`token_server`]) own the
//! sockets, clocks and files.

pub mod authorize;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod handshake;
pub mod identity;
pub mod local_api;
pub mod policy;
pub mod proxy_v2;
pub mod source;
pub mod systemd;
pub mod telemetry;
pub mod token;
pub mod token_server;
pub mod wire;
