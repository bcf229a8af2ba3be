//! Shard bundles: what one shard sends another node's shard in one turn.

use tessera_schema::flatbuffers::{FlatBufferBuilder, WIPOffset};
use tessera_schema::verify::{self, FrameError, FrameFamily};
use tessera_schema::wire;

use super::state::{self, cell_msg_parts};
use super::{cell_in, cell_out, header_in, header_out, need, shard_in, shard_out};
use crate::control::{AbortReason, HandoverId, PeerMsg};
use crate::game::GameLogic;
use crate::geometry::CellId;
use crate::ids::{ClientId, EntityId, TickId};
use crate::messages::{CellEnvelope, ClientOutput, ClientOutputKind};
use crate::node::ShardMsg;
use crate::registry::{Registry, ShardRef};
use crate::replica::{ReplicaBody, ReplicaCell, ReplicaMsg};

/// The identities every frame between shards carries (DESIGN.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    /// The cell the message concerns (a cell message's destination, a
    /// handover's cell, a client frame's source cell).
    pub cell: CellId,
    /// The sender's epoch for that cell when it sent.
    pub epoch: u32,
    /// The link's sequence number (per sender and destination, from 1).
    pub seq: u64,
    /// The sending shard.
    pub sender: ShardRef,
    /// The sender's tick.
    pub tick: TickId,
}

impl ShardHeader {
    /// The header of `msg` sent by `sender` at `tick`, with `registry` as the
    /// sender knows it; `seq` is filled in by the [`BundleWriter`].
    pub fn for_msg<G: GameLogic>(
        msg: &ShardMsg<G>,
        sender: ShardRef,
        tick: TickId,
        registry: &Registry,
    ) -> Self {
        let (cell, epoch) = match msg {
            ShardMsg::Cell(env) => (env.to, None),
            ShardMsg::Client(out) => (out.cell, None),
            ShardMsg::Peer(PeerMsg::PreCopy { cell, epoch, .. }) => (*cell, Some(*epoch)),
            ShardMsg::Peer(m) => (m.cell(), None),
            // Replication carries an epoch per cell inside.
            ShardMsg::Replica(_) | ShardMsg::Order(_) => (CellId::root(0, 0, 0), Some(0)),
        };
        let epoch = epoch.unwrap_or_else(|| registry.get(cell).map_or(0, |a| a.epoch));
        Self {
            cell,
            epoch,
            seq: 0,
            sender,
            tick,
        }
    }

    /// The header of a control frame (no cell, no epoch: the registry and
    /// orders carry their own) from `sender`.
    pub fn control(sender: ShardRef, seq: u64, tick: TickId) -> Self {
        Self {
            cell: CellId::root(0, 0, 0),
            epoch: 0,
            seq,
            sender,
            tick,
        }
    }

    /// True for a handover step whose epoch is older than the receiver's
    /// registry says the cell is at: it belongs to an ownership that has
    /// since changed (DESIGN.md's epoch rule), so it is ignored and counted.
    /// Cell messages and client frames are never stale by epoch: a message
    /// sent under the previous owner is routed on, not lost.
    pub fn is_stale<G: GameLogic>(&self, msg: &ShardMsg<G>, registry: &Registry) -> bool {
        matches!(msg, ShardMsg::Peer(_))
            && registry
                .get(self.cell)
                .is_some_and(|a| a.epoch > self.epoch && a.epoch != crate::registry::ADMIN_EPOCH)
    }
}

/// Why a message cannot go into a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Orders come from the coordinator on its own link, never between shards.
    #[error("coordinator orders do not travel between shards")]
    Order,
}

/// A writer keeps its buffer between bundles up to this size.
const RETAIN_BYTES_MAX: usize = 1 << 20;

/// Builds one bundle for one destination shard, frame by frame; numbers the
/// frames of its link.
pub struct BundleWriter {
    to: ShardRef,
    fbb: FlatBufferBuilder<'static>,
    frames: Vec<WIPOffset<wire::ShardFrame<'static>>>,
    next_seq: u64,
    scratch: Vec<u8>,
}

