//! Per-channel send queues and receive state: message ids, fragmentation,
//! retransmission bookkeeping, reorder and reassembly buffers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{ChannelConfig, ChannelId, ChannelKind, Limits};
use crate::pool::BufferPool;
use crate::types::{ConnectionHandle, Event};
use crate::wire::{self, FRAGMENT_FRAME_OVERHEAD, MESSAGE_FRAME_OVERHEAD};

/// `last_sent` of a part that never went out.
const NEVER: u64 = u64::MAX;

/// A message waiting to be sent (or acknowledged).
#[derive(Debug)]
struct OutMessage {
    id: u64,
    bytes: Vec<u8>,
    /// 0 for a message that fits one frame.
    fragment_count: u16,
}

impl OutMessage {
    fn new(id: u64, bytes: Vec<u8>, limits: &Limits) -> Self {
        let fragment_count = if bytes.len() <= limits.single_max {
            0
        } else {
            // `Config::validate` bounds the count by u16::MAX.
            wire::fragment_layout(bytes.len(), limits.fragment_max).0 as u16
        };
        Self {
            id,
            bytes,
            fragment_count,
        }
    }

    fn parts(&self) -> u16 {
        self.fragment_count.max(1)
    }

    fn span(&self, part: u16) -> (usize, usize) {
        if self.fragment_count == 0 {
            (0, self.bytes.len())
        } else {
            wire::fragment_span(self.bytes.len() as u32, self.fragment_count, part)
                .unwrap_or((0, 0))
        }
    }

    fn frame_len(&self, part: u16) -> usize {
        let overhead = if self.fragment_count == 0 {
            MESSAGE_FRAME_OVERHEAD
        } else {
            FRAGMENT_FRAME_OVERHEAD
        };
        overhead + self.span(part).1
    }

    fn write(&self, channel: u8, part: u16, out: &mut Vec<u8>) {
        let (offset, len) = self.span(part);
        let payload = &self.bytes[offset..offset + len];
        if self.fragment_count == 0 {
            wire::write_message(out, channel, self.id as u16, payload);
        } else {
            wire::write_fragment(
                out,
                channel,
                self.id as u16,
                part,
                self.fragment_count,
                self.bytes.len() as u32,
                payload,
            );
        }
    }
}

/// The next frame a channel wants to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unit {
    pub id: u64,
    pub part: u16,
    pub frame_len: usize,
    pub retransmit: bool,
    /// The extra copy of a retransmission (`Config::retransmission_copies`).
    pub echo: bool,
    /// The frame must be recorded in the sent packet (reliable, or an
    /// unfragmented message of a channel that reports acks).
    pub tracked: bool,
}

#[derive(Debug, Clone, Copy)]
struct PartState {
    acked: bool,
    last_sent: u64,
}

const UNSENT: PartState = PartState {
    acked: false,
    last_sent: NEVER,
};

#[derive(Debug)]
enum Parts {
    One(PartState),
    Many { states: Vec<PartState>, acked: u16 },
}

#[derive(Debug)]
struct ReliableSlot {
    message: OutMessage,
    parts: Parts,
    done: bool,
}

impl ReliableSlot {
    fn part(&self, part: u16) -> Option<&PartState> {
        match &self.parts {
            Parts::One(state) => (part == 0).then_some(state),
            Parts::Many { states, .. } => states.get(part as usize),
        }
    }

    fn part_mut(&mut self, part: u16) -> Option<&mut PartState> {
        match &mut self.parts {
            Parts::One(state) => (part == 0).then_some(state),
            Parts::Many { states, .. } => states.get_mut(part as usize),
        }
    }
}

#[derive(Debug)]
struct ReliableSend {
    /// Id of `slots[0]`: everything below is acknowledged.
    base: u64,
    slots: VecDeque<ReliableSlot>,
    /// First part never sent yet.
    unsent_id: u64,
    unsent_part: u16,
    retransmit: VecDeque<(u64, u16)>,
    /// Second copies of retransmitted parts: `(id, part, seq of the first
    /// copy)`, each sent in a later packet than its first copy.
    echoes: VecDeque<(u64, u16, u64)>,
    /// Copies of each retransmission (1 or 2).
    copies: u8,
    window: u64,
}

