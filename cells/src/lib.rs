//! tessera-cells
