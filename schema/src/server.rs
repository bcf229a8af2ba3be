//! Server -> client messages: owned forms, encoding and decoding.

use flatbuffers::FlatBufferBuilder;

use crate::verify::{self, FrameError, FrameFamily};
use crate::wire::{self, EntityFull, GameEvent, HeadingUpdate, PosUpdate, QVec2, StatUpdate};

/// Sent once after a join.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Welcome {
    /// The client's avatar.
    pub entity: u64,
    /// The world.
    pub world: u16,
    /// The server tick at join.
    pub tick: u64,
    /// Ticks per second.
    pub tick_hz: u16,
    /// Area-of-interest radius, cm.
    pub aoi_radius_cm: u32,
    /// Edge of a depth-0 cell, cm.
    pub cell_size_cm: u32,
    /// Spawn position (or, after a resume, where the avatar is).
    pub position: QVec2,
    /// The credential that takes this avatar back through another gateway
    /// ([`crate::client::ClientMessage::Resume`]) if this one is lost; it
    /// stays the same across resumes.
    pub resume_key: u64,
}

/// Most gateway addresses in one [`ServerMessage::Gateways`].
pub const GATEWAYS_MAX: usize = 16;
/// Longest gateway address ("host:port"), in bytes.
pub const GATEWAY_ADDR_MAX_BYTES: usize = 64;

/// A view delta, borrowed from the server's buffers for encoding.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotRef<'a> {
    /// The tick this view is at.
    pub tick: u64,
    /// The tick of the view this is a delta against (0: full view).
    pub baseline_tick: u64,
    /// The client's avatar.
    pub entity: u64,
    /// Newest input of this client applied by the server.
    pub last_input_seq: u32,
    /// Entities new to the view, whole.
    pub entered: &'a [EntityFull],
    /// Changed position or velocity.
    pub moved: &'a [PosUpdate],
    /// Changed heading.
    pub turned: &'a [HeadingUpdate],
    /// Changed health or state.
    pub stats: &'a [StatUpdate],
    /// Entities gone from the view.
    pub left: &'a [u64],
    /// Game events visible to this client.
    pub events: &'a [GameEvent],
}

/// A view delta as a client holds it after decoding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// See [`SnapshotRef::tick`].
    pub tick: u64,
    /// See [`SnapshotRef::baseline_tick`].
    pub baseline_tick: u64,
    /// See [`SnapshotRef::entity`].
    pub entity: u64,
    /// See [`SnapshotRef::last_input_seq`].
    pub last_input_seq: u32,
    /// See [`SnapshotRef::entered`].
    pub entered: Vec<EntityFull>,
    /// See [`SnapshotRef::moved`].
    pub moved: Vec<PosUpdate>,
    /// See [`SnapshotRef::turned`].
    pub turned: Vec<HeadingUpdate>,
    /// See [`SnapshotRef::stats`].
    pub stats: Vec<StatUpdate>,
    /// See [`SnapshotRef::left`].
    pub left: Vec<u64>,
    /// See [`SnapshotRef::events`].
    pub events: Vec<GameEvent>,
}

impl Snapshot {
    /// Borrows this snapshot for encoding.
    pub fn as_ref(&self) -> SnapshotRef<'_> {
        SnapshotRef {
            tick: self.tick,
            baseline_tick: self.baseline_tick,
            entity: self.entity,
            last_input_seq: self.last_input_seq,
            entered: &self.entered,
            moved: &self.moved,
            turned: &self.turned,
            stats: &self.stats,
            left: &self.left,
            events: &self.events,
        }
    }
}

/// Error codes sent to clients.
pub use wire::ErrorCode;

/// Everything the server can say to a client.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerMessage {
    /// Join accepted.
    Welcome(Welcome),
    /// View delta.
    Snapshot(Snapshot),
    /// A single event outside a snapshot.
    Event(GameEvent),
    /// Answer to a ping.
    Pong {
        /// Echoed from the ping.
        client_time_us: u64,
        /// Server tick when answered.
        server_tick: u64,
    },
    /// A request was refused.
    Error {
        /// Why.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// The cluster's other gateways ("host:port", at most
    /// [`GATEWAYS_MAX`]): where to resume if this one is lost.
    Gateways {
        /// Addresses, the preferred first.
        addresses: Vec<String>,
        /// This gateway is draining: resume at the first address now (the
        /// connection closes next, without removing the avatar).
        now: bool,
    },
}

