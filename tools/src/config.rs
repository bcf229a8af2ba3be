//! `tessera serve` settings: flags, `TESSERA_*` variables, a TOML or JSON
//! file, defaults, in that order of precedence.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tessera_cells::{CellId, Geometry};
use tessera_coord::StaticMapping;
use tessera_runtime::node::NodeConfig;

/// Options of `tessera serve`.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// UDP game port.
    #[arg(long, env = "TESSERA_PORT")]
    pub port: Option<u16>,
    /// Address the game port binds to.
    #[arg(long, env = "TESSERA_BIND")]
    pub bind: Option<IpAddr>,
    /// Prometheus metrics address (HTTP, /metrics).
    #[arg(long, env = "TESSERA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Admin control address (TCP, loopback).
    #[arg(long, env = "TESSERA_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Shards (default: one per CPU).
    #[arg(long, env = "TESSERA_SHARDS")]
    pub shards: Option<usize>,
    /// Ticks per second, 10..=60.
    #[arg(long, env = "TESSERA_TICK_HZ", value_parser = clap::value_parser!(u32).range(10..=60))]
    pub tick_hz: Option<u32>,
    /// NPCs in the demo world.
    #[arg(long, env = "TESSERA_NPCS")]
    pub npcs: Option<usize>,
    /// World size in depth-0 cells, COLUMNSxROWS (default 8x8 of 128 m).
    #[arg(long, env = "TESSERA_WORLD", value_parser = parse_world_size)]
    pub world: Option<(i32, i32)>,
    /// Seconds an avatar waits in the world for its client to resume after
    /// its session was lost without a leave (its gateway died); 0: forever.
    /// Default 30.
    #[arg(long, env = "TESSERA_LINGER")]
    pub linger: Option<f64>,
    /// Do not pin shards to CPUs (oversubscribed machines).
    #[arg(long, env = "TESSERA_UNPINNED")]
    pub unpinned: bool,
    /// Seed of the world's randomness.
    #[arg(long, env = "TESSERA_SEED")]
    pub seed: Option<u64>,
    /// Do not split, move or merge cells automatically (operator commands
    /// still work).
    #[arg(long, env = "TESSERA_NO_BALANCE")]
    pub no_balance: bool,
    /// Deepest quadtree split, 0..=8.
    #[arg(long, env = "TESSERA_MAX_DEPTH", value_parser = clap::value_parser!(u8).range(0..=8))]
    pub max_depth: Option<u8>,
    /// A TOML or JSON file with any of these settings and a static cell
    /// mapping ([[shard]] id = N, cells = ["0:0,0", ...]).
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Join the cluster whose coordinators listen here (`tessera coord`):
    /// one address, or the leader and its standbys as `A,B` (the node links
    /// to all and follows whichever leads); without it the node runs alone
    /// with its embedded coordinator.
    #[arg(long, env = "TESSERA_COORD", value_delimiter = ',', requires_all = ["node_id", "cluster_addr"])]
    pub coord: Vec<SocketAddr>,
    /// This node's id in the cluster (unique, 0..65534).
    #[arg(long, env = "TESSERA_NODE_ID", value_parser = clap::value_parser!(u16).range(0..65535))]
    pub node_id: Option<u16>,
    /// UDP address of this node's cluster links: shard 0 listens on it,
    /// shard s on its port + s. Other nodes reach it there: use the node's
    /// own address, not 0.0.0.0.
    #[arg(long, env = "TESSERA_CLUSTER_ADDR")]
    pub cluster_addr: Option<SocketAddr>,
    /// What the node does in a cluster: both (owns cells and hosts
    /// sessions), compute (owns cells) or gateway (hosts sessions only).
    #[arg(long, env = "TESSERA_ROLE", default_value = "both")]
    pub role: tessera_cells::wire::NodeRole,
    /// Key file (`tessera token key`): clients need a connect token minted
    /// with it, and their sessions are sealed. Without it the node runs in
    /// development mode: it serves loopback only, with a generated key
    /// (`$TESSERA_DEV_KEY`, or tessera-dev-<uid>.key in the temporary
    /// directory) that the local `client` and `sim` pick up.
    #[arg(long, env = "TESSERA_KEY")]
    pub key: Option<PathBuf>,
    /// With --key: live sessions one client IP address may hold (0: no
    /// limit; default 32). Raise it for players behind a carrier-grade NAT,
    /// or for a load test from one host.
    #[arg(long, env = "TESSERA_SESSIONS_PER_ADDRESS")]
    pub sessions_per_address: Option<u32>,
    /// With --key: handshake packets per second one client IP address may
    /// send (burst of three seconds; default 10).
    #[arg(long, env = "TESSERA_HANDSHAKES_PER_ADDRESS")]
    pub handshakes_per_address: Option<u32>,
    /// Inputs, acks and pings one session may send per second (two
    /// seconds of burst; 0: no limit; default 240, twice a 60 Hz client's).
    /// A session far over it is closed.
    #[arg(long, env = "TESSERA_INPUTS_PER_SECOND")]
    pub inputs_per_second: Option<u32>,
    /// A file holding the token a peer off loopback presents to the admin
    /// port (`tessera admin --token-file`); without it the admin port
    /// answers loopback only.
    #[arg(long, env = "TESSERA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The cluster key file (`tessera token key`; the coordinators and
    /// every node share it): cluster links are authenticated and sealed
    /// under it. A cluster all on loopback uses the development key.
    #[arg(long, env = "TESSERA_CLUSTER_KEY", requires = "coord")]
    pub cluster_key: Option<PathBuf>,
    /// An address clients reach the game port at, as tokens name it
    /// (repeat for more; default: the game port's own address).
    #[arg(
        long = "public-addr",
        env = "TESSERA_PUBLIC_ADDR",
        value_delimiter = ','
    )]
    pub public_addrs: Vec<SocketAddr>,
}

