//! Reusable message buffers, so that steady traffic does not allocate per
//! message.

/// Buffers larger than this are freed instead of kept: one handover
/// snapshot must not pin 256 KiB per pooled buffer.
const KEEP_CAPACITY_MAX: usize = 4096;

/// A bounded free list of byte buffers.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Vec<Vec<u8>>,
    kept_max: usize,
}

impl BufferPool {
    pub fn new(kept_max: usize) -> Self {
        Self {
            free: Vec::new(),
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
        if len <= KEEP_CAPACITY_MAX {
            if let Some(mut buffer) = self.free.pop() {
                buffer.clear();
                buffer.reserve(len);
                return buffer;
            }
        }
        Vec::with_capacity(len)
    }

    /// A zeroed buffer of exactly `len` bytes (reassembly).
    pub fn zeroed(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.take(len);
        buffer.resize(len, 0);
        buffer
    }

    /// Gives a buffer back.
    pub fn put(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() <= KEEP_CAPACITY_MAX
            && buffer.capacity() > 0
            && self.free.len() < self.kept_max
        {
            self.free.push(buffer);
        }
    }

    pub fn len(&self) -> usize {
        self.free.len()
    }
}
