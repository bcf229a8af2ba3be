//! The embedded coordinator: a helper thread that owns the decision logic
//! ([`tessera_coord::Coordinator`]), takes shard reports and operator
//! commands from a channel, publishes the registry and sends orders to the
//! shards' mailboxes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tessera_cells::node::ShardMsg;
use tessera_cells::{CellId, GameLogic};
use tessera_coord::{Coordinator, Report, ShardRef};

use crate::ids::{Origin, StageId};
use crate::mailbox::{Envelope, MailboxSender};
use crate::runtime::spawn_helper;

use super::shared::NodeShared;

/// An operator command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    /// Hand a cell to a shard.
    Move {
        /// The cell.
        cell: CellId,
        /// The shard.
        shard: ShardRef,
    },
    /// Split a cell into its four children.
    Split {
        /// The cell.
        cell: CellId,
    },
    /// Merge four siblings into their parent.
    Merge {
        /// The parent.
        cell: CellId,
    },
    /// Hand every cell of a node to the others, then let it exit.
    Drain {
        /// The node.
        node: u16,
    },
    /// Pin a cell to its owner at the admin epoch (`u32::MAX`): every other
    /// claim is overridden, and nothing moves it again.
    Pin {
        /// The cell.
        cell: CellId,
    },
}

/// What reaches the coordinator thread.
pub enum CoordInput {
    /// A shard reports.
    Report {
        /// The reporting shard.
        shard: ShardRef,
        /// What it says.
        report: Report,
    },
    /// An operator asks; the answer goes back on `reply`.
    Admin {
        /// The command.
        command: AdminCommand,
        /// Where the answer goes.
        reply: Sender<Result<String, String>>,
    },
}

/// The coordinator's sending side, cloned into every shard and the admin port.
pub type CoordSender = Sender<CoordInput>;

/// Carries out an operator command; the answer is a line for the operator.
pub fn run_command(
    coord: &mut Coordinator,
    command: &AdminCommand,
    now: Instant,
) -> Result<String, String> {
    match command {
        AdminCommand::Move { cell, shard } => coord
            .command_move(now, *cell, *shard)
            .map(|id| format!("handover {} of {cell} to {shard} started", id.0)),
        AdminCommand::Split { cell } => coord
            .command_split(now, *cell)
            .map(|op| format!("split {op} of {cell} started")),
        AdminCommand::Merge { cell } => coord.command_merge(now, *cell).map(|op| {
            if op == 0 {
                format!("gathering the children of {cell} on one shard first; the merge follows")
            } else {
                format!("merge {op} into {cell} started")
            }
        }),
        AdminCommand::Drain { node } => coord.drain(now, *node).map(|cells| {
            format!(
                "node {node} drains: {cells} cells to hand over; it exits once it holds nothing"
            )
        }),
        AdminCommand::Pin { cell } => coord.command_pin(now, *cell).map(|owner| {
            tracing::error!(%cell, %owner, epoch = tessera_coord::ADMIN_EPOCH, "ADMIN EPOCH: operator pinned the cell; every other claim is overridden and it never moves again");
            format!(
                "{cell} pinned to {owner} at the admin epoch {}: other claims overridden; it no longer moves, splits or merges",
                tessera_coord::ADMIN_EPOCH
            )
        }),
    }
    .map_err(|e| e.to_string())
}

/// Starts the coordinator thread.
pub fn spawn<G: GameLogic>(
    mut coord: Coordinator,
    rx: Receiver<CoordInput>,
    senders: Vec<MailboxSender<ShardMsg<G>>>,
    shared: Arc<NodeShared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    spawn_helper("tessera-coord", None, move || {
        let mut published = coord.registry().version();
        let mut next_tick = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            match rx.recv_timeout(
                next_tick
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            ) {
                Ok(CoordInput::Report { shard, report }) => {
                    coord.handle_report(Instant::now(), shard, report)
                }
                Ok(CoordInput::Admin { command, reply }) => {
                    let result = run_command(&mut coord, &command, Instant::now());
                    tracing::warn!(command = ?command, result = ?result, "operator command");
                    let _ = reply.send(result);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                coord.tick(now);
                next_tick = now + Duration::from_millis(100);
            }
            // Publish the registry before sending orders: a commit must find
            // the new route in place.
            if coord.registry().version() != published {
                published = coord.registry().version();
                shared.set_registry(coord.registry().clone());
            }
            while let Some((shard, order)) = coord.poll_order() {
                let Some(tx) = senders.get(usize::from(shard.shard)) else {
                    tracing::error!(%shard, order = ?order, "order for a shard this node does not run");
                    continue;
                };
                let env =
                    Envelope::new(StageId(0), Origin::External(0xC00D), ShardMsg::Order(order));
                if tx.send_timeout(env, Duration::from_secs(1)).is_err() {
                    tracing::error!(%shard, "order refused by the shard's mailbox");
                }
            }
            for line in coord.take_log() {
                tracing::info!(target: "tessera::coord", "{line}");
            }
            let records = coord.take_records();
            if !records.is_empty() || coord.counters() != shared.coordinator_counters() {
                shared.record(records, coord.counters(), coord.scores());
            }
        }
    })
}
