//! Positions, rectangles, cell ids and the quadtree layout of the world.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::{Add, AddAssign, Mul, Sub};

/// A point or vector in metres.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Vec2 {
    /// East.
    pub x: f32,
    /// North.
    pub y: f32,
}

impl Vec2 {
    /// Builds a vector.
    pub const fn new(x: f32, y: f32) -> Self {
        Self { x, y }
    }

    /// Squared length.
    #[inline]
    pub fn length_squared(self) -> f32 {
        self.x * self.x + self.y * self.y
    }

    /// Length.
    #[inline]
    pub fn length(self) -> f32 {
        self.length_squared().sqrt()
    }

    /// Squared distance to `other`.
    #[inline]
    pub fn distance_squared(self, other: Vec2) -> f32 {
        (self - other).length_squared()
    }

    /// True if both components are finite.
    pub fn is_finite(self) -> bool {
        self.x.is_finite() && self.y.is_finite()
    }
}

impl Add for Vec2 {
    type Output = Vec2;
    fn add(self, o: Vec2) -> Vec2 {
        Vec2::new(self.x + o.x, self.y + o.y)
    }
}

impl AddAssign for Vec2 {
    fn add_assign(&mut self, o: Vec2) {
        self.x += o.x;
        self.y += o.y;
    }
}

impl Sub for Vec2 {
    type Output = Vec2;
    fn sub(self, o: Vec2) -> Vec2 {
        Vec2::new(self.x - o.x, self.y - o.y)
    }
}

impl Mul<f32> for Vec2 {
    type Output = Vec2;
    fn mul(self, k: f32) -> Vec2 {
        Vec2::new(self.x * k, self.y * k)
    }
}

/// An axis-aligned rectangle, half-open: `[min, max)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rect {
    /// South-west corner (inclusive).
    pub min: Vec2,
    /// North-east corner (exclusive).
    pub max: Vec2,
}

impl Rect {
    /// Builds a rectangle.
    pub const fn new(min: Vec2, max: Vec2) -> Self {
        Self { min, max }
    }

    /// True if `p` lies inside (min inclusive, max exclusive).
    #[inline]
    pub fn contains(&self, p: Vec2) -> bool {
        p.x >= self.min.x && p.x < self.max.x && p.y >= self.min.y && p.y < self.max.y
    }

    /// Squared distance from `p` to the rectangle (0 inside).
    #[inline]
    pub fn distance_squared(&self, p: Vec2) -> f32 {
        let dx = (self.min.x - p.x).max(0.0).max(p.x - self.max.x);
        let dy = (self.min.y - p.y).max(0.0).max(p.y - self.max.y);
        dx * dx + dy * dy
    }

    /// The rectangle grown by `d` on every side.
    pub fn expand(&self, d: f32) -> Rect {
        Rect::new(
            Vec2::new(self.min.x - d, self.min.y - d),
            Vec2::new(self.max.x + d, self.max.y + d),
        )
    }

    /// Width.
    pub fn width(&self) -> f32 {
        self.max.x - self.min.x
    }

    /// Height.
    pub fn height(&self) -> f32 {
        self.max.y - self.min.y
    }

    /// The centre.
    pub fn center(&self) -> Vec2 {
        Vec2::new(
            (self.min.x + self.max.x) * 0.5,
            (self.min.y + self.max.y) * 0.5,
        )
    }

    /// The nearest point inside the rectangle (just below `max`).
    pub fn clamp(&self, p: Vec2) -> Vec2 {
        // Largest float strictly below max, so that the result is contained.
        let below = |m: f32| f32::from_bits(m.to_bits() - 1);
        Vec2::new(
            p.x.clamp(self.min.x, below(self.max.x)),
            p.y.clamp(self.min.y, below(self.max.y)),
        )
    }

    /// True if the two rectangles overlap.
    pub fn intersects(&self, o: &Rect) -> bool {
        self.min.x < o.max.x && o.min.x < self.max.x && self.min.y < o.max.y && o.min.y < self.max.y
    }
}

/// Deepest quadtree level: `sub` holds 2 bits per level.
pub const MAX_DEPTH: u8 = 12;

