//! What shards of a node say to each other, and the stages that handle it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use tessera_cells::demo::{DemoComponents, DemoGame, DemoIntent};
use tessera_cells::handover::{HandoverAgent, HandoverMsg};
use tessera_cells::{CellEnvelope, CellId, ClientOutput, ShardWorld};

use crate::mailbox::Envelope;
use crate::stage::{Handled, Stage, StageContext};

use super::gateway::Gateway;
use super::router::Router;

/// A cell message of the demo game.
pub type CellMsg = CellEnvelope<DemoComponents, DemoIntent>;

/// Orders and handover steps, for a shard's stage 0.
pub enum ControlMsg {
    /// A handover step (from the coordinator or another shard).
    Handover(HandoverMsg<DemoGame>),
    /// Split a cell (from the coordinator).
    Split {
        /// The operation.
        op: u64,
        /// The cell.
        cell: CellId,
    },
    /// Merge the children of a cell (from the coordinator).
    Merge {
        /// The operation.
        op: u64,
        /// The parent.
        parent: CellId,
    },
}

impl std::fmt::Debug for ControlMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlMsg::Handover(m) => write!(f, "Handover({} {})", m.kind(), m.cell()),
            ControlMsg::Split { op, cell } => write!(f, "Split({op}, {cell})"),
            ControlMsg::Merge { op, parent } => write!(f, "Merge({op}, {parent})"),
        }
    }
}

/// A message between shards of a node.
#[derive(Debug)]
pub enum NodeMsg {
    /// For a cell (inputs, ghosts, transfers, intents...).
    Cell(CellMsg),
    /// A frame for a client whose session this shard hosts.
    ToClient(ClientOutput),
    /// For the shard itself (stage 0): handovers, splits, merges.
    Control(ControlMsg),
}

/// What a shard's stages share with its handler.
pub struct ShardParts {
    /// The cells.
    pub world: Rc<RefCell<ShardWorld<DemoGame>>>,
    /// The sessions.
    pub gateway: Rc<RefCell<Gateway>>,
    /// Where things go.
    pub router: Rc<RefCell<Router>>,
    /// This shard's side of handovers (it holds prepared shadows).
    pub agent: Rc<RefCell<HandoverAgent<DemoGame>>>,
    /// Control messages waiting for the handler (it owns the stage table).
    pub control: Rc<RefCell<VecDeque<ControlMsg>>>,
}

impl Clone for ShardParts {
    fn clone(&self) -> Self {
        Self {
            world: self.world.clone(),
            gateway: self.gateway.clone(),
            router: self.router.clone(),
            agent: self.agent.clone(),
            control: self.control.clone(),
        }
    }
}

/// The stages of a node's shard: stage 0 is the gateway (sessions and
/// control), the others are cells.
pub enum NodeStage {
    /// Sessions and control.
    Gateway(ShardParts),
    /// One cell of the shard's world.
    Cell {
        /// The cell.
        cell: CellId,
        /// The shard's parts.
        parts: ShardParts,
    },
}

impl NodeStage {
    fn parts(&self) -> &ShardParts {
        match self {
            NodeStage::Gateway(p) | NodeStage::Cell { parts: p, .. } => p,
        }
    }
}

/// Hands a cell message to the world, or to a prepared shadow (the
/// registry may route to this shard before its commit arrives), or routes it
/// on.
pub fn deliver_cell(
    parts: &ShardParts,
    cx: &mut crate::shard::ShardContext<NodeMsg>,
    env: CellMsg,
) {
    let Err(env) = parts.world.borrow_mut().deliver(env) else {
        return;
    };
    let CellEnvelope { to, from, msg } = env;
    let Err(msg) = parts.agent.borrow_mut().deliver_to_shadow(to, msg) else {
        return;
    };
    parts
        .router
        .borrow_mut()
        .send_cell(cx, CellEnvelope { to, from, msg });
}

impl Stage<NodeMsg> for NodeStage {
    fn handle(
        &mut self,
        cx: &mut StageContext<'_, NodeMsg>,
        envelope: Envelope<NodeMsg>,
    ) -> Handled {
        let parts = self.parts();
        match envelope.msg {
            NodeMsg::Cell(env) => deliver_cell(parts, cx.shard_context(), env),
            NodeMsg::ToClient(out) => match self {
                NodeStage::Gateway(p) => p.gateway.borrow_mut().to_client(out),
                NodeStage::Cell { parts, .. } => parts
                    .router
                    .borrow_mut()
                    .send_client(cx.shard_context(), out),
            },
            NodeMsg::Control(c) => parts.control.borrow_mut().push_back(c),
        }
        Handled::Done
    }
}
