//! Side-car daemons as real processes on 127.0.0.1 with no token server:
//! pinned keys, local policy, machine-token rotation, the external
//! authorizer and its fallbacks, and reload by SIGHUP.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const A: &str = "server-a";
const B: &str = "server-b";
const C: &str = "server-c";

/// Identity keys, ports and a shared echo backend for a set of daemons.
struct Setup {
    root: tempfile::TempDir,
    keys: BTreeMap<String, String>,
    ports: BTreeMap<String, u16>,
    echo: u16,
}

impl Setup {
    /// Creates each daemon's identity key with `h8 keygen --state-dir`.
    fn new(names: &[&str]) -> Setup {
        let root = tempfile::tempdir().expect("tempdir");
        let mut keys = BTreeMap::new();
        let mut ports = BTreeMap::new();
        for name in names {
            let state = root.path().join(name).join("state");
            let output = Command::new(H8)
                .args(["keygen", "--state-dir"])
                .arg(&state)
                .output()
                .expect("run h8 keygen");
            assert!(
                output.status.success(),
                "h8 keygen failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let key = String::from_utf8(output.stdout)
                .expect("UTF-8")
                .trim()
                .to_owned();
            keys.insert(name.to_string(), key);
            ports.insert(name.to_string(), free_udp_port());
        }
        Setup {
            root,
            keys,
            ports,
            echo: echo_server(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Builds a side-car spec for `name` that pins the keys of `pinned` and offers
    /// services `echo` and `admin` (both to the echo backend). Writes
    /// `policy` to the daemon's policy file.
    fn spec(&self, name: &str, pinned: &[&str], policy: &str, sidecar_extra: &str) -> DaemonSpec {
        self.write_policy(name, policy);
        DaemonSpec {
            name: name.to_owned(),
            port: self.ports[name],
            mode: format!("mode = \"side-car\"\n\n[sidecar]\npolicy = \"policy.toml\"\n{sidecar_extra}"),
            peers: pinned
                .iter()
                .map(|peer| (peer.to_string(), self.ports[*peer], Some(self.keys[*peer].clone())))
                .collect(),
            services: format!(
                "[services.echo]\ntarget = \"tcp:127.0.0.1:{0}\"\n\n[services.admin]\ntarget = \"tcp:127.0.0.1:{0}\"\n",
                self.echo
            ),
            extra: String::new(),
        }
    }

    fn write_policy(&self, name: &str, policy: &str) {
        std::fs::create_dir_all(self.dir(name)).expect("create daemon dir");
        std::fs::write(self.dir(name).join("policy.toml"), policy).expect("write policy");
    }

    fn start(&self, spec: &DaemonSpec) -> Daemon {
        Daemon::start(self.root.path(), spec, None)
    }
}

/// Rewrites a running daemon's config from `spec` and sends SIGHUP.
/// Rewrites the config, sends SIGHUP and waits until the daemon has
/// applied or rejected it, so later checks cannot race the reload.
fn reload(daemon: &Daemon, spec: &DaemonSpec) {
    let outcomes = |daemon: &Daemon| {
        let log = daemon.process.log_text();
        log.matches("configuration reloaded").count()
            + log.matches("configuration reload rejected").count()
    };
    let before = outcomes(daemon);
    std::fs::write(&daemon.config, Daemon::render(spec, &daemon.dir)).expect("write config");
    daemon.process.signal("HUP");
    wait_for(
        "the daemon to finish the reload",
        Duration::from_secs(10),
        || outcomes(daemon) > before,
    );
}

fn allow(from: &str, services: &[&str]) -> String {
    let services: Vec<String> = services.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[[allow]]\nfrom = {from:?}\nservices = [{}]\n\n",
        services.join(", ")
    )
}

fn assert_echo(daemon: &Daemon, peer: &str, service: &str) {
    let stream = daemon
        .connect(peer, service)
        .unwrap_or_else(|(status, body)| {
            panic!("{} -> {peer}/{service}: {status} {body}", daemon.name)
        });
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(stream, &payload), payload);
}

fn refusal(daemon: &Daemon, peer: &str, service: &str) -> (u16, String) {
    match daemon.connect(peer, service) {
        Ok(_) => panic!("{} -> {peer}/{service} was accepted", daemon.name),
        Err(refusal) => refusal,
    }
}

fn is_refused_with(daemon: &Daemon, peer: &str, service: &str, code: &str) -> bool {
    matches!(daemon.connect(peer, service), Err((403, body)) if body.contains(code))
}

fn echo_works(daemon: &Daemon, peer: &str, service: &str) -> bool {
    match daemon.connect(peer, service) {
        Ok(stream) => round_trip(stream, b"ping") == b"ping",
        Err(_) => false,
    }
}

fn peer_state(daemon: &Daemon, peer: &str) -> Option<String> {
    let (status, body) = api(&daemon.socket, "GET", "/v1/peers", "").expect("peers request");
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("peers JSON");
    list["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .find(|p| p["name"] == peer)
        .map(|p| p["state"].as_str().unwrap_or_default().to_owned())
}

/// Starts three daemons: server-a and server-b allow each other `echo`,
/// and server-c is pinned by both but has no rule on either.
fn trio(sidecar_extra: &str) -> (Setup, Daemon, Daemon, Daemon) {
    let setup = Setup::new(&[A, B, C]);
    let a = setup.start(&setup.spec(A, &[B, C], &allow(B, &["echo"]), sidecar_extra));
    let b = setup.start(&setup.spec(B, &[A, C], &allow(A, &["echo"]), sidecar_extra));
    let c = setup.start(&setup.spec(C, &[A, B], &allow(A, &["echo"]), sidecar_extra));
    (setup, a, b, c)
}

#[test]
fn allowed_streams_carry_data_both_ways() {
    let (_setup, a, b, _c) = trio("");
    assert_echo(&a, B, "echo");
    assert_echo(&b, A, "echo");
    assert_echo(&a, C, "echo");
    let status = a.status();
    assert_eq!(status["session_state"], "active", "{status}");
}

#[test]
fn unpinned_peer_is_rejected_at_handshake() {
    let setup = Setup::new(&[A, B, C]);
    // server-b pins server-a under a key that is not server-a's, and does
    // not list server-c at all. Both pin server-b correctly.
    let mut b_spec = setup.spec(B, &[], &(allow(A, &["echo"]) + &allow(C, &["echo"])), "");
    let wrong_key = setup.keys[C].clone();
    b_spec
        .peers
        .push((A.to_owned(), setup.ports[A], Some(wrong_key)));
    let b = setup.start(&b_spec);
    let a = setup.start(&setup.spec(A, &[B], "", ""));
    let c = setup.start(&setup.spec(C, &[B], "", ""));

    let (status, body) = refusal(&a, B, "echo");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not_pinned"), "{body}");
    assert!(body.contains("server-a"), "{body}");

    let (status, body) = refusal(&c, B, "echo");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not_pinned"), "{body}");
    assert!(body.contains("server-c"), "{body}");

    // The refusal happened at the handshake: no connection was kept.
    assert_ne!(peer_state(&a, B).as_deref(), Some("connected"));
    assert!(b.log_text_contains("incoming handshake failed"));
}

#[test]
fn pinned_peer_without_rule_is_denied_per_stream() {
    let (_setup, a, _b, c) = trio("");
    let (status, body) = refusal(&c, B, "echo");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("policy_denied"), "{body}");
    assert!(body.contains("no rule allows \\\"server-c\\\""), "{body}");

    // A service outside server-a's rule is denied the same way.
    let (status, body) = refusal(&a, B, "admin");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("policy_denied"), "{body}");
    assert!(body.contains("admin"), "{body}");

    // The refusal is per stream: the connection stays up and serves others.
    assert_eq!(peer_state(&c, B).as_deref(), Some("connected"));
    assert_echo(&a, C, "echo");
    assert_echo(&a, B, "echo");
}

#[test]
fn token_rotation_under_load_fails_no_stream() {
    // Machine tokens live 6 s with no clock skew allowed, so each daemon
    // rotates about every 4 s and a late token update would expire streams.
    // The 2 s margin keeps a loaded 2-core CI machine from expiring tokens
    // through scheduling delay alone.
    let (_setup, a, b, _c) = trio("machine_token_lifetime_secs = 6\nleeway_secs = 0\n");
    let a = Arc::new(a);
    let b = Arc::new(b);
    let failures = Arc::new(Mutex::new(Vec::new()));
    let streams = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let mut workers = Vec::new();
    for (from, to) in [(a.clone(), B), (b.clone(), A)] {
        let failures = failures.clone();
        let streams = streams.clone();
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match from.connect(to, "echo") {
                    Ok(stream) => {
                        let reply = round_trip(stream, b"rotation");
                        if reply != b"rotation" {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{} -> {to}: short reply {reply:?}", from.name));
                        }
                    }
                    Err((status, body)) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{} -> {to}: {status} {body}", from.name));
                    }
                }
                streams.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(14));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("load thread");
    }

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed streams, first: {:?}",
        failures.len(),
        failures.first()
    );
    let opened = streams.load(Ordering::Relaxed);
    assert!(opened >= 50, "only {opened} streams in 14 s");
    for daemon in [&a, &b] {
        let rotations = daemon
            .process
            .log_text()
            .matches("machine token rotated")
            .count();
        assert!(
            rotations >= 3,
            "{} rotated {rotations} times in 14 s",
            daemon.name
        );
    }
}

