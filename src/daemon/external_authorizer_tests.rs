use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;

use super::*;

const ALLOWED: &str = "peer-a";

fn request(service: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        peer: ALLOWED.to_owned(),
        client_id: String::new(),
        source_id: format!("machine:{ALLOWED}"),
        service: service.to_owned(),
        local_server: "local".to_owned(),
    }
}

fn key(service: &str) -> CacheKey {
    CacheKey {
        peer: ALLOWED.to_owned(),
        source_id: format!("machine:{ALLOWED}"),
        service: service.to_owned(),
    }
}

#[test]
fn decide_allow_passes_with_either_fallback() {
    for fallback in [Fallback::Deny, Fallback::LocalPolicy] {
        assert_eq!(decide(&Verdict::Allow, fallback, "a", "echo", "b"), Ok(()));
    }
}

#[test]
fn decide_deny_is_policy_denied_with_reason() {
    for fallback in [Fallback::Deny, Fallback::LocalPolicy] {
        let reject = decide(
            &Verdict::Deny("not on the list".to_owned()),
            fallback,
            "a",
            "echo",
            "b",
        )
        .unwrap_err();
        assert_eq!(reject.code, RejectCode::PolicyDenied);
        assert!(reject.reason.contains("not on the list"), "{reject}");
        assert!(reject.reason.contains("\"echo\""), "{reject}");
    }
}

#[test]
fn decide_deny_without_reason_says_so() {
    let reject = decide(
        &Verdict::Deny(" ".to_owned()),
        Fallback::Deny,
        "a",
        "s",
        "b",
    )
    .unwrap_err();
    assert!(reject.reason.ends_with("no reason given"), "{reject}");
}

#[test]
fn decide_long_reason_is_truncated() {
    let reason = "é".repeat(5000);
    let reject = decide(&Verdict::Deny(reason), Fallback::Deny, "a", "s", "b").unwrap_err();
    assert!(
        reject.reason.chars().count() < MAX_REASON_CHARS + 100,
        "{}",
        reject.reason.len()
    );
}

#[test]
fn decide_unavailable_follows_fallback() {
    let down = Verdict::Unavailable("cannot connect to /run/authz.sock".to_owned());
    let reject = decide(&down, Fallback::Deny, "a", "echo", "b").unwrap_err();
    assert_eq!(reject.code, RejectCode::AuthorizerUnavailable);
    assert!(
        !reject.reason.contains("/run/authz.sock"),
        "local path leaked: {reject}"
    );
    assert_eq!(
        decide(&down, Fallback::LocalPolicy, "a", "echo", "b"),
        Ok(())
    );
}

#[test]
fn cache_returns_fresh_entries_only() {
    let cache = DecisionCache::new(10);
    let start = Instant::now();
    let ttl = Duration::from_secs(5);
    cache.insert(key("echo"), &Verdict::Allow, ttl, start);
    cache.insert(key("admin"), &Verdict::Deny("no".to_owned()), ttl, start);

    assert_eq!(
        cache.get(&key("echo"), ttl, start + Duration::from_secs(4)),
        Some(Verdict::Allow)
    );
    assert_eq!(
        cache.get(&key("admin"), ttl, start + Duration::from_secs(4)),
        Some(Verdict::Deny("no".to_owned()))
    );
    assert_eq!(cache.get(&key("echo"), ttl, start + ttl), None);
    assert_eq!(cache.get(&key("other"), ttl, start), None);
}

#[test]
fn cache_skips_failures_and_zero_ttl() {
    let cache = DecisionCache::new(10);
    let now = Instant::now();
    cache.insert(
        key("a"),
        &Verdict::Unavailable("down".to_owned()),
        Duration::from_secs(5),
        now,
    );
    cache.insert(key("b"), &Verdict::Allow, Duration::ZERO, now);
    assert_eq!(cache.len(), 0);
}

#[test]
fn cache_stays_within_capacity() {
    let cache = DecisionCache::new(3);
    let start = Instant::now();
    let ttl = Duration::from_secs(5);
    for service in ["a", "b", "c", "d"] {
        cache.insert(key(service), &Verdict::Allow, ttl, start);
    }
    assert_eq!(cache.len(), 3);
    assert_eq!(
        cache.get(&key("d"), ttl, start),
        None,
        "a full cache stores nothing new"
    );

    // Once the old entries expire, a new one evicts them.
    let later = start + ttl;
    cache.insert(key("e"), &Verdict::Allow, ttl, later);
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.get(&key("e"), ttl, later), Some(Verdict::Allow));
}