impl BundleWriter {
    /// A writer for the link to `to`.
    pub fn new(to: ShardRef) -> Self {
        Self {
            to,
            fbb: FlatBufferBuilder::with_capacity(4096),
            frames: Vec::new(),
            next_seq: 1,
            scratch: Vec::new(),
        }
    }

    /// The destination.
    pub fn to(&self) -> ShardRef {
        self.to
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True if no frame waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes written so far (the bundle will be a little larger).
    pub fn bytes(&self) -> usize {
        self.fbb.unfinished_data().len()
    }

    /// Adds a message; its header's `seq` is the link's next number.
    pub fn push<G: GameLogic>(
        &mut self,
        mut header: ShardHeader,
        msg: &ShardMsg<G>,
    ) -> Result<u64, EncodeError> {
        header.seq = self.next_seq;
        let fbb = &mut self.fbb;
        let scratch = &mut self.scratch;
        let (tag, table) = match msg {
            ShardMsg::Cell(env) => {
                let (mtag, m) = state::cell_msg_out::<G>(fbb, &env.msg, scratch);
                let t = wire::CellEnvelopeRec::create(
                    fbb,
                    &wire::CellEnvelopeRecArgs {
                        to: Some(&cell_out(env.to)),
                        from: Some(&cell_out(env.from)),
                        msg_type: mtag,
                        msg: Some(m),
                    },
                );
                (wire::ShardMsg::CellEnvelopeRec, t.as_union_value())
            }
            ShardMsg::Client(out) => {
                let bytes = fbb.create_vector(&out.bytes);
                let t = wire::ClientOutputRec::create(
                    fbb,
                    &wire::ClientOutputRecArgs {
                        client: out.client.0,
                        entity: out.entity.0,
                        cell: Some(&cell_out(out.cell)),
                        tick: out.tick.0,
                        kind: match out.kind {
                            ClientOutputKind::Welcome => 0,
                            ClientOutputKind::Snapshot => 1,
                            ClientOutputKind::Refused => 2,
                        },
                        bytes: Some(bytes),
                    },
                );
                (wire::ShardMsg::ClientOutputRec, t.as_union_value())
            }
            ShardMsg::Peer(p) => peer_out::<G>(fbb, p, scratch),
            ShardMsg::Replica(r) => replica_out::<G>(fbb, r, scratch),
            ShardMsg::Order(_) => return Err(EncodeError::Order),
        };
        let h = header_out(&header);
        let frame = wire::ShardFrame::create(
            fbb,
            &wire::ShardFrameArgs {
                header: Some(&h),
                msg_type: tag,
                msg: Some(table),
            },
        );
        self.frames.push(frame);
        self.next_seq += 1;
        Ok(header.seq)
    }

    /// Finishes the bundle and hands its bytes to `send`; the writer is
    /// empty afterwards (and keeps its buffers).
    pub fn finish<R>(&mut self, send: impl FnOnce(&[u8]) -> R) -> R {
        let frames = self.fbb.create_vector(&self.frames);
        let bundle = wire::ShardBundle::create(
            &mut self.fbb,
            &wire::ShardBundleArgs {
                to: Some(&shard_out(self.to)),
                frames: Some(frames),
            },
        );
        self.fbb.finish(bundle, None);
        let len = self.fbb.finished_data().len();
        let r = send(self.fbb.finished_data());
        if len > RETAIN_BYTES_MAX {
            // A crowded cell's pre-copy went out: do not keep its megabytes
            // for the small bundles that follow.
            self.fbb = FlatBufferBuilder::with_capacity(4096);
            self.scratch = Vec::new();
        } else {
            self.fbb.reset();
        }
        self.frames.clear();
        r
    }
}

pub(crate) fn reason_out(r: AbortReason) -> wire::AbortReason {
    match r {
        AbortReason::Refused => wire::AbortReason::Refused,
        AbortReason::Timeout => wire::AbortReason::Timeout,
        AbortReason::Overloaded => wire::AbortReason::Overloaded,
        AbortReason::Stale => wire::AbortReason::Stale,
        AbortReason::Superseded => wire::AbortReason::Superseded,
    }
}

pub(crate) fn reason_in(r: wire::AbortReason) -> Result<AbortReason, FrameError> {
    Ok(match r {
        wire::AbortReason::Refused => AbortReason::Refused,
        wire::AbortReason::Timeout => AbortReason::Timeout,
        wire::AbortReason::Overloaded => AbortReason::Overloaded,
        wire::AbortReason::Stale => AbortReason::Stale,
        wire::AbortReason::Superseded => AbortReason::Superseded,
        _ => return Err(FrameError::BadValue("reason")),
    })
}

fn peer_out<'a, G: GameLogic>(
    fbb: &mut FlatBufferBuilder<'a>,
    p: &PeerMsg<G>,
    scratch: &mut Vec<u8>,
) -> (
    wire::ShardMsg,
    WIPOffset<tessera_schema::flatbuffers::UnionWIPOffset>,
) {
    match p {
        PeerMsg::PreCopy {
            id,
            cell,
            from,
            epoch,
            state,
        } => {
            let state = state::state_out::<G>(fbb, state, scratch);
            let t = wire::PreCopyMsg::create(
                fbb,
                &wire::PreCopyMsgArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    from: Some(&shard_out(*from)),
                    epoch: *epoch,
                    state: Some(state),
                },
            );
            (wire::ShardMsg::PreCopyMsg, t.as_union_value())
        }
        PeerMsg::Ready { id, cell } => {
            let t = wire::ReadyMsg::create(
                fbb,
                &wire::ReadyMsgArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                },
            );
            (wire::ShardMsg::ReadyMsg, t.as_union_value())
        }
        PeerMsg::Refuse { id, cell, reason } => {
            let t = wire::RefuseMsg::create(
                fbb,
                &wire::RefuseMsgArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    reason: reason_out(*reason),
                },
            );
            (wire::ShardMsg::RefuseMsg, t.as_union_value())
        }
        PeerMsg::Diff { id, cell, diff } => {
            let changed = state::changed_out::<G>(fbb, &diff.changed, scratch);
            let removed: Vec<u64> = diff.removed.iter().map(|e| e.0).collect();
            let removed = fbb.create_vector(&removed);
            let rest = state::state_out::<G>(fbb, &diff.rest, scratch);
            let t = wire::DiffMsg::create(
                fbb,
                &wire::DiffMsgArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    changed: Some(changed),
                    removed: Some(removed),
                    rest: Some(rest),
                },
            );
            (wire::ShardMsg::DiffMsg, t.as_union_value())
        }
        PeerMsg::Abort { id, cell, reason } => {
            let t = wire::PeerAbortMsg::create(
                fbb,
                &wire::PeerAbortMsgArgs {
                    id: id.0,
                    cell: Some(&cell_out(*cell)),
                    reason: reason_out(*reason),
                },
            );
            (wire::ShardMsg::PeerAbortMsg, t.as_union_value())
        }
    }
}

