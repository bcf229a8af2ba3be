//! One cell: its entities, ghosts, queues, and the steps of its tick.
//!
//! The queues of DESIGN.md section 4 are explicit: the **InputQueue**
//! (messages from clients and other cells), the **IntentQueue** (intents
//! produced by inputs and systems, and routed from other cells), the
//! **SimulationQueue** (jobs scheduled for later ticks) and the
//! **OutputQueue** (messages to other cells and to clients). The
//! [`ShardWorld`](crate::world::ShardWorld) runs the steps over all its cells.

use rustc_hash::{FxHashMap, FxHashSet};
use tessera_schema::wire::{EntityKind, GameEvent};

use crate::entity::{Entity, EntityStore, QState};
use crate::game::{GameContext, GameCounters, GameLogic, Job, SimulationQueue};
use crate::geometry::{CellId, Layout, Rect, Vec2};
use crate::ghost::{Ghost, GhostSender, GhostTable, GhostUpdate};
use crate::ids::{ClientId, EntityId, IdAllocator, TickId};
use crate::messages::{
    CellEnvelope, CellMessage, ClientOutput, ClientOutputKind, EntityTransfer, Output,
};
use crate::registry::ShardRef;
use crate::rng::Rng;
use crate::view::{AoiIndex, ClientView, ViewConfig, ViewScratch};
use crate::world::WorldConfig;

/// Most messages a cell holds while waiting for their entity.
const ORPHANS_MAX: usize = 1024;

/// Ticks between two looks for players whose client went silent.
const LINGER_CHECK_EVERY: u64 = 16;

/// A cell's message type for a game.
pub type Msg<G> = CellMessage<<G as GameLogic>::Components, <G as GameLogic>::Intent>;
/// A cell's envelope type for a game.
pub type Envelope<G> = CellEnvelope<<G as GameLogic>::Components, <G as GameLogic>::Intent>;
/// A cell's output type for a game.
pub type Out<G> = Output<<G as GameLogic>::Components, <G as GameLogic>::Intent>;
/// Intents waiting, with how often each was forwarded.
pub type Intents<G> = Vec<(<G as GameLogic>::Intent, u8)>;
/// A transfer for a game.
pub type Transfer<G> = EntityTransfer<<G as GameLogic>::Components>;

/// What a cell counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CellCounters {
    /// Client inputs applied.
    pub inputs: u64,
    /// Inputs passed on to the cell the entity moved to.
    pub inputs_forwarded: u64,
    /// Inputs at or below the entity's last input sequence.
    pub inputs_duplicate: u64,
    /// Inputs held back because an older one had not arrived yet.
    pub inputs_held: u64,
    /// Times held inputs were applied without the missing older ones.
    pub inputs_gap_skipped: u64,
    /// Inputs from a client for an entity it does not control.
    pub inputs_wrong_client: u64,
    /// Inputs, acks or leaves for an entity this cell never had or forgot
    /// (after waiting for it).
    pub unknown_entity: u64,
    /// Forwarded messages held for an entity on its way back to this cell
    /// (instead of bouncing between two forward pointers).
    pub inputs_awaited: u64,
    /// Such messages held while their entity was expected.
    pub orphans_held: u64,
    /// Messages dropped after too many forwards.
    pub hops_exceeded: u64,
    /// Intents applied here.
    pub intents_applied: u64,
    /// Intents sent to the owner of their target.
    pub intents_routed: u64,
    /// Intents whose target is unknown here.
    pub intents_dropped: u64,
    /// Entities handed to other cells.
    pub transfers_out: u64,
    /// Entities received from other cells.
    pub transfers_in: u64,
    /// Transfers of an entity already owned here (refused, kept first copy).
    pub transfers_duplicate: u64,
    /// Players joined here.
    pub joins: u64,
    /// Players removed.
    pub leaves: u64,
    /// Snapshots produced.
    pub snapshots: u64,
    /// Their encoded bytes.
    pub snapshot_bytes: u64,
    /// Changes left for a later snapshot by the byte cap.
    pub snapshot_deferred: u64,
    /// Ghost updates sent (to any neighbour).
    pub ghost_updates: u64,
    /// Subscriptions taken (first requests and renewals).
    pub subscriptions: u64,
    /// Subscriptions for an entity this cell neither owns nor knows the way
    /// to (the subscriber renews at the owner its ghost names).
    pub subscriptions_dropped: u64,
    /// Transfers sent again after a restore that this cell already had
    /// (owned, waiting, or seen leaving since): ignored.
    pub transfers_resent_known: u64,
    /// Transfers sent again after a restore that brought an entity back.
    pub transfers_resent_taken: u64,
    /// Players taken back by a new session (their gateway was lost).
    pub resumes: u64,
    /// Resumes refused (wrong credential, not a player, or the avatar was
    /// not found in time).
    pub resumes_refused: u64,
    /// Players removed after their client stayed silent for the world's
    /// `player_linger_ticks` (a session lost with no leave, never resumed).
    pub players_lingered_out: u64,
}

/// Ticks between two renewals of a subscription (an interest's first
/// subscription waits at most this long).
pub const SUBSCRIBE_EVERY: u64 = 5;

/// A [`GameContext`] over the cell's own fields, borrowed one by one so
/// that the entity store stays free for the game to mutate.
macro_rules! game_context {
    ($cell:ident, $world:expr, $tick:expr, $dt:expr, $ids:expr) => {
        GameContext {
            tick: $tick,
            dt: $dt,
            cell: $cell.id,
            bounds: $cell.bounds,
            world: $world,
            rng: &mut $cell.rng,
            events: &mut $cell.events,
            counters: &mut $cell.game_counters,
            jobs: &mut $cell.jobs,
            ids: $ids,
        }
    };
}

/// One cell of the world, owned by one shard.
pub struct Cell<G: GameLogic> {
    id: CellId,
    bounds: Rect,
    entities: EntityStore<G::Components>,
    ghosts: GhostTable,
    ghost_sender: GhostSender,
    input_queue: Vec<Msg<G>>,
    intent_queue: Vec<(G::Intent, u8)>,
    jobs: SimulationQueue,
    output_queue: Vec<Out<G>>,
    forwards: FxHashMap<EntityId, (CellId, TickId)>,
    /// Messages about an entity this cell does not know yet, waiting a few
    /// ticks for it (its transfer can be overtaken by a forwarded input when
    /// they travel different paths, e.g. across a handover).
    orphans: Vec<(TickId, Msg<G>)>,
    /// Transfers to other shards, kept for a while in case either end is
    /// restored from a replica (crate::replica).
    retained: Vec<Retained<G>>,
    tick: TickId,
    rng: Rng,
    events: Vec<GameEvent>,
    counters: CellCounters,
    game_counters: GameCounters,
    // Per-tick scratch for the views.
    aoi: AoiIndex,
    accepted: Vec<(u32, u32)>,
    scratch: ViewScratch,
    near: Vec<CellId>,
}

