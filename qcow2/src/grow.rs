//! Growing an image with `falloc` or `full` preallocation, laid out as qemu lays it out.
//!
//! qemu grows such images in one piece at the end of the file: first a refcount area (new
//! refcount blocks for the clusters to come, then a new refcount table covering everything),
//! then one contiguous run of data clusters starting with the cluster that holds the old end of
//! the disk, whose old head is copied over. Following the same steps gives images with qemu's
//! layout, so `create -o preallocation=falloc|full` and `resize --preallocation=falloc|full`
//! write the same bytes as qemu-img.
//!
//! Update order: new refcount blocks, then the new table (synced), then the header (synced),
//! then the old table is freed; data clusters are counted before any L2 entry points at them,
//! and the L2 entries reach the disk with the next metadata flush.

use std::io::IoSliceMut;

use blockdev::{write_all_at, Error, Prealloc, Result};

use crate::driver::Qcow2;
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::meta::Meta;

impl Meta {
    /// Creates refcount structures for clusters `[start, start + additional)` at cluster `start`
    /// (blocks the area lacks, then a new table covering all of it) and switches to them. Every
    /// cluster from `start` on must be free. Returns the first cluster after the new structures.
    pub fn refcount_area(&mut self, io: &dyn blockdev::Storage, start: u64, additional: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let per_block = self.rc.block_entries();
        let per_table_cluster = cs / 8;
        // The smallest number of blocks and table clusters that count everything including
        // themselves.
        let (blocks, _) = crate::measure::self_counting_refcounts(start + additional, per_block, per_table_cluster);
        let table_clusters = blocks.div_ceil(per_table_cluster);
        if table_clusters * cs > crate::limits::MAX_REFTABLE_SIZE {
            return Err(Error::from_errno("grow refcount table", libc::EFBIG));
        }
        self.rc.flush_blocks(io)?;
        self.rc.flush_table_entries(io)?;
        let mut new_table = self.rc.table.clone();
        new_table.resize((table_clusters * per_table_cluster) as usize, 0);
        let first_block = start / per_block;
        let missing: Vec<u64> = (first_block..blocks).filter(|&i| new_table[i as usize] & OFFSET_MASK == 0).collect();
        let table_at = start + missing.len() as u64;
        let end = table_at + table_clusters;
        let old_table = (self.rc.table_offset, self.rc.table_clusters);
        self.rc.table = new_table;
        self.rc.table_offset = table_at * cs;
        self.rc.table_clusters = table_clusters;
        for (i, &bi) in missing.iter().enumerate() {
            self.rc.install_empty_block(io, bi, start + i as u64)?;
        }
        self.rc.update_range(io, start, end - start, 1)?;
        self.rc.flush_blocks(io)?;
        self.rc.write_table(io)?;
        io.flush()?;
        self.rc.dirty_entries.clear();
        self.h.refcount_table_offset = table_at * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.write_header(io, false)?;
        io.flush()?;
        let punch = self.passes(crate::discard::DiscardKind::Other);
        self.rc.update_range_with(io, old_table.0 / cs, old_table.1, -1, punch)?;
        Ok(end)
    }
}

impl Qcow2 {
    /// Allocates the clusters of `[old, new)` in one run after a refcount area at the end of the
    /// file, with `falloc` or `full` preallocation of the file. The cluster holding `old` moves
    /// into the run with its head copied.
    pub(crate) fn grow_allocated(&self, old: u64, new: u64, mode: Prealloc) -> Result<()> {
        let cs = self.cluster_size();
        let io = self.file.as_ref();
        let first = old / cs;
        let count = new.div_ceil(cs).saturating_sub(first);
        if count == 0 {
            return Ok(());
        }
        let l2_tables = count.div_ceil(self.geo.l2_entries()) + 1;
        let mut head = vec![0u8; (old % cs) as usize];
        if !head.is_empty() {
            self.read_range(first * cs, &mut [IoSliceMut::new(&mut head)])?;
        }
        let start = {
            let mut m = self.lock();
            m.flush(io)?;
            let used_end = m.rc.end_of_used(io)?;
            let area = if used_end > 0 { used_end } else { io.len()?.div_ceil(cs) };
            let start = m.refcount_area(io, area, count + l2_tables)?;
            m.rc.update_range(io, start, count, 1)?;
            m.flush(io)?;
            start
        };
        let host = start * cs;
        io.set_len(host + count * cs, mode)?;
        if !head.is_empty() {
            write_all_at(io, host, &head)?;
        }
        // With a backing file reaching past the old end, new subclusters are allocated (they
        // hold zeros); otherwise their allocation bits stay as they were.
        let allocate_subclusters = self.geo.extended && self.backing.as_ref().is_some_and(|b| b.size() > old);
        let mut m = self.lock();
        for i in 0..count {
            let gc = first + i;
            let (old_entry, old_bitmap) = m.entry(io, gc)?;
            let bitmap = match (self.geo.extended, allocate_subclusters) {
                (false, _) => 0,
                (true, true) => 0xffff_ffff,
                (true, false) => old_bitmap,
            };
            m.set_entry(io, gc, (host + i * cs) | COPIED, bitmap)?;
            if old_entry & (OFFSET_MASK | COMPRESSED) != 0 {
                crate::write::queue_entry_free(&mut m, old_entry, cs, crate::discard::DiscardKind::Other);
            }
        }
        m.flush(io)
    }
}
