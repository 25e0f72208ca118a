use super::*;

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("test.db")).expect("open");
    (dir, store)
}

fn audit(at: u64, event: &'static str) -> AuditEvent {
    AuditEvent::new(at, event, "subject", "detail")
}

fn session(source_id: &str, server: &str, expires_at: u64) -> SessionRecord {
    SessionRecord {
        source_id: source_id.to_owned(),
        server: server.to_owned(),
        server_key: [7; 32],
        created_at: 100,
        expires_at,
        revoked_at: None,
    }
}

#[test]
fn client_ids_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("test.db");
    let names = vec!["billing".to_owned(), "inventory".to_owned()];
    let mut counter = 0;
    let first = {
        let mut store = SqliteStore::open(&path).expect("open");
        store
            .ensure_applications(&names, 10, &mut || {
                counter += 1;
                format!("cid_{counter}")
            })
            .expect("ensure")
    };
    assert_eq!(first[0], ("billing".to_owned(), "cid_1".to_owned()));

    let mut store = SqliteStore::open(&path).expect("reopen");
    let second = store
        .ensure_applications(&names, 20, &mut || "cid_new".to_owned())
        .expect("ensure");
    assert_eq!(first, second);
}

#[test]
fn enrollment_code_is_single_use() {
    let (_dir, mut store) = open();
    let hash = [1; 32];
    store
        .insert_enrollment_code(&hash, "server-a", 1_000, audit(10, "enroll_code"))
        .expect("insert");
    store
        .enroll(&hash, "server-a", &[2; 32], 20, audit(20, "enroll"))
        .expect("first enroll");
    let second = store.enroll(&hash, "server-a", &[2; 32], 21, audit(21, "enroll"));
    assert!(matches!(second, Err(StoreError::NotFound(_))), "{second:?}");

    let code = store
        .enrollment_code(&hash)
        .expect("lookup")
        .expect("present");
    assert_eq!(code.used_at, Some(20));
    let server = store.server("server-a").expect("lookup").expect("enrolled");
    assert_eq!(server.public_key, [2; 32]);
}

#[test]
fn challenge_is_taken_once_and_evicts_oldest() {
    let (_dir, mut store) = open();
    assert!(!store
        .insert_challenge(&[1; 32], "server-a", 200, 100, 2)
        .expect("insert"));
    assert!(!store
        .insert_challenge(&[2; 32], "server-a", 200, 100, 2)
        .expect("insert"));
    // At the cap the oldest challenge makes room for the new one.
    assert!(store
        .insert_challenge(&[3; 32], "server-a", 201, 100, 2)
        .expect("insert"));
    assert_eq!(store.take_challenge(&[1; 32]).expect("take evicted"), None);

    let taken = store.take_challenge(&[2; 32]).expect("take");
    assert_eq!(taken, Some(("server-a".to_owned(), 200)));
    assert_eq!(store.take_challenge(&[2; 32]).expect("take again"), None);

    // Expired challenges no longer count against the cap: nothing is evicted.
    assert!(!store
        .insert_challenge(&[4; 32], "server-a", 400, 300, 1)
        .expect("insert"));
    assert_eq!(
        store.take_challenge(&[4; 32]).expect("take"),
        Some(("server-a".to_owned(), 400))
    );
}

#[test]
fn revocation_bumps_epoch_and_lists_live_entries() {
    let (_dir, mut store) = open();
    assert_eq!(store.epoch().expect("epoch"), 0);
    store
        .insert_session(
            &session("src_live", "server-a", 1_000),
            audit(100, "session"),
        )
        .expect("insert");
    store
        .insert_session(&session("src_old", "server-a", 150), audit(100, "session"))
        .expect("insert");

    let epoch = store
        .revoke(
            &RevokeTarget::Session("src_live".to_owned()),
            120,
            audit(120, "revoke"),
        )
        .expect("revoke");
    assert_eq!(epoch, 1);
    let epoch = store
        .revoke(
            &RevokeTarget::Session("src_old".to_owned()),
            121,
            audit(121, "revoke"),
        )
        .expect("revoke");
    assert_eq!(epoch, 2);

    let lists = store.revocations(200).expect("lists");
    assert_eq!(lists.epoch, 2);
    assert_eq!(
        lists.sources,
        vec!["src_live".to_owned()],
        "expired session is dropped"
    );

    let again = store.revoke(
        &RevokeTarget::Session("src_live".to_owned()),
        130,
        audit(130, "revoke"),
    );
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    assert_eq!(
        store.epoch().expect("epoch"),
        2,
        "failed revocation keeps the epoch"
    );
}

