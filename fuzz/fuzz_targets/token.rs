//! Decodes and verifies arbitrary bytes as a token, in binary and text form.
#![no_main]

use ed25519_dalek::SigningKey;
use h8::token::{self, KeySet, TokenKind, Validation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = KeySet::new([SigningKey::from_bytes(&[1; 32]).verifying_key()]);
    for kind in [TokenKind::Client, TokenKind::Machine] {
        let validation = Validation { kind, issuer: None, leeway: 30 };
        let _ = token::verify(data, &keys, &validation, 1_700_000_000);
    }
    let _ = token::decode_unverified(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = token::from_text(text) {
            let _ = token::decode_unverified(&bytes);
        }
    }
});
