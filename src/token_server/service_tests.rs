use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};

use super::*;
use crate::identity::{public_key_text, IdentityKey};
use crate::token::{self, KeyId, KeySet, Validation};
use crate::token_server::api::{
    session_message, token_request_message, AdminEnrollRequest, AdminRevokeRequest,
    ChallengeRequest, EnrollRequest, SessionRequest, TokenRequest,
};
use crate::token_server::config::DEFAULT_TOKEN_SECS;
use crate::token_server::store::{SigningKeyRecord, SqliteStore};

const NOW: u64 = 1_700_000_000;

const POLICY: &str = r#"
[applications.inventory]
servers = ["server-a", "server-b"]

[[applications.inventory.allow]]
from = "server-a"
to = "server-b"
services = ["orders"]
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    service: Service,
}

fn policy(text: &str) -> Policy {
    Policy::parse(Path::new("policy.toml"), text).expect("valid policy")
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = DataDir::new(dir.path().join("data"));
    data_dir.init("test-issuer", NOW).expect("init");
    let database = data_dir.database_path();
    let mut store = SqliteStore::open(&database).expect("open");
    let key = data_dir.load_signing_key(&mut store).expect("key");
    let service = Service::new(
        Box::new(store),
        policy(POLICY),
        TokenSigner::new(key.signing_key().clone()),
        "test-issuer".to_owned(),
        Lifetimes::default(),
        Some(data_dir),
        NOW,
    )
    .expect("service")
    // As h8-tokend runs: token requests read through a second connection,
    // so these tests also check that it reads the main store's commits.
    .with_reader(Box::new(SqliteStore::open(&database).expect("open reader")));
    Fixture { _dir: dir, service }
}

fn enroll(service: &Service, name: &str) -> SigningKey {
    let key = IdentityKey::generate().signing_key().clone();
    let code = service
        .create_enrollment_code(
            &AdminEnrollRequest {
                name: name.to_owned(),
                ttl_secs: None,
            },
            NOW,
        )
        .expect("code");
    service
        .enroll(
            &EnrollRequest {
                name: name.to_owned(),
                enrollment_code: code.enrollment_code,
                public_key: public_key_text(&key.verifying_key()),
            },
            NOW,
        )
        .expect("enroll");
    key
}

fn open_session(service: &Service, name: &str, key: &SigningKey) -> String {
    let challenge = service
        .challenge(
            &ChallengeRequest {
                name: name.to_owned(),
            },
            NOW,
        )
        .expect("challenge");
    let bytes = STANDARD.decode(&challenge.challenge).expect("base64");
    let signature = key.sign(&session_message(&bytes, name));
    service
        .open_session(
            &SessionRequest {
                name: name.to_owned(),
                challenge: challenge.challenge,
                signature: STANDARD.encode(signature.to_bytes()),
            },
            NOW,
        )
        .expect("session")
        .source_id
}

fn token_request(
    source_id: &str,
    application: &str,
    key: &SigningKey,
    timestamp: u64,
) -> TokenRequest {
    let signature = key.sign(&token_request_message(source_id, application, timestamp));
    TokenRequest {
        source_id: source_id.to_owned(),
        application: application.to_owned(),
        timestamp,
        signature: STANDARD.encode(signature.to_bytes()),
    }
}

fn published_keys(service: &Service, now: u64) -> KeySet {
    let keys = service.keys(now).expect("keys");
    KeySet::new(
        keys.keys
            .iter()
            .map(|k| crate::identity::parse_public_key(&k.public_key).expect("key")),
    )
}

#[test]
fn issued_token_verifies_with_grants() {
    let f = fixture();
    let key = enroll(&f.service, "server-a");
    let source_id = open_session(&f.service, "server-a", &key);
    let response = f
        .service
        .issue_token(&token_request(&source_id, "inventory", &key, NOW), NOW)
        .expect("token");
    assert_eq!(response.expires_at, NOW + DEFAULT_TOKEN_SECS);

    let bytes = token::from_text(&response.token).expect("text");
    let verified = token::verify(
        &bytes,
        &published_keys(&f.service, NOW),
        &Validation::client("test-issuer"),
        NOW,
    )
    .expect("verify");
    let claims = verified.claims;
    assert_eq!(claims.source_id, source_id);
    assert_eq!(claims.server, "server-a");
    assert_eq!(claims.server_key, key.verifying_key().to_bytes());
    assert!(claims.client_id.starts_with("cid_"), "{}", claims.client_id);
    assert!(claims.allows("server-b", "orders"));
    assert!(!claims.allows("server-b", "stock"));
    assert_eq!(claims.key_id.to_string(), response.key_id);
}