/// A cell of the world. Depth 0 is the fixed grid (`cx`, `cy`); a split
/// cell's four children are at `depth + 1` and `sub` is the path of quadrant
/// choices from the depth-0 cell, 2 bits per level, the first level in the
/// most significant used bits. Quadrant bits: x in bit 0, y in bit 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellId {
    /// The world (instance) the cell belongs to.
    pub world: u16,
    /// Column of the depth-0 ancestor.
    pub cx: i32,
    /// Row of the depth-0 ancestor.
    pub cy: i32,
    /// Quadtree depth (0 = fixed grid).
    pub depth: u8,
    /// Quadrant path below the depth-0 ancestor.
    pub sub: u32,
}

impl fmt::Display for CellId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{},{}", self.world, self.cx, self.cy)?;
        if self.depth > 0 {
            f.write_str("/")?;
            for level in 1..=self.depth {
                let q = (self.sub >> (2 * (self.depth - level))) & 3;
                write!(f, "{q}")?;
            }
        }
        Ok(())
    }
}

/// Why a cell id could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid cell id {0:?}: expected WORLD:CX,CY or WORLD:CX,CY/QUADRANTS (one digit 0-3 per level, e.g. 0:3,-1/13)")]
pub struct ParseCellError(pub String);

impl std::str::FromStr for CellId {
    type Err = ParseCellError;

    /// Parses the [`Display`](fmt::Display) form, e.g. `0:3,-1` or
    /// `0:3,-1/13` (a depth-2 cell: quadrant 1, then quadrant 3).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseCellError(s.to_string());
        let (world, rest) = s.trim().split_once(':').ok_or_else(bad)?;
        let world: u16 = world.parse().map_err(|_| bad())?;
        let (xy, path) = match rest.split_once('/') {
            Some((xy, path)) => (xy, path),
            None => (rest, ""),
        };
        let (cx, cy) = xy.split_once(',').ok_or_else(bad)?;
        let cx: i32 = cx.parse().map_err(|_| bad())?;
        let cy: i32 = cy.parse().map_err(|_| bad())?;
        let mut cell = CellId::root(world, cx, cy);
        if path.len() > usize::from(MAX_DEPTH) {
            return Err(bad());
        }
        for ch in path.chars() {
            let q = ch.to_digit(10).filter(|q| *q < 4).ok_or_else(bad)? as u8;
            cell = cell.child(q).ok_or_else(bad)?;
        }
        Ok(cell)
    }
}

impl CellId {
    /// A depth-0 cell.
    pub const fn root(world: u16, cx: i32, cy: i32) -> Self {
        Self {
            world,
            cx,
            cy,
            depth: 0,
            sub: 0,
        }
    }

    /// Global grid coordinates at this cell's depth (cell units of
    /// `cell_size / 2^depth`).
    pub fn grid(self) -> (i64, i64) {
        let mut lx = 0i64;
        let mut ly = 0i64;
        for level in 1..=self.depth {
            let q = (self.sub >> (2 * (self.depth - level))) & 3;
            lx = (lx << 1) | i64::from(q & 1);
            ly = (ly << 1) | i64::from(q >> 1);
        }
        let scale = 1i64 << self.depth;
        (
            i64::from(self.cx) * scale + lx,
            i64::from(self.cy) * scale + ly,
        )
    }

    /// The cell at global grid coordinates `(gx, gy)` of `depth`.
    pub fn from_grid(world: u16, depth: u8, gx: i64, gy: i64) -> Self {
        let scale = 1i64 << depth;
        let cx = gx.div_euclid(scale) as i32;
        let cy = gy.div_euclid(scale) as i32;
        let lx = gx.rem_euclid(scale);
        let ly = gy.rem_euclid(scale);
        let mut sub = 0u32;
        for level in 1..=depth {
            let bit = depth - level;
            let q = (((lx >> bit) & 1) | (((ly >> bit) & 1) << 1)) as u32;
            sub = (sub << 2) | q;
        }
        Self {
            world,
            cx,
            cy,
            depth,
            sub,
        }
    }

    /// The enclosing cell one level up.
    pub fn parent(self) -> Option<CellId> {
        (self.depth > 0).then(|| CellId {
            depth: self.depth - 1,
            sub: self.sub >> 2,
            ..self
        })
    }

    /// Which quadrant of its parent this cell is.
    pub fn quadrant(self) -> Option<u8> {
        (self.depth > 0).then_some((self.sub & 3) as u8)
    }

    /// Child `q` (x in bit 0, y in bit 1), if not at [`MAX_DEPTH`].
    pub fn child(self, q: u8) -> Option<CellId> {
        (self.depth < MAX_DEPTH && q < 4).then(|| CellId {
            depth: self.depth + 1,
            sub: (self.sub << 2) | u32::from(q),
            ..self
        })
    }

