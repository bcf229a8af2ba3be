//! Two endpoints joined by two link conditioners, in virtual time.
//!
//! Each [`Pair::step`] delivers the datagrams that are due, runs due timers,
//! collects every datagram the endpoints want to send, drains their events,
//! and then jumps virtual time to the next deadline of either endpoint or
//! link. Nothing here reads a clock: a run is fixed by its seeds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::conditioner::{ConditionerConfig, LinkConditioner};
use crate::config::Config;
use crate::endpoint::{Endpoint, TransmitBatch};
use crate::types::{ConnectionHandle, Event};

/// Turns at one instant after which the harness reports a livelock.
const TURNS_PER_INSTANT_MAX: u32 = 100_000;

/// A server endpoint and a client endpoint on a simulated link.
#[derive(Debug)]
pub struct Pair {
    /// The server (accepts incoming connections).
    pub server: Endpoint,
    /// The client (may hold many connections to the server).
    pub client: Endpoint,
    /// The server's address.
    pub server_addr: SocketAddr,
    /// The client's address.
    pub client_addr: SocketAddr,
    /// Client -> server direction.
    pub to_server: LinkConditioner,
    /// Server -> client direction.
    pub to_client: LinkConditioner,
    /// Virtual now.
    pub now: Instant,
    /// When the pair was built.
    pub start: Instant,
    /// Events the server emitted, in order; tests take them.
    pub server_events: Vec<Event>,
    /// Events the client emitted, in order; tests take them.
    pub client_events: Vec<Event>,
    batch: TransmitBatch,
    turns_at_now: u32,
    /// Set by [`Pair::seal_sessions`]: the token key, the generator of
    /// session keys and nonces, the next player id.
    tokens: Option<(crate::token::TokenKey, crate::rng::Rng, u64)>,
    token_seed: u64,
}

/// The Unix time (ms) a pair's virtual clock starts at: tokens minted by
/// [`Pair::seal_sessions`] expire an hour after it.
pub const PAIR_UNIX_MS: u64 = 1_800_000_000_000;

impl Pair {
    /// A pair with the same link properties both ways. `seed` fixes both
    /// endpoints and both links.
    pub fn new(server: Config, client: Config, link: ConditionerConfig, seed: u64) -> Self {
        Self::with_links(server, client, link.clone(), link, seed)
    }

    /// A pair with different link properties per direction.
    pub fn with_links(
        server: Config,
        client: Config,
        to_server: ConditionerConfig,
        to_client: ConditionerConfig,
        seed: u64,
    ) -> Self {
        let mut seeds = crate::rng::Rng::from_seed(seed);
        let start = Instant::now();
        Self {
            server: Endpoint::new(server, seeds.next_u64()).expect("valid server config"),
            client: Endpoint::new(client, seeds.next_u64()).expect("valid client config"),
            server_addr: SocketAddr::from(([10, 0, 0, 1], 7777)),
            client_addr: SocketAddr::from(([10, 0, 0, 2], 50_000)),
            to_server: LinkConditioner::new(to_server, seeds.next_u64()),
            to_client: LinkConditioner::new(to_client, seeds.next_u64()),
            now: start,
            start,
            server_events: Vec::new(),
            client_events: Vec::new(),
            batch: TransmitBatch::new(64),
            turns_at_now: 0,
            tokens: None,
            token_seed: seeds.next_u64(),
        }
    }

    /// From now on the server requires connect tokens and [`Pair::connect`]
    /// presents a fresh one (player ids 1, 2, ...): every session is sealed.
    pub fn seal_sessions(&mut self) {
        let key = crate::token::TokenKey([0x5E; crate::token::KEY_LEN]);
        self.server
            .require_tokens(crate::TokenPolicy {
                keys: vec![key.clone()],
                addresses: vec![self.server_addr],
                clock: (self.start, PAIR_UNIX_MS),
            })
            .expect("room for the tag");
        self.tokens = Some((key, crate::rng::Rng::from_seed(self.token_seed), 1));
    }

    /// A token for the next player, as a login service would mint it.
    pub fn mint_token(&mut self) -> crate::token::ConnectToken {
        let (key, rng, next) = self.tokens.as_mut().expect("seal_sessions first");
        let mut bytes = |n: usize| (0..n).map(|_| rng.next_u32() as u8).collect::<Vec<u8>>();
        let keys = crate::token::SessionKeys {
            client_to_server: bytes(32).try_into().expect("32"),
            server_to_client: bytes(32).try_into().expect("32"),
        };
        let nonce: [u8; 24] = bytes(24).try_into().expect("24");
        let client_id = *next;
        *next += 1;
        crate::token::ConnectToken::mint(
            key,
            &crate::token::TokenRequest {
                client_id,
                expires_unix_s: PAIR_UNIX_MS / 1000 + 3600,
                servers: &[self.server_addr],
                user_data: &client_id.to_le_bytes(),
            },
            keys,
            nonce,
        )
        .expect("a valid request")
    }

