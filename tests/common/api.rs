//! Harness for the local API tests: two side-car `h8d` processes on
//! 127.0.0.1 with pinned keys, real QUIC between them, and helpers to talk
//! to their API sockets. Include it with `#[path = "common/api.rs"] mod api;`.
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use h8::identity::{public_key_text, IdentityKey};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixStream};

/// How one daemon of a pair is configured, beyond what the harness sets.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    /// TOML for `[services.*]` tables.
    pub services: String,
    /// TOML for `[[forwards]]` entries; `{dir}` is replaced by the node's directory.
    pub forwards: String,
    /// The local policy file.
    pub policy: String,
}

/// A running side-car `h8d`.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind UDP")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Starts `server-a` and `server-b`, each pinning the other's key.
pub fn start_pair(root: &Path, a: NodeSpec, b: NodeSpec) -> (Node, Node) {
    let names = ["server-a", "server-b"];
    let ports = [free_udp_port(), free_udp_port()];
    let mut keys = Vec::new();
    for name in names {
        let state = root.join(name).join("state");
        fs::create_dir_all(&state).expect("create state dir");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).expect("chmod state");
        let key = IdentityKey::generate();
        key.save(&state.join("identity.pem"))
            .expect("save identity");
        keys.push(public_key_text(&key.public()));
    }
    let specs = [a, b];
    let mut nodes = Vec::new();
    for index in 0..2 {
        let other = 1 - index;
        let dir = root.join(names[index]);
        let spec = &specs[index];
        let config = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\
             mode = \"side-car\"\nlog_level = \"h8=debug,info\"\nshutdown_grace_secs = 1\n\n\
             [sidecar]\npolicy = \"policy.toml\"\n\n[api]\nsocket = \"api.sock\"\n\n\
             [quic]\nkeepalive_secs = 1\nidle_timeout_secs = 3\n\n\
             [[peers]]\nname = \"{other_name}\"\naddress = \"127.0.0.1:{other_port}\"\npublic_key = \"{other_key}\"\n\n\
             {services}\n{forwards}\n",
            name = names[index],
            port = ports[index],
            other_name = names[other],
            other_port = ports[other],
            other_key = keys[other],
            services = spec.services,
            forwards = spec.forwards.replace("{dir}", &dir.display().to_string()),
        );
        fs::write(dir.join("h8d.toml"), config).expect("write config");
        fs::write(dir.join("policy.toml"), &spec.policy).expect("write policy");
        nodes.push(Node::spawn(names[index], &dir, ports[index]));
    }
    let b = nodes.pop().expect("two nodes");
    let a = nodes.pop().expect("two nodes");
    (a, b)
}

impl Node {
    fn spawn(name: &str, dir: &Path, port: u16) -> Node {
        let log = dir.join("h8d.log");
        let log_file = fs::File::create(&log).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_h8d"))
            .arg("--config")
            .arg(dir.join("h8d.toml"))
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn h8d");
        let mut node = Node {
            name: name.to_owned(),
            dir: dir.to_owned(),
            socket: dir.join("api.sock"),
            port,
            child,
            log,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not open {} in 30 s:\n{}",
            self.name,
            self.socket.display(),
            self.log_text()
        );
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon with SIGKILL, so it sends no QUIC close.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `curl --unix-socket API ARGS`; `None` when curl is not installed.
    pub fn curl(&self, args: &[&str]) -> Option<Output> {
        let socket = self.socket.display().to_string();
        curl(&[&["-sS", "--max-time", "20", "--unix-socket", &socket], args].concat())
    }

    /// Runs the `h8` tool against this daemon.
    pub fn h8(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_h8"));
        command.args(args).env("H8_SOCKET", &self.socket);
        command
    }

    /// Sends `request` as is on a new API connection and returns the status and body.
    pub async fn raw_request(&self, request: &[u8]) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .expect("connect API");
        stream.write_all(request).await.expect("write request");
        let mut response = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response)).await;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        (status, body)
    }

    /// Sends `POST path` with `Upgrade: h8-stream`. Returns the response head
    /// and the raw connection on 101, or the status and body otherwise.
    pub async fn upgrade(&self, path: &str) -> Result<(String, UnixStream), (u16, String)> {
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .expect("connect API");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: h8\r\nConnection: Upgrade\r\nUpgrade: h8-stream\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        // Read the head byte by byte so that no stream byte is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.expect("read response head");
            head.push(byte);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if status == 101 {
            return Ok((head, stream));
        }
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("read error body");
        Err((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Runs curl; `None` (with a note) when curl is not installed.
pub fn curl(args: &[&str]) -> Option<Output> {
    match Command::new("curl").args(args).output() {
        Ok(output) => Some(output),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("NOTE: curl is not installed; skipping the curl part of this test");
            None
        }
        Err(error) => panic!("cannot run curl: {error}"),
    }
}

/// Value of header `name` in a raw response head, case-insensitively.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Starts a TCP echo server: it echoes until end of input, then shuts down
/// its write half.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let address = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    address
}

/// TOML for a service named `name` with a TCP target.
/// Starts `server-a` and `server-b`, where `server-b` serves `echo`, a TCP
/// echo server, and lets `server-a` open it.
pub async fn start_echo_pair(root: &Path) -> (Node, Node) {
    let echo = echo_server().await;
    let b_spec = NodeSpec {
        services: tcp_service("echo", echo, "none"),
        policy: allow_a(&["echo"]),
        ..NodeSpec::default()
    };
    start_pair(root, NodeSpec::default(), b_spec)
}

pub fn tcp_service(name: &str, address: SocketAddr, identity: &str) -> String {
    format!("[services.{name}]\ntarget = \"tcp:{address}\"\nidentity = \"{identity}\"\n\n")
}

/// Local policy that lets `server-a` open `services`.
pub fn allow_a(services: &[&str]) -> String {
    let list: Vec<String> = services.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[allow]]\nfrom = \"server-a\"\nservices = [{}]\n",
        list.join(", ")
    )
}

/// SHA-256 of `data` as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