impl ReliableSend {
    fn slot(&self, id: u64) -> Option<&ReliableSlot> {
        id.checked_sub(self.base)
            .and_then(|k| self.slots.get(k as usize))
    }

    fn slot_mut(&mut self, id: u64) -> Option<&mut ReliableSlot> {
        id.checked_sub(self.base)
            .and_then(|k| self.slots.get_mut(k as usize))
    }

    fn next_id(&self) -> u64 {
        self.base + self.slots.len() as u64
    }
}

#[derive(Debug)]
enum SendInner {
    Unreliable {
        next_id: u64,
        /// Messages and the next part to send of the front one.
        queue: VecDeque<OutMessage>,
        front_part: u16,
    },
    Reliable(ReliableSend),
}

/// Send side of one channel.
#[derive(Debug)]
pub(crate) struct SendChannel {
    index: u8,
    kind: ChannelKind,
    notify: bool,
    budget: usize,
    messages_max: usize,
    bytes_max: usize,
    inner: SendInner,
    /// Bytes of messages waiting or unacknowledged.
    pub queued_bytes: usize,
    /// Sequenced messages dropped from a full queue.
    pub dropped_superseded: u64,
}

impl SendChannel {
    pub fn new(index: u8, config: &ChannelConfig, window: u16, copies: u8) -> Self {
        let inner = if config.kind.is_reliable() {
            SendInner::Reliable(ReliableSend {
                base: 0,
                slots: VecDeque::new(),
                unsent_id: 0,
                unsent_part: 0,
                retransmit: VecDeque::new(),
                echoes: VecDeque::new(),
                copies: copies.clamp(1, 2),
                window: window as u64,
            })
        } else {
            SendInner::Unreliable {
                next_id: 0,
                queue: VecDeque::new(),
                front_part: 0,
            }
        };
        Self {
            index,
            kind: config.kind,
            notify: config.notify_acks,
            budget: if config.packet_budget_bytes == 0 {
                usize::MAX
            } else {
                config.packet_budget_bytes
            },
            messages_max: config.queue_messages_max,
            bytes_max: config.queue_bytes_max,
            inner,
            queued_bytes: 0,
            dropped_superseded: 0,
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Messages waiting or unacknowledged.
    pub fn queued_messages(&self) -> usize {
        match &self.inner {
            SendInner::Unreliable { queue, .. } => queue.len(),
            SendInner::Reliable(r) => r.slots.len(),
        }
    }

    /// Queues a copy of `bytes`; returns its id, or `None` when the queue is
    /// full (nothing queued).
    pub fn push(&mut self, bytes: &[u8], limits: &Limits, pool: &mut BufferPool) -> Option<u64> {
        let fits = |this: &Self| {
            this.queued_messages() < this.messages_max
                && this.queued_bytes + bytes.len() <= this.bytes_max
        };
        if !fits(self) {
            if self.kind != ChannelKind::UnreliableSequenced || bytes.len() > self.bytes_max {
                return None;
            }
            // Newest wins: an unsent older snapshot is worth less than this one.
            while !fits(self) {
                let SendInner::Unreliable {
                    queue, front_part, ..
                } = &mut self.inner
                else {
                    return None;
                };
                let old = queue.pop_front()?;
                *front_part = 0;
                self.queued_bytes -= old.bytes.len();
                self.dropped_superseded += 1;
                pool.put(old.bytes);
            }
        }
        let buffer = pool.copy_of(bytes);
        self.queued_bytes += bytes.len();
        let id = match &mut self.inner {
            SendInner::Unreliable { next_id, queue, .. } => {
                let id = *next_id;
                *next_id += 1;
                queue.push_back(OutMessage::new(id, buffer, limits));
                id
            }
            SendInner::Reliable(r) => {
                let id = r.next_id();
                let message = OutMessage::new(id, buffer, limits);
                let parts = if message.fragment_count == 0 {
                    Parts::One(UNSENT)
                } else {
                    Parts::Many {
                        states: vec![UNSENT; message.fragment_count as usize],
                        acked: 0,
                    }
                };
                r.slots.push_back(ReliableSlot {
                    message,
                    parts,
                    done: false,
                });
                id
            }
        };
        Some(id)
    }

    /// Cheap check: may `peek` return a unit? (May say yes for a stale
    /// retransmit entry; never says no when there is one.)
    pub fn has_unit(&self) -> bool {
        match &self.inner {
            SendInner::Unreliable { queue, .. } => !queue.is_empty(),
            SendInner::Reliable(r) => {
                !r.retransmit.is_empty()
                    || !r.echoes.is_empty()
                    || (r.unsent_id < r.next_id() && r.unsent_id < r.base + r.window)
            }
        }
    }

    /// The next frame to send in packet `seq`, retransmissions first.
    pub fn peek(&mut self, seq: u64) -> Option<Unit> {
        let notify = self.notify;
        match &mut self.inner {
            SendInner::Unreliable {
                queue, front_part, ..
            } => {
                let message = queue.front()?;
                Some(Unit {
                    id: message.id,
                    part: *front_part,
                    frame_len: message.frame_len(*front_part),
                    retransmit: false,
                    echo: false,
                    tracked: notify && message.fragment_count == 0,
                })
            }
            SendInner::Reliable(r) => {
                while let Some(&(id, part)) = r.retransmit.front() {
                    if let Some(slot) = r.slot(id) {
                        if slot.part(part).is_some_and(|p| !p.acked) {
                            return Some(Unit {
                                id,
                                part,
                                frame_len: slot.message.frame_len(part),
                                retransmit: true,
                                echo: false,
                                tracked: true,
                            });
                        }
                    }
                    r.retransmit.pop_front();
                }
                while let Some(&(id, part, first)) = r.echoes.front() {
                    if first >= seq {
                        // Not in the packet that carries the first copy.
                        break;
                    }
                    if let Some(slot) = r.slot(id) {
                        if slot.part(part).is_some_and(|p| !p.acked) {
                            return Some(Unit {
                                id,
                                part,
                                frame_len: slot.message.frame_len(part),
                                retransmit: true,
                                echo: true,
                                tracked: true,
                            });
                        }
                    }
                    r.echoes.pop_front();
                }
                if r.unsent_id >= r.base + r.window {
                    return None;
                }
                let slot = r.slot(r.unsent_id)?;
                Some(Unit {
                    id: r.unsent_id,
                    part: r.unsent_part,
                    frame_len: slot.message.frame_len(r.unsent_part),
                    retransmit: false,
                    echo: false,
                    tracked: true,
                })
            }
        }
    }

    /// Writes the frame of `unit` (from `peek`) and records it as sent in
    /// packet `seq`.
    pub fn send_unit(&mut self, unit: Unit, seq: u64, out: &mut Vec<u8>, pool: &mut BufferPool) {
        let index = self.index;
        match &mut self.inner {
            SendInner::Unreliable {
                queue, front_part, ..
            } => {
                let Some(message) = queue.front() else { return };
                message.write(index, unit.part, out);
                *front_part += 1;
                if *front_part >= message.parts() {
                    *front_part = 0;
                    if let Some(message) = queue.pop_front() {
                        self.queued_bytes -= message.bytes.len();
                        pool.put(message.bytes);
                    }
                }
            }
            SendInner::Reliable(r) => {
                let Some(slot) = r.slot_mut(unit.id) else {
                    return;
                };
                slot.message.write(index, unit.part, out);
                let parts = slot.message.parts();
                if let Some(state) = slot.part_mut(unit.part) {
                    state.last_sent = seq;
                }
                if unit.echo {
                    r.echoes.pop_front();
                } else if unit.retransmit {
                    r.retransmit.pop_front();
                    if r.copies > 1 {
                        r.echoes.push_back((unit.id, unit.part, seq));
                    }
                } else {
                    r.unsent_part += 1;
                    if r.unsent_part >= parts {
                        r.unsent_part = 0;
                        r.unsent_id += 1;
                    }
                }
            }
        }
    }

    /// A packet carrying (`id`, `part`) was acknowledged. True when this
    /// completes a message the caller wants to hear about.
    pub fn on_ack(&mut self, id: u64, part: u16, pool: &mut BufferPool) -> bool {
        let notify = self.notify;
        let SendInner::Reliable(r) = &mut self.inner else {
            // Unreliable frames are only tracked for notification.
            return notify;
        };
        let Some(slot) = r.slot_mut(id) else {
            return false;
        };
        let completed = match &mut slot.parts {
            Parts::One(state) => {
                if state.acked || part != 0 {
                    false
                } else {
                    state.acked = true;
                    true
                }
            }
            Parts::Many { states, acked } => match states.get_mut(part as usize) {
                Some(state) if !state.acked => {
                    state.acked = true;
                    *acked += 1;
                    *acked as usize == states.len()
                }
                _ => false,
            },
        };
        if completed {
            slot.done = true;
            while r.slots.front().is_some_and(|s| s.done) {
                if let Some(slot) = r.slots.pop_front() {
                    r.base += 1;
                    self.queued_bytes -= slot.message.bytes.len();
                    pool.put(slot.message.bytes);
                }
            }
            // The first-send cursor never trails the acknowledged base.
            if r.unsent_id < r.base {
                r.unsent_id = r.base;
                r.unsent_part = 0;
            }
        }
        completed && notify
    }

    /// A packet `seq` carrying (`id`, `part`) was declared lost. True when
    /// the part was queued for retransmission.
    pub fn on_lost(&mut self, id: u64, part: u16, seq: u64) -> bool {
        let SendInner::Reliable(r) = &mut self.inner else {
            return false;
        };
        let Some(slot) = r.slot(id) else { return false };
        // Only the latest copy's loss matters: an older copy's loss after a
        // retransmission would queue the part twice.
        if slot
            .part(part)
            .is_some_and(|p| !p.acked && p.last_sent == seq)
        {
            r.retransmit.push_back((id, part));
            true
        } else {
            false
        }
    }

    /// Drops everything (connection closed).
    pub fn clear(&mut self, pool: &mut BufferPool) {
        match &mut self.inner {
            SendInner::Unreliable { queue, .. } => {
                for message in queue.drain(..) {
                    pool.put(message.bytes);
                }
            }
            SendInner::Reliable(r) => {
                for slot in r.slots.drain(..) {
                    pool.put(slot.message.bytes);
                }
                r.retransmit.clear();
                r.echoes.clear();
            }
        }
        self.queued_bytes = 0;
    }
}

/// A frame's payload on the way to delivery: still in the packet, or in a
/// buffer already counted against the receive budgets.
enum Payload<'a> {
    Packet(&'a [u8]),
    Counted(Vec<u8>),
}

/// Shared state a channel needs while receiving.
pub(crate) struct RecvContext<'a> {
    pub handle: ConnectionHandle,
    pub now: Instant,
    pub events: &'a mut VecDeque<Event>,
    pub pool: &'a mut BufferPool,
    pub budget: Budget<'a>,
    pub stats: &'a mut RecvStats,
    pub reassemblies_max: usize,
    pub reassembly_timeout: Duration,
}

/// Receive-buffer accounting of one connection and of its endpoint.
pub(crate) struct Budget<'a> {
    pub connection: &'a mut usize,
    pub connection_max: usize,
    pub endpoint: &'a mut usize,
    pub endpoint_max: usize,
}

