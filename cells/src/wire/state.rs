//! Entities, views, cell messages and whole cell states as FlatBuffers
//! tables (the parts every shard frame is built from).

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;
use tessera_schema::client::{ActionCmd, InputCmd};
use tessera_schema::flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, WIPOffset};
use tessera_schema::verify::FrameError;
use tessera_schema::wire;

use super::{cell_in, cell_out, finite, need, q_in, q_out, vec_in, vec_out};
use crate::cell::{CellCounters, CellState, Msg};
use crate::entity::{Entity, EntityStore, MAX_INTERESTS, MAX_SUBSCRIBERS};
use crate::game::{GameCounters, GameLogic, Job, SimulationQueue};
use crate::ghost::{Ghost, GhostChange, GhostEntry, GhostSender, GhostTable, GhostUpdate, Sent};
use crate::ids::{ClientId, EntityId, TickId};
use crate::messages::{CellMessage, EntityTransfer};
use crate::rng::Rng;
use crate::view::{ClientView, SentView};

type Fbb<'a> = FlatBufferBuilder<'a>;
type Tables<'a, T> = WIPOffset<Vector<'a, ForwardsUOffset<T>>>;

/// Most entries in any one list of a frame: far above a real cell, low
/// enough that a hostile length cannot make us allocate without bound
/// (the verifier already bounds the frame's size).
const LIST_MAX: usize = 1 << 20;

fn list<T>(
    len: usize,
    field: &'static str,
    f: impl FnMut(usize) -> Result<T, FrameError>,
) -> Result<Vec<T>, FrameError> {
    if len > LIST_MAX {
        return Err(FrameError::TooMany {
            field,
            len,
            max: LIST_MAX,
        });
    }
    (0..len).map(f).collect()
}

// ----- inputs -----

pub(crate) fn input_out<'a>(
    fbb: &mut Fbb<'a>,
    input: &InputCmd,
) -> WIPOffset<wire::InputCmdRec<'a>> {
    let actions: Vec<wire::Action> = input
        .actions
        .iter()
        .map(|a| match a {
            ActionCmd::Attack { target } => wire::Action::new(*target, wire::ActionKind::Attack),
        })
        .collect();
    let actions = fbb.create_vector(&actions);
    wire::InputCmdRec::create(
        fbb,
        &wire::InputCmdRecArgs {
            input_seq: input.input_seq,
            client_tick: input.client_tick,
            movement: Some(&wire::MoveInput::new(input.movement[0], input.movement[1])),
            heading: input.heading,
            actions: Some(actions),
        },
    )
}

/// Movement and heading stay raw (the game validates them, as it does for a
/// client's own frame); unknown action kinds are refused.
pub(crate) fn input_in(r: &wire::InputCmdRec) -> Result<InputCmd, FrameError> {
    let movement = r.movement().map(|m| [m.x(), m.y()]).unwrap_or_default();
    let mut actions = Vec::new();
    if let Some(list) = r.actions() {
        if list.len() > 64 {
            return Err(FrameError::TooMany {
                field: "actions",
                len: list.len(),
                max: 64,
            });
        }
        for a in list.iter() {
            match a.kind() {
                wire::ActionKind::None => {}
                wire::ActionKind::Attack => actions.push(ActionCmd::Attack { target: a.target() }),
                _ => return Err(FrameError::BadValue("actions.kind")),
            }
        }
    }
    Ok(InputCmd {
        input_seq: r.input_seq(),
        client_tick: r.client_tick(),
        movement,
        heading: r.heading(),
        actions,
    })
}

// ----- views and entities -----

fn view_out<'a>(fbb: &mut Fbb<'a>, v: &ClientView) -> WIPOffset<wire::ClientViewRec<'a>> {
    let members: Vec<u64> = v.members.iter().map(|e| e.0).collect();
    let members = fbb.create_vector(&members);
    let history: Vec<_> = v
        .history
        .iter()
        .map(|s| {
            let entries: Vec<wire::ViewEntry> = s
                .entries
                .iter()
                .map(|(id, q)| wire::ViewEntry::new(id.0, &q_out(q)))
                .collect();
            let entries = fbb.create_vector(&entries);
            wire::SentViewRec::create(
                fbb,
                &wire::SentViewRecArgs {
                    tick: s.tick.0,
                    entries: Some(entries),
                },
            )
        })
        .collect();
    let history = fbb.create_vector(&history);
    let included: Vec<wire::TickStamp> = v
        .last_included
        .iter()
        .map(|(id, t)| wire::TickStamp::new(id.0, t.0))
        .collect();
    let included = fbb.create_vector(&included);
    wire::ClientViewRec::create(
        fbb,
        &wire::ClientViewRecArgs {
            client: v.client.0,
            members: Some(members),
            history: Some(history),
            acked: v.acked.map(|t| t.0),
            last_included: Some(included),
        },
    )
}