impl<G: GameLogic> Cell<G> {
    /// An empty cell of `layout`, its generator derived from `seed`.
    pub fn new(id: CellId, layout: &Layout, seed: u64) -> Self {
        let (gx, gy) = id.grid();
        let stream = (gx as u64).wrapping_mul(0x9E37)
            ^ (gy as u64).wrapping_mul(0x85EB_CA6B)
            ^ (u64::from(id.depth) << 56);
        Self {
            id,
            bounds: layout.geometry().bounds(id),
            entities: EntityStore::new(),
            ghosts: GhostTable::new(),
            ghost_sender: GhostSender::new(),
            input_queue: Vec::new(),
            intent_queue: Vec::new(),
            jobs: SimulationQueue::default(),
            output_queue: Vec::new(),
            forwards: FxHashMap::default(),
            orphans: Vec::new(),
            retained: Vec::new(),
            tick: TickId(0),
            rng: Rng::derive(seed, stream),
            events: Vec::new(),
            counters: CellCounters::default(),
            game_counters: GameCounters::default(),
            aoi: AoiIndex::new(),
            accepted: Vec::new(),
            scratch: ViewScratch::default(),
            near: Vec::new(),
        }
    }

    /// The cell's id.
    pub fn id(&self) -> CellId {
        self.id
    }

    /// Its area.
    pub fn bounds(&self) -> Rect {
        self.bounds
    }

    /// The entities it owns.
    pub fn entities(&self) -> &EntityStore<G::Components> {
        &self.entities
    }

    /// The entities it owns, mutably (tests, admin).
    pub fn entities_mut(&mut self) -> &mut EntityStore<G::Components> {
        &mut self.entities
    }

    /// The ghosts it holds.
    pub fn ghosts(&self) -> &GhostTable {
        &self.ghosts
    }

    /// Its counters.
    pub fn counters(&self) -> CellCounters {
        self.counters
    }

    /// The game's counters for this cell.
    pub fn game_counters(&self) -> GameCounters {
        self.game_counters
    }

    /// Messages waiting in the InputQueue.
    pub fn input_queue_len(&self) -> usize {
        self.input_queue.len()
    }

    /// Jobs waiting in the SimulationQueue.
    pub fn simulation_queue_len(&self) -> usize {
        self.jobs.len()
    }

    /// Queues a message for the next [`drain_inputs`](Self::drain_inputs).
    pub fn push_input(&mut self, msg: Msg<G>) {
        self.input_queue.push(msg);
    }

    /// Takes what the cell produced for other cells and clients.
    pub fn take_outputs(&mut self, out: &mut Vec<Out<G>>) {
        out.append(&mut self.output_queue);
    }

    fn send(&mut self, to: CellId, msg: Msg<G>) {
        self.output_queue.push(Output::Cell(CellEnvelope {
            to,
            from: self.id,
            msg,
        }));
    }

    /// Step 1 and 2: drains the InputQueue. Client inputs become intents
    /// (through the game's validation); ghosts, transfers, joins, acks and
    /// intents from other cells are taken in; what concerns an entity that
    /// moved is forwarded to where it went.
    pub fn drain_inputs(
        &mut self,
        game: &mut G,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
        ids: &mut IdAllocator,
    ) {
        self.events.clear();
        self.tick = tick;
        self.forwards.retain(|_, (_, until)| *until >= tick);
        let keep = config.retain_ticks;
        self.retained
            .retain(|r| r.departed.0.saturating_add(keep) >= tick.0);
        self.ghosts.expire(tick);
        let mut intents = Vec::new();
        let msgs = std::mem::take(&mut self.input_queue);
        self.process_messages(game, config, layout, tick, ids, msgs, &mut intents);
        self.finish_inputs(game, config, layout, tick, ids, intents);
    }

