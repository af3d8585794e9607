//! Reference counts: the refcount table, refcount blocks and the cluster allocator.
//!
//! Every host cluster has a reference count (1 to 64 bits wide) stored in a refcount block; the
//! refcount table points to the blocks. A cluster is free when its count is zero; clusters past the
//! area the table covers are free too.
//!
//! Invariants and update order:
//! - a new refcount block is placed inside the range it covers whenever that range has a free
//!   cluster, so it describes itself and allocation never recurses;
//! - block contents reach the file before the table entry that points to them, and the table before
//!   the header that points to it (see [`Refcounts::flush`] and [`Refcounts::grow_table`]);
//! - increases are made at allocation time; decreases are queued by the caller and applied only once
//!   no metadata on disk refers to the cluster any more (the driver applies them after its flush).

use std::collections::BTreeSet;

use blockdev::{read_exact_at, write_all_at, Error, ErrorKind, Result, Storage};

use crate::cache::{get_u64, TableCache};
use crate::discard::Punches;
use crate::entry::OFFSET_MASK;
use crate::limits::MAX_REFTABLE_SIZE;

/// The refcount structures of an open image.
pub struct Refcounts {
    /// Refcount table entries (host offsets of refcount blocks, 0 = none).
    pub table: Vec<u64>,
    /// Host offset of the table.
    pub table_offset: u64,
    /// Clusters the table occupies.
    pub table_clusters: u64,
    /// log2 of the refcount width in bits.
    pub order: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Cached refcount blocks.
    pub cache: TableCache,
    /// Table entries changed since the last flush.
    pub dirty_entries: BTreeSet<usize>,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// Blocks of the previous table after a growth, to be freed by the caller once durable.
    pub retired: Vec<(u64, u64)>,
    /// Host offsets of all refcount blocks (for overlap checks).
    pub blocks: std::collections::HashSet<u64>,
    /// Freed clusters whose space is to be given back to the file system (see `discard.rs`).
    pub punches: Punches,
}

impl Refcounts {
    /// Entries per refcount block.
    pub fn block_entries(&self) -> u64 {
        ((1u64 << self.cluster_bits) * 8) >> self.order
    }

    /// Largest value a refcount can hold.
    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Loads the refcount table from the file (validated against limits by the caller).
    pub fn load(
        io: &dyn Storage,
        offset: u64,
        clusters: u64,
        order: u32,
        cluster_bits: u32,
        cache_tables: usize,
    ) -> Result<Refcounts> {
        let bytes = clusters << cluster_bits;
        if bytes > MAX_REFTABLE_SIZE {
            return Err(Error::invalid_image("Reference count table too large"));
        }
        let mut raw = vec![0u8; bytes as usize];
        read_exact_at(io, offset, &mut raw)?;
        let table: Vec<u64> = (0..raw.len() / 8).map(|i| get_u64(&raw, i)).collect();
        let blocks = table.iter().map(|e| e & OFFSET_MASK).filter(|o| *o != 0).collect();
        Ok(Refcounts {
            blocks,
            table,
            table_offset: offset,
            table_clusters: clusters,
            order,
            cluster_bits,
            cache: TableCache::new(cache_tables),
            dirty_entries: BTreeSet::new(),
            free_hint: 0,
            retired: Vec::new(),
            punches: Punches::default(),
        })
    }

    fn block_offset(&self, block_index: u64) -> Option<u64> {
        let e = *self.table.get(block_index as usize)?;
        let off = e & OFFSET_MASK;
        if off == 0 {
            None
        } else {
            Some(off)
        }
    }

    /// Makes sure the block at `offset` is cached; writes out a dirty block it evicts.
    fn load_block(&mut self, io: &dyn Storage, offset: u64) -> Result<()> {
        if self.cache.contains(offset) {
            return Ok(());
        }
        if offset % self.cluster_size() != 0 {
            return Err(Error::corrupt(format!("Refblock offset {offset:#x} unaligned")));
        }
        let mut data = vec![0u8; self.cluster_size() as usize];
        read_exact_at(io, offset, &mut data)?;
        if let Some(ev) = self.cache.insert(offset, data, false) {
            if ev.dirty {
                write_all_at(io, ev.offset, &ev.data)?;
            }
        }
        Ok(())
    }

    /// The refcount of cluster `index` (0 when no block covers it).
    pub fn get(&mut self, io: &dyn Storage, index: u64) -> Result<u64> {
        let per = self.block_entries();
        let Some(off) = self.block_offset(index / per) else { return Ok(0) };
        self.load_block(io, off)?;
        let block = self.cache.get(off).ok_or_else(|| Error::corrupt("refcount block vanished from the cache"))?;
        Ok(read_entry(block, self.order, (index % per) as usize))
    }

