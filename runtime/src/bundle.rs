//! Bundling drained messages by destination stage (seed 003, step 3).
//!
//! The shard drains its mailbox into a [`Bundler`], which threads the
//! messages of each stage into a chain in O(1) per message (no sort, no
//! per-stage queue), then hands each stage its whole chain at once. Order
//! inside a chain is arrival order, so per-sender order is kept.

use crate::ids::StageId;
use crate::mailbox::Envelope;

const END: u32 = u32::MAX;

/// Groups a batch of envelopes by destination stage.
pub struct Bundler<M> {
    items: Vec<Option<Envelope<M>>>,
    next: Vec<u32>,
    // Per stage slot: the round it was last touched in, and its chain.
    mark: Vec<u32>,
    head: Vec<u32>,
    tail: Vec<u32>,
    touched: Vec<u32>,
    round: u32,
}

impl<M> Default for Bundler<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Bundler<M> {
    /// An empty bundler.
    pub fn new() -> Self {
        Self {
            items: Vec::new(),
            next: Vec::new(),
            mark: Vec::new(),
            head: Vec::new(),
            tail: Vec::new(),
            touched: Vec::new(),
            round: 1,
        }
    }

    /// Adds one message to the current round.
    pub fn push(&mut self, envelope: Envelope<M>) {
        let stage = envelope.to.index();
        if stage >= self.mark.len() {
            let len = (stage + 1).next_power_of_two();
            self.mark.resize(len, 0);
            self.head.resize(len, END);
            self.tail.resize(len, END);
        }
        let index = self.items.len() as u32;
        self.items.push(Some(envelope));
        self.next.push(END);
        if self.mark[stage] != self.round {
            self.mark[stage] = self.round;
            self.head[stage] = index;
            self.touched.push(stage as u32);
        } else {
            self.next[self.tail[stage] as usize] = index;
        }
        self.tail[stage] = index;
    }

    /// Messages in the current round.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when the current round holds nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Distinct stages in the current round.
    pub fn stage_count(&self) -> usize {
        self.touched.len()
    }

    /// Calls `f` once per stage, in order of each stage's first message,
    /// with an iterator over that stage's messages in arrival order, then
    /// starts a new round. `f` must consume its iterator: what it leaves is
    /// handed to `leftover`.
    pub fn drain_bundles(
        &mut self,
        mut f: impl FnMut(StageId, &mut BundleIter<'_, M>),
        mut leftover: impl FnMut(Envelope<M>),
    ) {
        for k in 0..self.touched.len() {
            let stage = self.touched[k];
            let mut iter = BundleIter {
                items: &mut self.items,
                next: &self.next,
                cursor: self.head[stage as usize],
            };
            f(StageId(stage), &mut iter);
            for envelope in iter {
                leftover(envelope);
            }
        }
        self.items.clear();
        self.next.clear();
        self.touched.clear();
        if self.round == u32::MAX {
            self.mark.fill(0);
            self.round = 1;
        } else {
            self.round += 1;
        }
    }
}

/// The messages of one stage within a round, in arrival order.
pub struct BundleIter<'a, M> {
    items: &'a mut [Option<Envelope<M>>],
    next: &'a [u32],
    cursor: u32,
}

impl<M> Iterator for BundleIter<'_, M> {
    type Item = Envelope<M>;

    #[inline]
    fn next(&mut self) -> Option<Envelope<M>> {
        if self.cursor == END {
            return None;
        }
        let index = self.cursor as usize;
        self.cursor = self.next[index];
        self.items[index].take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Origin;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bundles_keep_every_message_once_in_arrival_order(
            rounds in proptest::collection::vec(
                proptest::collection::vec((0u32..50, 0u32..4), 0..300), 1..5)
        ) {
            let mut bundler = Bundler::new();
            let mut serial = 0u64;
            for round in rounds {
                let mut expected: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
                for (stage, sender) in round {
                    bundler.push(Envelope::new(StageId(stage), Origin::External(sender), serial));
                    expected.entry(stage).or_default().push(serial);
                    serial += 1;
                }
                let mut got: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
                let mut twice = false;
                bundler.drain_bundles(
                    |stage, msgs| {
                        let v = got.entry(stage.0).or_default();
                        twice |= !v.is_empty();
                        v.extend(msgs.map(|e| e.msg));
                    },
                    |_| panic!("nothing is left over when f consumes"),
                );
                prop_assert!(!twice, "a stage was bundled twice in one round");
                prop_assert_eq!(&got, &expected);
                prop_assert!(bundler.is_empty());
            }
        }
    }

    #[test]
    fn leftovers_are_handed_back() {
        let mut bundler = Bundler::new();
        for i in 0..5u64 {
            bundler.push(Envelope::new(StageId(3), Origin::External(0), i));
        }
        let mut left = Vec::new();
        bundler.drain_bundles(
            |_, msgs| {
                msgs.next();
                msgs.next();
            },
            |e| left.push(e.msg),
        );
        assert_eq!(left, vec![2, 3, 4]);
    }
}
