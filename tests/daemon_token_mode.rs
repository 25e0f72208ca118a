//! Token server and session daemons as real processes on 127.0.0.1: streams
//! between authorized peers, and each kind of refusal with its own reason.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

const POLICY: &str = r#"
[applications.inventory]
servers = ["server-a", "server-b", "server-c"]

[[applications.inventory.allow]]
from = "server-a"
to = "server-b"
services = ["echo"]

[[applications.inventory.allow]]
from = "server-b"
to = "server-a"
services = ["echo"]
"#;

// Fields drop in order: the processes go first, so their logs can still be
// printed from the temporary directory when a test fails.
struct Cluster {
    server: TokenServer,
    a: Daemon,
    b: Daemon,
    c: Daemon,
    _root: tempfile::TempDir,
}

fn echo_service(port: u16) -> String {
    format!("[services.echo]\ntarget = \"tcp:127.0.0.1:{port}\"\n\n[services.admin]\ntarget = \"tcp:127.0.0.1:{port}\"\n")
}

fn cluster(tokend_extra: &str, daemon_extra: &str) -> Cluster {
    let root = tempfile::tempdir().expect("tempdir");
    let server = TokenServer::start(&root.path().join("tokend"), POLICY, tokend_extra);
    let echo = echo_server();
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let names = ["server-a", "server-b", "server-c"];
    let mut daemons = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut spec = Daemon::token_server_config(name, ports[i], &server, "inventory");
        spec.mode.push_str(daemon_extra);
        spec.peers = names
            .iter()
            .zip(ports)
            .filter(|(n, _)| *n != name)
            .map(|(n, p)| (n.to_string(), p, None))
            .collect();
        spec.services = echo_service(echo);
        let code = server.enrollment_code(name);
        daemons.push(Daemon::start(root.path(), &spec, Some(code)));
    }
    let c = daemons.pop().expect("c");
    let b = daemons.pop().expect("b");
    let a = daemons.pop().expect("a");
    Cluster {
        server,
        a,
        b,
        c,
        _root: root,
    }
}

fn assert_echo(daemon: &Daemon, peer: &str) {
    let stream = daemon
        .connect(peer, "echo")
        .unwrap_or_else(|(status, body)| panic!("{} -> {peer}: {status} {body}", daemon.name));
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(stream, &payload), payload);
}

fn refusal(daemon: &Daemon, peer: &str, service: &str) -> (u16, String) {
    match daemon.connect(peer, service) {
        Ok(_) => panic!("{} -> {peer}/{service} was accepted", daemon.name),
        Err(refusal) => refusal,
    }
}

#[test]
fn authorized_streams_carry_data_both_ways() {
    let cluster = cluster("", "");
    assert_echo(&cluster.a, "server-b");
    assert_echo(&cluster.b, "server-a");
    let status = cluster.a.status();
    assert_eq!(status["session_state"], "active", "{status}");
}

#[test]
fn each_refusal_has_its_own_reason() {
    let cluster = cluster("", "");

    // A resource server with no allow rule towards server-b.
    let (status, body) = refusal(&cluster.c, "server-b", "echo");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("out_of_scope"), "{body}");
    assert!(body.contains("server-c"), "{body}");

    // A service outside the token's scope.
    let (status, body) = refusal(&cluster.a, "server-b", "admin");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin"), "{body}");

    // A peer that is not configured.
    let (status, body) = refusal(&cluster.a, "server-z", "echo");
    assert_eq!(status, 404, "{body}");

    // The refused sides stay healthy.
    assert_echo(&cluster.a, "server-b");
    assert_echo(&cluster.b, "server-a");
}

#[test]
fn revoked_session_is_refused_and_disconnected() {
    let cluster = cluster("", "");
    assert_echo(&cluster.a, "server-b");
    let source_id = cluster.a.status()["source_id"]
        .as_str()
        .expect("source id")
        .to_owned();

    cluster.server.admin(&["revoke", "--session", &source_id]);

    wait_for(
        "server-b to refuse the revoked session",
        Duration::from_secs(10),
        || matches!(cluster.a.connect("server-b", "echo"), Err((403, body)) if body.contains("revoked")),
    );
    // Other sessions are unaffected.
    assert_echo(&cluster.b, "server-a");
}

