//! What the end-to-end tests share: a `tessera serve` child process that is
//! killed on every exit path (a guard), on free loopback ports only, with
//! its log kept in a file; bounded waits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running node; killed when dropped.
pub struct Server {
    pub child: Child,
    pub game: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    /// Starts `tessera serve` on free loopback ports with `args` (which set
    /// the world, shards...), and waits for its address line.
    pub fn start(args: &[&str]) -> Server {
        Self::start_at("127.0.0.1", args)
    }

    /// As [`Server::start`], with the game port on `bind` (a loopback
    /// address of its own, for clusters).
    pub fn start_at(bind: &str, args: &[&str]) -> Server {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!(
            "tessera-e2e-{}-{}.log",
            std::process::id(),
            admin.port()
        ));
        let mut child = Command::new(BIN)
            .args(["serve", "--port", "0", "--bind", bind, "--unpinned"])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--admin-addr", &admin.to_string(), "--duration", "120"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tessera serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let Some(Ok(first)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server printed nothing: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let game = first
            .split("udp://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok());
        let Some(game) = game else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no address in the server's first line: {first}");
        };
        Server {
            child,
            game,
            metrics,
            admin,
            log,
        }
    }

    /// Runs a `tessera` command to its end: (success, stdout + stderr).
    pub fn tessera(&self, args: &[&str]) -> (bool, String) {
        run(args)
    }

    /// `tessera admin` against this node.
    pub fn admin(&self, args: &[&str]) -> (bool, String) {
        let addr = self.admin.to_string();
        let mut all = vec!["admin", "--addr", &addr];
        all.extend_from_slice(args);
        run(&all)
    }

    /// The sum of the metric samples whose line starts with `name_and_labels`.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let mut s = std::net::TcpStream::connect(self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| l.starts_with(name_and_labels))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    }

    /// `tessera_drops_total` under `reason`, summed over shards.
    pub fn drops(&self, reason: &str) -> f64 {
        self.by_reason("tessera_drops_total{")
            .into_iter()
            .filter(|(r, _)| r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// The metric samples whose line starts with `prefix`, by the value of
    /// their `reason` label.
    pub fn by_reason(&self, prefix: &str) -> Vec<(String, f64)> {
        self.by_label(prefix, "reason")
    }

    /// The metric samples whose line starts with `prefix`, by the value of
    /// their `label` label.
    pub fn by_label(&self, prefix: &str, label: &str) -> Vec<(String, f64)> {
        let mut s = std::net::TcpStream::connect(self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| {
                let reason = l.split(&format!("{label}=\"")).nth(1)?.split('"').next()?;
                let value = l.split_whitespace().nth(1)?.parse::<f64>().ok()?;
                Some((reason.to_string(), value))
            })
            .collect()
    }

    /// Waits (at most `limit`) for `done`; false if it never held.
    pub fn poll(&self, limit: Duration, mut done: impl FnMut(&Server) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done(self)
    }

    /// Sends a signal to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits (at most `limit`) for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status (within 30 s).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("server log kept at {}", self.log.display());
        }
    }
}

/// Runs a `tessera` command to its end: (success, stdout + stderr).
pub fn run(args: &[&str]) -> (bool, String) {
    run_env(args, &[])
}

/// As [`run`], with extra environment variables.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run tessera");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A `tessera` child process killed when dropped (a simulator run...); its
/// output goes to a file, so that it never blocks on a pipe.
pub struct Guarded(pub Child, PathBuf);

impl Guarded {
    /// Starts `tessera args`.
    pub fn spawn(args: &[&str]) -> Guarded {
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "tessera-e2e-child-{}-{serial}.txt",
            std::process::id()
        ));
        let out = std::fs::File::create(&path).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(BIN)
            .args(args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start tessera");
        Guarded(child, path)
    }

    /// Its output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// Waits (at most `limit`) for its end: (success, its output).
    pub fn finish(mut self, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "tessera did not end within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&self.1).unwrap_or_default();
        (status.success(), text)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// A metric of a simulator report (`tessera sim --out`).
/// A simulator's JSON report at `path`, after asserting that its `clients`
/// bots all joined and none failed (`out`: its output, for the message).
pub fn all_joined(path: &std::path::Path, clients: usize, out: &str) -> serde_json::Value {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        sim_value(&report, "clients_joined"),
        clients as f64,
        "{out}"
    );
    assert_eq!(sim_value(&report, "clients_failed"), 0.0, "{out}");
    report
}

pub fn sim_value(report: &serde_json::Value, metric: &str) -> f64 {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} in the report"))["value"]
        .as_f64()
        .unwrap()
}

/// A throwaway etcd (Debian's `etcd-server`, installed with apt-get when
/// missing) on free loopback ports with a temporary data dir; killed and
/// its dir removed when dropped. Elections are fast (500 ms), so that the
/// smallest lease etcd grants is 1 s.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    pub url: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        let found = |b: &str| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found("etcd") {
            let ok = Command::new("apt-get")
                .args(["install", "-y", "-qq", "etcd-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok && found("etcd"),
                "etcd is needed: `apt-get install etcd-server` (Debian) failed or is not available"
            );
        }
        let client = free_tcp_port();
        let peer = free_tcp_port();
        let dir =
            std::env::temp_dir().join(format!("tessera-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "e2e", "--data-dir", dir.to_str().unwrap()])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e2e={peer_url}")])
            .args(["--heartbeat-interval", "100", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let etcd = Etcd { child, dir, url };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", client))
                .and_then(|mut t| {
                    t.set_read_timeout(Some(Duration::from_secs(1)))?;
                    t.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
                    let mut answer = String::new();
                    t.read_to_string(&mut answer)?;
                    Ok(answer.contains("\"health\":\"true\""))
                })
                .unwrap_or(false);
            if up {
                return etcd;
            }
            assert!(Instant::now() < deadline, "etcd did not start within 20 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// A connect token for a development node at `server`, minted with the
/// development key the node made (as `tessera client` does by itself), for
/// tests that drive a raw endpoint.
pub fn dev_token(server: SocketAddr, client_id: u64) -> tessera_net::token::ConnectToken {
    let text = std::fs::read_to_string(dev_key_path()).expect("the development key a node made");
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .expect("a key line");
    let key = tessera_net::token::TokenKey::from_hex(line.trim()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    tessera_net::token::ConnectToken::mint(
        &key,
        &tessera_net::token::TokenRequest {
            client_id,
            expires_unix_s: now + 600,
            servers: &[server],
            user_data: b"test",
        },
        tessera_net::token::SessionKeys {
            client_to_server: [client_id as u8; 32],
            server_to_client: [!(client_id as u8); 32],
        },
        [client_id as u8; 24],
    )
    .unwrap()
}

/// Where development nodes keep their generated key (as `tessera` finds it).
pub fn dev_key_path() -> PathBuf {
    match std::env::var_os("TESSERA_DEV_KEY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        // SAFETY: getuid cannot fail and touches no memory.
        _ => std::env::temp_dir().join(format!("tessera-dev-{}.key", unsafe { libc::getuid() })),
    }
}
