#![allow(missing_docs)]
//! Micro-benchmarks of the sans-IO core, each beside the raw primitive it
//! is built on, in the same group so criterion reports them side by side.
//!
//! Run: `cargo bench --bench core`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _};
use h8::authorize::{authorize_stream, RevocationSet, StreamAuthority, StreamRequest};
use h8::handshake::{ConnectionContext, Initiator, LocalIdentity, Responder, Trust};
use h8::policy::{Rule, RuleSet};
use h8::token::{self, Claims, Grant, KeySet, TokenKind, TokenSigner, Validation, TOKEN_VERSION};
use h8::wire::{self, FrameDecoder, HandshakeFrame, StreamHeader, StreamOpen};
use x25519_dalek::{PublicKey, StaticSecret};

const NOW: u64 = 1_800_000_000;

fn claims(name: &str, key: &SigningKey, signer: &TokenSigner) -> Claims {
    Claims {
        version: TOKEN_VERSION,
        kind: TokenKind::Client,
        key_id: signer.key_id(),
        issuer: "h8-tokend".to_owned(),
        client_id: "cid_inventory".to_owned(),
        source_id: "src_0123456789abcdefghijkl".to_owned(),
        server: name.to_owned(),
        server_key: key.verifying_key().to_bytes(),
        grants: vec![Grant {
            peer: "*".to_owned(),
            services: vec!["echo".to_owned(), "orders".to_owned()],
        }],
        issued_at: NOW,
        not_before: NOW,
        expires_at: NOW + 3600,
        token_id: [7; 16],
    }
}

fn tokens(c: &mut Criterion) {
    let signer = TokenSigner::new(SigningKey::from_bytes(&[1; 32]));
    let holder = SigningKey::from_bytes(&[2; 32]);
    let claims = claims("server-a", &holder, &signer);
    let bytes = signer.sign(&claims);
    let keys = KeySet::new([signer.verifying_key()]);
    let validation = Validation::client("h8-tokend");
    let raw_key = SigningKey::from_bytes(&[1; 32]);
    let raw_message = vec![0u8; bytes.len()];
    let raw_signature = raw_key.sign(&raw_message);

    let mut group = c.benchmark_group("token");
    group.bench_function("h8 sign", |b| b.iter(|| signer.sign(black_box(&claims))));
    group.bench_function("raw ed25519 sign", |b| {
        b.iter(|| raw_key.sign(black_box(&raw_message)))
    });
    group.bench_function("h8 verify", |b| {
        b.iter(|| token::verify(black_box(&bytes), &keys, &validation, NOW).expect("valid"))
    });
    group.bench_function("raw ed25519 verify", |b| {
        b.iter(|| {
            raw_key
                .verifying_key()
                .verify(black_box(&raw_message), &raw_signature)
                .expect("valid")
        })
    });
    group.finish();
}

