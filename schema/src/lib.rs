//! Tessera's wire schemas.
//!
//! The `.fbs` files in `schema/fbs/` define every frame the system carries:
//! client -> server, server -> client, shard <-> shard and control. The Rust
//! code flatc 25.12.19 generates from them is committed under
//! `src/generated/` (regenerate with `tools/gen-schema.sh`; CI checks it is
//! current) and re-exported as [`wire`].
//!
//! Every frame read from the network goes through [`verify`], which applies
//! tight per-family verifier limits and returns a typed [`FrameError`]
//! (counted with [`FrameErrorCounts`]); nothing here panics on bad bytes.
//! [`client`] and [`server`] turn frames into owned, validated messages and
//! back.
#![warn(missing_docs)]

#[rustfmt::skip]
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unused_imports,
    dead_code,
    deprecated,
    non_camel_case_types,
    non_snake_case,
    unsafe_op_in_unsafe_fn,
    mismatched_lifetime_syntaxes
)]
#[path = "generated/tessera_generated.rs"]
mod generated;

pub mod client;
pub mod protocol;
pub mod quant;
pub mod server;
pub mod verify;

/// The generated FlatBuffers types (`tessera.wire` namespace).
pub use generated::tessera::wire;
pub use verify::{FrameError, FrameErrorCounts, FrameFamily};

/// Re-exported so that users build frames with the same flatbuffers version.
pub use flatbuffers;
