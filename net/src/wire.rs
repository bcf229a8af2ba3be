//! The wire format: a fixed little-endian header, small fixed bodies for the
//! handshake packets, and frames inside data packets.
//!
//! Every decode of network bytes here is panic-free and returns a typed
//! [`DecodeError`]; the endpoint counts each reason. The format is described
//! in the crate's README.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First two bytes of every packet ("TS" on the wire).
pub const PROTOCOL_ID: u16 = 0x5354;
/// Version of this wire format; a packet of another version is dropped.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 22;
/// Size of a handshake cookie (a SipHash-2-4-128 tag).
pub const COOKIE_LEN: usize = 16;
/// Handshake requests shorter than this are dropped unanswered. Clients pad
/// them to their MTU; every reply is shorter than this, so the server never
/// sends more bytes than it received (no amplification).
pub const HANDSHAKE_MIN_LEN: usize = 256;
/// Overhead of a whole-message frame: type, channel, id, length.
pub const MESSAGE_FRAME_OVERHEAD: usize = 6;
/// Overhead of a fragment frame: type, channel, id, index, count, total.
pub const FRAGMENT_FRAME_OVERHEAD: usize = 12;
/// Largest total length a fragment frame may announce (the configured
/// limit, 256 KiB by default, is checked after decoding).
pub const FRAGMENTED_LEN_MAX: u32 = 16 << 20;

/// Header flag: the `ack`/`ack_bits` fields are meaningful.
pub const FLAG_HAS_ACK: u8 = 0x01;
/// Header flag: the body is sealed (ChaCha20-Poly1305, the header as
/// associated data) and a 16-byte tag trails the packet.
pub const FLAG_ENCRYPTED: u8 = 0x80;
const FLAGS_KNOWN: u8 = FLAG_HAS_ACK | FLAG_ENCRYPTED;

/// Frame type: ack-eliciting no-op (keepalive, RTT probe).
pub const FRAME_PING: u8 = 0x01;
/// Frame type: a whole message.
pub const FRAME_MESSAGE: u8 = 0x02;
/// Frame type: one fragment of a large message.
pub const FRAME_FRAGMENT: u8 = 0x03;

/// Why bytes from the network were rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed header.
    #[error("datagram of {0} bytes is shorter than the {len}-byte header", len = HEADER_LEN)]
    TooShort(usize),
    /// Not one of ours.
    #[error("unknown protocol id {0:#06x}")]
    BadProtocolId(u16),
    /// One of ours, but another version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Unknown packet type.
    #[error("unknown packet type {0}")]
    UnknownPacketType(u8),
    /// Unknown flag bits or a non-zero reserved byte.
    #[error("reserved header bits are set")]
    ReservedBits,
    /// A handshake/control body is shorter than its fixed size.
    #[error("packet body is truncated")]
    TruncatedBody,
    /// A control body is longer than its fixed size (a data packet whose
    /// type byte was damaged into a disconnect, for one: it must not close
    /// the connection).
    #[error("packet body has {0} bytes past its fixed size")]
    TrailingBody(usize),
    /// Unknown frame type inside a data packet.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A frame runs past the end of the packet.
    #[error("frame is truncated")]
    TruncatedFrame,
    /// A fragment frame whose index, count and total do not agree.
    #[error("inconsistent fragment header")]
    BadFragment,
}

/// Packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Client -> server, padded: "I want to connect".
    ConnectRequest = 1,
    /// Server -> client: a stateless cookie to echo back.
    Challenge = 2,
    /// Client -> server, padded: the echoed cookie.
    ConnectResponse = 3,
    /// Server -> client: the connection exists; carries the server's id.
    Accept = 4,
    /// Server -> client: refused, with a reason.
    Reject = 5,
    /// Frames (messages, fragments, pings) or nothing (ack-only).
    Data = 6,
    /// Graceful close with a reason code.
    Disconnect = 7,
}

impl PacketType {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::ConnectRequest,
            2 => Self::Challenge,
            3 => Self::ConnectResponse,
            4 => Self::Accept,
            5 => Self::Reject,
            6 => Self::Data,
            7 => Self::Disconnect,
            _ => return None,
        })
    }
}