#[test]
fn expired_token_is_refused() {
    // Tokens live 6 s and peers allow no clock skew; with the token server
    // stopped, server-a cannot refresh and its token runs out.
    let mut cluster = cluster("token_lifetime_secs = 6\n", "leeway_secs = 0\n");
    assert_echo(&cluster.a, "server-b");
    cluster.server.process.kill();
    std::thread::sleep(Duration::from_secs(7));
    let (status, body) = refusal(&cluster.a, "server-b", "echo");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("expired"), "{body}");
}

#[test]
fn killed_peer_is_reconnected_after_restart() {
    let mut cluster = cluster("", "");
    assert_echo(&cluster.a, "server-b");
    cluster.b.process.kill();
    cluster.b.restart();
    wait_for(
        "a new stream to server-b after its restart",
        Duration::from_secs(20),
        || {
            cluster
                .a
                .connect("server-b", "echo")
                .is_ok_and(|stream| round_trip(stream, b"again") == b"again")
        },
    );
}

#[test]
fn restart_without_token_server_uses_saved_token() {
    let mut cluster = cluster("", "");
    assert_echo(&cluster.a, "server-b");
    cluster.server.process.kill();
    cluster.a.restart();
    assert_echo(&cluster.a, "server-b");
    assert_echo(&cluster.b, "server-a");
    let status = cluster.a.status();
    assert_eq!(status["session_state"], "degraded", "{status}");
}

#[test]
fn daemon_of_other_token_server_is_refused() {
    let cluster = cluster("", "");
    let root = tempfile::tempdir().expect("tempdir");
    let other = TokenServer::start(&root.path().join("other"), POLICY, "");
    let mut spec = Daemon::token_server_config("server-c", free_udp_port(), &other, "inventory");
    spec.peers = vec![("server-b".to_owned(), cluster.b.port, None)];
    spec.services = echo_service(echo_server());
    let stranger = Daemon::start(root.path(), &spec, Some(other.enrollment_code("server-c")));
    let (status, body) = refusal(&stranger, "server-b", "echo");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("unknown_signing_key") || body.contains("unknown key"),
        "{body}"
    );
    assert_echo(&cluster.a, "server-b");
}

/// Dials `daemon` over real QUIC with `key` as the TLS identity and runs the
/// client side of the h8 handshake with `token`; returns the server's verdict.
fn handshake_with(
    daemon: &Daemon,
    key: h8::identity::IdentityKey,
    token: Vec<u8>,
    keys: h8::token::KeySet,
) -> Result<(), h8::wire::Reject> {
    use h8::handshake::{ConnectionContext, Initiator, LocalIdentity, Trust, EXPORTER_LABEL};
    use h8::wire::{FrameDecoder, RejectCode};

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let (client_crypto, _) = h8::daemon::tls::quic_crypto(&key, "impostor").expect("crypto");
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("endpoint");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
        let connection = endpoint
            .connect(
                format!("127.0.0.1:{}", daemon.port)
                    .parse()
                    .expect("address"),
                "h8",
            )
            .expect("connect")
            .await
            .expect("QUIC connection");
        let mut exporter = [0u8; 32];
        connection
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .expect("exporter");
        let context = ConnectionContext {
            exporter,
            peer_tls_key: h8::daemon::tls::peer_tls_key(&connection).expect("peer key"),
        };
        let local = LocalIdentity {
            name: "server-a".to_owned(),
            key: key.signing_key().clone(),
            token,
        };
        let trust = Trust::TokenServer {
            keys,
            validation: h8::token::Validation::client("h8-tokend"),
        };
        let (initiator, hello) =
            Initiator::start(local, trust, context, daemon.name.clone(), [7; 32]);
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        send.write_all(&hello).await.expect("send hello");
        let mut decoder = FrameDecoder::default();
        loop {
            let chunk = recv.read_chunk(4096, true).await;
            match chunk {
                Ok(Some(chunk)) => decoder.push(&chunk.bytes),
                _ => return Err(h8::wire::Reject::new(RejectCode::Internal, "stream ended")),
            }
            if let Some(body) = decoder.next_body().expect("frame") {
                return initiator
                    .handle_server_hello(&body, h8::daemon::unix_now())
                    .map(|_| ());
            }
        }
    })
}

