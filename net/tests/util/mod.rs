//! Helpers shared by the scenario tests.
#![allow(dead_code)]

use tessera_net::{ChannelId, ConnectionHandle, Event};

/// A message that says who it is: tag, sequence number, length, then a
/// pattern derived from all three, so corruption or mix-ups are caught.
pub fn make_message(tag: u8, seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(9);
    let mut bytes = Vec::with_capacity(len);
    bytes.push(tag);
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&(len as u32).to_le_bytes());
    let mut x = (seq as u64) << 8 | tag as u64;
    while bytes.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        bytes.push((x >> 56) as u8);
    }
    bytes
}

/// `(tag, seq)` of a message built by [`make_message`]; panics on corruption.
pub fn check_message(bytes: &[u8]) -> (u8, u32) {
    assert!(bytes.len() >= 9, "message too short: {}", bytes.len());
    let tag = bytes[0];
    let seq = u32::from_le_bytes(bytes[1..5].try_into().unwrap());
    let len = u32::from_le_bytes(bytes[5..9].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), len, "length of message {tag}/{seq}");
    assert_eq!(
        bytes,
        make_message(tag, seq, len),
        "content of message {tag}/{seq}"
    );
    (tag, seq)
}

/// Sequence numbers of the messages on `channel` for `connection`, in
/// delivery order, verified.
pub fn received(events: &[Event], connection: ConnectionHandle, channel: ChannelId) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                connection: c,
                channel: ch,
                bytes,
            } if *c == connection && *ch == channel => Some(check_message(bytes).1),
            _ => None,
        })
        .collect()
}

/// The disconnect reasons reported for `connection`.
pub fn disconnects(
    events: &[Event],
    connection: ConnectionHandle,
) -> Vec<tessera_net::DisconnectReason> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Disconnected {
                connection: c,
                reason,
            } if *c == connection => Some(*reason),
            _ => None,
        })
        .collect()
}
