//! `h8 demo`: a token server and two session daemons on 127.0.0.1 in a
//! temporary directory, with real traffic between them.
//!
//! The demo runs the installed binaries `h8-tokend` and `h8d` found next to
//! the running `h8`, so it exercises the same code paths as a deployment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cli::api_client::{ApiClient, ApiError};
use crate::local_api::model::{PeerList, Status};
use crate::token_server::client::AdminClient;
use crate::token_server::run::ReadyInfo;

/// How long each process may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Resource servers of the demo application.
const SERVERS: [&str; 2] = ["server-a", "server-b"];
/// Payload sent through the echo service.
const PAYLOAD: &[u8] = b"hello from server-a through h8";

const POLICY: &str = r#"# Demo policy: server-a may open "echo" on server-b, nothing else.
[applications.demo]
servers = ["server-a", "server-b"]

[[applications.demo.allow]]
from = "server-a"
to = "server-b"
services = ["echo"]
"#;

/// Options of `h8 demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Run the scenario once and exit: status 0 on success, 1 on any failure.
    #[arg(long)]
    pub once: bool,
}

/// Child processes and the temporary directory, removed on drop.
struct Demo {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            stop_child(name, child);
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: cannot remove {}: {error}", self.dir.display());
        }
    }
}

/// Sends SIGTERM, waits up to 5 s, then kills.
fn stop_child(name: &str, child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = send_sigterm(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("warning: {name} did not stop within 5 s; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn send_sigterm(pid: i32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill -TERM {pid} failed")))
    }
}

/// Finds `name` next to the running executable.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the path of h8")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found; h8 demo runs the {name} installed next to h8 (build all binaries with `cargo build --bins`)",
            path.display()
        );
    }
    Ok(path)
}

/// Creates a fresh 0700 directory under the system temporary directory.
fn create_demo_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!("h8-demo-{}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("cannot create {}", dir.display()))
            }
        }
    }
    bail!("cannot create a demo directory under {}", base.display())
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> anyhow::Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("cannot bind a UDP port")?;
    Ok(socket.local_addr()?.port())
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

impl Demo {
    fn spawn(&mut self, name: &str, command: &mut Command, log: &Path) -> anyhow::Result<()> {
        let file = log_file(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails with the log of `name` if that process has exited.
    fn check_running(&mut self, name: &str, log: &Path) -> anyhow::Result<()> {
        for (child_name, child) in &mut self.children {
            if child_name == name {
                if let Ok(Some(status)) = child.try_wait() {
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    bail!("{name} exited with {status}; its log:\n{text}");
                }
            }
        }
        Ok(())
    }
}

/// Serves a TCP echo on 127.0.0.1; returns its port.
async fn start_echo_server() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the echo service")?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    Ok(port)
}

fn daemon_config(
    name: &str,
    port: u16,
    peer: (&str, u16),
    echo_port: u16,
    ready: &ReadyInfo,
    dir: &Path,
) -> String {
    format!(
        r#"name = "{name}"
listen = "127.0.0.1:{port}"
state_dir = "state"
mode = "token-server"
shutdown_grace_secs = 2

[token_server]
url = "https://{listen}"
tls_pin = "{pin}"
application = "demo"

[api]
socket = "{socket}"

[[peers]]
name = "{peer_name}"
address = "127.0.0.1:{peer_port}"

[services.echo]
target = "tcp:127.0.0.1:{echo_port}"
"#,
        listen = ready.listen,
        pin = ready.tls_pin,
        socket = dir.join("api.sock").display(),
        peer_name = peer.0,
        peer_port = peer.1,
    )
}

/// Runs `h8 demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tokend = sibling_binary("h8-tokend")?;
    let h8d = sibling_binary("h8d")?;
    let mut demo = Demo {
        dir: create_demo_dir()?,
        children: Vec::new(),
    };
    println!("demo directory: {}", demo.dir.display());

    let ready = start_token_server(&mut demo, &tokend).await?;
    let admin = AdminClient::new(&ready.admin_socket);
    let echo_port = start_echo_server().await?;
    println!("echo service behind server-b: tcp:127.0.0.1:{echo_port}");

    let ports = [free_udp_port()?, free_udp_port()?];
    let mut sockets = Vec::new();
    for (index, name) in SERVERS.iter().enumerate() {
        let other = 1 - index;
        let dir = demo.dir.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("h8d.toml");
        let text = daemon_config(
            name,
            ports[index],
            (SERVERS[other], ports[other]),
            echo_port,
            &ready,
            &dir,
        );
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;

        let code = admin
            .enroll(name, None)
            .await
            .with_context(|| format!("cannot create an enrollment code for {name}"))?;
        let log = dir.join("h8d.log");
        demo.spawn(
            name,
            Command::new(&h8d)
                .arg("--config")
                .arg(&config)
                .env("H8_ENROLLMENT_CODE", &code.enrollment_code),
            &log,
        )?;
        let socket = dir.join("api.sock");
        let status = wait_active(&mut demo, name, &socket, &log).await?;
        println!(
            "[enroll]  {name}: enrolled with a one-time code, QUIC on 127.0.0.1:{}",
            ports[index]
        );
        println!(
            "[session] {name}: source id {}",
            status.source_id.as_deref().unwrap_or("(none)")
        );
        println!(
            "[token]   {name}: client token expires at {} (in {} s)",
            status.token_expires_at.unwrap_or(0),
            status.token_expires_in_secs.unwrap_or(0)
        );
        sockets.push(socket);
    }

