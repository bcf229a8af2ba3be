//! What shards of a node say to each other, and the stages that handle it.

use std::cell::RefCell;
use std::rc::Rc;

use tessera_cells::demo::{DemoComponents, DemoGame, DemoIntent};
use tessera_cells::{CellEnvelope, CellId, ClientOutput, ShardWorld};

use crate::mailbox::Envelope;
use crate::stage::{Handled, Stage, StageContext};

use super::gateway::Gateway;
use super::router::Router;

/// A cell message of the demo game.
pub type CellMsg = CellEnvelope<DemoComponents, DemoIntent>;

/// A message between shards of a node.
#[derive(Debug)]
pub enum NodeMsg {
    /// For a cell (inputs, ghosts, transfers, intents...).
    Cell(CellMsg),
    /// A frame for a client whose session this shard hosts.
    ToClient(ClientOutput),
}

/// The stages of a node's shard: stage 0 is the gateway (sessions), the
/// others are cells.
pub enum NodeStage {
    /// The sessions hosted here.
    Gateway {
        /// The sessions.
        gateway: Rc<RefCell<Gateway>>,
        /// To pass on what is not for the gateway.
        router: Rc<RefCell<Router>>,
    },
    /// One cell of the shard's world.
    Cell {
        /// The cell.
        cell: CellId,
        /// The world it lives in.
        world: Rc<RefCell<ShardWorld<DemoGame>>>,
        /// To pass on what is not ours.
        router: Rc<RefCell<Router>>,
    },
}

impl Stage<NodeMsg> for NodeStage {
    fn handle(
        &mut self,
        cx: &mut StageContext<'_, NodeMsg>,
        envelope: Envelope<NodeMsg>,
    ) -> Handled {
        match (self, envelope.msg) {
            (NodeStage::Gateway { gateway, .. }, NodeMsg::ToClient(out)) => {
                gateway.borrow_mut().to_client(out)
            }
            (NodeStage::Cell { world, router, .. }, NodeMsg::Cell(env)) => {
                // Delivered by cell id: the stage only bundles. A cell that
                // moved away meanwhile gets its message passed on.
                if let Err(env) = world.borrow_mut().deliver(env) {
                    router.borrow_mut().send_cell(cx.shard_context(), env);
                }
            }
            (NodeStage::Gateway { router, .. }, NodeMsg::Cell(env)) => {
                router.borrow_mut().send_cell(cx.shard_context(), env);
            }
            (NodeStage::Cell { router, .. }, NodeMsg::ToClient(out)) => {
                router.borrow_mut().send_client(cx.shard_context(), out);
            }
        }
        Handled::Done
    }
}