#[test]
fn enrollment_code_failures_are_distinct() {
    let f = fixture();
    let key = IdentityKey::generate().public();
    let request = |code: &str, name: &str| EnrollRequest {
        name: name.to_owned(),
        enrollment_code: code.to_owned(),
        public_key: public_key_text(&key),
    };

    let err = f
        .service
        .enroll(&request("h8e_unknown", "server-a"), NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "code_unknown");

    let short = f
        .service
        .create_enrollment_code(
            &AdminEnrollRequest {
                name: "server-a".to_owned(),
                ttl_secs: Some(10),
            },
            NOW,
        )
        .expect("code");
    let err = f
        .service
        .enroll(&request(&short.enrollment_code, "server-a"), NOW + 10)
        .expect_err("the call should fail");
    assert_eq!(err.code, "code_expired");
    assert_eq!(err.kind, ErrorKind::Forbidden);

    let code = f
        .service
        .create_enrollment_code(
            &AdminEnrollRequest {
                name: "server-a".to_owned(),
                ttl_secs: None,
            },
            NOW,
        )
        .expect("code");
    let err = f
        .service
        .enroll(&request(&code.enrollment_code, "server-b"), NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "code_name_mismatch");
    f.service
        .enroll(&request(&code.enrollment_code, "server-a"), NOW)
        .expect("enroll");
    let err = f
        .service
        .enroll(&request(&code.enrollment_code, "server-a"), NOW + 1)
        .expect_err("the call should fail");
    assert_eq!(err.code, "code_used");
}

#[test]
fn unauthorized_server_is_denied_and_audited() {
    let f = fixture();
    let key = enroll(&f.service, "server-x");
    let source_id = open_session(&f.service, "server-x", &key);
    let err = f
        .service
        .issue_token(&token_request(&source_id, "inventory", &key, NOW), NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "not_authorized");
    assert!(err.message.contains("server-x"), "{}", err.message);

    let audit = f.service.audit(10).expect("audit");
    assert_eq!(audit.entries[0].event, "deny");
}

#[test]
fn bad_signature_and_skew_are_rejected() {
    let f = fixture();
    let key = enroll(&f.service, "server-a");
    let other = IdentityKey::generate().signing_key().clone();
    let source_id = open_session(&f.service, "server-a", &key);

    let err = f
        .service
        .issue_token(&token_request(&source_id, "inventory", &other, NOW), NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "signature_invalid");
    let err = f
        .service
        .issue_token(&token_request(&source_id, "inventory", &key, NOW - 61), NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "timestamp_skew");
}

#[test]
fn challenge_works_once() {
    let f = fixture();
    let key = enroll(&f.service, "server-a");
    let challenge = f
        .service
        .challenge(
            &ChallengeRequest {
                name: "server-a".to_owned(),
            },
            NOW,
        )
        .expect("challenge");
    let bytes = STANDARD.decode(&challenge.challenge).expect("base64");
    let request = SessionRequest {
        name: "server-a".to_owned(),
        challenge: challenge.challenge,
        signature: STANDARD.encode(key.sign(&session_message(&bytes, "server-a")).to_bytes()),
    };
    f.service.open_session(&request, NOW).expect("first use");
    let err = f
        .service
        .open_session(&request, NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "challenge_unknown");
}

#[test]
fn revoked_session_is_denied_and_listed() {
    let f = fixture();
    let key = enroll(&f.service, "server-a");
    let source_id = open_session(&f.service, "server-a", &key);
    let before = f.service.revocations(None, NOW).expect("lists");
    assert_eq!(before.epoch, 0);

    let revoked = f
        .service
        .revoke(
            &AdminRevokeRequest {
                session: Some(source_id.clone()),
                ..Default::default()
            },
            NOW,
        )
        .expect("revoke");
    assert_eq!(revoked.epoch, 1);
    let err = f
        .service
        .issue_token(&token_request(&source_id, "inventory", &key, NOW), NOW)
        .expect_err("the call should fail");
    assert_eq!(err.code, "session_revoked");

    let lists = f.service.revocations(Some(0), NOW).expect("lists");
    assert!(lists.changed);
    assert_eq!(lists.sources, Some(vec![source_id]));
    let unchanged = f.service.revocations(Some(1), NOW).expect("lists");
    assert!(!unchanged.changed);
    assert_eq!(unchanged.sources, None);
}