/// The header exactly as it is on the wire (22 bytes, little-endian, no
/// padding, any alignment).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawHeader {
    /// [`PROTOCOL_ID`].
    pub protocol_id: U16,
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// A [`PacketType`].
    pub packet_type: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Zero (room for a key phase / token flag later).
    pub reserved: u8,
    /// The receiver's id for this connection (0 in handshake requests).
    pub connection_id: U32,
    /// Packet sequence number (wrapping).
    pub seq: U16,
    /// Newest packet sequence received from the peer.
    pub ack: U16,
    /// Bit `i` set: packet `ack - 1 - i` was received too.
    pub ack_bits: U64,
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == HEADER_LEN);

/// A decoded, validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What follows the header.
    pub packet_type: PacketType,
    /// The receiver's id for this connection.
    pub connection_id: u32,
    /// Packet sequence number.
    pub seq: u16,
    /// `(ack, ack_bits)` when the sender has received anything.
    pub ack: Option<(u16, u64)>,
    /// The body is sealed ([`FLAG_ENCRYPTED`]): only a session's keys read it.
    pub sealed: bool,
}

impl Header {
    /// A header without sequence or ack (handshake and control packets).
    pub fn control(packet_type: PacketType, connection_id: u32) -> Self {
        Self {
            packet_type,
            connection_id,
            seq: 0,
            ack: None,
            sealed: false,
        }
    }

    /// Appends the 22 header bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (ack, ack_bits, mut flags) = match self.ack {
            Some((ack, bits)) => (ack, bits, FLAG_HAS_ACK),
            None => (0, 0, 0),
        };
        if self.sealed {
            flags |= FLAG_ENCRYPTED;
        }
        let raw = RawHeader {
            protocol_id: U16::new(PROTOCOL_ID),
            version: PROTOCOL_VERSION,
            packet_type: self.packet_type as u8,
            flags,
            reserved: 0,
            connection_id: U32::new(self.connection_id),
            seq: U16::new(self.seq),
            ack: U16::new(ack),
            ack_bits: U64::new(ack_bits),
        };
        out.extend_from_slice(raw.as_bytes());
    }
}

/// Splits a datagram into its validated header and the rest.
pub fn decode_header(bytes: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
    let (raw, body) =
        RawHeader::read_from_prefix(bytes).map_err(|_| DecodeError::TooShort(bytes.len()))?;
    if raw.protocol_id.get() != PROTOCOL_ID {
        return Err(DecodeError::BadProtocolId(raw.protocol_id.get()));
    }
    if raw.version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(raw.version));
    }
    let packet_type = PacketType::from_u8(raw.packet_type)
        .ok_or(DecodeError::UnknownPacketType(raw.packet_type))?;
    if raw.flags & !FLAGS_KNOWN != 0 || raw.reserved != 0 {
        return Err(DecodeError::ReservedBits);
    }
    let ack = (raw.flags & FLAG_HAS_ACK != 0).then(|| (raw.ack.get(), raw.ack_bits.get()));
    Ok((
        Header {
            packet_type,
            connection_id: raw.connection_id.get(),
            seq: raw.seq.get(),
            ack,
            sealed: raw.flags & FLAG_ENCRYPTED != 0,
        },
        body,
    ))
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, error: DecodeError) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(error);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self, error: DecodeError) -> Result<u8, DecodeError> {
        Ok(self.take(1, error)?[0])
    }
    fn u16(&mut self, error: DecodeError) -> Result<u16, DecodeError> {
        let b = self.take(2, error)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, error: DecodeError) -> Result<u32, DecodeError> {
        let b = self.take(4, error)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cookie(&mut self) -> Result<[u8; COOKIE_LEN], DecodeError> {
        let b = self.take(COOKIE_LEN, DecodeError::TruncatedBody)?;
        let mut cookie = [0; COOKIE_LEN];
        cookie.copy_from_slice(b);
        Ok(cookie)
    }
}

/// Body of a `ConnectRequest` (followed by padding up to the client's MTU;
/// the padding is room for a connect token later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Hash of the channel layout and limits; both sides must agree.
    pub config_hash: u32,
    /// The client's id for this connection (the server addresses it so).
    pub client_id: u32,
}

/// Body of a `Challenge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Cookie period the cookie was minted in.
    pub period: u32,
    /// MAC over (period, client address, client id).
    pub cookie: [u8; COOKIE_LEN],
}