impl Budget<'_> {
    fn try_reserve(&mut self, bytes: usize) -> bool {
        if *self.connection + bytes > self.connection_max
            || *self.endpoint + bytes > self.endpoint_max
        {
            return false;
        }
        self.reserve(bytes);
        true
    }

    fn reserve(&mut self, bytes: usize) {
        *self.connection += bytes;
        *self.endpoint += bytes;
    }

    fn release(&mut self, bytes: usize) {
        *self.connection = self.connection.saturating_sub(bytes);
        *self.endpoint = self.endpoint.saturating_sub(bytes);
    }
}

/// Receive counters of one connection.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RecvStats {
    pub messages: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub incomplete_dropped: u64,
    pub no_memory: u64,
    pub bad_fragments: u64,
}

#[derive(Debug)]
struct Reassembly {
    id: u64,
    buffer: Vec<u8>,
    received: Vec<u64>,
    missing: u16,
    count: u16,
    started: Instant,
}

impl Reassembly {
    fn new(id: u64, count: u16, buffer: Vec<u8>, now: Instant) -> Self {
        Self {
            id,
            buffer,
            received: vec![0; (count as usize).div_ceil(64)],
            missing: count,
            count,
            started: now,
        }
    }

    /// Copies a fragment in. False when it does not match this message.
    fn insert(&mut self, frame: &wire::FragmentFrame<'_>) -> bool {
        if frame.count != self.count || frame.total as usize != self.buffer.len() {
            return false;
        }
        let Some((offset, len)) = wire::fragment_span(frame.total, frame.count, frame.index) else {
            return false;
        };
        let (word, bit) = (frame.index as usize / 64, frame.index % 64);
        if self.received[word] & (1 << bit) == 0 {
            self.received[word] |= 1 << bit;
            self.missing -= 1;
            self.buffer[offset..offset + len].copy_from_slice(frame.payload);
        }
        true
    }
}