fn view_in(r: &wire::ClientViewRec) -> Result<ClientView, FrameError> {
    // Membership and views are searched by bisection: keep them sorted and
    // unique whatever the sender wrote.
    let mut members: Vec<EntityId> = r
        .members()
        .map(|m| m.iter().map(EntityId).collect())
        .unwrap_or_default();
    members.sort_unstable();
    members.dedup();
    let mut history = VecDeque::new();
    if let Some(h) = r.history() {
        for s in list(h.len(), "view.history", |i| Ok(h.get(i)))? {
            let mut entries: Vec<(EntityId, crate::entity::QState)> = s
                .entries()
                .map(|e| {
                    e.iter()
                        .map(|v| (EntityId(v.id()), q_in(v.state())))
                        .collect()
                })
                .unwrap_or_default();
            entries.sort_unstable_by_key(|e| e.0);
            entries.dedup_by_key(|e| e.0);
            history.push_back(SentView {
                tick: TickId(s.tick()),
                entries,
            });
        }
    }
    let mut last_included = FxHashMap::default();
    if let Some(l) = r.last_included() {
        for s in l.iter() {
            last_included.insert(EntityId(s.id()), TickId(s.tick()));
        }
    }
    Ok(ClientView {
        client: ClientId(r.client()),
        members,
        history,
        acked: r.acked().map(TickId),
        last_included,
    })
}

pub(crate) fn entity_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    e: &Entity<G::Components>,
    scratch: &mut Vec<u8>,
) -> WIPOffset<wire::EntityRec<'a>> {
    let pending: Vec<_> = e
        .pending_inputs
        .iter()
        .map(|(seq, tick, input)| {
            let input = input_out(fbb, input);
            wire::PendingInputRec::create(
                fbb,
                &wire::PendingInputRecArgs {
                    seq: *seq,
                    tick: tick.0,
                    input: Some(input),
                },
            )
        })
        .collect();
    let pending = fbb.create_vector(&pending);
    scratch.clear();
    G::encode_components(&e.game, scratch);
    let game = fbb.create_vector(scratch);
    let view = e.view.as_deref().map(|v| view_out(fbb, v));
    let interests: Vec<_> = e
        .interests
        .iter()
        .map(|(id, t)| wire::TickStamp::new(id.0, t.0))
        .collect();
    let interests = fbb.create_vector(&interests);
    let subscribers: Vec<_> = e
        .subscribers
        .iter()
        .map(|(c, t)| wire::SubscriberRec::new(&cell_out(*c), t.0))
        .collect();
    let subscribers = fbb.create_vector(&subscribers);
    wire::EntityRec::create(
        fbb,
        &wire::EntityRecArgs {
            id: e.id.0,
            kind: e.kind.0,
            pos: Some(&vec_out(e.pos)),
            vel: Some(&vec_out(e.vel)),
            heading: e.heading,
            version: e.version,
            client: e.client.map(|c| c.0),
            last_input_seq: e.last_input_seq,
            pending: Some(pending),
            game: Some(game),
            view,
            interests: Some(interests),
            subscribers: Some(subscribers),
            resume_key: e.resume_key,
            heard: e.heard.0,
        },
    )
}

pub(crate) fn entity_in<G: GameLogic>(
    r: &wire::EntityRec,
) -> Result<Entity<G::Components>, FrameError> {
    let game = G::decode_components(r.game().map(|g| g.bytes()).unwrap_or_default())
        .ok_or(FrameError::BadValue("entity.game"))?;
    let mut pending_inputs = Vec::new();
    if let Some(p) = r.pending() {
        pending_inputs = list(p.len(), "entity.pending", |i| {
            let rec = p.get(i);
            let input = input_in(&need(rec.input(), "pending.input")?)?;
            Ok((rec.seq(), TickId(rec.tick()), input))
        })?;
    }
    Ok(Entity {
        id: EntityId(r.id()),
        kind: wire::EntityKind(r.kind()),
        pos: vec_in(need(r.pos(), "entity.pos")?, "entity.pos")?,
        vel: vec_in(need(r.vel(), "entity.vel")?, "entity.vel")?,
        heading: finite(r.heading(), "entity.heading")?,
        version: r.version(),
        client: r.client().map(ClientId),
        resume_key: r.resume_key(),
        heard: TickId(r.heard()),
        last_input_seq: r.last_input_seq(),
        pending_inputs,
        game,
        view: r.view().map(|v| view_in(&v)).transpose()?.map(Box::new),
        interests: bounded(
            r.interests().map(|v| {
                v.iter()
                    .map(|s| (EntityId(s.id()), TickId(s.tick())))
                    .collect()
            }),
            MAX_INTERESTS,
            "entity.interests",
        )?,
        subscribers: bounded(
            r.subscribers()
                .map(|v| {
                    v.iter()
                        .map(|s| Ok((cell_in(s.cell(), "entity.subscribers")?, TickId(s.until()))))
                        .collect::<Result<Vec<_>, FrameError>>()
                })
                .transpose()?,
            MAX_SUBSCRIBERS,
            "entity.subscribers",
        )?,
    })
}

