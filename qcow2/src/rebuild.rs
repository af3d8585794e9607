//! Writing a whole new refcount structure: used by repair (rebuild from recounted references) and
//! by `amend -o refcount_bits=N` (the same counts in a different width).
//!
//! The new blocks and table go after every cluster in use, describe themselves, and are made
//! durable before the header (one sector) switches to them; only then is the old structure
//! forgotten. A crash before the switch leaves the old structure in force.

use blockdev::{write_all_at, Error, Result, Storage};

use crate::meta::Meta;
use crate::refcount::{write_entry, Refcounts};

impl Meta {
    /// Replaces the refcount structure by one of width `1 << order` holding `counts` (one per
    /// cluster; the new structure's own clusters are added).
    pub fn install_refcounts(&mut self, io: &dyn Storage, mut counts: Vec<u64>, order: u32) -> Result<()> {
        let cs = self.cluster_size();
        let per = (cs * 8) >> order;
        let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
        if let Some(c) = counts.iter().position(|&c| c > max) {
            return Err(Error::out_of_range(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {}",
                1 << order,
                c as u64 * cs,
                counts[c]
            )));
        }
        let file_clusters = io.len()?.div_ceil(cs);
        let first = counts.iter().rposition(|&c| c > 0).map(|p| p as u64 + 1).unwrap_or(1).max(file_clusters);
        let (mut blocks, mut table_clusters) = (0u64, 1u64);
        loop {
            let end = first + blocks + table_clusters;
            let need_blocks = end.div_ceil(per);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            blocks = need_blocks;
            table_clusters = need_table;
        }
        if table_clusters * cs > crate::limits::MAX_REFTABLE_SIZE {
            return Err(Error::from_errno("rebuild refcounts", libc::EFBIG));
        }
        let end = first + blocks + table_clusters;
        counts.resize(end as usize, 0);
        for c in first..end {
            counts[c as usize] = 1;
        }
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..per {
                if let Some(&v) = counts.get((b * per + i) as usize) {
                    write_entry(&mut block, order, i as usize, v);
                }
            }
            let off = (first + b) * cs;
            write_all_at(io, off, &block)?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        let table_off = (first + blocks) * cs;
        self.h.refcount_order = order;
        self.switch_reftable(io, table_off, &table, table_clusters)
    }

    /// Writes a fully prepared refcount table at `table_off`, points the header at it (after a
    /// flush, so the header never names a table that is not on disk) and reloads the refcounts.
    fn switch_reftable(&mut self, io: &dyn Storage, table_off: u64, table: &[u8], table_clusters: u64) -> Result<()> {
        write_all_at(io, table_off, table)?;
        io.flush()?;
        self.h.refcount_table_offset = table_off;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.write_header(io, false)?;
        io.flush()?;
        let cs = self.geo.cluster_size();
        let tables = (crate::limits::DEFAULT_REFCOUNT_CACHE_BYTES / cs)
            .clamp(crate::limits::MIN_CACHE_TABLES as u64, 4096) as usize;
        let order = self.h.refcount_order;
        self.rc = Refcounts::load(io, table_off, table_clusters, order, self.geo.cluster_bits, tables)?;
        self.frees.clear();
        Ok(())
    }
}

/// qemu's overlap check before each write of a rebuild: clusters the old metadata names (an L1
/// table or refcount block beyond the end of the file, which counting skipped) may look free, and
/// writing a new refcount structure over them would leave the image pointing at it.
fn refuse_overlap(m: &Meta, off: u64, len: u64, what: &str) -> Result<()> {
    match m.overlaps_metadata(off, len) {
        Some(hit) => Err(Error::corrupt(format!(
            "ERROR writing {what}: Preventing invalid write on metadata (overlaps with {hit})"
        ))),
        None => Ok(()),
    }
}

/// First run of `n` free clusters at or after `*first_free` in `counts` (growing it past the end
/// if needed); marks them used and returns the first cluster index.
fn alloc_counted(counts: &mut Vec<u64>, n: u64, first_free: &mut u64) -> u64 {
    let mut cluster = *first_free;
    let mut run = 0u64;
    let mut first_gap = true;
    while (cluster as usize) < counts.len() && run < n {
        if counts[cluster as usize] == 0 {
            run += 1;
            if first_gap {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        cluster += 1;
    }
    if run < n {
        let need = (cluster + n - run) as usize;
        counts.resize(need.max(counts.len()), 0);
    }
    let start = cluster - run;
    for c in start..start + n {
        counts[c as usize] = 1;
    }
    start
}

impl Meta {
    /// Rebuilds the refcount structure from recounted references the way qemu's repair does (new
    /// refcount blocks in the first free clusters of the range they describe, then the table in the
    /// first free run), so that a repaired image has qemu's layout. The header switches to the new
    /// table only after the blocks and table are written and synced.
    pub fn rebuild_refcounts(&mut self, io: &dyn Storage, counts: &mut Vec<u64>) -> Result<()> {
        let cs = self.cluster_size();
        let order = self.h.refcount_order;
        let per = (cs * 8) >> order;
        let mut table: Vec<u64> = Vec::new();
        let write_blocks = |counts: &mut Vec<u64>, table: &mut Vec<u64>, first: u64, mut end: u64| -> Result<bool> {
            let mut grown = false;
            let mut first_free = 0u64;
            let mut c = first;
            while c < end {
                if counts.get(c as usize).copied().unwrap_or(0) == 0 {
                    c += 1;
                    continue;
                }
                let bi = c / per;
                let bstart = bi * per;
                let off = match table.get(bi as usize) {
                    Some(&o) if o != 0 => o,
                    _ => {
                        first_free = first_free.max(bstart);
                        let at = alloc_counted(counts, 1, &mut first_free);
                        if at >= end {
                            end = at + 1;
                        }
                        if table.len() as u64 <= bi {
                            let entries = ((bi + 1) * 8).div_ceil(cs) * cs / 8;
                            table.resize(entries as usize, 0);
                            grown = true;
                        }
                        table[bi as usize] = at * cs;
                        at * cs
                    }
                };
                let mut block = vec![0u8; cs as usize];
                for i in 0..per {
                    if let Some(&v) = counts.get((bstart + i) as usize) {
                        write_entry(&mut block, order, i as usize, v);
                    }
                }
                refuse_overlap(self, off, cs, "refblock")?;
                write_all_at(io, off, &block)?;
                c = bstart + per;
            }
            Ok(grown)
        };
        let n = counts.len() as u64;
        write_blocks(counts, &mut table, 0, n)?;
        let (table_off, table_clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(cs);
            let mut first_free = 0;
            let start = alloc_counted(counts, clusters, &mut first_free);
            if !write_blocks(counts, &mut table, start, start + clusters)? {
                break (start * cs, clusters);
            }
        };
        if table_clusters * cs > crate::limits::MAX_REFTABLE_SIZE {
            return Err(Error::from_errno("rebuild refcounts", libc::EFBIG));
        }
        refuse_overlap(self, table_off, table_clusters * cs, "reftable")?;
        let mut raw = Vec::with_capacity(table.len() * 8);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.switch_reftable(io, table_off, &raw, table_clusters)
    }
}
