//! The uniform spatial hash inside a cell: "who is within R of me".
//!
//! Rebuilt every tick by a counting sort of the items into the buckets of a
//! dense grid covering the cell plus its ghost margin, so a query is a scan
//! of contiguous slices. Items outside the grid go to the nearest edge
//! bucket: queries stay correct, only slower for them.

use crate::geometry::{Rect, Vec2};

/// A grid of buckets over an area.
#[derive(Clone, Debug, Default)]
pub struct SpatialHash {
    origin: Vec2,
    bucket: f32,
    columns: usize,
    rows: usize,
    /// Start of each bucket in `order` (length buckets + 1).
    starts: Vec<u32>,
    /// Item indices, grouped by bucket.
    order: Vec<u32>,
    /// Positions, in `order` order (so a bucket's positions are contiguous).
    xs: Vec<f32>,
    ys: Vec<f32>,
    keys: Vec<u32>,
}

impl SpatialHash {
    /// An empty hash.
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&self, p: Vec2) -> u32 {
        let cx = ((p.x - self.origin.x) / self.bucket)
            .floor()
            .clamp(0.0, (self.columns - 1) as f32) as usize;
        let cy = ((p.y - self.origin.y) / self.bucket)
            .floor()
            .clamp(0.0, (self.rows - 1) as f32) as usize;
        (cy * self.columns + cx) as u32
    }

    /// Rebuilds over `area` with square buckets of `bucket` metres from the
    /// positions of items `0..positions.len()`.
    pub fn rebuild(&mut self, area: Rect, bucket: f32, positions: &[Vec2]) {
        self.origin = area.min;
        self.bucket = bucket.max(1.0);
        self.columns = ((area.width() / self.bucket).ceil() as usize).max(1);
        self.rows = ((area.height() / self.bucket).ceil() as usize).max(1);
        let buckets = self.columns * self.rows;
        self.starts.clear();
        self.starts.resize(buckets + 1, 0);
        self.keys.clear();
        for p in positions {
            let k = self.key(*p);
            self.keys.push(k);
            self.starts[k as usize + 1] += 1;
        }
        for i in 0..buckets {
            self.starts[i + 1] += self.starts[i];
        }
        let n = positions.len();
        self.order.clear();
        self.order.resize(n, 0);
        self.xs.clear();
        self.xs.resize(n, 0.0);
        self.ys.clear();
        self.ys.resize(n, 0.0);
        // Fill each bucket from its start; `cursor` reuses `keys` storage order.
        let mut cursor: Vec<u32> = self.starts[..buckets].to_vec();
        for (i, (k, p)) in self.keys.iter().zip(positions).enumerate() {
            let slot = cursor[*k as usize] as usize;
            cursor[*k as usize] += 1;
            self.order[slot] = i as u32;
            self.xs[slot] = p.x;
            self.ys[slot] = p.y;
        }
    }

    /// Calls `f(item, distance_squared)` for every item within `radius` of
    /// `center`.
    #[inline]
    pub fn for_each_within(&self, center: Vec2, radius: f32, mut f: impl FnMut(u32, f32)) {
        if self.order.is_empty() {
            return;
        }
        let r2 = radius * radius;
        let min = self.key(Vec2::new(center.x - radius, center.y - radius)) as usize;
        let max = self.key(Vec2::new(center.x + radius, center.y + radius)) as usize;
        let (x0, y0) = (min % self.columns, min / self.columns);
        let (x1, y1) = (max % self.columns, max / self.columns);
        for by in y0..=y1 {
            let row = by * self.columns;
            // Buckets of one row are adjacent in `order`: scan them as one slice.
            let start = self.starts[row + x0] as usize;
            let end = self.starts[row + x1 + 1] as usize;
            let xs = &self.xs[start..end];
            let ys = &self.ys[start..end];
            for (j, (x, y)) in xs.iter().zip(ys).enumerate() {
                let dx = x - center.x;
                let dy = y - center.y;
                let d2 = dx * dx + dy * dy;
                if d2 <= r2 {
                    f(self.order[start + j], d2);
                }
            }
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True if no item.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn matches_brute_force_including_items_outside_the_grid() {
        let mut rng = Rng::new(3);
        let area = Rect::new(Vec2::new(0.0, 0.0), Vec2::new(128.0, 128.0));
        let pts: Vec<Vec2> = (0..2000)
            .map(|_| Vec2::new(rng.range(-80.0, 210.0), rng.range(-80.0, 210.0)))
            .collect();
        let mut h = SpatialHash::new();
        h.rebuild(area.expand(60.0), 16.0, &pts);
        for _ in 0..200 {
            let c = Vec2::new(rng.range(-70.0, 200.0), rng.range(-70.0, 200.0));
            let r = rng.range(0.0, 70.0);
            let mut got = Vec::new();
            h.for_each_within(c, r, |i, _| got.push(i));
            got.sort();
            let want: Vec<u32> = (0..pts.len() as u32)
                .filter(|&i| pts[i as usize].distance_squared(c) <= r * r)
                .collect();
            assert_eq!(got, want);
        }
    }
}
