//! The processes and local servers a run measures: two side-car `h8d`, an
//! `h8-tokend`, a pair of `stunnel4`, and the sink and echo servers that
//! stand in for applications. Everything listens on 127.0.0.1 or on Unix
//! sockets in a temporary directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ed25519_dalek::VerifyingKey;
use h8::identity::{public_key_text, IdentityKey};
use h8::token_server::run::ReadyInfo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener, UnixStream};

pub const H8D: &str = env!("CARGO_BIN_EXE_h8d");
pub const TOKEND: &str = env!("CARGO_BIN_EXE_h8-tokend");
pub const STUNNEL: &str = "/usr/bin/stunnel4";

/// Number of client identities pinned on `server-b`, used by the raw
/// handshake clients of the new-connection and memory measurements.
pub const CLIENT_IDENTITIES: usize = 128;

/// Fails with instructions when a binary the harness runs is missing.
pub fn check_binaries() -> anyhow::Result<()> {
    for binary in [H8D, TOKEND] {
        if !Path::new(binary).exists() {
            bail!("{binary} not found; run `cargo build --release` first");
        }
    }
    if !Path::new(STUNNEL).exists() {
        bail!("{STUNNEL} not found; install the Debian package stunnel4");
    }
    Ok(())
}

/// A child process, killed and reaped on drop.
pub struct Process {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &str, command: &mut Command, log: PathBuf) -> anyhow::Result<Process> {
        let file = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Process {
            child,
            name: name.to_owned(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            bail!("{} exited early with {status}; its log:\n{log}", self.name);
        }
        Ok(())
    }
}

impl Process {
    /// Kills the process and reaps it.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port(udp: bool) -> anyhow::Result<u16> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    };
    Ok(port)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// An identity with a name, as the handshake clients use it.
pub struct ClientIdentity {
    pub name: String,
    pub key: IdentityKey,
}

/// The two daemons, the application stand-ins and the baselines' processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub daemon_a: Process,
    pub daemon_b: Process,
    pub socket_a: PathBuf,
    pub port_b: u16,
    pub key_b: VerifyingKey,
    pub clients: Vec<ClientIdentity>,
    pub sink_port: u16,
    pub unix_echo: PathBuf,
    pub stunnel_client: Process,
    pub stunnel_server: Process,
    pub stunnel_sink_port: u16,
    pub stunnel_echo_port: u16,
    pub tokend: Process,
    pub tokend_ready: ReadyInfo,
}

impl Cluster {
    /// Starts every process and local server and waits until each answers.
    pub async fn start() -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("h8-bench-").tempdir()?;
        let root = dir.path().to_owned();

        let sink_port = spawn_sink().await?;
        let echo_port = spawn_tcp_echo().await?;
        let unix_echo = root.join("echo.sock");
        spawn_unix_echo(&unix_echo)?;

        let clients: Vec<ClientIdentity> = (0..CLIENT_IDENTITIES)
            .map(|index| ClientIdentity {
                name: format!("client-{index:03}"),
                key: IdentityKey::generate(),
            })
            .collect();
        let (daemon_a, daemon_b, socket_a, port_b, key_b) =
            start_daemons(&root, &clients, sink_port, echo_port).await?;

        let (stunnel_client, stunnel_server, stunnel_sink_port, stunnel_echo_port) =
            start_stunnel(&root, sink_port, echo_port).await?;
        let (tokend, tokend_ready) = start_tokend(&root).await?;

        Ok(Cluster {
            dir,
            daemon_a,
            daemon_b,
            socket_a,
            port_b,
            key_b,
            clients,
            sink_port,
            unix_echo,
            stunnel_client,
            stunnel_server,
            stunnel_sink_port,
            stunnel_echo_port,
            tokend,
            tokend_ready,
        })
    }

    /// Replaces both daemons with fresh processes, so that memory freed in
    /// an earlier run cannot be reused by the next memory reading.
    pub async fn restart_daemons(&mut self) -> anyhow::Result<()> {
        let root = self.dir.path().to_owned();
        // Stop both before starting either: server-a must not keep a
        // connection to the old server-b.
        self.daemon_a.stop();
        self.daemon_b.stop();
        self.daemon_a = start_daemon(&root.join("server-a")).await?;
        self.daemon_b = start_daemon(&root.join("server-b")).await?;
        Ok(())
    }

    /// Fails when a process of the cluster has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.daemon_a.check_running()?;
        self.daemon_b.check_running()?;
        self.stunnel_client.check_running()?;
        self.stunnel_server.check_running()?;
        self.tokend.check_running()
    }
}

fn prepare_state(dir: &Path) -> anyhow::Result<VerifyingKey> {
    let state = dir.join("state");
    fs::create_dir_all(&state)?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
    let key = IdentityKey::generate();
    key.save(&state.join("identity.pem"))?;
    Ok(key.public())
}

