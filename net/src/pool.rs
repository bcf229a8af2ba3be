//! Reusable message buffers, so that steady traffic does not allocate per
//! message.

/// Capacity classes. A buffer is allocated with the capacity of the smallest
/// class that holds the message and filed back under the largest class its
/// capacity covers, so a pooled buffer serves any later message of its class
/// without a reallocation (a 32 B input's buffer is never grown in place for
/// a 300 B snapshot, then shrunk back by the next input).
const CLASSES: [usize; 4] = [128, 512, 1536, 4096];

/// Buffers larger than this are freed instead of kept: one handover
/// snapshot must not pin 256 KiB per pooled buffer.
const KEEP_CAPACITY_MAX: usize = CLASSES[CLASSES.len() - 1];

/// The smallest class holding `len` bytes.
fn class_for(len: usize) -> Option<usize> {
    CLASSES.iter().position(|&c| len <= c)
}

/// The largest class a buffer of `capacity` can serve.
fn class_of(capacity: usize) -> Option<usize> {
    CLASSES.iter().rposition(|&c| c <= capacity)
}

/// A bounded free list of byte buffers per capacity class.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: [Vec<Vec<u8>>; CLASSES.len()],
    kept: usize,
    kept_max: usize,
}

impl BufferPool {
    pub fn new(kept_max: usize) -> Self {
        Self {
            free: Default::default(),
            kept: 0,
            kept_max,
        }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn copy_of(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buffer = self.take(bytes.len());
        buffer.extend_from_slice(bytes);
        buffer
    }

    /// An empty buffer with room for `len` bytes.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let Some(class) = class_for(len) else {
            return Vec::with_capacity(len);
        };
        // A larger class serves too when this one is empty.
        for free in &mut self.free[class..] {
            if let Some(mut buffer) = free.pop() {
                self.kept -= 1;
                buffer.clear();
                return buffer;
            }
        }
        Vec::with_capacity(CLASSES[class])
    }

    /// A zeroed buffer of exactly `len` bytes (reassembly).
    pub fn zeroed(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.take(len);
        buffer.resize(len, 0);
        buffer
    }

    /// Gives a buffer back.
    pub fn put(&mut self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity > KEEP_CAPACITY_MAX || self.kept >= self.kept_max {
            return;
        }
        if let Some(class) = class_of(capacity) {
            self.free[class].push(buffer);
            self.kept += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_across_sizes_without_growing() {
        let mut pool = BufferPool::new(8);
        let small = pool.copy_of(&[1; 32]);
        assert_eq!(small.capacity(), 128);
        pool.put(small);
        // A 300 B message does not take (and regrow) the 128 B buffer.
        let update = pool.copy_of(&[2; 300]);
        assert_eq!(update.capacity(), 512);
        assert_eq!(pool.len(), 1);
        pool.put(update);
        // Either buffer serves a small message; the smallest class first.
        let again = pool.take(10);
        assert_eq!(again.capacity(), 128);
        let larger = pool.take(10);
        assert_eq!(larger.capacity(), 512);
        assert_eq!(pool.len(), 0);
        // Too large or too small to classify: not kept.
        pool.put(Vec::with_capacity(64 * 1024));
        pool.put(Vec::with_capacity(16));
        assert_eq!(pool.len(), 0);
        // Bounded.
        for _ in 0..20 {
            pool.put(Vec::with_capacity(128));
        }
        assert_eq!(pool.len(), 8);
    }
}