    /// The four children, in quadrant order.
    pub fn children(self) -> Option<[CellId; 4]> {
        Some([
            self.child(0)?,
            self.child(1)?,
            self.child(2)?,
            self.child(3)?,
        ])
    }

    /// True if `self` is `other` or one of its ancestors.
    pub fn contains_cell(self, other: CellId) -> bool {
        if self.world != other.world
            || self.cx != other.cx
            || self.cy != other.cy
            || other.depth < self.depth
        {
            return false;
        }
        (other.sub >> (2 * (other.depth - self.depth))) == self.sub
    }

    /// The eight same-depth neighbours (crossing depth-0 borders as needed).
    pub fn neighbours(self) -> [CellId; 8] {
        let (gx, gy) = self.grid();
        let mut out = [self; 8];
        let mut i = 0;
        for dy in -1..=1 {
            for dx in -1..=1 {
                if dx == 0 && dy == 0 {
                    continue;
                }
                out[i] = CellId::from_grid(self.world, self.depth, gx + dx, gy + dy);
                i += 1;
            }
        }
        out
    }
}

/// The shape of a world: a grid of square depth-0 cells.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// The world id.
    pub world: u16,
    /// Edge of a depth-0 cell, metres.
    pub cell_size: f32,
    /// Depth-0 columns: `0..columns`.
    pub columns: i32,
    /// Depth-0 rows: `0..rows`.
    pub rows: i32,
}

impl Geometry {
    /// A world of `columns` x `rows` cells of `cell_size` metres, its
    /// south-west corner at the origin.
    pub fn new(world: u16, cell_size: f32, columns: i32, rows: i32) -> Self {
        assert!(cell_size > 0.0 && columns > 0 && rows > 0, "empty world");
        Self {
            world,
            cell_size,
            columns,
            rows,
        }
    }

    /// The whole world.
    pub fn world_rect(&self) -> Rect {
        Rect::new(
            Vec2::new(0.0, 0.0),
            Vec2::new(
                self.columns as f32 * self.cell_size,
                self.rows as f32 * self.cell_size,
            ),
        )
    }

    /// True if the depth-0 ancestor of `cell` is inside the world.
    pub fn is_in_world(&self, cell: CellId) -> bool {
        cell.world == self.world
            && (0..self.columns).contains(&cell.cx)
            && (0..self.rows).contains(&cell.cy)
    }

    /// The area a cell covers.
    pub fn bounds(&self, cell: CellId) -> Rect {
        let size = self.cell_size / (1u32 << cell.depth) as f32;
        let (gx, gy) = cell.grid();
        let min = Vec2::new(gx as f32 * size, gy as f32 * size);
        Rect::new(min, Vec2::new(min.x + size, min.y + size))
    }

    /// The cell of `depth` containing `p` (which may lie outside the world).
    pub fn cell_at(&self, p: Vec2, depth: u8) -> CellId {
        let size = self.cell_size / (1u32 << depth) as f32;
        let gx = (p.x / size).floor() as i64;
        let gy = (p.y / size).floor() as i64;
        CellId::from_grid(self.world, depth, gx, gy)
    }

    /// Every depth-0 cell, row by row.
    pub fn root_cells(&self) -> impl Iterator<Item = CellId> + '_ {
        (0..self.rows)
            .flat_map(move |cy| (0..self.columns).map(move |cx| CellId::root(self.world, cx, cy)))
    }
}

/// Why a split or merge was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The cell is not a leaf of the layout.
    #[error("cell {0} is not a leaf of the layout")]
    NotALeaf(CellId),
    /// Already at the deepest level.
    #[error("cell {0} is at the maximum depth")]
    TooDeep(CellId),
    /// A merge needs four leaf children.
    #[error("cell {0} does not have four leaf children")]
    NotMergeable(CellId),
    /// Outside the world.
    #[error("cell {0} is outside the world")]
    OutsideWorld(CellId),
}

/// The current partition of the world into leaf cells: the depth-0 grid with
/// some cells split, quadtree-style.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    geometry: Geometry,
    split: BTreeSet<CellId>,
}