pub fn parse_world_size(s: &str) -> Result<(i32, i32), String> {
    let (c, r) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not COLUMNSxROWS (e.g. 8x8)"))?;
    let c: i32 = c
        .trim()
        .parse()
        .map_err(|_| format!("{c:?} is not a number of columns"))?;
    let r: i32 = r
        .trim()
        .parse()
        .map_err(|_| format!("{r:?} is not a number of rows"))?;
    if !(1..=4096).contains(&c) || !(1..=4096).contains(&r) {
        return Err("world size must be between 1x1 and 4096x4096 cells".into());
    }
    Ok((c, r))
}

/// The `[world]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSection {
    /// Depth-0 columns.
    pub columns: Option<i32>,
    /// Depth-0 rows.
    pub rows: Option<i32>,
    /// Cell edge, metres.
    pub cell_size: Option<f32>,
    /// AOI radius, metres.
    pub aoi_radius: Option<f32>,
    /// AOI hysteresis margin, metres.
    pub aoi_margin: Option<f32>,
    /// Most entities in a view.
    pub view_max_entities: Option<usize>,
}

/// The `[balance]` section: when cells split, move and merge.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceSection {
    /// Actors that make a cell full (score 0.5).
    pub actors_ref: Option<f64>,
    /// Inputs per second that make a cell busy (score 0.3).
    pub pps_ref: Option<f64>,
    /// Score above which a cell splits.
    pub split_score: Option<f64>,
    /// Seconds a cell stays hot before it splits.
    pub split_after_s: Option<f64>,
    /// Score below which siblings merge.
    pub merge_score: Option<f64>,
    /// Seconds siblings stay cold before they merge.
    pub merge_after_s: Option<f64>,
    /// Seconds a shard stays busy or the node unbalanced before a move.
    pub move_after_s: Option<f64>,
    /// Shard score gap that triggers a move.
    pub imbalance: Option<f64>,
    /// Seconds without a new operation on a cell after one.
    pub cooldown_s: Option<f64>,
}

/// The `[demo]` section: the demo game's tunables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSection {
    /// Player top speed, m/s.
    pub player_speed: Option<f32>,
    /// NPC speed, m/s.
    pub npc_speed: Option<f32>,
}

/// One `[[shard]]` of a static mapping.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSection {
    /// Shard index.
    pub id: usize,
    /// Its cells, as `world:cx,cy`.
    pub cells: Vec<String>,
}