    /// The refcounts of clusters `[start, start + out.len())`, which must lie in one refcount
    /// block, into `out` (zeros where no block exists).
    pub fn get_run(&mut self, io: &dyn Storage, start: u64, out: &mut [u64]) -> Result<()> {
        let per = self.block_entries();
        let Some(off) = self.block_offset(start / per) else {
            out.fill(0);
            return Ok(());
        };
        self.load_block(io, off)?;
        let order = self.order;
        let block = self.cache.get(off).ok_or_else(|| Error::corrupt("refcount block vanished from the cache"))?;
        let first = (start % per) as usize;
        for (i, v) in out.iter_mut().enumerate() {
            *v = read_entry(block, order, first + i);
        }
        Ok(())
    }

    /// Sets the refcount of cluster `index`; the covering block must exist (see [`Self::ensure_block`]).
    fn set_existing(&mut self, io: &dyn Storage, index: u64, value: u64) -> Result<()> {
        let per = self.block_entries();
        let off = self.block_offset(index / per).ok_or_else(|| Error::corrupt("no refcount block for cluster"))?;
        self.load_block(io, off)?;
        let order = self.order;
        let block = self.cache.get_mut(off).ok_or_else(|| Error::corrupt("refcount block vanished from the cache"))?;
        write_entry(block, order, (index % per) as usize, value);
        if value > 0 && !self.punches.is_empty() {
            // In use again before its punch: it must not be punched under new data.
            self.punches.forget(index);
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of cluster `index`, allocating its block if needed.
    pub fn update(&mut self, io: &dyn Storage, index: u64, delta: i64) -> Result<u64> {
        self.update_with(io, index, delta, false)
    }

    /// Like [`Self::update`]; with `punch`, a cluster whose refcount drops to zero is queued to
    /// have its space given back to the file system (see [`Self::punch_freed`]). The caller
    /// guarantees that no reference to the cluster remains on disk.
    pub fn update_with(&mut self, io: &dyn Storage, index: u64, delta: i64, punch: bool) -> Result<u64> {
        self.ensure_block(io, index)?;
        let cur = self.get(io, index)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64).filter(|v| *v <= self.max_value())
        } else {
            cur.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            let what = if delta >= 0 { "overflow" } else { "underflow" };
            return Err(Error::new(
                if delta >= 0 { ErrorKind::OutOfRange } else { ErrorKind::Corrupt },
                format!(
                    "Refcount {what} for cluster at offset {:#x} (refcount {cur}, change {delta})",
                    index << self.cluster_bits
                ),
            ));
        };
        self.set_existing(io, index, new)?;
        if new == 0 && index < self.free_hint {
            self.free_hint = index;
        }
        if new == 0 && punch {
            self.punches.add(index);
            if self.punches.is_full() {
                self.punch_freed(io)?;
            }
        }
        Ok(new)
    }

    /// Adds `delta` to the refcounts of clusters `[first, first + count)` (see [`Self::update`]).
    pub fn update_range(&mut self, io: &dyn Storage, first: u64, count: u64, delta: i64) -> Result<()> {
        self.update_range_with(io, first, count, delta, false)
    }

    /// [`Self::update_range`] with [`Self::update_with`]'s `punch`.
    pub fn update_range_with(
        &mut self,
        io: &dyn Storage,
        first: u64,
        count: u64,
        delta: i64,
        punch: bool,
    ) -> Result<()> {
        for c in first..first + count {
            self.update_with(io, c, delta, punch)?;
        }
        Ok(())
    }

    /// Makes every refcount change durable: blocks, then (after a sync) table entries, then a sync.
    pub fn make_durable(&mut self, io: &dyn Storage) -> Result<()> {
        self.flush_blocks(io)?;
        if !self.dirty_entries.is_empty() {
            io.flush()?;
            self.flush_table_entries(io)?;
        }
        io.flush()
    }

    /// Gives the space of the queued freed clusters back to the file system, once their refcount
    /// of zero is durable (this writes and syncs the refcount blocks first). A failed punch is
    /// ignored, as qemu ignores it: deallocation is advisory, the clusters are free either way.
    pub fn punch_freed(&mut self, io: &dyn Storage) -> Result<()> {
        if self.punches.is_empty() {
            return Ok(());
        }
        self.make_durable(io)?;
        for (first, count) in self.punches.take_merged() {
            let _ = io.discard(first << self.cluster_bits, count << self.cluster_bits);
        }
        Ok(())
    }