fn replica_out<'a, G: GameLogic>(
    fbb: &mut FlatBufferBuilder<'a>,
    r: &ReplicaMsg<G>,
    scratch: &mut Vec<u8>,
) -> (
    wire::ShardMsg,
    WIPOffset<tessera_schema::flatbuffers::UnionWIPOffset>,
) {
    match r {
        ReplicaMsg::Round {
            from,
            seq,
            tick,
            full,
            incarnation,
            cells,
            passing,
        } => {
            let passing = state::retained_out::<G>(fbb, passing, scratch);
            let recs: Vec<_> = cells
                .iter()
                .map(|c| {
                    let (diff, state, changed, removed) = match &c.body {
                        ReplicaBody::Full(st) => {
                            (false, state::state_out::<G>(fbb, st, scratch), None, None)
                        }
                        ReplicaBody::Diff(d) => {
                            let changed = state::changed_out::<G>(fbb, &d.changed, scratch);
                            let removed: Vec<u64> = d.removed.iter().map(|e| e.0).collect();
                            let removed = fbb.create_vector(&removed);
                            let rest = state::state_out::<G>(fbb, &d.rest, scratch);
                            (true, rest, Some(changed), Some(removed))
                        }
                    };
                    wire::ReplicaCellRec::create(
                        fbb,
                        &wire::ReplicaCellRecArgs {
                            cell: Some(&cell_out(c.cell)),
                            epoch: c.epoch,
                            diff,
                            state: Some(state),
                            changed,
                            removed,
                        },
                    )
                })
                .collect();
            let cells = fbb.create_vector(&recs);
            let t = wire::ReplicaRoundMsg::create(
                fbb,
                &wire::ReplicaRoundMsgArgs {
                    from: Some(&shard_out(*from)),
                    seq: *seq,
                    tick: tick.0,
                    full: *full,
                    incarnation: *incarnation,
                    cells: Some(cells),
                    passing: Some(passing),
                },
            );
            (wire::ShardMsg::ReplicaRoundMsg, t.as_union_value())
        }
        ReplicaMsg::Ack { from, seq } => {
            let t = wire::ReplicaAckMsg::create(
                fbb,
                &wire::ReplicaAckMsgArgs {
                    from: Some(&shard_out(*from)),
                    seq: *seq,
                },
            );
            (wire::ShardMsg::ReplicaAckMsg, t.as_union_value())
        }
        ReplicaMsg::Resync { from } => {
            let t = wire::ReplicaResyncMsg::create(
                fbb,
                &wire::ReplicaResyncMsgArgs {
                    from: Some(&shard_out(*from)),
                },
            );
            (wire::ShardMsg::ReplicaResyncMsg, t.as_union_value())
        }
        ReplicaMsg::Restored {
            from,
            lost,
            cells,
            tick,
        } => {
            let cells: Vec<_> = cells.iter().map(|c| cell_out(*c)).collect();
            let cells = fbb.create_vector(&cells);
            let t = wire::RestoredMsg::create(
                fbb,
                &wire::RestoredMsgArgs {
                    from: Some(&shard_out(*from)),
                    lost: Some(&shard_out(*lost)),
                    cells: Some(cells),
                    tick: tick.0,
                },
            );
            (wire::ShardMsg::RestoredMsg, t.as_union_value())
        }
    }
}

