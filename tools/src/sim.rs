//! `tessera sim`: the load simulator.
//!
//! Bots connect over RUDP, join, walk (random-walk, crowd or commute),
//! attack now and then, acknowledge snapshots and measure: connect time,
//! RTT, input -> visible latency (input sent until the first snapshot whose
//! `last_input_seq` covers it), snapshots per second against the tick rate,
//! gaps of more than 2 ticks, bytes per second.
//!
//! Efficient enough for 10,000 bots on one core: bots share a few dozen
//! sockets (one RUDP client endpoint per socket, so that SO_REUSEPORT still
//! spreads them over the server's shards), their actions sit in one
//! deadline heap, and frames are read in place without copies. One bot in
//! `--verify-every` also rebuilds its whole view from the deltas and counts
//! any inconsistency.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tessera_cells::view::ClientMirror;
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{ChannelId, ConnectionHandle, DisconnectReason, Endpoint, Event, TransmitBatch};
use tessera_schema::client::{self, ActionCmd, ClientMessage, InputCmd};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::{disconnect, Channel};
use tessera_schema::quant::dequantize;
use tessera_schema::wire;

/// Movement patterns.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Wander in random directions.
    RandomWalk,
    /// Everyone packs around four rally points in cell (1,1) (a huge battle).
    Crowd,
    /// Long diagonal legs back and forth: many cell and shard crossings.
    Commute,
}

/// Options of `tessera sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// The node's game address.
    #[arg(long, default_value = "127.0.0.1:7777", env = "TESSERA_ADDR")]
    pub addr: SocketAddr,
    /// More gateways of the cluster, tried in turn when a bot's gateway is
    /// lost (the gateways also name each other after a join).
    #[arg(long, value_delimiter = ',')]
    pub gateways: Vec<SocketAddr>,
    /// Seconds without a datagram from its gateway after which a bot
    /// counts the gateway as lost and resumes its avatar at another.
    #[arg(long, default_value_t = 3.0)]
    pub gateway_timeout: f64,
    /// Bots.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Seconds to run after the ramp.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds over which bots connect (default: 1 s per 1,000 bots, at least 1 s).
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Inputs per bot per second (acks ride along).
    #[arg(long, default_value_t = 20.0)]
    pub input_hz: f64,
    /// Movement pattern.
    #[arg(long, value_enum, default_value_t = Pattern::RandomWalk)]
    pub pattern: Pattern,
    /// The server's tick rate (what "all snapshots" means).
    #[arg(long, default_value_t = 20)]
    pub tick_hz: u32,
    /// Sockets (and client endpoints) the bots share (default: 1 per 200 bots).
    #[arg(long)]
    pub sockets: Option<usize>,
    /// Chance per input of attacking a visible entity.
    #[arg(long, default_value_t = 0.01)]
    pub attack_chance: f64,
    /// One bot in N rebuilds its whole view from the deltas (0: none).
    #[arg(long, default_value_t = 50)]
    pub verify_every: usize,
    /// Pin the simulator to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the bots' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Sample the server every second (needs --server-pid and/or --metrics-addr).
    #[arg(long)]
    pub soak: bool,
    /// The server's process id (for CPU and RSS samples).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's metrics address (for tick p99 samples).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Where to write per-second samples (CSV).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Print a line per second.
    #[arg(long)]
    pub progress: bool,
    /// With --pattern crowd: seconds of play after which the crowd
    /// disperses (random walk), to watch cells merge back.
    #[arg(long)]
    pub crowd_seconds: Option<f64>,
    /// Mint each bot a connect token with this key file (the node's
    /// `--key`): bot b is player `--first-player-id` + b, its token valid
    /// for `--addr` and the `--gateways`. Without it, a loopback
    /// development server's generated key, if there is one.
    #[arg(long, env = "TESSERA_TOKEN_KEY")]
    pub token_key: Option<PathBuf>,
    /// The player id of bot 0 (default: random, so that two simulators
    /// never play the same players).
    #[arg(long)]
    pub first_player_id: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Connecting,
    Joining,
    Playing,
    /// Its gateway was lost or drained: connecting to another one to take
    /// its avatar back.
    Resuming,
    Failed,
}

struct Bot {
    endpoint: u16,
    connection: Option<ConnectionHandle>,
    state: State,
    started: Instant,
    entity: u64,
    input_seq: u32,
    /// Inputs sent and not yet confirmed by a snapshot, kept whole: after a
    /// resume they go again (the lost gateway may have dropped them).
    pending: VecDeque<(u32, Instant, InputCmd)>,
    /// The gateway in use.
    addr: SocketAddr,
    /// The avatar's resume credential (0: none yet).
    resume_key: u64,
    /// Gateways to resume at, the preferred first (from the server).
    gateways: Vec<SocketAddr>,
    /// When the gateway was lost, and the attempts since.
    lost_at: Option<Instant>,
    resume_tries: u32,
    last_tick: u64,
    ack: u64,
    play_started: Option<Instant>,
    snapshots: u64,
    snapshots_measured: u64,
    gaps: u64,
    /// The longest jump between two consecutive snapshots, ticks.
    longest_gap: u64,
    bytes: u64,
    dir: [f32; 2],
    pos: Option<[f32; 2]>,
    leg: u32,
    visible: [u64; 4],
    mirror: Option<ClientMirror>,
    ping: Option<(u64, Instant)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Connect,
    Input,
    Ping,
}