    /// Makes sure a refcount block covers cluster `index`, creating one (and growing the table) if
    /// needed. New blocks describe themselves.
    pub fn ensure_block(&mut self, io: &dyn Storage, index: u64) -> Result<()> {
        let per = self.block_entries();
        let bi = index / per;
        if self.block_offset(bi).is_some() {
            return Ok(());
        }
        if bi as usize >= self.table.len() {
            self.grow_table(io, bi + 1)?;
            if self.block_offset(bi).is_some() {
                return Ok(());
            }
        }
        // Place the block on the first free cluster of its own range if there is one; otherwise on
        // the first free cluster anywhere (that one is then covered by an existing block).
        let start = bi * per;
        let place = match self.first_free_in(io, start.max(self.free_hint), (bi + 1) * per)? {
            Some(c) => c,
            None => self.find_free_run(io, 1)?,
        };
        let cs = self.cluster_size() as usize;
        let old = self.cache.insert(place << self.cluster_bits, vec![0u8; cs], true);
        if let Some(ev) = old {
            if ev.dirty {
                write_all_at(io, ev.offset, &ev.data)?;
            }
        }
        self.table[bi as usize] = place << self.cluster_bits;
        self.blocks.insert(place << self.cluster_bits);
        self.dirty_entries.insert(bi as usize);
        // The block's own refcount: inside its own range it is set directly; elsewhere through the
        // block that covers it (which exists, because `find_free_run` only returns covered or
        // self-coverable clusters).
        if place / per == bi {
            self.set_existing(io, place, 1)?;
        } else {
            // Not yet counted: keep the block that will count it from landing on it too.
            self.free_hint = self.free_hint.max(place + 1);
            self.update(io, place, 1)?;
        }
        Ok(())
    }

    /// First free cluster in `[from, to)`, treating uncovered clusters as free.
    fn first_free_in(&mut self, io: &dyn Storage, from: u64, to: u64) -> Result<Option<u64>> {
        let mut i = from;
        while i < to {
            let per = self.block_entries();
            if self.block_offset(i / per).is_none() {
                return Ok(Some(i));
            }
            if self.get(io, i)? == 0 {
                return Ok(Some(i));
            }
            i += 1;
        }
        Ok(None)
    }

