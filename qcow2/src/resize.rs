//! Changing the virtual size: L1 table growth, shrinking, and preallocation of new space.
//!
//! Growing the L1 table writes a new table at a fresh location, makes it durable, then switches
//! the header (one sector) to it and only then frees the old table — a crash at any point leaves
//! either the old or the new table in force. Shrinking discards every cluster past the new end
//! before the header shrinks.

use std::io::IoSlice;

use blockdev::{Error, Prealloc, ResizeOptions, Result};

use crate::driver::Qcow2;
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::header::autoclear;
use crate::limits::{MAX_L1_SIZE, MAX_VIRTUAL_SIZE};
use crate::meta::Meta;

/// Grows the active L1 table to exactly `entries` entries (qemu sizes it exactly on resize).
pub fn grow_l1(m: &mut Meta, io: &dyn blockdev::Storage, entries: u64) -> Result<()> {
    if entries <= m.l1.len() as u64 {
        return Ok(());
    }
    if entries * 8 > MAX_L1_SIZE {
        return Err(Error::from_errno("grow L1 table", libc::EFBIG));
    }
    let cs = m.cluster_size();
    let clusters = (entries * 8).div_ceil(cs);
    // Pending L1 changes go into the new table; make the L2 tables they point to durable first.
    m.flush_refcounts(io, !m.lazy)?;
    for off in m.l2.dirty() {
        if let Some(t) = m.l2.peek(off) {
            blockdev::write_all_at(io, off, t)?;
        }
        m.l2.mark_clean(off);
    }
    let new_off = m.alloc(io, clusters)?;
    let mut table = m.l1.clone();
    table.resize(entries as usize, 0);
    let mut buf = Vec::with_capacity(table.len() * 8);
    for e in &table {
        buf.extend_from_slice(&e.to_be_bytes());
    }
    m.flush_refcounts(io, false)?;
    blockdev::write_all_at(io, new_off, &buf)?;
    io.flush()?;
    let old = (m.h.l1_table_offset, (m.h.l1_size as u64 * 8).div_ceil(cs));
    m.l1 = table;
    m.l1_dirty.clear();
    m.h.l1_table_offset = new_off;
    m.h.l1_size = entries as u32;
    m.write_header(io, false)?;
    io.flush()?;
    // The header names the new table durably: the old one is free at once (as in qemu, so the
    // next allocation may take its clusters).
    if old.0 != 0 {
        let punch = m.passes(crate::discard::DiscardKind::Other);
        m.rc.update_range_with(io, old.0 / cs, old.1, -1, punch)?;
    }
    Ok(())
}