/// Body of a `ConnectResponse` (padded like the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectResponse {
    /// As in the request.
    pub config_hash: u32,
    /// As in the request.
    pub client_id: u32,
    /// Echoed from the challenge.
    pub period: u32,
    /// Echoed from the challenge.
    pub cookie: [u8; COOKIE_LEN],
}

impl ConnectResponse {
    /// Length of the fixed fields (the connect token follows again, then
    /// padding: the server keeps no state between request and response).
    pub const LEN: usize = 12 + COOKIE_LEN;
}

impl ConnectRequest {
    /// Length of the fixed fields (a connect token follows, then padding).
    pub const LEN: usize = 8;

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.config_hash.to_le_bytes());
        out.extend_from_slice(&self.client_id.to_le_bytes());
    }
    /// Reads the body; padding after it is ignored.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes: body };
        Ok(Self {
            config_hash: r.u32(DecodeError::TruncatedBody)?,
            client_id: r.u32(DecodeError::TruncatedBody)?,
        })
    }
}

impl Challenge {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.period.to_le_bytes());
        out.extend_from_slice(&self.cookie);
    }
    /// Reads the body.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes: body };
        Ok(Self {
            period: r.u32(DecodeError::TruncatedBody)?,
            cookie: r.cookie()?,
        })
    }
}

impl ConnectResponse {
    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.config_hash.to_le_bytes());
        out.extend_from_slice(&self.client_id.to_le_bytes());
        out.extend_from_slice(&self.period.to_le_bytes());
        out.extend_from_slice(&self.cookie);
    }
    /// Reads the body; padding after it is ignored.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes: body };
        Ok(Self {
            config_hash: r.u32(DecodeError::TruncatedBody)?,
            client_id: r.u32(DecodeError::TruncatedBody)?,
            period: r.u32(DecodeError::TruncatedBody)?,
            cookie: r.cookie()?,
        })
    }
}

/// Reads a 4-byte body (`Accept`: the server's id).
pub fn decode_u32_body(body: &[u8]) -> Result<u32, DecodeError> {
    Reader { bytes: body }.u32(DecodeError::TruncatedBody)
}

/// Reads a 1-byte body (`Reject`: the reason).
pub fn decode_u8_body(body: &[u8]) -> Result<u8, DecodeError> {
    Reader { bytes: body }.u8(DecodeError::TruncatedBody)
}

/// Reads a 2-byte body (`Disconnect`: the reason code).
pub fn decode_u16_body(body: &[u8]) -> Result<u16, DecodeError> {
    if body.len() > 2 {
        return Err(DecodeError::TrailingBody(body.len() - 2));
    }
    Reader { bytes: body }.u16(DecodeError::TruncatedBody)
}

/// One frame of a data packet, borrowing the packet's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Elicits an ack; nothing else.
    Ping,
    /// A whole message.
    Message {
        /// Channel index.
        channel: u8,
        /// Per-channel message id (wrapping).
        id: u16,
        /// The message.
        payload: &'a [u8],
    },
    /// One fragment of a message.
    Fragment(FragmentFrame<'a>),
}

/// A fragment frame. Fragment `index` covers the bytes given by
/// [`fragment_span`]`(total, count, index)`; its length is implied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentFrame<'a> {
    /// Channel index.
    pub channel: u8,
    /// Per-channel message id (wrapping).
    pub id: u16,
    /// Which fragment.
    pub index: u16,
    /// How many fragments (at least 2).
    pub count: u16,
    /// Length of the whole message.
    pub total: u32,
    /// This fragment's bytes.
    pub payload: &'a [u8],
}

/// How a message of `total` bytes is cut when a fragment holds at most
/// `fragment_max` bytes: `(count, size)`, every fragment but the last is
/// `size` bytes. `size = ceil(total / count)`, so the receiver can derive it
/// from `total` and `count` alone.
pub fn fragment_layout(total: usize, fragment_max: usize) -> (usize, usize) {
    let fragment_max = fragment_max.max(1);
    let count = total.div_ceil(fragment_max).max(1);
    (count, total.div_ceil(count))
}