/// Upper bound of the encoded size of a snapshot with these counts, used to
/// cap snapshots before encoding them.
pub fn snapshot_size_bound(
    entered: usize,
    moved: usize,
    turned: usize,
    stats: usize,
    left: usize,
    events: usize,
) -> usize {
    // Root offset, two tables with their vtables, six vector offsets: < 128.
    const FIXED: usize = 128;
    // Each vector: length prefix plus up to 4 bytes of alignment padding.
    const VECTOR: usize = 8;
    let v = |n: usize, size: usize| if n == 0 { 0 } else { VECTOR + n * size };
    FIXED
        + v(entered, size_of::<EntityFull>())
        + v(moved, size_of::<PosUpdate>())
        + v(turned, size_of::<HeadingUpdate>())
        + v(stats, size_of::<StatUpdate>())
        + v(left, 8)
        + v(events, size_of::<GameEvent>())
}

fn finish<'b>(
    fbb: &'b mut FlatBufferBuilder<'static>,
    msg_type: wire::ServerMsg,
    value: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
) -> &'b [u8] {
    let frame = wire::ServerFrame::create(
        fbb,
        &wire::ServerFrameArgs {
            msg_type,
            msg: Some(value),
        },
    );
    fbb.finish_minimal(frame);
    fbb.finished_data()
}

/// Encodes a snapshot (the hot path: vectors of plain structs, no per-entity
/// tables).
pub fn encode_snapshot<'b>(
    fbb: &'b mut FlatBufferBuilder<'static>,
    s: &SnapshotRef<'_>,
) -> &'b [u8] {
    fbb.reset();
    fn vec<'f, T: flatbuffers::Push + Copy>(
        fbb: &mut FlatBufferBuilder<'f>,
        items: &[T],
    ) -> Option<flatbuffers::WIPOffset<flatbuffers::Vector<'f, T::Output>>> {
        (!items.is_empty()).then(|| fbb.create_vector(items))
    }
    let entered = vec(fbb, s.entered);
    let moved = vec(fbb, s.moved);
    let turned = vec(fbb, s.turned);
    let stats = vec(fbb, s.stats);
    let left = vec(fbb, s.left);
    let events = vec(fbb, s.events);
    let snap = wire::Snapshot::create(
        fbb,
        &wire::SnapshotArgs {
            tick: s.tick,
            baseline_tick: s.baseline_tick,
            entity: s.entity,
            last_input_seq: s.last_input_seq,
            entered,
            moved,
            turned,
            stats,
            left,
            events,
        },
    );
    finish(fbb, wire::ServerMsg::Snapshot, snap.as_union_value())
}

