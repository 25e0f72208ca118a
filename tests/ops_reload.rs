//! SIGHUP reload of a side-car `h8d`: a peer added by reload becomes
//! reachable, a removed one goes, a large transfer to a third peer continues
//! byte-exact on its original connection, and an invalid config on reload
//! keeps the running one.

mod common;
mod ops;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use common::*;
use ops::{allow, node, sidecar_spec};
use sha2::{Digest as _, Sha256};

const WAIT: Duration = Duration::from_secs(20);
const CHUNK: usize = 1024 * 1024;
const CHUNKS: usize = 48;

/// Value of `h8_handshakes_total{result="ok"}` from the daemon's metrics.
fn handshakes_ok(daemon: &Daemon) -> f64 {
    let (status, body) = api(&daemon.socket, "GET", "/metrics", "").expect("metrics request");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find(|line| line.starts_with("h8_handshakes_total{result=\"ok\"}"))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no handshake counter in:\n{body}"))
}

fn reload(daemon: &Daemon, config_text: &str, expected_log: &str, count_before: usize) {
    std::fs::write(&daemon.config, config_text).expect("write config");
    daemon.process.signal("HUP");
    wait_for(
        &format!("{expected_log:?} in the log of {}", daemon.name),
        WAIT,
        || daemon.process.log_text().matches(expected_log).count() > count_before,
    );
}

#[test]
fn reload_changes_peers_keeps_transfer() {
    let root = tempfile::tempdir().expect("tempdir");
    let echo = echo_server();
    let services = format!("[services.echo]\ntarget = \"tcp:127.0.0.1:{echo}\"\n");
    let a = node(root.path(), "server-a");
    let b = node(root.path(), "server-b");
    let c = node(root.path(), "server-c");
    let allow_a = allow("server-a", &["echo"]);
    let daemon_b = Daemon::start(
        root.path(),
        &sidecar_spec(root.path(), &b, &[&a], &services, &allow_a),
        None,
    );
    let _daemon_c = Daemon::start(
        root.path(),
        &sidecar_spec(root.path(), &c, &[&a], &services, &allow_a),
        None,
    );
    let spec_a = sidecar_spec(root.path(), &a, &[&b], "", "");
    let mut daemon_a = Daemon::start(root.path(), &spec_a, None);
    let dir_a = root.path().join("server-a");
    let with_c = Daemon::render(&sidecar_spec(root.path(), &a, &[&b, &c], "", ""), &dir_a);
    let without_c = Daemon::render(&spec_a, &dir_a);

    // A 48 MiB transfer to server-b, paced so that it spans every reload.
    let stream = daemon_a
        .connect("server-b", "echo")
        .expect("stream to server-b");
    let handshakes_b = handshakes_ok(&daemon_b);
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        for i in 0..CHUNKS {
            let chunk: Vec<u8> = (0..CHUNK).map(|j| ((i * 7 + j * 13) % 251) as u8).collect();
            hash.update(&chunk);
            writer.write_all(&chunk).expect("write chunk");
            std::thread::sleep(Duration::from_millis(60));
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        hash.finalize()
    });
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let receiver = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = reader.read(&mut buffer).expect("read echo");
            if n == 0 {
                break;
            }
            hash.update(&buffer[..n]);
            total += n;
        }
        (total, hash.finalize())
    });

    // Add server-c.
    let reloaded = daemon_a
        .process
        .log_text()
        .matches("configuration reloaded")
        .count();
    reload(&daemon_a, &with_c, "configuration reloaded", reloaded);
    assert_eq!(daemon_a.status()["peers"], 2);
    let to_c = daemon_a
        .connect("server-c", "echo")
        .expect("stream to the added peer");
    assert_eq!(round_trip(to_c, b"hello c"), b"hello c");

    // Remove server-c again.
    reload(
        &daemon_a,
        &without_c,
        "configuration reloaded",
        reloaded + 1,
    );
    assert_eq!(daemon_a.status()["peers"], 1);
    match daemon_a.connect("server-c", "echo") {
        Ok(_) => panic!("stream to a removed peer was accepted"),
        Err((status, body)) => assert_eq!(status, 404, "{body}"),
    }

    assert!(
        !sender.is_finished(),
        "the transfer ended before the reloads; pace it slower"
    );

    // An invalid config is rejected and the running one stays.
    let rejected = daemon_a
        .process
        .log_text()
        .matches("configuration reload rejected")
        .count();
    reload(
        &daemon_a,
        "name = \"server-a\"\nlisten = 7\n",
        "configuration reload rejected",
        rejected,
    );
    let log = daemon_a.process.log_text();
    let line = log
        .lines()
        .rfind(|line| line.contains("configuration reload rejected"))
        .unwrap_or_default();
    assert!(
        line.contains("h8d.toml"),
        "the log line names the file: {line}"
    );
    assert!(
        line.contains("h8d.toml:2:"),
        "the log line names the line: {line}"
    );
    assert_eq!(daemon_a.status()["peers"], 1);
    let again = daemon_a
        .connect("server-b", "echo")
        .expect("stream after a rejected reload");
    assert_eq!(round_trip(again, b"still here"), b"still here");

    let sent = sender.join().expect("sender thread");
    let (total, received) = receiver.join().expect("receiver thread");
    assert_eq!(total, CHUNK * CHUNKS, "bytes echoed");
    assert_eq!(sent, received, "SHA-256 of the echoed bytes");
    assert_eq!(
        handshakes_ok(&daemon_b),
        handshakes_b,
        "server-b saw a new handshake: the connection was replaced"
    );
    assert!(daemon_a.process.is_running(), "server-a exited");
}