    /// Virtual time since the pair was built.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Starts a client connection to the server.
    pub fn connect(&mut self) -> ConnectionHandle {
        if self.tokens.is_some() {
            let token = self.mint_token();
            return self
                .client
                .connect_with_token(self.now, self.server_addr, &token)
                .expect("client below its connection cap");
        }
        self.client
            .connect(self.now, self.server_addr)
            .expect("client below its connection cap")
    }

    /// One turn at the current instant (no time passes).
    pub fn turn(&mut self) {
        let now = self.now;
        while let Some(d) = self.to_server.poll(now) {
            self.server.handle_datagram(now, d.from, &d.bytes);
        }
        while let Some(d) = self.to_client.poll(now) {
            self.client.handle_datagram(now, d.from, &d.bytes);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        loop {
            self.batch.clear();
            let n = self.server.poll_transmit(now, &mut self.batch);
            for t in self.batch.iter() {
                self.to_client
                    .send(now, self.server_addr, t.destination, t.payload);
            }
            if n < self.batch.capacity() {
                break;
            }
        }
        loop {
            self.batch.clear();
            let n = self.client.poll_transmit(now, &mut self.batch);
            for t in self.batch.iter() {
                self.to_server
                    .send(now, self.client_addr, t.destination, t.payload);
            }
            if n < self.batch.capacity() {
                break;
            }
        }
        while let Some(event) = self.server.poll_event() {
            self.server_events.push(event);
        }
        while let Some(event) = self.client.poll_event() {
            self.client_events.push(event);
        }
    }

    /// The next instant anything is scheduled.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        [
            self.server.poll_timeout(),
            self.client.poll_timeout(),
            self.to_server.next_deadline(),
            self.to_client.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A turn, then time jumps to the next deadline (never beyond `limit`).
    /// False when nothing at all is scheduled.
    pub fn step_until(&mut self, limit: Instant) -> bool {
        self.turn();
        match self.next_deadline() {
            Some(next) if next > self.now => {
                self.now = next.min(limit);
                self.turns_at_now = 0;
                true
            }
            Some(_) => {
                self.turns_at_now += 1;
                assert!(
                    self.turns_at_now < TURNS_PER_INSTANT_MAX,
                    "livelock: no progress at {:?}",
                    self.elapsed()
                );
                true
            }
            None => false,
        }
    }

    /// A turn and a jump to the next deadline.
    pub fn step(&mut self) -> bool {
        self.step_until(self.now + Duration::from_secs(3600))
    }

    /// Runs for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            if !self.step_until(end) {
                self.now = end;
            }
        }
        self.turn();
    }

    /// Runs until `done` holds (checked after every step) or `limit` of
    /// virtual time passed. Returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Pair) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if self.now >= end {
                return false;
            }
            if !self.step_until(end) {
                // Nothing scheduled: the last turn may have finished the job.
                if done(self) {
                    return true;
                }
                self.now = end;
            }
        }
    }

    /// Connects one client connection and runs until both sides report it
    /// (one handshake at a time). Returns the (client, server) handles.
    pub fn connect_and_wait(&mut self) -> (ConnectionHandle, ConnectionHandle) {
        self.try_connect().expect("handshake did not finish")
    }

    /// Like [`Pair::connect_and_wait`], but `None` when the handshake fails
    /// (it can, on a link that loses long bursts).
    pub fn try_connect(&mut self) -> Option<(ConnectionHandle, ConnectionHandle)> {
        let before = self.server_connected().count();
        let client = self.connect();
        let mut failed = false;
        let done = self.run_until(Duration::from_secs(30), |p| {
            let mut client_done = false;
            for e in &p.client_events {
                match e {
                    Event::Connected { connection, .. } if *connection == client => {
                        client_done = true
                    }
                    Event::Disconnected { connection, .. } if *connection == client => {
                        failed = true
                    }
                    _ => {}
                }
            }
            failed || (client_done && p.server_connected().count() > before)
        });
        if !done || failed {
            return None;
        }
        let server = self.server_connected().nth(before)?;
        Some((client, server))
    }

    fn server_connected(&self) -> impl Iterator<Item = ConnectionHandle> + '_ {
        self.server_events.iter().filter_map(|e| match e {
            Event::Connected { connection, .. } => Some(*connection),
            _ => None,
        })
    }
}
