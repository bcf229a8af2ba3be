//! `tessera client`: a test client over RUDP (ping, join, move, repl,
//! script), in the spirit of the seeds' test client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_cells::view::ClientMirror;
use tessera_cells::EntityId;
use tessera_net::driver::{BatchSocket, SocketConfig};
use tessera_net::{ChannelId, ConnectionHandle, Endpoint, Event, TransmitBatch};
use tessera_schema::client::{self, ActionCmd, ClientMessage, InputCmd};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::protocol::Channel;
use tessera_schema::quant::dequantize;
use tessera_schema::server::{self, ServerMessage, Welcome};

/// Options of `tessera client`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The node's game address.
    #[arg(
        long,
        default_value = "127.0.0.1:7777",
        env = "TESSERA_ADDR",
        global = true
    )]
    pub addr: SocketAddr,
    /// Player name for join.
    #[arg(long, default_value = "player", global = true)]
    pub name: String,
    /// A connect token (hex, from the game's login service or `tessera
    /// token mint`) for a node that requires one.
    #[arg(long, env = "TESSERA_TOKEN", global = true)]
    pub token: Option<String>,
    /// Mint our own token with this key file (operators and tests; the
    /// node's `--key`), as player `--client-id` (default: random).
    #[arg(
        long,
        env = "TESSERA_TOKEN_KEY",
        global = true,
        conflicts_with = "token"
    )]
    pub token_key: Option<std::path::PathBuf>,
    /// The player id of a self-minted token.
    #[arg(long, global = true, requires = "token_key")]
    pub client_id: Option<u64>,
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// Client commands.
#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Round trips to the server.
    Ping {
        /// How many pings.
        #[arg(long, default_value_t = 5)]
        count: u32,
    },
    /// Join the world and watch for a while.
    Join {
        /// Seconds to watch.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Join and walk in a direction.
    Move {
        /// East component of the direction.
        #[arg(long, allow_hyphen_values = true)]
        dx: f32,
        /// North component of the direction.
        #[arg(long, allow_hyphen_values = true)]
        dy: f32,
        /// Seconds to walk.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Interactive session (history, `help`).
    Repl,
    /// Run the commands of a file (same language as the repl, plus `sleep MS`).
    Script {
        /// The script.
        file: PathBuf,
    },
}

/// One connection to a node, with the client side of the snapshot stream.
pub struct GameClient {
    endpoint: Endpoint,
    socket: BatchSocket,
    batch: TransmitBatch,
    connection: ConnectionHandle,
    fbb: FlatBufferBuilder<'static>,
    /// The views rebuilt from snapshots.
    pub mirror: ClientMirror,
    /// The join answer.
    pub welcome: Option<Welcome>,
    input_seq: u32,
    /// Snapshots applied.
    pub snapshots: u64,
    /// Snapshots that could not be applied.
    pub snapshot_errors: u64,
    /// Newest input the server applied.
    pub last_input_seq: u32,
    /// Disconnect reason, once disconnected.
    pub disconnected: Option<String>,
}

impl GameClient {
    /// Connects (handshake included) within `timeout`.
    /// With `token`, the session is sealed (the node requires one when it
    /// runs with `--key`).
    pub fn connect(
        server: SocketAddr,
        timeout: Duration,
        token: Option<&tessera_net::token::ConnectToken>,
    ) -> Result<Self, String> {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("literal");
        let socket = BatchSocket::bind(
            local,
            &SocketConfig {
                reuse_port: false,
                ..SocketConfig::default()
            },
        )
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        let seed = tessera_net::driver::os_seed().unwrap_or(7);
        let mut endpoint =
            Endpoint::new(tessera_net::Config::game_client(1), seed).map_err(|e| e.to_string())?;
        let connection = match token {
            Some(t) => endpoint.connect_with_token(Instant::now(), server, t),
            None => endpoint.connect(Instant::now(), server),
        }
        .map_err(|e| e.to_string())?;
        let batch = TransmitBatch::new(socket.batch_size());
        let mut c = Self {
            endpoint,
            socket,
            batch,
            connection,
            fbb: FlatBufferBuilder::with_capacity(256),
            mirror: ClientMirror::new(64),
            welcome: None,
            input_seq: 0,
            snapshots: 0,
            snapshot_errors: 0,
            last_input_seq: 0,
            disconnected: None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let (connected, _) = c.pump(Duration::from_millis(20));
            if connected {
                return Ok(c);
            }
            if let Some(reason) = &c.disconnected {
                return Err(format!("connection to {server} refused: {reason}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no answer from {server} within {:.0?}: is the server running?",
                    timeout
                ));
            }
        }
    }

    /// Runs the network for up to `wait`: reads, timers, events (snapshots
    /// are applied and acknowledged), sends. Returns (connected event seen,
    /// server messages).
    pub fn pump(&mut self, wait: Duration) -> (bool, Vec<ServerMessage>) {
        let now = Instant::now();
        let until = self
            .endpoint
            .poll_timeout()
            .map_or(wait, |t| t.saturating_duration_since(now).min(wait));
        self.socket.wait_readable(until);
        let now = Instant::now();
        let _ = self
            .socket
            .receive_into(&mut self.endpoint, now, usize::MAX);
        let mut connected = false;
        let mut out = Vec::new();
        while let Some(ev) = self.endpoint.poll_event() {
            match ev {
                Event::Connected { .. } => connected = true,
                Event::Message { bytes, .. } => {
                    match server::decode(&bytes) {
                        Ok(msg) => {
                            if let ServerMessage::Snapshot(s) = &msg {
                                match self.mirror.apply(s) {
                                    Ok(_) => {
                                        self.snapshots += 1;
                                        self.last_input_seq = s.last_input_seq;
                                        let ack = ClientMessage::Ack {
                                            snapshot_tick: s.tick,
                                        };
                                        self.send(&ack);
                                    }
                                    Err(_) => self.snapshot_errors += 1,
                                }
                            }
                            if let ServerMessage::Welcome(w) = &msg {
                                self.welcome = Some(*w);
                            }
                            out.push(msg);
                        }
                        Err(e) => eprintln!("undecodable frame from the server: {e}"),
                    }
                    self.endpoint.recycle(bytes);
                }
                Event::Disconnected { reason, .. } => {
                    self.disconnected = Some(match reason {
                        tessera_net::DisconnectReason::Remote(code) => format!(
                            "Remote({code}): {}",
                            tessera_schema::protocol::disconnect::describe(code)
                        ),
                        other => format!("{other:?}"),
                    })
                }
                Event::Acked { .. } => {}
            }
        }
        self.flush(now);
        (connected, out)
    }

    fn flush(&mut self, now: Instant) {
        let _ = self
            .socket
            .transmit_from(&mut self.endpoint, &mut self.batch, now);
    }

    /// Sends a message on the channel its kind needs.
    pub fn send(&mut self, msg: &ClientMessage) {
        let channel = match msg {
            ClientMessage::Ack { .. } => ChannelId(Channel::Snapshots.id()),
            ClientMessage::Ping { .. } => ChannelId(Channel::Unreliable.id()),
            _ => ChannelId(Channel::Reliable.id()),
        };
        let bytes = client::encode(&mut self.fbb, msg);
        let _ = self.endpoint.send(self.connection, channel, bytes);
    }

    /// Joins and waits for the welcome.
    pub fn join(&mut self, name: &str, timeout: Duration) -> Result<Welcome, String> {
        self.send(&ClientMessage::Join {
            name: name.to_string(),
            token: Vec::new(),
        });
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let (_, msgs) = self.pump(Duration::from_millis(20));
            for m in msgs {
                match m {
                    ServerMessage::Welcome(w) => return Ok(w),
                    ServerMessage::Error { code, message } => {
                        return Err(format!("join refused: {code:?}: {message}"))
                    }
                    _ => {}
                }
            }
            if let Some(r) = &self.disconnected {
                return Err(format!("disconnected: {r}"));
            }
        }
        Err("no welcome from the server".into())
    }

    /// Sends one input.
    pub fn input(&mut self, movement: [f32; 2], actions: Vec<ActionCmd>) {
        self.input_seq += 1;
        let heading = if movement != [0.0, 0.0] {
            movement[1].atan2(movement[0])
        } else {
            0.0
        };
        let cmd = ClientMessage::Input(InputCmd {
            input_seq: self.input_seq,
            client_tick: 0,
            movement,
            heading,
            actions,
        });
        self.send(&cmd);
    }

    /// One round trip, in milliseconds.
    pub fn ping(&mut self, timeout: Duration) -> Option<f64> {
        let start = Instant::now();
        let t = start.elapsed().as_micros() as u64 + 1;
        self.send(&ClientMessage::Ping { client_time_us: t });
        while start.elapsed() < timeout {
            let (_, msgs) = self.pump(Duration::from_millis(5));
            if msgs.iter().any(
                |m| matches!(m, ServerMessage::Pong { client_time_us, .. } if *client_time_us == t),
            ) {
                return Some(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
        None
    }

    /// Leaves and closes.
    pub fn leave(&mut self) {
        self.send(&ClientMessage::Leave { reason: 0 });
        for _ in 0..10 {
            self.pump(Duration::from_millis(10));
        }
    }

    /// The avatar's position in the latest view.
    pub fn position(&self) -> Option<(f32, f32)> {
        let me = EntityId(self.welcome?.entity);
        let view = self.mirror.latest()?;
        let (_, q) = view.entries.iter().find(|(id, _)| *id == me)?;
        Some((dequantize(q.pos[0]), dequantize(q.pos[1])))
    }
}

/// A client driven by text commands (repl and scripts).
pub struct Driver {
    client: GameClient,
    name: String,
    moving: [f32; 2],
    last_input: Instant,
}

const HELP: &str = "commands: join [NAME] | move DX DY | stop | attack ID | ping | where | view | sleep MS | leave | help | quit";

impl Driver {
    /// Connects.
    pub fn new(
        addr: SocketAddr,
        name: &str,
        token: Option<&tessera_net::token::ConnectToken>,
    ) -> Result<Self, String> {
        Ok(Self {
            client: GameClient::connect(addr, Duration::from_secs(5), token)?,
            name: name.to_string(),
            moving: [0.0, 0.0],
            last_input: Instant::now(),
        })
    }

    /// Keeps the connection and the movement going for `d`.
    pub fn pump_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            let now = Instant::now();
            if self.client.welcome.is_some()
                && now.duration_since(self.last_input) >= Duration::from_millis(50)
            {
                self.last_input = now;
                self.client.input(self.moving, Vec::new());
            }
            if now >= until {
                break;
            }
            self.client
                .pump((until - now).min(Duration::from_millis(10)));
        }
    }

    /// Runs one command; returns what to print, or None to quit.
    pub fn execute(&mut self, line: &str) -> Option<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            [] => String::new(),
            ["help"] | ["?"] => HELP.to_string(),
            ["quit"] | ["exit"] => return None,
            ["join"] | ["join", _] => {
                let name = words.get(1).map_or(self.name.clone(), |n| n.to_string());
                match self.client.join(&name, Duration::from_secs(5)) {
                    Ok(w) => format!(
                        "joined as entity {} at ({:.1}, {:.1}), tick {}, {} Hz",
                        w.entity,
                        dequantize(w.position.x()),
                        dequantize(w.position.y()),
                        w.tick,
                        w.tick_hz
                    ),
                    Err(e) => format!("error: {e}"),
                }
            }
            ["move", dx, dy] => match (dx.parse::<f32>(), dy.parse::<f32>()) {
                (Ok(x), Ok(y)) if x.is_finite() && y.is_finite() => {
                    self.moving = [x, y];
                    format!("moving ({x}, {y})")
                }
                _ => "error: move takes two numbers, e.g. move 1 0".to_string(),
            },
            ["stop"] => {
                self.moving = [0.0, 0.0];
                "stopped".to_string()
            }
            ["attack", id] => match id.parse::<u64>() {
                Ok(target) => {
                    self.client
                        .input(self.moving, vec![ActionCmd::Attack { target }]);
                    format!("attacking {target}")
                }
                Err(_) => "error: attack takes an entity id".to_string(),
            },
            ["ping"] => match self.client.ping(Duration::from_secs(2)) {
                Some(ms) => format!("rtt {ms:.2} ms"),
                None => "error: no pong within 2 s".to_string(),
            },
            ["where"] => match self.client.position() {
                Some((x, y)) => format!(
                    "at ({x:.2}, {y:.2}); {} snapshots, last input applied {}",
                    self.client.snapshots, self.client.last_input_seq
                ),
                None => "not in the world yet: join first".to_string(),
            },
            ["view"] => match self.client.mirror.latest() {
                Some(v) => {
                    let mut s = format!("tick {}: {} entities", v.tick.0, v.entries.len());
                    for (id, q) in v.entries.iter().take(40) {
                        s.push_str(&format!(
                            "\n  {:>16} kind {} at ({:8.2}, {:8.2}) health {:3}{}",
                            id.0,
                            q.kind,
                            dequantize(q.pos[0]),
                            dequantize(q.pos[1]),
                            q.health,
                            if q.state & 1 == 1 { " dead" } else { "" }
                        ));
                    }
                    s
                }
                None => "no snapshot yet".to_string(),
            },
            ["sleep", ms] => match ms.parse::<u64>() {
                Ok(ms) => {
                    self.pump_for(Duration::from_millis(ms));
                    String::new()
                }
                Err(_) => "error: sleep takes milliseconds".to_string(),
            },
            ["leave"] => {
                self.client.leave();
                "left".to_string()
            }
            _ => format!("error: unknown command {line:?}; {HELP}"),
        };
        // Let the answer and the world catch up a little.
        self.pump_for(Duration::from_millis(30));
        if let Some(r) = &self.client.disconnected {
            return Some(format!("{reply}\ndisconnected: {r}"));
        }
        Some(reply)
    }
}