fn replica_round_in<G: GameLogic>(
    m: &wire::ReplicaRoundMsg<'_>,
) -> Result<ReplicaMsg<G>, FrameError> {
    let mut cells = Vec::new();
    for c in m.cells().iter().flat_map(|v| v.iter()) {
        let state = state::state_in::<G>(&c.state())?;
        let body = if c.diff() {
            let removed = c
                .removed()
                .map(|r| r.iter().map(EntityId).collect())
                .unwrap_or_default();
            ReplicaBody::Diff(Box::new(crate::cell::CellDiff {
                changed: state::changed_in::<G>(c.changed())?,
                removed,
                rest: state,
            }))
        } else {
            ReplicaBody::Full(Box::new(state))
        };
        cells.push(ReplicaCell {
            cell: cell_in(need(c.cell(), "replica.cell")?, "replica.cell")?,
            epoch: c.epoch(),
            body,
        });
    }
    Ok(ReplicaMsg::Round {
        from: shard_in(need(m.from(), "replica.from")?),
        seq: m.seq(),
        tick: TickId(m.tick()),
        full: m.full(),
        incarnation: m.incarnation(),
        cells,
        passing: state::retained_in::<G>(m.passing(), "replica.passing")?,
    })
}

fn frame_in<G: GameLogic>(
    f: &wire::ShardFrame<'_>,
) -> Result<(ShardHeader, ShardMsg<G>), FrameError> {
    let header = header_in(need(f.header(), "header")?)?;
    let cell = |c: Option<&wire::CellId>, field| cell_in(need(c, field)?, field);
    let msg = if let Some(m) = f.msg_as_cell_envelope_rec() {
        ShardMsg::Cell(CellEnvelope {
            to: cell(m.to(), "envelope.to")?,
            from: cell(m.from(), "envelope.from")?,
            msg: state::cell_msg_in::<G>(cell_msg_parts!(m))?,
        })
    } else if let Some(m) = f.msg_as_client_output_rec() {
        ShardMsg::Client(ClientOutput {
            client: ClientId(m.client()),
            entity: EntityId(m.entity()),
            cell: cell(m.cell(), "client.cell")?,
            tick: TickId(m.tick()),
            kind: match m.kind() {
                0 => ClientOutputKind::Welcome,
                1 => ClientOutputKind::Snapshot,
                2 => ClientOutputKind::Refused,
                _ => return Err(FrameError::BadValue("client.kind")),
            },
            bytes: m.bytes().bytes().to_vec(),
        })
    } else if let Some(m) = f.msg_as_pre_copy_msg() {
        ShardMsg::Peer(PeerMsg::PreCopy {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "precopy.cell")?,
            from: shard_in(need(m.from(), "precopy.from")?),
            epoch: m.epoch(),
            state: Box::new(state::state_in::<G>(&m.state())?),
        })
    } else if let Some(m) = f.msg_as_ready_msg() {
        ShardMsg::Peer(PeerMsg::Ready {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "ready.cell")?,
        })
    } else if let Some(m) = f.msg_as_refuse_msg() {
        ShardMsg::Peer(PeerMsg::Refuse {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "refuse.cell")?,
            reason: reason_in(m.reason())?,
        })
    } else if let Some(m) = f.msg_as_diff_msg() {
        let removed = m
            .removed()
            .map(|r| r.iter().map(EntityId).collect())
            .unwrap_or_default();
        ShardMsg::Peer(PeerMsg::Diff {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "diff.cell")?,
            diff: Box::new(crate::cell::CellDiff {
                changed: state::changed_in::<G>(m.changed())?,
                removed,
                rest: state::state_in::<G>(&m.rest())?,
            }),
        })
    } else if let Some(m) = f.msg_as_replica_round_msg() {
        ShardMsg::Replica(replica_round_in::<G>(&m)?)
    } else if let Some(m) = f.msg_as_replica_ack_msg() {
        ShardMsg::Replica(ReplicaMsg::Ack {
            from: shard_in(need(m.from(), "replica_ack.from")?),
            seq: m.seq(),
        })
    } else if let Some(m) = f.msg_as_replica_resync_msg() {
        ShardMsg::Replica(ReplicaMsg::Resync {
            from: shard_in(need(m.from(), "replica_resync.from")?),
        })
    } else if let Some(m) = f.msg_as_restored_msg() {
        let mut cells = Vec::new();
        for c in m.cells().iter().flat_map(|v| v.iter()) {
            cells.push(cell_in(c, "restored.cells")?);
        }
        ShardMsg::Replica(ReplicaMsg::Restored {
            from: shard_in(need(m.from(), "restored.from")?),
            lost: shard_in(need(m.lost(), "restored.lost")?),
            cells,
            tick: TickId(m.tick()),
        })
    } else if let Some(m) = f.msg_as_peer_abort_msg() {
        ShardMsg::Peer(PeerMsg::Abort {
            id: HandoverId(m.id()),
            cell: cell(m.cell(), "abort.cell")?,
            reason: reason_in(m.reason())?,
        })
    } else {
        return Err(FrameError::UnknownMessage {
            family: FrameFamily::Shard,
            tag: f.msg_type().0,
        });
    };
    Ok((header, msg))
}

/// Verifies and decodes a bundle into `out`, all or nothing: on an error
/// nothing is appended. Returns the shard the bundle was addressed to.
pub fn decode_bundle<G: GameLogic>(
    bytes: &[u8],
    out: &mut Vec<(ShardHeader, ShardMsg<G>)>,
) -> Result<ShardRef, FrameError> {
    let bundle = verify::shard_bundle(bytes)?;
    let to = shard_in(need(bundle.to(), "to")?);
    let start = out.len();
    for f in bundle.frames().iter() {
        match frame_in::<G>(&f) {
            Ok(m) => out.push(m),
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    Ok(to)
}