/// A configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See `--port`.
    pub port: Option<u16>,
    /// See `--bind`.
    pub bind: Option<IpAddr>,
    /// See `--metrics-addr`.
    pub metrics_addr: Option<SocketAddr>,
    /// See `--admin-addr`.
    pub admin_addr: Option<SocketAddr>,
    /// See `--shards`.
    pub shards: Option<usize>,
    /// See `--tick-hz`.
    pub tick_hz: Option<u32>,
    /// See `--npcs`.
    pub npcs: Option<usize>,
    /// See `--unpinned`.
    pub unpinned: Option<bool>,
    /// See `--seed`.
    pub seed: Option<u64>,
    /// Automatic balancing (default true).
    pub auto_balance: Option<bool>,
    /// See `--max-depth`.
    pub max_depth: Option<u8>,
    /// World shape and AOI.
    pub world: Option<WorldSection>,
    /// Balancing.
    pub balance: Option<BalanceSection>,
    /// Demo game.
    pub demo: Option<DemoSection>,
    /// Static cell mapping.
    pub shard: Option<Vec<ShardSection>>,
    /// See `--key`.
    pub key: Option<PathBuf>,
    /// See `--public-addr`.
    pub public_addrs: Option<Vec<SocketAddr>>,
    /// See `--sessions-per-address`.
    pub sessions_per_address: Option<u32>,
    /// See `--handshakes-per-address`.
    pub handshakes_per_address: Option<u32>,
    /// See `--inputs-per-second`.
    pub inputs_per_second: Option<u32>,
    /// See `--admin-token-file`.
    pub admin_token_file: Option<PathBuf>,
}

impl FileConfig {
    /// Reads a `.toml` or `.json` file (by extension; TOML otherwise).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if json {
            serde_json::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
        } else {
            toml::from_str(&text).map_err(|e| {
                let msg = e.message().to_string();
                match e.span() {
                    Some(span) => {
                        let line = text[..span.start].lines().count().max(1);
                        format!("config file {} line {line}: {msg}", path.display())
                    }
                    None => format!("config file {}: {msg}", path.display()),
                }
            })
        }
    }
}

