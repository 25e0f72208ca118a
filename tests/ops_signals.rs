//! systemd notifications and signals of `h8d` and `h8-tokend`, as real
//! processes with a fake `NOTIFY_SOCKET`: READY=1 only once every socket is
//! bound, no READY=1 when a bind fails, STATUS= shows a degraded session,
//! RELOADING=1 on SIGHUP, STOPPING=1 and exit status 0 on SIGTERM, and the
//! shutdown grace period for open streams.

mod common;
mod ops;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ops::{allow, node, sidecar_spec, NotifySocket};

const WAIT: Duration = Duration::from_secs(20);

/// Starts `h8d --config CONFIG` with `NOTIFY_SOCKET` set.
fn spawn_h8d(config: &Path, notify: &NotifySocket, name: &str) -> Process {
    let log = config.with_file_name("h8d-notify.log");
    Process::spawn(
        name,
        Command::new(H8D)
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify.path),
        log,
    )
}

/// Writes the config of a lone side-car daemon and returns its path.
fn lone_daemon_config(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let a = node(root, "server-a");
    let spec = sidecar_spec(root, &a, &[], "", &allow("server-b", &["echo"]));
    let dir = root.join("server-a");
    let config = dir.join("h8d.toml");
    std::fs::write(&config, Daemon::render(&spec, &dir)).expect("write config");
    (config, dir.join("api.sock"))
}

#[test]
fn h8d_ready_after_api_socket() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut notify = NotifySocket::bind(root.path());
    let (config, socket) = lone_daemon_config(root.path());
    let mut process = spawn_h8d(&config, &notify, "server-a");

    let ready = notify.wait_for("READY=1", WAIT).unwrap_or_else(|| {
        panic!(
            "no READY=1; messages {:?}\n{}",
            notify.messages,
            process.log_text()
        )
    });
    // The API must answer by the time systemd hears READY=1.
    let (status, body) = api(&socket, "GET", "/v1/status", "").expect("API answers after READY=1");
    assert_eq!(status, 200, "{body}");
    assert!(
        ready.lines().any(|l| l == "STATUS=ready"),
        "READY message: {ready:?}"
    );

    process.signal("TERM");
    let stopping = notify.wait_for("STOPPING=1", WAIT);
    assert!(
        stopping.is_some(),
        "no STOPPING=1; messages {:?}",
        notify.messages
    );
    assert_eq!(process.wait_exit(WAIT), Some(0), "{}", process.log_text());
}

#[test]
fn h8d_no_ready_when_bind_fails() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut notify = NotifySocket::bind(root.path());
    let (config, socket) = lone_daemon_config(root.path());
    // A live listener at the API path: another daemon seems to run.
    let _occupant = std::os::unix::net::UnixListener::bind(&socket).expect("bind occupant");
    let mut process = spawn_h8d(&config, &notify, "server-a");

    let code = process.wait_exit(WAIT);
    let log = process.log_text();
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit code {code:?}; log:\n{log}"
    );
    assert!(
        log.contains("another daemon is listening on"),
        "log names the cause:\n{log}"
    );
    assert!(
        log.contains(&socket.display().to_string()),
        "log names the socket:\n{log}"
    );
    while notify.recv(Duration::from_millis(200)).is_some() {}
    assert!(
        !notify.seen("READY=1"),
        "READY=1 sent although the bind failed: {:?}",
        notify.messages
    );
}

#[test]
fn h8d_status_degraded_without_token_server() {
    let root = tempfile::tempdir().expect("tempdir");
    let policy = "[applications.demo]\nservers = [\"server-a\"]\n";
    let mut server = TokenServer::start(&root.path().join("tokend"), policy, "");
    let spec = Daemon::token_server_config("server-a", free_udp_port(), &server, "demo");
    let mut daemon = Daemon::start(root.path(), &spec, Some(server.enrollment_code("server-a")));
    server.process.kill();
    daemon.process.kill();

    let mut notify = NotifySocket::bind(root.path());
    let mut process = spawn_h8d(&daemon.config, &notify, "server-a");
    let ready = notify.wait_for("READY=1", WAIT).unwrap_or_else(|| {
        panic!(
            "no READY=1; messages {:?}\n{}",
            notify.messages,
            process.log_text()
        )
    });
    let status_line = ready
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_default();
    assert!(status_line.contains("degraded"), "READY message: {ready:?}");
    process.signal("TERM");
    assert_eq!(process.wait_exit(WAIT), Some(0), "{}", process.log_text());
}

/// Initializes a token server data directory and writes its config with
/// `listen`; returns the config path.
fn tokend_config(root: &Path, listen: &str) -> std::path::PathBuf {
    let data = root.join("data");
    let output = Command::new(TOKEND)
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run h8-tokend init");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(
        root.join("policy.toml"),
        "[applications.demo]\nservers = [\"server-a\"]\n",
    )
    .expect("write policy");
    let config = root.join("h8-tokend.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"data\"\npolicy = \"policy.toml\"\nlisten = \"{listen}\"\nadmin_socket = \"admin.sock\"\n"),
    )
    .expect("write config");
    config
}

fn spawn_tokend(config: &Path, notify: &NotifySocket) -> Process {
    Process::spawn(
        "h8-tokend",
        Command::new(TOKEND)
            .args(["run", "--config"])
            .arg(config)
            .arg("--ready-file")
            .arg(config.with_file_name("ready.json"))
            .env("NOTIFY_SOCKET", &notify.path),
        config.with_file_name("tokend-notify.log"),
    )
}

