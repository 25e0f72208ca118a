//! Local API routes against two real side-car daemons: JSON routes through
//! curl, error statuses, and malformed or oversized requests.

#[path = "common/api.rs"]
mod api;

use api::{allow_a, echo_server, start_echo_pair, start_pair, tcp_service, NodeSpec};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_status_peers_metrics() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, _b) = start_echo_pair(root.path()).await;

    // Open one stream so that the peer is connected.
    let (_, mut stream) = a
        .upgrade("/v1/connect/server-b/echo")
        .await
        .expect("connect");
    stream.write_all(b"ping").await.expect("write");
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await.expect("read");
    assert_eq!(&reply, b"ping");

    let Some(output) = a.curl(&["http://h8/v1/status"]) else {
        return;
    };
    let status = json(&output);
    assert_eq!(status["name"], "server-a");
    assert_eq!(status["mode"], "side-car");
    assert_eq!(status["session_state"], "active");
    assert_eq!(status["degraded"], false);
    assert_eq!(status["source_id"], "machine:server-a");
    assert!(status["token_expires_in_secs"].as_u64().expect("expiry") > 0);
    assert_eq!(status["listen"], format!("127.0.0.1:{}", a.port));
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));

    let peers = json(&a.curl(&["http://h8/v1/peers"]).expect("curl"));
    let peer = &peers["peers"][0];
    assert_eq!(peer["name"], "server-b");
    assert_eq!(peer["state"], "connected");
    assert!(peer["rtt_ms"].as_f64().is_some(), "{peer}");
    assert_eq!(peer["open_streams"], 1);

    let token = json(&a.curl(&["http://h8/v1/token"]).expect("curl"));
    assert_eq!(token["kind"], "machine");
    assert_eq!(token["server"], "server-a");
    assert_eq!(token["token_id"].as_str().expect("token id").len(), 32);
    assert!(
        token.get("token").is_none(),
        "raw token must not be returned: {token}"
    );

    let metrics = a.curl(&["http://h8/metrics"]).expect("curl");
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(text.contains("h8_streams_opened_total 1"), "{text}");
    assert!(
        text.contains("h8_session_state{state=\"active\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("h8_peer_connected{peer=\"server-b\"} 1"),
        "{text}"
    );
    let v1 = a.curl(&["http://h8/v1/metrics"]).expect("curl");
    assert!(String::from_utf8_lossy(&v1.stdout).contains("# TYPE h8_streams_active gauge"));

    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_errors_map_to_statuses() {
    let root = tempfile::tempdir().expect("tempdir");
    let echo = echo_server().await;
    let b_spec = NodeSpec {
        services: format!(
            "{}{}",
            tcp_service("echo", echo, "none"),
            tcp_service("secret", echo, "none")
        ),
        policy: allow_a(&["echo"]),
        ..NodeSpec::default()
    };
    let (a, _b) = start_pair(root.path(), NodeSpec::default(), b_spec);

    // A working stream stays open while others fail.
    let (_, mut working) = a
        .upgrade("/v1/connect/server-b/echo")
        .await
        .expect("connect");
    working.write_all(b"one").await.expect("write");

    let (status, body) = a
        .upgrade("/v1/connect/server-b/secret")
        .await
        .expect_err("denied");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"error\":\"policy_denied\""), "{body}");
    assert!(
        body.contains("[[allow]]"),
        "message says what to do: {body}"
    );

    let (status, body) = a
        .upgrade("/v1/connect/server-x/echo")
        .await
        .expect_err("unknown peer");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_peer"), "{body}");

    let (status, body) = a
        .upgrade("/v1/accept/nothing")
        .await
        .expect_err("unknown service");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_service"), "{body}");

    working.write_all(b"two").await.expect("write");
    working.shutdown().await.expect("shutdown");
    let mut reply = Vec::new();
    working.read_to_end(&mut reply).await.expect("read");
    assert_eq!(reply, b"onetwo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, _b) = start_pair(root.path(), NodeSpec::default(), NodeSpec::default());

    let (status, body) = a
        .raw_request(
            b"POST /v1/connect/server-b/echo HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Upgrade: h8-stream"), "{body}");
    assert!(body.contains("curl --unix-socket"), "{body}");

    let (status, body) = a
        .raw_request(b"GET /v2/nothing HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"error\":\"not_found\""), "{body}");

    let (status, body) = a
        .raw_request(b"DELETE /v1/status HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 405, "{body}");

    let (status, body) = a
        .raw_request(
            b"POST /v1/reload HTTP/1.1\r\nHost: h8\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 413, "{body}");

    let (status, _) = a
        .raw_request(b"\x16\x03\x01 garbage that is not HTTP\r\n\r\n")
        .await;
    assert_eq!(status / 100, 4, "garbage gets a 4xx");

    let huge = format!(
        "GET /v1/status HTTP/1.1\r\nHost: h8\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let (status, _) = a.raw_request(huge.as_bytes()).await;
    assert_eq!(status / 100, 4, "a 200 KiB header gets a 4xx, got {status}");

    let (status, body) = a
        .raw_request(b"POST /v1/accept/x?timeout_secs=abc HTTP/1.1\r\nHost: h8\r\nConnection: Upgrade\r\nUpgrade: h8-stream\r\n\r\n")
        .await;
    assert_eq!(status, 400, "{body}");

    // The daemon still serves other requests.
    let (status, body) = a
        .raw_request(b"GET /v1/status HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_or_keeps_config() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, _b) = start_pair(root.path(), NodeSpec::default(), NodeSpec::default());

    let ok = b"POST /v1/reload HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n";
    let (status, body) = a.raw_request(ok).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"reloaded\":true"), "{body}");

    let config = a.dir.join("h8d.toml");
    let good = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(&config, format!("{good}\nnot valid toml [[[\n")).expect("write config");
    let (status, body) = a.raw_request(ok).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("reload_rejected"), "{body}");
    assert!(body.contains("unchanged"), "{body}");

    let (status, _) = a
        .raw_request(b"GET /v1/status HTTP/1.1\r\nHost: h8\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_cli_shows_status_and_errors() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, _b) = start_pair(root.path(), NodeSpec::default(), NodeSpec::default());

    let output = a.h8(&["status"]).output().expect("run h8");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("server-a"), "{text}");
    assert!(text.contains("active"), "{text}");

    let output = a.h8(&["peers", "--json"]).output().expect("run h8");
    let peers: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(peers["peers"][0]["name"], "server-b");

    let output = a.h8(&["token"]).output().expect("run h8");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("machine:server-a"), "{text}");

    let output = a
        .h8(&["connect", "server-x", "echo"])
        .output()
        .expect("run h8");
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("404"), "{error}");
    assert!(error.contains("server-x"), "{error}");

    let output = a
        .h8(&["status", "--socket", "/nonexistent/h8d.sock"])
        .output()
        .expect("run h8");
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("cannot connect to /nonexistent/h8d.sock"),
        "{error}"
    );
    assert!(error.contains("is h8d running"), "{error}");
}