/// Starts the example authorizer from examples/, serving `allow_list` on `socket`.
fn start_authorizer(dir: &Path, socket: &Path, allow_list: &str) -> Process {
    let allow = dir.join("authorizer-allow.json");
    std::fs::write(&allow, allow_list).expect("write allow list");
    // A killed authorizer leaves its socket file behind.
    let _ = std::fs::remove_file(socket);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/authorizer.py");
    let process = Process::spawn(
        "authorizer",
        Command::new("python3")
            .arg(script)
            .arg("--socket")
            .arg(socket)
            .arg("--allow")
            .arg(&allow),
        dir.join("authorizer.log"),
    );
    wait_for("the authorizer socket", Duration::from_secs(20), || {
        socket.exists()
    });
    process
}

fn authorizer_section(socket: &Path, cache_ttl_secs: u64, fallback: &str) -> String {
    format!(
        "\n[sidecar.authorizer]\nsocket = \"{}\"\ncache_ttl_secs = {cache_ttl_secs}\ntimeout_ms = 2000\nfallback = \"{fallback}\"\n",
        socket.display()
    )
}

#[test]
fn external_authorizer_decides_and_falls_back() {
    let setup = Setup::new(&[A, B]);
    let socket = setup.root.path().join("authz.sock");
    let allow_list = r#"{"allow": [{"peer": "server-a", "services": ["echo"]}]}"#;
    let mut authorizer = start_authorizer(setup.root.path(), &socket, allow_list);

    // server-b's local policy allows both services, the authorizer only echo.
    let b_policy = allow(A, &["echo", "admin"]);
    let mut b_spec = setup.spec(B, &[A], &b_policy, &authorizer_section(&socket, 0, "deny"));
    let b = setup.start(&b_spec);
    let a = setup.start(&setup.spec(A, &[B], "", ""));

    // Both must allow.
    assert_echo(&a, B, "echo");
    let (status, body) = refusal(&a, B, "admin");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("policy_denied"), "{body}");
    assert!(body.contains("external authorizer"), "{body}");
    assert!(body.contains("no allow entry"), "{body}");

    // Authorizer down, fallback deny.
    authorizer.kill();
    let (status, body) = refusal(&a, B, "echo");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("authorizer_unavailable"), "{body}");

    // Authorizer down, fallback local-policy: the local policy alone decides.
    b_spec.mode = setup
        .spec(
            B,
            &[A],
            &b_policy,
            &authorizer_section(&socket, 0, "local-policy"),
        )
        .mode;
    reload(&b, &b_spec);
    wait_for(
        "fallback local-policy to apply",
        Duration::from_secs(10),
        || echo_works(&a, B, "echo"),
    );
    assert_echo(&a, B, "admin");

    // Cached decisions outlive the authorizer for cache_ttl_secs.
    let restarted = start_authorizer(setup.root.path(), &socket, allow_list);
    b_spec.mode = setup
        .spec(B, &[A], &b_policy, &authorizer_section(&socket, 60, "deny"))
        .mode;
    reload(&b, &b_spec);
    wait_for("fallback deny to apply", Duration::from_secs(10), || {
        is_refused_with(&a, B, "admin", "policy_denied")
    });
    assert_echo(&a, B, "echo");
    drop(restarted);
    assert_echo(&a, B, "echo");
    assert!(
        is_refused_with(&a, B, "admin", "policy_denied"),
        "cached deny"
    );

    // A reload drops the cache.
    reload(&b, &b_spec);
    wait_for(
        "the reload to drop cached decisions",
        Duration::from_secs(10),
        || is_refused_with(&a, B, "echo", "authorizer_unavailable"),
    );
    assert!(b.log_text_contains("external authorizer unavailable"));
}

