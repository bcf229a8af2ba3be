//! Per-destination bundling of outgoing messages (Seastar-style).
//!
//! A shard never pushes messages one by one into other mailboxes: sends are
//! appended to one buffer per destination shard and pushed as one bundle at
//! the end of the loop turn (or as soon as a bundle reaches `bundle_max`).
//! A destination that is full keeps its bundle here for the next turn; the
//! buffer itself is bounded, and a send beyond the bound is refused.

use std::mem;

use crate::ids::{Origin, ShardId, StageAddr};
use crate::mailbox::{Envelope, MailboxSender, SendError};

/// Counters of one outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxCounters {
    /// Bundles kept for a later turn because the destination was full.
    pub deferred: u64,
    /// Sends refused because a destination buffer was at its bound.
    pub rejected: u64,
    /// Messages dropped because the destination shard had closed.
    pub lost_closed: u64,
    /// Bundles pushed.
    pub bundles: u64,
}

/// Outgoing buffers of one shard, one per destination shard.
pub struct Outbox<M> {
    from: Origin,
    senders: Vec<MailboxSender<M>>,
    pending: Vec<Vec<Envelope<M>>>,
    bundle_max: usize,
    pending_max: usize,
    counters: OutboxCounters,
}

impl<M> Outbox<M> {
    /// An outbox sending as `from` to the shards behind `senders` (indexed by
    /// shard). A bundle is pushed when it reaches `bundle_max` messages; at
    /// most `pending_max` messages wait per destination.
    pub fn new(
        from: Origin,
        senders: Vec<MailboxSender<M>>,
        bundle_max: usize,
        pending_max: usize,
    ) -> Self {
        let pending = senders.iter().map(|_| Vec::new()).collect();
        let pending_max = pending_max.max(1);
        Self {
            from,
            senders,
            pending,
            bundle_max: bundle_max.clamp(1, pending_max),
            pending_max,
            counters: OutboxCounters::default(),
        }
    }

    /// Queues `msg` for `to`. Refused (and counted) if the destination is
    /// unknown, closed, or its buffer is full even after a flush attempt.
    pub fn send(&mut self, to: StageAddr, msg: M) -> Result<(), SendError<M>> {
        let d = to.shard.index();
        if d >= self.senders.len() {
            self.counters.rejected += 1;
            return Err(SendError::Closed(msg));
        }
        if self.pending[d].len() >= self.pending_max {
            self.flush_one(d);
            if self.pending[d].len() >= self.pending_max {
                self.counters.rejected += 1;
                return Err(SendError::Full(msg));
            }
        }
        self.pending[d].push(Envelope::new(to.stage, self.from, msg));
        if self.pending[d].len() >= self.bundle_max {
            self.flush_one(d);
        }
        Ok(())
    }

    /// Pushes every waiting bundle it can. Returns the messages still waiting.
    pub fn flush(&mut self) -> usize {
        let mut waiting = 0;
        for d in 0..self.pending.len() {
            if !self.pending[d].is_empty() {
                self.flush_one(d);
                waiting += self.pending[d].len();
            }
        }
        waiting
    }

    fn flush_one(&mut self, d: usize) {
        // A bundle must fit in the destination mailbox at once; half its
        // capacity leaves room for other senders.
        let chunk_max = self
            .bundle_max
            .min((self.senders[d].capacity() / 2).max(1) as usize);
        while !self.pending[d].is_empty() {
            let len = self.pending[d].len();
            let bundle = if len <= chunk_max {
                mem::replace(
                    &mut self.pending[d],
                    Vec::with_capacity(len.min(self.bundle_max)),
                )
            } else {
                self.pending[d].drain(..chunk_max).collect()
            };
            match self.senders[d].try_send_bundle(bundle) {
                Ok(()) => self.counters.bundles += 1,
                Err(SendError::Full(bundle)) => {
                    self.counters.deferred += 1;
                    // Put it back in front, keeping the order.
                    let rest = mem::replace(&mut self.pending[d], bundle);
                    self.pending[d].extend(rest);
                    return;
                }
                Err(SendError::Closed(bundle)) => {
                    let lost = bundle.len() + self.pending[d].len();
                    self.pending[d].clear();
                    self.counters.lost_closed += lost as u64;
                    tracing::warn!(
                        shard = %self.senders[d].shard(),
                        messages = lost,
                        "destination shard closed; outgoing messages dropped"
                    );
                    return;
                }
            }
        }
    }

    /// Messages waiting in every buffer.
    pub fn waiting(&self) -> usize {
        self.pending.iter().map(Vec::len).sum()
    }

    /// The outbox's counters.
    pub fn counters(&self) -> OutboxCounters {
        self.counters
    }

    /// The mailbox senders, indexed by shard.
    pub fn senders(&self) -> &[MailboxSender<M>] {
        &self.senders
    }

    /// Number of shards this outbox reaches.
    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }

    /// The sender of a shard's mailbox.
    pub fn sender(&self, shard: ShardId) -> Option<&MailboxSender<M>> {
        self.senders.get(shard.index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::StageId;
    use crate::mailbox::mailbox;

    #[test]
    fn bundles_per_destination_and_keeps_what_does_not_fit() {
        let a = mailbox::<u32>(ShardId(0), 4).unwrap();
        let b = mailbox::<u32>(ShardId(1), 100).unwrap();
        let mut out = Outbox::new(
            Origin::Shard(ShardId(0)),
            vec![a.sender(), b.sender()],
            100,
            6,
        );
        for i in 0..6 {
            out.send(StageAddr::new(ShardId(0), StageId(0)), i).unwrap();
            out.send(StageAddr::new(ShardId(1), StageId(1)), i).unwrap();
        }
        // Shard 0 takes 4 messages, in bundles of at most 2 (half its
        // capacity): 2 of the 6 wait.
        assert_eq!(out.flush(), 2);
        assert_eq!(a.depth(), 4);
        assert!(out.counters().deferred >= 1);
        assert_eq!(b.depth(), 6);
        for i in 0..4 {
            out.send(StageAddr::new(ShardId(0), StageId(0)), 10 + i)
                .unwrap();
        }
        // The buffer for shard 0 is at its bound: the next send is refused.
        assert!(matches!(
            out.send(StageAddr::new(ShardId(0), StageId(0)), 99),
            Err(SendError::Full(99))
        ));
        assert_eq!(out.counters().rejected, 1);
        // Unknown shard: refused.
        assert!(out.send(StageAddr::new(ShardId(7), StageId(0)), 1).is_err());
    }

    #[test]
    fn closed_destination_is_counted_as_lost() {
        let a = mailbox::<u32>(ShardId(0), 4).unwrap();
        let mut out = Outbox::new(Origin::Shard(ShardId(1)), vec![a.sender()], 8, 8);
        out.send(StageAddr::new(ShardId(0), StageId(0)), 1).unwrap();
        a.close();
        assert_eq!(out.flush(), 0);
        assert_eq!(out.counters().lost_closed, 1);
    }
}
