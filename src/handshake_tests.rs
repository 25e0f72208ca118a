use ed25519_dalek::SigningKey;
use proptest::prelude::*;

use super::*;
use crate::token::{Grant, TokenSigner, TOKEN_VERSION};
use crate::wire::FrameDecoder;

const NOW: u64 = 1_000_000;

struct Party {
    local: LocalIdentity,
    public: VerifyingKey,
}

fn issuer() -> TokenSigner {
    TokenSigner::new(SigningKey::from_bytes(&[42; 32]))
}

fn client_token(signer: &TokenSigner, name: &str, key: &VerifyingKey, expires_at: u64) -> Vec<u8> {
    signer.sign(&Claims {
        version: TOKEN_VERSION,
        kind: TokenKind::Client,
        key_id: signer.key_id(),
        issuer: "tokend".to_owned(),
        client_id: "cid_app".to_owned(),
        source_id: format!("src_{name}"),
        server: name.to_owned(),
        server_key: key.to_bytes(),
        grants: vec![Grant {
            peer: "*".to_owned(),
            services: vec!["echo".to_owned()],
        }],
        issued_at: expires_at - 7200,
        not_before: expires_at - 7200,
        expires_at,
        token_id: [3; 16],
    })
}

fn party(seed: u8, name: &str) -> Party {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let public = key.verifying_key();
    let token = client_token(&issuer(), name, &public, NOW + 3600);
    Party {
        local: LocalIdentity {
            name: name.to_owned(),
            key,
            token,
        },
        public,
    }
}

fn trust() -> Trust {
    Trust::TokenServer {
        keys: KeySet::new([issuer().verifying_key()]),
        validation: Validation::client("tokend"),
    }
}

fn body(frame: &[u8]) -> Vec<u8> {
    let mut decoder = FrameDecoder::default();
    decoder.push(frame);
    decoder
        .next_body()
        .expect("valid frame")
        .expect("complete frame")
}

fn context(exporter: u8, peer: &Party) -> ConnectionContext {
    ConnectionContext {
        exporter: [exporter; 32],
        peer_tls_key: peer.public,
    }
}

/// Runs a handshake between `client` and `server`, returning each side's result.
fn run(
    client: &Party,
    client_trust: Trust,
    server: &Party,
    server_trust: Trust,
    client_exporter: u8,
    server_exporter: u8,
) -> (Result<Established, Reject>, Result<Established, Reject>) {
    let (initiator, hello) = Initiator::start(
        client.local.clone(),
        client_trust,
        context(client_exporter, server),
        server.local.name.clone(),
        [1; 32],
    );
    let responder = Responder::new(
        server.local.clone(),
        server_trust,
        context(server_exporter, client),
        [2; 32],
    );
    let (responder, server_hello) = match responder.handle_client_hello(&body(&hello), NOW) {
        Ok(ok) => ok,
        Err(reject) => {
            let client = initiator
                .handle_server_hello(&body(&reject_frame(&reject)), NOW)
                .map(|_| unreachable_established());
            return (client, Err(reject));
        }
    };
    let (initiator, finish) = match initiator.handle_server_hello(&body(&server_hello), NOW) {
        Ok(ok) => ok,
        Err(reject) => {
            let server = responder.handle_client_finish(&body(&reject_frame(&reject)));
            return (Err(reject), server);
        }
    };
    let server_result = responder.handle_client_finish(&body(&finish));
    let client_result = match &server_result {
        Ok(_) => initiator.handle_done(&body(&done_frame())),
        Err(reject) => initiator.handle_done(&body(&reject_frame(reject))),
    };
    (client_result, server_result)
}

fn unreachable_established() -> Established {
    panic!("handshake went on after a rejection")
}

#[test]
fn handshake_authenticates_both_sides() {
    let a = party(1, "server-a");
    let b = party(2, "server-b");
    let (client, server) = run(&a, trust(), &b, trust(), 9, 9);
    let client = client.expect("client side succeeds");
    let server = server.expect("server side succeeds");
    assert_eq!(client.peer.server, "server-b");
    assert_eq!(server.peer.server, "server-a");
    assert_eq!(server.peer.source_id, "src_server-a");
}