/// A short list that must stay within its bound (the entity's own limits).
fn bounded<T>(v: Option<Vec<T>>, max: usize, field: &'static str) -> Result<Vec<T>, FrameError> {
    let v = v.unwrap_or_default();
    if v.len() > max {
        return Err(FrameError::TooMany {
            field,
            len: v.len(),
            max,
        });
    }
    Ok(v)
}

fn entities_out<'a, 'e, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    entities: impl Iterator<Item = &'e Entity<G::Components>>,
    scratch: &mut Vec<u8>,
) -> Tables<'a, wire::EntityRec<'a>> {
    let recs: Vec<_> = entities.map(|e| entity_out::<G>(fbb, e, scratch)).collect();
    fbb.create_vector(&recs)
}

fn entities_in<G: GameLogic>(
    v: Option<Vector<'_, ForwardsUOffset<wire::EntityRec<'_>>>>,
    field: &'static str,
) -> Result<Vec<Entity<G::Components>>, FrameError> {
    match v {
        Some(v) => list(v.len(), field, |i| entity_in::<G>(&v.get(i))),
        None => Ok(Vec::new()),
    }
}

fn jobs_out<'a, 'j>(
    fbb: &mut Fbb<'a>,
    jobs: impl Iterator<Item = &'j Job>,
) -> WIPOffset<Vector<'a, wire::JobRec>> {
    let recs: Vec<wire::JobRec> = jobs
        .map(|j| wire::JobRec::new(j.due.0, j.entity.0, j.kind))
        .collect();
    fbb.create_vector(&recs)
}

fn jobs_in(v: Option<Vector<'_, wire::JobRec>>) -> Vec<Job> {
    v.map(|v| {
        v.iter()
            .map(|j| Job {
                due: TickId(j.due()),
                entity: EntityId(j.entity()),
                kind: j.kind(),
            })
            .collect()
    })
    .unwrap_or_default()
}

// ----- ghosts -----

const MOVED: u8 = 1;
const TURNED: u8 = 2;
const STATS: u8 = 4;

fn ghost_entry_out(e: &GhostEntry) -> wire::GhostEntryRec {
    let (kind, fields, q) = match e.change {
        GhostChange::Enter(q) => (wire::GhostChangeKind::Enter, MOVED | TURNED | STATS, q),
        GhostChange::Update {
            moved,
            heading,
            stats,
        } => {
            let mut q = crate::entity::QState::default();
            let mut fields = 0;
            if let Some((pos, vel)) = moved {
                (q.pos, q.vel) = (pos, vel);
                fields |= MOVED;
            }
            if let Some(h) = heading {
                q.heading = h;
                fields |= TURNED;
            }
            if let Some((health, state)) = stats {
                (q.health, q.state) = (health, state);
                fields |= STATS;
            }
            (wire::GhostChangeKind::Update, fields, q)
        }
        GhostChange::Leave => (wire::GhostChangeKind::Leave, 0, Default::default()),
    };
    wire::GhostEntryRec::new(
        e.id.0,
        e.version,
        &cell_out(e.owner),
        kind,
        fields,
        &q_out(&q),
    )
}

fn ghost_entry_in(r: &wire::GhostEntryRec) -> Result<GhostEntry, FrameError> {
    let q = q_in(r.state());
    let fields = r.fields();
    let change = match r.change() {
        wire::GhostChangeKind::Enter => GhostChange::Enter(q),
        wire::GhostChangeKind::Update => {
            if fields & !(MOVED | TURNED | STATS) != 0 {
                return Err(FrameError::BadValue("ghost.fields"));
            }
            GhostChange::Update {
                moved: (fields & MOVED != 0).then_some((q.pos, q.vel)),
                heading: (fields & TURNED != 0).then_some(q.heading),
                stats: (fields & STATS != 0).then_some((q.health, q.state)),
            }
        }
        wire::GhostChangeKind::Leave => GhostChange::Leave,
        _ => return Err(FrameError::BadValue("ghost.change")),
    };
    Ok(GhostEntry {
        id: EntityId(r.id()),
        version: r.version(),
        owner: cell_in(r.owner(), "ghost.owner")?,
        change,
    })
}

fn ghost_entries_out<'a>(
    fbb: &mut Fbb<'a>,
    entries: &[GhostEntry],
) -> WIPOffset<Vector<'a, wire::GhostEntryRec>> {
    let recs: Vec<_> = entries.iter().map(ghost_entry_out).collect();
    fbb.create_vector(&recs)
}

fn ghost_entries_in(
    v: Option<Vector<'_, wire::GhostEntryRec>>,
) -> Result<Vec<GhostEntry>, FrameError> {
    match v {
        Some(v) => list(v.len(), "ghost.entries", |i| ghost_entry_in(v.get(i))),
        None => Ok(Vec::new()),
    }
}