    /// The first run of `n` free clusters at or after the hint (clusters beyond the table's reach
    /// count as free).
    pub fn find_free_run(&mut self, io: &dyn Storage, n: u64) -> Result<u64> {
        let per = self.block_entries();
        // Keep the hint on the first free cluster so scans do not repeat over used ones.
        while self.block_offset(self.free_hint / per).is_some() && self.get(io, self.free_hint)? != 0 {
            self.free_hint += 1;
        }
        let mut start = self.free_hint;
        let mut len = 0;
        let mut i = start;
        while len < n {
            let free = match self.block_offset(i / per) {
                None => {
                    // A whole uncovered block range is free: jump to its end if the run fits.
                    true
                }
                Some(_) => self.get(io, i)? == 0,
            };
            if free {
                if len == 0 {
                    start = i;
                }
                len += 1;
            } else {
                len = 0;
            }
            i += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1) and returns the host offset of the first.
    ///
    /// qemu's order, so that images come out laid out as qemu lays them out: the run is taken
    /// first (the free-cluster hint moves past it), then counted cluster by cluster; a refcount
    /// block the run needs is created on the first free cluster after the run (and counted by
    /// itself, or by a block created after it in turn).
    pub fn alloc(&mut self, io: &dyn Storage, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::invalid_argument("allocation of zero clusters"));
        }
        let start = self.find_free_run(io, n)?;
        let end = start + n;
        if end > (crate::limits::MAX_CLUSTER_OFFSET >> self.cluster_bits) {
            return Err(Error::from_errno("allocate", libc::EFBIG));
        }
        self.free_hint = self.free_hint.max(end);
        self.update_range(io, start, n, 1)?;
        Ok(start << self.cluster_bits)
    }

    /// Replaces the table with a larger one able to hold `min_entries` entries. The new table and
    /// the blocks that cover it are written to the end of the image and made durable; the caller
    /// must then update the header (`table_offset`/`table_clusters`) and free `retired`.
    pub fn grow_table(&mut self, io: &dyn Storage, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per = self.block_entries();
        let entries_per_cluster = cs / 8;
        let want = min_entries.max(self.table.len() as u64 * 3 / 2 + 1);
        let mut new_clusters = want.div_ceil(entries_per_cluster);
        if new_clusters * cs > MAX_REFTABLE_SIZE {
            new_clusters = MAX_REFTABLE_SIZE / cs;
            if new_clusters * entries_per_cluster < min_entries {
                return Err(Error::from_errno("grow refcount table", libc::EFBIG));
            }
        }
        // Place the table after everything in use or taken by an allocation under way (the
        // hint is past it); blocks for the new region follow it.
        let first = self.end_of_used(io)?.max(self.free_hint);
        let mut blocks = 0u64;
        loop {
            let end = first + new_clusters + blocks;
            let mut need = 0;
            for bi in first / per..=(end - 1) / per {
                if self.block_offset(bi).is_none() {
                    need += 1;
                }
            }
            if need == blocks {
                break;
            }
            blocks = need;
        }
        let end = first + new_clusters + blocks;
        let mut new_table = self.table.clone();
        new_table.resize((new_clusters * entries_per_cluster) as usize, 0);
        // New blocks, in order, for each uncovered range.
        let mut next_block = first + new_clusters;
        let mut new_blocks = Vec::new();
        for bi in first / per..=(end - 1) / per {
            if new_table[bi as usize] & OFFSET_MASK == 0 {
                new_blocks.push((bi, next_block));
                new_table[bi as usize] = next_block << self.cluster_bits;
                next_block += 1;
            }
        }
        let old_table = (self.table_offset, self.table_clusters);
        self.table = new_table;
        for (bi, cluster) in new_blocks {
            self.install_empty_block(io, bi, cluster)?;
        }
        self.table_offset = first << self.cluster_bits;
        self.table_clusters = new_clusters;
        self.update_range(io, first, end - first, 1)?;
        // Durability: blocks, then the new table; the header update follows (by the caller).
        self.flush_blocks(io)?;
        self.write_table(io)?;
        io.flush()?;
        self.dirty_entries.clear();
        if old_table.1 > 0 {
            self.retired.push((old_table.0, old_table.1));
        }
        Ok(())
    }

    /// Makes `table[block_index]` a new, empty refcount block at cluster `cluster` (cached, dirty;
    /// written by the next [`Self::flush_blocks`]).
    pub fn install_empty_block(&mut self, io: &dyn Storage, block_index: u64, cluster: u64) -> Result<()> {
        let at = cluster << self.cluster_bits;
        if let Some(ev) = self.cache.insert(at, vec![0u8; self.cluster_size() as usize], true) {
            if ev.dirty {
                write_all_at(io, ev.offset, &ev.data)?;
            }
        }
        self.table[block_index as usize] = at;
        self.blocks.insert(at);
        Ok(())
    }

    /// First cluster index after every cluster with a non-zero refcount.
    pub fn end_of_used(&mut self, io: &dyn Storage) -> Result<u64> {
        let per = self.block_entries();
        for bi in (0..self.table.len() as u64).rev() {
            if self.block_offset(bi).is_none() {
                continue;
            }
            for i in (bi * per..(bi + 1) * per).rev() {
                if self.get(io, i)? != 0 {
                    return Ok(i + 1);
                }
            }
        }
        Ok(0)
    }

    /// Writes every dirty refcount block.
    pub fn flush_blocks(&mut self, io: &dyn Storage) -> Result<()> {
        for off in self.cache.dirty() {
            if let Some(data) = self.cache.peek(off) {
                write_all_at(io, off, data)?;
            }
            self.cache.mark_clean(off);
        }
        Ok(())
    }

    /// Writes changed refcount table entries (after their blocks are durable).
    pub fn flush_table_entries(&mut self, io: &dyn Storage) -> Result<()> {
        if self.dirty_entries.is_empty() {
            return Ok(());
        }
        // Write whole 512-byte sectors of the table around each change.
        let mut sectors = BTreeSet::new();
        for &i in &self.dirty_entries {
            sectors.insert(i / 64);
        }
        for s in sectors {
            let first = s * 64;
            let last = (first + 64).min(self.table.len());
            let mut buf = Vec::with_capacity(512);
            for e in &self.table[first..last] {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            write_all_at(io, self.table_offset + first as u64 * 8, &buf)?;
        }
        self.dirty_entries.clear();
        Ok(())
    }

    /// Writes the whole table.
    pub fn write_table(&self, io: &dyn Storage) -> Result<()> {
        let mut buf = Vec::with_capacity(self.table.len() * 8);
        for e in &self.table {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        buf.resize((self.table_clusters << self.cluster_bits) as usize, 0);
        write_all_at(io, self.table_offset, &buf)
    }

    /// Whether anything awaits writing.
    pub fn is_dirty(&self) -> bool {
        self.cache.has_dirty() || !self.dirty_entries.is_empty()
    }
}

/// Reads entry `index` of a refcount block with entries of `1 << order` bits.
pub fn read_entry(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let byte = block[index * bits / 8];
        let shift = (index * bits) % 8;
        ((byte >> shift) as u64) & ((1u64 << bits) - 1)
    } else {
        let bytes = bits / 8;
        let at = index * bytes;
        block[at..at + bytes].iter().fold(0u64, |v, &b| (v << 8) | b as u64)
    }
}