#[test]
fn handshake_on_other_connection_fails() {
    let a = party(1, "server-a");
    let b = party(2, "server-b");
    let (client, server) = run(&a, trust(), &b, trust(), 9, 8);
    assert_eq!(client.unwrap_err().code, RejectCode::BadProof);
    assert!(server.is_err());
}

#[test]
fn copied_token_fails_key_binding() {
    let a = party(1, "server-a");
    let b = party(2, "server-b");
    let mut thief = party(3, "server-c");
    thief.local.token = a.local.token.clone();
    let (client, server) = run(&thief, trust(), &b, trust(), 9, 9);
    assert_eq!(server.unwrap_err().code, RejectCode::KeyMismatch);
    assert_eq!(client.unwrap_err().code, RejectCode::KeyMismatch);
}

#[test]
fn token_copied_with_matching_tls_key_fails_proof() {
    // The thief presents A's token and claims A's TLS key, but cannot sign with A's key.
    let a = party(1, "server-a");
    let b = party(2, "server-b");
    let mut thief = party(3, "server-a");
    thief.local.token = a.local.token.clone();
    thief.public = a.public;
    let (_, server) = run(&thief, trust(), &b, trust(), 9, 9);
    assert_eq!(server.unwrap_err().code, RejectCode::BadProof);
}

#[test]
fn expired_token_is_rejected() {
    let mut a = party(1, "server-a");
    a.local.token = client_token(&issuer(), "server-a", &a.public, NOW - 3600);
    let b = party(2, "server-b");
    let (_, server) = run(&a, trust(), &b, trust(), 9, 9);
    assert_eq!(server.unwrap_err().code, RejectCode::Expired);
}

#[test]
fn token_from_other_token_server_is_rejected() {
    let mut a = party(1, "server-a");
    let other = TokenSigner::new(SigningKey::from_bytes(&[77; 32]));
    a.local.token = client_token(&other, "server-a", &a.public, NOW + 60);
    let b = party(2, "server-b");
    let (_, server) = run(&a, trust(), &b, trust(), 9, 9);
    assert_eq!(server.unwrap_err().code, RejectCode::UnknownSigningKey);
}

#[test]
fn wrong_peer_is_rejected_by_client() {
    let a = party(1, "server-a");
    let b = party(2, "server-b");
    let (initiator, hello) = Initiator::start(
        a.local.clone(),
        trust(),
        context(9, &b),
        "server-c",
        [1; 32],
    );
    let responder = Responder::new(b.local.clone(), trust(), context(9, &a), [2; 32]);
    let (_, server_hello) = responder
        .handle_client_hello(&body(&hello), NOW)
        .expect("server accepts");
    let err = initiator
        .handle_server_hello(&body(&server_hello), NOW)
        .expect_err("client rejects");
    assert_eq!(err.code, RejectCode::WrongPeer);
}

#[test]
fn mode_mismatch_names_both_modes() {
    let a = party(1, "server-a");
    let b = party(2, "server-b");
    let sidecar = Trust::Sidecar {
        pinned: HashMap::from([("server-a".to_owned(), a.public)]),
        leeway: 30,
    };
    let (_, server) = run(&a, trust(), &b, sidecar, 9, 9);
    let reject = server.unwrap_err();
    assert_eq!(reject.code, RejectCode::ModeMismatch);
    assert!(
        reject.reason.contains("token-server mode"),
        "{}",
        reject.reason
    );
    assert!(reject.reason.contains("side-car mode"), "{}", reject.reason);
}