fn ghost_table_out<'a>(fbb: &mut Fbb<'a>, t: &GhostTable) -> WIPOffset<wire::GhostTableRec<'a>> {
    let ghosts: Vec<_> = t
        .ghosts
        .iter()
        .map(|(id, g)| wire::GhostRec::new(id.0, &cell_out(g.owner), g.version, &q_out(&g.state)))
        .collect();
    let ghosts = fbb.create_vector(&ghosts);
    let tombs: Vec<_> = t
        .tombstones
        .iter()
        .map(|(id, (v, tick))| wire::TombstoneRec::new(id.0, *v, tick.0))
        .collect();
    let tombs = fbb.create_vector(&tombs);
    let prov: Vec<_> = t
        .provisional
        .iter()
        .map(|(id, tick)| wire::TickStamp::new(id.0, tick.0))
        .collect();
    let prov = fbb.create_vector(&prov);
    wire::GhostTableRec::create(
        fbb,
        &wire::GhostTableRecArgs {
            ghosts: Some(ghosts),
            tombstones: Some(tombs),
            provisional: Some(prov),
            stale_ignored: t.counters.stale_ignored,
            orphan_updates: t.counters.orphan_updates,
            owned_ignored: t.counters.owned_ignored,
        },
    )
}

fn ghost_table_in(r: &wire::GhostTableRec) -> Result<GhostTable, FrameError> {
    let mut t = GhostTable::new();
    for g in r.ghosts().iter().flat_map(|v| v.iter()) {
        t.ghosts.insert(
            EntityId(g.id()),
            Ghost {
                owner: cell_in(g.owner(), "ghosts.owner")?,
                version: g.version(),
                state: q_in(g.state()),
            },
        );
    }
    for s in r.tombstones().iter().flat_map(|v| v.iter()) {
        t.tombstones
            .insert(EntityId(s.id()), (s.version(), TickId(s.tick())));
    }
    for s in r.provisional().iter().flat_map(|v| v.iter()) {
        t.provisional.insert(EntityId(s.id()), TickId(s.tick()));
    }
    t.counters.stale_ignored = r.stale_ignored();
    t.counters.orphan_updates = r.orphan_updates();
    t.counters.owned_ignored = r.owned_ignored();
    Ok(t)
}

fn ghost_sender_out<'a>(fbb: &mut Fbb<'a>, s: &GhostSender) -> WIPOffset<wire::GhostSenderRec<'a>> {
    let neighbours: Vec<_> = s.sent.keys().map(|c| cell_out(*c)).collect();
    let neighbours = fbb.create_vector(&neighbours);
    let mut sent = Vec::new();
    for (n, map) in &s.sent {
        for (id, x) in map {
            sent.push(wire::SentGhostRec::new(
                &cell_out(*n),
                id.0,
                x.version,
                &cell_out(x.owner),
                &q_out(&x.state),
                x.stamp,
            ));
        }
    }
    let sent = fbb.create_vector(&sent);
    let pending: Vec<_> = s
        .pending
        .iter()
        .map(|(to, entries)| {
            let entries = ghost_entries_out(fbb, entries);
            wire::PendingGhostsRec::create(
                fbb,
                &wire::PendingGhostsRecArgs {
                    to: Some(&cell_out(*to)),
                    entries: Some(entries),
                },
            )
        })
        .collect();
    let pending = fbb.create_vector(&pending);
    wire::GhostSenderRec::create(
        fbb,
        &wire::GhostSenderRecArgs {
            neighbours: Some(neighbours),
            sent: Some(sent),
            stamp: s.stamp,
            pending: Some(pending),
        },
    )
}

fn ghost_sender_in(r: &wire::GhostSenderRec) -> Result<GhostSender, FrameError> {
    let mut sent: BTreeMap<_, FxHashMap<_, _>> = BTreeMap::new();
    for n in r.neighbours().iter().flat_map(|v| v.iter()) {
        sent.insert(cell_in(n, "sender.neighbours")?, FxHashMap::default());
    }
    for x in r.sent().iter().flat_map(|v| v.iter()) {
        let n = cell_in(x.neighbour(), "sender.neighbour")?;
        let map = sent
            .get_mut(&n)
            .ok_or(FrameError::BadValue("sender.neighbour"))?;
        map.insert(
            EntityId(x.id()),
            Sent {
                version: x.version(),
                owner: cell_in(x.owner(), "sender.owner")?,
                state: q_in(x.state()),
                stamp: x.stamp(),
            },
        );
    }
    let mut pending = BTreeMap::new();
    if let Some(p) = r.pending() {
        for rec in p.iter() {
            let to = cell_in(need(rec.to(), "pending.to")?, "pending.to")?;
            pending.insert(to, ghost_entries_in(rec.entries())?);
        }
    }
    Ok(GhostSender {
        sent,
        stamp: r.stamp(),
        pending,
    })
}

