//! Log formats of `h8d` and `h8-tokend`: `--log-format json` writes one JSON
//! object per line, the journal format (`JOURNAL_STREAM` set) has no
//! timestamps, and a full token-server-mode run logs no secret.

mod common;
mod ops;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use ops::{allow, node, sidecar_spec};

const WAIT: Duration = Duration::from_secs(20);

/// Writes a lone side-car daemon config; returns it and its API socket.
fn lone_daemon(root: &Path) -> (PathBuf, PathBuf) {
    let a = node(root, "server-a");
    let spec = sidecar_spec(root, &a, &[], "", &allow("server-b", &["echo"]));
    let dir = root.join("server-a");
    let config = dir.join("h8d.toml");
    std::fs::write(&config, Daemon::render(&spec, &dir)).expect("write config");
    (config, dir.join("api.sock"))
}

/// Runs h8d until its API answers, stops it with SIGTERM and returns its log.
fn h8d_log(root: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let (config, socket) = lone_daemon(root);
    let mut command = Command::new(H8D);
    command.arg("--config").arg(&config).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut process = Process::spawn("server-a", &mut command, root.join("h8d-format.log"));
    wait_for("the API socket", WAIT, || {
        api(&socket, "GET", "/v1/status", "").is_ok()
    });
    process.signal("TERM");
    assert_eq!(process.wait_exit(WAIT), Some(0), "{}", process.log_text());
    process.log_text()
}

fn assert_json_lines(log: &str) {
    assert!(!log.trim().is_empty(), "empty log");
    for line in log.lines().filter(|line| !line.is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line is not JSON ({e}): {line}"));
        assert!(value.is_object(), "line is not a JSON object: {line}");
        assert!(value.get("timestamp").is_some(), "no timestamp: {line}");
        assert!(value.get("level").is_some(), "no level: {line}");
        assert!(value.get("message").is_some(), "no message: {line}");
    }
}

#[test]
fn h8d_json_one_object_per_line() {
    let root = tempfile::tempdir().expect("tempdir");
    let log = h8d_log(root.path(), &["--log-format", "json"], &[]);
    assert_json_lines(&log);
    assert!(log.contains("\"message\":\"h8d started\""), "{log}");
    assert!(log.contains("\"message\":\"h8d stopped\""), "{log}");
}

#[test]
fn h8d_journal_format_has_no_timestamps() {
    let root = tempfile::tempdir().expect("tempdir");
    let log = h8d_log(root.path(), &[], &[("JOURNAL_STREAM", "8:12345")]);
    assert!(log.contains("h8d started"), "{log}");
    for line in log.lines().filter(|line| !line.is_empty()) {
        let first = line.split_whitespace().next().unwrap_or_default();
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&first),
            "journal line does not start with its level: {line}"
        );
        assert!(
            !line.contains("\u{1b}["),
            "colour codes in a journal line: {line}"
        );
    }
}

