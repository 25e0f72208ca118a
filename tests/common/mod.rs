//! Shared harness for integration tests: real `h8-tokend` and `h8d`
//! processes on 127.0.0.1, driven through their real sockets.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use h8::identity::{public_key_text, IdentityKey};
use h8::token_server::run::ReadyInfo;

pub const TOKEND: &str = env!("CARGO_BIN_EXE_h8-tokend");
pub const H8D: &str = env!("CARGO_BIN_EXE_h8d");
pub const H8: &str = env!("CARGO_BIN_EXE_h8");

/// Kills the child when dropped.
pub struct Process {
    pub child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("create log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file)
            .env("RUST_LOG", "h8=debug,info")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            child: Some(child),
            name: name.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return status.code();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_text());
        }
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind UDP")
        .local_addr()
        .expect("address")
        .port()
}

/// A token server with its own data directory.
pub struct TokenServer {
    pub process: Process,
    pub dir: PathBuf,
    pub ready: ReadyInfo,
    pub config: PathBuf,
    pub policy: PathBuf,
}

impl TokenServer {
    /// Initializes a data directory and starts `h8-tokend` on 127.0.0.1.
    pub fn start(dir: &Path, policy: &str, extra_config: &str) -> TokenServer {
        std::fs::create_dir_all(dir).expect("create dir");
        let data = dir.join("data");
        let output = Command::new(TOKEND)
            .args(["init", "--data-dir"])
            .arg(&data)
            .output()
            .expect("run h8-tokend init");
        assert!(
            output.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let policy_path = dir.join("policy.toml");
        std::fs::write(&policy_path, policy).expect("write policy");
        let config = dir.join("h8-tokend.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\npolicy = \"policy.toml\"\nlisten = \"127.0.0.1:0\"\nadmin_socket = \"admin.sock\"\n{extra_config}"
            ),
        )
        .expect("write config");
        let mut server = TokenServer {
            process: Process {
                child: None,
                name: "h8-tokend".to_owned(),
                log: dir.join("tokend.log"),
            },
            dir: dir.to_owned(),
            ready: ReadyInfo {
                listen: String::new(),
                admin_socket: PathBuf::new(),
                tls_pin: String::new(),
                pid: 0,
            },
            config,
            policy: policy_path,
        };
        server.restart();
        server
    }

    /// Starts (again) the server process on a new port.
    pub fn restart(&mut self) {
        self.process.kill();
        let ready_file = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready_file);
        self.process = Process::spawn(
            "h8-tokend",
            Command::new(TOKEND)
                .args(["run", "--config"])
                .arg(&self.config)
                .arg("--ready-file")
                .arg(&ready_file),
            self.dir.join("tokend.log"),
        );
        wait_for("h8-tokend ready file", Duration::from_secs(20), || {
            ready_file.exists()
        });
        let text = std::fs::read_to_string(&ready_file).expect("read ready file");
        self.ready = serde_json::from_str(&text).expect("parse ready file");
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.ready.listen)
    }

    /// Runs `h8 admin ARGS` against this server and returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let output = Command::new(H8)
            .arg("admin")
            .arg("--socket")
            .arg(&self.ready.admin_socket)
            .args(args)
            .output()
            .expect("run h8 admin");
        assert!(
            output.status.success(),
            "h8 admin {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Issues a one-time enrollment code for `name`.
    pub fn enrollment_code(&self, name: &str) -> String {
        let client = h8::token_server::client::AdminClient::new(&self.ready.admin_socket);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(client.enroll(name, None))
            .expect("enroll through the admin socket")
            .enrollment_code
    }
}

/// How a test daemon is configured.
pub struct DaemonSpec {
    pub name: String,
    pub port: u16,
    pub mode: String,
    pub peers: Vec<(String, u16, Option<String>)>,
    pub services: String,
    pub extra: String,
}

/// A running `h8d` with its own state directory and API socket.
pub struct Daemon {
    pub process: Process,
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    pub enrollment_code: Option<String>,
}

impl Daemon {
    /// Writes the config of a token-server-mode daemon.
    pub fn token_server_config(
        name: &str,
        port: u16,
        server: &TokenServer,
        application: &str,
    ) -> DaemonSpec {
        DaemonSpec {
            name: name.to_owned(),
            port,
            mode: format!(
                "mode = \"token-server\"\n\n[token_server]\nurl = \"{}\"\ntls_pin = \"{}\"\napplication = \"{application}\"\nrevocation_poll_secs = 1\n",
                server.url(),
                server.ready.tls_pin
            ),
            peers: Vec::new(),
            services: String::new(),
            extra: String::new(),
        }
    }

