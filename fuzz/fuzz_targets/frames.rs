//! Feeds arbitrary bytes to the frame decoder in pieces and decodes every
//! message type the daemons exchange.
#![no_main]

use h8::wire::{self, FrameDecoder, HandshakeFrame, StreamHeader, StreamReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::default();
    for piece in data.chunks(7) {
        decoder.push(piece);
        match decoder.next_body() {
            Ok(Some(body)) => {
                let _ = wire::decode_body::<HandshakeFrame>(&body);
                let _ = wire::decode_body::<StreamHeader>(&body);
                let _ = wire::decode_body::<StreamReply>(&body);
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
});
