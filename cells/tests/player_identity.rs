//! A connect token's player id is the player's identity: a player whose
//! session was lost takes its avatar back on its next session (on any
//! shard sharing the directory); a player who left, or came back after
//! the linger time, or another player, gets a fresh avatar; a parked
//! avatar that is gone turns the reclaim into a fresh join the client
//! never hears about.

use std::sync::Arc;

use tessera_cells::demo::{DemoConfig, DemoGame};
use tessera_cells::geometry::{Geometry, Layout};
use tessera_cells::node::{ConnectionKey, NodeCore, NodeOutput, PlayerDirectory};
use tessera_cells::{EntityId, Registry, ShardRef, ShardWorld, TickId, WorldConfig};
use tessera_schema::client::{self, ClientMessage};
use tessera_schema::flatbuffers::FlatBufferBuilder;
use tessera_schema::server::{self, ServerMessage};

const LINGER: u64 = 40;

struct Node {
    core: NodeCore<DemoGame>,
    tick: u64,
    fbb: FlatBufferBuilder<'static>,
    /// Connections that acknowledge their snapshots (the others are silent).
    acking: Vec<ConnectionKey>,
}

impl Node {
    fn new(directory_age: u64) -> Node {
        let me = ShardRef::local(0);
        let layout = Arc::new(Layout::new(Geometry::new(0, 128.0, 2, 2)));
        let owners = layout.leaves().into_iter().map(|c| (c, me)).collect();
        let registry = Arc::new(Registry::new(layout.clone(), &owners).unwrap());
        let config = WorldConfig {
            player_linger_ticks: LINGER,
            ..WorldConfig::default()
        };
        let world = ShardWorld::new(DemoGame::new(DemoConfig::default()), layout, config, 1);
        let mut core = NodeCore::new(me, world, registry);
        core.set_player_directory(Arc::new(PlayerDirectory::new(directory_age, 1024)));
        Node {
            core,
            tick: 0,
            fbb: FlatBufferBuilder::with_capacity(256),
            acking: Vec::new(),
        }
    }

    /// Connection `c` opens as `player` and joins: its avatar.
    fn join(&mut self, c: u64, player: u64) -> EntityId {
        let connection = ConnectionKey(c);
        self.core.handle_connected_as(connection, player);
        let join = ClientMessage::Join {
            name: format!("p{player}"),
            token: Vec::new(),
        };
        let bytes = client::encode(&mut self.fbb, &join).to_vec();
        self.core.handle_client_frame(connection, &bytes);
        self.acking.push(connection);
        // A reclaim of a gone avatar is refused once the cell stops
        // waiting for it (its orphan time).
        for _ in 0..200 {
            for (to, msg) in self.run(1) {
                if to == connection {
                    match msg {
                        ServerMessage::Welcome(w) => return EntityId(w.entity),
                        ServerMessage::Error { code, message } => {
                            panic!("the client saw an error: {code:?} {message}")
                        }
                        _ => {}
                    }
                }
            }
        }
        panic!("no welcome for connection {c}");
    }

    /// Runs `n` ticks; acking connections acknowledge their snapshots.
    /// Returns every client frame.
    fn run(&mut self, n: u64) -> Vec<(ConnectionKey, ServerMessage)> {
        let mut frames = Vec::new();
        for _ in 0..n {
            self.tick += 1;
            self.core.tick(TickId(self.tick));
            while let Some(out) = self.core.poll_output() {
                match out {
                    NodeOutput::Client {
                        connection, bytes, ..
                    } => {
                        let msg = server::decode(&bytes).unwrap();
                        if let ServerMessage::Snapshot(s) = &msg {
                            if self.acking.contains(&connection) {
                                let ack = ClientMessage::Ack {
                                    snapshot_tick: s.tick,
                                };
                                let b = client::encode(&mut self.fbb, &ack).to_vec();
                                self.core.handle_client_frame(connection, &b);
                            }
                        }
                        frames.push((connection, msg));
                    }
                    NodeOutput::Shard { msg, .. } => self.core.handle_message(msg),
                    _ => {}
                }
            }
        }
        frames
    }

    fn lose(&mut self, c: u64) {
        self.acking.retain(|k| k.0 != c);
        self.core.handle_connection_lost(ConnectionKey(c));
    }

    fn entities(&self) -> usize {
        self.core.world().cells().map(|c| c.entities().len()).sum()
    }
}

#[test]
fn a_lost_player_takes_its_avatar_back_and_no_one_else_does() {
    let mut node = Node::new(LINGER);
    let first = node.join(1, 42);
    node.run(5);
    let before = node.entities();
    node.lose(1);
    node.run(5);
    assert_eq!(node.entities(), before, "the avatar lingers, parked");
    let other = node.join(2, 43);
    assert_ne!(other, first, "another player never gets it");
    let again = node.join(3, 42);
    assert_eq!(again, first, "the player's next session takes it back");
    let c = node.core.sessions().counters();
    assert_eq!((c.avatars_parked, c.avatars_reclaimed), (1, 1), "{c:?}");
    assert_eq!(node.entities(), before + 1, "no second avatar");

    // A player who leaves is gone: the next session is a fresh avatar.
    node.acking.retain(|k| k.0 != 3);
    node.core.handle_disconnected(ConnectionKey(3));
    node.run(3);
    let fresh = node.join(4, 42);
    assert_ne!(fresh, first);

    // Back after the linger time: the avatar left, a fresh one.
    node.lose(2);
    node.run(LINGER + 10);
    let late = node.join(5, 43);
    assert_ne!(late, other);
    let c = node.core.sessions().counters();
    assert_eq!(c.avatars_reclaimed, 1, "{c:?}");
}

#[test]
fn a_parked_avatar_that_is_gone_becomes_a_fresh_join_silently() {
    // The directory keeps entries longer than the world keeps avatars.
    let mut node = Node::new(10 * LINGER);
    let first = node.join(1, 7);
    node.run(3);
    node.lose(1);
    node.run(LINGER + 10);
    let fresh = node.join(2, 7);
    assert_ne!(fresh, first);
    let c = node.core.sessions().counters();
    assert_eq!((c.avatars_reclaimed, c.reclaims_refused), (1, 1), "{c:?}");
}