    /// Renders the config file text.
    pub fn render(spec: &DaemonSpec, dir: &Path) -> String {
        let mut text = format!(
            "name = \"{}\"\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"state\"\nshutdown_grace_secs = 3\n{}\n{}\n\n[api]\nsocket = \"{}\"\n\n[quic]\nidle_timeout_secs = 10\nkeepalive_secs = 2\nhandshake_timeout_secs = 5\n\n",
            spec.name,
            spec.port,
            spec.extra,
            spec.mode,
            dir.join("api.sock").display()
        );
        for (name, port, key) in &spec.peers {
            text.push_str(&format!(
                "\n[[peers]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n"
            ));
            if let Some(key) = key {
                text.push_str(&format!("public_key = \"{key}\"\n"));
            }
        }
        text.push('\n');
        text.push_str(&spec.services);
        text
    }

    /// Writes the config and starts the daemon, waiting for its API socket.
    pub fn start(root: &Path, spec: &DaemonSpec, enrollment_code: Option<String>) -> Daemon {
        let dir = root.join(&spec.name);
        std::fs::create_dir_all(&dir).expect("create daemon dir");
        let config = dir.join("h8d.toml");
        std::fs::write(&config, Self::render(spec, &dir)).expect("write daemon config");
        let mut daemon = Daemon {
            process: Process {
                child: None,
                name: spec.name.clone(),
                log: dir.join("h8d.log"),
            },
            name: spec.name.clone(),
            socket: dir.join("api.sock"),
            dir,
            config,
            port: spec.port,
            enrollment_code,
        };
        daemon.restart();
        daemon
    }

    /// (Re)starts the process and waits until its local API answers.
    pub fn restart(&mut self) {
        self.process.kill();
        let mut command = Command::new(H8D);
        command.arg("--config").arg(&self.config);
        if let Some(code) = self.enrollment_code.take() {
            command.env("H8_ENROLLMENT_CODE", code);
        }
        let log = self
            .dir
            .join(format!("h8d-{}.log", Instant::now().elapsed().as_nanos()));
        self.process = Process::spawn(&self.name, &mut command, self.dir.join("h8d.log"));
        let _ = log;
        let socket = self.socket.clone();
        let process = &mut self.process;
        wait_for(
            &format!("{} API socket", self.name),
            Duration::from_secs(20),
            || {
                assert!(
                    process.is_running(),
                    "h8d exited early:\n{}",
                    process.log_text()
                );
                api(&socket, "GET", "/v1/status", "").is_ok()
            },
        );
    }

    pub fn status(&self) -> serde_json::Value {
        let (status, body) = api(&self.socket, "GET", "/v1/status", "").expect("status request");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// Opens a stream to `service` on `peer` through the local API.
    pub fn connect(&self, peer: &str, service: &str) -> Result<UnixStream, (u16, String)> {
        upgrade(&self.socket, &format!("/v1/connect/{peer}/{service}"))
    }
}

/// Generates an identity key file in `state_dir` and returns its public key text.
pub fn pregenerate_identity(state_dir: &Path) -> String {
    std::fs::create_dir_all(state_dir).expect("create state dir");
    let key = IdentityKey::generate();
    key.save(&state_dir.join("identity.pem"))
        .expect("save identity");
    public_key_text(&key.public())
}

/// Sends one HTTP/1.1 request over a Unix socket; returns status and body.
pub fn api(socket: &Path, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: h8\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {response:?}")))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, dechunk(body)))
}

fn dechunk(body: &str) -> String {
    // Bodies are small JSON; undo chunked encoding when present.
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, tail)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        if tail.len() < size {
            return body.to_owned();
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
}

/// Performs an HTTP Upgrade on the local API; returns the raw stream after 101.
pub fn upgrade(socket: &Path, path: &str) -> Result<UnixStream, (u16, String)> {
    let mut stream = UnixStream::connect(socket).map_err(|e| (0, e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| (0, e.to_string()))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: h8\r\nConnection: Upgrade\r\nUpgrade: h8-stream\r\nContent-Length: 0\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| (0, e.to_string()))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| (0, e.to_string()))?);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| (0, e.to_string()))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| (status, e.to_string()))?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    if status != 101 {
        let mut body = vec![0u8; content_length];
        let _ = reader.read_exact(&mut body);
        return Err((status, String::from_utf8_lossy(&body).into_owned()));
    }
    // The reader may have buffered bytes past the headers; nothing is sent
    // before the client writes, so its buffer is empty here.
    assert!(
        reader.buffer().is_empty(),
        "unexpected bytes after the 101 response"
    );
    Ok(stream)
}

/// A TCP echo server on 127.0.0.1; returns its port.
pub fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// Writes `data` on the stream, half-closes, and reads everything back.
pub fn round_trip(mut stream: UnixStream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut received = Vec::new();
    stream.read_to_end(&mut received).expect("read reply");
    received
}

/// Connects to a TCP port on 127.0.0.1.
pub fn tcp(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).expect("connect")
}
