//! A Tessera node: shards that own cells and host client sessions.
//!
//! [`Node::start`] (the demo game) or [`Node::start_game`] (any
//! [`GameLogic`]) binds one UDP socket per shard on the same port
//! (SO_REUSEPORT: the kernel spreads clients over the shards), builds the
//! registry of cell owners (contiguous blocks of the grid per shard, or a
//! validated static mapping), starts the shards, the embedded coordinator,
//! the metrics endpoint and the admin port. Each shard drives one
//! [`NodeCore`] (its world, sessions, routing and handovers, from
//! `tessera-cells`) with [`shard::NodeShard`]; this module only wires IO.

pub mod admin;
pub mod coordinator;
pub mod metrics;
pub mod shard;
pub mod shared;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::node::{NodeCore, ShardMsg};
use tessera_cells::rng::Rng;
use tessera_cells::{GameLogic, Geometry, Layout, ShardRef, ShardWorld, WorldConfig};
use tessera_coord::{contiguous_blocks, MappingError, Registry, RegistryError, StaticMapping};
use tessera_net::conditioner::ConditionerConfig;
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{Config as EndpointConfig, Endpoint};

use crate::cluster::shard::ClusterSide;
use crate::cluster::{ClusterConfig, Joined};
use crate::runtime::{Runtime, RuntimeBuilder, RuntimeError, ShardConfig, StopHandle};
use crate::stats::ShardReport;
use tessera_cells::wire::{NodeRole, Registration};

pub use shared::{NodeShardStats, NodeShared};

/// Everything a node is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Address the game port binds to.
    pub bind: IpAddr,
    /// The game port (UDP). 0 picks a free one.
    pub port: u16,
    /// Prometheus metrics (HTTP), None to disable.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin port (TCP, loopback), None to disable.
    pub admin_addr: Option<SocketAddr>,
    /// Shards (default: one per CPU).
    pub shards: Option<usize>,
    /// Pin shards to CPUs.
    pub pinned: bool,
    /// Ticks per second (10..=60).
    pub tick_hz: u32,
    /// NPCs in the demo world.
    pub npcs: usize,
    /// The world's shape.
    pub geometry: Geometry,
    /// Engine settings.
    pub world: WorldConfig,
    /// Demo game tunables.
    pub demo: DemoConfig,
    /// Cells per shard from a config file; None: contiguous blocks.
    pub mapping: Option<StaticMapping>,
    /// Most sessions per shard.
    pub sessions_per_shard: usize,
    /// Seed of the world's randomness (NPCs...).
    pub seed: u64,
    /// Impair outgoing traffic (manual testing only).
    pub conditioner: Option<ConditionerConfig>,
    /// Let the coordinator split, move and merge cells by itself (off: only
    /// operator commands).
    pub auto_balance: bool,
    /// Deepest split.
    pub max_depth: u8,
    /// Balancing tunables (None: the defaults for the shard count).
    pub policy: Option<tessera_coord::Policy>,
    /// Join a cluster (a standalone coordinator owns the registry); None:
    /// a single node with its embedded coordinator.
    pub cluster: Option<ClusterConfig>,
    /// Clients need a connect token, and their sessions are sealed; None:
    /// open mode (clear text, no token: tests and embedding), logged as
    /// such. `tessera serve` always sets it (a generated development key
    /// without `--key`).
    pub tokens: Option<ClientTokens>,
    /// Limits per client source address (sessions at once, handshakes per
    /// second); None: unlimited, as when every client shares loopback.
    pub address_limit: Option<tessera_net::AddressLimit>,
    /// Game messages (inputs, acks, pings) one session may send; None:
    /// unlimited. The excess is dropped and counted, a flood closes the
    /// session.
    pub input_limit: Option<tessera_cells::node::InputLimit>,
    /// The token a peer off loopback presents to the admin port; None: the
    /// admin port answers loopback only (and may not bind elsewhere).
    pub admin_token: Option<String>,
}

