//! Parses arbitrary text as a daemon config, a token-server policy and a
//! side-car local policy; every error must carry a position.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.toml");
    if let Err(error) = h8::config::DaemonConfig::parse(file, text) {
        assert!(error.line >= 1 && error.column >= 1);
    }
    let _ = h8::policy::Policy::parse(file, text);
    let _ = h8::policy::parse_local_rules(file, text, "server-a");
});