    echo_through(&sockets[0]).await?;
    show_refusal(&sockets[1]).await?;

    if args.once {
        println!("demo finished: every step succeeded");
        return Ok(());
    }
    println!();
    println!("The daemons keep running until Ctrl-C. Try:");
    for (name, socket) in SERVERS.iter().zip(&sockets) {
        println!(
            "  curl --unix-socket {} http://h8/v1/status    # {name}",
            socket.display()
        );
    }
    println!(
        "  curl --unix-socket {} http://h8/v1/peers",
        sockets[0].display()
    );
    println!(
        "  h8 connect --socket {} server-b echo",
        sockets[0].display()
    );
    println!(
        "  logs: {}/*/h8d.log and {}/tokend/h8-tokend.log",
        demo.dir.display(),
        demo.dir.display()
    );
    // Ctrl-C, `kill` and a closed terminal all end the demo with a clean-up.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot wait for SIGTERM")?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot wait for SIGHUP")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot wait for Ctrl-C")?,
        _ = terminate.recv() => {}
        _ = hangup.recv() => {}
    }
    println!("stopping the demo and removing {}", demo.dir.display());
    Ok(())
}

async fn start_token_server(demo: &mut Demo, tokend: &Path) -> anyhow::Result<ReadyInfo> {
    let dir = demo.dir.join("tokend");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let output = Command::new(tokend)
        .args(["init", "--data-dir"])
        .arg(dir.join("data"))
        .output()
        .context("cannot run h8-tokend init")?;
    if !output.status.success() {
        bail!(
            "h8-tokend init failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    std::fs::write(dir.join("policy.toml"), POLICY).context("cannot write the demo policy")?;
    let config = dir.join("h8-tokend.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\npolicy = \"policy.toml\"\nlisten = \"127.0.0.1:0\"\nadmin_socket = \"admin.sock\"\n",
    )
    .context("cannot write the token server config")?;
    let ready_file = dir.join("ready.json");
    let log = dir.join("h8-tokend.log");
    demo.spawn(
        "h8-tokend",
        Command::new(tokend)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready_file),
        &log,
    )?;
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready_file.exists() {
        demo.check_running("h8-tokend", &log)?;
        if Instant::now() > deadline {
            bail!(
                "h8-tokend did not start within {START_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&ready_file).context("cannot read the ready file")?;
    let ready: ReadyInfo = serde_json::from_str(&text).context("invalid ready file")?;
    println!(
        "[tokend]  token server on https://{}, TLS pin {}",
        ready.listen, ready.tls_pin
    );
    Ok(ready)
}

/// Waits until the daemon's session is active; returns its status.
async fn wait_active(
    demo: &mut Demo,
    name: &str,
    socket: &Path,
    log: &Path,
) -> anyhow::Result<Status> {
    let client = ApiClient::new(socket);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        demo.check_running(name, log)?;
        if let Ok(status) = client.get::<Status>("/v1/status").await {
            if status.session_state == "active" {
                return Ok(status);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{name} has no active session after {START_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens server-a → server-b "echo" and checks the echoed bytes.
async fn echo_through(socket: &Path) -> anyhow::Result<()> {
    let client = ApiClient::new(socket);
    let (headers, mut stream) = client
        .upgrade("/v1/connect/server-b/echo")
        .await
        .context("server-a could not open echo on server-b")?;
    let peer = headers
        .get(crate::local_api::model::HEADER_PEER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let peers: PeerList = client.get("/v1/peers").await?;
    if let Some(info) = peers.peers.iter().find(|p| p.name == "server-b") {
        println!(
            "[connect] server-a -> server-b: QUIC connection {}, RTT {:.2} ms",
            info.state,
            info.rtt_ms.unwrap_or(0.0)
        );
    }
    stream
        .write_all(PAYLOAD)
        .await
        .context("cannot write to the stream")?;
    stream
        .shutdown()
        .await
        .context("cannot half-close the stream")?;
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut echoed))
        .await
        .context("timed out reading the echo")?
        .context("cannot read the echo")?;
    if echoed != PAYLOAD {
        bail!(
            "echo mismatch: sent {} bytes, received {} bytes {:?}",
            PAYLOAD.len(),
            echoed.len(),
            String::from_utf8_lossy(&echoed)
        );
    }
    println!(
        "[stream]  server-a -> {peer}/echo: sent {} bytes, {} bytes echoed back: {:?}",
        PAYLOAD.len(),
        echoed.len(),
        String::from_utf8_lossy(&echoed)
    );
    Ok(())
}

/// Opens server-b → server-a "echo", which the policy does not allow, and
/// prints the reason of the 403.
async fn show_refusal(socket: &Path) -> anyhow::Result<()> {
    let client = ApiClient::new(socket);
    match client.upgrade("/v1/connect/server-a/echo").await {
        Ok(_) => bail!("server-b -> server-a echo was accepted, but the policy allows only server-a -> server-b"),
        Err(error) => match error.downcast_ref::<ApiError>() {
            Some(api) if api.status.as_u16() == 403 => {
                println!(
                    "[reject]  server-b -> server-a/echo: {} {}: {}",
                    api.status.as_u16(),
                    api.code,
                    api.message
                );
                Ok(())
            }
            _ => Err(error.context("server-b -> server-a echo failed, but not with 403 Forbidden")),
        },
    }
}
