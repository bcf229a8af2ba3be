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
        let (x0, x1, y0, y1) = self.square(center, radius);
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

    /// The bucket columns and rows `(x0, x1, y0, y1)` covering the square
    /// around the circle.
    fn square(&self, center: Vec2, radius: f32) -> (usize, usize, usize, usize) {
        let min = self.key(Vec2::new(center.x - radius, center.y - radius)) as usize;
        let max = self.key(Vec2::new(center.x + radius, center.y + radius)) as usize;
        (
            min % self.columns,
            max % self.columns,
            min / self.columns,
            max / self.columns,
        )
    }

    /// Items in the buckets covering the square around the circle: one
    /// subtraction per row thanks to the prefix sums in `starts`.
    fn count_in_square(&self, center: Vec2, radius: f32) -> usize {
        let (x0, x1, y0, y1) = self.square(center, radius);
        (y0..=y1)
            .map(|by| {
                let row = by * self.columns;
                (self.starts[row + x1 + 1] - self.starts[row + x0]) as usize
            })
            .sum()
    }

    /// Like [`for_each_within`](Self::for_each_within), visiting buckets in
    /// rings of growing distance, and stopping early once `enough` accepted
    /// items (those for which `f` returns true) lie closer than anything not
    /// visited yet: the `enough` nearest accepted items are then among those
    /// seen. In a crowd this visits a few buckets instead of the whole radius;
    /// with at most `2 * enough` items under the circle's square it scans
    /// those rows like `for_each_within` (all items within `radius`).
    /// `scratch` is a reusable buffer.
    pub fn for_each_nearest(
        &self,
        center: Vec2,
        radius: f32,
        enough: usize,
        scratch: &mut Vec<f32>,
        mut f: impl FnMut(u32, f32) -> bool,
    ) {
        scratch.clear();
        if self.order.is_empty() {
            return;
        }
        // Few items around: the walk could not stop much before the end, and
        // a scan of contiguous rows costs less than the walk bucket by bucket.
        if self.count_in_square(center, radius) <= 2 * enough {
            self.for_each_within(center, radius, |i, d2| {
                f(i, d2);
            });
            return;
        }
        let r2 = radius * radius;
        let bx = ((center.x - self.origin.x) / self.bucket).floor() as i64;
        let by = ((center.y - self.origin.y) / self.bucket).floor() as i64;
        let (cols, rows) = (self.columns as i64, self.rows as i64);
        let bx = bx.clamp(0, cols - 1);
        let by = by.clamp(0, rows - 1);
        // The centre lies inside bucket (bx, by): ring k is at least
        // (k - 1) buckets away, so rings beyond radius/bucket + 1 are out.
        let reach = (radius / self.bucket).ceil() as i64 + 1;
        let accepted_d2 = scratch;
        let (origin, size) = (self.origin, self.bucket);
        let mut visit = |b: usize, accepted_d2: &mut Vec<f32>| {
            let (start, end) = (self.starts[b] as usize, self.starts[b + 1] as usize);
            if start == end {
                return;
            }
            // Skip buckets entirely outside the circle (the ring's corners).
            let (x, y) = ((b % self.columns) as f32, (b / self.columns) as f32);
            let min = Vec2::new(origin.x + x * size, origin.y + y * size);
            let rect = crate::geometry::Rect::new(min, Vec2::new(min.x + size, min.y + size));
            let edge_bucket = b % self.columns == 0
                || b % self.columns == self.columns - 1
                || b / self.columns == 0
                || b / self.columns == self.rows - 1;
            if !edge_bucket && rect.distance_squared(center) > r2 {
                return;
            }
            for j in start..end {
                let dx = self.xs[j] - center.x;
                let dy = self.ys[j] - center.y;
                let d2 = dx * dx + dy * dy;
                if d2 <= r2 && f(self.order[j], d2) {
                    accepted_d2.push(d2);
                }
            }
        };
        for k in 0..=reach {
            let (x0, x1, y0, y1) = (bx - k, bx + k, by - k, by + k);
            if x0 < 0 && y0 < 0 && x1 >= cols && y1 >= rows && k > 0 {
                break;
            }
            for y in [y0, y1] {
                if (0..rows).contains(&y) {
                    for x in x0.max(0)..=x1.min(cols - 1) {
                        visit((y * cols + x) as usize, accepted_d2);
                    }
                }
                if k == 0 {
                    break;
                }
            }
            for x in [x0, x1] {
                if k > 0 && (0..cols).contains(&x) {
                    for y in (y0 + 1).max(0)..=(y1 - 1).min(rows - 1) {
                        visit((y * cols + x) as usize, accepted_d2);
                    }
                }
            }
            if accepted_d2.len() >= enough {
                // Distance from the centre to the nearest unvisited bucket;
                // a side at the grid's edge has nothing beyond it.
                let side = |lo: i64, hi: i64, c: f32, origin: f32, n: i64| -> f32 {
                    let low = if lo <= 0 {
                        f32::INFINITY
                    } else {
                        c - (origin + lo as f32 * self.bucket)
                    };
                    let high = if hi >= n - 1 {
                        f32::INFINITY
                    } else {
                        origin + (hi + 1) as f32 * self.bucket - c
                    };
                    low.min(high)
                };
                let safe = side(x0, x1, center.x, self.origin.x, cols).min(side(
                    y0,
                    y1,
                    center.y,
                    self.origin.y,
                    rows,
                ));
                let safe2 = safe * safe;
                if accepted_d2.iter().filter(|d| **d <= safe2).count() >= enough {
                    return;
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

    #[test]
    fn nearest_search_finds_the_same_nearest_items() {
        let mut rng = Rng::new(9);
        let area = Rect::new(Vec2::new(0.0, 0.0), Vec2::new(128.0, 128.0));
        for n in [10usize, 300, 3000] {
            let pts: Vec<Vec2> = (0..n)
                .map(|_| Vec2::new(rng.range(-30.0, 160.0), rng.range(-30.0, 160.0)))
                .collect();
            let mut h = SpatialHash::new();
            h.rebuild(area.expand(60.0), 8.0, &pts);
            for _ in 0..100 {
                let c = Vec2::new(rng.range(-20.0, 150.0), rng.range(-20.0, 150.0));
                let (r, k) = (rng.range(5.0, 70.0), 1 + rng.below(60) as usize);
                // Accept only odd items, like a filter on membership.
                let mut got = Vec::new();
                let mut scratch = Vec::new();
                h.for_each_nearest(c, r, k, &mut scratch, |i, d2| {
                    let ok = i % 2 == 1;
                    if ok {
                        got.push((d2, i));
                    }
                    ok
                });
                got.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                got.truncate(k);
                let mut want: Vec<(f32, u32)> = (0..n as u32)
                    .filter(|i| i % 2 == 1)
                    .map(|i| (pts[i as usize].distance_squared(c), i))
                    .filter(|(d2, _)| *d2 <= r * r)
                    .collect();
                want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                want.truncate(k);
                assert_eq!(
                    got.iter().map(|g| g.1).collect::<Vec<_>>(),
                    want.iter().map(|w| w.1).collect::<Vec<_>>()
                );
            }
        }
    }
}
