//! Every frame decoder of tessera-schema on arbitrary bytes: never a panic;
//! a client frame that decodes re-encodes to one that decodes to the same
//! bytes again (compared as bytes: a NaN in an input is not equal to itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::{client, server, verify};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = client::decode(data) {
        let mut fbb = FlatBufferBuilder::new();
        let once = client::encode(&mut fbb, &msg).to_vec();
        let decoded = client::decode(&once).expect("own encoding decodes");
        let twice = client::encode(&mut fbb, &decoded).to_vec();
        assert_eq!(once, twice);
    }
    if let Ok(server::ServerMessage::Snapshot(s)) = server::decode(data) {
        // A client applies whatever a server sends: never a panic either.
        let mut mirror = tessera_cells::view::ClientMirror::new(4);
        let _ = mirror.apply(&s);
        let mut shifted = s.clone();
        shifted.baseline_tick = s.tick;
        shifted.tick = s.tick.saturating_add(1);
        let _ = mirror.apply(&shifted);
    }
    let _ = verify::shard_bundle(data);
    let _ = verify::control_frame(data);
});