// ----- cell messages -----

/// A cell message as a union value: (tag, table).
pub(crate) fn cell_msg_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    msg: &Msg<G>,
    scratch: &mut Vec<u8>,
) -> (
    wire::CellMsg,
    WIPOffset<tessera_schema::flatbuffers::UnionWIPOffset>,
) {
    match msg {
        CellMessage::Join {
            client,
            name,
            pos,
            resume_key,
        } => {
            let name = fbb.create_string(name);
            let t = wire::JoinMsg::create(
                fbb,
                &wire::JoinMsgArgs {
                    client: client.0,
                    name: Some(name),
                    pos: Some(&vec_out(*pos)),
                    resume_key: *resume_key,
                },
            );
            (wire::CellMsg::JoinMsg, t.as_union_value())
        }
        CellMessage::Input {
            client,
            entity,
            input,
            hops,
            after,
        } => {
            let input = input_out(fbb, input);
            let t = wire::InputMsg::create(
                fbb,
                &wire::InputMsgArgs {
                    client: client.0,
                    entity: entity.0,
                    input: Some(input),
                    hops: *hops,
                    after: after.0,
                },
            );
            (wire::CellMsg::InputMsg, t.as_union_value())
        }
        CellMessage::Ack {
            client,
            entity,
            tick,
            hops,
            after,
        } => {
            let t = wire::AckMsg::create(
                fbb,
                &wire::AckMsgArgs {
                    client: client.0,
                    entity: entity.0,
                    tick: tick.0,
                    hops: *hops,
                    after: after.0,
                },
            );
            (wire::CellMsg::AckMsg, t.as_union_value())
        }
        CellMessage::Leave {
            client,
            entity,
            hops,
            after,
        } => {
            let t = wire::LeaveMsg::create(
                fbb,
                &wire::LeaveMsgArgs {
                    client: client.0,
                    entity: entity.0,
                    hops: *hops,
                    after: after.0,
                },
            );
            (wire::CellMsg::LeaveMsg, t.as_union_value())
        }
        CellMessage::Resume {
            client,
            entity,
            key,
            hops,
            after,
        } => {
            let t = wire::ResumeMsg::create(
                fbb,
                &wire::ResumeMsgArgs {
                    client: client.0,
                    entity: entity.0,
                    key: *key,
                    hops: *hops,
                    after: after.0,
                },
            );
            (wire::CellMsg::ResumeMsg, t.as_union_value())
        }
        CellMessage::Ghost(update) => {
            let entries = ghost_entries_out(fbb, &update.entries);
            let t = wire::GhostMsg::create(
                fbb,
                &wire::GhostMsgArgs {
                    entries: Some(entries),
                },
            );
            (wire::CellMsg::GhostMsg, t.as_union_value())
        }
        CellMessage::Transfer(t) => {
            let entity = entity_out::<G>(fbb, &t.entity, scratch);
            let jobs = jobs_out(fbb, t.jobs.iter());
            let holders: Vec<_> = t.ghost_holders.iter().map(|c| cell_out(*c)).collect();
            let holders = fbb.create_vector(&holders);
            let t = wire::TransferMsg::create(
                fbb,
                &wire::TransferMsgArgs {
                    entity: Some(entity),
                    jobs: Some(jobs),
                    ghost_holders: Some(holders),
                    departed: t.departed.0,
                    resent: t.resent,
                },
            );
            (wire::CellMsg::TransferMsg, t.as_union_value())
        }
        CellMessage::Intent { intent, hops } => {
            let t = intent_out::<G>(fbb, intent, *hops, scratch);
            (wire::CellMsg::IntentMsg, t.as_union_value())
        }
        CellMessage::Subscribe {
            entity,
            subscriber,
            until,
            hops,
        } => {
            let t = wire::SubscribeMsg::create(
                fbb,
                &wire::SubscribeMsgArgs {
                    entity: entity.0,
                    subscriber: Some(&cell_out(*subscriber)),
                    until: until.0,
                    hops: *hops,
                },
            );
            (wire::CellMsg::SubscribeMsg, t.as_union_value())
        }
    }
}

fn intent_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    intent: &G::Intent,
    hops: u8,
    scratch: &mut Vec<u8>,
) -> WIPOffset<wire::IntentMsg<'a>> {
    scratch.clear();
    G::encode_intent(intent, scratch);
    let payload = fbb.create_vector(scratch);
    wire::IntentMsg::create(
        fbb,
        &wire::IntentMsgArgs {
            payload: Some(payload),
            hops,
        },
    )
}

fn intent_in<G: GameLogic>(r: &wire::IntentMsg) -> Result<(G::Intent, u8), FrameError> {
    let intent = G::decode_intent(r.payload().map(|p| p.bytes()).unwrap_or_default())
        .ok_or(FrameError::BadValue("intent.payload"))?;
    Ok((intent, r.hops()))
}