struct Net {
    endpoint: Endpoint,
    socket: BatchSocket,
    /// Bot index by connection slot.
    bots: Vec<u32>,
}

/// Counters over all bots.
#[derive(Default, Debug, Clone, Copy)]
struct Totals {
    joined: u64,
    failed: u64,
    disconnected: u64,
    /// Sessions the server closed because it stops.
    told_shutdown: u64,
    errors_from_server: u64,
    bad_frames: u64,
    verify_errors: u64,
    verified: u64,
    inputs: u64,
    attacks: u64,
    /// Inputs no snapshot confirmed by the end (after the quiet second).
    unconfirmed: u64,
    /// Inputs forgotten by the bounded per-bot queue (not judged).
    untracked: u64,
    /// Gateways lost (silent past --gateway-timeout, or closed) while
    /// playing.
    gateways_lost: u64,
    /// Sessions told by a draining gateway to resume elsewhere.
    told_to_move: u64,
    /// Avatars taken back through another gateway.
    resumed: u64,
    /// Resumes the server refused, or that gave up.
    resume_failed: u64,
    /// Resumes answered with another avatar than the bot's (must be 0).
    resume_wrong_entity: u64,
    /// Inputs sent again after a resume.
    inputs_resent: u64,
}

/// Per-second figures in soak mode.
#[derive(Serialize, Default, Clone, Debug)]
struct Sample {
    t_s: f64,
    playing: u64,
    server_cpu_pct: Option<f64>,
    server_rss_mb: Option<f64>,
    server_tick_p99_ms: Option<f64>,
    snapshots_delivered_pct: f64,
    input_to_visible_ms_p99: f64,
    rtt_ms_p99: f64,
    bytes_per_client_s: f64,
}

fn ms_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Reads /proc/PID/stat (utime + stime, clock ticks) and VmRSS (bytes).
fn proc_sample(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let cpu = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((cpu, rss_kb * 1024))
}