impl Layout {
    /// The unsplit grid.
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            split: BTreeSet::new(),
        }
    }

    /// The world's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// True if `cell` is currently a leaf (exists and is not split).
    pub fn is_leaf(&self, cell: CellId) -> bool {
        if !self.geometry.is_in_world(cell) || self.split.contains(&cell) {
            return false;
        }
        let mut c = cell;
        while let Some(p) = c.parent() {
            if !self.split.contains(&p) {
                return false;
            }
            c = p;
        }
        true
    }

    /// True if `cell` is split into children.
    pub fn is_split(&self, cell: CellId) -> bool {
        self.split.contains(&cell)
    }

    /// The leaf containing `p`, or None outside the world.
    pub fn leaf_at(&self, p: Vec2) -> Option<CellId> {
        if !self.geometry.world_rect().contains(p) {
            return None;
        }
        let mut c = self.geometry.cell_at(p, 0);
        while self.split.contains(&c) {
            let b = self.geometry.bounds(c);
            let mid = b.center();
            let q = u8::from(p.x >= mid.x) | (u8::from(p.y >= mid.y) << 1);
            c = c.child(q)?;
        }
        Some(c)
    }

    /// Every leaf, sorted.
    pub fn leaves(&self) -> Vec<CellId> {
        let mut out = Vec::new();
        for root in self.geometry.root_cells() {
            self.collect_leaves(root, &mut out);
        }
        out.sort();
        out
    }

    fn collect_leaves(&self, c: CellId, out: &mut Vec<CellId>) {
        if self.split.contains(&c) {
            for child in c.children().into_iter().flatten() {
                self.collect_leaves(child, out);
            }
        } else {
            out.push(c);
        }
    }

    /// Appends every leaf whose area is within `radius` of `p` (including
    /// the leaf containing `p`).
    pub fn leaves_near(&self, p: Vec2, radius: f32, out: &mut Vec<CellId>) {
        let r2 = radius * radius;
        let size = self.geometry.cell_size;
        let x0 = ((p.x - radius) / size).floor().max(0.0) as i32;
        let y0 = ((p.y - radius) / size).floor().max(0.0) as i32;
        let x1 = ((p.x + radius) / size)
            .floor()
            .min((self.geometry.columns - 1) as f32) as i32;
        let y1 = ((p.y + radius) / size)
            .floor()
            .min((self.geometry.rows - 1) as f32) as i32;
        for cy in y0..=y1 {
            for cx in x0..=x1 {
                self.near_in(CellId::root(self.geometry.world, cx, cy), p, r2, out);
            }
        }
    }

    fn near_in(&self, c: CellId, p: Vec2, r2: f32, out: &mut Vec<CellId>) {
        if self.geometry.bounds(c).distance_squared(p) > r2 {
            return;
        }
        if self.split.contains(&c) {
            for child in c.children().into_iter().flatten() {
                self.near_in(child, p, r2, out);
            }
        } else {
            out.push(c);
        }
    }

    /// The cells that are split (not leaves), parents before children.
    pub fn split_cells(&self) -> Vec<CellId> {
        let mut v: Vec<CellId> = self.split.iter().copied().collect();
        v.sort_by_key(|c| (c.depth, *c));
        v
    }

    /// Splits a leaf into its four children.
    pub fn split(&mut self, cell: CellId) -> Result<[CellId; 4], LayoutError> {
        if !self.geometry.is_in_world(cell) {
            return Err(LayoutError::OutsideWorld(cell));
        }
        if !self.is_leaf(cell) {
            return Err(LayoutError::NotALeaf(cell));
        }
        let children = cell.children().ok_or(LayoutError::TooDeep(cell))?;
        self.split.insert(cell);
        Ok(children)
    }

    /// Merges four leaf siblings back into `parent`.
    pub fn merge(&mut self, parent: CellId) -> Result<(), LayoutError> {
        let children = parent.children().ok_or(LayoutError::NotMergeable(parent))?;
        if !self.split.contains(&parent) || !children.iter().all(|c| self.is_leaf(*c)) {
            return Err(LayoutError::NotMergeable(parent));
        }
        self.split.remove(&parent);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geo() -> Geometry {
        Geometry::new(0, 128.0, 8, 8)
    }

    #[test]
    fn children_tile_their_parent() {
        let g = geo();
        let parent = CellId::root(0, 2, 3);
        let pb = g.bounds(parent);
        let kids = parent.children().unwrap();
        let area: f32 = kids
            .iter()
            .map(|c| g.bounds(*c).width() * g.bounds(*c).height())
            .sum();
        assert_eq!(area, pb.width() * pb.height());
        for (q, k) in kids.iter().enumerate() {
            assert_eq!(k.parent(), Some(parent));
            assert_eq!(k.quadrant(), Some(q as u8));
            assert!(parent.contains_cell(*k));
            let kb = g.bounds(*k);
            assert!(pb.contains(kb.min));
        }
        // Quadrant 3 is north-east.
        assert_eq!(g.bounds(kids[3]).min, pb.center());
    }

    #[test]
    fn neighbours_cross_depth0_borders() {
        let c = CellId::root(0, 0, 0).child(0).unwrap(); // south-west quarter of (0,0)
        let n = c.neighbours();
        assert!(n.contains(&CellId::root(0, -1, -1).child(3).unwrap()));
        assert!(n.contains(&CellId::root(0, 0, 0).child(3).unwrap()));
        assert_eq!(n.iter().filter(|x| x.cx == 0 && x.cy == 0).count(), 3);
    }

    #[test]
    fn display_and_parse_round_trip() {
        for cell in [
            CellId::root(0, 3, -1),
            CellId::root(2, 0, 0).child(1).unwrap().child(3).unwrap(),
        ] {
            let s = cell.to_string();
            assert_eq!(s.parse::<CellId>().unwrap(), cell, "{s}");
        }
        assert_eq!(
            "0:1,2/31".parse::<CellId>().unwrap(),
            CellId::root(0, 1, 2).child(3).unwrap().child(1).unwrap()
        );
        for bad in ["nonsense", "0:1", "0:1,1/7", "x:1,1", "0:1,1/0000000000000"] {
            assert!(bad.parse::<CellId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_split_and_merge() {
        let mut l = Layout::new(geo());
        let c = CellId::root(0, 1, 1);
        let kids = l.split(c).unwrap();
        assert!(!l.is_leaf(c));
        assert!(kids.iter().all(|k| l.is_leaf(*k)));
        assert_eq!(l.leaves().len(), 64 - 1 + 4);
        let p = g_center(&l, kids[2]);
        assert_eq!(l.leaf_at(p), Some(kids[2]));
        assert_eq!(l.split(c), Err(LayoutError::NotALeaf(c)));
        l.split(kids[0]).unwrap();
        assert_eq!(l.merge(c), Err(LayoutError::NotMergeable(c)));
        l.merge(kids[0]).unwrap();
        l.merge(c).unwrap();
        assert!(l.is_leaf(c));
        assert_eq!(l.leaves().len(), 64);
    }

    fn g_center(l: &Layout, c: CellId) -> Vec2 {
        l.geometry().bounds(c).center()
    }

    proptest! {
        #[test]
        fn grid_round_trips(depth in 0u8..=MAX_DEPTH, gx in -100_000i64..100_000, gy in -100_000i64..100_000) {
            let c = CellId::from_grid(7, depth, gx, gy);
            prop_assert_eq!(c.grid(), (gx, gy));
            prop_assert_eq!(c.depth, depth);
        }

        #[test]
        fn a_point_is_in_the_cell_found_for_it(x in 0.0f32..1024.0, y in 0.0f32..1024.0, depth in 0u8..6) {
            let g = geo();
            let p = Vec2::new(x, y);
            let c = g.cell_at(p, depth);
            prop_assert!(g.bounds(c).contains(p), "{p:?} not in {c} {:?}", g.bounds(c));
            if let Some(parent) = c.parent() {
                prop_assert!(g.bounds(parent).contains(p));
                prop_assert!(parent.contains_cell(c));
            }
        }

        #[test]
        fn leaves_near_finds_exactly_the_close_leaves(x in 0.0f32..1024.0, y in 0.0f32..1024.0, r in 0.0f32..200.0, splits in proptest::collection::vec((0i32..8, 0i32..8, 0u8..4), 0..6)) {
            let mut l = Layout::new(geo());
            for (cx, cy, q) in splits {
                let root = CellId::root(0, cx, cy);
                if l.is_leaf(root) { l.split(root).unwrap(); }
                let k = root.child(q).unwrap();
                if l.is_leaf(k) { l.split(k).unwrap(); }
            }
            let p = Vec2::new(x, y);
            let mut near = Vec::new();
            l.leaves_near(p, r, &mut near);
            near.sort();
            let brute: Vec<CellId> = l.leaves().into_iter()
                .filter(|c| l.geometry().bounds(*c).distance_squared(p) <= r * r)
                .collect();
            prop_assert_eq!(near, brute);
            // The leaf containing p is always among them.
            let leaf = l.leaf_at(p).unwrap();
            prop_assert!(l.is_leaf(leaf));
            prop_assert!(l.geometry().bounds(leaf).contains(p));
        }
    }
}
