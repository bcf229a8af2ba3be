//! Sealed packets: ChaCha20-Poly1305 over every packet of a session opened
//! with a connect token.
//!
//! The 22-byte header (with [`FLAG_ENCRYPTED`] set) is the associated data,
//! the body is encrypted in place and the 16-byte tag trails the packet (the
//! room `Config::trailer_reserved_bytes` keeps). Each direction has its own
//! key from the token, so a nonce only has to be unique per direction: it
//! is the packet's 64-bit sequence number (data and disconnect packets share
//! that space), with a kind byte apart for the server's `Accept`. A packet
//! that does not open is dropped before anything reads it; the per-packet
//! duplicate window then drops replays.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use crate::token::SessionKeys;
use crate::wire::{FLAG_ENCRYPTED, HEADER_LEN};

/// Length of the Poly1305 tag ending every sealed packet.
pub const TAG_LEN: usize = 16;

/// What a sealed packet is, in its nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SealKind {
    /// Data and disconnect packets: the nonce is the sequence number.
    Data = 0,
    /// The server's `Accept` (sent again unchanged if lost).
    Accept = 1,
}

fn nonce(kind: SealKind, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = kind as u8;
    n[4..].copy_from_slice(&seq.to_le_bytes());
    // Unique per direction's key: the sequence never repeats within a
    // session, and the kind keeps the Accept apart.
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key"))
}

/// A session's two ciphers.
pub(crate) struct PacketCrypto {
    seal: LessSafeKey,
    open: LessSafeKey,
}

impl std::fmt::Debug for PacketCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketCrypto(..)")
    }
}

impl PacketCrypto {
    /// The client's side: seals with the client-to-server key.
    pub fn client(keys: &SessionKeys) -> Self {
        Self {
            seal: key(&keys.client_to_server),
            open: key(&keys.server_to_client),
        }
    }

    /// The server's side.
    pub fn server(keys: &SessionKeys) -> Self {
        Self {
            seal: key(&keys.server_to_client),
            open: key(&keys.client_to_server),
        }
    }

    /// Seals the packet written at `out[start..]` (header, then body): sets
    /// the header's flag, encrypts the body in place, appends the tag.
    pub fn seal(&self, out: &mut Vec<u8>, start: usize, kind: SealKind, seq: u64) {
        out[start + 4] |= FLAG_ENCRYPTED;
        let (header, body) = out[start..].split_at_mut(HEADER_LEN);
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce(kind, seq), Aad::from(&*header), body)
            // Only fails past 256 GiB in one packet.
            .expect("a packet is far below ChaCha20's limit");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a sealed packet's body into `plain`: false if it does not open
    /// (forged, damaged, or under another key).
    pub fn open(
        &self,
        header: &[u8],
        sealed_body: &[u8],
        kind: SealKind,
        seq: u64,
        plain: &mut Vec<u8>,
    ) -> bool {
        let Some(len) = sealed_body.len().checked_sub(TAG_LEN) else {
            return false;
        };
        plain.clear();
        plain.extend_from_slice(sealed_body);
        let opened = self
            .open
            .open_in_place(nonce(kind, seq), Aad::from(header), plain)
            .is_ok();
        plain.truncate(len);
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Header, PacketType};

    fn keys() -> SessionKeys {
        SessionKeys {
            client_to_server: [1; 32],
            server_to_client: [2; 32],
        }
    }

    fn packet(seq: u64, client: &PacketCrypto) -> Vec<u8> {
        let mut out = vec![0xAA; 3];
        Header {
            packet_type: PacketType::Data,
            connection_id: 9,
            seq: seq as u16,
            ack: Some((4, 5)),
            sealed: false,
        }
        .encode(&mut out);
        out.extend_from_slice(b"frames");
        client.seal(&mut out, 3, SealKind::Data, seq);
        out.drain(..3);
        out
    }

    #[test]
    fn a_sealed_packet_opens_once_with_its_sequence_and_direction() {
        let (client, server) = (PacketCrypto::client(&keys()), PacketCrypto::server(&keys()));
        let p = packet(70_000, &client);
        assert_eq!(p[4] & FLAG_ENCRYPTED, FLAG_ENCRYPTED);
        assert_eq!(p.len(), HEADER_LEN + 6 + TAG_LEN);
        let mut plain = Vec::new();
        let (h, b) = p.split_at(HEADER_LEN);
        assert!(server.open(h, b, SealKind::Data, 70_000, &mut plain));
        assert_eq!(plain, b"frames");
        // Another sequence number, kind or direction does not open it.
        assert!(!server.open(h, b, SealKind::Data, 70_001, &mut plain));
        assert!(!server.open(h, b, SealKind::Accept, 70_000, &mut plain));
        assert!(!client.open(h, b, SealKind::Data, 70_000, &mut plain));
        assert!(!server.open(h, &b[..TAG_LEN - 1], SealKind::Data, 70_000, &mut plain));
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let (client, server) = (PacketCrypto::client(&keys()), PacketCrypto::server(&keys()));
        let p = packet(3, &client);
        let mut plain = Vec::new();
        for i in 0..p.len() {
            for bit in 0..8 {
                let mut q = p.clone();
                q[i] ^= 1 << bit;
                let (h, b) = q.split_at(HEADER_LEN);
                assert!(
                    !server.open(h, b, SealKind::Data, 3, &mut plain),
                    "byte {i} bit {bit}"
                );
            }
        }
    }
}
