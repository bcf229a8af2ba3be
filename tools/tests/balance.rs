//! End-to-end: a crowd gathers in one corner of a 2-shard node; the hot cell
//! splits, its children spread over both shards; the crowd leaves and the
//! children merge back. No session fails, no client sees a gap of more than
//! two ticks, every view rebuilt from the deltas is consistent. (A
//! shortened version of the crowd demonstration: thresholds are low, the
//! bots run at 30 m/s.)

mod common;

use std::time::Duration;

use common::{sim_value as value, Guarded, Server};

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
    let mut server = Server::start(&["--config", config.to_str().unwrap()]);
    let game = server.game.to_string();

    let report_path = dir.join("sim.json");
    let (sim_ok, sim_text) = Guarded::spawn(&[
        "sim",
        "--addr",
        &game,
        "--clients",
        "150",
        "--pattern",
        "crowd",
        "--crowd-seconds",
        "14",
        "--duration",
        "30",
        "--ramp",
        "1",
        "--verify-every",
        "10",
        "--out",
        report_path.to_str().unwrap(),
    ])
    .finish(Duration::from_secs(90));
    let (ok, handovers) = server.admin(&["--json", "handovers"]);
    assert!(ok, "{handovers}");
    let handovers: serde_json::Value = serde_json::from_str(&handovers).expect("handovers JSON");

    // Stop the node: SIGTERM, clean exit.
    let status = server.terminate();

    assert!(sim_ok, "sim failed: {sim_text}");
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
