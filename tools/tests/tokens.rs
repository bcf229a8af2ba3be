//! End-to-end on loopback: a node started with `--key` lets in only clients
//! with a valid connect token, and seals their sessions; bots with tokens
//! play as usual.

mod common;

use common::{all_joined, dev_key_path, free_tcp_port, run, run_env, sim_value, Guarded, Server};

fn key_file(name: &str) -> std::path::PathBuf {
    let (ok, key) = run(&["token", "key"]);
    assert!(ok && key.trim().len() == 64, "{key}");
    let path = std::env::temp_dir().join(format!("tessera-{name}-{}.key", std::process::id()));
    std::fs::write(&path, key).unwrap();
    path
}

#[test]
fn a_node_with_a_key_admits_only_valid_tokens_and_bots_with_tokens_play() {
    let key = key_file("e2e");
    let key_arg = key.to_str().unwrap();
    // One host plays 100 bots: no per-address session cap, a generous
    // handshake rate.
    let mut server = Server::start(&[
        "--shards",
        "2",
        "--world",
        "4x4",
        "--npcs",
        "100",
        "--key",
        key_arg,
        "--sessions-per-address",
        "0",
        "--handshakes-per-address",
        "2000",
    ]);
    let addr = server.game.to_string();

    // Without a token (and no development key to fall back on): refused,
    // with a reason the client can act on.
    let (ok, out) = run_env(
        &["client", "--addr", &addr, "ping", "--count", "1"],
        &[("TESSERA_DEV_KEY", "/nonexistent/tessera-dev.key")],
    );
    assert!(!ok && out.contains("TokenRequired"), "{out}");
    // A token minted with the key: in.
    let (ok, out) = server.tessera(&[
        "client",
        "--addr",
        &addr,
        "--token-key",
        key_arg,
        "ping",
        "--count",
        "3",
    ]);
    assert!(ok && out.contains("pongs"), "{out}");
    // Minted by the operator command, passed as text.
    let mint = |client_id: &str, server: &str, extra: &[&str]| {
        let mut args = vec![
            "token",
            "mint",
            "--key",
            key_arg,
            "--client-id",
            client_id,
            "--server",
            server,
        ];
        args.extend_from_slice(extra);
        let (ok, token) = run(&args);
        assert!(ok, "{token}");
        token.trim().to_string()
    };
    let token = mint("5", &addr, &[]);
    let (ok, out) = server.tessera(&[
        "client",
        "--addr",
        &addr,
        "--token",
        &token,
        "--name",
        "ada",
        "join",
        "--seconds",
        "1",
    ]);
    assert!(ok && out.contains("joined as entity"), "{out}");
    // Expired, or for another server: refused with the reason.
    for (token, why) in [
        (mint("6", &addr, &["--expires-in", "0"]), "TokenExpired"),
        (mint("7", "127.0.0.9:7777", &[]), "TokenWrongAddress"),
    ] {
        let (ok, out) = server.tessera(&[
            "client", "--addr", &addr, "--token", &token, "ping", "--count", "1",
        ]);
        assert!(!ok && out.contains(why), "{why}: {out}");
    }
    // Another key's token is dropped without a word: the client times out.
    let other = key_file("other");
    let (ok, out) = server.tessera(&[
        "client",
        "--addr",
        &addr,
        "--token-key",
        other.to_str().unwrap(),
        "ping",
        "--count",
        "1",
    ]);
    assert!(!ok && out.contains("HandshakeTimedOut"), "{out}");

    // 100 bots with tokens commute across both shards' cells.
    let report = std::env::temp_dir().join(format!("tessera-tokens-{}.json", std::process::id()));
    let (ok, out) = server.tessera(&[
        "sim",
        "--addr",
        &addr,
        "--clients",
        "100",
        "--sockets",
        "8",
        "--duration",
        "4",
        "--ramp",
        "1",
        "--pattern",
        "commute",
        "--token-key",
        key_arg,
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "sim failed: {out}");
    let report = all_joined(&report, 100, &out);
    assert_eq!(sim_value(&report, "verify_errors"), 0.0, "{out}");
    // Each refusal was counted under its reason; nothing failed to open.
    let drops = |reason: &str| server.drops(reason);
    assert!(drops("token_required") >= 1.0);
    assert!(drops("token_expired") >= 1.0);
    assert!(drops("token_wrong_address") >= 1.0);
    assert!(drops("bad_token") >= 1.0);
    assert_eq!(drops("bad_seal"), 0.0);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(&other);
}

/// This machine's address on its default route, if it has one that is not
/// loopback (connecting a UDP socket sends nothing).
fn lan_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn the_admin_port_answers_off_loopback_only_with_its_token() {
    // Without a token, an admin port reachable off loopback is refused at
    // start.
    let (ok, out) = run(&[
        "serve",
        "--port",
        "0",
        "--unpinned",
        "--admin-addr",
        "0.0.0.0:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--duration",
        "5",
    ]);
    assert!(!ok && out.contains("--admin-token-file"), "{out}");

    let token_file =
        std::env::temp_dir().join(format!("tessera-admin-{}.token", std::process::id()));
    std::fs::write(&token_file, "# admin\nfeedc0de-5ca1ab1e-0001\n").unwrap();
    let tf = token_file.to_str().unwrap();
    let admin_port = free_tcp_port();
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let _node = Guarded::spawn(&[
        "serve",
        "--port",
        "0",
        "--unpinned",
        "--world",
        "2x2",
        "--npcs",
        "10",
        "--admin-addr",
        &format!("0.0.0.0:{admin_port}"),
        "--admin-token-file",
        tf,
        "--metrics-addr",
        &metrics,
        "--duration",
        "60",
    ]);
    let local = format!("127.0.0.1:{admin_port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Loopback needs no token.
    loop {
        let (ok, out) = run(&["admin", "--addr", &local, "status"]);
        if ok {
            assert!(out.contains("sessions"), "{out}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let Some(ip) = lan_ip() else {
        eprintln!(
            "no address off loopback on this machine: the refusal is covered by the unit test only"
        );
        return;
    };
    let remote = format!("{ip}:{admin_port}");
    let (ok, out) = run(&["admin", "--addr", &remote, "status"]);
    assert!(!ok && out.contains("refused"), "{out}");
    let (ok, out) = run(&["admin", "--addr", &remote, "--token-file", tf, "status"]);
    assert!(ok && out.contains("sessions"), "{out}");
    let wrong = std::env::temp_dir().join(format!("tessera-admin-{}.wrong", std::process::id()));
    std::fs::write(&wrong, "feedc0de-5ca1ab1e-0002\n").unwrap();
    let (ok, out) = run(&[
        "admin",
        "--addr",
        &remote,
        "--token-file",
        wrong.to_str().unwrap(),
        "status",
    ]);
    assert!(!ok && out.contains("refused"), "{out}");
    let body = http_get(&metrics, "/metrics");
    let refused: f64 = body
        .lines()
        .find(|l| l.starts_with("tessera_admin_refused_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("the refusal counter");
    assert_eq!(refused, 2.0, "{body}");
    let _ = std::fs::remove_file(&token_file);
    let _ = std::fs::remove_file(&wrong);
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn entity_of(out: &str) -> Option<u64> {
    out.split("joined as entity ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A player whose client dies without a word (killed) comes back with the
/// same token identity and takes its avatar back; a player who left gets
/// a fresh one.
#[test]
fn a_player_whose_client_died_takes_its_avatar_back() {
    let server = Server::start(&["--shards", "2", "--world", "2x2", "--npcs", "20"]);
    let addr = server.game.to_string();
    let key = dev_key_path();
    let key = key.to_str().unwrap();
    let client = |seconds: &str| {
        Guarded::spawn(&[
            "client",
            "--addr",
            &addr,
            "--token-key",
            key,
            "--client-id",
            "4242",
            "join",
            "--seconds",
            seconds,
        ])
    };
    let first = client("60");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let entity = loop {
        if let Some(e) = entity_of(&first.output()) {
            break e;
        }
        assert!(std::time::Instant::now() < deadline, "{}", first.output());
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Killed: no leave, no disconnect; the node times the session out.
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let again = loop {
        // Refused (TokenInUse) until the old session times out.
        let (ok, out) = client("1").finish(std::time::Duration::from_secs(20));
        if ok {
            break entity_of(&out).expect(&out);
        }
        assert!(out.contains("TokenInUse"), "{out}");
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(again, entity, "the same avatar");
    // That client left (its join ended with a leave): a fresh avatar now.
    let (ok, out) = client("1").finish(std::time::Duration::from_secs(20));
    assert!(ok, "{out}");
    assert_ne!(entity_of(&out), Some(entity), "{out}");
    assert!(server.metric("tessera_avatars_reclaimed_total") >= 1.0);
}

/// Legitimate players keep playing while one host floods the node from
/// hundreds of source ports with valid tokens (a stolen key at worst) and
/// forged ones, and one of its sessions floods game messages: the host
/// gets its handshake rate and its session cap and no more, forgeries are
/// dropped, the flooding session is closed, every player stays in.
#[test]
fn a_flood_from_many_ports_is_held_at_its_limits_while_players_play() {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    use tessera_net::token::{ConnectToken, SessionKeys, TokenKey, TokenRequest};
    use tessera_net::{ChannelId, Config, Endpoint, Event, TransmitBatch};

    let key = key_file("flood");
    let key_arg = key.to_str().unwrap();
    // Default per-address limits: 32 sessions, 10 handshakes a second.
    let server = Server::start(&[
        "--shards", "1", "--world", "4x4", "--npcs", "50", "--key", key_arg,
    ]);
    let addr = server.game.to_string();
    let report = std::env::temp_dir().join(format!("tessera-flood-{}.json", std::process::id()));
    let players = Guarded::spawn(&[
        "sim",
        "--addr",
        &addr,
        "--clients",
        "20",
        "--sockets",
        "4",
        "--duration",
        "14",
        "--ramp",
        "3",
        "--pattern",
        "commute",
        "--token-key",
        key_arg,
        "--out",
        report.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_secs(5));

    let hex = std::fs::read_to_string(&key).unwrap();
    let token_key = TokenKey::from_hex(hex.trim()).unwrap();
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mint = |player: u64, k: &TokenKey| {
        ConnectToken::mint(
            k,
            &TokenRequest {
                client_id: player,
                expires_unix_s: unix_s + 60,
                servers: &[server.game],
                user_data: b"flood",
            },
            SessionKeys {
                client_to_server: [player as u8; 32],
                server_to_client: [!(player as u8); 32],
            },
            [player as u8; 24],
        )
        .unwrap()
    };
    // Host A (127.0.0.67) blasts handshakes from 600 ports: half with
    // valid tokens, half forged. Host B (127.0.0.66) opens 40 sessions at
    // a pace its handshake rate allows, from 40 ports. Host C (127.0.0.68)
    // opens one session that floods game messages.
    let forged_key = TokenKey([0x66; 32]);
    struct Flooder {
        socket: UdpSocket,
        endpoint: Endpoint,
        token: ConnectToken,
        start: Duration,
        handle: Option<tessera_net::ConnectionHandle>,
        up: bool,
        paced: bool,
        flooding: bool,
    }
    let mut flood: Vec<Flooder> = (0..641u64)
        .map(|i| {
            let paced = (600..640).contains(&i);
            let ip = match i {
                0..600 => "127.0.0.67:0",
                600..640 => "127.0.0.66:0",
                _ => "127.0.0.68:0",
            };
            let socket = UdpSocket::bind(ip).unwrap();
            socket.set_nonblocking(true).unwrap();
            // Host A's valid and forged tokens alternate.
            let valid = i >= 600 || i % 2 == 0;
            Flooder {
                socket,
                endpoint: Endpoint::new(Config::game_client(1), 9000 + i).unwrap(),
                token: mint(50_000 + i, if valid { &token_key } else { &forged_key }),
                start: Duration::from_millis(if paced { (i - 600) * 150 } else { 0 }),
                flooding: i == 640,
                handle: None,
                up: false,
                paced,
            }
        })
        .collect();
    let ping = {
        let mut fbb = tessera_schema::flatbuffers::FlatBufferBuilder::with_capacity(64);
        tessera_schema::client::encode(
            &mut fbb,
            &tessera_schema::client::ClientMessage::Ping { client_time_us: 1 },
        )
        .to_vec()
    };
    let mut batch = TransmitBatch::new(32);
    let mut buf = [0u8; 2048];
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(8) {
        let now = Instant::now();
        for f in flood.iter_mut() {
            if f.handle.is_none() {
                if began.elapsed() < f.start {
                    continue;
                }
                f.handle = f
                    .endpoint
                    .connect_with_token(now, server.game, &f.token)
                    .ok();
            }
            if let (true, true, Some(h)) = (f.flooding, f.up, f.handle) {
                // Far over a player's rate.
                for _ in 0..20 {
                    let _ = f.endpoint.send(h, ChannelId(0), &ping);
                }
            }
            while let Ok((n, from)) = f.socket.recv_from(&mut buf) {
                f.endpoint.handle_datagram(now, from, &buf[..n]);
            }
            f.endpoint.handle_timeout(now);
            while let Some(ev) = f.endpoint.poll_event() {
                if let Event::Connected { .. } = ev {
                    f.up = true;
                }
            }
            batch.clear();
            let _ = f.endpoint.poll_transmit(now, &mut batch);
            for t in batch.iter() {
                let _ = f.socket.send_to(t.payload, t.destination);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let connected = flood
        .iter()
        .filter(|f| f.paced && f.handle.is_some_and(|h| f.endpoint.is_connected(h)))
        .count();
    assert!(flood[640].up, "host C's session opened");
    drop(flood);

    let (ok, out) = players.finish(Duration::from_secs(60));
    assert!(ok, "the players' simulator failed: {out}");
    let report = all_joined(&report, 20, &out);
    assert_eq!(sim_value(&report, "verify_errors"), 0.0, "{out}");
    let drops = |reason: &str| server.drops(reason);
    eprintln!(
        "flood: host B sessions {connected} of 40; drops {:?}",
        server
            .by_reason("tessera_drops_total{")
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        connected, 32,
        "of host B's 40 sessions, its cap of 32 open (and stay open)"
    );
    assert!(
        drops("address_sessions") >= 8.0,
        "host B refused past its cap"
    );
    assert!(drops("address_handshake_rate") >= 100.0, "handshake rate");
    assert!(drops("bad_token") >= 1.0, "forgeries dropped");
    assert!(
        drops("input_rate_limited") + drops("peer_rate_limited") >= 1.0,
        "game message flood dropped"
    );
    assert!(
        drops("session_closed_for_flooding") + drops("peer_closed_for_abuse") >= 1.0,
        "a flooding session is closed"
    );
    let _ = std::fs::remove_file(&key);
}