/// Merges flags (and their `TESSERA_*` variables), the file and defaults.
pub fn node_config(args: &ServeArgs) -> Result<NodeConfig, String> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let d = NodeConfig::default();
    let (bind, tokens, address_limit) = client_security(args, &file)?;
    let world = file.world.unwrap_or_default();
    let (columns, rows) = args.world.unwrap_or((
        world.columns.unwrap_or(d.geometry.columns),
        world.rows.unwrap_or(d.geometry.rows),
    ));
    let cell_size = world.cell_size.unwrap_or(d.geometry.cell_size);
    if !(cell_size.is_finite() && (8.0..=10_000.0).contains(&cell_size)) {
        return Err(format!(
            "world.cell_size {cell_size} must be between 8 and 10000 metres"
        ));
    }
    if columns < 1 || rows < 1 {
        return Err(format!(
            "world size {columns}x{rows} must have at least one cell"
        ));
    }
    let mut wc = d.world.clone();
    if let Some(r) = world.aoi_radius {
        wc.view.radius = r;
    }
    if let Some(m) = world.aoi_margin {
        wc.view.margin = m;
    }
    if let Some(n) = world.view_max_entities {
        wc.view.max_entities = n.max(1);
    }
    if !(wc.view.radius > 0.0
        && wc.view.margin >= 0.0
        && 2.0 * wc.view.leave_radius() <= cell_size * 2.5)
    {
        return Err(format!(
            "AOI radius {} + margin {} does not fit cells of {cell_size} m (cells should be 2-3x the AOI radius)",
            wc.view.radius, wc.view.margin
        ));
    }
    let mapping = match file.shard {
        None => None,
        Some(shards) => {
            let mut m = StaticMapping::default();
            for s in shards {
                let cells: Result<Vec<CellId>, String> = s
                    .cells
                    .iter()
                    .map(|c| {
                        c.parse::<CellId>()
                            .map_err(|e| format!("shard {}: {e}", s.id))
                    })
                    .collect();
                m.shards.push((s.id, cells?));
            }
            Some(m)
        }
    };
    let secs = |v: f64, what: &str| -> Result<std::time::Duration, String> {
        if v.is_finite() && (0.0..=3600.0).contains(&v) {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            Err(format!("balance.{what} must be between 0 and 3600 seconds"))
        }
    };
    let policy = match file.balance {
        None => None,
        Some(b) => {
            let mut p = tessera_coord::Policy::new(args.shards.or(file.shards).unwrap_or(1) as u16);
            if let Some(v) = b.actors_ref {
                p.actors_ref = v.max(1.0);
            }
            if let Some(v) = b.pps_ref {
                p.pps_ref = v.max(1.0);
            }
            if let Some(v) = b.split_score {
                p.split_score = v;
            }
            if let Some(v) = b.merge_score {
                p.merge_score = v;
            }
            if p.merge_score >= p.split_score {
                return Err(format!(
                    "balance.merge_score {} must be below split_score {} (hysteresis)",
                    p.merge_score, p.split_score
                ));
            }
            if let Some(v) = b.split_after_s {
                p.split_sustain = secs(v, "split_after_s")?;
            }
            if let Some(v) = b.merge_after_s {
                p.merge_after = secs(v, "merge_after_s")?;
            }
            if let Some(v) = b.move_after_s {
                p.move_sustain = secs(v, "move_after_s")?;
            }
            if let Some(v) = b.cooldown_s {
                p.cooldown = secs(v, "cooldown_s")?;
            }
            if let Some(v) = b.imbalance {
                p.imbalance = v;
            }
            Some(p)
        }
    };
    let mut demo = d.demo.clone();
    if let Some(dm) = file.demo {
        if let Some(v) = dm.player_speed {
            if !(v.is_finite() && v > 0.0 && v <= 200.0) {
                return Err(format!("demo.player_speed {v} must be in (0, 200] m/s"));
            }
            demo.player_speed = v;
        }
        if let Some(v) = dm.npc_speed {
            if !(v.is_finite() && (0.0..=200.0).contains(&v)) {
                return Err(format!("demo.npc_speed {v} must be in [0, 200] m/s"));
            }
            demo.npc_speed = v;
        }
    }
    let tick_hz = args.tick_hz.or(file.tick_hz).unwrap_or(d.tick_hz);
    if !(10..=60).contains(&tick_hz) {
        return Err(format!("tick_hz {tick_hz} is outside 10..=60"));
    }
    let linger = args.linger.unwrap_or(30.0);
    if !(linger.is_finite() && (0.0..=86_400.0).contains(&linger)) {
        return Err(format!("--linger {linger} must be in [0, 86400] seconds"));
    }
    wc.player_linger_ticks = (linger * f64::from(tick_hz)).round() as u64;
    let shards = args.shards.or(file.shards);
    if shards == Some(0) {
        return Err("shards must be at least 1".into());
    }
    Ok(NodeConfig {
        bind,
        port: args.port.or(file.port).unwrap_or(d.port),
        metrics_addr: Some(
            args.metrics_addr
                .or(file.metrics_addr)
                .unwrap_or(d.metrics_addr.expect("default")),
        ),
        admin_addr: Some(
            args.admin_addr
                .or(file.admin_addr)
                .unwrap_or(d.admin_addr.expect("default")),
        ),
        shards,
        pinned: !(args.unpinned || file.unpinned.unwrap_or(false)),
        tick_hz,
        npcs: args.npcs.or(file.npcs).unwrap_or(d.npcs),
        geometry: Geometry::new(0, cell_size, columns, rows),
        world: wc,
        demo,
        mapping,
        sessions_per_shard: d.sessions_per_shard,
        seed: args.seed.or(file.seed).unwrap_or(d.seed),
        conditioner: None,
        auto_balance: !args.no_balance && file.auto_balance.unwrap_or(d.auto_balance),
        max_depth: args
            .max_depth
            .or(file.max_depth)
            .unwrap_or(d.max_depth)
            .min(8),
        policy,
        cluster: cluster_config(args)?,
        tokens: Some(tokens),
        address_limit,
        admin_token: args
            .admin_token_file
            .clone()
            .or(file.admin_token_file.clone())
            .as_deref()
            .map(tessera_runtime::node::admin::read_admin_token)
            .transpose()?,
        input_limit: match args.inputs_per_second.or(file.inputs_per_second) {
            Some(0) => None,
            Some(n) => Some(tessera_cells::node::InputLimit {
                per_second: n,
                ..tessera_cells::node::InputLimit::game_client()
            }),
            None => d.input_limit,
        },
    })
}

/// The client side of `serve`: who may connect, and how much one address
/// may open. Without a key, development mode: loopback only, a generated
/// key, no per-address limits (every local client shares one address).
fn client_security(
    args: &ServeArgs,
    file: &FileConfig,
) -> Result<
    (
        IpAddr,
        tessera_runtime::node::ClientTokens,
        Option<tessera_net::AddressLimit>,
    ),
    String,