#[derive(Debug)]
enum RecvInner {
    Unreliable {
        sequenced: bool,
        /// Newest id delivered (sequenced only).
        newest: Option<u64>,
        /// Highest id seen, the reference for unwrapping wire ids.
        reference: u64,
    },
    Ordered {
        next: u64,
        /// `buffered[k]` holds message `next + k` once it is complete.
        buffered: VecDeque<Option<Vec<u8>>>,
    },
    Unordered {
        /// Every id below was delivered.
        base: u64,
        /// `seen[k]`: message `base + k` was delivered.
        seen: VecDeque<bool>,
    },
}

/// Receive side of one channel.
#[derive(Debug)]
pub(crate) struct RecvChannel {
    index: u8,
    window: u64,
    inner: RecvInner,
    reassemblies: Vec<Reassembly>,
}

/// What a pre-scan decided about a frame (reliable channels only refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Accept; `bytes` will be newly held in buffers. `exempt` bytes belong
    /// to the next in-order message, which is never refused for memory.
    Accept { id: u64, bytes: usize, exempt: bool },
    /// Outside the receive window: the packet must not be acknowledged.
    Refuse,
}

impl RecvChannel {
    pub fn new(index: u8, kind: ChannelKind, window: u16) -> Self {
        let inner = match kind {
            ChannelKind::Unreliable | ChannelKind::UnreliableSequenced => RecvInner::Unreliable {
                sequenced: kind == ChannelKind::UnreliableSequenced,
                newest: None,
                reference: 0,
            },
            ChannelKind::ReliableOrdered => RecvInner::Ordered {
                next: 0,
                buffered: VecDeque::new(),
            },
            ChannelKind::ReliableUnordered => RecvInner::Unordered {
                base: 0,
                seen: VecDeque::new(),
            },
        };
        Self {
            index,
            window: window as u64,
            inner,
            reassemblies: Vec::new(),
        }
    }