fn machine_party(seed: u8, name: &str) -> Party {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let public = key.verifying_key();
    let signer = TokenSigner::new(key.clone());
    let token = signer.sign(&Claims {
        version: TOKEN_VERSION,
        kind: TokenKind::Machine,
        key_id: signer.key_id(),
        issuer: name.to_owned(),
        client_id: String::new(),
        source_id: format!("machine:{name}"),
        server: name.to_owned(),
        server_key: public.to_bytes(),
        grants: Vec::new(),
        issued_at: NOW,
        not_before: NOW,
        expires_at: NOW + 900,
        token_id: [5; 16],
    });
    Party {
        local: LocalIdentity {
            name: name.to_owned(),
            key,
            token,
        },
        public,
    }
}

#[test]
fn sidecar_handshake_needs_pinned_keys() {
    let a = machine_party(1, "server-a");
    let b = machine_party(2, "server-b");
    let pins = |p: &Party| Trust::Sidecar {
        pinned: HashMap::from([(p.local.name.clone(), p.public)]),
        leeway: 30,
    };
    let (client, server) = run(&a, pins(&b), &b, pins(&a), 9, 9);
    assert_eq!(client.expect("client").peer.server, "server-b");
    assert_eq!(server.expect("server").peer.server, "server-a");

    let stranger = machine_party(3, "server-c");
    let (_, server) = run(&stranger, pins(&b), &b, pins(&a), 9, 9);
    assert_eq!(server.unwrap_err().code, RejectCode::NotPinned);

    let mut impostor = machine_party(3, "server-a");
    impostor.local.name = "server-a".to_owned();
    let (_, server) = run(&impostor, pins(&b), &b, pins(&a), 9, 9);
    assert_eq!(server.unwrap_err().code, RejectCode::NotPinned);
}

proptest! {
    #[test]
    fn tampered_client_hello_is_rejected(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let a = party(1, "server-a");
        let b = party(2, "server-b");
        let (_, hello) = Initiator::start(a.local.clone(), trust(), context(9, &b), "server-b", [1; 32]);
        let mut hello = body(&hello);
        let i = index.index(hello.len());
        hello[i] ^= flip;
        let responder = Responder::new(b.local.clone(), trust(), context(9, &a), [2; 32]);
        // Either the server rejects the hello, or the flip hit the ephemeral
        // key and the client's confirmation check will fail afterwards.
        if let Ok((responder, _)) = responder.handle_client_hello(&hello, NOW) {
            let (initiator, original) = Initiator::start(a.local.clone(), trust(), context(9, &b), "server-b", [1; 32]);
            let responder_b = Responder::new(b.local.clone(), trust(), context(9, &a), [2; 32]);
            let (_, good_server_hello) = responder_b.handle_client_hello(&body(&original), NOW).expect("untampered");
            let (_, finish) = initiator.handle_server_hello(&body(&good_server_hello), NOW).expect("client");
            prop_assert!(responder.handle_client_finish(&body(&finish)).is_err());
        }
    }

    #[test]
    fn tampered_server_hello_is_rejected(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let a = party(1, "server-a");
        let b = party(2, "server-b");
        let (initiator, hello) = Initiator::start(a.local.clone(), trust(), context(9, &b), "server-b", [1; 32]);
        let responder = Responder::new(b.local.clone(), trust(), context(9, &a), [2; 32]);
        let (_, server_hello) = responder.handle_client_hello(&body(&hello), NOW).expect("server");
        let mut server_hello = body(&server_hello);
        let i = index.index(server_hello.len());
        server_hello[i] ^= flip;
        prop_assert!(initiator.handle_server_hello(&server_hello, NOW).is_err());
    }

    #[test]
    fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let a = party(1, "server-a");
        let b = party(2, "server-b");
        let responder = Responder::new(b.local.clone(), trust(), context(9, &a), [2; 32]);
        prop_assert!(responder.handle_client_hello(&bytes, NOW).is_err());
        let (initiator, _) = Initiator::start(a.local.clone(), trust(), context(9, &b), "server-b", [1; 32]);
        prop_assert!(initiator.handle_server_hello(&bytes, NOW).is_err());
    }
}
