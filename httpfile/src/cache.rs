//! A small least-recently-used cache of the file's aligned chunks.
//!
//! Chunks are shared (`Arc`) and never change once inserted, so a reader copies out of one
//! after dropping the lock. The cache holds at most `capacity` chunks; a lookup is a linear scan,
//! which at the few dozen chunks it holds costs less than the copy that follows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Cached chunks, most recently used first.
#[derive(Debug)]
pub(crate) struct ChunkCache {
    chunks: Mutex<VecDeque<(u64, Arc<[u8]>)>>,
    capacity: usize,
}

impl ChunkCache {
    /// An empty cache of at most `capacity` chunks (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        ChunkCache { chunks: Mutex::new(VecDeque::with_capacity(capacity)), capacity }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<[u8]>)>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunk with index `index`, marking it most recently used.
    pub(crate) fn get(&self, index: u64) -> Option<Arc<[u8]>> {
        let mut chunks = self.lock();
        let pos = chunks.iter().position(|(i, _)| *i == index)?;
        let entry = chunks.remove(pos)?;
        let data = entry.1.clone();
        chunks.push_front(entry);
        Some(data)
    }

    /// Adds chunk `index` (replacing an older copy), evicting the least recently used.
    pub(crate) fn insert(&self, index: u64, data: Arc<[u8]>) {
        let mut chunks = self.lock();
        if let Some(pos) = chunks.iter().position(|(i, _)| *i == index) {
            chunks.remove(pos);
        }
        if chunks.len() >= self.capacity {
            chunks.pop_back();
        }
        chunks.push_front((index, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(b: u8) -> Arc<[u8]> {
        Arc::from(vec![b; 4])
    }

    #[test]
    fn evicts_least_recently_used() {
        let c = ChunkCache::new(2);
        c.insert(1, chunk(1));
        c.insert(2, chunk(2));
        assert_eq!(c.get(1).unwrap()[0], 1, "1 is now the most recent");
        c.insert(3, chunk(3));
        assert!(c.get(2).is_none(), "2 was the least recently used");
        assert_eq!(c.get(1).unwrap()[0], 1);
        assert_eq!(c.get(3).unwrap()[0], 3);
        c.insert(3, chunk(9));
        assert_eq!(c.get(3).unwrap()[0], 9, "a newer copy replaces the old");
        assert_eq!(c.lock().len(), 2);
    }
}
