//! `failover` suite: what losing a node, a coordinator or draining a node
//! costs, measured on real processes (the `tessera` binary) on loopback,
//! each node on its own address, and what replication costs per cell.
//!
//! - Node kills: a coordinator (default settings: dead after 500 ms, lease
//!   1 s), three single-shard compute nodes and a gateway; bots commute
//!   through the gateway the whole time. `--kills` times, the compute node
//!   owning the most cells gets `kill -9`, its failover is read from the
//!   coordinator's records (detection, time until its cells run again on
//!   their backups, ticks of state lost), and it is started again under
//!   its old id. The bots' longest snapshot gap covers every kill.
//! - Coordinator kills: two coordinators leading through a real etcd
//!   (Debian's `etcd-server`, started here on loopback with a temporary data
//!   dir), two compute nodes; the leader gets `kill -9`, the standby's
//!   takeover is timed by polling its admin port, the killed one comes back
//!   as standby. Nodes' fence episodes are counted (0: no cell stopped).
//! - Drains: `tessera admin drain` of the node owning the most cells, timed
//!   until the process exits; per cell.
//! - Replication per cell: the production replicator, codec and backup
//!   store in this process, on a 4x4-cell world of moving NPCs: bytes per
//!   cell per second, owner and backup CPU per cell per second.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::geometry::{Geometry, Layout, Vec2};
use tessera_cells::node::ShardMsg;
use tessera_cells::replica::{ReplicaCounters, ReplicaStore, Replicator};
use tessera_cells::wire::{decode_bundle, BundleWriter, ShardHeader};
use tessera_cells::world::{ShardWorld, WorldConfig};
use tessera_cells::{Registry, ShardRef, TickId};
use tessera_runtime::node::admin::request;

use crate::cluster::free_port;
use crate::report::Report;

