//! Helpers shared by the operations tests: side-car daemons with pinned
//! keys, and a fake systemd notification socket.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{pregenerate_identity, Daemon, DaemonSpec};

/// A side-car node before it starts: its name, QUIC port and public key.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub port: u16,
    pub key: String,
}

/// Pre-generates the identity key of `name` under `root/name/state`.
pub fn node(root: &Path, name: &str) -> Node {
    let key = pregenerate_identity(&root.join(name).join("state"));
    Node {
        name: name.to_owned(),
        port: crate::common::free_udp_port(),
        key,
    }
}

/// Side-car config of `node` that pins `peers` and offers `services`
/// (TOML text); `policy` is written to `local.toml` beside the config.
pub fn sidecar_spec(
    root: &Path,
    node: &Node,
    peers: &[&Node],
    services: &str,
    policy: &str,
) -> DaemonSpec {
    let dir = root.join(&node.name);
    std::fs::create_dir_all(&dir).expect("create node dir");
    std::fs::write(dir.join("local.toml"), policy).expect("write local policy");
    DaemonSpec {
        name: node.name.clone(),
        port: node.port,
        mode: "mode = \"side-car\"\n\n[sidecar]\npolicy = \"local.toml\"\n".to_owned(),
        peers: peers
            .iter()
            .map(|peer| (peer.name.clone(), peer.port, Some(peer.key.clone())))
            .collect(),
        services: services.to_owned(),
        extra: String::new(),
    }
}

/// Local policy text allowing `from` to open `services`.
pub fn allow(from: &str, services: &[&str]) -> String {
    let list: Vec<String> = services.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[allow]]\nfrom = \"{from}\"\nservices = [{}]\n",
        list.join(", ")
    )
}

/// Starts a side-car daemon through the common harness.
pub fn start(root: &Path, spec: &DaemonSpec) -> Daemon {
    Daemon::start(root, spec, None)
}

/// A datagram socket that stands in for systemd's `NOTIFY_SOCKET`.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: UnixDatagram,
    /// Every message received so far, in order.
    pub messages: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket {
            path,
            socket,
            messages: Vec::new(),
        }
    }

    /// Receives one message, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("set timeout");
        let mut buffer = vec![0u8; 4096];
        match self.socket.recv(&mut buffer) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                self.messages.push(message.clone());
                Some(message)
            }
            Err(_) => None,
        }
    }

    /// Waits up to `timeout` for a message with the line `line`, such as
    /// `READY=1`; returns that message.
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let message = self.recv(left)?;
            if message.lines().any(|l| l == line) {
                return Some(message);
            }
        }
    }

    /// Reports whether any message so far had the line `line`.
    pub fn seen(&self, line: &str) -> bool {
        self.messages.iter().any(|m| m.lines().any(|l| l == line))
    }
}