#[test]
fn server_revocation_revokes_its_sessions() {
    let (_dir, mut store) = open();
    store
        .insert_enrollment_code(&[1; 32], "server-a", 1_000, audit(10, "enroll_code"))
        .expect("code");
    store
        .enroll(&[1; 32], "server-a", &[7; 32], 20, audit(20, "enroll"))
        .expect("enroll");
    store
        .insert_session(&session("src_a", "server-a", 1_000), audit(100, "session"))
        .expect("insert");
    store
        .insert_session(&session("src_b", "server-b", 1_000), audit(100, "session"))
        .expect("insert");

    store
        .revoke(
            &RevokeTarget::Server("server-a".to_owned()),
            120,
            audit(120, "revoke"),
        )
        .expect("revoke");
    let lists = store.revocations(200).expect("lists");
    assert_eq!(lists.servers, vec!["server-a".to_owned()]);
    assert_eq!(lists.sources, vec!["src_a".to_owned()]);
    assert!(store
        .server("server-a")
        .expect("lookup")
        .expect("present")
        .revoked_at
        .is_some());
}

#[test]
fn rotation_retires_old_key_and_tracks_expiry() {
    let (_dir, mut store) = open();
    let key = |id: &str, created_at| SigningKeyRecord {
        key_id: id.to_owned(),
        public_key: [9; 32],
        created_at,
        retired_at: None,
        last_token_expires_at: 0,
    };
    store.insert_signing_key(&key("aaaa", 10)).expect("insert");
    store
        .record_issues(&[(
            IssuedToken {
                token_id: "00".repeat(16),
                source_id: "src_a".to_owned(),
                server: "server-a".to_owned(),
                application: "inventory".to_owned(),
                key_id: "aaaa".to_owned(),
                issued_at: 20,
                expires_at: 3_620,
            },
            audit(20, "issue"),
        )])
        .expect("issue");
    store
        .rotate_signing_key("aaaa", &key("bbbb", 30), audit(30, "rotate_key"))
        .expect("rotate");

    let keys = store.signing_keys().expect("keys");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].retired_at, Some(30));
    assert_eq!(keys[0].last_token_expires_at, 3_620);
    assert_eq!(keys[1].retired_at, None);
    let twice = store.rotate_signing_key("aaaa", &key("cccc", 40), audit(40, "rotate_key"));
    assert!(matches!(twice, Err(StoreError::NotFound(_))), "{twice:?}");
}

#[test]
fn audit_lists_newest_first() {
    let (_dir, mut store) = open();
    for at in 1..=5 {
        store.append_audit(audit(at, "deny")).expect("append");
    }
    let rows = store.audit(3).expect("audit");
    let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![5, 4, 3]);
}

#[test]
fn purge_drops_only_expired_rows() {
    let (_dir, mut store) = open();
    store
        .insert_session(&session("src_old", "server-a", 150), audit(100, "session"))
        .expect("insert");
    store
        .insert_session(
            &session("src_new", "server-a", 5_000),
            audit(100, "session"),
        )
        .expect("insert");
    let deleted = store.purge_expired(1_000, 100).expect("purge");
    assert_eq!(deleted, 1);
    assert!(store.session("src_old").expect("lookup").is_none());
    assert!(store.session("src_new").expect("lookup").is_some());
}
