//! End-to-end on loopback: a real `tessera serve` process, 200 simulated
//! clients walking across cells owned by different shards, the client
//! commands, garbage at the game port, and SIGTERM. Every process is started
//! and stopped by the test; waits are bounded.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{sim_value, Guarded, Server};
use tessera_net::{Endpoint, Event};

/// The node of these tests: 2 shards over a 4x4 world, 300 NPCs.
fn node(extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--world", "4x4", "--npcs", "300"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn a_node_serves_200_commuting_clients_and_stops_cleanly() {
    let mut server = node(&[]);
    let addr = server.game.to_string();

    // The client commands work.
    let (ok, out) = server.tessera(&["client", "--addr", &addr, "ping", "--count", "3"]);
    assert!(ok && out.contains("pongs"), "{out}");
    let (ok, out) = server.tessera(&[
        "client",
        "--addr",
        &addr,
        "--name",
        "ada",
        "join",
        "--seconds",
        "1",
    ]);
    assert!(ok && out.contains("joined as entity"), "{out}");
    let (ok, out) = server.tessera(&[
        "client",
        "--addr",
        &addr,
        "move",
        "--dx",
        "1",
        "--dy",
        "0",
        "--seconds",
        "1",
    ]);
    assert!(ok && out.contains("at ("), "{out}");
    let script = std::env::temp_dir().join(format!("tessera-e2e-{}.txt", std::process::id()));
    std::fs::write(
        &script,
        "# a script\njoin bob\nmove 0 1\nsleep 300\nwhere\nview\nping\nleave\n",
    )
    .unwrap();
    let (ok, out) = server.tessera(&[
        "client",
        "--addr",
        &addr,
        "script",
        script.to_str().unwrap(),
    ]);
    assert!(
        ok && out.contains("rtt") && out.contains("entities"),
        "{out}"
    );
    let (ok, out) = server.admin(&["status"]);
    assert!(
        ok && out.contains("cell") && out.contains("sessions"),
        "{out}"
    );
    // The node's refusals reach the operator as one line and a failure exit.
    for (args, why) in [
        (&["move", "0:9,9", "1"][..], "not a leaf"),
        (&["move", "0:0,0", "7"][..], "does not exist"),
        (&["merge", "0:0,0"][..], "not a leaf"),
    ] {
        let (ok, out) = server.admin(args);
        assert!(
            !ok && out.contains("refused") && out.contains(why),
            "{args:?}: {out}"
        );
    }

    // 200 bots commute diagonally across cells owned by both shards. They
    // use 16 sockets: SO_REUSEPORT spreads sessions by source address, so
    // both shards host sessions (one socket would land on one shard).
    let report_path =
        std::env::temp_dir().join(format!("tessera-e2e-sim-{}.json", std::process::id()));
    let (ok, out) = server.tessera(&[
        "sim",
        "--addr",
        &addr,
        "--clients",
        "200",
        "--sockets",
        "16",
        "--duration",
        "6",
        "--ramp",
        "1",
        "--pattern",
        "commute",
        "--verify-every",
        "10",
        "--out",
        report_path.to_str().unwrap(),
    ]);
    assert!(ok, "sim failed: {out}");
    let report = common::all_joined(&report_path, 200, &out);
    // Rebuilt views are consistent: no duplicate entity, no missing baseline.
    assert!(sim_value(&report, "verified_snapshots") > 500.0, "{out}");
    assert_eq!(sim_value(&report, "verify_errors"), 0.0, "{out}");
    assert_eq!(sim_value(&report, "gaps_over_2_ticks"), 0.0, "{out}");
    assert!(sim_value(&report, "snapshots_per_client_s") > 0.0, "{out}");
    // They crossed cells, and cells of both shards were involved.
    let transfers = server.metric("tessera_transfers_total{shard=\"0\",direction=\"in\"}")
        + server.metric("tessera_transfers_total{shard=\"1\",direction=\"in\"}");
    assert!(transfers > 0.0, "no entity crossed a border");
    assert!(server.metric("tessera_snapshots_sent_total{shard=\"0\"}") > 0.0);
    assert!(server.metric("tessera_snapshots_sent_total{shard=\"1\"}") > 0.0);

    // Garbage at the game port is counted, each datagram once, and changes
    // nothing. Sent in bursts small enough for the socket buffer; after each
    // burst the counters must catch up (bounded wait).
    // Only the reasons for bad bytes: frames refused to closing sessions
    // and the like count in the same family.
    let drops = |server: &Server| -> f64 {
        server
            .by_reason("tessera_drops_total{")
            .into_iter()
            .filter(|(reason, _)| {
                reason.starts_with("frame_")
                    || [
                        "bad_header",
                        "bad_version",
                        "bad_body",
                        "bad_frame",
                        "unknown_channel",
                        "oversized",
                        "unknown_connection",
                        "address_mismatch",
                        "unexpected",
                        "short_handshake",
                        "bad_cookie",
                        "expired_cookie",
                    ]
                    .contains(&reason.as_str())
            })
            .map(|(_, v)| v)
            .sum()
    };
    // Late packets of the clients that just left may still be queued on a
    // loaded machine: start once the counters are quiet for a second.
    let mut last = (drops(&server), Instant::now());
    let quiet = server.poll(Duration::from_secs(15), |s| {
        let now = drops(s);
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= Duration::from_secs(1)
    });
    assert!(quiet, "drops never settled");
    let refused_before = drops(&server);
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x = 0x1234_5678u64;
    let mut sent = 0.0;
    for burst in 0..10 {
        for i in 0..50 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 1400) as usize + 1;
            let mut bytes: Vec<u8> = (0..len).map(|k| (x >> (k % 56)) as u8).collect();
            if (burst * 50 + i) % 3 == 0 && bytes.len() > 4 {
                // Our protocol id with garbage after it.
                bytes[0] = 0x54;
                bytes[1] = 0x53;
            }
            junk.send_to(&bytes, server.game).unwrap();
            sent += 1.0;
        }
        let counted = server.poll(Duration::from_secs(5), |s| {
            drops(s) - refused_before >= sent
        });
        assert!(
            counted,
            "garbage not counted: {} of {sent}",
            drops(&server) - refused_before
        );
    }
    assert_eq!(
        drops(&server) - refused_before,
        sent,
        "each datagram counted once"
    );
    let (ok, out) = server.tessera(&["client", "--addr", &addr, "ping", "--count", "2"]);
    assert!(ok, "server stopped answering after garbage: {out}");

    // A connected client hears the shutdown; the server exits 0.
    let mut endpoint = Endpoint::new(tessera_net::Config::game_client(1), 99).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let token = common::dev_token(server.game, 77);
    let connection = endpoint
        .connect_with_token(Instant::now(), server.game, &token)
        .unwrap();
    let pump = |endpoint: &mut Endpoint| -> Vec<Event> {
        let now = Instant::now();
        let mut batch = tessera_net::TransmitBatch::new(16);
        let _ = endpoint.poll_transmit(now, &mut batch);
        for t in batch.iter() {
            socket.send_to(t.payload, t.destination).unwrap();
        }
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            endpoint.handle_datagram(Instant::now(), from, &buf[..n]);
        }
        if endpoint.poll_timeout().is_some_and(|t| t <= Instant::now()) {
            endpoint.handle_timeout(Instant::now());
        }
        std::iter::from_fn(|| endpoint.poll_event()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pump(&mut endpoint)
        .iter()
        .any(|e| matches!(e, Event::Connected { .. }))
    {
        assert!(Instant::now() < deadline, "could not connect");
    }
    let status = server.terminate();
    assert!(status.success(), "server exit status {status:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        if let Some(reason) = pump(&mut endpoint).into_iter().find_map(|e| match e {
            Event::Disconnected { reason, .. } => Some(reason),
            _ => None,
        }) {
            break reason;
        }
        assert!(
            Instant::now() < deadline,
            "the client never heard the shutdown"
        );
    };
    assert_eq!(
        format!("{reason:?}"),
        format!(
            "{:?}",
            tessera_net::DisconnectReason::Remote(
                tessera_schema::protocol::disconnect::SHUTTING_DOWN
            )
        ),
        "connection {connection:?}"
    );
}