#[test]
fn revoked_server_cannot_open_sessions() {
    let f = fixture();
    let key = enroll(&f.service, "server-a");
    f.service
        .revoke(
            &AdminRevokeRequest {
                server: Some("server-a".to_owned()),
                ..Default::default()
            },
            NOW,
        )
        .expect("revoke");
    let err = f
        .service
        .challenge(
            &ChallengeRequest {
                name: "server-a".to_owned(),
            },
            NOW,
        )
        .expect_err("the call should fail");
    assert_eq!(err.code, "server_revoked");
    drop(key);
}

#[test]
fn rotated_key_stays_published_until_tokens_expire() {
    let f = fixture();
    let key = enroll(&f.service, "server-a");
    let source_id = open_session(&f.service, "server-a", &key);
    let old = f
        .service
        .issue_token(&token_request(&source_id, "inventory", &key, NOW), NOW)
        .expect("token");

    let rotated = f.service.rotate_key(NOW + 10).expect("rotate");
    assert_eq!(rotated.retired_key_id, old.key_id);
    let new = f
        .service
        .issue_token(
            &token_request(&source_id, "inventory", &key, NOW + 20),
            NOW + 20,
        )
        .expect("token");
    assert_eq!(new.key_id, rotated.key_id);

    let keys = published_keys(&f.service, NOW + 20);
    assert_eq!(keys.len(), 2);
    let bytes = token::from_text(&old.token).expect("text");
    token::verify(&bytes, &keys, &Validation::client("test-issuer"), NOW + 20)
        .expect("old token verifies");

    let later = rotated.retired_key_published_until;
    assert_eq!(published_keys(&f.service, later - 1).len(), 2);
    let remaining = published_keys(&f.service, later);
    assert_eq!(remaining.len(), 1);
    assert!(remaining
        .get(&KeyId::parse(&rotated.key_id).expect("id"))
        .is_some());
}

#[test]
fn client_ids_are_stable_across_reloads() {
    let f = fixture();
    let before = f.service.applications();
    let extended = format!("{POLICY}\n[applications.billing]\nservers = [\"server-c\"]\n");
    assert_eq!(
        f.service
            .set_policy(policy(&extended), NOW)
            .expect("reload"),
        2
    );
    let after = f.service.applications();
    let inventory = |apps: &crate::token_server::api::AdminAppsResponse| {
        apps.applications
            .iter()
            .find(|a| a.name == "inventory")
            .map(|a| a.client_id.clone())
    };
    assert_eq!(inventory(&before), inventory(&after));
    assert_eq!(after.applications.len(), 2);
}

#[test]
fn pending_key_of_committed_rotation_is_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = DataDir::new(dir.path().join("data"));
    data_dir.init("test-issuer", NOW).expect("init");
    let mut store = SqliteStore::open(&data_dir.database_path()).expect("open");
    let old = data_dir.load_signing_key(&mut store).expect("key");

    // Simulate a crash after the database commit but before the rename.
    let new = IdentityKey::generate();
    data_dir.write_pending_signing_key(&new).expect("pending");
    let record = SigningKeyRecord {
        key_id: KeyId::of(&new.public()).to_string(),
        public_key: new.public().to_bytes(),
        created_at: NOW,
        retired_at: None,
        last_token_expires_at: 0,
    };
    store
        .rotate_signing_key(
            &KeyId::of(&old.public()).to_string(),
            &record,
            crate::token_server::store::AuditEvent::new(NOW, "rotate_key", "k", "test"),
        )
        .expect("rotate");
    let loaded = data_dir.load_signing_key(&mut store).expect("key");
    assert_eq!(loaded.public(), new.public());
    assert!(!data_dir.pending_signing_key_path().exists());
}