/// What a client must present: a connect token sealed under one of `keys`
/// (the current key first, then the previous one) naming one of
/// `addresses`.
#[derive(Clone, Debug)]
pub struct ClientTokens {
    /// The keys shared with the login service.
    pub keys: Vec<tessera_net::token::TokenKey>,
    /// The addresses clients reach this node at; empty: the game port's
    /// own address (loopback if it is bound to every interface).
    pub addresses: Vec<SocketAddr>,
    /// The keys are a generated development key (logged as such).
    pub development: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 7777,
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9100))),
            admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9101))),
            shards: None,
            pinned: true,
            tick_hz: 20,
            npcs: 2000,
            geometry: Geometry::new(0, 128.0, 8, 8),
            world: WorldConfig::default(),
            demo: DemoConfig::default(),
            mapping: None,
            sessions_per_shard: 20_000,
            seed: 1,
            conditioner: None,
            auto_balance: true,
            max_depth: 3,
            policy: None,
            cluster: None,
            tokens: None,
            address_limit: None,
            input_limit: Some(tessera_cells::node::InputLimit::game_client()),
            admin_token: None,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The game port is taken.
    #[error("UDP port {port} is in use: pass --port or stop the other server")]
    PortInUse {
        /// The port.
        port: u16,
    },
    /// Binding a socket failed otherwise.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The metrics or admin address is taken.
    #[error("{what} address {addr} is in use: pass {flag} or stop the other process")]
    HelperPortInUse {
        /// "metrics" or "admin".
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The flag that changes it.
        flag: &'static str,
    },
    /// The static cell mapping is wrong.
    #[error("invalid cell mapping: {0}")]
    Mapping(#[from] MappingError),
    /// The registry could not be built.
    #[error("invalid registry: {0}")]
    Registry(#[from] RegistryError),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Another I/O failure.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The cluster could not be joined.
    #[error(transparent)]
    Join(#[from] crate::cluster::JoinError),
}

/// A shard's part of the world when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardShare {
    /// The shard.
    pub shard: ShardRef,
    /// Cells it owns.
    pub cells: usize,
    /// Cells of the whole world.
    pub cells_total: usize,
}

/// Fills a shard's world once its cells are in place (NPCs, props...).
pub type Populate<G> = Box<dyn Fn(&mut ShardWorld<G>, ShardShare) + Send + Sync>;

/// How a node builds and fills each shard's game.
pub struct GameSetup<G: GameLogic> {
    /// The game instance of one shard (called on that shard's thread).
    pub new_game: Box<dyn Fn(ShardRef) -> G + Send + Sync>,
    /// Fills a shard's world once its cells are in place (NPCs, props...).
    pub populate: Populate<G>,
}

impl GameSetup<DemoGame> {
    /// The demo game: `npcs` wandering NPCs spread over the shards in
    /// proportion to their cells, seeded per shard.
    pub fn demo(demo: DemoConfig, npcs: usize, seed: u64) -> Self {
        Self {
            new_game: Box::new(move |_| DemoGame::new(demo.clone())),
            populate: Box::new(move |world, share| {
                let mut rng = Rng::derive(seed, 0x4E9C ^ u64::from(share.shard.shard));
                let n = npcs * share.cells / share.cells_total.max(1);
                DemoGame::spawn_npcs(world, n, &mut rng);
            }),
        }
    }
}

/// A running node.
pub struct Node<G: GameLogic = DemoGame> {
    runtime: Runtime<ShardMsg<G>>,
    coord_tx: coordinator::CoordSender,
    shared: Arc<NodeShared>,
    helpers: Vec<JoinHandle<()>>,
    helpers_stop: Arc<AtomicBool>,
    game_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

fn bind_helper(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<std::net::TcpListener, NodeError> {
    std::net::TcpListener::bind(addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => NodeError::HelperPortInUse { what, addr, flag },
        _ => NodeError::Bind { addr, source: e },
    })
}

impl Node<DemoGame> {
    /// Starts a node of the demo game.
    pub fn start(config: NodeConfig) -> Result<Self, NodeError> {
        let setup = GameSetup::demo(config.demo.clone(), config.npcs, config.seed);
        Self::start_game(config, setup)
    }
}

impl<G: GameLogic> Node<G> {
    /// Starts a node of any game (`config.npcs` and `config.demo` are the
    /// demo's: `setup` decides what a shard's world holds).
    pub fn start_game(config: NodeConfig, setup: GameSetup<G>) -> Result<Self, NodeError> {
        if !(10..=60).contains(&config.tick_hz) {
            return Err(NodeError::Invalid(format!(
                "tick rate {} Hz is outside 10..=60",
                config.tick_hz
            )));
        }
        let builder = RuntimeBuilder::new()
            .pinned(config.pinned)
            .tick_hz(config.tick_hz)
            .mailbox_capacity(1 << 20)
            .shard_config(ShardConfig {
                tick_period: Duration::from_nanos(1_000_000_000 / u64::from(config.tick_hz)),
                outbox_pending_max: 1 << 18,
                ..ShardConfig::default()
            });
        let builder = match config.shards {
            Some(n) => builder.shards(n),
            None => builder,
        };
        let plan = builder.plan()?;
        let shards = plan.len();

        // Helper ports first: a clash there must not leave shards running.
        let metrics = config
            .metrics_addr
            .map(|a| bind_helper(a, "metrics", "--metrics-addr"))
            .transpose()?;
        let mut admin_access = admin::AdminAccess {
            token: config.admin_token.clone(),
            ..admin::AdminAccess::default()
        };
        if let Some(a) = config.admin_addr {
            admin_access
                .check_bind(a, "--admin-addr")
                .map_err(NodeError::Invalid)?;
        }
        let admin = config
            .admin_addr
            .map(|a| bind_helper(a, "admin", "--admin-addr"))
            .transpose()?;
        // A compute node hosts no sessions: its game port is a private one.
        let sockets = match &config.cluster {
            Some(cc) if cc.role == NodeRole::Compute => Self::bind_game_sockets(
                &NodeConfig {
                    port: 0,
                    ..config.clone()
                },
                shards,
            )?,
            _ => Self::bind_game_sockets(&config, shards)?,
        };
        let game_addr = sockets[0].local_addr();
        let token_policy = config.tokens.as_ref().map(|t| {
            let addresses = if t.addresses.is_empty() {
                let ip = if game_addr.ip().is_unspecified() {
                    std::net::IpAddr::from([127, 0, 0, 1])
                } else {
                    game_addr.ip()
                };
                vec![SocketAddr::new(ip, game_addr.port())]
            } else {
                t.addresses.clone()
            };
            // Tokens expire in Unix time; the endpoint never reads the clock.
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            tessera_net::TokenPolicy {
                keys: t.keys.clone(),
                addresses,
                clock: (std::time::Instant::now(), unix_ms),
            }
        });

        let policy_summary = token_policy.clone();
        let development = config.tokens.as_ref().is_some_and(|t| t.development);
        let address_limit = config.address_limit;
        let (input_limit, tick_hz) = (config.input_limit, config.tick_hz);
        // One per node: a player who comes back on another shard of it
        // finds its avatar. Bounded: a few times the sessions a node hosts.
        let player_gate = Arc::new(tessera_net::token::PlayerGate::default());
        let players = Arc::new(tessera_cells::node::PlayerDirectory::new(
            config.world.player_linger_ticks,
            2 * config.sessions_per_shard * shards,
        ));
        // In a cluster, the coordinator owns the registry: bind the cluster
        // ports, register, wait for it.
        let incarnation = tessera_net::driver::os_seed().unwrap_or(config.seed);
        let mut cluster_sockets = Vec::new();
        let mut joined: Option<Joined> = None;
        if let Some(cc) = &config.cluster {
            if shards > usize::from(tessera_cells::ids::IdAllocator::SHARDS_MAX) {
                return Err(NodeError::Invalid(format!(
                    "{shards} shards: a cluster node runs at most {} (entity ids name node and shard)",
                    tessera_cells::ids::IdAllocator::SHARDS_MAX
                )));
            }
            cluster_sockets = Self::bind_cluster_sockets(cc, shards)?;
            let advertised = (cc.role != NodeRole::Compute).then_some(game_addr);
            let j =
                crate::cluster::join(cc, shards as u16, advertised, incarnation, config.tick_hz)?;
            tracing::info!(node = cc.node, coord = %cc.coords_text(), cells = j.registry.len(), nodes = j.directory.len(), "joined the cluster");
            joined = Some(j);
        }
        let mut tick_base = 0;
        let builder = match &joined {
            Some(j) => {
                let (origin, base) =
                    crate::cluster::tick_alignment(j.tick_origin_ms, config.tick_hz);
                tick_base = base;
                builder.tick_origin(origin)
            }
            None => builder,
        };
        let layout = match &joined {
            Some(j) => j.registry.layout().clone(),
            None => Arc::new(Layout::new(config.geometry.clone())),
        };
        let registry = match &joined {
            Some(j) => j.registry.clone(),
            None => {
                let owners = match &config.mapping {
                    Some(m) => m.validate(&layout, shards)?,
                    None => contiguous_blocks(&layout, shards),
                };
                Registry::new(layout.clone(), &owners)?
            }
        };
        let mut policy = config
            .policy
            .clone()
            .unwrap_or_else(|| tessera_coord::Policy::new(shards as u16));
        policy.shards = shards as u16;
        policy.automatic = config.auto_balance;
        policy.max_depth = config.max_depth;
        let (coordinator, shared) = match &joined {
            Some(_) => (
                None,
                Arc::new(NodeShared::clustered(
                    registry.clone(),
                    config.cluster.as_ref().map_or(0, |c| c.node),
                    shards,
                    config.tick_hz,
                )),
            ),
            None => {
                let c = tessera_coord::Coordinator::new(registry.clone(), policy);
                let shared = Arc::new(NodeShared::new(
                    c.registry().clone(),
                    shards,
                    config.tick_hz,
                ));
                (Some(c), shared)
            }
        };
        let (coord_tx, coord_rx) = crossbeam_channel::unbounded();
        let sockets: Arc<Mutex<Vec<Option<BatchSocket>>>> =
            Arc::new(Mutex::new(sockets.into_iter().map(Some).collect()));
        let cluster_sockets: Arc<Mutex<Vec<Option<BatchSocket>>>> =
            Arc::new(Mutex::new(cluster_sockets.into_iter().map(Some).collect()));
        let cluster_setup = config.cluster.clone().zip(joined.map(|j| j.directory));
        let node_id = config.cluster.as_ref().map_or(0, |c| c.node);

        let world_config = WorldConfig {
            tick_hz: config.tick_hz,
            seed: config.seed,
            ..config.world.clone()
        };
        let total_cells = layout.leaves().len();
        let (sh, sessions, seed) = (shared.clone(), config.sessions_per_shard, config.seed);
        let total_shards = shards;
        let setup = Arc::new(setup);
        let shard_coord_tx = coord_tx.clone();
        let runtime = builder.start(move |shard| {
            let socket = sockets.lock().unwrap_or_else(|e| e.into_inner())[shard.index()]
                .take()
                .expect("one socket per shard");
            let me = ShardRef {
                node: node_id,
                shard: shard.0,
            };
            let registry = sh.registry();
            let share = ShardShare {
                shard: me,
                cells: registry.cells_of(me).len(),
                cells_total: total_cells,
            };
            let world = ShardWorld::new(
                (setup.new_game)(me),
                registry.layout().clone(),
                world_config.clone(),
                tessera_cells::ids::IdAllocator::prefix_of(me.node, me.shard),
            );
            let mut core = NodeCore::with_incarnation(me, world, registry, incarnation);
            core.set_input_limit(input_limit, tick_hz);
            core.set_player_directory(players.clone());
            // Resume credentials must not be guessable: keyed from the OS.
            if let (Ok(k0), Ok(k1)) = (
                tessera_net::driver::os_seed(),
                tessera_net::driver::os_seed(),
            ) {
                core.set_session_secret(k0, k1);
            } else {
                tracing::warn!(shard = %me, "no OS randomness: resume credentials use a fixed key");
            }
            if sh.clustered {
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                core.world_mut()
                    .start_ids_at(tessera_cells::ids::IdAllocator::serial_origin(unix_ms));
            }
            (setup.populate)(core.world_mut(), share);
            let endpoint_seed = tessera_net::driver::os_seed().unwrap_or(seed) ^ u64::from(shard.0);
            let mut endpoint_config = EndpointConfig::game_server(sessions);
            endpoint_config.address_limit = address_limit;
            let mut endpoint =
                Endpoint::new(endpoint_config, endpoint_seed).expect("valid server configuration");
            if let Some(p) = &token_policy {
                endpoint
                    .require_tokens(p.clone())
                    .expect("the game configuration keeps room for the tag");
                // One session per player across the node's shards.
                endpoint.share_players(player_gate.clone(), u32::from(shard.0));
            }
            let driver = shard::NodeShard::new(
                shard,
                sh.clone(),
                core,
                endpoint,
                socket,
                shard_coord_tx.clone(),
            )
            .with_tick_base(tick_base);
            match &cluster_setup {
                None => driver,
                Some((cc, directory)) => {
                    let socket = cluster_sockets.lock().unwrap_or_else(|e| e.into_inner())
                        [shard.index()]
                    .take()
                    .expect("one cluster socket per shard");
                    let mut endpoint =
                        Endpoint::new(EndpointConfig::cluster(1024), endpoint_seed ^ 0xC1A5)
                            .expect("valid cluster configuration");
                    if let Some(key) = &cc.key {
                        // Others dial the advertised address (port + shard).
                        let mut advertised = cc.cluster_addr;
                        advertised.set_port(advertised.port().wrapping_add(shard.0));
                        key.guard(&mut endpoint, vec![advertised, socket.local_addr()]);
                    }
                    let registration = Registration {
                        node: cc.node,
                        shard: shard.0,
                        shards: total_shards as u16,
                        role: cc.role,
                        incarnation,
                        cluster_addr: cc.cluster_addr,
                        game_addr: (cc.role != NodeRole::Compute).then_some(game_addr),
                    };
                    driver.with_cluster(ClusterSide::new(
                        me,
                        endpoint,
                        socket,
                        &cc.coords,
                        registration,
                        directory.clone(),
                        cc.key.clone(),
                    ))
                }
            }
        })?;

        let helpers_stop = Arc::new(AtomicBool::new(false));
        let mut helpers = Vec::new();
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = metrics {
            helpers.push(metrics::serve(
                listener,
                shared.clone(),
                runtime.stats(),
                helpers_stop.clone(),
            )?);
        }
        if let Some(coordinator) = coordinator {
            helpers.push(coordinator::spawn(
                coordinator,
                coord_rx,
                runtime.senders().to_vec(),
                shared.clone(),
                helpers_stop.clone(),
            )?);
        }
        if let Some(listener) = admin {
            admin_access.refused = shared.admin_refused.clone();
            helpers.push(admin::serve(
                listener,
                shared.clone(),
                runtime.stats(),
                runtime.stop_handle(),
                coord_tx.clone(),
                admin_access.clone(),
                helpers_stop.clone(),
            )?);
        }
        if shared.clustered {
            helpers.push(spawn_drain_watch(
                shared.clone(),
                runtime.stop_handle(),
                helpers_stop.clone(),
            )?);
        }
        // Said once the node is up (a configuration error is the only line
        // of a failed start).
        match &policy_summary {
            Some(p) if development => {
                tracing::warn!(addr = %game_addr, addresses = ?p.addresses, "development mode: loopback clients with a token from the generated development key (give --key to serve players)")
            }
            Some(p) => {
                tracing::info!(keys = p.keys.len(), addresses = ?p.addresses, address_limit = ?address_limit, "clients need a connect token; sessions are sealed")
            }
            None => {
                tracing::warn!(addr = %game_addr, "open mode: clients connect without a token, in clear text")
            }
        }
        tracing::info!(addr = %game_addr, shards, metrics = ?metrics_addr, admin = ?admin_addr, "node started");
        Ok(Node {
            coord_tx,
            runtime,
            shared,
            helpers,
            helpers_stop,
            game_addr,
            metrics_addr,
            admin_addr,
        })
    }

    /// One UDP port per shard: the cluster address's port + shard index
    /// (other nodes compute it from the directory).
    fn bind_cluster_sockets(
        cc: &ClusterConfig,
        shards: usize,
    ) -> Result<Vec<BatchSocket>, NodeError> {
        let config = SocketConfig {
            reuse_port: false,
            ..SocketConfig::default()
        };
        if cc.cluster_addr.port() == 0 {
            return Err(NodeError::Invalid(
                "--cluster-addr needs a port (shard s listens on port + s)".into(),
            ));
        }
        let mut out = Vec::with_capacity(shards);
        for s in 0..shards {
            let mut addr = cc.cluster_addr;
            addr.set_port(
                cc.cluster_addr
                    .port()
                    .checked_add(s as u16)
                    .ok_or_else(|| {
                        NodeError::Invalid(format!(
                            "cluster port {} + {s} overflows",
                            cc.cluster_addr.port()
                        ))
                    })?,
            );
            out.push(
                BatchSocket::bind(addr, &config).map_err(|e| match e.kind() {
                    io::ErrorKind::AddrInUse => NodeError::Invalid(format!(
                        "cluster port {addr} (shard {s}) is in use: pick another --cluster-addr"
                    )),
                    _ => NodeError::Bind { addr, source: e },
                })?,
            );
        }
        Ok(out)
    }

    fn bind_game_sockets(
        config: &NodeConfig,
        shards: usize,
    ) -> Result<Vec<BatchSocket>, NodeError> {
        let mut addr = SocketAddr::new(config.bind, config.port);
        if config.port != 0 {
            // SO_REUSEPORT would let us share the port with another server
            // silently: a plain bind first tells whether someone holds it.
            match UdpSocket::bind(addr) {
                Ok(probe) => drop(probe),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    return Err(NodeError::PortInUse { port: config.port })
                }
                Err(e) => return Err(NodeError::Bind { addr, source: e }),
            }
        }
        let socket_config = SocketConfig::default();
        let mut sockets = Vec::with_capacity(shards);
        for _ in 0..shards {
            let mut s = BatchSocket::bind(addr, &socket_config).map_err(|e| match e.kind() {
                io::ErrorKind::AddrInUse => NodeError::PortInUse { port: addr.port() },
                _ => NodeError::Bind { addr, source: e },
            })?;
            if let Some(c) = &config.conditioner {
                s.set_conditioner(Some(tessera_net::conditioner::LinkConditioner::new(
                    c.clone(),
                    config.seed,
                )));
            }
            // Port 0: the other shards join the port the first one got.
            addr = s.local_addr();
            sockets.push(s);
        }
        Ok(sockets)
    }

    /// The game address clients connect to.
    pub fn game_addr(&self) -> SocketAddr {
        self.game_addr
    }

    /// The metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Shared state (registry, statistics).
    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    /// Sends an operator command to the coordinator and waits for its answer.
    pub fn command(&self, command: coordinator::AdminCommand) -> Result<String, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.coord_tx
            .send(coordinator::CoordInput::Admin { command, reply: tx })
            .map_err(|_| "the coordinator is not running".to_string())?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the coordinator did not answer".to_string())?
    }

    /// A handle to stop the node from anywhere.
    pub fn stop_handle(&self) -> StopHandle {
        self.runtime.stop_handle()
    }

    /// Shard -> CPU mapping.
    pub fn placement(&self) -> Vec<(crate::ids::ShardId, Option<usize>)> {
        self.runtime.placement()
    }

    /// Waits until the node is stopped (signal, admin, [`StopHandle`]), then
    /// joins the shards and helpers; returns the shards' reports.
    pub fn wait(self) -> Result<Vec<ShardReport>, NodeError> {
        let stop = self.runtime.stop_handle();
        while !stop.wait_timeout(Duration::from_secs(3600)) {}
        let reports = self.runtime.join();
        self.helpers_stop.store(true, Ordering::Release);
        for h in self.helpers {
            let _ = h.join();
        }
        Ok(reports?)
    }
}

