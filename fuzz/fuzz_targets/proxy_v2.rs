//! Decodes arbitrary bytes as a PROXY protocol v2 header.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, len)) = h8::proxy_v2::decode(data) {
        assert!(len <= data.len());
        let tlvs: Vec<(u8, &[u8])> = header.tlvs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let encoded = h8::proxy_v2::encode(header.source, header.destination, &tlvs);
        let (again, _) = h8::proxy_v2::decode(&encoded).expect("re-encoded header decodes");
        assert_eq!(again.tlvs, header.tlvs);
    }
});