/// Runs `tessera args` that must fail fast (a mistake), never on the
/// default ports, killed if it does not end.
fn must_fail(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend_from_slice(&[
        "--metrics-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--unpinned",
        "--duration",
        "5",
    ]);
    let (ok, out) = Guarded::spawn(&all).finish(Duration::from_secs(20));
    assert!(!ok, "{args:?} succeeded: {out}");
    assert!(
        !out.contains("panicked") && !out.contains("backtrace"),
        "{out}"
    );
    out
}

#[test]
fn mistakes_give_one_clear_line_and_a_nonzero_exit() {
    // Port in use.
    let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let err = must_fail(&["serve", "--bind", "127.0.0.1", "--port", &port]);
    assert!(
        err.contains("is in use") && err.lines().count() == 1,
        "{err}"
    );
    // Bad flag value.
    let err = must_fail(&["serve", "--port", "0", "--tick-hz", "500"]);
    assert!(err.lines().count() == 1 && err.contains("tick-hz"), "{err}");
    // Bad config file.
    let cfg = std::env::temp_dir().join(format!("tessera-bad-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[shard]]\nid = 0\ncells = [\"0:0,0\", \"0:0,0\"]\n").unwrap();
    let err = must_fail(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--world",
        "1x1",
        "--shards",
        "1",
        "--port",
        "0",
    ]);
    let _ = std::fs::remove_file(&cfg);
    assert!(
        err.contains("assigned twice") && err.lines().count() == 1,
        "{err}"
    );
    // Development mode (no --key) serves loopback only.
    let err = must_fail(&["serve", "--bind", "0.0.0.0", "--port", "0"]);
    assert!(
        err.contains("loopback clients only") && err.contains("--key") && err.lines().count() == 1,
        "{err}"
    );
}