#[test]
fn cache_updates_existing_key_when_full() {
    let cache = DecisionCache::new(1);
    let start = Instant::now();
    let ttl = Duration::from_secs(5);
    cache.insert(key("a"), &Verdict::Allow, ttl, start);
    cache.insert(key("a"), &Verdict::Deny("changed".to_owned()), ttl, start);
    assert_eq!(
        cache.get(&key("a"), ttl, start),
        Some(Verdict::Deny("changed".to_owned()))
    );
}

#[test]
fn warn_limiter_counts_held_back_warnings() {
    let limiter = WarnLimiter::default();
    let start = Instant::now();
    let interval = Duration::from_secs(10);
    assert_eq!(limiter.permit(start, interval), Some(0));
    assert_eq!(
        limiter.permit(start + Duration::from_secs(1), interval),
        None
    );
    assert_eq!(
        limiter.permit(start + Duration::from_secs(9), interval),
        None
    );
    assert_eq!(limiter.permit(start + interval, interval), Some(2));
    assert_eq!(limiter.permit(start + interval, interval), None);
}

/// What the test server does with each request.
#[derive(Clone, Copy)]
enum Reply {
    /// Answer with this status line and body.
    Fixed(&'static str, &'static str),
    /// Read the request and never answer.
    Silent,
}

/// Serves HTTP/1.1 on a Unix socket in a temporary directory, records the
/// request bodies and answers each request with `reply`.
async fn serve(reply: Reply) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<String>>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("authz.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let recorded = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buffer = [0u8; 4096];
                let body = loop {
                    let n = stream.read(&mut buffer).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    assert!(head.starts_with("POST /v1/authorize HTTP/1.1"), "{head}");
                    if body.len() >= length {
                        break body.to_owned();
                    }
                };
                recorded.lock().unwrap().push(body);
                match reply {
                    Reply::Fixed(status, body) => {
                        let response = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(response.as_bytes()).await;
                    }
                    Reply::Silent => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    (dir, path, bodies)
}

const TIMEOUT: Duration = Duration::from_millis(500);

#[tokio::test]
async fn ask_returns_allow_and_sends_request_json() {
    let (_dir, path, bodies) =
        serve(Reply::Fixed("200 OK", r#"{"allow": true, "extra": 1}"#)).await;
    assert_eq!(ask(&path, &request("echo"), TIMEOUT).await, Verdict::Allow);
    let sent: AuthorizeRequest =
        serde_json::from_str(&bodies.lock().unwrap()[0]).expect("request is JSON");
    assert_eq!(sent, request("echo"));
}

#[tokio::test]
async fn ask_returns_deny_with_reason() {
    let (_dir, path, _) = serve(Reply::Fixed(
        "200 OK",
        r#"{"allow": false, "reason": "not on the list"}"#,
    ))
    .await;
    assert_eq!(
        ask(&path, &request("echo"), TIMEOUT).await,
        Verdict::Deny("not on the list".to_owned())
    );
}

#[tokio::test]
async fn ask_treats_invalid_answers_as_unavailable() {
    let cases = [
        ("200 OK", "not json"),
        ("200 OK", r#"{"allow": "yes"}"#),
        ("200 OK", r#"{"reason": "missing allow"}"#),
        ("500 Internal Server Error", r#"{"allow": true}"#),
    ];
    for (status, body) in cases {
        let (_dir, path, _) = serve(Reply::Fixed(status, body)).await;
        let verdict = ask(&path, &request("echo"), TIMEOUT).await;
        assert!(
            matches!(verdict, Verdict::Unavailable(_)),
            "{status} {body}: {verdict:?}"
        );
    }
}

#[tokio::test]
async fn ask_times_out_on_silent_server() {
    let (_dir, path, _) = serve(Reply::Silent).await;
    let started = Instant::now();
    let verdict = ask(&path, &request("echo"), Duration::from_millis(200)).await;
    assert!(
        matches!(&verdict, Verdict::Unavailable(e) if e.contains("200 ms")),
        "{verdict:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn ask_reports_missing_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.sock");
    let verdict = ask(&path, &request("echo"), TIMEOUT).await;
    assert!(
        matches!(&verdict, Verdict::Unavailable(e) if e.contains("missing.sock")),
        "{verdict:?}"
    );
}
