//! tessera-schema
