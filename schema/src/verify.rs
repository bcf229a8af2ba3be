//! Verification of inbound frames with tight, per-family limits.

use flatbuffers::{InvalidFlatbuffer, VerifierOptions};

use crate::wire;

/// The four families of frames, each with its own limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameFamily {
    /// Client -> server: small and frequent.
    Client,
    /// Server -> client.
    Server,
    /// Shard <-> shard: may carry transfers and handover snapshots.
    Shard,
    /// Coordinator <-> node.
    Control,
}

/// Limits applied to one family.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// Largest frame accepted, in bytes.
    pub max_bytes: usize,
    /// flatbuffers verifier: deepest table nesting.
    pub max_depth: usize,
    /// flatbuffers verifier: most tables.
    pub max_tables: usize,
    /// flatbuffers verifier: largest size once shared objects are expanded.
    pub max_apparent_size: usize,
}

impl FrameFamily {
    /// The limits for this family. Client frames are a few hundred bytes;
    /// a shard bundle may hold a whole cell's handover pre-copy (entities
    /// with their players' view histories: megabytes for a crowded cell, up
    /// to the RUDP message limit of 16 MiB).
    pub const fn limits(self) -> FrameLimits {
        match self {
            FrameFamily::Client => FrameLimits {
                max_bytes: 1024,
                max_depth: 6,
                max_tables: 16,
                max_apparent_size: 4096,
            },
            FrameFamily::Server => FrameLimits {
                max_bytes: 64 << 10,
                max_depth: 6,
                max_tables: 64,
                max_apparent_size: 256 << 10,
            },
            FrameFamily::Shard => FrameLimits {
                max_bytes: 16 << 20,
                max_depth: 16,
                max_tables: 4 << 20,
                max_apparent_size: 64 << 20,
            },
            FrameFamily::Control => FrameLimits {
                max_bytes: 4 << 20,
                max_depth: 6,
                max_tables: 1 << 16,
                max_apparent_size: 16 << 20,
            },
        }
    }

    fn options(self) -> VerifierOptions {
        let l = self.limits();
        VerifierOptions {
            max_depth: l.max_depth,
            max_tables: l.max_tables,
            max_apparent_size: l.max_apparent_size,
            ignore_missing_null_terminator: false,
        }
    }
}

/// Why the flatbuffers verifier refused a frame (its error, reduced to a
/// kind that can be counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyFailure {
    /// A required field is absent.
    MissingRequiredField,
    /// A union's type and value disagree.
    InconsistentUnion,
    /// A string is not UTF-8 or not terminated.
    BadString,
    /// A value is misaligned.
    Unaligned,
    /// An offset or range points outside the buffer.
    OutOfBounds,
    /// More tables than the family allows.
    TooManyTables,
    /// Expands to more than the family allows.
    ApparentSizeTooLarge,
    /// Nested deeper than the family allows.
    DepthLimitReached,
}

impl From<&InvalidFlatbuffer> for VerifyFailure {
    fn from(e: &InvalidFlatbuffer) -> Self {
        match e {
            InvalidFlatbuffer::MissingRequiredField { .. } => VerifyFailure::MissingRequiredField,
            InvalidFlatbuffer::InconsistentUnion { .. } => VerifyFailure::InconsistentUnion,
            InvalidFlatbuffer::Utf8Error { .. }
            | InvalidFlatbuffer::MissingNullTerminator { .. } => VerifyFailure::BadString,
            InvalidFlatbuffer::Unaligned { .. } => VerifyFailure::Unaligned,
            InvalidFlatbuffer::RangeOutOfBounds { .. }
            | InvalidFlatbuffer::SignedOffsetOutOfBounds { .. } => VerifyFailure::OutOfBounds,
            InvalidFlatbuffer::TooManyTables => VerifyFailure::TooManyTables,
            InvalidFlatbuffer::ApparentSizeTooLarge => VerifyFailure::ApparentSizeTooLarge,
            InvalidFlatbuffer::DepthLimitReached => VerifyFailure::DepthLimitReached,
        }
    }
}