fn repl(
    addr: SocketAddr,
    name: &str,
    token: Option<&tessera_net::token::ConnectToken>,
) -> Result<(), String> {
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let (reply_tx, reply_rx) = crossbeam_channel::unbounded::<Option<String>>();
    let mut driver = Driver::new(addr, name, token)?;
    // The network keeps running (keepalives, movement) while the user types.
    let worker = std::thread::spawn(move || loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(line) => {
                let r = driver.execute(&line);
                let quit = r.is_none();
                let _ = reply_tx.send(r);
                if quit {
                    return;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                driver.pump_for(Duration::from_millis(10))
            }
            Err(_) => return,
        }
    });
    println!("connected to {addr}; {HELP}");
    let mut editor = rustyline::DefaultEditor::new().map_err(|e| e.to_string())?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".tessera_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    loop {
        match editor.readline("tessera> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if tx.send(line).is_err() {
                    break;
                }
                match reply_rx.recv() {
                    Ok(Some(text)) if !text.is_empty() => println!("{text}"),
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            Err(_) => {
                let _ = tx.send("quit".to_string());
                break;
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    drop(tx);
    let _ = worker.join();
    Ok(())
}

/// The token `args` give or ask to mint, if any.
fn token_of(args: &ClientArgs) -> Result<Option<tessera_net::token::ConnectToken>, String> {
    if let Some(hex) = &args.token {
        return tessera_net::token::ConnectToken::from_hex(hex)
            .map(Some)
            .map_err(|e| format!("--token: {e}"));
    }
    // Without a token, a loopback development server's key, if one made it.
    let key = match &args.token_key {
        Some(path) => crate::token::read_keys(path)?.remove(0),
        None => match crate::token::dev_key_for(args.addr) {
            Some(key) => key,
            None => return Ok(None),
        },
    };
    let id = match args.client_id {
        Some(id) => id,
        None => tessera_net::driver::os_seed().map_err(|e| e.to_string())? | 1,
    };
    crate::token::mint(&key, id, &[args.addr], 3600, args.name.as_bytes()).map(Some)
}

/// Runs a client command.
pub fn run(args: ClientArgs) -> Result<(), String> {
    let token = token_of(&args)?;
    let token = token.as_ref();
    match args.command {
        ClientCommand::Ping { count } => {
            let mut c = GameClient::connect(args.addr, Duration::from_secs(5), token)?;
            let mut got = Vec::new();
            for i in 0..count {
                match c.ping(Duration::from_secs(2)) {
                    Some(ms) => {
                        println!("pong from {}: seq {i} rtt {ms:.3} ms", args.addr);
                        got.push(ms);
                    }
                    None => println!("no pong for seq {i}"),
                }
                c.pump(Duration::from_millis(100));
            }
            if got.is_empty() {
                return Err(format!("no pong from {}", args.addr));
            }
            got.sort_by(|a, b| a.total_cmp(b));
            println!(
                "{} of {count} pongs, median rtt {:.3} ms",
                got.len(),
                got[got.len() / 2]
            );
            Ok(())
        }
        ClientCommand::Join { seconds } => {
            let mut d = Driver::new(args.addr, &args.name, token)?;
            println!("{}", d.execute("join").unwrap_or_default());
            if d.client.welcome.is_none() {
                return Err("join failed".into());
            }
            d.pump_for(Duration::from_secs_f64(seconds));
            println!("{}", d.execute("where").unwrap_or_default());
            let seen = d.client.mirror.latest().map_or(0, |v| v.entries.len());
            println!(
                "{} snapshots in {seconds} s, {seen} entities in view",
                d.client.snapshots
            );
            d.client.leave();
            Ok(())
        }
        ClientCommand::Move { dx, dy, seconds } => {
            let mut d = Driver::new(args.addr, &args.name, token)?;
            println!("{}", d.execute("join").unwrap_or_default());
            if d.client.welcome.is_none() {
                return Err("join failed".into());
            }
            println!(
                "{}",
                d.execute(&format!("move {dx} {dy}")).unwrap_or_default()
            );
            let until = Instant::now() + Duration::from_secs_f64(seconds);
            while Instant::now() < until {
                d.pump_for(Duration::from_millis(500));
                println!("{}", d.execute("where").unwrap_or_default());
            }
            d.client.leave();
            Ok(())
        }
        ClientCommand::Repl => repl(args.addr, &args.name, token),
        ClientCommand::Script { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read script {}: {e}", file.display()))?;
            let mut d = Driver::new(args.addr, &args.name, token)?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                println!("> {line}");
                match d.execute(line) {
                    Some(out) => {
                        if !out.is_empty() {
                            println!("{out}");
                        }
                        if out.starts_with("error:") {
                            return Err(format!("{}:{}: {out}", file.display(), n + 1));
                        }
                    }
                    None => break,
                }
            }
            Ok(())
        }
    }
}
