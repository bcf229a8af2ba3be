//! Shard bundles and control frames from another node on arbitrary bytes:
//! never a panic, all-or-nothing bundles, and whatever decodes re-encodes to
//! something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_cells::demo::DemoGame;
use tessera_cells::wire::{decode_bundle, decode_control, encode_control};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if decode_bundle::<DemoGame>(data, &mut out).is_err() {
        assert!(out.is_empty());
    }
    if let Ok((header, msg)) = decode_control(data) {
        let again = encode_control(&header, &msg);
        assert_eq!(decode_control(&again), Ok((header, msg)));
    }
});