    fn has_reassembly(&self, id: u64) -> bool {
        self.reassemblies.iter().any(|r| r.id == id)
    }

    /// Decides, before anything in the packet is applied, whether a frame
    /// with wire id `wire_id` fits; `fragment_total` is `Some` for fragments.
    pub fn admit(
        &self,
        wire_id: u16,
        payload_len: usize,
        fragment_total: Option<u32>,
    ) -> Admission {
        let accept = |id, bytes, exempt| Admission::Accept { id, bytes, exempt };
        match &self.inner {
            RecvInner::Unreliable { .. } => accept(0, 0, false),
            RecvInner::Ordered { next, buffered } => {
                let Some(id) = wire::unwrap_u16(*next, wire_id).filter(|id| id >= next) else {
                    return accept(0, 0, false);
                };
                let k = id - next;
                if k >= self.window {
                    return Admission::Refuse;
                }
                if buffered.get(k as usize).is_some_and(Option::is_some) {
                    return accept(id, 0, false);
                }
                match fragment_total {
                    None if k == 0 => accept(id, 0, false),
                    None => accept(id, payload_len, false),
                    Some(_) if self.has_reassembly(id) => accept(id, 0, false),
                    Some(total) => accept(id, total as usize, k == 0),
                }
            }
            RecvInner::Unordered { base, seen } => {
                let Some(id) = wire::unwrap_u16(*base, wire_id).filter(|id| id >= base) else {
                    return accept(0, 0, false);
                };
                let k = id - base;
                if k >= self.window {
                    return Admission::Refuse;
                }
                if seen.get(k as usize).copied().unwrap_or(false) {
                    return accept(id, 0, false);
                }
                match fragment_total {
                    None => accept(id, 0, false),
                    Some(_) if self.has_reassembly(id) => accept(id, 0, false),
                    Some(total) => accept(id, total as usize, false),
                }
            }
        }
    }

