//! Connect tokens and sealed sessions: arbitrary bytes as a sealed token,
//! a whole token, and handshake or data datagrams to a server that requires
//! tokens (some patched to carry a valid header, a genuine token or the
//! live session's id). Never a panic; nothing opens that was not sealed
//! under the key; no session appears without a genuine token.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_net::conditioner::ConditionerConfig;
use tessera_net::pair::Pair;
use tessera_net::token::{self, ConnectToken, TokenKey};
use tessera_net::wire::{self, PacketType};
use tessera_net::{ChannelId, Config};

fuzz_target!(|data: &[u8]| {
    let key = TokenKey([0x5E; 32]);
    // Whatever the bytes, a token never opens unless sealed under the key
    // (the fuzzer cannot forge Poly1305), and reading never panics.
    assert!(token::open_sealed(data, std::slice::from_ref(&key), 0).is_err());
    let _ = ConnectToken::from_bytes(data);
    let _ = ConnectToken::from_hex(&String::from_utf8_lossy(data));

    let mut pair = Pair::new(
        Config::server(),
        Config::default(),
        ConditionerConfig::default(),
        3,
    );
    pair.seal_sessions();
    let genuine = pair.mint_token();
    let (client, _) = pair.connect_and_wait();
    pair.client
        .send(client, ChannelId::RELIABLE_ORDERED, b"hello")
        .unwrap();
    pair.run_for(Duration::from_millis(50));
    let sessions = pair.server.connection_count();
    let mut rest = data;
    while rest.len() >= 2 {
        let control = rest[0];
        let len = (usize::from(rest[1]) * 5).min(rest.len() - 2);
        let mut datagram = rest[2..2 + len].to_vec();
        rest = &rest[2 + len..];
        if control & 1 != 0 {
            // A handshake request around the bytes, maybe with a genuine
            // token (replayed from another address below).
            let mut h = Vec::new();
            let kind = if control & 2 != 0 {
                PacketType::ConnectRequest
            } else {
                PacketType::ConnectResponse
            };
            wire::Header::control(kind, 0).encode(&mut h);
            h.extend_from_slice(&datagram);
            if control & 4 != 0 {
                let at = h.len().min(wire::HEADER_LEN + 8);
                h.truncate(at);
                h.extend_from_slice(&genuine.sealed[..]);
            }
            h.resize(h.len().max(600), 0);
            datagram = h;
        }
        let from = if control & 8 != 0 {
            "10.9.9.9:9999".parse().unwrap()
        } else {
            pair.client_addr
        };
        pair.server.handle_datagram(pair.now, from, &datagram);
        if control & 16 != 0 {
            pair.now += Duration::from_millis(u64::from(control >> 5) * 30);
            pair.turn();
        }
    }
    pair.run_for(Duration::from_millis(100));
    // A genuine token without the cookie its address was given opens
    // nothing; neither does anything else.
    assert!(pair.server.connection_count() <= sessions);
});
