//! Stages: many lightweight, addressable units per shard.
//!
//! A stage has no queue of its own: its messages arrive through the shard's
//! unified mailbox and are handed to it bundled. A stage handles one message
//! at a time. A handler that must wait returns [`Handled::Continue`] with a
//! future; until that future completes the stage is *busy* and its next
//! messages wait in a local backlog, so it never runs two messages at once,
//! even across awaits (seed 003's busy flag).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use crate::ids::{ShardId, StageAddr, StageId};
use crate::mailbox::{Envelope, SendError};
use crate::shard::ShardContext;
use crate::tick::Tick;

/// What a handler did with a message.
pub enum Handled {
    /// Finished: the stage may take its next message.
    Done,
    /// Still working: the stage takes no other message until this completes.
    Continue(Pin<Box<dyn Future<Output = ()> + 'static>>),
}

impl Handled {
    /// Wraps a future as a continuation.
    pub fn continue_with(future: impl Future<Output = ()> + 'static) -> Self {
        Handled::Continue(Box::pin(future))
    }
}

/// A unit of work addressed by [`StageId`] on one shard.
pub trait Stage<M>: 'static {
    /// Handles one message. Called in arrival order per sender, never while a
    /// previous continuation of this stage is still running.
    fn handle(&mut self, cx: &mut StageContext<'_, M>, message: Envelope<M>) -> Handled;
}

/// What a stage handler can see and do.
pub struct StageContext<'a, M> {
    pub(crate) shard: &'a mut ShardContext<M>,
    pub(crate) stage: StageId,
}

impl<M: Send + 'static> StageContext<'_, M> {
    /// The stage being run.
    pub fn stage(&self) -> StageId {
        self.stage
    }

    /// This stage's address.
    pub fn address(&self) -> StageAddr {
        StageAddr::new(self.shard.shard(), self.stage)
    }

    /// The shard running it.
    pub fn shard_id(&self) -> ShardId {
        self.shard.shard()
    }

    /// The time the current loop turn started.
    pub fn now(&self) -> Instant {
        self.shard.now()
    }

    /// The last tick the shard ran.
    pub fn last_tick(&self) -> Option<Tick> {
        self.shard.last_tick()
    }

    /// Sends a message to any stage of any shard (bundled, pushed at the end
    /// of the turn).
    pub fn send(&mut self, to: StageAddr, msg: M) -> Result<(), SendError<M>> {
        self.shard.send(to, msg)
    }

    /// The whole shard context.
    pub fn shard_context(&mut self) -> &mut ShardContext<M> {
        self.shard
    }
}

struct Slot<S, M> {
    stage: Option<S>,
    busy: bool,
    generation: u32,
    backlog: VecDeque<Envelope<M>>,
}

/// The stages of one shard, indexed by [`StageId`].
pub struct StageTable<S, M> {
    slots: Vec<Slot<S, M>>,
    free: Vec<u32>,
    len: usize,
}

impl<S, M> Default for StageTable<S, M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, M> StageTable<S, M> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Adds a stage and returns its id (ids of removed stages are reused).
    pub fn insert(&mut self, stage: S) -> StageId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.stage = Some(stage);
            slot.busy = false;
            return StageId(index);
        }
        self.slots.push(Slot {
            stage: Some(stage),
            busy: false,
            generation: 0,
            backlog: VecDeque::new(),
        });
        StageId(self.slots.len() as u32 - 1)
    }

    /// Removes a stage. Returns it with the messages that were still waiting
    /// for it (the caller decides where they go: nothing is dropped here).
    pub fn remove(&mut self, id: StageId) -> Option<(S, Vec<Envelope<M>>)> {
        let slot = self.slots.get_mut(id.index())?;
        let stage = slot.stage.take()?;
        slot.busy = false;
        // A continuation still running for the old stage must not free the
        // stage that will reuse this id.
        slot.generation = slot.generation.wrapping_add(1);
        let backlog = slot.backlog.drain(..).collect();
        self.free.push(id.0);
        self.len -= 1;
        Some((stage, backlog))
    }

    /// The stage with this id.
    pub fn get(&self, id: StageId) -> Option<&S> {
        self.slots.get(id.index())?.stage.as_ref()
    }

    /// The stage with this id, mutably (e.g. from a tick).
    pub fn get_mut(&mut self, id: StageId) -> Option<&mut S> {
        self.slots.get_mut(id.index())?.stage.as_mut()
    }

    /// True while a continuation of this stage runs.
    pub fn is_busy(&self, id: StageId) -> bool {
        self.slots.get(id.index()).is_some_and(|s| s.busy)
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no stage.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stages with a continuation running.
    pub fn busy_count(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Messages waiting in backlogs of busy stages.
    pub fn backlog_len(&self) -> usize {
        self.slots.iter().map(|s| s.backlog.len()).sum()
    }

    /// Every stage with its id.
    pub fn iter(&self) -> impl Iterator<Item = (StageId, &S)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.stage.as_ref().map(|st| (StageId(i as u32), st)))
    }

    /// Every stage with its id, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (StageId, &mut S)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.stage.as_mut().map(|st| (StageId(i as u32), st)))
    }
}

impl<S: Stage<M>, M: Send + 'static> StageTable<S, M> {
    /// Hands a stage its bundle. Messages for a missing stage go to
    /// `undeliverable`. Returns how many messages were handled now (not the
    /// ones queued behind a continuation).
    pub(crate) fn deliver(
        &mut self,
        cx: &mut ShardContext<M>,
        id: StageId,
        messages: impl Iterator<Item = Envelope<M>>,
        mut undeliverable: impl FnMut(&mut ShardContext<M>, Envelope<M>),
    ) -> u64 {
        let Some(slot) = self.slots.get_mut(id.index()) else {
            messages.for_each(|e| undeliverable(cx, e));
            return 0;
        };
        let Some(stage) = slot.stage.as_mut() else {
            messages.for_each(|e| undeliverable(cx, e));
            return 0;
        };
        let mut handled = 0;
        for envelope in messages {
            if slot.busy {
                // Counted when the stage gets to it in `resume`.
                slot.backlog.push_back(envelope);
                continue;
            }
            handled += 1;
            let mut scx = StageContext {
                shard: cx,
                stage: id,
            };
            if let Handled::Continue(future) = stage.handle(&mut scx, envelope) {
                slot.busy = true;
                cx.spawn_continuation(id, slot.generation, future);
            }
        }
        handled
    }

    /// A continuation finished: frees the stage and runs its backlog until it
    /// is empty or the stage is busy again.
    pub(crate) fn resume(&mut self, cx: &mut ShardContext<M>, id: StageId, generation: u32) -> u64 {
        let Some(slot) = self.slots.get_mut(id.index()) else {
            return 0;
        };
        if slot.generation != generation || !slot.busy {
            return 0;
        }
        slot.busy = false;
        let Some(stage) = slot.stage.as_mut() else {
            return 0;
        };
        let mut handled = 0;
        while let Some(envelope) = slot.backlog.pop_front() {
            handled += 1;
            let mut scx = StageContext {
                shard: cx,
                stage: id,
            };
            if let Handled::Continue(future) = stage.handle(&mut scx, envelope) {
                slot.busy = true;
                cx.spawn_continuation(id, slot.generation, future);
                break;
            }
        }
        handled
    }
}