    #[allow(clippy::too_many_arguments)]
    fn process_messages(
        &mut self,
        game: &mut G,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
        ids: &mut IdAllocator,
        msgs: Vec<Msg<G>>,
        intents: &mut Vec<G::Intent>,
    ) {
        let world = layout.geometry().world_rect();
        let dt = config.dt();
        for msg in msgs {
            match msg {
                CellMessage::Join {
                    client,
                    name,
                    pos,
                    resume_key,
                } => {
                    let id = ids.allocate();
                    let pos = self.bounds.clamp(pos);
                    let mut cx = game_context!(self, world, tick, dt, ids);
                    let components = game.new_player(&mut cx, &name);
                    let mut e = Entity::new(id, EntityKind::Player, pos, components);
                    e.client = Some(client);
                    e.resume_key = resume_key;
                    e.heard = tick;
                    e.view = Some(Box::new(ClientView::new(client)));
                    let _ = self.entities.insert(e);
                    self.counters.joins += 1;
                    tracing::debug!(cell = %self.id, entity = %id, %client, tick = tick.0, "player joined");
                    let welcome = self.welcome(config, layout, tick, client, id, pos, resume_key);
                    self.output_queue.push(welcome);
                }
                CellMessage::Resume {
                    client,
                    entity,
                    key,
                    hops,
                    after,
                } => match self.entities.get_mut(entity) {
                    Some(e) if e.client.is_some() && e.resume_key != 0 && e.resume_key == key => {
                        let old = e.client.replace(client);
                        e.heard = tick;
                        // The new session has no snapshot yet: a whole view.
                        e.view = Some(Box::new(ClientView::new(client)));
                        let pos = e.pos;
                        self.counters.resumes += 1;
                        tracing::info!(cell = %self.id, %entity, %client, old = ?old, tick = tick.0, "player resumed by a new session");
                        let welcome = self.welcome(config, layout, tick, client, entity, pos, key);
                        self.output_queue.push(welcome);
                    }
                    Some(_) => self.refuse_resume(client, entity, tick, "wrong credential"),
                    None => self.forward(
                        entity,
                        config,
                        CellMessage::Resume {
                            client,
                            entity,
                            key,
                            hops: hops.saturating_add(1),
                            after,
                        },
                    ),
                },
                CellMessage::Input {
                    client,
                    entity,
                    input,
                    hops,
                    after,
                } => {
                    if let Some(e) = self.entities.get_mut(entity) {
                        if e.client != Some(client) {
                            self.counters.inputs_wrong_client += 1;
                            continue;
                        }
                        e.heard = tick;
                        let seq = input.input_seq;
                        if seq <= e.last_input_seq || e.pending_inputs.iter().any(|p| p.0 == seq) {
                            self.counters.inputs_duplicate += 1;
                            continue;
                        }
                        if seq != e.last_input_seq + 1
                            && e.pending_inputs.len() < config.input_reorder_max
                        {
                            // An older input is still on its way (forwarded by
                            // the cell this entity left): wait for it a little.
                            let at = e.pending_inputs.partition_point(|p| p.0 < seq);
                            e.pending_inputs.insert(at, (seq, tick, input));
                            self.counters.inputs_held += 1;
                            continue;
                        }
                        let mut cx = game_context!(self, world, tick, dt, ids);
                        Self::apply_one(game, &mut cx, e, &input, intents, &mut self.counters);
                        Self::apply_ready(game, &mut cx, e, intents, &mut self.counters, None);
                    } else {
                        self.forward(
                            entity,
                            config,
                            CellMessage::Input {
                                client,
                                entity,
                                input,
                                hops: hops.saturating_add(1),
                                after,
                            },
                        );
                    }
                }
                CellMessage::Ack {
                    client,
                    entity,
                    tick: acked,
                    hops,
                    after,
                } => match self.entities.get_mut(entity) {
                    Some(e) if e.client == Some(client) => {
                        e.heard = tick;
                        if let Some(v) = e.view.as_mut() {
                            v.ack(acked);
                        }
                    }
                    Some(_) => self.counters.inputs_wrong_client += 1,
                    None => self.forward(
                        entity,
                        config,
                        CellMessage::Ack {
                            client,
                            entity,
                            tick: acked,
                            hops: hops.saturating_add(1),
                            after,
                        },
                    ),
                },
                CellMessage::Leave {
                    client,
                    entity,
                    hops,
                    after,
                } => match self.entities.get(entity) {
                    Some(e) if e.client == Some(client) => {
                        self.entities.remove(entity);
                        self.ghost_sender.forget(entity);
                        let _ = self.jobs.take_for(entity);
                        self.counters.leaves += 1;
                        tracing::debug!(cell = %self.id, %entity, %client, tick = tick.0, "player left");
                    }
                    Some(_) => self.counters.inputs_wrong_client += 1,
                    None => self.forward(
                        entity,
                        config,
                        CellMessage::Leave {
                            client,
                            entity,
                            hops: hops.saturating_add(1),
                            after,
                        },
                    ),
                },
                CellMessage::Ghost(update) => {
                    let entities = &self.entities;
                    self.ghosts.apply(&update, tick, |id| entities.contains(id));
                }
                CellMessage::Transfer(t) => self.accept_transfer(*t, config),
                CellMessage::Intent { intent, hops } => self.intent_queue.push((intent, hops)),
                CellMessage::Subscribe {
                    entity,
                    subscriber,
                    until,
                    hops,
                } => match self.entities.get_mut(entity) {
                    Some(e) => {
                        e.add_subscriber(subscriber, until);
                        self.counters.subscriptions += 1;
                    }
                    // Follow the entity if we know where it went; if not, the
                    // subscriber renews at the owner its ghost names.
                    None => match self.forwards.get(&entity) {
                        Some(&(to, _)) if hops < config.max_hops => self.send(
                            to,
                            CellMessage::Subscribe {
                                entity,
                                subscriber,
                                until,
                                hops: hops + 1,
                            },
                        ),
                        _ => self.counters.subscriptions_dropped += 1,
                    },
                },
            }
        }
    }

    /// After the InputQueue: orphans whose entity arrived (or whose forward
    /// pointer appeared) go through again, the ones that waited too long are
    /// dropped and counted; held inputs whose gap did not fill in time are
    /// applied anyway; intents join the IntentQueue.
    fn finish_inputs(
        &mut self,
        game: &mut G,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
        ids: &mut IdAllocator,
        mut intents: Vec<G::Intent>,
    ) {
        if !self.orphans.is_empty() {
            let orphans = std::mem::take(&mut self.orphans);
            let mut ready = Vec::new();
            for (since, msg) in orphans {
                let entity = match &msg {
                    CellMessage::Input { entity, .. }
                    | CellMessage::Ack { entity, .. }
                    | CellMessage::Leave { entity, .. }
                    | CellMessage::Resume { entity, .. } => *entity,
                    _ => continue,
                };
                // Ready when the entity is here, or left here after the
                // newest departure the message knows of.
                let newer_pointer = self
                    .forwards
                    .get(&entity)
                    .is_some_and(|&(_, until)| departure(until, config) > after_of(&msg));
                if self.entities.contains(entity) || newer_pointer {
                    ready.push(msg);
                } else if tick.0 > since.0 + config.orphan_ticks {
                    self.counters.unknown_entity += 1;
                    if let CellMessage::Resume { client, entity, .. } = msg {
                        // Answered, so that the client may join afresh.
                        self.refuse_resume(client, entity, tick, "avatar not found");
                    }
                } else {
                    self.orphans.push((since, msg));
                }
            }
            self.process_messages(game, config, layout, tick, ids, ready, &mut intents);
        }
        let world = layout.geometry().world_rect();
        let dt = config.dt();
        // Held inputs whose gap did not fill in time are applied anyway.
        let expired_before = TickId(tick.0.saturating_sub(config.input_reorder_ticks));
        for e in self.entities.iter_mut() {
            if e.pending_inputs.is_empty() {
                continue;
            }
            let mut cx = game_context!(self, world, tick, dt, ids);
            Self::apply_ready(
                game,
                &mut cx,
                e,
                &mut intents,
                &mut self.counters,
                Some(expired_before),
            );
        }
        self.intent_queue
            .extend(intents.into_iter().map(|i| (i, 0)));
        self.remove_silent_players(config, tick);
    }

    /// Players whose client was not heard for `player_linger_ticks` lost
    /// their session without a leave (their gateway died and they did not
    /// resume elsewhere): removed, as a leave would. Checked every
    /// [`LINGER_CHECK_EVERY`] ticks: the bound is loose by that much.
    fn remove_silent_players(&mut self, config: &WorldConfig, tick: TickId) {
        let linger = config.player_linger_ticks;
        if linger == 0 || tick.0 % LINGER_CHECK_EVERY != 0 || tick.0 < linger {
            return;
        }
        let cutoff = TickId(tick.0 - linger);
        let silent: Vec<(EntityId, Option<ClientId>, TickId)> = self
            .entities
            .iter()
            .filter(|e| e.client.is_some() && e.heard < cutoff)
            .map(|e| (e.id, e.client, e.heard))
            .collect();
        for (id, client, heard) in silent {
            self.entities.remove(id);
            self.ghost_sender.forget(id);
            let _ = self.jobs.take_for(id);
            self.counters.leaves += 1;
            self.counters.players_lingered_out += 1;
            tracing::info!(cell = %self.id, entity = %id, client = ?client, heard = heard.0, tick = tick.0, "player removed: its client went silent (session lost, not resumed)");
        }
    }

