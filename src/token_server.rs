//! The token server `h8-tokend`.
//!
//! It enrolls resource servers (binding a name to an Ed25519 key with a
//! one-time enrollment code), opens sessions for them (each session gets a
//! source identifier), and issues client tokens scoped by the policy. The
//! public API is JSON over HTTPS; the admin API is JSON over a Unix socket.
//!
//! Layout: [`api`] holds the wire types shared with clients, [`service`] the
//! logic over a [`store::Store`], [`http`] and [`admin`] the routers,
//! [`run`] the process (files, sockets, signals), and [`client`] the async
//! clients that daemons and the `h8 admin` CLI use.

pub mod admin;
pub mod api;
pub mod client;
pub mod config;
pub mod data_dir;
pub mod http;
pub mod run;
pub mod service;
pub mod store;