/// Writes entry `index` of a refcount block.
pub fn write_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let at = index * bits / 8;
        let shift = (index * bits) % 8;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
    } else {
        let bytes = bits / 8;
        let at = index * bytes;
        for i in 0..bytes {
            block[at + i] = (value >> (8 * (bytes - 1 - i))) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::set_u64;
    use blockdev::MemStorage;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                write_entry(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(read_entry(&block, order, i), (i as u64 * 7) & max, "order {order} index {i}");
            }
        }
        // Sub-byte widths put entry 0 in the least significant bits.
        let mut b = vec![0u8; 1];
        write_entry(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        write_entry(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b1101);
    }

    fn fresh(order: u32, cluster_bits: u32) -> (MemStorage, Refcounts) {
        // Cluster 0 header, 1 refcount table, 2 refcount block: the layout qemu creates.
        let cs = 1u64 << cluster_bits;
        let io = MemStorage::new("t", vec![0u8; (3 * cs) as usize]);
        let mut table = vec![0u8; cs as usize];
        set_u64(&mut table, 0, 2 * cs);
        write_all_at(&io, cs, &table).unwrap();
        let mut block = vec![0u8; cs as usize];
        for i in 0..3 {
            write_entry(&mut block, order, i, 1);
        }
        write_all_at(&io, 2 * cs, &block).unwrap();
        let r = Refcounts::load(&io, cs, 1, order, cluster_bits, 8).unwrap();
        (io, r)
    }

    #[test]
    fn allocates_past_used_clusters_and_grows_everything() {
        for order in [0u32, 4, 6] {
            let (io, mut r) = fresh(order, 9);
            // 512-byte clusters with 1-bit refcounts: a block covers 4096 clusters; with 64-bit ones
            // only 64, so this also grows the table several times.
            let mut seen = std::collections::HashSet::new();
            for _ in 0..3000 {
                let off = r.alloc(&io, 1).unwrap();
                assert!(off >= 3 * 512, "order {order}: allocation over metadata at {off}");
                assert!(seen.insert(off), "order {order}: {off} allocated twice");
            }
            let run = r.alloc(&io, 100).unwrap();
            for c in 0..100 {
                assert!(!seen.contains(&(run + c * 512)));
            }
            // Every table block and the table itself are accounted for.
            let table_start = r.table_offset >> 9;
            for c in table_start..table_start + r.table_clusters {
                assert_eq!(r.get(&io, c).unwrap(), 1, "order {order}: table cluster {c}");
            }
            for e in r.table.clone() {
                if e != 0 {
                    assert_eq!(r.get(&io, e >> 9).unwrap(), 1, "order {order}: block at {e:#x}");
                }
            }
        }
    }

    #[test]
    fn freed_clusters_are_punched_unless_taken_again_first() {
        let (io, mut r) = fresh(4, 9);
        let a = r.alloc(&io, 2).unwrap();
        write_all_at(&io, a, &[0xaa; 1024]).unwrap();
        // Both freed for punching; the first is allocated again (and written) before the punch.
        r.update_with(&io, a >> 9, -1, true).unwrap();
        r.update_with(&io, (a >> 9) + 1, -1, true).unwrap();
        assert_eq!(r.alloc(&io, 1).unwrap(), a);
        write_all_at(&io, a, &[0xbb; 512]).unwrap();
        r.punch_freed(&io).unwrap();
        assert!(r.punches.is_empty());
        let mut back = [0u8; 1024];
        read_exact_at(&io, a, &mut back).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0xbb), "reallocated cluster punched");
        assert!(back[512..].iter().all(|&b| b == 0), "freed cluster not punched");
        // Its refcount of zero reached the file before the punch.
        let r2 = Refcounts::load(&io, 512, 1, 4, 9, 8);
        assert_eq!(r2.unwrap().get(&io, (a >> 9) + 1).unwrap(), 0);
    }

    #[test]
    fn overflow_and_underflow_are_errors() {
        let (io, mut r) = fresh(0, 9);
        assert_eq!(r.update(&io, 0, 1).unwrap_err().kind(), ErrorKind::OutOfRange);
        r.update(&io, 0, -1).unwrap();
        assert_eq!(r.update(&io, 0, -1).unwrap_err().kind(), ErrorKind::Corrupt);
    }
}