#[test]
fn mixed_modes_fail_fast_with_mode_mismatch() {
    let root = tempfile::tempdir().expect("tempdir");
    let policy = "[applications.inventory]\nservers = [\"server-t\"]\n";
    let server = TokenServer::start(&root.path().join("tokend"), policy, "");
    let setup = Setup::new(&[A]);
    let token_port = free_udp_port();
    let token_key = pregenerate_identity(&root.path().join("server-t").join("state"));

    let mut sidecar_spec = setup.spec(A, &[], &allow("server-t", &["echo"]), "");
    sidecar_spec
        .peers
        .push(("server-t".to_owned(), token_port, Some(token_key)));
    let a = setup.start(&sidecar_spec);

    let mut token_spec = Daemon::token_server_config("server-t", token_port, &server, "inventory");
    token_spec.peers.push((A.to_owned(), setup.ports[A], None));
    token_spec.services = format!(
        "[services.echo]\ntarget = \"tcp:127.0.0.1:{}\"\n",
        setup.echo
    );
    let t = Daemon::start(
        root.path(),
        &token_spec,
        Some(server.enrollment_code("server-t")),
    );
    wait_for("server-t to get its token", Duration::from_secs(20), || {
        t.status()["session_state"] == "active"
    });

    for (from, to) in [(&a, "server-t"), (&t, A)] {
        let started = Instant::now();
        let (status, body) = refusal(from, to, "echo");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("mode_mismatch"), "{body}");
        assert!(body.contains("side-car"), "{body}");
        assert!(body.contains("token-server"), "{body}");
    }
}

