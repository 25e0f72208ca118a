//! End-to-end tests of the `h8-tokend` binary over real HTTPS on 127.0.0.1
//! and its admin socket, each with a fresh data directory.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use h8::identity::IdentityKey;
use h8::token::{self, Validation};
use h8::token_server::api::{AdminRevokeRequest, ErrorBody};
use h8::token_server::client::{AdminClient, ClientError, TokenServerClient};
use h8::token_server::run::ReadyInfo;
use hyper::{Method, StatusCode};

const TOKEND: &str = env!("CARGO_BIN_EXE_h8-tokend");
const H8: &str = env!("CARGO_BIN_EXE_h8");

const POLICY: &str = r#"
[applications.inventory]
servers = ["server-a", "server-b"]

[[applications.inventory.allow]]
from = "server-a"
to = "server-b"
services = ["orders"]
"#;

const POLICY_WITH_BILLING: &str = r#"
[applications.inventory]
servers = ["server-a", "server-b"]

[[applications.inventory.allow]]
from = "server-a"
to = "server-b"
services = ["orders"]

[applications.billing]
servers = ["server-a"]
"#;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A running `h8-tokend` in its own temporary directory; killed on drop.
struct Server {
    dir: tempfile::TempDir,
    child: Child,
    ready: ReadyInfo,
}

