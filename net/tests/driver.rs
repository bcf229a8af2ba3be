//! The socket driver on loopback. Waits are bounded so a broken driver fails
//! instead of hanging; nothing here asserts on speed.
#![cfg(feature = "driver")]

mod util;

use std::cell::Cell;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tessera_net::conditioner::{ConditionerConfig, LinkConditioner, Loss};
use tessera_net::driver::{self, BatchSocket, IoMode, SocketConfig};
use tessera_net::{ChannelId, Config, Endpoint, Event, TransmitBatch};
use util::{check_message, make_message};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn roundtrip(mode: IoMode) {
    let config = SocketConfig {
        mode,
        ..SocketConfig::default()
    };
    let mut a = BatchSocket::bind(loopback(), &config).unwrap();
    let mut b = BatchSocket::bind(loopback(), &config).unwrap();
    let mut batch = TransmitBatch::new(200);
    for i in 0..200u32 {
        batch.push(b.local_addr(), &make_message(1, i, 20 + i as usize));
    }
    assert_eq!(a.send_batch(Instant::now(), &batch).unwrap(), 200);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 200 && Instant::now() < deadline {
        if b.recv_batch().unwrap() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for (from, bytes) in b.received() {
            assert_eq!(from, a.local_addr());
            got.push(check_message(bytes).1);
        }
    }
    assert_eq!(got, (0..200).collect::<Vec<_>>());
    let stats = b.stats();
    assert_eq!(stats.recv_datagrams, 200);
    if mode == IoMode::Batched {
        assert!(a.stats().send_calls <= 2, "{:?}", a.stats());
    } else {
        assert_eq!(a.stats().send_calls, 200);
    }
}

#[test]
fn batched_roundtrip() {
    roundtrip(IoMode::Batched);
}

#[test]
fn single_roundtrip() {
    roundtrip(IoMode::Single);
}

#[test]
fn oversized_datagrams_are_counted() {
    let config = SocketConfig {
        datagram_max: 100,
        ..SocketConfig::default()
    };
    let mut a = BatchSocket::bind(loopback(), &config).unwrap();
    let mut b = BatchSocket::bind(loopback(), &config).unwrap();
    let mut batch = TransmitBatch::new(2);
    batch.push(b.local_addr(), &[1; 500]);
    batch.push(b.local_addr(), &[2; 50]);
    a.send_batch(Instant::now(), &batch).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        b.recv_batch().unwrap();
        got.extend(b.received().map(|(_, bytes)| bytes.to_vec()));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got, vec![vec![2; 50]]);
    assert_eq!(b.stats().recv_truncated, 1);
}

#[test]
fn reuse_port_lets_shards_share_a_port() {
    let first = BatchSocket::bind(loopback(), &SocketConfig::default()).unwrap();
    let port = first.local_addr();
    let second = BatchSocket::bind(port, &SocketConfig::default());
    assert!(second.is_ok());
    let exclusive = SocketConfig {
        reuse_port: false,
        ..SocketConfig::default()
    };
    assert!(BatchSocket::bind(port, &exclusive).is_err());
}

/// A server and a client endpoint, each on its own socket and loop, in one
/// glommio executor: handshake, reliable messages both ways (one 256 KiB),
/// graceful close. Optionally through lossy conditioners.
fn endpoints_over_loopback(lossy: bool) {
    let executor = driver::executor().unwrap();
    executor.run(async move {
        let mut server_socket = BatchSocket::bind(loopback(), &SocketConfig::default()).unwrap();
        let mut client_socket = BatchSocket::bind(loopback(), &SocketConfig::default()).unwrap();
        if lossy {
            let link = ConditionerConfig {
                loss: Loss::Random(0.1),
                latency: Duration::from_millis(2),
                jitter: Duration::from_millis(3),
                reorder: 0.05,
                reorder_delay: Duration::from_millis(5),
                duplicate: 0.02,
                ..ConditionerConfig::default()
            };
            server_socket.set_conditioner(Some(LinkConditioner::new(link.clone(), 1)));
            client_socket.set_conditioner(Some(LinkConditioner::new(link, 2)));
        }
        let server_addr = server_socket.local_addr();
        let mut server = Endpoint::new(Config::server(), driver::os_seed().unwrap()).unwrap();
        let mut client = Endpoint::new(Config::client(), 7).unwrap();
        let stop = Rc::new(Cell::new(false));
        let give_up = Instant::now() + Duration::from_secs(60);

        let server_stop = stop.clone();
        let server_task = glommio::spawn_local(async move {
            let mut echoed = 0u32;
            driver::run_endpoint(
                &mut server,
                &mut server_socket,
                Duration::from_millis(5),
                |ep, _| {
                    while let Some(event) = ep.poll_event() {
                        if let Event::Message {
                            connection,
                            channel,
                            bytes,
                        } = event
                        {
                            // Echo a receipt for every message.
                            let (_, seq) = check_message(&bytes);
                            ep.send(connection, channel, &make_message(2, seq, 16))
                                .unwrap();
                            echoed += 1;
                            ep.recycle(bytes);
                        }
                    }
                    if server_stop.get() || Instant::now() > give_up {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .await
            .unwrap();
            echoed
        })
        .detach();

        let mut connection = None;
        let mut sent = false;
        let mut receipts = Vec::new();
        let mut closed = false;
        driver::run_endpoint(
            &mut client,
            &mut client_socket,
            Duration::from_millis(5),
            |ep, now| {
                let handle =
                    *connection.get_or_insert_with(|| ep.connect(now, server_addr).unwrap());
                while let Some(event) = ep.poll_event() {
                    match event {
                        Event::Connected { .. } if !sent => {
                            for i in 0..200 {
                                ep.send(
                                    handle,
                                    ChannelId::RELIABLE_ORDERED,
                                    &make_message(1, i, 100 + i as usize),
                                )
                                .unwrap();
                            }
                            ep.send(
                                handle,
                                ChannelId::RELIABLE_ORDERED,
                                &make_message(1, 200, 256 * 1024),
                            )
                            .unwrap();
                            sent = true;
                        }
                        Event::Message { bytes, .. } => receipts.push(check_message(&bytes).1),
                        Event::Disconnected { reason, .. } => {
                            assert_eq!(reason, tessera_net::DisconnectReason::Local(3));
                            closed = true;
                        }
                        _ => {}
                    }
                }
                if receipts.len() == 201 && !closed {
                    ep.disconnect(now, handle, 3).unwrap();
                }
                if (closed && ep.connection_count() == 0) || Instant::now() > give_up {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .await
        .unwrap();
        // Give the server a moment to hear the disconnect, then stop it.
        glommio::timer::sleep(Duration::from_millis(100)).await;
        stop.set(true);
        let echoed = server_task.await.unwrap();
        assert_eq!(receipts, (0..=200).collect::<Vec<_>>(), "receipts in order");
        assert_eq!(echoed, 201);
        assert!(closed);
    });
}

#[test]
fn endpoints_talk_over_loopback() {
    endpoints_over_loopback(false);
}

#[test]
fn endpoints_talk_over_a_conditioned_loopback() {
    endpoints_over_loopback(true);
}