/// `(offset, len)` of fragment `index`, or `None` when the three numbers
/// cannot come from [`fragment_layout`].
pub fn fragment_span(total: u32, count: u16, index: u16) -> Option<(usize, usize)> {
    if count < 2 || index >= count || total > FRAGMENTED_LEN_MAX {
        return None;
    }
    let total = total as usize;
    let count = count as usize;
    let size = total.div_ceil(count);
    let before_last = size * (count - 1);
    // The last fragment must hold at least one byte, and fragments must fit
    // a frame length.
    if before_last >= total || size > u16::MAX as usize {
        return None;
    }
    let index = index as usize;
    let offset = size * index;
    let len = if index + 1 == count {
        total - before_last
    } else {
        size
    };
    Some((offset, len))
}

/// Iterates the frames of a data packet body. Yields at most one error,
/// then stops.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Frames of `body` (the bytes after the header).
    pub fn new(body: &'a [u8]) -> Self {
        Self {
            rest: body,
            failed: false,
        }
    }

    fn next_frame(&mut self) -> Result<Frame<'a>, DecodeError> {
        let mut r = Reader { bytes: self.rest };
        let t = DecodeError::TruncatedFrame;
        let frame = match r.u8(t)? {
            FRAME_PING => Frame::Ping,
            FRAME_MESSAGE => {
                let channel = r.u8(t)?;
                let id = r.u16(t)?;
                let len = r.u16(t)? as usize;
                let payload = r.take(len, t)?;
                Frame::Message {
                    channel,
                    id,
                    payload,
                }
            }
            FRAME_FRAGMENT => {
                let channel = r.u8(t)?;
                let id = r.u16(t)?;
                let index = r.u16(t)?;
                let count = r.u16(t)?;
                let total = r.u32(t)?;
                let (_, len) =
                    fragment_span(total, count, index).ok_or(DecodeError::BadFragment)?;
                let payload = r.take(len, t)?;
                Frame::Fragment(FragmentFrame {
                    channel,
                    id,
                    index,
                    count,
                    total,
                    payload,
                })
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        self.rest = r.bytes;
        Ok(frame)
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let result = self.next_frame();
        if result.is_err() {
            self.failed = true;
        }
        Some(result)
    }
}

/// Appends a ping frame.
pub fn write_ping(out: &mut Vec<u8>) {
    out.push(FRAME_PING);
}