/// An operator stops the node while 200 clients play and a handover is in
/// flight: every session hears the shutdown, the handover ends one way or
/// the other, the node exits 0 and logs no error.
#[test]
fn shutdown_with_sessions_and_a_handover_in_flight() {
    let mut server = node(&["--no-balance"]);
    let addr = server.game.to_string();
    let report = std::env::temp_dir().join(format!("tessera-e2e-stop-{}.json", std::process::id()));
    let sim = Guarded::spawn(&[
        "sim",
        "--addr",
        &addr,
        "--clients",
        "200",
        "--sockets",
        "16",
        "--duration",
        "15",
        "--ramp",
        "1",
        "--out",
        report.to_str().unwrap(),
    ]);
    let all_in = server.poll(Duration::from_secs(20), |s| {
        s.metric("tessera_sessions") >= 200.0
    });
    assert!(all_in, "sessions: {}", server.metric("tessera_sessions"));
    // A handover of a busy cell, and at once the shutdown.
    let (ok, out) = server.admin(&["move", "0:0,0", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = server.admin(&["shutdown"]);
    assert!(ok, "{out}");
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "server exit status {status:?}");
    let (ok, out) = sim.finish(Duration::from_secs(40));
    assert!(ok, "sim: {out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(sim_value(&report, "clients_joined"), 200.0, "{out}");
    assert_eq!(
        sim_value(&report, "clients_told_shutdown"),
        200.0,
        "every session hears the shutdown: {out}"
    );
    let log = server.log_text();
    assert!(
        log.contains("shutdown requested on the admin port"),
        "{log}"
    );
    for bad in ["ERROR", "panicked", "commit before the diff"] {
        assert!(!log.contains(bad), "{bad} in the log:\n{log}");
    }
}

/// A second signal while the node stops gracefully ends it at once.
#[test]
fn a_second_signal_exits_at_once() {
    let mut server = node(&[]);
    let sim = Guarded::spawn(&[
        "sim",
        "--addr",
        &server.game.to_string(),
        "--clients",
        "50",
        "--duration",
        "10",
        "--ramp",
        "1",
    ]);
    let playing = server.poll(Duration::from_secs(20), |s| {
        s.metric("tessera_sessions") >= 50.0
    });
    assert!(playing);
    server.signal(libc::SIGTERM);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    // Either the graceful stop was over before the second signal (0), or
    // the second signal cut it short (130, logged).
    match status.code() {
        Some(0) => {}
        Some(130) => assert!(
            server.log_text().contains("second signal"),
            "{}",
            server.log_text()
        ),
        other => panic!("exit {other:?}: {}", server.log_text()),
    }
    drop(sim);
}

/// The admin epoch (seed 002): an operator pins a cell to its owner at
/// `u32::MAX`; a handover of it in flight is overridden, the cell keeps
/// running where it is with its entities, and nothing moves it again. The
/// log says so loudly.
#[test]
fn an_operator_pins_a_cell_at_the_admin_epoch() {
    let server = node(&["--no-balance"]);
    let status = |server: &Server| -> serde_json::Value {
        let (ok, out) = server.admin(&["--json", "status"]);
        assert!(ok, "{out}");
        serde_json::from_str(&out).unwrap()
    };
    let cell_of = |st: &serde_json::Value, id: &str| -> serde_json::Value {
        st["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cell"] == id)
            .cloned()
            .unwrap()
    };
    let entities = |st: &serde_json::Value| -> u64 {
        st["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["entities"].as_u64().unwrap())
            .sum()
    };
    let settled = server.poll(Duration::from_secs(10), |s| {
        let (_, out) = s.admin(&["--json", "status"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .map(|st| entities(&st) == 300)
            .unwrap_or(false)
    });
    assert!(settled, "{:?}", server.admin(&["status"]));
    let before = cell_of(&status(&server), "0:0,0");
    // A handover starts; the pin overrides it (or, if it was already
    // committing, waits for it and pins where it landed).
    let (ok, out) = server.admin(&[
        "move",
        "0:0,0",
        &(1 - before["owner"].as_u64().unwrap()).to_string(),
    ]);
    assert!(ok, "{out}");
    let mut pinned = false;
    for _ in 0..50 {
        let (ok, out) = server.admin(&["pin", "0:0,0"]);
        assert!(ok, "{out}");
        if out.contains("pinned") && !out.contains("error") {
            pinned = true;
            break;
        }
        assert!(out.contains("try again"), "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pinned, "the pin never went through");
    let after = server.poll(Duration::from_secs(5), |s| {
        let (_, out) = s.admin(&["--json", "status"]);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        cell_of(&st, "0:0,0")["epoch"] == u64::from(u32::MAX) && entities(&st) == 300
    });
    assert!(after, "{:?}", server.admin(&["status"]));
    let (ok, out) = server.admin(&["move", "0:0,0", "0"]);
    assert!(
        !out.contains("started") && out.contains("pinned") || out.contains("already on"),
        "{ok} {out}"
    );
    let (_, out) = server.admin(&["split", "0:0,0"]);
    assert!(out.contains("pinned"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let st = status(&server);
    assert_eq!(entities(&st), 300, "nothing lost: {st}");
    assert!(server.log_text().contains("ADMIN EPOCH"));
}
