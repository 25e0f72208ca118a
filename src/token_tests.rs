use ed25519_dalek::SigningKey;
use proptest::prelude::*;

use super::*;

fn signer(seed: u8) -> TokenSigner {
    TokenSigner::new(SigningKey::from_bytes(&[seed; 32]))
}

fn claims(not_before: u64, expires_at: u64) -> Claims {
    Claims {
        version: TOKEN_VERSION,
        kind: TokenKind::Client,
        key_id: KeyId([0; 8]),
        issuer: "tokend".to_owned(),
        client_id: "app-1".to_owned(),
        source_id: "src-1".to_owned(),
        server: "server-a".to_owned(),
        server_key: [7; 32],
        grants: vec![Grant {
            peer: "server-b".to_owned(),
            services: vec!["orders".to_owned()],
        }],
        issued_at: not_before,
        not_before,
        expires_at,
        token_id: [1; 16],
    }
}

fn strict() -> Validation {
    Validation {
        leeway: 0,
        ..Validation::client("tokend")
    }
}

#[test]
fn signed_token_verifies() {
    let signer = signer(1);
    let bytes = signer.sign(&claims(100, 200));
    let keys = KeySet::new([signer.verifying_key()]);
    let verified = verify(&bytes, &keys, &strict(), 150).expect("valid token");
    assert_eq!(verified.claims.server, "server-a");
    assert_eq!(verified.claims.key_id, signer.key_id());
}

#[test]
fn unknown_key_is_rejected() {
    let bytes = signer(1).sign(&claims(100, 200));
    let keys = KeySet::new([signer(2).verifying_key()]);
    let err = verify(&bytes, &keys, &strict(), 150).unwrap_err();
    assert!(matches!(err, TokenError::UnknownKey(_)), "{err}");
}

#[test]
fn wrong_issuer_is_rejected() {
    let signer = signer(1);
    let bytes = signer.sign(&claims(100, 200));
    let keys = KeySet::new([signer.verifying_key()]);
    let validation = Validation {
        issuer: Some("other".to_owned()),
        ..strict()
    };
    let err = verify(&bytes, &keys, &validation, 150).unwrap_err();
    assert!(matches!(err, TokenError::WrongIssuer { .. }), "{err}");
}

#[test]
fn machine_token_must_be_self_signed() {
    let signer = signer(1);
    let mut machine = claims(100, 200);
    machine.kind = TokenKind::Machine;
    let keys = KeySet::new([signer.verifying_key()]);
    let validation = Validation {
        kind: TokenKind::Machine,
        issuer: None,
        leeway: 0,
    };
    let err = verify(&signer.sign(&machine), &keys, &validation, 150).unwrap_err();
    assert_eq!(err, TokenError::NotSelfSigned);

    machine.server_key = signer.verifying_key().to_bytes();
    verify(&signer.sign(&machine), &keys, &validation, 150).expect("self-signed");
}

#[test]
fn oversized_input_is_rejected_before_decoding() {
    let err = verify(
        &vec![0; MAX_TOKEN_LEN + 1],
        &KeySet::default(),
        &strict(),
        0,
    )
    .unwrap_err();
    assert!(matches!(err, TokenError::TooLarge { .. }));
}

#[test]
fn scope_matches_peer_and_service() {
    let mut c = claims(0, 10);
    assert!(c.allows("server-b", "orders"));
    assert!(!c.allows("server-b", "billing"));
    assert!(!c.allows("server-c", "orders"));
    c.grants[0].services = vec![ANY_SERVICE.to_owned()];
    assert!(c.allows("server-b", "billing"));
}

#[test]
fn text_form_round_trips() {
    let bytes = signer(3).sign(&claims(1, 2));
    assert_eq!(from_text(&to_text(&bytes)).expect("decodes"), bytes);
    assert_eq!(
        from_text("not base64!").unwrap_err(),
        TokenError::InvalidText
    );
}

proptest! {
    #[test]
    fn round_trip_preserves_claims(
        nb in 0u64..1 << 40,
        life in 1u64..1 << 20,
        server in "[a-z0-9-]{1,40}",
        services in proptest::collection::vec("[a-z]{1,10}", 0..5),
    ) {
        let signer = signer(9);
        let mut original = claims(nb, nb + life);
        original.server = server;
        original.grants[0].services = services;
        original.key_id = signer.key_id();
        let bytes = signer.sign(&original);
        let keys = KeySet::new([signer.verifying_key()]);
        let verified = verify(&bytes, &keys, &strict(), nb).expect("verifies");
        prop_assert_eq!(verified.claims, original);
    }

    #[test]
    fn any_changed_byte_fails_verification(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let signer = signer(4);
        let mut bytes = signer.sign(&claims(100, 200));
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        let keys = KeySet::new([signer.verifying_key()]);
        prop_assert!(verify(&bytes, &keys, &strict(), 150).is_err());
    }

    #[test]
    fn validity_window_is_exact(nb in 10u64..1 << 40, life in 1u64..1 << 20, leeway in 0u64..120) {
        let signer = signer(5);
        let bytes = signer.sign(&claims(nb, nb + life));
        let keys = KeySet::new([signer.verifying_key()]);
        let validation = Validation { leeway, ..strict() };
        let too_early = (nb - 1).saturating_sub(leeway);
        let last_valid = nb + life + leeway - 1;
        prop_assert!(verify(&bytes, &keys, &validation, nb.saturating_sub(leeway)).is_ok());
        prop_assert!(verify(&bytes, &keys, &validation, last_valid).is_ok());
        if nb > leeway {
            let is_not_yet_valid = matches!(
                verify(&bytes, &keys, &validation, too_early),
                Err(TokenError::NotYetValid { .. })
            );
            prop_assert!(is_not_yet_valid);
        }
        let is_expired = matches!(
            verify(&bytes, &keys, &validation, last_valid + 1),
            Err(TokenError::Expired { .. })
        );
        prop_assert!(is_expired);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let keys = KeySet::new([signer(6).verifying_key()]);
        let _ = verify(&bytes, &keys, &strict(), 0);
        let _ = decode_unverified(&bytes);
    }
}