/// Starts `server-a` (the initiator, no services) and `server-b` (sink and
/// echo services, pinning `server-a` and every client identity).
async fn start_daemons(
    root: &Path,
    clients: &[ClientIdentity],
    sink_port: u16,
    echo_port: u16,
) -> anyhow::Result<(Process, Process, PathBuf, u16, VerifyingKey)> {
    let dir_a = root.join("server-a");
    let dir_b = root.join("server-b");
    let key_a = prepare_state(&dir_a)?;
    let key_b = prepare_state(&dir_b)?;
    let port_a = free_port(true)?;
    let port_b = free_port(true)?;

    // Both daemons log at info, the shipped default, so per-connection log
    // lines are part of what is measured.
    let common = "state_dir = \"state\"\nmode = \"side-car\"\nlog_level = \"info\"\n\
                  shutdown_grace_secs = 1\n\n[sidecar]\npolicy = \"policy.toml\"\n\n\
                  [api]\nsocket = \"api.sock\"\n\n\
                  [quic]\nkeepalive_secs = 10\nidle_timeout_secs = 60\n";
    let config_a = format!(
        "name = \"server-a\"\nlisten = \"127.0.0.1:{port_a}\"\n{common}\n\
         [[peers]]\nname = \"server-b\"\naddress = \"127.0.0.1:{port_b}\"\npublic_key = \"{}\"\n",
        public_key_text(&key_b)
    );
    let mut config_b = format!(
        "name = \"server-b\"\nlisten = \"127.0.0.1:{port_b}\"\n{common}\n\
         [[peers]]\nname = \"server-a\"\naddress = \"127.0.0.1:{port_a}\"\npublic_key = \"{}\"\n",
        public_key_text(&key_a)
    );
    // server-b never dials the clients, but every peer needs an address.
    for client in clients {
        config_b.push_str(&format!(
            "\n[[peers]]\nname = \"{}\"\naddress = \"127.0.0.1:1\"\npublic_key = \"{}\"\n",
            client.name,
            public_key_text(&client.key.public())
        ));
    }
    config_b.push_str(&format!(
        "\n[services.sink]\ntarget = \"tcp:127.0.0.1:{sink_port}\"\n\n\
         [services.echo]\ntarget = \"tcp:127.0.0.1:{echo_port}\"\n"
    ));
    fs::write(dir_a.join("h8d.toml"), config_a)?;
    fs::write(dir_a.join("policy.toml"), "")?;
    fs::write(dir_b.join("h8d.toml"), config_b)?;
    fs::write(
        dir_b.join("policy.toml"),
        "[[allow]]\nfrom = \"*\"\nservices = [\"sink\", \"echo\"]\n",
    )?;

    let daemon_a = start_daemon(&dir_a).await?;
    let daemon_b = start_daemon(&dir_b).await?;
    Ok((daemon_a, daemon_b, dir_a.join("api.sock"), port_b, key_b))
}

/// Starts `h8d` with the config in `dir` and waits until its API answers.
async fn start_daemon(dir: &Path) -> anyhow::Result<Process> {
    let name = dir
        .file_name()
        .map_or("h8d".into(), |name| name.to_string_lossy());
    let log = dir.join("h8d.log");
    let mut process = Process::spawn(
        &name,
        Command::new(H8D).arg("--config").arg(dir.join("h8d.toml")),
        log,
    )?;
    let socket = dir.join("api.sock");
    wait_until(
        &format!("the API socket of {name}"),
        Duration::from_secs(20),
        || {
            let running = process.check_running();
            let socket = socket.clone();
            async move {
                running?;
                Ok(api_status(&socket).await.is_ok())
            }
        },
    )
    .await?;
    Ok(process)
}

async fn api_status(socket: &Path) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(socket).await?;
    stream
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    if !response.starts_with(b"HTTP/1.1 200") {
        bail!(
            "status request failed: {}",
            String::from_utf8_lossy(&response)
        );
    }
    Ok(())
}