/// The members of a `CellMsg` union as its holder exposes them (the
/// generated accessors: only the one the tag names is `Some`).
pub(crate) struct CellMsgParts<'a> {
    pub(crate) tag: wire::CellMsg,
    pub(crate) join: Option<wire::JoinMsg<'a>>,
    pub(crate) input: Option<wire::InputMsg<'a>>,
    pub(crate) ack: Option<wire::AckMsg<'a>>,
    pub(crate) leave: Option<wire::LeaveMsg<'a>>,
    pub(crate) ghost: Option<wire::GhostMsg<'a>>,
    pub(crate) transfer: Option<wire::TransferMsg<'a>>,
    pub(crate) intent: Option<wire::IntentMsg<'a>>,
    pub(crate) subscribe: Option<wire::SubscribeMsg<'a>>,
    pub(crate) resume: Option<wire::ResumeMsg<'a>>,
}

/// The parts of any table holding a `msg: CellMsg` union.
macro_rules! cell_msg_parts {
    ($rec:expr) => {{
        let rec = &$rec;
        $crate::wire::state::CellMsgParts {
            tag: rec.msg_type(),
            join: rec.msg_as_join_msg(),
            input: rec.msg_as_input_msg(),
            ack: rec.msg_as_ack_msg(),
            leave: rec.msg_as_leave_msg(),
            ghost: rec.msg_as_ghost_msg(),
            transfer: rec.msg_as_transfer_msg(),
            intent: rec.msg_as_intent_msg(),
            subscribe: rec.msg_as_subscribe_msg(),
            resume: rec.msg_as_resume_msg(),
        }
    }};
}
pub(crate) use cell_msg_parts;

/// Reads a union value written by [`cell_msg_out`].
pub(crate) fn cell_msg_in<G: GameLogic>(p: CellMsgParts<'_>) -> Result<Msg<G>, FrameError> {
    let unknown = || FrameError::UnknownMessage {
        family: tessera_schema::verify::FrameFamily::Shard,
        tag: p.tag.0,
    };
    if let Some(m) = p.join {
        return Ok(CellMessage::Join {
            client: ClientId(m.client()),
            name: m.name().to_string(),
            pos: vec_in(need(m.pos(), "join.pos")?, "join.pos")?,
            resume_key: m.resume_key(),
        });
    }
    if let Some(m) = p.resume {
        return Ok(CellMessage::Resume {
            client: ClientId(m.client()),
            entity: EntityId(m.entity()),
            key: m.key(),
            hops: m.hops(),
            after: TickId(m.after()),
        });
    }
    if let Some(m) = p.input {
        return Ok(CellMessage::Input {
            client: ClientId(m.client()),
            entity: EntityId(m.entity()),
            input: input_in(&m.input())?,
            hops: m.hops(),
            after: TickId(m.after()),
        });
    }
    if let Some(m) = p.ack {
        return Ok(CellMessage::Ack {
            client: ClientId(m.client()),
            entity: EntityId(m.entity()),
            tick: TickId(m.tick()),
            hops: m.hops(),
            after: TickId(m.after()),
        });
    }
    if let Some(m) = p.leave {
        return Ok(CellMessage::Leave {
            client: ClientId(m.client()),
            entity: EntityId(m.entity()),
            hops: m.hops(),
            after: TickId(m.after()),
        });
    }
    if let Some(m) = p.ghost {
        return Ok(CellMessage::Ghost(GhostUpdate {
            entries: ghost_entries_in(m.entries())?,
        }));
    }
    if let Some(m) = p.transfer {
        let mut holders = Vec::new();
        for c in m.ghost_holders().iter().flat_map(|v| v.iter()) {
            holders.push(cell_in(c, "transfer.ghost_holders")?);
        }
        return Ok(CellMessage::Transfer(Box::new(EntityTransfer {
            entity: entity_in::<G>(&m.entity())?,
            jobs: jobs_in(m.jobs()),
            ghost_holders: holders,
            departed: TickId(m.departed()),
            resent: m.resent(),
        })));
    }
    if let Some(m) = p.intent {
        let (intent, hops) = intent_in::<G>(&m)?;
        return Ok(CellMessage::Intent { intent, hops });
    }
    if let Some(m) = p.subscribe {
        return Ok(CellMessage::Subscribe {
            entity: EntityId(m.entity()),
            subscriber: cell_in(
                need(m.subscriber(), "subscribe.subscriber")?,
                "subscribe.subscriber",
            )?,
            until: TickId(m.until()),
            hops: m.hops(),
        });
    }
    Err(unknown())
}

