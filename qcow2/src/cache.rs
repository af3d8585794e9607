//! A bounded cache of one-cluster metadata tables (L2 tables, refcount blocks).
//!
//! Tables are kept as their on-disk bytes, keyed by host offset, with a dirty flag and a use clock
//! for least-recently-used eviction. The cache never writes anything itself: [`TableCache::insert`]
//! hands back the table it evicted, and the owner decides when and in which order dirty tables
//! reach the file (L2 tables only after the refcount blocks they depend on; see the crate docs).

use std::collections::HashMap;

struct Slot {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

/// LRU cache of metadata tables.
pub struct TableCache {
    slots: HashMap<u64, Slot, foldhash::fast::RandomState>,
    capacity: usize,
    clock: u64,
    /// The buffer of the last table evicted, kept for the next load (so a scan that streams
    /// tables through a full cache reuses one buffer instead of freeing and allocating each).
    spare: Option<Vec<u8>>,
}

/// A table pushed out of the cache; the owner must write it if it was dirty.
pub struct Evicted {
    /// Host offset of the table.
    pub offset: u64,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Whether it had unwritten changes.
    pub dirty: bool,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 1).
    pub fn new(capacity: usize) -> TableCache {
        TableCache { slots: HashMap::default(), capacity: capacity.max(1), clock: 0, spare: None }
    }

    /// How many tables the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The table at `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = clock;
            s.data.as_slice()
        })
    }

    /// The table at `offset` for modification (marks it dirty), if cached.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = clock;
            s.dirty = true;
            s.data.as_mut_slice()
        })
    }

    /// Whether `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// Adds a table; returns the least recently used table if the cache was full.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) -> Option<Evicted> {
        self.clock += 1;
        let mut evicted = None;
        if !self.slots.contains_key(&offset) && self.slots.len() >= self.capacity {
            // Prefer a clean victim; fall back to the oldest dirty one.
            let victim = self
                .slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.last_use)
                .or_else(|| self.slots.iter().min_by_key(|(_, s)| s.last_use))
                .map(|(o, _)| *o);
            if let Some(v) = victim {
                if let Some(s) = self.slots.remove(&v) {
                    evicted = Some(Evicted { offset: v, data: s.data, dirty: s.dirty });
                }
            }
        }
        self.slots.insert(offset, Slot { data, dirty, last_use: self.clock });
        evicted
    }

    /// Offsets of all dirty tables, ascending (so writes go out in file order).
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.slots.iter().filter(|(_, s)| s.dirty).map(|(o, _)| *o).collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// The bytes of a cached table without touching its use clock.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.slots.get(&offset).map(|s| s.data.as_slice())
    }

    /// Marks a table as written.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }

    /// A buffer of `len` bytes for a table about to be loaded: the last evicted table's (its old
    /// bytes still in it: the caller overwrites every byte) or a new zeroed one.
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spare.take() {
            Some(b) if b.len() == len => b,
            _ => vec![0u8; len],
        }
    }

    /// Keeps the buffer of an evicted table (written if it was dirty) for [`TableCache::buffer`].
    pub fn recycle(&mut self, data: Vec<u8>) {
        self.spare = Some(data);
    }

    /// Drops a table (it was freed); its changes are discarded.
    pub fn remove(&mut self, offset: u64) {
        self.slots.remove(&offset);
    }
}

/// Reads big-endian entry `index` of width 8 bytes.
pub fn get_u64(table: &[u8], index: usize) -> u64 {
    let at = index * 8;
    let mut b = [0u8; 8];
    b.copy_from_slice(&table[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Writes big-endian entry `index` of width 8 bytes.
pub fn set_u64(table: &mut [u8], index: usize, value: u64) {
    let at = index * 8;
    table[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_clean_lru_first_and_tracks_dirt() {
        let mut c = TableCache::new(2);
        assert!(c.insert(1, vec![1], false).is_none());
        assert!(c.insert(2, vec![2], false).is_none());
        c.get_mut(1).unwrap()[0] = 9;
        let e = c.insert(3, vec![3], false).unwrap();
        assert_eq!((e.offset, e.dirty), (2, false), "the clean table goes first");
        let e = c.insert(4, vec![4], true).unwrap();
        assert_eq!(e.offset, 3);
        assert_eq!(c.dirty(), vec![1, 4]);
        c.mark_clean(1);
        assert_eq!(c.dirty(), vec![4]);
        let mut t = vec![0u8; 16];
        set_u64(&mut t, 1, 0x0102);
        assert_eq!(get_u64(&t, 1), 0x0102);
    }
}