/// Encodes any server message.
pub fn encode<'b>(fbb: &'b mut FlatBufferBuilder<'static>, msg: &ServerMessage) -> &'b [u8] {
    fbb.reset();
    match msg {
        ServerMessage::Snapshot(s) => encode_snapshot(fbb, &s.as_ref()),
        ServerMessage::Welcome(w) => {
            let v = wire::Welcome::create(
                fbb,
                &wire::WelcomeArgs {
                    entity: w.entity,
                    world: w.world,
                    tick: w.tick,
                    tick_hz: w.tick_hz,
                    aoi_radius_cm: w.aoi_radius_cm,
                    cell_size_cm: w.cell_size_cm,
                    position: Some(&w.position),
                    resume_key: w.resume_key,
                },
            );
            finish(fbb, wire::ServerMsg::Welcome, v.as_union_value())
        }
        ServerMessage::Event(e) => {
            let v = wire::Event::create(fbb, &wire::EventArgs { event: Some(e) });
            finish(fbb, wire::ServerMsg::Event, v.as_union_value())
        }
        ServerMessage::Pong {
            client_time_us,
            server_tick,
        } => {
            let v = wire::Pong::create(
                fbb,
                &wire::PongArgs {
                    client_time_us: *client_time_us,
                    server_tick: *server_tick,
                },
            );
            finish(fbb, wire::ServerMsg::Pong, v.as_union_value())
        }
        ServerMessage::Error { code, message } => {
            let m = fbb.create_string(message);
            let v = wire::Error::create(
                fbb,
                &wire::ErrorArgs {
                    code: *code,
                    message: Some(m),
                },
            );
            finish(fbb, wire::ServerMsg::Error, v.as_union_value())
        }
        ServerMessage::Gateways { addresses, now } => {
            let list: Vec<_> = addresses.iter().map(|a| fbb.create_string(a)).collect();
            let list = fbb.create_vector(&list);
            let v = wire::Gateways::create(
                fbb,
                &wire::GatewaysArgs {
                    addresses: Some(list),
                    now: *now,
                },
            );
            finish(fbb, wire::ServerMsg::Gateways, v.as_union_value())
        }
    }
}

fn copy<'a, T: flatbuffers::Follow<'a, Inner = &'a T> + Copy + 'a>(
    v: Option<flatbuffers::Vector<'a, T>>,
) -> Vec<T> {
    v.map(|v| v.iter().copied().collect()).unwrap_or_default()
}