    /// The Welcome of a join or a resume, for `client`.
    #[allow(clippy::too_many_arguments)]
    fn welcome(
        &self,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
        client: ClientId,
        entity: EntityId,
        pos: Vec2,
        resume_key: u64,
    ) -> Out<G> {
        let welcome = tessera_schema::server::Welcome {
            entity: entity.0,
            world: self.id.world,
            tick: tick.0,
            tick_hz: config.tick_hz as u16,
            aoi_radius_cm: (config.view.radius * 100.0) as u32,
            cell_size_cm: (layout.geometry().cell_size * 100.0) as u32,
            position: tessera_schema::quant::qvec(pos.x, pos.y),
            resume_key,
        };
        let mut fbb = tessera_schema::flatbuffers::FlatBufferBuilder::with_capacity(128);
        let bytes = tessera_schema::server::encode(
            &mut fbb,
            &tessera_schema::server::ServerMessage::Welcome(welcome),
        )
        .to_vec();
        Output::Client(ClientOutput {
            client,
            entity,
            cell: self.id,
            tick,
            kind: ClientOutputKind::Welcome,
            bytes,
        })
    }

    fn refuse_resume(&mut self, client: ClientId, entity: EntityId, tick: TickId, why: &str) {
        self.counters.resumes_refused += 1;
        tracing::info!(cell = %self.id, %entity, %client, tick = tick.0, why, "resume refused");
        let mut fbb = tessera_schema::flatbuffers::FlatBufferBuilder::with_capacity(96);
        let bytes = tessera_schema::server::encode(
            &mut fbb,
            &tessera_schema::server::ServerMessage::Error {
                code: tessera_schema::server::ErrorCode::ResumeRefused,
                message: format!("resume refused: {why}"),
            },
        )
        .to_vec();
        self.output_queue.push(Output::Client(ClientOutput {
            client,
            entity,
            cell: self.id,
            tick,
            kind: ClientOutputKind::Refused,
            bytes,
        }));
    }

    fn apply_one(
        game: &mut G,
        cx: &mut GameContext<'_>,
        e: &mut Entity<G::Components>,
        input: &tessera_schema::client::InputCmd,
        intents: &mut Vec<G::Intent>,
        counters: &mut CellCounters,
    ) {
        e.last_input_seq = input.input_seq;
        counters.inputs += 1;
        game.apply_input(cx, e, input, intents);
    }

    /// Applies held inputs that are next in sequence; with `expired_before`,
    /// also the ones that waited since before that tick (skipping the gap).
    fn apply_ready(
        game: &mut G,
        cx: &mut GameContext<'_>,
        e: &mut Entity<G::Components>,
        intents: &mut Vec<G::Intent>,
        counters: &mut CellCounters,
        expired_before: Option<TickId>,
    ) {
        while let Some(&(seq, arrived, _)) = e.pending_inputs.first() {
            let next = seq == e.last_input_seq + 1;
            let expired = expired_before.is_some_and(|t| arrived <= t);
            if seq <= e.last_input_seq {
                e.pending_inputs.remove(0);
                counters.inputs_duplicate += 1;
                continue;
            }
            if !next && !expired {
                break;
            }
            if !next {
                counters.inputs_gap_skipped += 1;
            }
            let (_, _, input) = e.pending_inputs.remove(0);
            Self::apply_one(game, cx, e, &input, intents, counters);
        }
    }

    fn hold_orphan(&mut self, msg: Msg<G>) {
        if self.orphans.len() >= ORPHANS_MAX {
            self.counters.unknown_entity += 1;
            return;
        }
        self.counters.orphans_held += 1;
        self.orphans.push((self.tick, msg));
    }

    fn forward(&mut self, entity: EntityId, config: &WorldConfig, mut msg: Msg<G>) {
        let hops = match &msg {
            CellMessage::Input { hops, .. }
            | CellMessage::Ack { hops, .. }
            | CellMessage::Leave { hops, .. }
            | CellMessage::Resume { hops, .. }
            | CellMessage::Intent { hops, .. } => *hops,
            _ => 0,
        };
        match self.forwards.get(&entity) {
            // The message already followed a newer departure than ours: the
            // entity left here, went there, and is on its way back (its
            // transfer is still in flight). Wait for it here.
            Some(&(_, until)) if departure(until, config) < after_of(&msg) => {
                self.counters.inputs_awaited += 1;
                self.hold_orphan(msg);
            }
            Some(&(to, until)) if hops <= config.max_hops => {
                if matches!(msg, CellMessage::Input { .. }) {
                    self.counters.inputs_forwarded += 1;
                }
                let left = departure(until, config);
                if let CellMessage::Input { after, .. }
                | CellMessage::Ack { after, .. }
                | CellMessage::Leave { after, .. }
                | CellMessage::Resume { after, .. } = &mut msg
                {
                    *after = (*after).max(left);
                }
                self.send(to, msg);
            }
            Some(_) if matches!(msg, CellMessage::Intent { .. }) => {
                self.counters.intents_dropped += 1
            }
            Some(_) => self.counters.hops_exceeded += 1,
            None => self.hold_orphan(msg),
        }
    }

    /// Takes in an entity handed over by another cell. A copy sent again
    /// after a restore is taken only if this cell neither owns the entity,
    /// nor has it waiting, nor saw it leave at or after its departure.
    pub fn accept_transfer(&mut self, t: Transfer<G>, config: &WorldConfig) {
        let id = t.entity.id;
        if t.resent {
            let departed = t.departed;
            let left_since = self
                .forwards
                .get(&id)
                .is_some_and(|&(_, until)| departure(until, config) >= departed);
            if self.entities.contains(id) || left_since || self.awaits(id) {
                self.counters.transfers_resent_known += 1;
                return;
            }
            self.counters.transfers_resent_taken += 1;
            tracing::info!(cell = %self.id, entity = %id, departed = departed.0, "entity restored from a transfer sent again");
        }
        if self.entities.contains(id) {
            self.counters.transfers_duplicate += 1;
            tracing::warn!(cell = %self.id, entity = %id, "transfer of an entity already owned here refused");
            return;
        }
        self.ghosts.remove(id);
        self.forwards.remove(&id);
        // It came back: the copy kept of its departure is moot.
        self.retained.retain(|r| r.transfer.entity.id != id);
        let mut t = t;
        t.resent = false;
        let q = QState::of(&t.entity, G::stats(&t.entity.game));
        self.ghost_sender
            .adopt(self.id, &t.ghost_holders, id, t.entity.version, q);
        for job in t.jobs {
            self.jobs.schedule(job);
        }
        let _ = self.entities.insert(t.entity);
        self.counters.transfers_in += 1;
    }

    /// Spawns an entity directly (NPCs, tests).
    pub fn spawn(&mut self, e: Entity<G::Components>) -> bool {
        self.entities.insert(e).is_ok()
    }

