//! Walking an L1 tree to change the refcounts of everything it reaches and to keep the COPIED
//! flags true.
//!
//! A cluster's refcount counts the L1 tables (active and snapshots) that reach it: an L2 table
//! shared by two L1 tables counts twice, and so does every cluster it maps. Taking a snapshot adds
//! one to everything the active table reaches; deleting one takes one away from everything its
//! table reaches. COPIED means "refcount is exactly one" and is only meaningful in the active
//! tables; a walk with `addend` 0 only recomputes it.
//!
//! Callers flush before and after: the walk changes refcounts and L2 tables in the caches, and the
//! flush writes refcounts before the L2 tables whose flags depend on them.

use blockdev::{Error, Result, Storage};

use crate::cache::{get_u64, set_u64};
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::meta::Meta;

impl Meta {
    /// Adds `addend` (-1, 0 or 1) to the refcount of every cluster reachable from `l1` and sets
    /// or clears COPIED in the L2 entries and in `l1` to match the new counts. Clusters whose
    /// refcount drops to zero are free at once (callers make sure nothing on disk refers to them).
    /// Returns whether `l1` changed.
    pub(crate) fn update_tree_refcounts(&mut self, io: &dyn Storage, l1: &mut [u64], addend: i64) -> Result<bool> {
        let cs = self.cluster_size();
        let n = self.geo.l2_entries() as usize;
        let stride = if self.geo.extended { 2 } else { 1 };
        let mut l1_changed = false;
        for (l1_index, slot) in l1.iter_mut().enumerate() {
            let old = *slot;
            let l2_off = old & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off % cs != 0 {
                let msg = format!("L2 table offset {l2_off:#x} unaligned (L1 index: {l1_index:#x})");
                return Err(self.corruption(io, true, msg));
            }
            self.load_l2(io, l2_off)?;
            let table = self.l2.peek(l2_off).map(<[u8]>::to_vec).unwrap_or_default();
            let mut changed: Vec<(usize, u64)> = Vec::new();
            for i in 0..n {
                let e = get_u64(&table, i * stride);
                let new = self.entry_refcount(io, e, addend, l2_off, i)?;
                if new != e {
                    changed.push((i * stride, new));
                }
            }
            if !changed.is_empty() {
                if let Some(t) = self.l2.get_mut(l2_off) {
                    for (at, v) in changed {
                        set_u64(t, at, v);
                    }
                }
            }
            let count = if addend != 0 {
                self.update_counted(io, l2_off / cs, addend)?
            } else {
                self.rc.get(io, l2_off / cs)?
            };
            if count == 0 {
                // The table itself was freed: its cached copy must never be written.
                self.l2.remove(l2_off);
            }
            let new = if count == 1 { l2_off | COPIED } else { l2_off };
            if new != old {
                *slot = new;
                l1_changed = true;
            }
        }
        Ok(l1_changed)
    }

    /// Adds `addend` to the refcount of a cluster the tree refers to. A cluster no refcount block
    /// covers cannot be in use: the reference is bogus, and creating a block (or growing the
    /// table) for it is refused with EAGAIN, as qemu reports it, or EFBIG past the largest
    /// refcount table.
    fn update_counted(&mut self, io: &dyn Storage, cluster: u64, addend: i64) -> Result<u64> {
        let table_index = cluster / self.rc.block_entries();
        if table_index >= crate::limits::MAX_REFTABLE_SIZE / 8 {
            return Err(Error::from_errno("snapshot", libc::EFBIG));
        }
        let block = self.rc.table.get(table_index as usize).map_or(0, |e| e & OFFSET_MASK);
        if block == 0 {
            return Err(Error::from_errno("snapshot", libc::EAGAIN));
        }
        // A refcount that cannot grow further is qemu's EINVAL.
        let punch = addend < 0 && self.passes(crate::discard::DiscardKind::Snapshot);
        self.rc.update_with(io, cluster, addend, punch).map_err(|e| match (e.kind(), e.errno()) {
            (blockdev::ErrorKind::OutOfRange, None) => Error::from_errno("snapshot", libc::EINVAL),
            _ => e,
        })
    }

    /// Applies `addend` to the clusters of L2 entry `e` (at index `i` of the table at `l2_off`)
    /// and returns the entry with COPIED recomputed.
    fn entry_refcount(&mut self, io: &dyn Storage, e: u64, addend: i64, l2_off: u64, i: usize) -> Result<u64> {
        let cs = self.cluster_size();
        if e & COMPRESSED != 0 {
            if addend != 0 {
                let (off, size) = self.geo.compressed(e);
                let first = off / cs;
                let last = (off + size - 1) / cs;
                for c in first..=last {
                    self.update_counted(io, c, addend)?;
                }
            }
            // Compressed clusters are never written in place.
            return Ok(e & !COPIED);
        }
        let host = e & OFFSET_MASK;
        if host == 0 {
            return Ok(e & !COPIED);
        }
        if host % cs != 0 {
            let msg =
                format!("Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {i:#x})");
            return Err(self.corruption(io, true, msg));
        }
        let count =
            if addend != 0 { self.update_counted(io, host / cs, addend)? } else { self.rc.get(io, host / cs)? };
        // Zero-flagged entries with a host cluster (preallocated zeros) count like data.
        let base = e & !COPIED;
        Ok(if count == 1 { base | COPIED } else { base })
    }
}