#[test]
fn h8d_config_log_level_applies() {
    // With RUST_LOG unset, log_level from the config file sets the filter.
    let root = tempfile::tempdir().expect("tempdir");
    let (config, socket) = lone_daemon(root.path());
    let text = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(&config, format!("log_level = \"warn\"\n{text}")).expect("write config");
    let log_path = root.path().join("quiet.log");
    let file = std::fs::File::create(&log_path).expect("create log");
    let mut child = Command::new(H8D)
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(file)
        .spawn()
        .expect("start h8d");
    wait_for("the API socket", WAIT, || {
        api(&socket, "GET", "/v1/status", "").is_ok()
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait for h8d");
    assert!(status.success(), "h8d exit status {status}");
    let log = std::fs::read_to_string(&log_path).expect("read log");
    assert!(
        !log.contains("INFO"),
        "INFO lines with log_level = \"warn\":\n{log}"
    );
}

#[test]
fn tokend_json_one_object_per_line() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let init = Command::new(TOKEND)
        .args(["--log-format", "json", "init", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run h8-tokend init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    std::fs::write(
        root.path().join("policy.toml"),
        "[applications.demo]\nservers = [\"server-a\"]\n",
    )
    .expect("write policy");
    let ready = root.path().join("ready.json");
    let mut process = Process::spawn(
        "h8-tokend",
        Command::new(TOKEND)
            .args([
                "run",
                "--log-format",
                "json",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--policy")
            .arg(root.path().join("policy.toml"))
            .arg("--admin-socket")
            .arg(root.path().join("admin.sock"))
            .arg("--ready-file")
            .arg(&ready),
        root.path().join("tokend.log"),
    );
    wait_for("the ready file", WAIT, || ready.exists());
    process.signal("TERM");
    assert_eq!(process.wait_exit(WAIT), Some(0), "{}", process.log_text());
    let log = process.log_text();
    assert_json_lines(&log);
    assert!(log.contains("\"message\":\"h8-tokend started\""), "{log}");
}

/// Every file under `dir` whose text contains a PEM private key.
fn private_keys(dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            private_keys(&path, found);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            if text.contains("PRIVATE KEY") {
                found.push(text);
            }
        }
    }
}

/// The base64 lines of a PEM block, which are the secret part.
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[test]
fn token_server_run_logs_no_secret() {
    let root = tempfile::tempdir().expect("tempdir");
    let policy = "[applications.demo]\nservers = [\"server-a\", \"server-b\"]\n\n[[applications.demo.allow]]\nfrom = \"server-a\"\nto = \"server-b\"\nservices = [\"echo\"]\n";
    let server = TokenServer::start(&root.path().join("tokend"), policy, "");
    let echo = echo_server();
    let ports = [free_udp_port(), free_udp_port()];
    let mut codes = Vec::new();
    let mut daemons = Vec::new();
    for (i, name) in ["server-a", "server-b"].iter().enumerate() {
        let mut spec = Daemon::token_server_config(name, ports[i], &server, "demo");
        let other = 1 - i;
        spec.peers = vec![(
            ["server-a", "server-b"][other].to_owned(),
            ports[other],
            None,
        )];
        spec.services = format!("[services.echo]\ntarget = \"tcp:127.0.0.1:{echo}\"\n");
        let code = server.enrollment_code(name);
        codes.push(code.clone());
        daemons.push(Daemon::start(root.path(), &spec, Some(code)));
    }
    let stream = daemons[0]
        .connect("server-b", "echo")
        .expect("stream a -> b");
    assert_eq!(round_trip(stream, b"secret-free"), b"secret-free");
    let (status, body) = api(&daemons[0].socket, "GET", "/v1/token", "").expect("token claims");
    assert_eq!(status, 200, "{body}");

    let mut secrets: Vec<(String, String)> = codes
        .iter()
        .map(|code| ("enrollment code".to_owned(), code.clone()))
        .collect();
    for daemon in &daemons {
        let saved = h8::daemon::session::SavedSession::load(&daemon.dir.join("state"))
            .expect("saved session");
        let token = saved.token.expect("saved token");
        assert!(token.len() > 40, "token text too short to search for");
        secrets.push((format!("token of {}", daemon.name), token));
    }
    let mut keys = Vec::new();
    private_keys(root.path(), &mut keys);
    assert!(
        keys.len() >= 3,
        "found {} private key files, expected the identity, signing and TLS keys",
        keys.len()
    );
    for key in &keys {
        for line in pem_body_lines(key) {
            secrets.push(("private key PEM".to_owned(), line));
        }
    }

    let mut logs = vec![("h8-tokend".to_owned(), server.process.log_text())];
    for daemon in &daemons {
        logs.push((daemon.name.clone(), daemon.process.log_text()));
    }
    for (name, log) in &logs {
        assert!(!log.is_empty(), "empty log of {name}");
        assert!(
            !log.contains("PRIVATE KEY"),
            "log of {name} contains a PEM private key"
        );
        for (what, secret) in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "log of {name} contains a {what}"
            );
        }
    }
}
