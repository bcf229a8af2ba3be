//! The node core's messages as FlatBuffers frames, for links between nodes.
//!
//! Inside a node, shards pass [`ShardMsg`] values through their mailboxes;
//! between nodes the same values cross as frames of `schema/fbs/shard.fbs`
//! (one [`ShardBundle`] per destination shard per loop turn) and the
//! coordinator's orders, reports and registry as frames of `control.fbs`.
//! Decoding is total: every byte string either becomes the value that was
//! encoded or a typed [`FrameError`] (counted by the caller with
//! [`tessera_schema::FrameErrorCounts`]), never a panic. The game's own
//! state crosses as bytes it encodes itself ([`GameLogic::encode_components`]).
//!
//! [`ShardBundle`]: tessera_schema::wire::ShardBundle

mod control;
mod shard;
mod state;

pub use control::{
    decode_control, encode_control, ControlMsg, NodeInfo, NodeRole, Registration, COORDINATOR,
};
pub use shard::{decode_bundle, BundleWriter, EncodeError, ShardHeader};

use tessera_schema::verify::FrameError;
use tessera_schema::wire;

use crate::entity::QState;
use crate::geometry::{CellId, Vec2, MAX_DEPTH};
use crate::registry::ShardRef;

/// Reads the fixed-size fields a game writes in its own encodings
/// ([`GameLogic::encode_components`]); every read fails cleanly past the end.
///
/// [`GameLogic::encode_components`]: crate::GameLogic::encode_components
pub struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    /// One byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    /// A finite little-endian f32 (NaN and infinities are refused: no game
    /// state needs them and they poison whatever reads them).
    pub fn f32(&mut self) -> Option<f32> {
        self.take()
            .map(f32::from_le_bytes)
            .filter(|v| v.is_finite())
    }

    /// A 0 or 1 byte.
    pub fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// True when every byte was read (an encoding with trailing bytes is
    /// not one the game wrote).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

pub(crate) fn cell_out(c: CellId) -> wire::CellId {
    wire::CellId::new(c.world, c.depth, c.cx, c.cy, c.sub)
}

/// A cell id from the wire: the depth and quadrant path must be possible.
pub(crate) fn cell_in(c: &wire::CellId, field: &'static str) -> Result<CellId, FrameError> {
    let depth = c.depth();
    if depth > MAX_DEPTH || (depth < 16 && u64::from(c.sub()) >> (2 * u32::from(depth)) != 0) {
        return Err(FrameError::BadValue(field));
    }
    Ok(CellId {
        world: c.world(),
        cx: c.cx(),
        cy: c.cy(),
        depth,
        sub: c.sub(),
    })
}

pub(crate) fn shard_out(s: ShardRef) -> wire::Sender {
    wire::Sender::new(s.node, s.shard)
}

pub(crate) fn shard_in(s: &wire::Sender) -> ShardRef {
    ShardRef {
        node: s.node(),
        shard: s.shard(),
    }
}

pub(crate) fn vec_out(v: Vec2) -> wire::Vec2f {
    wire::Vec2f::new(v.x, v.y)
}

/// Positions and velocities must be finite: the owner simulates with them.
pub(crate) fn vec_in(v: &wire::Vec2f, field: &'static str) -> Result<Vec2, FrameError> {
    let v = Vec2::new(v.x(), v.y());
    if v.is_finite() {
        Ok(v)
    } else {
        Err(FrameError::BadValue(field))
    }
}

pub(crate) fn finite(v: f32, field: &'static str) -> Result<f32, FrameError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(FrameError::BadValue(field))
    }
}

pub(crate) fn q_out(q: &QState) -> wire::QStateRec {
    wire::QStateRec::new(
        &wire::QVec2::new(q.pos[0], q.pos[1]),
        &wire::QVec2::new(q.vel[0], q.vel[1]),
        q.heading,
        q.health,
        q.kind,
        q.state,
    )
}

pub(crate) fn q_in(q: &wire::QStateRec) -> QState {
    QState {
        pos: [q.pos().x(), q.pos().y()],
        vel: [q.vel().x(), q.vel().y()],
        heading: q.heading(),
        health: q.health(),
        kind: q.kind(),
        state: q.state(),
    }
}

/// The wire form of a frame header.
pub(crate) fn header_out(h: &ShardHeader) -> wire::FrameHeader {
    wire::FrameHeader::new(
        &cell_out(h.cell),
        h.epoch,
        h.seq,
        &shard_out(h.sender),
        h.tick.0,
    )
}

/// A frame header from the wire.
pub(crate) fn header_in(h: &wire::FrameHeader) -> Result<ShardHeader, FrameError> {
    Ok(ShardHeader {
        cell: cell_in(h.cell(), "header.cell")?,
        epoch: h.epoch(),
        seq: h.seq(),
        sender: shard_in(h.sender()),
        tick: crate::ids::TickId(h.tick()),
    })
}

/// A required field, or the error naming it.
pub(crate) fn need<T>(v: Option<T>, field: &'static str) -> Result<T, FrameError> {
    v.ok_or(FrameError::MissingField(field))
}

#[cfg(test)]
mod tests;