#[test]
fn sighup_policy_edit_changes_decisions() {
    let (setup, a, b, _c) = trio("");
    assert_echo(&a, B, "echo");

    setup.write_policy(B, &allow(A, &["admin"]));
    b.process.signal("HUP");
    wait_for(
        "the new policy to deny echo",
        Duration::from_secs(10),
        || is_refused_with(&a, B, "echo", "policy_denied"),
    );
    assert_echo(&a, B, "admin");
    // The policy changed on the live connection, which was not re-dialed.
    assert_eq!(peer_state(&a, B).as_deref(), Some("connected"));

    // A policy with an error keeps the running one.
    setup.write_policy(B, "[[allow]]\nfrom = \"server-a\"\n");
    b.process.signal("HUP");
    wait_for(
        "the rejected reload to be logged",
        Duration::from_secs(10),
        || b.log_text_contains("configuration reload rejected"),
    );
    assert_echo(&a, B, "admin");
}

#[test]
fn sighup_removing_peer_closes_its_connection() {
    let (setup, a, b, _c) = trio("");
    let mut stream = a
        .connect(B, "echo")
        .unwrap_or_else(|(s, body)| panic!("{s} {body}"));
    stream.write_all(b"before").expect("write");
    let mut reply = [0u8; 6];
    stream.read_exact(&mut reply).expect("echo before reload");
    assert_eq!(&reply, b"before");

    reload(&b, &setup.spec(B, &[C], &allow(A, &["echo"]), ""));

    // The open stream ends when server-b closes the connection.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = Vec::new();
    let ended = match stream.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(ended, "the stream stayed open after the peer was removed");

    // A new connection from server-a is refused at the handshake.
    wait_for("server-a to be refused", Duration::from_secs(10), || {
        is_refused_with(&a, B, "echo", "not_pinned")
    });
    assert_eq!(peer_state(&b, A), None, "server-a is still listed");
    assert!(b.log_text_contains("closing connection"));
}

trait LogText {
    fn log_text_contains(&self, text: &str) -> bool;
}

impl LogText for Daemon {
    fn log_text_contains(&self, text: &str) -> bool {
        self.process.log_text().contains(text)
    }
}