/// Worst shard's tick p99 over the last second, from the metrics page.
fn scrape_tick_p99_ms(addr: SocketAddr) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.take(4 << 20).read_to_string(&mut body).ok()?;
    body.lines()
        .filter(|l| l.starts_with("tessera_tick_duration_recent_p99_seconds{"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        .map(|s| s * 1000.0)
}

/// Most attempts at taking an avatar back before a bot gives up.
const RESUME_TRIES: u32 = 6;

/// The bot's gateway is lost (or drains): it connects to the next gateway
/// it knows of and will present its resume credential there. False when
/// there is none to try, or it tried too often.
fn begin_resume(
    bot: &mut Bot,
    args: &SimArgs,
    now: Instant,
    b: u32,
    heap: &mut BinaryHeap<Reverse<(Instant, Action, u32)>>,
) -> bool {
    let mut candidates: Vec<SocketAddr> = Vec::new();
    for a in bot
        .gateways
        .iter()
        .chain(args.gateways.iter())
        .chain(std::iter::once(&args.addr))
    {
        if *a != bot.addr && !candidates.contains(a) {
            candidates.push(*a);
        }
    }
    if candidates.is_empty() || bot.resume_tries >= RESUME_TRIES {
        return false;
    }
    bot.lost_at.get_or_insert(now);
    let next = candidates[bot.resume_tries as usize % candidates.len()];
    bot.resume_tries += 1;
    bot.addr = next;
    bot.connection = None;
    bot.state = State::Resuming;
    // Later attempts back off a little: the cluster may still be settling.
    let delay = Duration::from_millis(100 * u64::from(bot.resume_tries - 1));
    heap.push(Reverse((now + delay, Action::Connect, b)));
    true
}

fn wait_any(nets: &[Net], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = nets
        .iter()
        .map(|n| libc::pollfd {
            fd: n.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(0, 100) as libc::c_int;
    // SAFETY: `fds` is a valid array of pollfd for the call's duration.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}

/// Runs the simulation and prints its report.
pub fn run(args: SimArgs) -> Result<(), String> {
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if !(args.input_hz > 0.0 && args.input_hz <= 120.0) {
        return Err("--input-hz must be in (0, 120]".into());
    }
    if let Some(cpu) = args.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(format!("cannot pin the simulator to CPU {cpu}"));
        }
    }
    let token_key = match &args.token_key {
        Some(path) => Some(crate::token::read_keys(path)?.remove(0)),
        None => crate::token::dev_key_for(args.addr),
    };
    let first_player_id = match args.first_player_id {
        Some(id) => id,
        // Far from 0 and from its neighbours' ranges.
        None => (tessera_net::driver::os_seed().map_err(|e| e.to_string())? >> 24) | 1 << 32,
    };
    // A bot's token names every gateway it may resume at (up to 8).
    let token_servers: Vec<SocketAddr> = std::iter::once(args.addr)
        .chain(args.gateways.iter().copied().filter(|g| *g != args.addr))
        .take(tessera_net::token::SERVERS_MAX)
        .collect();
    let sockets = args
        .sockets
        .unwrap_or(args.clients.div_ceil(200))
        .clamp(1, 256);
    let ramp =
        Duration::from_secs_f64(args.ramp.unwrap_or((args.clients as f64 / 1000.0).max(1.0)));
    let hold = Duration::from_secs_f64(args.duration.max(0.0));
    let local: SocketAddr = if args.addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let per = args.clients.div_ceil(sockets);
    let mut nets = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let socket = BatchSocket::bind(
            local,
            &SocketConfig {
                reuse_port: false,
                batch: 256,
                recv_buffer_bytes: Some(8 << 20),
                send_buffer_bytes: Some(8 << 20),
                ..SocketConfig::default()
            },
        )
        .map_err(|e| format!("cannot open UDP socket {i}: {e}"))?;
        let mut config = tessera_net::Config::game_client(per * 2 + 1);
        config.events_max = config.events_max.max(per * 64);
        // A lost gateway shows as silence: notice it in seconds, not the
        // default ten (keepalives keep a quiet link alive meanwhile).
        if args.gateway_timeout > 0.0 {
            config.idle_timeout = Duration::from_secs_f64(args.gateway_timeout);
            config.keepalive_interval = config
                .keepalive_interval
                .min(Duration::from_secs_f64(args.gateway_timeout / 4.0));
        }
        let endpoint = Endpoint::new(config, args.seed.wrapping_mul(1000) + i as u64)
            .map_err(|e| e.to_string())?;
        nets.push(Net {
            endpoint,
            socket,
            bots: Vec::new(),
        });
    }
    let mut rng = Rng(args.seed);
    let start = Instant::now();
    let mut bots: Vec<Bot> = (0..args.clients)
        .map(|i| Bot {
            endpoint: (i % sockets) as u16,
            connection: None,
            state: State::Waiting,
            started: start,
            entity: 0,
            input_seq: 0,
            pending: VecDeque::new(),
            addr: args.addr,
            resume_key: 0,
            gateways: Vec::new(),
            lost_at: None,
            resume_tries: 0,
            last_tick: 0,
            ack: 0,
            play_started: None,
            snapshots: 0,
            snapshots_measured: 0,
            gaps: 0,
            longest_gap: 0,
            bytes: 0,
            dir: [0.0, 0.0],
            pos: None,
            leg: 0,
            visible: [0; 4],
            mirror: (args.verify_every > 0 && i % args.verify_every == 0)
                .then(|| ClientMirror::new(64)),
            ping: None,
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<(Instant, Action, u32)>> = BinaryHeap::new();
    for i in 0..args.clients {
        let at = start + ramp.mul_f64(i as f64 / args.clients as f64);
        heap.push(Reverse((at, Action::Connect, i as u32)));
    }
    let measure_from = start + ramp + Duration::from_secs(2).min(hold / 4);
    let end = start + ramp + hold;
    // After the hold, bots send no more input for a second but keep
    // receiving: every input sent must by then be confirmed by a snapshot's
    // `last_input_seq` (an input lost anywhere stays unconfirmed).
    let quiet_end = end + Duration::from_secs(1);
    let input_period = Duration::from_secs_f64(1.0 / args.input_hz);
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let mut batch = TransmitBatch::new(256);
    let mut totals = Totals::default();
    let mut connect_ms = ms_histogram();
    let mut join_ms = ms_histogram();
    let mut rtt_us = ms_histogram();
    let mut visible_us = ms_histogram();
    let mut resume_us = ms_histogram();
    // Per-second windows for soak samples.
    let mut sec_visible = ms_histogram();
    let mut sec_rtt = ms_histogram();
    let mut sec_snapshots = 0u64;
    let mut sec_bytes = 0u64;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = start + Duration::from_secs(1);
    let mut last_proc = args.server_pid.and_then(proc_sample);
    let clock_ticks = 100.0; // USER_HZ on Linux
    let owner_of_slot = |nets: &mut Vec<Net>, e: usize, h: ConnectionHandle, bot: u32| {
        let slots = &mut nets[e].bots;
        let idx = h.index() as usize;
        if slots.len() <= idx {
            slots.resize(idx + 1, u32::MAX);
        }
        slots[idx] = bot;
    };
    // Four rally points, one per quadrant of the cell (1,1): a crowd in one
    // corner of the world that loads the cell's children alike.
    let rally = |cell_m: f32, k: usize| -> [f32; 2] {
        let pts = [[1.25, 1.25], [1.75, 1.25], [1.25, 1.75], [1.75, 1.75]];
        [pts[k % 4][0] * cell_m, pts[k % 4][1] * cell_m]
    };
    let mut cell_m = 128.0f32;

    loop {
        let now = Instant::now();
        if now >= quiet_end {
            break;
        }
        // 1. Network in.
        for (e, net) in nets.iter_mut().enumerate() {
            let _ = net.socket.receive_into(&mut net.endpoint, now, usize::MAX);
            while let Some(ev) = net.endpoint.poll_event() {
                let bot_of = |h: ConnectionHandle| {
                    net.bots
                        .get(h.index() as usize)
                        .copied()
                        .filter(|b| *b != u32::MAX)
                };
                match ev {
                    Event::Connected { connection, .. } => {
                        let Some(b) = bot_of(connection) else {
                            continue;
                        };
                        let bot = &mut bots[b as usize];
                        if bot.connection != Some(connection) {
                            continue;
                        }
                        if bot.state == State::Resuming {
                            // Take the avatar back where it was last seen.
                            let resume = ClientMessage::Resume {
                                entity: bot.entity,
                                key: bot.resume_key,
                                position: bot.pos.unwrap_or([0.0, 0.0]),
                            };
                            let _ = net.endpoint.send(
                                connection,
                                ChannelId(Channel::Reliable.id()),
                                client::encode(&mut fbb, &resume),
                            );
                            continue;
                        }
                        bot.state = State::Joining;
                        let _ = connect_ms
                            .record(now.duration_since(bot.started).as_micros().max(1) as u64);
                        let join = ClientMessage::Join {
                            name: format!("bot{b}"),
                            token: Vec::new(),
                        };
                        let _ = net.endpoint.send(
                            connection,
                            ChannelId(Channel::Reliable.id()),
                            client::encode(&mut fbb, &join),
                        );
                    }
                    Event::Disconnected { connection, reason } => {
                        let Some(b) = bot_of(connection) else {
                            continue;
                        };
                        let bot = &mut bots[b as usize];
                        if bot.connection != Some(connection) {
                            // A gateway this bot already left.
                            continue;
                        }
                        if reason == DisconnectReason::Remote(disconnect::SHUTTING_DOWN) {
                            totals.told_shutdown += 1;
                        }
                        let gateway_lost = matches!(
                            reason,
                            DisconnectReason::TimedOut
                                | DisconnectReason::HandshakeTimedOut
                                | DisconnectReason::Remote(disconnect::MOVED)
                                | DisconnectReason::Remote(disconnect::SHUTTING_DOWN)
                        );
                        if gateway_lost
                            && bot.resume_key != 0
                            && matches!(bot.state, State::Playing | State::Resuming)
                            && now < end
                        {
                            if bot.state == State::Playing {
                                totals.gateways_lost += 1;
                                if totals.gateways_lost <= 3 {
                                    eprintln!("sim: bot {b} lost its gateway {} ({reason:?}): resuming elsewhere", bot.addr);
                                }
                            }
                            if begin_resume(bot, &args, now, b, &mut heap) {
                                continue;
                            }
                            totals.resume_failed += 1;
                        }
                        if bot.state != State::Failed {
                            if bot.state == State::Playing {
                                totals.disconnected += 1;
                            }
                            bot.state = State::Failed;
                            totals.failed += 1;
                            if totals.failed <= 3 {
                                eprintln!("sim: bot {b} disconnected: {reason:?}");
                            }
                        }
                    }
                    Event::Message {
                        connection, bytes, ..
                    } => {
                        let Some(b) = bot_of(connection) else {
                            net.endpoint.recycle(bytes);
                            continue;
                        };
                        let bot = &mut bots[b as usize];
                        match tessera_schema::verify::server_frame(&bytes) {
                            Err(_) => totals.bad_frames += 1,
                            Ok(frame) => {
                                match frame.msg_type() {
                                    wire::ServerMsg::Welcome => {
                                        if let Some(w) = frame.msg_as_welcome() {
                                            if bot.state == State::Resuming {
                                                if w.entity() == bot.entity {
                                                    totals.resumed += 1;
                                                } else {
                                                    totals.resume_wrong_entity += 1;
                                                    eprintln!("sim: bot {b} resumed as entity {} instead of {}", w.entity(), bot.entity);
                                                }
                                                if let Some(at) = bot.lost_at.take() {
                                                    let _ = resume_us.record(
                                                        now.duration_since(at).as_micros().max(1)
                                                            as u64,
                                                    );
                                                }
                                                bot.resume_tries = 0;
                                                bot.entity = w.entity();
                                                bot.state = State::Playing;
                                                // What the lost gateway may have dropped
                                                // goes again (the server skips what it
                                                // applied already).
                                                for (_, _, input) in &bot.pending {
                                                    let msg = ClientMessage::Input(input.clone());
                                                    if net
                                                        .endpoint
                                                        .send(
                                                            connection,
                                                            ChannelId(Channel::Reliable.id()),
                                                            client::encode(&mut fbb, &msg),
                                                        )
                                                        .is_ok()
                                                    {
                                                        totals.inputs_resent += 1;
                                                    }
                                                }
                                                net.endpoint.recycle(bytes);
                                                continue;
                                            }
                                            bot.entity = w.entity();
                                            bot.resume_key = w.resume_key();
                                            bot.state = State::Playing;
                                            bot.play_started = Some(now);
                                            cell_m = w.cell_size_cm() as f32 / 100.0;
                                            if let Some(p) = w.position() {
                                                bot.pos =
                                                    Some([dequantize(p.x()), dequantize(p.y())]);
                                            }
                                            totals.joined += 1;
                                            let _ = join_ms.record(
                                                now.duration_since(bot.started).as_micros().max(1)
                                                    as u64,
                                            );
                                            heap.push(Reverse((now, Action::Input, b)));
                                            heap.push(Reverse((
                                                now + Duration::from_millis(
                                                    500 + u64::from(b % 1500),
                                                ),
                                                Action::Ping,
                                                b,
                                            )));
                                        }
                                    }
                                    wire::ServerMsg::Snapshot => {
                                        if let Some(s) = frame.msg_as_snapshot() {
                                            let tick = s.tick();
                                            if tick > bot.last_tick {
                                                if bot.last_tick > 0 && now >= measure_from {
                                                    bot.longest_gap =
                                                        bot.longest_gap.max(tick - bot.last_tick);
                                                }
                                                if bot.last_tick > 0
                                                    && tick - bot.last_tick > 2
                                                    && now >= measure_from
                                                {
                                                    bot.gaps += 1;
                                                    tracing::info!(
                                                        bot = b,
                                                        from = bot.last_tick,
                                                        to = tick,
                                                        "sim: snapshot gap"
                                                    );
                                                }
                                                bot.last_tick = tick;
                                                bot.ack = tick;
                                            }
                                            bot.snapshots += 1;
                                            bot.bytes += bytes.len() as u64;
                                            if now >= measure_from {
                                                bot.snapshots_measured += 1;
                                                sec_snapshots += 1;
                                                sec_bytes += bytes.len() as u64;
                                            }
                                            let applied = s.last_input_seq();
                                            while bot
                                                .pending
                                                .front()
                                                .is_some_and(|(seq, ..)| *seq <= applied)
                                            {
                                                let (_, sent, _) =
                                                    bot.pending.pop_front().expect("front");
                                                let us = now.duration_since(sent).as_micros().max(1)
                                                    as u64;
                                                if now >= measure_from {
                                                    let _ = visible_us.record(us);
                                                    let _ = sec_visible.record(us);
                                                }
                                            }
                                            let me = bot.entity;
                                            if let Some(v) = s.entered() {
                                                for (k, f) in v.iter().enumerate() {
                                                    if f.id() == me {
                                                        bot.pos = Some([
                                                            dequantize(f.pos().x()),
                                                            dequantize(f.pos().y()),
                                                        ]);
                                                    } else if k < 4 {
                                                        bot.visible[k] = f.id();
                                                    }
                                                }
                                            }
                                            if let Some(v) = s.moved() {
                                                if let Some(m) = v.iter().find(|m| m.id() == me) {
                                                    bot.pos = Some([
                                                        dequantize(m.pos().x()),
                                                        dequantize(m.pos().y()),
                                                    ]);
                                                }
                                            }
                                            if let Some(mirror) = bot.mirror.as_mut() {
                                                totals.verified += 1;
                                                match tessera_schema::server::decode(&bytes) {
                                                Ok(tessera_schema::server::ServerMessage::Snapshot(owned)) => {
                                                    if let Err(e) = mirror.apply(&owned) {
                                                        if !matches!(e, tessera_cells::view::MirrorError::Stale(_)) {
                                                            if totals.verify_errors < 20 {
                                                                tracing::warn!(bot = b, tick = owned.tick, error = %e, "sim: snapshot does not apply to the rebuilt view");
                                                            }
                                                            totals.verify_errors += 1;
                                                        }
                                                    }
                                                }
                                                _ => totals.verify_errors += 1,
                                            }
                                            }
                                        }
                                    }
                                    wire::ServerMsg::Pong => {
                                        if let (Some(p), Some((token, sent))) =
                                            (frame.msg_as_pong(), bot.ping)
                                        {
                                            if p.client_time_us() == token {
                                                let us = now.duration_since(sent).as_micros().max(1)
                                                    as u64;
                                                let _ = rtt_us.record(us);
                                                let _ = sec_rtt.record(us);
                                                bot.ping = None;
                                            }
                                        }
                                    }
                                    wire::ServerMsg::Error => {
                                        totals.errors_from_server += 1;
                                        let refused = frame.msg_as_error().is_some_and(|e| {
                                            e.code() == wire::ErrorCode::ResumeRefused
                                        });
                                        if refused && bot.state == State::Resuming {
                                            totals.resume_failed += 1;
                                            totals.failed += 1;
                                            bot.state = State::Failed;
                                            eprintln!(
                                                "sim: bot {b}: resume of entity {} refused",
                                                bot.entity
                                            );
                                        }
                                    }
                                    wire::ServerMsg::Gateways => {
                                        if let Some(g) = frame.msg_as_gateways() {
                                            let list: Vec<SocketAddr> = g
                                                .addresses()
                                                .iter()
                                                .flat_map(|v| v.iter())
                                                .filter_map(|a| a.parse().ok())
                                                .collect();
                                            bot.gateways = list;
                                            if g.now() && bot.state == State::Playing {
                                                // The gateway drains: go now.
                                                totals.told_to_move += 1;
                                                let _ = net.endpoint.disconnect(
                                                    now,
                                                    connection,
                                                    disconnect::MOVED,
                                                );
                                                if !begin_resume(bot, &args, now, b, &mut heap) {
                                                    totals.resume_failed += 1;
                                                    totals.failed += 1;
                                                    bot.state = State::Failed;
                                                }
                                            }
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                        net.endpoint.recycle(bytes);
                    }
                    Event::Acked { .. } => {}
                }
            }
            let _ = e;
        }
        // 2. Bot actions that are due.
        while let Some(Reverse((at, action, b))) = heap.peek().copied() {
            if at > now {
                break;
            }
            heap.pop();
            let bot = &mut bots[b as usize];
            let e = bot.endpoint as usize;
            match action {
                Action::Connect => {
                    if bot.state != State::Resuming {
                        bot.started = now;
                    }
                    let connected = match &token_key {
                        Some(key) => crate::token::mint(
                            key,
                            first_player_id.saturating_add(u64::from(b)),
                            &token_servers,
                            3600,
                            b"sim",
                        )
                        .and_then(|t| {
                            nets[e]
                                .endpoint
                                .connect_with_token(now, bot.addr, &t)
                                .map_err(|e| e.to_string())
                        }),
                        None => nets[e]
                            .endpoint
                            .connect(now, bot.addr)
                            .map_err(|e| e.to_string()),
                    };
                    match connected {
                        Ok(h) => {
                            bot.connection = Some(h);
                            if bot.state != State::Resuming {
                                bot.state = State::Connecting;
                            }
                            owner_of_slot(&mut nets, e, h, b);
                        }
                        Err(err) => {
                            bot.state = State::Failed;
                            totals.failed += 1;
                            eprintln!("sim: bot {b} cannot connect: {err}");
                        }
                    }
                }
                Action::Ping => {
                    if bot.state == State::Resuming {
                        heap.push(Reverse((now + Duration::from_secs(2), Action::Ping, b)));
                        continue;
                    }
                    if bot.state != State::Playing {
                        continue;
                    }
                    if let Some(h) = bot.connection {
                        let token = rng.next() | 1;
                        bot.ping = Some((token, now));
                        let ping = ClientMessage::Ping {
                            client_time_us: token,
                        };
                        let _ = nets[e].endpoint.send(
                            h,
                            ChannelId(Channel::Unreliable.id()),
                            client::encode(&mut fbb, &ping),
                        );
                    }
                    heap.push(Reverse((now + Duration::from_secs(2), Action::Ping, b)));
                }
                Action::Input => {
                    if bot.state == State::Resuming && now < end {
                        // Paused, not over: inputs start again once resumed.
                        heap.push(Reverse((now + input_period, Action::Input, b)));
                        continue;
                    }
                    if bot.state != State::Playing || now >= end {
                        continue;
                    }
                    let Some(h) = bot.connection else { continue };
                    // Steering.
                    match args.pattern {
                        Pattern::RandomWalk => {
                            if bot.dir == [0.0, 0.0] || rng.chance(0.05) {
                                let a = rng.unit() * std::f32::consts::TAU;
                                bot.dir = [a.cos(), a.sin()];
                            }
                        }
                        Pattern::Crowd
                            if args
                                .crowd_seconds
                                .is_some_and(|c| now.duration_since(start).as_secs_f64() > c) =>
                        {
                            // The battle is over: everyone walks away.
                            if bot.leg == 0 {
                                bot.leg = 1;
                                let a = rng.unit() * std::f32::consts::TAU;
                                bot.dir = [a.cos(), a.sin()];
                            } else if rng.chance(0.02) {
                                let a = rng.unit() * std::f32::consts::TAU;
                                bot.dir = [a.cos(), a.sin()];
                            }
                        }
                        Pattern::Crowd => {
                            let target = rally(cell_m, b as usize);
                            if let Some(p) = bot.pos {
                                let d = [target[0] - p[0], target[1] - p[1]];
                                let len = (d[0] * d[0] + d[1] * d[1]).sqrt();
                                bot.dir = if len > 12.0 {
                                    [d[0] / len, d[1] / len]
                                } else {
                                    let a = rng.unit() * std::f32::consts::TAU;
                                    [a.cos() * 0.3, a.sin() * 0.3]
                                };
                            }
                        }
                        Pattern::Commute => {
                            // Legs of 20 s along a diagonal, back and forth.
                            let leg = (now
                                .duration_since(bot.play_started.unwrap_or(now))
                                .as_secs()
                                / 20) as u32;
                            if leg != bot.leg || bot.dir == [0.0, 0.0] {
                                bot.leg = leg;
                                let s = if (leg + b) % 2 == 0 { 0.7 } else { -0.7 };
                                bot.dir = [s, s];
                            }
                        }
                    }
                    bot.input_seq += 1;
                    let mut actions = Vec::new();
                    if rng.chance(args.attack_chance) && bot.visible[0] != 0 {
                        actions.push(ActionCmd::Attack {
                            target: bot.visible[0],
                        });
                        totals.attacks += 1;
                    }
                    let cmd = InputCmd {
                        input_seq: bot.input_seq,
                        client_tick: bot.last_tick,
                        movement: bot.dir,
                        heading: bot.dir[1].atan2(bot.dir[0]),
                        actions,
                    };
                    let input = ClientMessage::Input(cmd.clone());
                    if nets[e]
                        .endpoint
                        .send(
                            h,
                            ChannelId(Channel::Reliable.id()),
                            client::encode(&mut fbb, &input),
                        )
                        .is_ok()
                    {
                        totals.inputs += 1;
                        bot.pending.push_back((bot.input_seq, now, cmd));
                        if bot.pending.len() > 256 {
                            totals.untracked += 1;
                            bot.pending.pop_front();
                        }
                    }
                    if bot.ack > 0 {
                        let ack = ClientMessage::Ack {
                            snapshot_tick: bot.ack,
                        };
                        let _ = nets[e].endpoint.send(
                            h,
                            ChannelId(Channel::Snapshots.id()),
                            client::encode(&mut fbb, &ack),
                        );
                    }
                    let mut next = at + input_period;
                    if next < now {
                        next = now + input_period;
                    }
                    heap.push(Reverse((next, Action::Input, b)));
                }
            }
        }
        // 3. Network out.
        for net in nets.iter_mut() {
            let _ = net.socket.transmit_from(&mut net.endpoint, &mut batch, now);
        }
        // 4. Once a second: samples and progress.
        if now >= next_sample {
            next_sample += Duration::from_secs(1);
            let playing = bots.iter().filter(|b| b.state == State::Playing).count() as u64;
            let mut sample = Sample {
                t_s: now.duration_since(start).as_secs_f64(),
                playing,
                snapshots_delivered_pct: if playing > 0 {
                    100.0 * sec_snapshots as f64 / (playing as f64 * f64::from(args.tick_hz))
                } else {
                    0.0
                },
                input_to_visible_ms_p99: sec_visible.value_at_quantile(0.99) as f64 / 1000.0,
                rtt_ms_p99: sec_rtt.value_at_quantile(0.99) as f64 / 1000.0,
                bytes_per_client_s: if playing > 0 {
                    sec_bytes as f64 / playing as f64
                } else {
                    0.0
                },
                ..Sample::default()
            };
            if let Some(pid) = args.server_pid {
                if let (Some((cpu0, _)), Some((cpu1, rss))) = (last_proc, proc_sample(pid)) {
                    sample.server_cpu_pct =
                        Some((cpu1.saturating_sub(cpu0)) as f64 / clock_ticks * 100.0);
                    sample.server_rss_mb = Some(rss as f64 / (1 << 20) as f64);
                    last_proc = Some((cpu1, rss));
                }
            }
            if args.soak {
                if let Some(m) = args.metrics_addr {
                    sample.server_tick_p99_ms = scrape_tick_p99_ms(m);
                }
            }
            if args.progress || args.soak {
                eprintln!(
                    "sim t={:5.1}s playing {:6} delivered {:5.1}% visible p99 {:6.1} ms rtt p99 {:5.1} ms{}{}{}",
                    sample.t_s,
                    sample.playing,
                    sample.snapshots_delivered_pct,
                    sample.input_to_visible_ms_p99,
                    sample.rtt_ms_p99,
                    sample.server_cpu_pct.map_or(String::new(), |c| format!(" server cpu {c:.0}%")),
                    sample.server_rss_mb.map_or(String::new(), |r| format!(" rss {r:.0} MB")),
                    sample.server_tick_p99_ms.map_or(String::new(), |t| format!(" tick p99 {t:.1} ms")),
                );
            }
            samples.push(sample);
            sec_snapshots = 0;
            sec_bytes = 0;
            sec_visible.reset();
            sec_rtt.reset();
        }
        // 5. Sleep until the next action or traffic.
        let next = heap
            .peek()
            .map(|r| r.0 .0)
            .unwrap_or(now + Duration::from_millis(5));
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(5));
        if !wait.is_zero() {
            wait_any(&nets, wait);
        }
    }
    totals.unconfirmed = bots
        .iter()
        .filter(|b| b.state == State::Playing)
        .map(|b| b.pending.len() as u64)
        .sum();
    // Leave politely so the server frees the avatars at once.
    let now = Instant::now();
    for bot in bots.iter() {
        if let (State::Playing, Some(h)) = (bot.state, bot.connection) {
            let net = &mut nets[bot.endpoint as usize];
            let _ = net.endpoint.send(
                h,
                ChannelId(Channel::Reliable.id()),
                client::encode(&mut fbb, &ClientMessage::Leave { reason: 0 }),
            );
        }
    }
    for _ in 0..5 {
        for net in nets.iter_mut() {
            batch.clear();
            let _ = net.endpoint.poll_transmit(now, &mut batch);
            let _ = net.socket.send_batch(now, &batch);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    report(
        &args,
        &bots,
        &totals,
        &connect_ms,
        &join_ms,
        &rtt_us,
        &visible_us,
        &resume_us,
        end,
        measure_from,
        &samples,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &SimArgs,
    bots: &[Bot],
    totals: &Totals,
    connect: &Histogram<u64>,
    join: &Histogram<u64>,
    rtt: &Histogram<u64>,
    visible: &Histogram<u64>,
    resume: &Histogram<u64>,
    end: Instant,
    measure_from: Instant,
    samples: &[Sample],
) -> Result<(), String> {
    let playing: Vec<&Bot> = bots.iter().filter(|b| b.state == State::Playing).collect();
    let mut expected = 0.0;
    let mut received = 0u64;
    let mut bytes = 0u64;
    let mut seconds = 0.0;
    for b in &playing {
        let from = b.play_started.map_or(measure_from, |p| p.max(measure_from));
        let secs = end.saturating_duration_since(from).as_secs_f64();
        expected += secs * f64::from(args.tick_hz);
        received += b.snapshots_measured;
        seconds += secs;
        let _ = bytes;
    }
    bytes += playing.iter().map(|b| b.bytes).sum::<u64>();
    let gaps: u64 = bots.iter().map(|b| b.gaps).sum();
    let longest_gap = bots.iter().map(|b| b.longest_gap).max().unwrap_or(0);
    let delivered = if expected > 0.0 {
        100.0 * received as f64 / expected
    } else {
        0.0
    };
    let per_client_s = if seconds > 0.0 {
        received as f64 / seconds
    } else {
        0.0
    };
    let total_play: f64 = playing
        .iter()
        .map(|b| {
            end.saturating_duration_since(b.play_started.unwrap_or(end))
                .as_secs_f64()
        })
        .sum();
    let bytes_per_client_s = if total_play > 0.0 {
        bytes as f64 / total_play
    } else {
        0.0
    };
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let case = format!(
        "pattern={},clients={}",
        match args.pattern {
            Pattern::RandomWalk => "random-walk",
            Pattern::Crowd => "crowd",
            Pattern::Commute => "commute",
        },
        args.clients
    );
    let mut rows: Vec<(&str, f64, &str)> = vec![
        ("clients_joined", totals.joined as f64, "clients"),
        ("clients_failed", totals.failed as f64, "clients"),
        (
            "clients_disconnected",
            totals.disconnected as f64,
            "clients",
        ),
        (
            "clients_told_shutdown",
            totals.told_shutdown as f64,
            "clients",
        ),
        ("connect_ms_p50", ms(connect, 0.5), "ms"),
        ("connect_ms_p99", ms(connect, 0.99), "ms"),
        ("join_ms_p99", ms(join, 0.99), "ms"),
        ("rtt_ms_p50", ms(rtt, 0.5), "ms"),
        ("rtt_ms_p99", ms(rtt, 0.99), "ms"),
        ("input_to_visible_ms_p50", ms(visible, 0.5), "ms"),
        ("input_to_visible_ms_p99", ms(visible, 0.99), "ms"),
        ("input_to_visible_ms_p999", ms(visible, 0.999), "ms"),
        ("snapshots_per_client_s", per_client_s, "1/s"),
        ("snapshots_delivered_pct", delivered, "%"),
        ("gaps_over_2_ticks", gaps as f64, "gaps"),
        ("longest_gap_ticks", longest_gap as f64, "ticks"),
        ("bytes_per_client_s", bytes_per_client_s, "B/s"),
        ("inputs_sent", totals.inputs as f64, "inputs"),
        ("inputs_unconfirmed", totals.unconfirmed as f64, "inputs"),
        ("inputs_untracked", totals.untracked as f64, "inputs"),
        ("attacks_sent", totals.attacks as f64, "actions"),
        ("server_errors", totals.errors_from_server as f64, "frames"),
        ("bad_frames", totals.bad_frames as f64, "frames"),
        ("verified_snapshots", totals.verified as f64, "snapshots"),
        ("verify_errors", totals.verify_errors as f64, "snapshots"),
    ];
    if totals.gateways_lost + totals.told_to_move > 0 {
        rows.extend([
            ("gateways_lost", totals.gateways_lost as f64, "clients"),
            ("told_to_move", totals.told_to_move as f64, "clients"),
            ("resumed", totals.resumed as f64, "clients"),
            ("resume_failed", totals.resume_failed as f64, "clients"),
            (
                "resume_wrong_entity",
                totals.resume_wrong_entity as f64,
                "clients",
            ),
            ("resume_ms_p50", ms(resume, 0.5), "ms"),
            ("resume_ms_p99", ms(resume, 0.99), "ms"),
            ("inputs_resent", totals.inputs_resent as f64, "inputs"),
        ]);
    }
    let worst = |f: fn(&Sample) -> Option<f64>| {
        samples
            .iter()
            .filter_map(f)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    let server_tick = worst(|s| s.server_tick_p99_ms);
    let server_rss = worst(|s| s.server_rss_mb);
    let server_cpu = worst(|s| s.server_cpu_pct);
    if let Some(v) = server_tick {
        rows.push(("server_tick_ms_p99_worst_second", v, "ms"));
    }
    if let Some(v) = server_rss {
        rows.push(("server_rss_mb_max", v, "MB"));
    }
    if let Some(v) = server_cpu {
        rows.push(("server_cpu_pct_max", v, "%"));
    }
    println!(
        "sim report: {case}, {} Hz ticks, {} input/s per bot, ran {:.0} s after ramp",
        args.tick_hz, args.input_hz, args.duration
    );
    println!("{:<34} {:>14}  unit", "metric", "value");
    for (m, v, u) in &rows {
        println!("{m:<34} {v:>14.3}  {u}");
    }
    let json = serde_json::json!({
        "suite": "sim",
        "commit": std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()
            .filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_else(|| "unknown".into()),
        "machine": {"cpus": std::thread::available_parallelism().map_or(1, |n| n.get()), "pinned": args.cpu.is_some()},
        "results": rows.iter().map(|(m, v, u)| serde_json::json!({"case": case, "system": "tessera", "metric": m, "value": v, "unit": u})).collect::<Vec<_>>(),
        "ratios": [],
        "notes": [format!("addr {}, {} sockets, pattern {:?}, input {} Hz, attack chance {}, verify 1 in {}", args.addr, args.sockets.unwrap_or(args.clients.div_ceil(200)), args.pattern, args.input_hz, args.attack_chance, args.verify_every)],
        "samples": samples,
    });
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/sim.json"));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("wrote {}", out.display());
    if let Some(path) = &args.samples {
        let mut csv = String::from("t_s,playing,server_cpu_pct,server_rss_mb,server_tick_p99_ms,snapshots_delivered_pct,input_to_visible_ms_p99,rtt_ms_p99,bytes_per_client_s\n");
        for s in samples {
            let o = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.2}"));
            csv.push_str(&format!(
                "{:.1},{},{},{},{},{:.2},{:.2},{:.2},{:.0}\n",
                s.t_s,
                s.playing,
                o(s.server_cpu_pct),
                o(s.server_rss_mb),
                o(s.server_tick_p99_ms),
                s.snapshots_delivered_pct,
                s.input_to_visible_ms_p99,
                s.rtt_ms_p99,
                s.bytes_per_client_s
            ));
        }
        std::fs::write(path, csv).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if totals.joined == 0 {
        return Err(format!(
            "no bot could join {}: is the server running?",
            args.addr
        ));
    }
    Ok(())
}
