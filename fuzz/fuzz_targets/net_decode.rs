//! The header, body and frame decoders on arbitrary bytes: never a panic,
//! and whatever decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_net::wire::{
    self, Challenge, ConnectRequest, ConnectResponse, Frame, Frames, HEADER_LEN,
};

fn check_frames(body: &[u8]) {
    let mut reencoded = Vec::new();
    let mut clean = true;
    for frame in Frames::new(body) {
        match frame {
            Ok(Frame::Ping) => wire::write_ping(&mut reencoded),
            Ok(Frame::Message {
                channel,
                id,
                payload,
            }) => wire::write_message(&mut reencoded, channel, id, payload),
            Ok(Frame::Fragment(f)) => {
                let (_, len) = wire::fragment_span(f.total, f.count, f.index)
                    .expect("a decoded fragment has a valid span");
                assert_eq!(len, f.payload.len());
                wire::write_fragment(
                    &mut reencoded,
                    f.channel,
                    f.id,
                    f.index,
                    f.count,
                    f.total,
                    f.payload,
                )
            }
            Err(_) => clean = false,
        }
    }
    if clean {
        // Frames are self-delimiting: a clean decode re-encodes byte for byte.
        assert_eq!(reencoded, body);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((header, body)) = wire::decode_header(data) {
        let mut again = Vec::new();
        header.encode(&mut again);
        assert_eq!(again.len(), HEADER_LEN);
        assert_eq!(wire::decode_header(&again).map(|(h, _)| h), Ok(header));
        check_frames(body);
    }
    check_frames(data);
    let _ = ConnectRequest::decode(data);
    let _ = ConnectResponse::decode(data);
    let _ = Challenge::decode(data);
    let _ = wire::decode_u32_body(data);
    let _ = wire::decode_u16_body(data);
    let _ = wire::decode_u8_body(data);
});
