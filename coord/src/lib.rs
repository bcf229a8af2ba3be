//! tessera-coord
