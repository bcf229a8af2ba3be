//! `tessera coord`: the standalone coordinator of a cluster.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tessera_cells::Geometry;
use tessera_runtime::cluster::service::{CoordService, CoordServiceConfig};

/// Options of `tessera coord`.
#[derive(clap::Args, Debug)]
pub struct CoordArgs {
    /// UDP address nodes reach the coordinator on (`tessera serve --coord`).
    #[arg(long, default_value = "127.0.0.1:7700", env = "TESSERA_COORD_LISTEN")]
    pub listen: SocketAddr,
    /// Admin port (TCP): `tessera admin --addr ADDR status`.
    #[arg(
        long,
        default_value = "127.0.0.1:7701",
        env = "TESSERA_COORD_ADMIN_ADDR"
    )]
    pub admin_addr: SocketAddr,
    /// Compute nodes (role both or compute) to wait for before the world's
    /// cells are spread over their shards; nodes joining later get cells by
    /// balancing.
    #[arg(long, default_value_t = 1, env = "TESSERA_COMPUTE_NODES")]
    pub compute_nodes: usize,
    /// World size in depth-0 cells, COLUMNSxROWS.
    #[arg(long, default_value = "8x8", value_parser = crate::config::parse_world_size)]
    pub world: (i32, i32),
    /// Cell edge, metres.
    #[arg(long, default_value_t = 128.0)]
    pub cell_size: f32,
    /// The cluster's tick rate (every node must use it).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(10..=60))]
    pub tick_hz: u32,
    /// Do not split, move or merge automatically (operator commands still
    /// work).
    #[arg(long)]
    pub no_balance: bool,
    /// Deepest quadtree split, 0..=8.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=8))]
    pub max_depth: u8,
    /// A node silent this long (milliseconds) is declared dead: balancing
    /// stops using it and its cells move to their backups when its lease
    /// ends.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(100..=60_000), env = "TESSERA_DEAD_AFTER_MS")]
    pub dead_after: u64,
    /// How long (milliseconds) each acknowledged heartbeat lets a node keep
    /// writing its cells; a node cut off from the coordinator stops when it
    /// ends, and its cells are reassigned only after it (plus 100 ms).
    /// Default 1000 alone; with --etcd, the leader TTL + 1 s, so that a
    /// coordinator failover fits inside it (nodes play on meanwhile) at the
    /// price of a slower node failover.
    #[arg(long, value_parser = clap::value_parser!(u64).range(200..=600_000), env = "TESSERA_LEASE_MS")]
    pub lease: Option<u64>,
    /// Lead through etcd (client URLs, `http://127.0.0.1:2379[,...]`): the
    /// coordinator stands by until etcd elects it, then takes over the
    /// registry etcd holds with the cluster epoch + 1. Run two or more for a
    /// hot standby. Without it the coordinator leads alone.
    #[arg(long, env = "TESSERA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's name in etcd (several clusters may share one etcd).
    #[arg(long, default_value = "tessera", env = "TESSERA_CLUSTER")]
    pub cluster: String,
    /// This coordinator's name in etcd (default: its listen address).
    #[arg(long, env = "TESSERA_COORD_NAME")]
    pub name: Option<String>,
    /// Leader lease TTL in etcd, seconds: a dead leader's standby leads
    /// within about this (etcd raises it to 1.5 of its election timeout,
    /// rounded up: 2 s with etcd's defaults).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub leader_ttl: u64,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// A file holding the token a peer off loopback presents to the admin
    /// port (`tessera admin --token-file`); without it the admin port
    /// answers loopback only.
    #[arg(long, env = "TESSERA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// The cluster key file (the same on every node): links from nodes
    /// must be authenticated and are sealed under it. A coordinator
    /// listening on loopback uses the development key.
    #[arg(long, env = "TESSERA_CLUSTER_KEY")]
    pub cluster_key: Option<std::path::PathBuf>,
}

/// Runs the coordinator until SIGINT/SIGTERM, `tessera admin shutdown` or
/// `--duration`.
pub fn run(args: CoordArgs) -> Result<(), String> {
    if !(args.cell_size.is_finite() && (8.0..=10_000.0).contains(&args.cell_size)) {
        return Err(format!(
            "--cell-size {} must be between 8 and 10000 metres",
            args.cell_size
        ));
    }
    let failover_ms = args.leader_ttl * 1000 + 1000;
    let lease = match (args.lease, args.etcd.is_empty()) {
        (Some(l), _) => l,
        (None, true) => 1000,
        (None, false) => failover_ms,
    };
    if lease <= args.dead_after {
        return Err(format!(
            "--lease {lease} ms must be longer than --dead-after {} ms (a node is declared dead before its lease ends)",
            args.dead_after
        ));
    }
    if !args.etcd.is_empty() && lease < failover_ms {
        tracing::warn!(
            lease_ms = lease,
            failover_ms,
            "--lease is shorter than a coordinator failover (leader TTL + 1 s): nodes will stop their cells while the standby takes over"
        );
    }
    let mut policy = tessera_coord::Policy::new(1);
    policy.automatic = !args.no_balance;
    policy.max_depth = args.max_depth;
    policy.watch_nodes = true;
    policy.dead_after = Duration::from_millis(args.dead_after);
    policy.lease = Duration::from_millis(lease);
    let service = CoordService::start(CoordServiceConfig {
        listen: args.listen,
        admin: Some(args.admin_addr),
        admin_token: args
            .admin_token_file
            .as_deref()
            .map(tessera_runtime::node::admin::read_admin_token)
            .transpose()?,
        geometry: Geometry::new(0, args.cell_size, args.world.0, args.world.1),
        tick_hz: args.tick_hz,
        compute_nodes: args.compute_nodes,
        policy,
        etcd: (!args.etcd.is_empty()).then(|| tessera_runtime::cluster::etcd::EtcdConfig {
            endpoints: args.etcd.clone(),
            cluster: args.cluster.clone(),
            name: args.name.clone().unwrap_or_else(|| args.listen.to_string()),
            ttl_s: args.leader_ttl,
        }),
        lease_follows_ttl: args.lease.is_none() && !args.etcd.is_empty(),
        cluster_key: Some(crate::token::cluster_key(
            args.cluster_key.as_deref(),
            &[args.listen],
        )?),
    })
    .map_err(|e| e.to_string())?;
    println!(
        "tessera coordinator listening on udp://{} ({}x{} cells, {} Hz, waiting for {} compute node(s))",
        service.listen_addr(),
        args.world.0,
        args.world.1,
        args.tick_hz,
        args.compute_nodes
    );
    if !args.etcd.is_empty() {
        println!(
            "  leadership: etcd {} (cluster {:?}); standing by until elected",
            args.etcd.join(","),
            args.cluster
        );
    }
    if let Some(a) = service.admin_addr() {
        println!("  admin: tessera admin --addr {a} status");
    }
    println!(
        "  nodes: tessera serve --coord {} --node-id N --cluster-addr IP:PORT [--role compute|gateway]",
        service.listen_addr()
    );
    let stop = service.stop_flag();
    let flag = stop.clone();
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())
        .and_then(|_| signal_hook::flag::register(signal_hook::consts::SIGTERM, flag))
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    if let Some(seconds) = args.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(seconds));
            stop.store(true, Ordering::Release);
        });
    }
    service.wait();
    println!("coordinator stopped");
    Ok(())
}