impl Qcow2 {
    /// `resize` for qcow2.
    pub(crate) fn resize_image(&self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        self.check_writable()?;
        if new_size % 512 != 0 {
            return Err(Error::invalid_argument("The new size must be a multiple of 512"));
        }
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::from_errno("resize", libc::EFBIG));
        }
        let old = self.disk_size();
        {
            let m = self.lock();
            // Version 2 snapshot entries need not record their disk size, so it must not change.
            if m.h.nb_snapshots > 0 && m.h.version < 3 {
                return Err(Error::unsupported("Can't resize a v2 image which has snapshots"));
            }
        }
        // Bitmaps follow the disk: all must be consistent; they are stored resized after.
        let bitmaps = self.bitmaps_before_resize()?;
        self.resize_disk(old, new_size, opts)?;
        self.bitmaps_after_resize(bitmaps)
    }

    /// Resizes the disk from `old` to `new_size` bytes (checks done).
    fn resize_disk(&self, old: u64, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        // A raw external data file keeps its 1:1 mapping over the grown area too (as in qemu):
        // the new clusters are mapped at once, as metadata preallocation maps them.
        let raw_data_file = self.geo.data_file && self.lock().h.autoclear & autoclear::DATA_FILE_RAW != 0;
        let mut opts = *opts;
        if raw_data_file && opts.prealloc == Prealloc::Off && new_size > old {
            opts.prealloc = Prealloc::Metadata;
        }
        let opts = &opts;
        if new_size < old {
            if !opts.allow_shrink {
                return Err(Error::invalid_argument("Use the --shrink option to perform a shrink operation."));
            }
            if opts.prealloc != Prealloc::Off {
                return Err(Error::unsupported("Preallocation can't be used for shrinking an image"));
            }
            return self.shrink(new_size);
        }
        {
            let mut m = self.lock();
            let io = self.file.as_ref();
            let need = m.geo.l1_entries_for(new_size);
            grow_l1(&mut m, io, need)?;
            m.h.size = new_size;
            m.write_header(io, false)?;
            io.flush()?;
        }
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        // Clusters past the old end can still be mapped (the VM state area of a snapshot that
        // was applied): the grown disk must not show them.
        let cs = self.cluster_size();
        if new_size > old && self.maps_anything_from(old.div_ceil(cs))? {
            self.discard_clusters(old.div_ceil(cs), new_size.div_ceil(cs), crate::discard::DiscardKind::Other)?;
        }
        // An external data file grows with the disk (clusters map 1:1 onto it).
        if self.geo.data_file && opts.prealloc == Prealloc::Off && self.data.len()? < new_size {
            self.data.set_len(new_size, Prealloc::Off)?;
        }
        let whole_run = matches!(opts.prealloc, Prealloc::Falloc | Prealloc::Full) && !self.geo.data_file;
        if whole_run && new_size > old {
            self.grow_allocated(old, new_size, opts.prealloc)?;
        } else if opts.prealloc != Prealloc::Off && new_size > old {
            self.preallocate(old, new_size, opts.prealloc)?;
        } else if new_size > old && self.backing.as_ref().is_some_and(|b| b.size() > old) {
            // The new area reads as zeros, not as what a longer backing file holds there.
            self.zero_range(old, new_size - old, blockdev::ZeroFlags::default())?;
        }
        Ok(())
    }

    /// Whether the active tables map anything at or after guest cluster `first`.
    fn maps_anything_from(&self, first: u64) -> Result<bool> {
        let mut m = self.lock();
        let io = self.file.as_ref();
        let n = m.geo.l2_entries();
        for i in (first / n) as usize..m.l1.len() {
            if m.l1[i] & OFFSET_MASK == 0 {
                continue;
            }
            for gc in (i as u64 * n).max(first)..(i as u64 + 1) * n {
                if m.entry(io, gc)? != (0, 0) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn shrink(&self, new_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let old = self.disk_size();
        // Free everything past the new end (whole clusters; the partial last one keeps its data).
        let from = new_size.div_ceil(cs) * cs;
        if from < old {
            let _g = self.writes.lock(from / cs, old.div_ceil(cs));
            let mut m = self.lock();
            let io = self.file.as_ref();
            for gc in from / cs..old.div_ceil(cs) {
                let (e, bitmap) = m.entry(io, gc)?;
                if (e, bitmap) != (0, 0) {
                    m.set_entry(io, gc, 0, 0)?;
                    crate::write::queue_entry_free(&mut m, e, cs, crate::discard::DiscardKind::Always);
                }
            }
            // L2 tables wholly past the end go too, with whatever they still map there (the
            // VM state area of an applied snapshot): each mapping is one reference less.
            let keep = m.geo.l1_entries_for(new_size) as usize;
            let stride = if m.geo.extended { 2 } else { 1 };
            for i in keep..m.l1.len() {
                let t = m.l1[i] & OFFSET_MASK;
                if t != 0 {
                    m.load_l2(io, t)?;
                    let table = m.l2.peek(t).map(<[u8]>::to_vec).unwrap_or_default();
                    for j in 0..m.geo.l2_entries() as usize {
                        let e = crate::cache::get_u64(&table, j * stride);
                        crate::write::queue_entry_free(&mut m, e, cs, crate::discard::DiscardKind::Always);
                    }
                    m.l1[i] = 0;
                    m.l1_dirty.insert(i);
                    m.l2_tables.remove(&t);
                    m.queue_free(t, 1, crate::discard::DiscardKind::Always);
                }
            }
            m.flush(io)?;
        }
        let mut m = self.lock();
        m.h.size = new_size;
        m.write_header(self.file.as_ref(), false)?;
        self.file.flush()?;
        // The file ends after its last cluster in use (freed clusters at the end go away).
        if !self.geo.data_file {
            let io = self.file.as_ref();
            let len = io.len()?;
            let mut end = len.div_ceil(cs);
            while end > 0 && m.rc.get(io, end - 1)? == 0 {
                end -= 1;
            }
            if end * cs < len {
                io.set_len(end * cs, Prealloc::Off)?;
            }
        }
        drop(m);
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The host cluster of guest cluster `gc` when it is a plain, solely owned data cluster.
    fn owned_host_cluster(&self, gc: u64) -> Result<Option<u64>> {
        let mut m = self.lock();
        let (e, _) = m.entry(self.file.as_ref(), gc)?;
        let plain = e & COPIED != 0 && e & (COMPRESSED | ZERO) == 0 && e & OFFSET_MASK != 0;
        Ok(plain.then_some(e & OFFSET_MASK))
    }

    /// Completes the unit (cluster or subcluster) holding the new disk end `to`, whose cluster
    /// is at `host` in `target`: its part past the end gets what a backing file has there (zeros
    /// without one), as qemu's copy-on-write leaves it.
    fn copy_tail_past_end(&self, target: &dyn blockdev::Storage, host: u64, to: u64, unit: u64) -> Result<()> {
        let mut buf = vec![0u8; (unit - to % unit) as usize];
        blockdev::mapped::read_backing(self, to, &mut [std::io::IoSliceMut::new(&mut buf)])?;
        blockdev::write_all_at(target, host + to % self.cluster_size(), &buf)
    }

    /// Allocates clusters for `[from, to)` the way qemu's metadata preallocation does: the
    /// cluster holding `from` keeps its host cluster when it has one of its own (its new part is
    /// zeroed in place); otherwise it is allocated with the rest, its head copied. The file grows
    /// to cover the clusters (with the file space itself allocated for falloc/full, used here for
    /// images with an external data file).
    pub(crate) fn preallocate(&self, from: u64, to: u64, mode: Prealloc) -> Result<()> {
        let cs = self.cluster_size();
        let mut gc = from / cs;
        let unit = if self.geo.extended { self.geo.subcluster_size() } else { cs };
        let mut head = Vec::new();
        let mut head_at = 0;
        if from % cs != 0 {
            let end = (from.div_ceil(cs) * cs).min(to);
            match self.owned_host_cluster(from / cs)? {
                Some(host) if mode != Prealloc::Full => {
                    // Only what lies inside the file: the rest reads as zeros and stays sparse.
                    let target = if self.geo.data_file { self.data.as_ref() } else { self.file.as_ref() };
                    let zero_from = host + from % cs;
                    let zero_to = (host + end - gc * cs).min(target.len()?);
                    if zero_to > zero_from {
                        target.write_zeroes(zero_from, zero_to - zero_from, false)?;
                    }
                    // Extended entries: the file covers the new units of the cluster.
                    let covered = host + (end - gc * cs).next_multiple_of(unit);
                    if self.geo.extended && target.len()? < covered {
                        target.set_len(covered, Prealloc::Off)?;
                    }
                    if self.geo.extended && to % unit != 0 && to <= end {
                        self.copy_tail_past_end(target, host, to, unit)?;
                    }
                    gc += 1;
                }
                Some(_) => {
                    self.write_range(from, &[IoSlice::new(&vec![0u8; (end - from) as usize])])?;
                    gc += 1;
                }
                None => {
                    // Copy-on-write of the head, in whole units (clusters, or subclusters).
                    let from_unit = from % cs / unit * unit;
                    head = vec![0u8; (from % cs - from_unit) as usize];
                    head_at = from_unit;
                    self.read_range(gc * cs + from_unit, &mut [std::io::IoSliceMut::new(&mut head)])?;
                }
            }
        }
        let last = to.div_ceil(cs);
        while gc < last {
            let mut m = self.lock();
            let io = self.file.as_ref();
            let table_end = (gc / m.geo.l2_entries() + 1) * m.geo.l2_entries();
            let n = (last.min(table_end) - gc).min(1 << 14);
            let l1_index = gc / m.geo.l2_entries();
            m.writable_l2(io, l1_index)?;
            let host = if m.geo.data_file { gc * cs } else { m.alloc(io, n)? };
            for i in 0..n {
                // Extended entries keep their subcluster bits (none for a new cluster).
                let (old, bitmap) = m.entry(io, gc + i)?;
                m.set_entry(io, gc + i, (host + i * cs) | COPIED, bitmap)?;
                if old & (OFFSET_MASK | COMPRESSED) != 0 {
                    crate::write::queue_entry_free(&mut m, old, cs, crate::discard::DiscardKind::Other);
                }
            }
            drop(m);
            let target = if self.geo.data_file { self.data.as_ref() } else { self.file.as_ref() };
            if to % unit != 0 && to.div_ceil(cs) == gc + n {
                self.copy_tail_past_end(target, host + (n - 1) * cs, to, unit)?;
            }
            if !head.is_empty() {
                blockdev::write_all_at(target, host + head_at, &std::mem::take(&mut head))?;
                // Metadata and head reach the file before the rest is allocated, so the file
                // system lays the image out as it does for qemu.
                self.lock().flush(self.file.as_ref())?;
                self.file.flush()?;
            }
            // The file covers the chunk up to the new end of the disk (the last cluster may stay
            // partly past the end of the file, as qemu leaves it).
            let need = host + (to.min((gc + n) * cs) - gc * cs);
            if target.len()? < need {
                target.set_len(need, if mode == Prealloc::Metadata { Prealloc::Off } else { mode })?;
            } else if mode == Prealloc::Full || mode == Prealloc::Falloc {
                target.write_zeroes(host, n * cs, false)?;
            }
            gc += n;
        }
        // A backing file reaching into the new area must not show through: the new area is
        // zeroed (zero flags; explicit zeros for a partial first unit), as qemu does.
        if self.backing.as_ref().is_some_and(|b| b.size() > from) {
            self.zero_range(from, to - from, blockdev::ZeroFlags::default())?;
        }
        self.lock().flush(self.file.as_ref())
    }
}
