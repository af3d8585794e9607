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
        write_all_at(io, table_off, &table)?;
        io.flush()?;
        self.h.refcount_table_offset = table_off;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.h.refcount_order = order;
        self.write_header(io, false)?;
        io.flush()?;
        let tables = (crate::limits::DEFAULT_REFCOUNT_CACHE_BYTES / cs)
            .clamp(crate::limits::MIN_CACHE_TABLES as u64, 4096) as usize;
        self.rc = Refcounts::load(io, table_off, table_clusters, order, self.geo.cluster_bits, tables)?;
        self.frees.clear();
        Ok(())
    }
}