/// A draining node that has held nothing for this long stops (the last
/// releases and acks have gone out).
const DRAINED_FOR: Duration = Duration::from_millis(500);

/// A drain that has not finished in this long stops the node anyway
/// (logged: the cells it still owns fail over to their backups).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Stops a draining node once every shard holds nothing.
fn spawn_drain_watch(
    shared: Arc<NodeShared>,
    stop: StopHandle,
    quit: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::runtime::spawn_helper("tessera-drain", None, move || {
        let mut began = None;
        let mut drained_since = None;
        while !quit.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            if !shared.is_draining() {
                continue;
            }
            let now = std::time::Instant::now();
            let began = *began.get_or_insert(now);
            if shared.all_drained() {
                let since = *drained_since.get_or_insert(now);
                if now - since >= DRAINED_FOR {
                    tracing::warn!(
                        node = shared.node,
                        took_ms = (now - began).as_millis() as u64,
                        "drained: every cell handed over; stopping"
                    );
                    stop.stop();
                    return;
                }
            } else {
                drained_since = None;
            }
            if now - began >= DRAIN_TIMEOUT {
                tracing::error!(node = shared.node, "drain not finished after {DRAIN_TIMEOUT:?}: stopping anyway (the cells left fail over to their backups)");
                stop.stop();
                return;
            }
        }
    })
}