/// Reads a server frame into an owned message.
pub fn decode(bytes: &[u8]) -> Result<ServerMessage, FrameError> {
    let frame = verify::server_frame(bytes)?;
    let family = FrameFamily::Server;
    match frame.msg_type() {
        wire::ServerMsg::Welcome => {
            let w = frame
                .msg_as_welcome()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ServerMessage::Welcome(Welcome {
                entity: w.entity(),
                world: w.world(),
                tick: w.tick(),
                tick_hz: w.tick_hz(),
                aoi_radius_cm: w.aoi_radius_cm(),
                cell_size_cm: w.cell_size_cm(),
                position: w.position().copied().unwrap_or_default(),
                resume_key: w.resume_key(),
            }))
        }
        wire::ServerMsg::Snapshot => {
            let s = frame
                .msg_as_snapshot()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ServerMessage::Snapshot(Snapshot {
                tick: s.tick(),
                baseline_tick: s.baseline_tick(),
                entity: s.entity(),
                last_input_seq: s.last_input_seq(),
                entered: copy(s.entered()),
                moved: copy(s.moved()),
                turned: copy(s.turned()),
                stats: copy(s.stats()),
                left: s.left().map(|l| l.iter().collect()).unwrap_or_default(),
                events: copy(s.events()),
            }))
        }
        wire::ServerMsg::Event => {
            let e = frame
                .msg_as_event()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ServerMessage::Event(
                *e.event().ok_or(FrameError::MissingField("event"))?,
            ))
        }
        wire::ServerMsg::Pong => {
            let p = frame
                .msg_as_pong()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ServerMessage::Pong {
                client_time_us: p.client_time_us(),
                server_tick: p.server_tick(),
            })
        }
        wire::ServerMsg::Error => {
            let e = frame
                .msg_as_error()
                .ok_or(FrameError::MissingMessage(family))?;
            Ok(ServerMessage::Error {
                code: e.code(),
                message: e.message().unwrap_or_default().to_string(),
            })
        }
        wire::ServerMsg::Gateways => {
            let g = frame
                .msg_as_gateways()
                .ok_or(FrameError::MissingMessage(family))?;
            let list = g.addresses().ok_or(FrameError::MissingField("addresses"))?;
            if list.len() > GATEWAYS_MAX {
                return Err(FrameError::TooMany {
                    field: "addresses",
                    len: list.len(),
                    max: GATEWAYS_MAX,
                });
            }
            let mut addresses = Vec::with_capacity(list.len());
            for a in list.iter() {
                if a.len() > GATEWAY_ADDR_MAX_BYTES {
                    return Err(FrameError::TooMany {
                        field: "addresses.len",
                        len: a.len(),
                        max: GATEWAY_ADDR_MAX_BYTES,
                    });
                }
                if a.is_empty() || a.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(FrameError::BadValue("addresses"));
                }
                addresses.push(a.to_string());
            }
            Ok(ServerMessage::Gateways {
                addresses,
                now: g.now(),
            })
        }
        wire::ServerMsg::NONE => Err(FrameError::MissingMessage(family)),
        other => Err(FrameError::UnknownMessage {
            family,
            tag: other.0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::qvec;
    use proptest::prelude::*;

    fn snapshot(n: usize) -> Snapshot {
        Snapshot {
            tick: 10,
            baseline_tick: 8,
            entity: 1,
            last_input_seq: 3,
            entered: (0..n as u64)
                .map(|i| {
                    EntityFull::new(
                        i,
                        &qvec(1.0, 2.0),
                        &qvec(0.0, 1.0),
                        5,
                        100,
                        wire::EntityKind::Npc,
                        0,
                    )
                })
                .collect(),
            moved: (0..n as u64)
                .map(|i| PosUpdate::new(i, &qvec(3.0, 4.0), &qvec(0.0, 0.0)))
                .collect(),
            turned: (0..n as u64).map(|i| HeadingUpdate::new(i, 7)).collect(),
            stats: (0..n as u64).map(|i| StatUpdate::new(i, 50, 1)).collect(),
            left: (100..100 + n as u64).collect(),
            events: (0..n as u64)
                .map(|i| GameEvent::new(10, i, i + 1, 10, wire::EventKind::Damage))
                .collect(),
        }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            ServerMessage::Welcome(Welcome {
                entity: 9,
                world: 1,
                tick: 100,
                tick_hz: 20,
                aoi_radius_cm: 5000,
                cell_size_cm: 12800,
                position: qvec(5.0, 6.0),
                resume_key: 0xfeed_beef,
            }),
            ServerMessage::Snapshot(snapshot(3)),
            ServerMessage::Event(GameEvent::new(1, 2, 3, 4, wire::EventKind::Death)),
            ServerMessage::Pong {
                client_time_us: 11,
                server_tick: 12,
            },
            ServerMessage::Error {
                code: ErrorCode::Full,
                message: "server full".into(),
            },
            ServerMessage::Gateways {
                addresses: vec!["127.0.0.1:7777".into(), "[::1]:7778".into()],
                now: true,
            },
        ];
        let mut fbb = FlatBufferBuilder::new();
        for m in &msgs {
            let bytes = encode(&mut fbb, m).to_vec();
            assert_eq!(&decode(&bytes).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn size_bound_holds(a in 0usize..40, b in 0usize..40, c in 0usize..40, d in 0usize..40, e in 0usize..40, f in 0usize..10) {
            let mut s = snapshot(0);
            let full = snapshot(40);
            s.entered = full.entered[..a].to_vec();
            s.moved = full.moved[..b].to_vec();
            s.turned = full.turned[..c].to_vec();
            s.stats = full.stats[..d].to_vec();
            s.left = full.left[..e].to_vec();
            s.events = full.events[..f].to_vec();
            let mut fbb = FlatBufferBuilder::new();
            let len = encode_snapshot(&mut fbb, &s.as_ref()).len();
            prop_assert!(len <= snapshot_size_bound(a, b, c, d, e, f), "{len} > bound");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn gateway_lists_round_trip_or_are_refused(list in proptest::collection::vec("[ -~]{0,70}", 0..20), now in any::<bool>()) {
            let m = ServerMessage::Gateways { addresses: list.clone(), now };
            let mut fbb = FlatBufferBuilder::new();
            let bytes = encode(&mut fbb, &m).to_vec();
            let valid = list.len() <= GATEWAYS_MAX
                && list.iter().all(|a| !a.is_empty() && a.len() <= GATEWAY_ADDR_MAX_BYTES && !a.contains(' '));
            match decode(&bytes) {
                Ok(d) => { prop_assert!(valid); prop_assert_eq!(d, m); }
                Err(_) => prop_assert!(!valid),
            }
        }
    }
}