fn handshake(c: &mut Criterion) {
    let signer = TokenSigner::new(SigningKey::from_bytes(&[1; 32]));
    let a_key = SigningKey::from_bytes(&[2; 32]);
    let b_key = SigningKey::from_bytes(&[3; 32]);
    let a = LocalIdentity {
        name: "server-a".to_owned(),
        key: a_key.clone(),
        token: signer.sign(&claims("server-a", &a_key, &signer)),
    };
    let b = LocalIdentity {
        name: "server-b".to_owned(),
        key: b_key.clone(),
        token: signer.sign(&claims("server-b", &b_key, &signer)),
    };
    let trust = Trust::TokenServer {
        keys: KeySet::new([signer.verifying_key()]),
        validation: Validation::client("h8-tokend"),
    };
    let body = |frame: &[u8]| {
        let mut decoder = FrameDecoder::default();
        decoder.push(frame);
        decoder.next_body().expect("frame").expect("complete")
    };

    let mut group = c.benchmark_group("handshake");
    group.bench_function("h8 full handshake, both sides", |bench| {
        bench.iter(|| {
            let (initiator, hello) = Initiator::start(
                a.clone(),
                trust.clone(),
                ConnectionContext {
                    exporter: [9; 32],
                    peer_tls_key: b_key.verifying_key(),
                },
                "server-b",
                [4; 32],
            );
            let responder = Responder::new(
                b.clone(),
                trust.clone(),
                ConnectionContext {
                    exporter: [9; 32],
                    peer_tls_key: a_key.verifying_key(),
                },
                [5; 32],
            );
            let (responder, server_hello) = responder
                .handle_client_hello(&body(&hello), NOW)
                .expect("hello");
            let (initiator, finish) = initiator
                .handle_server_hello(&body(&server_hello), NOW)
                .expect("server hello");
            let established = responder
                .handle_client_finish(&body(&finish))
                .expect("finish");
            let done = initiator
                .handle_done(&body(&h8::handshake::done_frame()))
                .expect("done");
            black_box((established, done))
        })
    });
    group.bench_function("raw x25519 agreement", |bench| {
        let peer = PublicKey::from(&StaticSecret::from([6; 32]));
        bench.iter_batched(
            || StaticSecret::from([8; 32]),
            |secret| black_box(secret.diffie_hellman(&peer)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("raw ed25519 sign + verify, 2 each", |bench| {
        let message = [0u8; 64];
        bench.iter(|| {
            let s1 = a_key.sign(&message);
            let s2 = b_key.sign(&message);
            a_key.verifying_key().verify(&message, &s1).expect("valid");
            b_key.verifying_key().verify(&message, &s2).expect("valid");
        })
    });
    group.finish();
}

fn stream_check(c: &mut Criterion) {
    let signer = TokenSigner::new(SigningKey::from_bytes(&[1; 32]));
    let caller = claims("server-a", &SigningKey::from_bytes(&[2; 32]), &signer);
    let revocations = RevocationSet {
        epoch: 3,
        sources: (0..100).map(|i| format!("src_{i}")).collect(),
        servers: Default::default(),
        tokens: Default::default(),
    };
    let mut group = c.benchmark_group("stream open check");
    group.bench_function("token scope", |b| {
        b.iter(|| {
            let request = StreamRequest {
                caller: &caller,
                local_name: "server-b",
                service: black_box("orders"),
                now: NOW,
                leeway: 30,
            };
            authorize_stream(&StreamAuthority::TokenScope, &request, &revocations).expect("allowed")
        })
    });
    group.bench_function("frame encode + decode", |b| {
        b.iter(|| {
            let frame = wire::encode(&StreamHeader::Open(StreamOpen {
                service: black_box("orders").to_owned(),
            }));
            let mut decoder = FrameDecoder::default();
            decoder.push(&frame);
            decoder
                .next_message::<StreamHeader>()
                .expect("valid")
                .expect("complete")
        })
    });
    group.bench_function("handshake frame encode + decode", |b| {
        let frame = HandshakeFrame::ClientHello(wire::ClientHello {
            versions: vec![1],
            mode: wire::Mode::TokenServer,
            token: signer.sign(&caller),
            ephemeral: [3; 32],
        });
        b.iter(|| {
            let bytes = wire::encode(black_box(&frame));
            let mut decoder = FrameDecoder::default();
            decoder.push(&bytes);
            decoder
                .next_message::<HandshakeFrame>()
                .expect("valid")
                .expect("complete")
        })
    });
    group.finish();
}

fn rules(count: usize) -> RuleSet {
    RuleSet::new(
        (0..count)
            .map(|i| Rule {
                from: format!("server-{i}"),
                to: format!("server-{}", (i + 1) % count),
                services: vec!["orders".to_owned(), "stock".to_owned()],
                origin: format!("policy.toml:{i}"),
            })
            .collect(),
    )
}

fn policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy lookup");
    for count in [10, 10_000] {
        let set = rules(count);
        let from = format!("server-{}", count / 2);
        let to = format!("server-{}", count / 2 + 1);
        group.bench_function(format!("{count} rules"), |b| {
            b.iter(|| set.decide(black_box(&from), black_box(&to), "stock"))
        });
    }
    let map: HashMap<(String, String), usize> =
        HashMap::from([(("a".to_owned(), "b".to_owned()), 1)]);
    group.bench_function("raw hash map probe", |b| {
        b.iter(|| map.get(&(black_box("a").to_owned(), black_box("b").to_owned())))
    });
    group.finish();
}

criterion_group!(
    name = benches;
    config = Criterion::default();
    targets = tokens, handshake, stream_check, policy
);
criterion_main!(benches);