    /// Step 3: runs due jobs, the game's systems, integrates velocities and
    /// hands every entity that left the cell to the leaf it is in now.
    pub fn simulate(
        &mut self,
        game: &mut G,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
        ids: &mut IdAllocator,
    ) -> Vec<(CellId, Transfer<G>)> {
        let world = layout.geometry().world_rect();
        let dt = config.dt();
        let mut due = Vec::new();
        self.jobs.take_due(tick, &mut due);
        let mut intents = Vec::new();
        {
            let mut cx = game_context!(self, world, tick, dt, ids);
            for job in due {
                if let Some(e) = self.entities.get_mut(job.entity) {
                    game.run_job(&mut cx, e, job.kind);
                }
            }
            game.simulate(&mut cx, &mut self.entities, &mut intents);
        }
        self.intent_queue
            .extend(intents.into_iter().map(|i| (i, 0)));
        let mut leaving = Vec::new();
        for e in self.entities.iter_mut() {
            if e.vel.is_finite() {
                e.pos += e.vel * dt;
            }
            if !e.pos.is_finite() {
                e.pos = self.bounds.center();
            }
            e.pos = world.clamp(e.pos);
            if !self.bounds.contains(e.pos) {
                leaving.push(e.id);
            }
        }
        let mut out = Vec::with_capacity(leaving.len());
        for id in leaving {
            let pos = self.entities.get(id).map(|e| e.pos).unwrap_or_default();
            let Some(dest) = layout.leaf_at(pos) else {
                continue;
            };
            if dest == self.id {
                continue;
            }
            if let Some(t) = self.transfer_out(id, dest, config, layout, tick) {
                out.push((dest, t));
            }
        }
        out
    }

    /// Removes an entity and builds its transfer to `dest`: neighbours keep
    /// ghosts where the new owner will update them, this cell keeps a ghost
    /// if it is still close, and a forward pointer catches late inputs.
    pub fn transfer_out(
        &mut self,
        id: EntityId,
        dest: CellId,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
    ) -> Option<Transfer<G>> {
        let mut e = self.entities.remove(id)?;
        e.version += 1;
        let q = QState::of(&e, G::stats(&e.game));
        self.near.clear();
        layout.leaves_near(e.pos, config.view.leave_radius(), &mut self.near);
        // Subscribers keep their ghost too (a handover entry, not a leave
        // and a later enter: a locked target does not blink at a border).
        let targets: FxHashSet<CellId> = self
            .near
            .iter()
            .copied()
            .chain(e.subscribers.iter().map(|s| s.0))
            .filter(|c| *c != dest)
            .collect();
        let mut holders = self
            .ghost_sender
            .hand_over(self.id, id, dest, e.version, q, &targets);
        if targets.contains(&self.id) {
            self.ghosts.insert_local(
                id,
                Ghost {
                    owner: dest,
                    version: e.version,
                    state: q,
                },
            );
            holders.push(self.id);
        }
        holders.sort();
        self.forwards
            .insert(id, (dest, TickId(tick.0 + config.forward_ticks)));
        self.counters.transfers_out += 1;
        tracing::trace!(cell = %self.id, entity = %id, to = %dest, tick = tick.0, version = e.version, "entity transfer");
        let jobs = self.jobs.take_for(id);
        Some(EntityTransfer {
            entity: e,
            jobs,
            ghost_holders: holders,
            departed: tick,
            resent: false,
        })
    }

    /// Step 4: consumes the IntentQueue: intents about owned entities are
    /// applied; intents about ghosts go to their owner; about entities that
    /// moved, to where they went.
    pub fn consume_intents(
        &mut self,
        game: &mut G,
        config: &WorldConfig,
        layout: &Layout,
        tick: TickId,
        ids: &mut IdAllocator,
    ) {
        let world = layout.geometry().world_rect();
        let dt = config.dt();
        for (intent, hops) in std::mem::take(&mut self.intent_queue) {
            let target = G::intent_target(&intent);
            if let Some(e) = self.entities.get_mut(target) {
                let mut cx = game_context!(self, world, tick, dt, ids);
                game.apply_intent(&mut cx, e, &intent);
                self.counters.intents_applied += 1;
            } else if let Some(g) = self.ghosts.get(target) {
                if hops > config.max_hops {
                    // A game action on an entity that kept moving away
                    // (stale ghosts and forward pointers sent it back and
                    // forth): dropped and counted, like a missed swing.
                    self.counters.intents_dropped += 1;
                    continue;
                }
                let owner = g.owner;
                self.counters.intents_routed += 1;
                self.send(
                    owner,
                    CellMessage::Intent {
                        intent,
                        hops: hops.saturating_add(1),
                    },
                );
            } else if self.forwards.contains_key(&target) {
                self.counters.intents_routed += 1;
                self.forward(
                    target,
                    config,
                    CellMessage::Intent {
                        intent,
                        hops: hops.saturating_add(1),
                    },
                );
            } else {
                self.counters.intents_dropped += 1;
            }
        }
    }

    /// Step 5a: ghost changes for every neighbour, in cell order.
    pub fn ghost_round(
        &mut self,
        config: &WorldConfig,
        layout: &Layout,
    ) -> Vec<(CellId, GhostUpdate)> {
        let g = config.view.leave_radius();
        let inner = Rect::new(
            Vec2::new(self.bounds.min.x + g, self.bounds.min.y + g),
            Vec2::new(self.bounds.max.x - g, self.bounds.max.y - g),
        );
        self.ghost_sender.begin();
        let tick = self.tick;
        for e in self.entities.iter_mut() {
            e.expire_interest(tick);
            self.near.clear();
            // Far from every border, no neighbour can see it; subscribers
            // get it anyway.
            if !inner.contains(e.pos) {
                layout.leaves_near(e.pos, g, &mut self.near);
            }
            if self.near.len() <= 1 && e.subscribers.is_empty() {
                continue;
            }
            let q = QState::of(e, G::stats(&e.game));
            for &target in &self.near {
                if target != self.id {
                    self.ghost_sender.offer(self.id, target, e.id, e.version, q);
                }
            }
            for &(subscriber, _) in &e.subscribers {
                // A subscriber cell merged since it asked: its leaf now.
                let mut target = subscriber;
                while !layout.is_leaf(target) && !layout.is_split(target) {
                    match target.parent() {
                        Some(p) => target = p,
                        None => break,
                    }
                }
                if target != self.id && !self.near.contains(&target) {
                    self.ghost_sender.offer(self.id, target, e.id, e.version, q);
                }
            }
        }
        self.renew_subscriptions(tick);
        let out = self.ghost_sender.finish();
        self.counters.ghost_updates += out.len() as u64;
        out
    }