#[test]
fn tokend_ready_reload_and_stop() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut notify = NotifySocket::bind(root.path());
    let config = tokend_config(root.path(), "127.0.0.1:0");
    let mut process = spawn_tokend(&config, &notify);

    let ready = notify.wait_for("READY=1", WAIT).unwrap_or_else(|| {
        panic!(
            "no READY=1; messages {:?}\n{}",
            notify.messages,
            process.log_text()
        )
    });
    assert!(
        root.path().join("admin.sock").exists(),
        "admin socket missing at READY=1"
    );
    let info: h8::token_server::run::ReadyInfo = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("ready.json")).expect("ready file at READY=1"),
    )
    .expect("parse ready file");
    std::net::TcpStream::connect(&info.listen).expect("HTTPS port accepts at READY=1");
    assert!(
        ready.contains("STATUS=serving on"),
        "READY message: {ready:?}"
    );

    process.signal("HUP");
    assert!(
        notify.wait_for("RELOADING=1", WAIT).is_some(),
        "no RELOADING=1: {:?}",
        notify.messages
    );
    assert!(
        notify.wait_for("READY=1", WAIT).is_some(),
        "no READY=1 after reload: {:?}",
        notify.messages
    );

    process.signal("TERM");
    assert!(
        notify.wait_for("STOPPING=1", WAIT).is_some(),
        "no STOPPING=1: {:?}",
        notify.messages
    );
    assert_eq!(process.wait_exit(WAIT), Some(0), "{}", process.log_text());
}

#[test]
fn tokend_no_ready_when_bind_fails() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut notify = NotifySocket::bind(root.path());
    let occupant = TcpListener::bind("127.0.0.1:0").expect("bind occupant");
    let listen = occupant.local_addr().expect("address").to_string();
    let config = tokend_config(root.path(), &listen);
    let mut process = spawn_tokend(&config, &notify);

    let code = process.wait_exit(WAIT);
    let log = process.log_text();
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit code {code:?}; log:\n{log}"
    );
    assert!(
        log.contains(&format!("cannot listen on {listen}")),
        "log names the address:\n{log}"
    );
    while notify.recv(Duration::from_millis(200)).is_some() {}
    assert!(
        !notify.seen("READY=1"),
        "READY=1 sent although the bind failed: {:?}",
        notify.messages
    );
}

#[test]
fn sigterm_drains_then_closes_streams() {
    let root = tempfile::tempdir().expect("tempdir");
    let echo = echo_server();
    let a = node(root.path(), "server-a");
    let b = node(root.path(), "server-b");
    let services = format!("[services.echo]\ntarget = \"tcp:127.0.0.1:{echo}\"\n");
    let spec_a = sidecar_spec(root.path(), &a, &[&b], "", &allow("server-b", &["echo"]));
    let spec_b = sidecar_spec(
        root.path(),
        &b,
        &[&a],
        &services,
        &allow("server-a", &["echo"]),
    );
    let daemon_b = Daemon::start(root.path(), &spec_b, None);
    let daemon_a = Daemon::start(root.path(), &spec_a, None);
    let mut daemon_b = daemon_b;

    // Two open streams: one stays open, one finishes during the grace period.
    let mut held = daemon_a.connect("server-b", "echo").expect("held stream");
    held.write_all(b"ping").expect("write");
    let mut reply = [0u8; 4];
    held.read_exact(&mut reply).expect("echo before SIGTERM");
    assert_eq!(&reply, b"ping");
    let mut finishing = daemon_a
        .connect("server-b", "echo")
        .expect("finishing stream");
    finishing.write_all(b"first half ").expect("write");

    let sent = Instant::now();
    daemon_b.process.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));

    // New streams are rejected at once, with a reason.
    match daemon_a.connect("server-b", "echo") {
        Ok(_) => panic!("a new stream was accepted during the grace period"),
        Err((status, body)) => {
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("shutting"), "{body}");
        }
    }
    // The daemon's own API no longer accepts connections.
    assert!(
        api(&daemon_b.socket, "GET", "/v1/status", "").is_err(),
        "API of server-b still answers"
    );

    // A stream that ends during the grace period completes byte-exact.
    let finished = round_trip(finishing, b"second half");
    assert_eq!(finished, b"first half second half");

    // The held stream is closed at the end of the grace period (3 s in the
    // harness config), and the daemon exits 0.
    let code = daemon_b.process.wait_exit(Duration::from_secs(15));
    let elapsed = sent.elapsed();
    assert_eq!(code, Some(0), "{}", daemon_b.process.log_text());
    assert!(
        elapsed >= Duration::from_millis(2500),
        "exited after {elapsed:?}, before the grace period ended"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "exited after {elapsed:?}, long after the grace period"
    );
    let log_b = daemon_b.process.log_text();
    assert!(
        log_b.contains("grace period over"),
        "server-b log:\n{log_b}"
    );

    // The held stream ends without its data: the far side's reason is in
    // server-a's log, because a Unix socket cannot carry it.
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = held.write_all(b"after shutdown");
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    assert!(rest.is_empty(), "data echoed after the shutdown: {rest:?}");
    wait_for(
        "server-a to log the reason",
        Duration::from_secs(10),
        || daemon_a.process.log_text().contains("daemon shutting down"),
    );
}
