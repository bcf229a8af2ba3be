//! End-to-end on loopback: a node started with `--key` lets in only clients
//! with a valid connect token, and seals their sessions; bots with tokens
//! play as usual.

mod common;

use common::{run, run_env, sim_value, Server};

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
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(sim_value(&report, "clients_joined"), 100.0, "{out}");
    assert_eq!(sim_value(&report, "clients_failed"), 0.0, "{out}");
    assert_eq!(sim_value(&report, "verify_errors"), 0.0, "{out}");
    // Each refusal was counted under its reason; nothing failed to open.
    let drops = |reason: &str| {
        server
            .by_reason("tessera_drops_total{")
            .into_iter()
            .filter(|(r, _)| r == reason)
            .map(|(_, n)| n)
            .sum::<f64>()
    };
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