    /// Interests of this cell's entities in entities it does not own: every
    /// [`SUBSCRIBE_EVERY`] ticks (staggered by target), a subscription goes
    /// to the owner the target's ghost names, for the interest's remaining
    /// time plus a margin (a push follows; nothing is pulled within a tick).
    /// A target that is neither owned here nor a ghost here is out of reach
    /// until it comes back within distance.
    fn renew_subscriptions(&mut self, tick: TickId) {
        let mut asked: Vec<EntityId> = Vec::new();
        for e in self.entities.iter() {
            for &(target, until) in &e.interests {
                if (tick.0 + target.0) % SUBSCRIBE_EVERY != 0
                    || asked.contains(&target)
                    || self.entities.contains(target)
                {
                    continue;
                }
                let Some(owner) = self.ghosts.get(target).map(|g| g.owner) else {
                    continue;
                };
                asked.push(target);
                self.output_queue.push(Output::Cell(CellEnvelope {
                    to: owner,
                    from: self.id,
                    msg: CellMessage::Subscribe {
                        entity: target,
                        subscriber: self.id,
                        until: TickId(until.0.saturating_add(2 * SUBSCRIBE_EVERY)),
                        hops: 0,
                    },
                }));
            }
        }
    }

    /// Applies ghost changes from a neighbour right away (same shard).
    pub fn apply_ghosts(&mut self, update: &GhostUpdate, tick: TickId) {
        let entities = &self.entities;
        self.ghosts.apply(update, tick, |id| entities.contains(id));
    }

    /// Step 5b: every player's view and snapshot.
    ///
    /// `departing` are avatars that left this cell this tick for a cell that
    /// will only take them at its next tick (another shard, or a frozen
    /// cell): their snapshot of this tick is built here, from this cell's
    /// entities and ghosts, so that their clients see no extra gap while the
    /// entity is in flight. Their view state travels on with the transfer,
    /// and the snapshot names the destination cell (where the avatar now
    /// lives), so that the client's inputs follow it there.
    pub fn view_round(
        &mut self,
        config: &WorldConfig,
        tick: TickId,
        departing: &mut [(CellId, Transfer<G>)],
    ) {
        let view: &ViewConfig = &config.view;
        if !self.entities.iter().any(|e| e.view.is_some())
            && !departing.iter().any(|(_, t)| t.entity.view.is_some())
        {
            return;
        }
        self.aoi.clear();
        for e in self.entities.iter() {
            self.aoi.push(e.id, QState::of(e, G::stats(&e.game)), e.pos);
        }
        // A departing entity still close to this cell left a ghost of
        // itself here (the same state): index it once.
        for (_, t) in departing
            .iter()
            .filter(|(_, t)| self.ghosts.get(t.entity.id).is_none())
        {
            let e = &t.entity;
            self.aoi.push(e.id, QState::of(e, G::stats(&e.game)), e.pos);
        }
        for (id, g) in self.ghosts.iter() {
            self.aoi.push(id, g.state, g.state.position());
        }
        self.aoi
            .build(self.bounds.expand(view.leave_radius()), config.bucket);
        let here = self.id;
        let departing = departing.iter_mut().map(|(to, t)| (*to, &mut t.entity));
        for (_, e) in self.entities.iter_mut().map(|e| (here, e)).chain(departing) {
            let Some(v) = e.view.as_mut() else { continue };
            if v.latest_sent().is_some_and(|s| s.tick >= tick) {
                // The avatar arrived from a cell that already sent this
                // tick's snapshot (its owner ran the tick first): the
                // client gets the next one, never two with one tick id.
                continue;
            }
            self.accepted.clear();
            self.aoi
                .members_of(e.pos, v.members(), view, &mut self.accepted);
            // Entities of interest are members wherever they are, first in
            // priority (distance 0: the byte cap and the member cap keep
            // them).
            for &(target, until) in &e.interests {
                if until < tick {
                    continue;
                }
                if let Some(i) = self.aoi.index_of(target) {
                    if let Some(a) = self.accepted.iter_mut().find(|a| a.1 == i) {
                        a.0 = 0;
                    } else {
                        self.accepted.push((0, i));
                    }
                }
            }
            let (bytes, stats) = v.update(
                view,
                tick,
                e.id,
                e.last_input_seq,
                &self.aoi,
                &mut self.accepted,
                &self.events,
                &mut self.scratch,
            );
            self.counters.snapshots += 1;
            self.counters.snapshot_bytes += stats.bytes as u64;
            self.counters.snapshot_deferred += stats.deferred as u64;
            self.output_queue.push(Output::Client(ClientOutput {
                client: v.client,
                entity: e.id,
                cell: self.id,
                tick,
                kind: ClientOutputKind::Snapshot,
                bytes,
            }));
        }
    }

    /// The client controlling `entity`, if owned here.
    pub fn client_of(&self, entity: EntityId) -> Option<ClientId> {
        self.entities.get(entity).and_then(|e| e.client)
    }

    /// Where an entity that left this cell went (while remembered).
    pub fn forwarded_to(&self, entity: EntityId) -> Option<CellId> {
        self.forwards.get(&entity).map(|(c, _)| *c)
    }

    /// Schedules a job directly (tests).
    pub fn schedule(&mut self, job: Job) {
        self.jobs.schedule(job);
    }
}

/// When an entity left a cell, from its forward pointer's expiry.
fn departure(until: TickId, config: &WorldConfig) -> TickId {
    TickId(until.0.saturating_sub(config.forward_ticks))
}

/// The newest departure a forwarded message followed (0: none).
fn after_of<C, I>(msg: &CellMessage<C, I>) -> TickId {
    match msg {
        CellMessage::Input { after, .. }
        | CellMessage::Ack { after, .. }
        | CellMessage::Leave { after, .. }
        | CellMessage::Resume { after, .. } => *after,
        _ => TickId(0),
    }
}

/// The persistent state of a cell: everything a handover must carry (the
/// per-tick scratch is rebuilt).
pub struct CellState<G: GameLogic> {
    /// The cell.
    pub id: CellId,
    /// Its entities.
    pub entities: EntityStore<G::Components>,
    /// Its ghosts.
    pub ghosts: GhostTable,
    pub(crate) ghost_sender: GhostSender,
    /// Messages waiting (during a freeze: the buffered inputs).
    pub input_queue: Vec<Msg<G>>,
    pub(crate) intent_queue: Vec<(G::Intent, u8)>,
    pub(crate) jobs: SimulationQueue,
    pub(crate) forwards: FxHashMap<EntityId, (CellId, TickId)>,
    pub(crate) orphans: Vec<(TickId, Msg<G>)>,
    pub(crate) retained: Vec<Retained<G>>,
    pub(crate) rng: Rng,
    pub(crate) counters: CellCounters,
    pub(crate) game_counters: GameCounters,
}