fn queued_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    tick: TickId,
    msg: &Msg<G>,
    scratch: &mut Vec<u8>,
) -> WIPOffset<wire::QueuedMsg<'a>> {
    let (tag, table) = cell_msg_out::<G>(fbb, msg, scratch);
    wire::QueuedMsg::create(
        fbb,
        &wire::QueuedMsgArgs {
            tick: tick.0,
            msg_type: tag,
            msg: Some(table),
        },
    )
}

fn queued_in<G: GameLogic>(
    v: Option<Vector<'_, ForwardsUOffset<wire::QueuedMsg<'_>>>>,
    field: &'static str,
) -> Result<Vec<(TickId, Msg<G>)>, FrameError> {
    match v {
        Some(v) => list(v.len(), field, |i| {
            let q = v.get(i);
            Ok((TickId(q.tick()), cell_msg_in::<G>(cell_msg_parts!(q))?))
        }),
        None => Ok(Vec::new()),
    }
}

// ----- whole cell state -----

fn counters_out(c: &CellCounters) -> wire::CellCountersRec {
    wire::CellCountersRec::new(
        c.inputs,
        c.inputs_forwarded,
        c.inputs_duplicate,
        c.inputs_held,
        c.inputs_gap_skipped,
        c.inputs_wrong_client,
        c.unknown_entity,
        c.inputs_awaited,
        c.orphans_held,
        c.hops_exceeded,
        c.intents_applied,
        c.intents_routed,
        c.intents_dropped,
        c.transfers_out,
        c.transfers_in,
        c.transfers_duplicate,
        c.joins,
        c.leaves,
        c.snapshots,
        c.snapshot_bytes,
        c.snapshot_deferred,
        c.ghost_updates,
        c.subscriptions,
        c.subscriptions_dropped,
        c.transfers_resent_known,
        c.transfers_resent_taken,
        c.resumes,
        c.resumes_refused,
        c.players_lingered_out,
    )
}

fn counters_in(c: &wire::CellCountersRec) -> CellCounters {
    CellCounters {
        inputs: c.inputs(),
        inputs_forwarded: c.inputs_forwarded(),
        inputs_duplicate: c.inputs_duplicate(),
        inputs_held: c.inputs_held(),
        inputs_gap_skipped: c.inputs_gap_skipped(),
        inputs_wrong_client: c.inputs_wrong_client(),
        unknown_entity: c.unknown_entity(),
        inputs_awaited: c.inputs_awaited(),
        orphans_held: c.orphans_held(),
        hops_exceeded: c.hops_exceeded(),
        intents_applied: c.intents_applied(),
        intents_routed: c.intents_routed(),
        intents_dropped: c.intents_dropped(),
        transfers_out: c.transfers_out(),
        transfers_in: c.transfers_in(),
        transfers_duplicate: c.transfers_duplicate(),
        joins: c.joins(),
        leaves: c.leaves(),
        snapshots: c.snapshots(),
        snapshot_bytes: c.snapshot_bytes(),
        snapshot_deferred: c.snapshot_deferred(),
        ghost_updates: c.ghost_updates(),
        subscriptions: c.subscriptions(),
        subscriptions_dropped: c.subscriptions_dropped(),
        transfers_resent_known: c.transfers_resent_known(),
        transfers_resent_taken: c.transfers_resent_taken(),
        resumes: c.resumes(),
        resumes_refused: c.resumes_refused(),
        players_lingered_out: c.players_lingered_out(),
    }
}

/// Transfers kept after they left (a cell's, or a shard's passing ones).
pub(crate) fn retained_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    kept: &[crate::cell::Retained<G>],
    scratch: &mut Vec<u8>,
) -> Tables<'a, wire::RetainedRec<'a>> {
    let recs: Vec<_> = kept
        .iter()
        .map(|r| {
            let msg = CellMessage::Transfer(Box::new(r.transfer.clone()));
            let sent = queued_out::<G>(fbb, r.departed, &msg, scratch);
            wire::RetainedRec::create(
                fbb,
                &wire::RetainedRecArgs {
                    to: Some(&cell_out(r.to)),
                    sent_by: Some(&super::shard_out(r.sent_by)),
                    sent: Some(sent),
                },
            )
        })
        .collect();
    fbb.create_vector(&recs)
}

pub(crate) fn retained_in<G: GameLogic>(
    v: Option<Vector<'_, ForwardsUOffset<wire::RetainedRec<'_>>>>,
    field: &'static str,
) -> Result<Vec<crate::cell::Retained<G>>, FrameError> {
    match v {
        Some(v) => list(v.len(), field, |i| {
            let rec = v.get(i);
            let q = rec.sent();
            let CellMessage::Transfer(t) = cell_msg_in::<G>(cell_msg_parts!(q))? else {
                return Err(FrameError::BadValue(field));
            };
            Ok(crate::cell::Retained {
                departed: TickId(q.tick()),
                to: cell_in(need(rec.to(), field)?, field)?,
                sent_by: super::shard_in(need(rec.sent_by(), field)?),
                transfer: *t,
            })
        }),
        None => Ok(Vec::new()),
    }
}