fn saved_token(daemon: &Daemon) -> (Vec<u8>, h8::token::KeySet) {
    let saved =
        h8::daemon::session::SavedSession::load(&daemon.dir.join("state")).expect("saved session");
    let token = h8::token::from_text(saved.token.as_deref().expect("token")).expect("token text");
    let keys = h8::token::KeySet::new(
        saved
            .signing_keys
            .iter()
            .map(|k| h8::identity::parse_public_key(k).expect("key")),
    );
    (token, keys)
}

#[test]
fn copied_token_is_refused() {
    let cluster = cluster("", "");
    let (token, keys) = saved_token(&cluster.a);
    let reject = handshake_with(
        &cluster.b,
        h8::identity::IdentityKey::generate(),
        token,
        keys,
    )
    .unwrap_err();
    assert_eq!(reject.code, h8::wire::RejectCode::KeyMismatch, "{reject}");
    assert_echo(&cluster.a, "server-b");
}

#[test]
fn tampered_token_is_refused() {
    let cluster = cluster("", "");
    let (mut token, keys) = saved_token(&cluster.a);
    let last = token.len() - 70;
    token[last] ^= 0x01;
    let key = h8::identity::IdentityKey::load(&cluster.a.dir.join("state/identity.pem"))
        .expect("key of server-a");
    let reject = handshake_with(&cluster.b, key, token, keys).unwrap_err();
    assert!(
        matches!(reject.code, h8::wire::RejectCode::InvalidToken),
        "{reject}"
    );
    assert_echo(&cluster.a, "server-b");
}

fn quic_connections(daemon: &Daemon) -> f64 {
    let (status, body) = api(&daemon.socket, "GET", "/metrics", "").expect("metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix("h8_quic_connections "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no h8_quic_connections in {body}"))
}

#[test]
fn simultaneous_connects_end_with_one_connection() {
    let cluster = cluster("", "");
    // Both daemons open streams to each other at the same moment, several
    // times over, before either has a connection.
    let (a, b) = (&cluster.a, &cluster.b);
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for i in 0..8 {
            let (from, to) = if i % 2 == 0 {
                (a, "server-b")
            } else {
                (b, "server-a")
            };
            workers.push(scope.spawn(move || {
                let stream = from
                    .connect(to, "echo")
                    .unwrap_or_else(|(s, m)| panic!("{s} {m}"));
                assert_eq!(round_trip(stream, b"race"), b"race");
            }));
        }
        for worker in workers {
            worker.join().expect("worker");
        }
    });
    // The losing connection is closed; give its close a moment to finish.
    wait_for(
        "one QUIC connection on each side",
        Duration::from_secs(10),
        || quic_connections(a) == 1.0 && quic_connections(b) == 1.0,
    );
    assert_echo(a, "server-b");
    assert_echo(b, "server-a");
    assert_eq!(quic_connections(a), 1.0);
    assert_eq!(quic_connections(b), 1.0);
}

#[test]
fn enrollment_code_file_must_be_private() {
    use std::os::unix::fs::PermissionsExt as _;

    let root = tempfile::tempdir().expect("tempdir");
    let server = TokenServer::start(&root.path().join("tokend"), POLICY, "");
    let mut spec = Daemon::token_server_config("server-a", free_udp_port(), &server, "inventory");
    spec.mode
        .push_str("enrollment_code_file = \"enrollment-code\"\n");
    let dir = root.path().join("server-a");
    std::fs::create_dir_all(&dir).expect("dir");
    let code_file = dir.join("enrollment-code");
    std::fs::write(&code_file, server.enrollment_code("server-a")).expect("write code");

    // A code file others can read is rejected with the fix in the message.
    std::fs::set_permissions(&code_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.join("h8d.toml");
    std::fs::write(&config, Daemon::render(&spec, &dir)).expect("config");
    let output = std::process::Command::new(H8D)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run h8d");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(
        stderr.contains(&code_file.display().to_string()),
        "{stderr}"
    );

    // The same file with mode 0600, named relative to the config, enrolls the daemon.
    std::fs::set_permissions(&code_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let daemon = Daemon::start(root.path(), &spec, None);
    assert_eq!(daemon.status()["session_state"], "active");
}