/// Appends a whole-message frame. `payload` must be at most `u16::MAX` bytes.
pub fn write_message(out: &mut Vec<u8>, channel: u8, id: u16, payload: &[u8]) {
    debug_assert!(payload.len() <= u16::MAX as usize);
    out.push(FRAME_MESSAGE);
    out.push(channel);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends a fragment frame; `payload` must be the span
/// [`fragment_span`]`(total, count, index)` of the message.
pub fn write_fragment(
    out: &mut Vec<u8>,
    channel: u8,
    id: u16,
    index: u16,
    count: u16,
    total: u32,
    payload: &[u8],
) {
    out.push(FRAME_FRAGMENT);
    out.push(channel);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Maps a wrapping 16-bit number to the 64-bit number nearest to
/// `reference`; `None` when that would be negative.
pub fn unwrap_u16(reference: u64, wire: u16) -> Option<u64> {
    let diff = wire.wrapping_sub(reference as u16) as i16 as i64;
    let value = reference as i64 + diff;
    (value >= 0).then_some(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_roundtrip() {
        let header = Header {
            packet_type: PacketType::Data,
            connection_id: 0xDEAD_BEEF,
            seq: 65535,
            ack: Some((12, u64::MAX - 5)),
            sealed: true,
        };
        let mut out = Vec::new();
        header.encode(&mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(&out[..2], &[0x54, 0x53]);
        let (decoded, rest) = decode_header(&out).unwrap();
        assert_eq!(decoded, header);
        assert!(rest.is_empty());
    }

    #[test]
    fn header_rejections() {
        let mut out = Vec::new();
        Header::control(PacketType::Accept, 1).encode(&mut out);
        assert_eq!(decode_header(&out[..21]), Err(DecodeError::TooShort(21)));
        let mut bad = out.clone();
        bad[0] = 0;
        assert!(matches!(
            decode_header(&bad),
            Err(DecodeError::BadProtocolId(_))
        ));
        let mut bad = out.clone();
        bad[2] = 9;
        assert_eq!(decode_header(&bad), Err(DecodeError::UnsupportedVersion(9)));
        let mut bad = out.clone();
        bad[3] = 0;
        assert_eq!(decode_header(&bad), Err(DecodeError::UnknownPacketType(0)));
        let mut bad = out.clone();
        bad[4] = 0x40;
        assert_eq!(decode_header(&bad), Err(DecodeError::ReservedBits));
        let mut sealed = out.clone();
        sealed[4] = FLAG_ENCRYPTED;
        assert!(decode_header(&sealed).unwrap().0.sealed);
        let mut bad = out;
        bad[5] = 1;
        assert_eq!(decode_header(&bad), Err(DecodeError::ReservedBits));
    }

    #[test]
    fn fragment_layout_edges() {
        for total in [2usize, 3, 100, 1000, 1001, 1999, 2000, 2001, 256 * 1024] {
            for max in [1usize, 7, 1000, 1188] {
                let (count, size) = fragment_layout(total, max);
                assert!(size <= max);
                if count < 2 {
                    assert!(total <= max);
                    continue;
                }
                if count > u16::MAX as usize {
                    continue;
                }
                let mut covered = 0;
                for index in 0..count {
                    let (offset, len) =
                        fragment_span(total as u32, count as u16, index as u16).unwrap();
                    assert_eq!(offset, covered);
                    assert!(len >= 1 && len <= size);
                    covered += len;
                }
                assert_eq!(covered, total, "total {total} max {max}");
            }
        }
        assert_eq!(fragment_span(10, 1, 0), None);
        assert_eq!(fragment_span(10, 2, 2), None);
        // ceil(9/4) = 3, 3*3 = 9: the last fragment would be empty.
        assert_eq!(fragment_span(9, 4, 0), None);
        assert_eq!(fragment_span(FRAGMENTED_LEN_MAX + 1, 300, 0), None);
    }

    #[test]
    fn unwrap_is_nearest() {
        assert_eq!(unwrap_u16(0, 0), Some(0));
        assert_eq!(unwrap_u16(0, 65535), None);
        assert_eq!(unwrap_u16(65535, 0), Some(65536));
        assert_eq!(unwrap_u16(70000, 70000u64 as u16), Some(70000));
        assert_eq!(unwrap_u16(70000, (70000u64 - 100) as u16), Some(69900));
        assert_eq!(unwrap_u16(70000, (70000u64 + 32767) as u16), Some(102767));
    }

    proptest! {
        #[test]
        fn frames_roundtrip(
            messages in proptest::collection::vec((any::<u8>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..6),
            fragment in (2u16..20, any::<u16>(), 40u32..4000),
        ) {
            let mut out = Vec::new();
            write_ping(&mut out);
            for (channel, id, payload) in &messages {
                write_message(&mut out, *channel, *id, payload);
            }
            let (count, total) = (fragment.0, fragment.2.max(fragment.0 as u32 * 2));
            let message: Vec<u8> = (0..total).map(|i| i as u8).collect();
            let spans: Vec<_> = (0..count).filter_map(|i| fragment_span(total, count, i).map(|s| (i, s))).collect();
            for (index, (offset, len)) in &spans {
                write_fragment(&mut out, 3, fragment.1, *index, count, total, &message[*offset..offset + len]);
            }
            let frames: Vec<_> = Frames::new(&out).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(frames.len(), 1 + messages.len() + spans.len());
            prop_assert_eq!(frames[0], Frame::Ping);
            for (frame, (channel, id, payload)) in frames[1..].iter().zip(&messages) {
                prop_assert_eq!(*frame, Frame::Message { channel: *channel, id: *id, payload });
            }
            for (frame, (index, (offset, len))) in frames[1 + messages.len()..].iter().zip(&spans) {
                match frame {
                    Frame::Fragment(f) => {
                        prop_assert_eq!(f.index, *index);
                        prop_assert_eq!(f.payload, &message[*offset..offset + len]);
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((_, body)) = decode_header(&bytes) {
                for frame in Frames::new(body) { let _ = frame; }
            }
            for frame in Frames::new(&bytes) { let _ = frame; }
            let _ = ConnectRequest::decode(&bytes);
            let _ = ConnectResponse::decode(&bytes);
            let _ = Challenge::decode(&bytes);
        }
    }
}
