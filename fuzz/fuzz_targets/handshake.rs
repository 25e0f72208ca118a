//! Drives both sides of the handshake state machine with arbitrary frames.
#![no_main]

use ed25519_dalek::SigningKey;
use h8::handshake::{ConnectionContext, Initiator, LocalIdentity, Responder, Trust};
use h8::token::{KeySet, Validation};
use libfuzzer_sys::fuzz_target;

fn local(seed: u8, name: &str) -> LocalIdentity {
    LocalIdentity { name: name.to_owned(), key: SigningKey::from_bytes(&[seed; 32]), token: vec![seed; 40] }
}

fuzz_target!(|data: &[u8]| {
    let trust = Trust::TokenServer {
        keys: KeySet::new([SigningKey::from_bytes(&[9; 32]).verifying_key()]),
        validation: Validation::client("h8-tokend"),
    };
    let context = ConnectionContext {
        exporter: [3; 32],
        peer_tls_key: SigningKey::from_bytes(&[2; 32]).verifying_key(),
    };
    let (first, second) = data.split_at(data.len() / 2);

    let responder = Responder::new(local(1, "server-b"), trust.clone(), context.clone(), [4; 32]);
    if let Ok((responder, _)) = responder.handle_client_hello(first, 1_700_000_000) {
        let _ = responder.handle_client_finish(second);
    }

    let (initiator, _) = Initiator::start(local(2, "server-a"), trust, context, "server-b", [5; 32]);
    if let Ok((waiting, _)) = initiator.handle_server_hello(first, 1_700_000_000) {
        let _ = waiting.handle_done(second);
    }
});