/// A transfer to another shard, kept after it left.
pub struct Retained<G: GameLogic> {
    /// When the entity departed.
    pub departed: TickId,
    /// The cell it was sent to.
    pub to: CellId,
    /// The shard that sent it (if that shard is lost, the transfer may
    /// have been lost with it).
    pub sent_by: ShardRef,
    /// A copy of the transfer.
    pub transfer: Transfer<G>,
}

impl<G: GameLogic> Clone for Retained<G> {
    fn clone(&self) -> Self {
        Self {
            departed: self.departed,
            to: self.to,
            sent_by: self.sent_by,
            transfer: self.transfer.clone(),
        }
    }
}

impl<G: GameLogic> PartialEq for Retained<G> {
    fn eq(&self, o: &Self) -> bool {
        self.departed == o.departed
            && self.to == o.to
            && self.sent_by == o.sent_by
            && self.transfer == o.transfer
    }
}

impl<G: GameLogic> Clone for CellState<G> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            entities: self.entities.clone(),
            ghosts: self.ghosts.clone(),
            ghost_sender: self.ghost_sender.clone(),
            input_queue: self.input_queue.clone(),
            intent_queue: self.intent_queue.clone(),
            jobs: self.jobs.clone(),
            forwards: self.forwards.clone(),
            orphans: self.orphans.clone(),
            retained: self.retained.clone(),
            rng: self.rng.clone(),
            counters: self.counters,
            game_counters: self.game_counters,
        }
    }
}

/// Equal states: same entities (in any storage order: a diff re-inserts
/// the ones it changed), same queues, same scheduled jobs (in any heap
/// order), same ghosts, counters and generator.
impl<G: GameLogic> PartialEq for CellState<G> {
    fn eq(&self, o: &Self) -> bool {
        let jobs = |q: &SimulationQueue| {
            let mut v: Vec<Job> = q.heap.iter().copied().collect();
            v.sort_by_key(|j| (j.due, j.entity, j.kind));
            v
        };
        fn entities<C>(s: &EntityStore<C>) -> Vec<&Entity<C>> {
            let mut v: Vec<_> = s.iter().collect();
            v.sort_by_key(|e| e.id);
            v
        }
        self.id == o.id
            && entities(&self.entities) == entities(&o.entities)
            && self.ghosts == o.ghosts
            && self.ghost_sender == o.ghost_sender
            && self.input_queue == o.input_queue
            && self.intent_queue == o.intent_queue
            && jobs(&self.jobs) == jobs(&o.jobs)
            && self.forwards == o.forwards
            && self.orphans == o.orphans
            && self.retained == o.retained
            && self.rng == o.rng
            && self.counters == o.counters
            && self.game_counters == o.game_counters
    }
}

impl<G: GameLogic> std::fmt::Debug for CellState<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellState")
            .field("id", &self.id)
            .field("entities", &self.entities.len())
            .field("ghosts", &self.ghosts.len())
            .field("input_queue", &self.input_queue.len())
            .field("orphans", &self.orphans.len())
            .finish_non_exhaustive()
    }
}

/// What changed in a cell since a [`CellState`] was taken: the entities
/// that changed or appeared, the ones that went, and the rest of the state
/// whole (small next to the entities).
pub struct CellDiff<G: GameLogic> {
    /// Entities new or different since the base.
    pub changed: Vec<Entity<G::Components>>,
    /// Entities gone since the base.
    pub removed: Vec<EntityId>,
    /// Everything else, current (its entity store is empty).
    pub rest: CellState<G>,
}

/// Entities inside transfers in a list of messages.
pub fn queued_transfer_ids<C, I>(
    queue: &[CellMessage<C, I>],
) -> impl Iterator<Item = EntityId> + '_ {
    queue.iter().filter_map(|m| match m {
        CellMessage::Transfer(t) => Some(t.entity.id),
        _ => None,
    })
}

impl<G: GameLogic> CellState<G> {
    /// Applies a diff taken against this state: afterwards the state equals
    /// the cell the diff was taken from.
    pub fn apply(&mut self, diff: CellDiff<G>) {
        for id in diff.removed {
            self.entities.remove(id);
        }
        for e in diff.changed {
            self.entities.remove(e.id);
            let _ = self.entities.insert(e);
        }
        let entities = std::mem::take(&mut self.entities);
        *self = CellState {
            entities,
            ..diff.rest
        };
    }

    /// Entities in the state.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }
}

impl<G: GameLogic> Cell<G> {
    /// A copy of the persistent state (a handover's pre-copy).
    pub fn state(&self) -> CellState<G> {
        CellState {
            id: self.id,
            entities: self.entities.clone(),
            ghosts: self.ghosts.clone(),
            ghost_sender: self.ghost_sender.clone(),
            input_queue: self.input_queue.clone(),
            intent_queue: self.intent_queue.clone(),
            jobs: self.jobs.clone(),
            forwards: self.forwards.clone(),
            orphans: self.orphans.clone(),
            retained: self.retained.clone(),
            rng: self.rng.clone(),
            counters: self.counters,
            game_counters: self.game_counters,
        }
    }

    /// The persistent state, moved out.
    pub fn into_state(self) -> CellState<G> {
        CellState {
            id: self.id,
            entities: self.entities,
            ghosts: self.ghosts,
            ghost_sender: self.ghost_sender,
            input_queue: self.input_queue,
            intent_queue: self.intent_queue,
            jobs: self.jobs,
            forwards: self.forwards,
            orphans: self.orphans,
            retained: self.retained,
            rng: self.rng,
            counters: self.counters,
            game_counters: self.game_counters,
        }
    }

    /// A cell rebuilt from its persistent state.
    pub fn from_state(state: CellState<G>, layout: &Layout) -> Self {
        let mut c = Cell::new(state.id, layout, 0);
        c.entities = state.entities;
        c.ghosts = state.ghosts;
        c.ghost_sender = state.ghost_sender;
        c.input_queue = state.input_queue;
        c.intent_queue = state.intent_queue;
        c.jobs = state.jobs;
        c.forwards = state.forwards;
        c.orphans = state.orphans;
        c.retained = state.retained;
        c.rng = state.rng;
        c.counters = state.counters;
        c.game_counters = state.game_counters;
        c
    }

    /// What changed since `base` (taken from this cell earlier).
    pub fn diff(&self, base: &CellState<G>) -> CellDiff<G> {
        let changed = self
            .entities
            .iter()
            .filter(|e| base.entities.get(e.id) != Some(e))
            .cloned()
            .collect();
        let removed = base
            .entities
            .iter()
            .map(|e| e.id)
            .filter(|id| !self.entities.contains(*id))
            .collect();
        let mut rest = self.state();
        rest.entities = EntityStore::new();
        CellDiff {
            changed,
            removed,
            rest,
        }
    }