pub(crate) fn state_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    s: &CellState<G>,
    scratch: &mut Vec<u8>,
) -> WIPOffset<wire::CellStateRec<'a>> {
    let entities = entities_out::<G>(fbb, s.entities.iter(), scratch);
    let ghosts = ghost_table_out(fbb, &s.ghosts);
    let sender = ghost_sender_out(fbb, &s.ghost_sender);
    let inputs: Vec<_> = s
        .input_queue
        .iter()
        .map(|m| queued_out::<G>(fbb, TickId(0), m, scratch))
        .collect();
    let inputs = fbb.create_vector(&inputs);
    let intents: Vec<_> = s
        .intent_queue
        .iter()
        .map(|(i, hops)| intent_out::<G>(fbb, i, *hops, scratch))
        .collect();
    let intents = fbb.create_vector(&intents);
    let jobs = jobs_out(fbb, s.jobs.heap.iter());
    let forwards: Vec<_> = s
        .forwards
        .iter()
        .map(|(e, (c, t))| wire::ForwardRec::new(e.0, &cell_out(*c), t.0))
        .collect();
    let forwards = fbb.create_vector(&forwards);
    let orphans: Vec<_> = s
        .orphans
        .iter()
        .map(|(t, m)| queued_out::<G>(fbb, *t, m, scratch))
        .collect();
    let orphans = fbb.create_vector(&orphans);
    let retained = retained_out::<G>(fbb, &s.retained, scratch);
    let g = &s.game_counters;
    wire::CellStateRec::create(
        fbb,
        &wire::CellStateRecArgs {
            id: Some(&cell_out(s.id)),
            entities: Some(entities),
            ghosts: Some(ghosts),
            ghost_sender: Some(sender),
            input_queue: Some(inputs),
            intent_queue: Some(intents),
            jobs: Some(jobs),
            forwards: Some(forwards),
            orphans: Some(orphans),
            retained: Some(retained),
            rng: s.rng.0,
            counters: Some(&counters_out(&s.counters)),
            game_counters: Some(&wire::GameCountersRec::new(
                g.inputs_rejected,
                g.inputs_clamped,
                g.actions_rejected,
                g.intents_applied,
            )),
        },
    )
}

pub(crate) fn state_in<G: GameLogic>(r: &wire::CellStateRec) -> Result<CellState<G>, FrameError> {
    let mut entities = EntityStore::new();
    for e in entities_in::<G>(r.entities(), "state.entities")? {
        entities
            .insert(e)
            .map_err(|_| FrameError::BadValue("state.entities.id"))?;
    }
    let intent_queue = match r.intent_queue() {
        Some(v) => list(v.len(), "state.intent_queue", |i| intent_in::<G>(&v.get(i)))?,
        None => Vec::new(),
    };
    let mut jobs = SimulationQueue::default();
    for j in jobs_in(r.jobs()) {
        jobs.schedule(j);
    }
    let mut forwards = FxHashMap::default();
    for f in r.forwards().iter().flat_map(|v| v.iter()) {
        forwards.insert(
            EntityId(f.entity()),
            (cell_in(f.cell(), "state.forwards")?, TickId(f.tick())),
        );
    }
    let retained = retained_in::<G>(r.retained(), "state.retained")?;
    let g = need(r.game_counters(), "state.game_counters")?;
    Ok(CellState {
        id: cell_in(need(r.id(), "state.id")?, "state.id")?,
        entities,
        ghosts: ghost_table_in(&r.ghosts())?,
        ghost_sender: ghost_sender_in(&r.ghost_sender())?,
        input_queue: queued_in::<G>(r.input_queue(), "state.input_queue")?
            .into_iter()
            .map(|(_, m)| m)
            .collect(),
        intent_queue,
        jobs,
        forwards,
        orphans: queued_in::<G>(r.orphans(), "state.orphans")?,
        retained,
        rng: Rng(r.rng()),
        counters: counters_in(need(r.counters(), "state.counters")?),
        game_counters: GameCounters {
            inputs_rejected: g.inputs_rejected(),
            inputs_clamped: g.inputs_clamped(),
            actions_rejected: g.actions_rejected(),
            intents_applied: g.intents_applied(),
        },
    })
}

pub(crate) fn changed_out<'a, G: GameLogic>(
    fbb: &mut Fbb<'a>,
    changed: &[Entity<G::Components>],
    scratch: &mut Vec<u8>,
) -> Tables<'a, wire::EntityRec<'a>> {
    entities_out::<G>(fbb, changed.iter(), scratch)
}

pub(crate) fn changed_in<G: GameLogic>(
    v: Option<Vector<'_, ForwardsUOffset<wire::EntityRec<'_>>>>,
) -> Result<Vec<Entity<G::Components>>, FrameError> {
    entities_in::<G>(v, "diff.changed")
}