/// Options of the `failover` suite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A short run (5 kills of each kind, 2 drains).
    #[arg(long)]
    pub quick: bool,
    /// Kills of each kind (default 20).
    #[arg(long)]
    pub kills: Option<usize>,
    /// Drains (default 5).
    #[arg(long)]
    pub drains: Option<usize>,
    /// Bots commuting through the gateway during the node kills.
    #[arg(long, default_value_t = 100)]
    pub bots: usize,
    /// Only one part: nodes (kills and drains), coordinator, replication.
    #[arg(long, value_parser = ["nodes", "coordinator", "replication"])]
    pub only: Option<String>,
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The `tessera` binary next to this one, built if missing.
fn tessera_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("tessera");
    if !bin.exists() {
        eprintln!("failover: building the tessera binary (cargo build --release -p tessera)");
        let ok = Command::new("cargo")
            .args(["build", "--release", "-p", "tessera"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok || !bin.exists() {
            return Err(format!(
                "{} is needed: cargo build --release -p tessera",
                bin.display()
            ));
        }
    }
    Ok(bin)
}

fn free_tcp(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed when dropped, its output in a log file.
struct Proc {
    child: Child,
    args: Vec<String>,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, args: Vec<String>, log: PathBuf) -> Result<Proc, String> {
        // Appended: a restarted process keeps its predecessor's log.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(&args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Proc { child, args, log })
    }

    /// `kill -9`.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The same command again (after a kill).
    fn restart(&mut self, bin: &Path) -> Result<(), String> {
        self.kill();
        *self = Proc::spawn(bin, self.args.clone(), self.log.clone())?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn status(admin: SocketAddr) -> Option<Value> {
    let text = request(admin, "status").ok()?;
    serde_json::from_str(&text).ok()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if done() {
        Ok(())
    } else {
        Err(format!("{what} did not happen within {limit:?}"))
    }
}

fn cells_by_node(st: &Value) -> std::collections::BTreeMap<u16, usize> {
    let mut m = std::collections::BTreeMap::new();
    for c in st["cells"].as_array().into_iter().flatten() {
        if let Some(node) = c["owner"]
            .as_str()
            .and_then(|o| o.strip_prefix("node-"))
            .and_then(|o| o.split('/').next())
            .and_then(|n| n.parse::<u16>().ok())
        {
            *m.entry(node).or_default() += 1;
        }
    }
    m
}

fn all_linked(st: &Value, shards: usize, backups: usize) -> bool {
    let s = st["shards"].as_array();
    s.is_some_and(|s| s.len() == shards && s.iter().all(|s| s["linked"] == true))
        && st["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().all(|n| n["dead"] == false))
        && st["backups"].as_array().is_some_and(|b| b.len() >= backups)
}

fn all_shards_linked(st: &Value, shards: usize) -> bool {
    st["shards"]
        .as_array()
        .is_some_and(|s| s.len() == shards && s.iter().all(|s| s["linked"] == true))
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut t) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = t.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = t.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = t.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("bounds")
}

/// A compute or gateway node command line.
#[allow(clippy::too_many_arguments)]
fn node_args(
    coords: &str,
    id: u16,
    ip: &str,
    cluster_port: u16,
    metrics: u16,
    role: &str,
    npcs: usize,
    secs: u64,
) -> Vec<String> {
    [
        "serve",
        "--bind",
        ip,
        "--port",
        "0",
        "--unpinned",
        "--metrics-addr",
        &format!("{ip}:{metrics}"),
        "--admin-addr",
        &format!("{ip}:{}", free_tcp(ip)),
        "--coord",
        coords,
        "--node-id",
        &id.to_string(),
        "--cluster-addr",
        &format!("{ip}:{cluster_port}"),
        "--role",
        role,
        "--shards",
        "1",
        "--npcs",
        &npcs.to_string(),
        "--world",
        "4x4",
        "--duration",
        &secs.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

struct NodeKills {
    detection: Histogram<u64>,
    kill_to_declared: Histogram<u64>,
    served: Histogram<u64>,
    kill_to_served: Histogram<u64>,
    ticks_lost: Histogram<u64>,
    cells: usize,
    missing: usize,
    longest_gap_ticks: f64,
    gaps: f64,
    bots_failed: f64,
    bots_joined: f64,
    inputs_unconfirmed: f64,
    inputs_sent: f64,
    drain_ms_per_cell: Histogram<u64>,
    drains: usize,
    drain_cells: usize,
}

fn node_kills(
    bin: &Path,
    dir: &Path,
    kills: usize,
    drains: usize,
    bots: usize,
) -> Result<NodeKills, String> {
    let secs = (kills as u64 * 8 + drains as u64 * 8 + 60).max(120);
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp("127.0.0.1"))
        .parse()
        .expect("addr");
    let _coord = Proc::spawn(
        bin,
        [
            "coord",
            "--listen",
            &listen,
            "--admin-addr",
            &admin.to_string(),
            "--world",
            "4x4",
            "--compute-nodes",
            "3",
            "--no-balance",
            "--duration",
            &(secs + 30).to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        dir.join("coord.log"),
    )?;
    let mut nodes = Vec::new();
    for id in 1..=3u16 {
        let ip = format!("127.0.0.{}", 40 + id);
        let args = node_args(
            &listen,
            id,
            &ip,
            free_port(&ip),
            free_tcp(&ip),
            "compute",
            100,
            secs + 30,
        );
        nodes.push(Proc::spawn(bin, args, dir.join(format!("node-{id}.log")))?);
    }
    let gw_ip = "127.0.0.44";
    let game = free_port(gw_ip);
    let mut gw_args = node_args(
        &listen,
        4,
        gw_ip,
        free_port(gw_ip),
        free_tcp(gw_ip),
        "gateway",
        0,
        secs + 30,
    );
    gw_args[4] = game.to_string();
    let _gateway = Proc::spawn(bin, gw_args, dir.join("gateway.log"))?;
    wait_until("the cluster up", Duration::from_secs(60), || {
        status(admin).is_some_and(|st| all_linked(&st, 4, 3))
    })?;
    let report_path = dir.join("sim.json");
    let mut sim = Proc::spawn(
        bin,
        [
            "sim",
            "--addr",
            &format!("{gw_ip}:{game}"),
            "--clients",
            &bots.to_string(),
            "--pattern",
            "commute",
            "--duration",
            &secs.to_string(),
            "--ramp",
            "2",
            "--out",
            report_path.to_str().expect("utf-8 path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        dir.join("sim.log"),
    )?;
    std::thread::sleep(Duration::from_secs(5));
    let mut out = NodeKills {
        detection: hist(),
        kill_to_declared: hist(),
        served: hist(),
        kill_to_served: hist(),
        ticks_lost: hist(),
        cells: 0,
        missing: 0,
        longest_gap_ticks: 0.0,
        gaps: 0.0,
        bots_failed: 0.0,
        bots_joined: 0.0,
        inputs_unconfirmed: 0.0,
        inputs_sent: 0.0,
        drain_ms_per_cell: hist(),
        drains: 0,
        drain_cells: 0,
    };
    for k in 0..kills {
        wait_until(
            "every shard linked and backed up",
            Duration::from_secs(30),
            || status(admin).is_some_and(|st| all_linked(&st, 4, 3)),
        )?;
        // Let the replicas of the newest backups settle.
        std::thread::sleep(Duration::from_millis(1500));
        let st = status(admin).ok_or("coordinator gone")?;
        let before = st["failovers"].as_array().map_or(0, Vec::len);
        let (&victim, &cells) = cells_by_node(&st)
            .iter()
            .max_by_key(|(n, c)| (**c, **n))
            .ok_or("no cells")?;
        let killed = unix_ms();
        nodes[usize::from(victim) - 1].kill();
        let mut record = Value::Null;
        wait_until("the failover", Duration::from_secs(20), || {
            let Some(st) = status(admin) else {
                return false;
            };
            let f = st["failovers"].as_array().cloned().unwrap_or_default();
            let fresh = &f[before.min(f.len())..];
            if !fresh.is_empty() && fresh.iter().all(|f| !f["served_ms"].is_null()) {
                record = fresh[0].clone();
                true
            } else {
                false
            }
        })?;
        let detection = record["detection_ms"].as_f64().unwrap_or(0.0);
        let served = record["served_ms"].as_f64().unwrap_or(0.0);
        let declared = record["declared_unix_ms"].as_f64().unwrap_or(killed) - killed;
        out.detection.record(detection.max(1.0) as u64).ok();
        out.kill_to_declared.record(declared.max(1.0) as u64).ok();
        out.served.record(served.max(1.0) as u64).ok();
        out.kill_to_served
            .record((declared + served).max(1.0) as u64)
            .ok();
        out.ticks_lost
            .record(record["ticks_lost"].as_u64().unwrap_or(0))
            .ok();
        out.cells += cells;
        out.missing += record["missing"].as_u64().unwrap_or(0) as usize;
        eprintln!(
            "failover: kill {}/{kills}: node {victim} ({cells} cells): declared dead {declared:.0} ms after the kill ({detection:.0} ms after its last heartbeat), served {served:.0} ms after, {} ticks lost",
            k + 1,
            record["ticks_lost"]
        );
        nodes[usize::from(victim) - 1].restart(bin)?;
    }
    for d in 0..drains {
        wait_until(
            "every shard linked and backed up",
            Duration::from_secs(30),
            || status(admin).is_some_and(|st| all_linked(&st, 4, 3)),
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        let st = status(admin).ok_or("coordinator gone")?;
        let (&victim, &cells) = cells_by_node(&st)
            .iter()
            .max_by_key(|(n, c)| (**c, **n))
            .ok_or("no cells")?;
        let started = Instant::now();
        let answer = request(admin, &format!("drain {victim}")).map_err(|e| e.to_string())?;
        if answer.contains("error") {
            return Err(format!("drain refused: {answer}"));
        }
        let p = &mut nodes[usize::from(victim) - 1];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = p.child.try_wait() {
                if !s.success() {
                    return Err(format!("node {victim} exited with {s} after its drain"));
                }
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {victim} did not exit within 60 s of its drain"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = started.elapsed();
        out.drain_ms_per_cell
            .record(((took.as_secs_f64() * 1e3) / cells.max(1) as f64).max(1.0) as u64)
            .ok();
        out.drains += 1;
        out.drain_cells += cells;
        eprintln!(
            "failover: drain {}/{drains}: node {victim} ({cells} cells) in {:.0} ms",
            d + 1,
            took.as_secs_f64() * 1e3
        );
        p.restart(bin)?;
    }
    // The bots finish their run.
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    while sim.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    sim.kill();
    let report: Value = std::fs::read_to_string(&report_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or("the bots wrote no report")?;
    let value = |m: &str| {
        report["results"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["metric"] == m)
            .and_then(|r| r["value"].as_f64())
            .unwrap_or(f64::NAN)
    };
    out.longest_gap_ticks = value("longest_gap_ticks");
    out.gaps = value("gaps_over_2_ticks");
    out.bots_failed = value("clients_failed");
    out.bots_joined = value("clients_joined");
    out.inputs_unconfirmed = value("inputs_unconfirmed");
    out.inputs_sent = value("inputs_sent");
    Ok(out)
}

/// A throwaway etcd on loopback (None when it is not installed).
struct Etcd {
    proc: Proc,
    dir: PathBuf,
    url: String,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Option<Etcd>, String> {
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Ok(None);
        }
        let client = free_tcp("127.0.0.1");
        let peer = free_tcp("127.0.0.1");
        let data = dir.join("etcd-data");
        // A run that crashed may have left a cluster's keys behind.
        let _ = std::fs::remove_dir_all(&data);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name",
            "bench",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("bench={peer_url}"),
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn(Path::new("etcd"), args, dir.join("etcd.log"))?;
        let etcd = Etcd {
            proc,
            dir: data,
            url,
        };
        wait_until("etcd up", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", client))
                .and_then(|mut t| {
                    t.set_read_timeout(Some(Duration::from_secs(1)))?;
                    t.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
                    let mut a = String::new();
                    t.read_to_string(&mut a)?;
                    Ok(a.contains("\"health\":\"true\""))
                })
                .unwrap_or(false)
        })?;
        Ok(Some(etcd))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct CoordKills {
    takeover: Histogram<u64>,
    fences: f64,
    epochs: u64,
}

fn coordinator_kills(
    bin: &Path,
    dir: &Path,
    etcd: &Etcd,
    kills: usize,
) -> Result<CoordKills, String> {
    let secs = kills as u64 * 8 + 60;
    let cluster = format!("bench-{}", std::process::id());
    let mut coords = Vec::new();
    let mut admins = Vec::new();
    let mut listens = Vec::new();
    for name in ["a", "b"] {
        let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp("127.0.0.1"))
            .parse()
            .expect("addr");
        let args: Vec<String> = [
            "coord",
            "--listen",
            &listen,
            "--admin-addr",
            &admin.to_string(),
            "--world",
            "4x4",
            "--compute-nodes",
            "2",
            "--no-balance",
            "--etcd",
            &etcd.url,
            "--cluster",
            &cluster,
            "--name",
            name,
            "--duration",
            &(secs + 30).to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        coords.push(Proc::spawn(
            bin,
            args,
            dir.join(format!("coord-{name}.log")),
        )?);
        if name == "a" {
            wait_until("coordinator a leads", Duration::from_secs(20), || {
                status(admin).is_some_and(|st| st["role"] == "leader")
            })?;
        }
        admins.push(admin);
        listens.push(listen);
    }
    let both = listens.join(",");
    let mut metrics = Vec::new();
    let mut nodes = Vec::new();
    for id in 1..=2u16 {
        let ip = format!("127.0.0.{}", 50 + id);
        let m = free_tcp(&ip);
        metrics.push(format!("{ip}:{m}").parse::<SocketAddr>().expect("addr"));
        let args = node_args(&both, id, &ip, free_port(&ip), m, "compute", 100, secs + 30);
        nodes.push(Proc::spawn(bin, args, dir.join(format!("cnode-{id}.log")))?);
    }
    let leader = |admins: &[SocketAddr]| {
        admins
            .iter()
            .position(|a| status(*a).is_some_and(|st| st["role"] == "leader"))
    };
    wait_until("the nodes joined", Duration::from_secs(60), || {
        leader(&admins)
            .and_then(|i| status(admins[i]))
            .is_some_and(|st| all_linked(&st, 2, 2))
    })?;
    let mut out = CoordKills {
        takeover: hist(),
        fences: 0.0,
        epochs: 0,
    };
    for k in 0..kills {
        wait_until("a leader and a standby", Duration::from_secs(30), || {
            let roles: Vec<String> = admins
                .iter()
                .map(|a| {
                    status(*a).map_or(String::new(), |s| {
                        s["role"].as_str().unwrap_or("").to_string()
                    })
                })
                .collect();
            roles.iter().filter(|r| *r == "leader").count() == 1
                && roles.iter().filter(|r| *r == "standby").count() == 1
                && admins
                    .iter()
                    .all(|a| status(*a).is_some_and(|st| all_shards_linked(&st, 2)))
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let i = leader(&admins).ok_or("no leader")?;
        let other = 1 - i;
        let old = status(admins[i]).ok_or("leader gone")?["cluster_epoch"]
            .as_u64()
            .unwrap_or(0);
        let killed = Instant::now();
        coords[i].kill();
        wait_until("the standby leads", Duration::from_secs(20), || {
            status(admins[other]).is_some_and(|st| {
                st["role"] == "leader" && st["cluster_epoch"].as_u64().unwrap_or(0) > old
            })
        })?;
        let took = killed.elapsed();
        out.takeover.record((took.as_millis() as u64).max(1)).ok();
        out.epochs += 1;
        eprintln!(
            "failover: coordinator kill {}/{kills}: the standby led after {:.0} ms",
            k + 1,
            took.as_secs_f64() * 1e3
        );
        coords[i].restart(bin)?;
    }
    out.fences = metrics
        .iter()
        .map(|m| metric(*m, "tessera_shard_fences_total"))
        .sum();
    Ok(out)
}

struct Replication {
    bytes_per_cell_s: f64,
    owner_us_per_cell_s: f64,
    backup_us_per_cell_s: f64,
    entities_per_cell: f64,
}

/// The production replicator, codec and backup store on a 4x4 world of
/// moving NPCs, in this process.
fn replication(npcs: usize, ticks: u64) -> Replication {
    let geometry = Geometry::new(0, 128.0, 4, 4);
    let layout = Arc::new(Layout::new(geometry.clone()));
    let me = ShardRef { node: 1, shard: 0 };
    let backup = ShardRef { node: 2, shard: 0 };
    let owners = layout.leaves().into_iter().map(|c| (c, me)).collect();
    let registry = Registry::new(layout.clone(), &owners).expect("every leaf");
    let mut world = ShardWorld::new(
        DemoGame::new(DemoConfig::default()),
        layout.clone(),
        WorldConfig::default(),
        1,
    );
    for c in layout.leaves() {
        world.add_cell(c);
    }
    let area = geometry.world_rect();
    let mut rng = tessera_cells::rng::Rng::new(7);
    for _ in 0..npcs {
        let p = Vec2::new(
            rng.range(area.min.x, area.max.x),
            rng.range(area.min.y, area.max.y),
        );
        let id = world.allocate_id();
        let npc = world.game().npc(id, area.clamp(p));
        world.spawn(npc);
    }
    let mut replicator = Replicator::<DemoGame>::new(me, 2);
    replicator.set_backup(Some(backup));
    let mut store = ReplicaStore::<DemoGame>::new(backup);
    let mut counters = ReplicaCounters::default();
    let passing = std::collections::VecDeque::new();
    let (mut bytes, mut owner, mut backup_time) = (0u64, Duration::ZERO, Duration::ZERO);
    let warmup = 40;
    let mut inbound = Vec::new();
    for t in 1..=ticks + warmup {
        let tick = TickId(t);
        world.tick(tick);
        let _ = world.drain_outbox().count();
        let started = Instant::now();
        let Some((to, msg)) = replicator.round(&world, &passing, tick, false) else {
            continue;
        };
        let msg = ShardMsg::Replica(msg);
        let header = ShardHeader::for_msg(&msg, me, tick, &registry);
        let mut writer = BundleWriter::new(to);
        writer.push(header, &msg).expect("encodable");
        let frame = writer.finish(|b| b.to_vec());
        let encoded = started.elapsed();
        let started = Instant::now();
        decode_bundle::<DemoGame>(&frame, &mut inbound).expect("decodes");
        for (_, m) in inbound.drain(..) {
            if let ShardMsg::Replica(round) = m {
                let _ = store.on_round(round, |_| true, &mut counters);
            }
        }
        let applied = started.elapsed();
        if t > warmup {
            bytes += frame.len() as u64;
            owner += encoded;
            backup_time += applied;
        }
    }
    let cells = layout.leaves().len() as f64;
    let secs = ticks as f64 / 20.0;
    Replication {
        bytes_per_cell_s: bytes as f64 / cells / secs,
        owner_us_per_cell_s: owner.as_secs_f64() * 1e6 / cells / secs,
        backup_us_per_cell_s: backup_time.as_secs_f64() * 1e6 / cells / secs,
        entities_per_cell: npcs as f64 / cells,
    }
}

fn q(h: &Histogram<u64>, p: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(p) as f64
    }
}

/// Runs the suite.
pub fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let kills = args.kills.unwrap_or(if args.quick { 5 } else { 20 });
    let drains = args.drains.unwrap_or(if args.quick { 2 } else { 5 });
    let bin = tessera_bin()?;
    let dir = std::env::temp_dir().join(format!("tessera-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut report = Report::new("failover", false);
    report.note(format!(
        "real processes (the tessera binary, release) on loopback, each node on its own address, unpinned, sharing the machine's cores with {} commuting bots (tessera sim, one process) during node kills and drains; a coordinator at the default settings (dead after 500 ms, lease 1 s, replication every 2 ticks at 20 Hz); {kills} kill -9 of the compute node owning the most cells, each restarted under its old id; logs in {}",
        args.bots,
        dir.display()
    ));
    let part = |p: &str| args.only.as_deref().is_none_or(|o| o == p);
    if part("nodes") {
        eprintln!("failover: node kills ({kills}) and drains ({drains})");
        node_part(
            &mut report,
            node_kills(&bin, &dir, kills, drains, args.bots)?,
        );
    }
    if part("coordinator") {
        coordinator_part(&mut report, &bin, &dir, kills)?;
    }
    if part("replication") {
        replication_part(&mut report, args.quick);
    }
    report.finish()?;
    eprintln!("failover: logs kept in {}", dir.display());
    Ok(())
}

fn node_part(report: &mut Report, n: NodeKills) {
    let case = "node_kill";
    for (metric, h, unit) in [
        ("kill_to_declared_dead_ms", &n.kill_to_declared, "ms"),
        ("last_heartbeat_to_declared_dead_ms", &n.detection, "ms"),
        ("served_after_detection_ms", &n.served, "ms"),
        ("kill_to_served_ms", &n.kill_to_served, "ms"),
        ("ticks_lost", &n.ticks_lost, "ticks"),
    ] {
        report.push(case, "tessera", &format!("{metric}_p50"), q(h, 0.5), unit);
        report.push(case, "tessera", &format!("{metric}_p99"), q(h, 0.99), unit);
    }
    report.push(case, "tessera", "kills", n.detection.len() as f64, "kills");
    report.push(
        case,
        "tessera",
        "cells_failed_over",
        n.cells as f64,
        "cells",
    );
    report.push(
        case,
        "tessera",
        "cells_without_replica",
        n.missing as f64,
        "cells",
    );
    report.push(
        case,
        "tessera",
        "longest_client_gap_ticks",
        n.longest_gap_ticks,
        "ticks",
    );
    report.push(case, "tessera", "client_gaps_over_2_ticks", n.gaps, "gaps");
    report.push(case, "tessera", "bots_joined", n.bots_joined, "bots");
    report.push(case, "tessera", "bots_failed", n.bots_failed, "bots");
    report.push(
        case,
        "tessera",
        "inputs_unconfirmed",
        n.inputs_unconfirmed,
        "inputs",
    );
    report.push(case, "tessera", "inputs_sent", n.inputs_sent, "inputs");
    if n.drains > 0 {
        report.push("drain", "tessera", "drains", n.drains as f64, "drains");
        report.push(
            "drain",
            "tessera",
            "cells_drained",
            n.drain_cells as f64,
            "cells",
        );
        report.push(
            "drain",
            "tessera",
            "ms_per_cell_p50",
            q(&n.drain_ms_per_cell, 0.5),
            "ms",
        );
        report.push(
            "drain",
            "tessera",
            "ms_per_cell_p99",
            q(&n.drain_ms_per_cell, 0.99),
            "ms",
        );
    }
}

fn coordinator_part(
    report: &mut Report,
    bin: &Path,
    dir: &Path,
    kills: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    match Etcd::start(dir)? {
        Some(etcd) => {
            eprintln!("failover: coordinator kills ({kills})");
            let c = coordinator_kills(bin, dir, &etcd, kills)?;
            report.push(
                "coordinator_kill",
                "tessera",
                "takeover_ms_p50",
                q(&c.takeover, 0.5),
                "ms",
            );
            report.push(
                "coordinator_kill",
                "tessera",
                "takeover_ms_p99",
                q(&c.takeover, 0.99),
                "ms",
            );
            report.push(
                "coordinator_kill",
                "tessera",
                "kills",
                c.epochs as f64,
                "kills",
            );
            report.push(
                "coordinator_kill",
                "tessera",
                "node_fences",
                c.fences,
                "fences",
            );
            report.note("coordinator kills: two `tessera coord --etcd` (leader TTL 1 s; etcd 3.4 with --election-timeout 500 so that it grants 1 s), two compute nodes with the default lease under etcd (TTL + 1 s = 2 s); takeover timed from the kill to the standby's admin port saying leader with a higher epoch (polled every 20 ms)".to_string());
        }
        None => report.note(
            "coordinator kills skipped: etcd is not installed (apt-get install etcd-server)"
                .to_string(),
        ),
    }
    Ok(())
}

fn replication_part(report: &mut Report, quick: bool) {
    eprintln!("failover: replication cost");
    for npcs in [160usize, 800] {
        let r = replication(npcs, if quick { 200 } else { 1200 });
        let case = format!("replication,entities_per_cell={}", r.entities_per_cell);
        report.push(
            &case,
            "tessera",
            "bytes_per_cell_per_s",
            r.bytes_per_cell_s,
            "B/s",
        );
        report.push(
            &case,
            "tessera",
            "owner_cpu_us_per_cell_per_s",
            r.owner_us_per_cell_s,
            "us/s",
        );
        report.push(
            &case,
            "tessera",
            "backup_cpu_us_per_cell_per_s",
            r.backup_us_per_cell_s,
            "us/s",
        );
    }
    report.note("replication: the production Replicator (a round every 2 ticks at 20 Hz: diffs of changed entities), bundle codec and ReplicaStore in this process on a 4x4-cell world of moving NPCs (2 m/s); owner CPU = building the round and encoding it, backup CPU = decoding and applying it".to_string());
}
