//! End-to-end: a crowd gathers in one corner of a 2-shard node; the hot cell
//! splits, its children spread over both shards; the crowd leaves and the
//! children merge back. No session fails, no client sees a gap of more than
//! two ticks, every view rebuilt from the deltas is consistent. (A
//! shortened version of the crowd demonstration: thresholds are low, the
//! bots run at 30 m/s.)

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn value(report: &serde_json::Value, metric: &str) -> f64 {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric}"))["value"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_crowd_splits_a_cell_spreads_it_over_both_shards_and_it_merges_back() {
    let dir = std::env::temp_dir().join(format!("tessera-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        "shards = 2\nnpcs = 80\n[world]\ncolumns = 4\nrows = 4\n[demo]\nplayer_speed = 30\n\
         [balance]\nactors_ref = 30\nsplit_score = 1.0\nsplit_after_s = 1\nmerge_score = 0.3\n\
         merge_after_s = 3\nmove_after_s = 1\ncooldown_s = 2\nimbalance = 0.8\n",
    )
    .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--unpinned",
        ])
        .args([
            "--admin-addr",
            &admin.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
            "--duration",
            "120",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let game = first
        .split("udp://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    std::thread::spawn(move || for _ in lines {});

    let report_path = dir.join("sim.json");
    let out = Command::new(BIN)
        .args([
            "sim",
            "--addr",
            &game,
            "--clients",
            "150",
            "--pattern",
            "crowd",
            "--crowd-seconds",
            "14",
        ])
        .args([
            "--duration",
            "30",
            "--ramp",
            "1",
            "--verify-every",
            "10",
            "--out",
            report_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let sim_text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let handovers = Command::new(BIN)
        .args(["admin", "--addr", &admin.to_string(), "--json", "handovers"])
        .output()
        .unwrap();
    let handovers: serde_json::Value =
        serde_json::from_slice(&handovers.stdout).expect("handovers JSON");

    // Stop the node: SIGTERM, clean exit.
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("server did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    assert!(out.status.success(), "sim failed: {sim_text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let summary = format!(
        "{sim_text}\n{}",
        serde_json::to_string_pretty(&handovers).unwrap()
    );
    assert_eq!(value(&report, "clients_joined"), 150.0, "{summary}");
    assert_eq!(value(&report, "clients_failed"), 0.0, "{summary}");
    assert_eq!(value(&report, "verify_errors"), 0.0, "{summary}");
    assert_eq!(value(&report, "gaps_over_2_ticks"), 0.0, "{summary}");
    assert!(
        handovers["splits"].as_u64().unwrap() >= 1,
        "no split: {summary}"
    );
    assert!(
        handovers["merges"].as_u64().unwrap() >= 1,
        "no merge back: {summary}"
    );
    // Children of the split cell went to the other shard.
    let spread = handovers["recent"].as_array().unwrap().iter().any(|r| {
        r["committed"] == true
            && r["cell"].as_str().unwrap().contains('/')
            && r["cause"] == "policy"
    });
    assert!(
        spread,
        "no child of a split cell moved to the other shard: {summary}"
    );
    assert_eq!(handovers["aborts"].as_u64().unwrap(), 0, "{summary}");
    assert!(status.success(), "server exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