/// Starts a stunnel client (plain TCP in, TLS out) and server (TLS in,
/// plain TCP out) with mutual certificate checks, for the sink and the echo
/// server. Returns the client-side ports of both services.
async fn start_stunnel(
    root: &Path,
    sink_port: u16,
    echo_port: u16,
) -> anyhow::Result<(Process, Process, u16, u16)> {
    let dir = root.join("stunnel");
    fs::create_dir_all(&dir)?;
    for side in ["client", "server"] {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        fs::write(dir.join(format!("{side}.pem")), certified.cert.pem())?;
        fs::write(
            dir.join(format!("{side}.key")),
            certified.key_pair.serialize_pem(),
        )?;
    }
    let ports: HashMap<&str, (u16, u16, u16)> = HashMap::from([
        ("sink", (free_port(false)?, free_port(false)?, sink_port)),
        ("echo", (free_port(false)?, free_port(false)?, echo_port)),
    ]);
    // Logging at level 4 (warning) leaves out the per-connection notices.
    let mut client = "foreground = yes\npid =\ndebug = 4\n".to_owned();
    let mut server = client.clone();
    for (service, (client_port, server_port, target)) in &ports {
        client.push_str(&format!(
            "\n[{service}]\nclient = yes\naccept = 127.0.0.1:{client_port}\n\
             connect = 127.0.0.1:{server_port}\ncert = {d}/client.pem\nkey = {d}/client.key\n\
             CAfile = {d}/server.pem\nverifyPeer = yes\n",
            d = dir.display()
        ));
        server.push_str(&format!(
            "\n[{service}]\naccept = 127.0.0.1:{server_port}\nconnect = 127.0.0.1:{target}\n\
             cert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/client.pem\nverifyPeer = yes\n",
            d = dir.display()
        ));
    }
    fs::write(dir.join("client.conf"), client)?;
    fs::write(dir.join("server.conf"), server)?;
    let mut processes = Vec::new();
    for side in ["server", "client"] {
        let process = Process::spawn(
            &format!("stunnel {side}"),
            Command::new(STUNNEL).arg(dir.join(format!("{side}.conf"))),
            dir.join(format!("{side}.log")),
        )?;
        processes.push(process);
    }
    for (service, (client_port, server_port, _)) in &ports {
        for port in [client_port, server_port] {
            let port = *port;
            wait_until(
                &format!("stunnel {service} on port {port}"),
                Duration::from_secs(10),
                || async move {
                    Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok())
                },
            )
            .await?;
        }
    }
    let client = processes.pop().context("two stunnel processes")?;
    let server = processes.pop().context("two stunnel processes")?;
    Ok((client, server, ports["sink"].0, ports["echo"].0))
}

/// Names of the resource servers the token server's policy authorizes.
pub fn token_server_names(count: usize) -> Vec<String> {
    (0..count).map(|index| format!("ts-{index:03}")).collect()
}

/// Number of resource servers enrolled for the token issuance measurement.
pub const TOKEN_SERVERS: usize = 32;

async fn start_tokend(root: &Path) -> anyhow::Result<(Process, ReadyInfo)> {
    let dir = root.join("tokend");
    fs::create_dir_all(&dir)?;
    let output = Command::new(TOKEND)
        .args(["init", "--data-dir"])
        .arg(dir.join("data"))
        .output()?;
    if !output.status.success() {
        bail!(
            "h8-tokend init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let servers: Vec<String> = token_server_names(TOKEN_SERVERS)
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect();
    fs::write(
        dir.join("policy.toml"),
        format!("[applications.bench]\nservers = [{}]\n", servers.join(", ")),
    )?;
    fs::write(
        dir.join("h8-tokend.toml"),
        "data_dir = \"data\"\npolicy = \"policy.toml\"\nlisten = \"127.0.0.1:0\"\n\
         admin_socket = \"admin.sock\"\n",
    )?;
    let ready_file = dir.join("ready.json");
    let mut process = Process::spawn(
        "h8-tokend",
        Command::new(TOKEND)
            .args(["run", "--config"])
            .arg(dir.join("h8-tokend.toml"))
            .arg("--ready-file")
            .arg(&ready_file),
        dir.join("tokend.log"),
    )?;
    wait_until("the h8-tokend ready file", Duration::from_secs(20), || {
        let running = process.check_running();
        let exists = ready_file.exists();
        async move {
            running?;
            Ok(exists)
        }
    })
    .await?;
    let ready: ReadyInfo = serde_json::from_str(&fs::read_to_string(&ready_file)?)?;
    Ok((process, ready))
}

/// Starts the sink: it reads each connection to its end, then writes the
/// byte count as 8 bytes little-endian and closes.
async fn spawn_sink() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = stream.write_all(&total.to_le_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(port)
}

async fn spawn_tcp_echo() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    Ok(port)
}

fn spawn_unix_echo(path: &Path) -> anyhow::Result<()> {
    let listener = UnixListener::bind(path)?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    Ok(())
}

/// Opens a stream to `service` on `peer` through an `h8d` API socket and
/// returns the raw byte stream after `101 Switching Protocols`.
pub async fn h8_connect(socket: &Path, peer: &str, service: &str) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).await?;
    let request = format!(
        "POST /v1/connect/{peer}/{service} HTTP/1.1\r\nHost: h8\r\n\
         Connection: Upgrade\r\nUpgrade: h8-stream\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The peer's service sends nothing before the client writes, so every
    // byte read here belongs to the response head.
    let mut head = Vec::with_capacity(256);
    let mut buffer = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            bail!("h8d closed the API connection during the upgrade");
        }
        head.extend_from_slice(&buffer[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!(
            "upgrade to {peer}/{service} failed: {}",
            String::from_utf8_lossy(&head)
        );
    }
    Ok(stream)
}
