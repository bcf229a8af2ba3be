//! Where a shard sends cell messages and client frames: the owner of the
//! cell (from the registry, cached and refreshed when its version changes)
//! or the gateway shard of the client (encoded in the client id).

use std::sync::Arc;

use tessera_cells::{CellId, CellMessage, ClientId, ClientOutput};
use tessera_coord::{Assignment, Registry};

use crate::ids::{ShardId, StageAddr, StageId};
use crate::mailbox::SendError;
use crate::shard::ShardContext;

use super::msg::{CellMsg, ControlMsg, NodeMsg};
use super::shared::NodeShared;

/// Bits of a client id left for the serial: the top bits name the gateway shard.
pub const CLIENT_SERIAL_BITS: u32 = 48;

/// The shard hosting a client's session.
pub fn gateway_of(client: ClientId) -> ShardId {
    ShardId((client.0 >> CLIENT_SERIAL_BITS) as u16)
}

/// A client id for the `serial`-th session of `shard`.
pub fn client_id(shard: ShardId, serial: u64) -> ClientId {
    ClientId(
        (u64::from(shard.0) << CLIENT_SERIAL_BITS) | (serial & ((1 << CLIENT_SERIAL_BITS) - 1)),
    )
}

/// What the router counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterCounters {
    /// Cell messages sent to a shard's mailbox.
    pub cell_sent: u64,
    /// Cell messages for a cell the registry does not know (dropped).
    pub cell_unknown: u64,
    /// Cell messages refused by a full mailbox (dropped, logged).
    pub cell_full: u64,
    /// Client frames sent to a gateway shard.
    pub client_sent: u64,
    /// Client frames refused by a full mailbox (dropped: snapshots are unreliable).
    pub client_full: u64,
}

/// A shard's view of where things are.
pub struct Router {
    shared: Arc<NodeShared>,
    registry: Arc<Registry>,
    counters: RouterCounters,
}

impl Router {
    /// A router reading `shared`'s registry.
    pub fn new(shared: Arc<NodeShared>) -> Self {
        let registry = shared.registry();
        Self {
            shared,
            registry,
            counters: RouterCounters::default(),
        }
    }

    /// Picks up a newer registry; true if it changed.
    pub fn refresh(&mut self) -> bool {
        if self.shared.registry_version() != self.registry.version() {
            self.registry = self.shared.registry();
            return true;
        }
        false
    }

    /// The registry in use.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The counters.
    pub fn counters(&self) -> RouterCounters {
        self.counters
    }

    /// Where a message for a cell that is no longer a leaf goes: the leaf
    /// it was merged into; or, for a split cell, the child it concerns (by
    /// position for joins and transfers; entity-addressed messages try the
    /// children in turn, one more hop each time, until one knows the entity).
    fn resolve(&self, env: &mut CellMsg) -> Vec<Assignment> {
        let mut up = env.to.parent();
        while let Some(p) = up {
            if let Some(a) = self.registry.get(p) {
                return vec![a];
            }
            up = p.parent();
        }
        let leaves: Vec<(CellId, Assignment)> = self
            .registry
            .iter()
            .filter(|(c, _)| env.to.contains_cell(*c) && *c != env.to)
            .collect();
        if leaves.is_empty() {
            return Vec::new();
        }
        let layout = self.registry.layout();
        let by_pos = |p: tessera_cells::Vec2| layout.leaf_at(p).and_then(|c| self.registry.get(c));
        match &mut env.msg {
            CellMessage::Join { pos, .. } => by_pos(*pos).into_iter().collect(),
            CellMessage::Transfer(t) => by_pos(t.entity.pos).into_iter().collect(),
            CellMessage::Ghost(_) => {
                let mut owners: Vec<Assignment> = Vec::new();
                for (_, a) in &leaves {
                    if !owners.iter().any(|o| o.owner == a.owner) {
                        owners.push(*a);
                    }
                }
                owners
            }
            CellMessage::Input { hops, .. }
            | CellMessage::Ack { hops, .. }
            | CellMessage::Leave { hops, .. }
            | CellMessage::Intent { hops, .. } => {
                if *hops > 8 {
                    return Vec::new();
                }
                let pick = leaves[usize::from(*hops) % leaves.len()].1;
                *hops += 1;
                vec![pick]
            }
        }
    }

    /// Sends a message to the shard owning its cell.
    pub fn send_cell(&mut self, cx: &mut ShardContext<NodeMsg>, mut env: CellMsg) {
        let a = match self.registry.get(env.to) {
            Some(a) => a,
            None => {
                let targets = self.resolve(&mut env);
                if targets.is_empty() {
                    self.counters.cell_unknown += 1;
                    tracing::warn!(shard = %cx.shard(), cell = %env.to, kind = env.msg.kind(), "message for a cell no shard owns dropped");
                    return;
                }
                // Several owners only for ghost updates to a split cell.
                for extra in &targets[1..] {
                    let copy = CellMsg {
                        to: env.to,
                        from: env.from,
                        msg: env.msg.clone(),
                    };
                    self.send_to(cx, *extra, copy);
                }
                targets[0]
            }
        };
        self.send_to(cx, a, env);
    }

    fn send_to(&mut self, cx: &mut ShardContext<NodeMsg>, a: Assignment, env: CellMsg) {
        let to = StageAddr::new(ShardId(a.owner.shard), StageId(a.stage));
        match cx.send(to, NodeMsg::Cell(env)) {
            Ok(()) => self.counters.cell_sent += 1,
            Err(e) => {
                self.counters.cell_full += 1;
                let full = matches!(e, SendError::Full(_));
                if let NodeMsg::Cell(env) = e.into_inner() {
                    tracing::error!(shard = %cx.shard(), to = %to, cell = %env.to, kind = env.msg.kind(), full,
                        epoch = a.epoch, "cell message refused by the destination mailbox: dropped");
                }
            }
        }
    }

    /// Sends a control message (handover step, split, merge) to a shard.
    pub fn send_control(&mut self, cx: &mut ShardContext<NodeMsg>, shard: u16, msg: ControlMsg) {
        let to = StageAddr::new(ShardId(shard), StageId(0));
        if let Err(e) = cx.send(to, NodeMsg::Control(msg)) {
            tracing::error!(shard = %cx.shard(), to = %to, "control message refused by the destination mailbox");
            drop(e);
        }
    }

    /// Sends a frame to the shard hosting the client's session.
    pub fn send_client(&mut self, cx: &mut ShardContext<NodeMsg>, out: ClientOutput) {
        let to = StageAddr::new(gateway_of(out.client), StageId(0));
        match cx.send(to, NodeMsg::ToClient(out)) {
            Ok(()) => self.counters.client_sent += 1,
            Err(_) => self.counters.client_full += 1,
        }
    }
}