/// A frame that was refused, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Longer than the family's limit.
    #[error("{family:?} frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The family.
        family: FrameFamily,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The flatbuffers verifier refused it.
    #[error("{family:?} frame failed verification: {failure:?}")]
    Invalid {
        /// The family.
        family: FrameFamily,
        /// What the verifier found.
        failure: VerifyFailure,
    },
    /// The frame carries no message.
    #[error("{0:?} frame carries no message")]
    MissingMessage(FrameFamily),
    /// The union tag is not one this build knows.
    #[error("{family:?} frame has unknown message type {tag}")]
    UnknownMessage {
        /// The family.
        family: FrameFamily,
        /// The tag.
        tag: u8,
    },
    /// A field the message needs is absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A list is longer than allowed.
    #[error("field {field} has {len} items, at most {max} allowed")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value is out of its allowed range.
    #[error("field {0} has an invalid value")]
    BadValue(&'static str),
}

impl FrameError {
    /// A short name for metrics (`reason` label).
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Invalid { .. } => "invalid",
            FrameError::MissingMessage(_) => "missing_message",
            FrameError::UnknownMessage { .. } => "unknown_message",
            FrameError::MissingField(_) => "missing_field",
            FrameError::TooMany { .. } => "too_many",
            FrameError::BadValue(_) => "bad_value",
        }
    }
}

/// Counts of refused frames by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameErrorCounts {
    /// [`FrameError::TooLarge`].
    pub too_large: u64,
    /// [`FrameError::Invalid`].
    pub invalid: u64,
    /// [`FrameError::MissingMessage`].
    pub missing_message: u64,
    /// [`FrameError::UnknownMessage`].
    pub unknown_message: u64,
    /// [`FrameError::MissingField`].
    pub missing_field: u64,
    /// [`FrameError::TooMany`].
    pub too_many: u64,
    /// [`FrameError::BadValue`].
    pub bad_value: u64,
}

impl FrameErrorCounts {
    /// Counts one refusal.
    pub fn record(&mut self, e: &FrameError) {
        let slot = match e {
            FrameError::TooLarge { .. } => &mut self.too_large,
            FrameError::Invalid { .. } => &mut self.invalid,
            FrameError::MissingMessage(_) => &mut self.missing_message,
            FrameError::UnknownMessage { .. } => &mut self.unknown_message,
            FrameError::MissingField(_) => &mut self.missing_field,
            FrameError::TooMany { .. } => &mut self.too_many,
            FrameError::BadValue(_) => &mut self.bad_value,
        };
        *slot += 1;
    }

    /// All refusals.
    pub fn total(&self) -> u64 {
        self.too_large
            + self.invalid
            + self.missing_message
            + self.unknown_message
            + self.missing_field
            + self.too_many
            + self.bad_value
    }

    /// (reason, count) pairs, for metrics.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("too_large", self.too_large),
            ("invalid", self.invalid),
            ("missing_message", self.missing_message),
            ("unknown_message", self.unknown_message),
            ("missing_field", self.missing_field),
            ("too_many", self.too_many),
            ("bad_value", self.bad_value),
        ]
    }
}

fn check<'a, T>(family: FrameFamily, bytes: &'a [u8]) -> Result<T::Inner, FrameError>
where
    T: flatbuffers::Follow<'a> + flatbuffers::Verifiable + 'a,
{
    let max = family.limits().max_bytes;
    if bytes.len() > max {
        return Err(FrameError::TooLarge {
            family,
            len: bytes.len(),
            max,
        });
    }
    flatbuffers::root_with_opts::<T>(&family.options(), bytes).map_err(|e| FrameError::Invalid {
        family,
        failure: VerifyFailure::from(&e),
    })
}

/// Verifies a client frame.
pub fn client_frame(bytes: &[u8]) -> Result<wire::ClientFrame<'_>, FrameError> {
    check::<wire::ClientFrame>(FrameFamily::Client, bytes)
}

/// Verifies a server frame.
pub fn server_frame(bytes: &[u8]) -> Result<wire::ServerFrame<'_>, FrameError> {
    check::<wire::ServerFrame>(FrameFamily::Server, bytes)
}

/// Verifies a shard bundle (every frame's header is checked when it is
/// decoded).
pub fn shard_bundle(bytes: &[u8]) -> Result<wire::ShardBundle<'_>, FrameError> {
    check::<wire::ShardBundle>(FrameFamily::Shard, bytes)
}

/// Verifies a control frame; the header must be present.
pub fn control_frame(bytes: &[u8]) -> Result<wire::ControlFrame<'_>, FrameError> {
    let frame = check::<wire::ControlFrame>(FrameFamily::Control, bytes)?;
    if frame.header().is_none() {
        return Err(FrameError::MissingField("header"));
    }
    Ok(frame)
}
