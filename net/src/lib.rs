//! Tessera's reliable UDP transport (filled by the RUDP issue).
#![warn(missing_docs)]