> {
    let key = args.key.clone().or_else(|| file.key.clone());
    let public_addrs = if args.public_addrs.is_empty() {
        file.public_addrs.clone().unwrap_or_default()
    } else {
        args.public_addrs.clone()
    };
    let sessions = args.sessions_per_address.or(file.sessions_per_address);
    let handshakes = args.handshakes_per_address.or(file.handshakes_per_address);
    let bind = args.bind.or(file.bind);
    let Some(path) = key else {
        if !public_addrs.is_empty() {
            return Err("--public-addr names what tokens must name: it needs --key".into());
        }
        if sessions.is_some() || handshakes.is_some() {
            return Err("per-address limits apply to a node with --key (development mode serves loopback only)".into());
        }
        let bind = bind.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        if !bind.is_loopback() {
            return Err(format!(
                "development mode (no --key) serves loopback clients only: --bind {bind} needs --key FILE (make one with `tessera token key > FILE`)"
            ));
        }
        let dev = crate::token::dev_key_path();
        let tokens = tessera_runtime::node::ClientTokens {
            keys: vec![crate::token::dev_key(&dev)?],
            addresses: Vec::new(),
            development: true,
        };
        return Ok((bind, tokens, None));
    };
    let tokens = tessera_runtime::node::ClientTokens {
        keys: crate::token::read_keys(&path)?,
        addresses: public_addrs,
        development: false,
    };
    let mut limit = tessera_net::AddressLimit::game_server();
    if let Some(h) = handshakes {
        if h == 0 {
            return Err("--handshakes-per-address must be at least 1".into());
        }
        limit.handshakes_per_s = h;
    }
    match sessions {
        Some(0) => limit.sessions_max = u32::MAX,
        Some(n) => limit.sessions_max = n,
        None => {}
    }
    let bind = bind.unwrap_or(NodeConfig::default().bind);
    Ok((bind, tokens, Some(limit)))
}

fn cluster_config(
    args: &ServeArgs,
) -> Result<Option<tessera_runtime::cluster::ClusterConfig>, String> {
    if args.coord.is_empty() {
        if args.role != tessera_cells::wire::NodeRole::Both {
            return Err(format!(
                "--role {} needs a cluster: pass --coord, --node-id and --cluster-addr",
                args.role
            ));
        }
        return Ok(None);
    }
    let (Some(node), Some(cluster_addr)) = (args.node_id, args.cluster_addr) else {
        return Err("--coord needs --node-id and --cluster-addr".into());
    };
    if cluster_addr.ip().is_unspecified() || cluster_addr.port() == 0 {
        return Err(format!(
            "--cluster-addr {cluster_addr} must be this node's own address and a port (other nodes dial it)"
        ));
    }
    let mut all = args.coord.clone();
    all.push(cluster_addr);
    Ok(Some(tessera_runtime::cluster::ClusterConfig {
        coords: args.coord.clone(),
        node,
        cluster_addr,
        role: args.role,
        join_timeout: std::time::Duration::from_secs(60),
        key: Some(crate::token::cluster_key(
            args.cluster_key.as_deref(),
            &all,
        )?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let p = write(
            "a.toml",
            "port = 9000\nnpcs = 5\ntick_hz = 30\n[world]\ncolumns = 4\nrows = 2\n",
        );
        let args = ServeArgs {
            config: Some(p),
            port: Some(8000),
            ..ServeArgs::default()
        };
        let c = node_config(&args).unwrap();
        assert_eq!(c.port, 8000);
        assert_eq!(c.npcs, 5);
        assert_eq!(c.tick_hz, 30);
        assert_eq!((c.geometry.columns, c.geometry.rows), (4, 2));
    }

    #[test]
    fn json_and_static_mappings() {
        let p = write(
            "b.json",
            r#"{"shards": 2, "world": {"columns": 2, "rows": 1}, "shard": [{"id": 0, "cells": ["0:0,0"]}, {"id": 1, "cells": ["0:1,0"]}]}"#,
        );
        let c = node_config(&ServeArgs {
            config: Some(p),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.mapping.unwrap().shards.len(), 2);
    }

    #[test]
    fn mistakes_are_named() {
        let p = write("c.toml", "prot = 9000\n");
        let e = node_config(&ServeArgs {
            config: Some(p),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("line 1") && e.contains("prot"), "{e}");
        let p = write("d.toml", "[[shard]]\nid = 0\ncells = [\"zero\"]\n");
        let e = node_config(&ServeArgs {
            config: Some(p),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("invalid cell id"), "{e}");
        let e = node_config(&ServeArgs {
            config: Some(PathBuf::from("/nonexistent/x.toml")),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("cannot read config file"), "{e}");
        assert!(parse_world_size("8by8").is_err());
    }
}
