//! Quantisation of positions, velocities and headings on the wire.
//!
//! Positions travel as centimetres in an `i32` (±21,000 km), velocities as
//! cm/s, headings as a signed 16-bit fraction of a half turn. Views compare
//! quantised values, so an entity whose movement is below the resolution
//! produces no update.

use crate::wire::QVec2;

/// Units per metre on the wire.
pub const CM_PER_M: f32 = 100.0;

/// Metres -> wire centimetres (saturating; NaN becomes 0).
#[inline]
pub fn quantize(meters: f32) -> i32 {
    // `as` saturates on overflow and maps NaN to 0: exactly what we want.
    (meters * CM_PER_M).round() as i32
}

/// Wire centimetres -> metres.
#[inline]
pub fn dequantize(cm: i32) -> f32 {
    cm as f32 / CM_PER_M
}

/// A 2D vector in metres -> wire.
#[inline]
pub fn qvec(x: f32, y: f32) -> QVec2 {
    QVec2::new(quantize(x), quantize(y))
}

/// Radians -> wire heading.
#[inline]
pub fn quantize_heading(radians: f32) -> i16 {
    let wrapped =
        (radians + std::f32::consts::PI).rem_euclid(std::f32::consts::TAU) - std::f32::consts::PI;
    (wrapped / std::f32::consts::PI * 32767.0).round() as i16
}

/// Wire heading -> radians in [-pi, pi].
#[inline]
pub fn dequantize_heading(h: i16) -> f32 {
    f32::from(h) / 32767.0 * std::f32::consts::PI
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn positions_round_trip_within_half_a_centimetre(m in -100_000.0f32..100_000.0) {
            let back = dequantize(quantize(m));
            prop_assert!((back - m).abs() <= 0.005 + m.abs() * 1e-6, "{m} -> {back}");
        }

        #[test]
        fn headings_round_trip(r in -10.0f32..10.0) {
            let back = dequantize_heading(quantize_heading(r));
            let diff = (back - r).rem_euclid(std::f32::consts::TAU);
            let diff = diff.min(std::f32::consts::TAU - diff);
            prop_assert!(diff < 1e-3, "{r} -> {back}");
        }
    }

    #[test]
    fn nan_and_infinity_do_not_panic() {
        assert_eq!(quantize(f32::NAN), 0);
        assert_eq!(quantize(f32::INFINITY), i32::MAX);
        assert_eq!(quantize(f32::NEG_INFINITY), i32::MIN);
        let _ = quantize_heading(f32::NAN);
    }
}
