//! End-to-end on loopback: a real `tessera serve` process, 200 simulated
//! clients walking across cells owned by different shards, the client
//! commands, garbage at the game port, and SIGTERM. Every process is started
//! and stopped by the test; waits are bounded.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_net::{Endpoint, Event};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    game: SocketAddr,
    metrics: SocketAddr,
    admin: SocketAddr,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--shards",
                "2",
                "--unpinned",
                "--world",
                "4x4",
                "--npcs",
                "300",
            ])
            .args([
                "--metrics-addr",
                &metrics.to_string(),
                "--admin-addr",
                &admin.to_string(),
                "--duration",
                "120",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tessera serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("server printed nothing").unwrap();
        let addr = first
            .split("udp://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("address line");
        let game: SocketAddr = addr.parse().unwrap();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            game,
            metrics,
            admin,
        }
    }

    fn tessera(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(BIN).args(args).output().expect("run tessera");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn metric(&self, name_and_labels: &str) -> f64 {
        let mut s = std::net::TcpStream::connect(self.metrics).unwrap();
        use std::io::Write;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| l.starts_with(name_and_labels))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sim_value(report: &serde_json::Value, metric: &str) -> f64 {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} in the report"))["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_node_serves_200_commuting_clients_and_stops_cleanly() {
    let mut server = Server::start(&[]);
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
    let (ok, out) = server.tessera(&["admin", "--addr", &server.admin.to_string(), "status"]);
    assert!(
        ok && out.contains("cell") && out.contains("sessions"),
        "{out}"
    );

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
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(sim_value(&report, "clients_joined"), 200.0, "{out}");
    assert_eq!(sim_value(&report, "clients_failed"), 0.0, "{out}");
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

    // Garbage at the game port is counted and changes nothing.
    let refused_before = server.metric("tessera_drops_total");
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x = 0x1234_5678u64;
    for i in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 1400) as usize + 1;
        let mut bytes: Vec<u8> = (0..len).map(|k| (x >> (k % 56)) as u8).collect();
        if i % 3 == 0 && bytes.len() > 4 {
            // Our protocol id with garbage after it.
            bytes[0] = 0x54;
            bytes[1] = 0x53;
        }
        junk.send_to(&bytes, server.game).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let refused_after = server.metric("tessera_drops_total");
    assert!(
        refused_after - refused_before >= 400.0,
        "garbage not counted: {refused_before} -> {refused_after}"
    );
    let (ok, out) = server.tessera(&["client", "--addr", &addr, "ping", "--count", "2"]);
    assert!(ok, "server stopped answering after garbage: {out}");

    // A connected client hears the shutdown; the server exits 0.
    let mut endpoint = Endpoint::new(tessera_net::Config::game_client(1), 99).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let connection = endpoint.connect(Instant::now(), server.game).unwrap();
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

#[test]
fn mistakes_give_one_clear_line_and_a_nonzero_exit() {
    // Port in use.
    let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--unpinned",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is in use") && err.lines().count() == 1,
        "{err}"
    );
    // Bad flag value.
    let out = Command::new(BIN)
        .args(["serve", "--tick-hz", "500"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.lines().count() == 1 && err.contains("tick-hz"),
        "{err}"
    );
    // Bad config file.
    let cfg = std::env::temp_dir().join(format!("tessera-bad-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[shard]]\nid = 0\ncells = [\"0:0,0\", \"0:0,0\"]\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--world",
            "1x1",
            "--shards",
            "1",
            "--unpinned",
            "--port",
            "0",
        ])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("assigned twice") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
}