impl Server {
    fn data_dir(dir: &Path) -> PathBuf {
        dir.join("data")
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("tokend.log")).unwrap_or_default()
    }

    fn init(dir: &Path) {
        let output = Command::new(TOKEND)
            .args(["init", "--issuer", "test-issuer", "--data-dir"])
            .arg(Self::data_dir(dir))
            .output()
            .expect("run h8-tokend init");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("tls_pin     = sha256:"), "{stdout}");
    }

    fn spawn(dir: &Path) -> Child {
        Self::spawn_on(dir, "127.0.0.1:0")
    }

    fn spawn_on(dir: &Path, listen: &str) -> Child {
        let log = fs::File::create(dir.join("tokend.log")).expect("log file");
        Command::new(TOKEND)
            .arg("run")
            .arg("--data-dir")
            .arg(Self::data_dir(dir))
            .arg("--policy")
            .arg(dir.join("policy.toml"))
            .args(["--listen", listen])
            .arg("--admin-socket")
            .arg(dir.join("admin.sock"))
            .arg("--ready-file")
            .arg(dir.join("ready.json"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn h8-tokend run")
    }

    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::init(dir.path());
        fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
        let mut child = Self::spawn(dir.path());
        let ready = Self::wait_ready(dir.path(), &mut child);
        Server { dir, child, ready }
    }

    /// Stops the server and starts it again on the same address and data.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fs::remove_file(self.dir.path().join("ready.json")).expect("remove ready file");
        self.child = Self::spawn_on(self.dir.path(), &self.ready.listen);
        let ready = Self::wait_ready(self.dir.path(), &mut self.child);
        assert_eq!(ready.listen, self.ready.listen);
    }

    fn wait_ready(dir: &Path, child: &mut Child) -> ReadyInfo {
        let ready_path = dir.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            if let Ok(text) = fs::read_to_string(&ready_path) {
                break serde_json::from_str::<ReadyInfo>(&text).expect("ready file is JSON");
            }
            if let Some(status) = child.try_wait().expect("wait") {
                let log = fs::read_to_string(dir.join("tokend.log")).unwrap_or_default();
                panic!("h8-tokend exited with {status} before it was ready:\n{log}");
            }
            assert!(Instant::now() < deadline, "h8-tokend not ready after 30 s");
            std::thread::sleep(Duration::from_millis(50));
        };
        ready
    }

    fn client(&self) -> TokenServerClient {
        TokenServerClient::new(&self.ready.listen, &self.ready.tls_pin).expect("client")
    }

    fn admin(&self) -> AdminClient {
        AdminClient::new(&self.ready.admin_socket)
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Enrolls `name` with a code obtained through the `h8 admin` binary.
    async fn enroll(&self, name: &str) -> SigningKey {
        let output = Command::new(H8)
            .args(["admin", "enroll", name, "--socket"])
            .arg(&self.ready.admin_socket)
            .output()
            .expect("run h8 admin enroll");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "h8 admin enroll failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let code = stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("Enrollment code for {name}: ")))
            .unwrap_or_else(|| panic!("no code in {stdout:?}"))
            .trim()
            .to_owned();
        let key = IdentityKey::generate().signing_key().clone();
        self.client()
            .enroll(name, &code, &key.verifying_key())
            .await
            .expect("enroll");
        key
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api_error(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Api {
            status,
            error,
            message,
        }) => (status, error, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn verify(client: &TokenServerClient, text: &str) -> token::Claims {
    let (issuer, keys) = client.key_set().await.expect("keys");
    assert_eq!(issuer, "test-issuer");
    let bytes = token::from_text(text).expect("token text");
    token::verify(&bytes, &keys, &Validation::client(issuer), now())
        .expect("token verifies")
        .claims
}

#[tokio::test]
async fn token_flow_end_to_end() {
    let server = Server::start();
    let client = server.client();
    let key = server.enroll("server-a").await;

    let session = client
        .open_session("server-a", &key)
        .await
        .expect("session");
    assert!(
        session.source_id.starts_with("src_"),
        "{}",
        session.source_id
    );
    assert_eq!(session.source_id.len(), 4 + 22);

    let token = client
        .request_token(&session.source_id, "inventory", &key, now())
        .await
        .expect("token");
    let claims = verify(&client, &token.token).await;
    assert_eq!(claims.source_id, session.source_id);
    assert_eq!(claims.server, "server-a");
    assert_eq!(claims.server_key, key.verifying_key().to_bytes());
    assert!(claims.allows("server-b", "orders"));
    assert_eq!(claims.expires_at, token.expires_at);

    let apps = server.admin().apps().await.expect("apps");
    assert_eq!(apps.applications[0].client_id, claims.client_id);
    let sessions = server.admin().sessions().await.expect("sessions");
    assert_eq!(sessions.sessions[0].source_id, session.source_id);

    let audit = server.admin().audit(20).await.expect("audit");
    let events: Vec<&str> = audit.entries.iter().map(|e| e.event.as_str()).collect();
    for expected in ["enroll_code", "enroll", "session", "issue"] {
        assert!(
            events.contains(&expected),
            "{expected} missing from {events:?}"
        );
    }
    let log = server.log();
    assert!(!log.contains(&token.token), "the token appears in the log");
}

#[tokio::test]
async fn unauthorized_server_gets_403_with_reason() {
    let server = Server::start();
    let client = server.client();
    fs::write(
        server.policy_path(),
        format!("{POLICY}\n[applications.other]\nservers = [\"server-x\"]\n"),
    )
    .expect("policy");
    server.admin().reload().await.expect("reload");
    let key = server.enroll("server-x").await;
    let session = client
        .open_session("server-x", &key)
        .await
        .expect("session");

    let (status, error, message) = api_error(
        client
            .request_token(&session.source_id, "inventory", &key, now())
            .await,
    );
    assert_eq!(status, 403);
    assert_eq!(error, "not_authorized");
    assert!(
        message.contains("\"server-x\" is not authorized"),
        "{message}"
    );
}

#[tokio::test]
async fn bad_enrollment_codes_are_rejected() {
    let server = Server::start();
    let client = server.client();
    let admin = server.admin();
    let key = IdentityKey::generate().public();

    let (status, error, _) =
        api_error(client.enroll("server-a", "h8e_not-a-real-code", &key).await);
    assert_eq!((status, error.as_str()), (403, "code_unknown"));

    let code = admin.enroll("server-a", None).await.expect("code");
    client
        .enroll("server-a", &code.enrollment_code, &key)
        .await
        .expect("first use");
    let (status, error, message) =
        api_error(client.enroll("server-a", &code.enrollment_code, &key).await);
    assert_eq!((status, error.as_str()), (403, "code_used"));
    assert!(message.contains("h8 admin enroll server-a"), "{message}");

    let short = admin.enroll("server-b", Some(1)).await.expect("code");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, error, _) = api_error(
        client
            .enroll("server-b", &short.enrollment_code, &key)
            .await,
    );
    assert_eq!((status, error.as_str()), (403, "code_expired"));

    assert!(
        !server.log().contains(&code.enrollment_code),
        "the code appears in the log"
    );
}

#[tokio::test]
async fn revocations_follow_the_epoch() {
    let server = Server::start();
    let client = server.client();
    let key = server.enroll("server-a").await;
    let session = client
        .open_session("server-a", &key)
        .await
        .expect("session");

    let initial = client.revocations(None).await.expect("lists");
    assert_eq!(initial.epoch, 0);
    assert!(initial.changed);
    let unchanged = client.revocations(Some(0)).await.expect("lists");
    assert!(!unchanged.changed);
    assert_eq!(unchanged.sources, None);

    let revoked = server
        .admin()
        .revoke(&AdminRevokeRequest {
            session: Some(session.source_id.clone()),
            ..Default::default()
        })
        .await
        .expect("revoke");
    assert_eq!(revoked.epoch, 1);

    let lists = client.revocations(Some(0)).await.expect("lists");
    assert!(lists.changed);
    assert_eq!(lists.epoch, 1);
    assert_eq!(lists.sources, Some(vec![session.source_id.clone()]));
    assert!(!client.revocations(Some(1)).await.expect("lists").changed);

    let (status, error, _) = api_error(
        client
            .request_token(&session.source_id, "inventory", &key, now())
            .await,
    );
    assert_eq!((status, error.as_str()), (403, "session_revoked"));

    let output = Command::new(H8)
        .args(["admin", "revoke", "--server", "server-a", "--socket"])
        .arg(&server.ready.admin_socket)
        .output()
        .expect("run h8 admin revoke");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lists = client.revocations(Some(1)).await.expect("lists");
    assert_eq!(lists.epoch, 2);
    assert_eq!(lists.servers, Some(vec!["server-a".to_owned()]));
}

#[tokio::test]
async fn sighup_reloads_good_policy_and_keeps_old_on_error() {
    let server = Server::start();
    let client = server.client();
    let key = server.enroll("server-a").await;
    let session = client
        .open_session("server-a", &key)
        .await
        .expect("session");

    let (_, error, _) = api_error(
        client
            .request_token(&session.source_id, "billing", &key, now())
            .await,
    );
    assert_eq!(error, "not_authorized");

    fs::write(server.policy_path(), POLICY_WITH_BILLING).expect("policy");
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .request_token(&session.source_id, "billing", &key, now())
            .await
        {
            Ok(_) => break,
            Err(error) => assert!(Instant::now() < deadline, "reload not applied: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fs::write(
        server.policy_path(),
        "[applications.billing]\nservers = 3\n",
    )
    .expect("policy");
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("policy reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload failure logged:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        server.log().contains("policy.toml:2:"),
        "error position missing:\n{}",
        server.log()
    );
    client
        .request_token(&session.source_id, "billing", &key, now())
        .await
        .expect("old policy still in force");

    let (status, error, _) = api_error(server.admin().reload().await);
    assert_eq!((status, error.as_str()), (400, "invalid_policy"));
}

#[tokio::test]
async fn rotated_key_still_verifies_old_tokens() {
    let server = Server::start();
    let client = server.client();
    let key = server.enroll("server-a").await;
    let session = client
        .open_session("server-a", &key)
        .await
        .expect("session");
    let old = client
        .request_token(&session.source_id, "inventory", &key, now())
        .await
        .expect("token");

    let rotated = server.admin().rotate_key().await.expect("rotate");
    assert_eq!(rotated.retired_key_id, old.key_id);
    let new = client
        .request_token(&session.source_id, "inventory", &key, now())
        .await
        .expect("token");
    assert_eq!(new.key_id, rotated.key_id);

    let keys = client.keys().await.expect("keys");
    assert_eq!(keys.keys.len(), 2);
    let retired = keys
        .keys
        .iter()
        .find(|k| k.key_id == old.key_id)
        .expect("old key published");
    assert!(retired.retired_at.is_some());
    verify(&client, &old.token).await;
    verify(&client, &new.token).await;
}

/// Path, content type, body, expected status and expected error code.
type MalformedCase = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let server = Server::start();
    let client = server.client();
    let json = Some("application/json");
    let cases: Vec<MalformedCase> = vec![
        (
            "/v1/enroll",
            json,
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/session/challenge",
            json,
            br#"{"name":"server-a","extra":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "/v1/token",
            json,
            vec![b' '; 70 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "/v1/session/challenge",
            Some("text/plain"),
            br#"{"name":"server-a"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/v1/session/challenge",
            None,
            br#"{"name":"server-a"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/v1/nothing",
            json,
            b"{}".to_vec(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/keys",
            json,
            b"{}".to_vec(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "/v1/session/challenge",
            json,
            br#"{"name":"bad name"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
    ];
    for (path, content_type, body, status, code) in cases {
        let response = client
            .send_raw(Method::POST, path, content_type, body)
            .await
            .expect("request");
        assert_eq!(response.status, status, "POST {path} with {content_type:?}");
        let error: ErrorBody = serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("POST {path}: body is not an error object: {e}"));
        assert_eq!(error.error, code, "POST {path}: {}", error.message);
        assert!(!error.message.is_empty());
    }

    let response = client
        .send_raw(
            Method::POST,
            "/v1/session/challenge",
            json,
            br#"{"name":"server-a","extra":1}"#.to_vec(),
        )
        .await
        .expect("request");
    let error: ErrorBody = serde_json::from_slice(&response.body).expect("error body");
    assert!(
        error.message.contains("unknown field `extra`"),
        "{}",
        error.message
    );

    let response = client
        .send_raw(Method::GET, "/v1/revocations?since=abc", None, Vec::new())
        .await
        .expect("request");
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn wrong_pin_fails_the_handshake() {
    let server = Server::start();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let client = TokenServerClient::new(&server.ready.listen, &wrong).expect("client");
    match client.keys().await {
        Err(ClientError::Tls { source, .. }) => {
            assert!(
                source.to_string().contains("pinned certificate"),
                "{source}"
            )
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(TokenServerClient::new(&server.ready.listen, "sha256:abc").is_err());
}

#[tokio::test]
async fn curl_reads_the_key_set() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed; skipping");
        return;
    }
    let server = Server::start();
    let output = Command::new("curl")
        .args(["-sk", "--max-time", "10"])
        .arg(format!("https://{}/v1/keys", server.ready.listen))
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let keys: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(keys["issuer"], "test-issuer");
    assert_eq!(keys["keys"][0]["key_id"].as_str().map(str::len), Some(16));
}

#[test]
fn insecure_key_permissions_stop_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    Server::init(dir.path());
    fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let key = Server::data_dir(dir.path()).join("signing-key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");

    let mut child = Server::spawn(dir.path());
    let status = child.wait().expect("wait");
    let log = fs::read_to_string(dir.path().join("tokend.log")).expect("log");
    assert!(!status.success());
    assert!(log.contains("chmod 600"), "{log}");
}

#[test]
fn open_data_dir_stops_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    Server::init(dir.path());
    fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let data = Server::data_dir(dir.path());
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).expect("chmod");

    let mut child = Server::spawn(dir.path());
    let status = child.wait().expect("wait");
    let log = fs::read_to_string(dir.path().join("tokend.log")).expect("log");
    assert!(!status.success());
    assert!(log.contains("chmod 700"), "{log}");
}

#[test]
fn init_refuses_existing_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    Server::init(dir.path());
    let output = Command::new(TOKEND)
        .args(["init", "--data-dir"])
        .arg(Server::data_dir(dir.path()))
        .output()
        .expect("run init");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("already exists and is not empty"),
        "{stderr}"
    );

    let mode = fs::metadata(Server::data_dir(dir.path()))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn check_config_reports_file_line_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("h8-tokend.toml");
    fs::write(&config, "data_dir = \"data\"\npolicy = \"policy.toml\"\n").expect("config");
    fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let output = Command::new(TOKEND)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    fs::write(
        dir.path().join("policy.toml"),
        "[applications.inventory]\nservers = [\"server-a\"]\n\n[[applications.inventory.allow]]\nfrom = \"server-z\"\nto = \"server-a\"\nservices = [\"x\"]\n",
    )
    .expect("policy");
    let output = Command::new(TOKEND)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("policy.toml:5:8: resource server \"server-z\""),
        "{stderr}"
    );

    fs::write(
        &config,
        "data_dir = \"data\"\npolicy = \"policy.toml\"\nport = 1\n",
    )
    .expect("config");
    let output = Command::new(TOKEND)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("h8-tokend.toml:3:1: unknown field `port`"),
        "{stderr}"
    );
}

/// A client that kept an idle connection to a server that then restarted
/// sends its next request on a new connection instead of failing.
#[tokio::test]
async fn client_reconnects_after_server_restart() {
    let mut server = Server::start();
    let client = server.client();
    let before = client.keys().await.expect("keys before the restart");
    server.restart();
    let after = client.keys().await.expect("keys after the restart");
    assert_eq!(before.keys.len(), after.keys.len());
    assert_eq!(before.keys[0].key_id, after.keys[0].key_id);
}