    /// Applies a whole-message frame.
    pub fn on_message(&mut self, wire_id: u16, payload: &[u8], cx: &mut RecvContext<'_>) {
        let Some(id) = self.unwrap_id(wire_id) else {
            cx.stats.duplicates += 1;
            return;
        };
        self.accept(id, Payload::Packet(payload), cx);
    }

    /// Applies a fragment frame.
    pub fn on_fragment(&mut self, frame: &wire::FragmentFrame<'_>, cx: &mut RecvContext<'_>) {
        let Some(id) = self.unwrap_id(frame.id) else {
            cx.stats.duplicates += 1;
            return;
        };
        if self.already_complete(id) {
            cx.stats.duplicates += 1;
            return;
        }
        if let RecvInner::Unreliable { .. } = self.inner {
            self.collect_unreliable(cx);
        }
        let position = match self.reassemblies.iter().position(|r| r.id == id) {
            Some(position) => position,
            None => {
                let unreliable = matches!(self.inner, RecvInner::Unreliable { .. });
                if unreliable && self.reassemblies.len() >= cx.reassemblies_max {
                    // Evict the oldest: newer unreliable data is worth more.
                    let oldest = self
                        .reassemblies
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, r)| (r.started, r.id))
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    let evicted = self.reassemblies.swap_remove(oldest);
                    cx.stats.incomplete_dropped += 1;
                    cx.budget.release(evicted.buffer.len());
                    cx.pool.put(evicted.buffer);
                }
                let total = frame.total as usize;
                if unreliable {
                    if !cx.budget.try_reserve(total) {
                        cx.stats.no_memory += 1;
                        return;
                    }
                } else {
                    // Admitted by the pre-scan.
                    cx.budget.reserve(total);
                }
                let buffer = cx.pool.zeroed(total);
                self.reassemblies
                    .push(Reassembly::new(id, frame.count, buffer, cx.now));
                self.reassemblies.len() - 1
            }
        };
        if !self.reassemblies[position].insert(frame) {
            cx.stats.bad_fragments += 1;
            return;
        }
        if self.reassemblies[position].missing == 0 {
            let done = self.reassemblies.swap_remove(position);
            self.accept(id, Payload::Counted(done.buffer), cx);
        }
    }

    fn unwrap_id(&mut self, wire_id: u16) -> Option<u64> {
        match &mut self.inner {
            RecvInner::Unreliable { reference, .. } => {
                let id = wire::unwrap_u16(*reference, wire_id)?;
                *reference = (*reference).max(id);
                Some(id)
            }
            RecvInner::Ordered { next, .. } => {
                wire::unwrap_u16(*next, wire_id).filter(|id| id >= next)
            }
            RecvInner::Unordered { base, .. } => {
                wire::unwrap_u16(*base, wire_id).filter(|id| id >= base)
            }
        }
    }

    fn already_complete(&self, id: u64) -> bool {
        match &self.inner {
            RecvInner::Unreliable {
                sequenced, newest, ..
            } => *sequenced && newest.is_some_and(|n| id <= n),
            RecvInner::Ordered { next, buffered } => buffered
                .get((id - next) as usize)
                .is_some_and(Option::is_some),
            RecvInner::Unordered { base, seen } => {
                seen.get((id - base) as usize).copied().unwrap_or(false)
            }
        }
    }

    /// Drops unreliable reassemblies that timed out or were overtaken.
    pub fn collect_unreliable(&mut self, cx: &mut RecvContext<'_>) {
        let RecvInner::Unreliable { newest, .. } = &self.inner else {
            return;
        };
        let newest = *newest;
        let (now, timeout) = (cx.now, cx.reassembly_timeout);
        let mut i = 0;
        while i < self.reassemblies.len() {
            let r = &self.reassemblies[i];
            let expired = now.saturating_duration_since(r.started) >= timeout;
            if expired || newest.is_some_and(|n| r.id <= n) {
                let r = self.reassemblies.swap_remove(i);
                cx.stats.incomplete_dropped += 1;
                cx.budget.release(r.buffer.len());
                cx.pool.put(r.buffer);
            } else {
                i += 1;
            }
        }
    }

    fn deliver(&self, payload: Payload<'_>, cx: &mut RecvContext<'_>) {
        let bytes = match payload {
            Payload::Packet(bytes) => cx.pool.copy_of(bytes),
            Payload::Counted(bytes) => {
                cx.budget.release(bytes.len());
                bytes
            }
        };
        cx.stats.messages += 1;
        cx.events.push_back(Event::Message {
            connection: cx.handle,
            channel: ChannelId(self.index),
            bytes,
        });
    }

    fn discard(payload: Payload<'_>, cx: &mut RecvContext<'_>) {
        if let Payload::Counted(bytes) = payload {
            cx.budget.release(bytes.len());
            cx.pool.put(bytes);
        }
    }

    fn accept(&mut self, id: u64, payload: Payload<'_>, cx: &mut RecvContext<'_>) {
        let window = self.window;
        match &mut self.inner {
            RecvInner::Unreliable {
                sequenced, newest, ..
            } => {
                if *sequenced {
                    if newest.is_some_and(|n| id <= n) {
                        cx.stats.stale += 1;
                        Self::discard(payload, cx);
                        return;
                    }
                    *newest = Some(id);
                }
                self.deliver(payload, cx);
            }
            RecvInner::Ordered { next, buffered } => {
                let k = id - *next;
                if k >= window {
                    Self::discard(payload, cx);
                    return;
                }
                if k > 0 {
                    if buffered.len() <= k as usize {
                        buffered.resize_with(k as usize + 1, || None);
                    }
                    let slot = &mut buffered[k as usize];
                    if slot.is_some() {
                        cx.stats.duplicates += 1;
                        Self::discard(payload, cx);
                        return;
                    }
                    *slot = Some(match payload {
                        Payload::Counted(bytes) => bytes,
                        Payload::Packet(bytes) => {
                            // Admitted by the pre-scan.
                            cx.budget.reserve(bytes.len());
                            cx.pool.copy_of(bytes)
                        }
                    });
                    return;
                }
                *next += 1;
                buffered.pop_front();
                let mut ready = Vec::new();
                while let Some(Some(_)) = buffered.front() {
                    if let Some(Some(bytes)) = buffered.pop_front() {
                        ready.push(bytes);
                    }
                    *next += 1;
                }
                self.deliver(payload, cx);
                for bytes in ready {
                    self.deliver(Payload::Counted(bytes), cx);
                }
            }
            RecvInner::Unordered { base, seen } => {
                let k = (id - *base) as usize;
                if k as u64 >= window {
                    Self::discard(payload, cx);
                    return;
                }
                if seen.len() <= k {
                    seen.resize(k + 1, false);
                }
                if seen[k] {
                    cx.stats.duplicates += 1;
                    Self::discard(payload, cx);
                    return;
                }
                seen[k] = true;
                while seen.front() == Some(&true) {
                    seen.pop_front();
                    *base += 1;
                }
                self.deliver(payload, cx);
            }
        }
    }

    /// Messages waiting for an earlier one (ordered channels).
    pub fn buffered_messages(&self) -> usize {
        match &self.inner {
            RecvInner::Ordered { buffered, .. } => buffered.iter().filter(|b| b.is_some()).count(),
            _ => 0,
        }
    }

    /// Messages being reassembled.
    pub fn reassemblies(&self) -> usize {
        self.reassemblies.len()
    }

    /// Frees every buffer (connection closed).
    pub fn clear(&mut self, budget: &mut Budget<'_>, pool: &mut BufferPool) {
        for r in self.reassemblies.drain(..) {
            budget.release(r.buffer.len());
            pool.put(r.buffer);
        }
        if let RecvInner::Ordered { buffered, .. } = &mut self.inner {
            for bytes in buffered.drain(..).flatten() {
                budget.release(bytes.len());
                pool.put(bytes);
            }
        }
    }
}
