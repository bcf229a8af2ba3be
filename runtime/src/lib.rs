//! Tessera's thread-per-core runtime.
//!
//! One **shard** per core: a glommio `LocalExecutor` pinned to its CPU that
//! owns a table of lightweight **stages** (cells and sessions later) and one
//! unified, bounded, multi-producer **mailbox**. Every turn of its loop the
//! shard drains the mailbox in bulk, **bundles** the drained messages by
//! destination stage and runs each stage's bundle in arrival order; a fixed-rate
//! **tick** runs on absolute deadlines; messages a shard sends to other shards
//! are bundled per destination and flushed once per turn.
//!
//! This crate is the only place in Tessera that starts threads and executors.
//! Everything it schedules is shard-local: no locks on the hot path, no state
//! shared between shards except the mailboxes and counters.
//!
//! ```no_run
//! use tessera_runtime::{Envelope, Handled, RuntimeBuilder, ShardContext, ShardHandler,
//!     Stage, StageContext, StageTable, Tick};
//!
//! struct Counter(u64);
//! impl Stage<u64> for Counter {
//!     fn handle(&mut self, _cx: &mut StageContext<'_, u64>, msg: Envelope<u64>) -> Handled {
//!         self.0 += msg.msg;
//!         Handled::Done
//!     }
//! }
//! struct App;
//! impl ShardHandler for App {
//!     type Message = u64;
//!     type Stage = Counter;
//!     fn on_start(&mut self, _cx: &mut ShardContext<u64>, stages: &mut StageTable<Counter, u64>) {
//!         stages.insert(Counter(0));
//!     }
//!     fn on_tick(&mut self, _cx: &mut ShardContext<u64>, _stages: &mut StageTable<Counter, u64>, _tick: Tick) {}
//! }
//! let runtime = RuntimeBuilder::new().shards(2).pinned(false).start(|_shard| App).unwrap();
//! runtime.stop();
//! let reports = runtime.join().unwrap();
//! assert_eq!(reports.len(), 2);
//! ```
#![warn(missing_docs)]

mod bundle;
pub mod cluster;
mod ids;
mod mailbox;
pub mod node;
mod notify;
mod outbox;
mod runtime;
mod shard;
mod signals;
mod stage;
mod stats;
mod tick;
mod watchdog;

pub use bundle::Bundler;
pub use ids::{Origin, ShardId, StageAddr, StageId};
pub use mailbox::{mailbox, Envelope, Mailbox, MailboxCounters, MailboxSender, SendError};
pub use outbox::Outbox;
pub use runtime::{
    spawn_helper, CpuPlacement, Runtime, RuntimeBuilder, RuntimeError, ShardConfig, StopHandle,
};
pub use shard::{LocalHandle, ShardContext, ShardHandler};
pub use signals::{install_drain_on_signals, install_stop_on_signals};
pub use stage::{Handled, Stage, StageContext, StageTable};
pub use stats::{ShardReport, ShardStats, StatsBoard};
pub use tick::{Tick, TickClock, TickStart};