    /// Entities inside transfers waiting in the InputQueue (checkers).
    pub fn queued_transfers(&self) -> impl Iterator<Item = EntityId> + '_ {
        queued_transfer_ids(&self.input_queue)
    }

    /// Takes the messages waiting in the InputQueue (a frozen cell's
    /// buffered inputs).
    pub fn take_inputs(&mut self) -> Vec<Msg<G>> {
        std::mem::take(&mut self.input_queue)
    }

    /// Puts messages back in front of the InputQueue (an aborted handover
    /// returns what it had taken).
    pub fn restore_inputs(&mut self, mut msgs: Vec<Msg<G>>) {
        msgs.append(&mut self.input_queue);
        self.input_queue = msgs;
    }

    /// The layout changed: stop sending ghosts to cells that are no longer
    /// leaves.
    pub fn retarget(&mut self, layout: &Layout) {
        self.ghost_sender.retarget(layout);
        self.bounds = layout.geometry().bounds(self.id);
    }

    /// True if this cell owns the entity or remembers where it went.
    pub fn knows(&self, entity: EntityId) -> bool {
        self.entities.contains(entity) || self.forwards.contains_key(&entity)
    }

    /// True if this cell remembers the entity leaving after the newest
    /// departure `msg` already followed: forwarding it from here leads on,
    /// not back (an older pointer means the entity is on its way back).
    pub fn points_onward(&self, entity: EntityId, msg: &Msg<G>, config: &WorldConfig) -> bool {
        self.forwards
            .get(&entity)
            .is_some_and(|&(_, until)| departure(until, config) >= after_of(msg))
    }

    /// True if the entity's transfer waits in this cell's InputQueue.
    pub fn awaits(&self, entity: EntityId) -> bool {
        self.queued_transfers().any(|e| e == entity)
    }

    /// Splits this cell's state among `children` (leaves of `layout`):
    /// entities by position (their version bumped: the owner cell changes),
    /// what neighbours hold of them, their jobs; ghosts inherited
    /// provisionally until `until`; forward pointers copied; waiting
    /// messages handed back to the caller for re-delivery.
    pub fn split_into(
        self,
        children: &[CellId],
        layout: &Layout,
        seed: u64,
        until: TickId,
    ) -> (Vec<Cell<G>>, Vec<Msg<G>>, Intents<G>) {
        let mut state = self.into_state();
        let mut out: Vec<Cell<G>> = children
            .iter()
            .map(|c| Cell::new(*c, layout, seed))
            .collect();
        let ids: Vec<EntityId> = state.entities.iter().map(|e| e.id).collect();
        for id in ids {
            let Some(mut e) = state.entities.remove(id) else {
                continue;
            };
            let k = out
                .iter()
                .position(|c| c.bounds.contains(e.pos))
                .unwrap_or(0);
            e.version += 1;
            for job in state.jobs.take_for(id) {
                out[k].jobs.schedule(job);
            }
            let _ = out[k].entities.insert(e);
        }
        for c in out.iter_mut() {
            let mine = &c.entities;
            c.ghost_sender = state.ghost_sender.take_where(|id| mine.contains(id));
            let owned = &c.entities;
            c.ghosts
                .inherit(&state.ghosts, until, |id| owned.contains(id));
            c.forwards = state.forwards.clone();
            c.counters = CellCounters::default();
        }
        if let Some(first) = out.first_mut() {
            first.retained = state.retained;
        }
        let mut inputs = state.input_queue;
        inputs.extend(state.orphans.into_iter().map(|(_, m)| m));
        (out, inputs, state.intent_queue)
    }

    /// Merges sibling cells into `parent` (a leaf of `layout`); the reverse
    /// of [`split_into`](Self::split_into).
    pub fn merge_from(
        parent: CellId,
        children: Vec<Cell<G>>,
        layout: &Layout,
        seed: u64,
        until: TickId,
    ) -> (Cell<G>, Vec<Msg<G>>, Intents<G>) {
        let mut p = Cell::new(parent, layout, seed);
        let mut inputs = Vec::new();
        let mut intents = Vec::new();
        let mut states: Vec<CellState<G>> = children.into_iter().map(|c| c.into_state()).collect();
        for s in states.iter_mut() {
            let ids: Vec<EntityId> = s.entities.iter().map(|e| e.id).collect();
            for id in ids {
                if let Some(mut e) = s.entities.remove(id) {
                    e.version += 1;
                    let _ = p.entities.insert(e);
                }
            }
        }
        for s in states {
            let owned = &p.entities;
            p.ghosts.inherit(&s.ghosts, until, |id| owned.contains(id));
            p.ghost_sender.absorb(s.ghost_sender);
            let mut jobs = Vec::new();
            let mut s_jobs = s.jobs;
            s_jobs.take_due(TickId(u64::MAX), &mut jobs);
            for job in jobs {
                p.jobs.schedule(job);
            }
            for (id, (to, until)) in s.forwards {
                // A pointer from one child to a sibling would now point from
                // the parent into itself: the entity is in the parent, or its
                // transfer is on its way here (its messages wait as orphans).
                if parent.contains_cell(to) || p.entities.contains(id) {
                    continue;
                }
                // Two children may remember the same entity: the newest
                // departure wins.
                let newer = p.forwards.get(&id).is_none_or(|(_, u)| *u < until);
                if newer {
                    p.forwards.insert(id, (to, until));
                }
            }
            inputs.extend(s.input_queue);
            inputs.extend(s.orphans.into_iter().map(|(_, m)| m));
            intents.extend(s.intent_queue);
            p.retained.extend(s.retained);
        }
        // Entities now owned by the parent may sit in its inherited ghosts.
        let owned: Vec<EntityId> = p.entities.iter().map(|e| e.id).collect();
        for id in owned {
            p.ghosts.remove(id);
        }
        (p, inputs, intents)
    }

    /// Keeps a copy of a transfer this cell sent to another shard.
    pub fn retain_transfer(
        &mut self,
        departed: TickId,
        to: CellId,
        sent_by: ShardRef,
        transfer: Transfer<G>,
    ) {
        self.retained.push(Retained {
            departed,
            to,
            sent_by,
            transfer,
        });
    }

    /// The transfers kept that `lost(sent_by, to)` says may be lost (their
    /// destination was restored from a replica, or their sender lost):
    /// copies marked as sent again.
    pub fn resend_for(
        &self,
        lost: impl Fn(ShardRef, CellId) -> bool,
    ) -> Vec<(CellId, Transfer<G>)> {
        self.retained
            .iter()
            .filter(|r| lost(r.sent_by, r.to))
            .map(|r| {
                let mut t = r.transfer.clone();
                t.resent = true;
                (r.to, t)
            })
            .collect()
    }

    /// Queues intents (re-delivered after a split or merge).
    pub fn push_intents(&mut self, intents: impl IntoIterator<Item = (G::Intent, u8)>) {
        self.intent_queue.extend(intents);
    }
}
