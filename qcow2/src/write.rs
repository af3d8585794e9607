//! The write side: write plans with allocation and copy-on-write, zeroing and discard.
//!
//! Guest writes run on the mapping core (`mapping.rs`), which asks [`Qcow2::plan`] how to write
//! each piece while the piece's guest clusters are held in the driver's range lock. Clusters that
//! are already this image's own (COPIED) are written in place. Others get freshly allocated host
//! clusters (contiguous for a run of clusters): the core fills the parts of the first and last
//! cluster that the request does not cover from the old content (the old cluster, a compressed
//! cluster, the backing file or zeros), writes the whole run with one vectored write, and only
//! then are the L2 entries pointed at the new clusters ([`Qcow2::point_at_new`]). When those parts
//! are zeros and the run is fresh, the file zeroes the run instead
//! (`Storage::zero_without_writing`) and only the guest's bytes are written: a 4 KiB write into a
//! new 64 KiB cluster writes 4 KiB, not 64. Old clusters are queued for freeing, which happens
//! after the next flush (see `meta.rs`).

use std::io::IoSlice;

use blockdev::{Error, Result, ZeroFlags};

use crate::discard::DiscardKind;
use crate::driver::Qcow2;
use crate::entry::{sub_mask, Sub, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::header::autoclear;
use crate::meta::Meta;

/// All subclusters read as zeros (extended L2 bitmap).
pub(crate) const ALL_ZERO_BITS: u64 = 0xffff_ffff << 32;

/// What a planned write step does.
pub(crate) enum Step {
    /// Write `len` bytes at host `host` in place; then apply `update` (extended L2 bitmap changes).
    InPlace { host: u64, len: u64, update: Option<(u64, u64, u64)> },
    /// New (or reused) host clusters for guest clusters `[gc, gc + count)` starting at `host`.
    Allocate { gc: u64, count: u64, host: u64, fresh: bool, old: Vec<(u64, u64)> },
}

impl Qcow2 {
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only || !self.lock().writable {
            return Err(Error::read_only().with_path(self.file.name()));
        }
        Ok(())
    }

    /// Writes `bufs` at guest `offset`; the range may lie past the disk's size (the VM state
    /// area), callers check it. Bitmaps are not told (see `Qcow2::note_change`).
    pub(crate) fn write_range(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        blockdev::mapped::write_mapped(self, offset, bufs)
    }

    /// Decides how to write the piece starting at `pos` (under the metadata lock).
    pub(crate) fn plan(&self, m: &mut Meta, pos: u64, len: u64) -> Result<Step> {
        let io = self.file.as_ref();
        let cs = self.cluster_size();
        let gc = pos / cs;
        let (entry, bitmap) = m.entry(io, gc)?;
        let sub = m.geo.subcluster(entry, bitmap, ((pos % cs) / m.geo.subcluster_size()) as u32);
        if let Sub::Invalid(why) = sub {
            return Err(m.corruption(io, true, format!("Invalid L2 entry for guest offset {pos:#x}: {why}")));
        }
        let host = entry & OFFSET_MASK;
        let own = entry & COPIED != 0 && entry & COMPRESSED == 0 && (host != 0 || m.geo.data_file);
        if own && host % cs != 0 {
            return Err(m.corruption(io, true, format!("Cluster allocation offset {host:#x} unaligned")));
        }
        if own && !m.geo.extended && entry & ZERO == 0 {
            // In place, extended over following clusters that are contiguous and ours too.
            let mut n = (cs - pos % cs).min(len);
            let mut next = gc + 1;
            while n < len && (next * cs) % m.geo.l2_coverage() != 0 {
                let (e, _) = m.entry(io, next)?;
                if e & (COPIED | COMPRESSED | ZERO) != COPIED || e & OFFSET_MASK != host + (next - gc) * cs {
                    break;
                }
                n += cs.min(len - n);
                next += 1;
            }
            self.check_overlap(m, host + pos % cs, n)?;
            return Ok(Step::InPlace { host: host + pos % cs, len: n, update: None });
        }
        if own && m.geo.extended {
            // The cluster is ours: write in place; subclusters that become data may need their
            // uncovered part filled, which the allocation path does with the same host cluster.
            let sc = m.geo.subcluster_size();
            let n = (cs - pos % cs).min(len);
            let (first, last) = (((pos % cs) / sc) as u32, (((pos % cs) + n - 1) / sc) as u32);
            let all_data = (first..=last).all(|i| matches!(m.geo.subcluster(entry, bitmap, i), Sub::Data { .. }));
            let aligned = pos % sc == 0 && (pos + n) % sc == 0;
            if all_data || aligned {
                let mask = sub_mask(first, last - first + 1);
                let new_bitmap = (bitmap | mask) & !(mask << 32);
                let update = (new_bitmap != bitmap).then_some((gc, entry, new_bitmap));
                self.check_overlap(m, host + pos % cs, n)?;
                return Ok(Step::InPlace { host: host + pos % cs, len: n, update });
            }
            return Ok(Step::Allocate { gc, count: 1, host, fresh: false, old: vec![(entry, bitmap)] });
        }
        if own {
            // A preallocated zero cluster of ours: reuse its host cluster.
            return Ok(Step::Allocate { gc, count: 1, host, fresh: false, old: vec![(entry, bitmap)] });
        }
        // Fresh clusters for this cluster and following ones that also need them (same L2 table).
        let mut count = 1;
        let mut old = vec![(entry, bitmap)];
        let end = pos + len;
        while (gc + count) * cs < end && ((gc + count) * cs) % m.geo.l2_coverage() != 0 {
            let (e, b) = m.entry(io, gc + count)?;
            let h = e & OFFSET_MASK;
            if e & COPIED != 0 && e & COMPRESSED == 0 && (h != 0 || m.geo.data_file) {
                break;
            }
            old.push((e, b));
            count += 1;
        }
        m.writable_l2(io, gc / m.geo.l2_entries())?;
        let host = if m.geo.data_file {
            // External data files map guest offsets 1:1.
            gc * cs
        } else {
            m.alloc(io, count)?
        };
        Ok(Step::Allocate { gc, count, host, fresh: true, old })
    }

    /// Refuses a data write that would land on metadata (a corrupt or hostile image).
    fn check_overlap(&self, m: &mut Meta, host: u64, len: u64) -> Result<()> {
        if m.geo.data_file {
            return Ok(());
        }
        if let Some(what) = m.overlaps_metadata(host, len) {
            let msg = format!("Preventing invalid write on metadata (overlaps with {what})");
            return Err(m.corruption(self.file.as_ref(), true, msg));
        }
        Ok(())
    }

    /// Whether guest clusters whose old entries are `old` read as zeros, so that a fresh run
    /// for them needs nothing carried over: unencrypted, standard entries that are zero
    /// clusters, or unallocated with no backing file.
    pub(crate) fn old_reads_as_zeros(&self, old: &[(u64, u64)]) -> bool {
        !self.geo.extended
            && !self.geo.data_file
            && self.cipher.is_none()
            && old.iter().all(|&(e, _)| {
                e & COMPRESSED == 0 && (e & ZERO != 0 || (e & OFFSET_MASK == 0 && self.backing.is_none()))
            })
    }

    /// After the data write of a planned allocation: points the L2 entries of guest clusters
    /// from `gc` (one per entry of `old`, their previous entries) at the host clusters from
    /// `host` (the write covered guest `[pos, pos+n)`) and queues the old ones for freeing.
    pub(crate) fn point_at_new(
        &self,
        pos: u64,
        n: u64,
        gc: u64,
        host: u64,
        fresh: bool,
        old: &[(u64, u64)],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let mut m = self.lock();
        let io = self.file.as_ref();
        let sc = m.geo.subcluster_size();
        for (i, (e, b)) in old.iter().copied().enumerate() {
            let this = gc + i as u64;
            let h = host + i as u64 * cs;
            let new_bitmap = if m.geo.extended {
                // Subclusters written or copied become data; others keep their zero state.
                let c_start = this * cs;
                let mut alloc = 0u64;
                for s in 0..32u32 {
                    let s_start = c_start + s as u64 * sc;
                    let s_end = s_start + sc;
                    let touched = s_end > pos && s_start < pos + n;
                    let was_data = matches!(m.geo.subcluster(e, b, s), Sub::Data { .. } | Sub::Compressed { .. });
                    if touched || was_data || e & COMPRESSED != 0 {
                        alloc |= 1 << s;
                    }
                }
                let zero = if e & COMPRESSED != 0 { 0 } else { (b >> 32) & !alloc };
                alloc | (zero << 32)
            } else {
                0
            };
            m.set_entry(io, this, h | COPIED, new_bitmap)?;
            if fresh {
                // As qemu: the space of a cluster replaced by copy-on-write is never passed on
                // (measured: pass-discard-other=on leaves it allocated too).
                queue_entry_free(&mut m, e, cs, DiscardKind::Never);
            }
        }
        if fresh {
            self.flush_if_many_frees(&mut m)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros.
    pub(crate) fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let (raw_data, version, extended) = {
            let m = self.lock();
            (m.h.autoclear & autoclear::DATA_FILE_RAW != 0, m.h.version, m.geo.extended)
        };
        let unit = if extended { self.geo.subcluster_size() } else { self.cluster_size() };
        let can_flag = version >= 3 && !raw_data;
        let start = offset.div_ceil(unit) * unit;
        // At the end of the disk, a partial unit counts as whole; so does a partial last
        // cluster when the range covers it from its start (qemu flags the whole cluster).
        let end = if offset + len == self.disk_size() {
            let cs = self.cluster_size();
            let last_cluster = (offset + len - 1) / cs * cs;
            let round = if offset <= last_cluster { cs } else { unit };
            (offset + len).div_ceil(round) * round
        } else {
            (offset + len) / unit * unit
        };
        let end = end.max(start);
        if !can_flag && !raw_data && self.backing.is_none() {
            return self.zero_without_flags(offset, len, flags);
        }
        // Unaligned head and tail are written as zero data.
        if start > offset || !can_flag {
            let head_end = if can_flag { start.min(offset + len) } else { offset + len };
            self.write_zero_data(offset, head_end - offset, flags)?;
            if !can_flag {
                return Ok(());
            }
        }
        if end < offset + len && end >= start {
            let tail_from = end.max(offset);
            self.write_zero_data(tail_from, offset + len - tail_from, flags)?;
        }
        if end > start {
            self.zero_units(start, end, flags.may_unmap)?;
        }
        Ok(())
    }

    fn write_zero_data(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if flags.no_fallback {
            return Err(Error::unsupported("Zeroing this range needs writing zero data"));
        }
        let chunk = len.min(1 << 20) as usize;
        let zeros = vec![0u8; chunk];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            self.write_range(offset + done, &[IoSlice::new(&zeros[..n])])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zeroes a range of an image without zero flags (version 2) and without a backing file,
    /// where an unallocated cluster already reads as zeros: whole clusters that are unallocated
    /// stay so, allocated ones are deallocated when unmapping is allowed; the rest gets zero data.
    fn zero_without_flags(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let c_end = ((pos / cs + 1) * cs).min(end);
            let whole = pos % cs == 0 && (c_end % cs == 0 || c_end == self.disk_size());
            if whole {
                let _g = self.writes.lock(pos / cs, pos / cs + 1);
                let mut m = self.lock();
                let io = self.file.as_ref();
                let (e, _) = m.entry(io, pos / cs)?;
                if e & (OFFSET_MASK | COMPRESSED) == 0 {
                    pos = c_end;
                    continue;
                }
                if flags.may_unmap {
                    m.set_entry(io, pos / cs, 0, 0)?;
                    queue_entry_free(&mut m, e, cs, DiscardKind::Request);
                    self.flush_if_many_frees(&mut m)?;
                    pos = c_end;
                    continue;
                }
            }
            self.write_zero_data(pos, c_end - pos, flags)?;
            pos = c_end;
        }
        Ok(())
    }

    /// Sets zero flags (or subcluster zero bits) for whole units in `[start, end)`.
    fn zero_units(&self, start: u64, end: u64, may_unmap: bool) -> Result<()> {
        let cs = self.cluster_size();
        // Parts of shared or compressed clusters that only zero data can express, written once
        // the range lock is released (the write takes it itself).
        let mut as_data: Vec<(u64, u64)> = Vec::new();
        {
            let _g = self.writes.lock(start / cs, (end - 1) / cs + 1);
            let mut m = self.lock();
            self.zero_units_locked(&mut m, start, end, may_unmap, &mut as_data)?;
            self.flush_if_many_frees(&mut m)?;
        }
        for (from, to) in as_data {
            self.write_zero_data(from, to - from, ZeroFlags::default())?;
        }
        Ok(())
    }

    fn zero_units_locked(
        &self,
        m: &mut Meta,
        start: u64,
        end: u64,
        may_unmap: bool,
        as_data: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let io = self.file.as_ref();
        let mut pos = start;
        while pos < end {
            let gc = pos / cs;
            let c_end = ((gc + 1) * cs).min(end);
            let (e, b) = m.entry(io, gc)?;
            let host = e & OFFSET_MASK;
            let own = e & COPIED != 0 && e & COMPRESSED == 0;
            if m.geo.extended {
                let sc = m.geo.subcluster_size();
                let first = ((pos % cs) / sc) as u32;
                let count = ((c_end - pos) / sc) as u32;
                let mask = sub_mask(first, count);
                if e & COMPRESSED != 0 || (host != 0 && !own) {
                    // Shared or compressed: only whole clusters can drop their host cluster.
                    if count == 32 {
                        m.set_entry(io, gc, 0, ALL_ZERO_BITS)?;
                        queue_entry_free(m, e, cs, DiscardKind::Request);
                    } else {
                        as_data.push((pos, c_end));
                    }
                } else if count == 32 && may_unmap && host != 0 {
                    m.set_entry(io, gc, 0, ALL_ZERO_BITS)?;
                    queue_entry_free(m, e, cs, DiscardKind::Request);
                } else {
                    m.set_entry(io, gc, e, (b & !mask) | (mask << 32))?;
                }
            } else {
                let keep = own && host != 0 && !may_unmap;
                let new = if keep { host | COPIED | ZERO } else { ZERO };
                if new != e {
                    m.set_entry(io, gc, new, 0)?;
                    if !keep {
                        queue_entry_free(m, e, cs, DiscardKind::Request);
                    }
                }
            }
            pos = c_end;
        }
        Ok(())
    }

    /// Discards whole clusters in `[offset, offset+len)` (partial clusters are left alone).
    pub(crate) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let start = offset.div_ceil(cs) * cs;
        // The last partial cluster at the end of the disk counts as whole.
        let end =
            if offset + len == self.disk_size() { (offset + len).div_ceil(cs) * cs } else { (offset + len) / cs * cs };
        if end <= start {
            return Ok(());
        }
        self.discard_clusters(start / cs, end / cs, DiscardKind::Request)
    }

    /// Discards guest clusters `[first, end)`, which may lie past the end of the disk (the VM
    /// state area): they read as zeros (or fall through to a missing backing file) afterwards.
    /// `kind` says what discards them (whether freed clusters go back to the file system).
    pub(crate) fn discard_clusters(&self, first: u64, end: u64, kind: DiscardKind) -> Result<()> {
        let _g = self.writes.lock(first, end);
        let mut m = self.lock();
        let io = self.file.as_ref();
        let has_backing = self.backing.is_some();
        let cs = self.cluster_size();
        for gc in first..end {
            let (e, b) = m.entry(io, gc)?;
            let allocated = e & (OFFSET_MASK | COMPRESSED) != 0 || (m.geo.data_file && e & COPIED != 0);
            if !allocated && (b >> 32) == 0xffff_ffff {
                continue;
            }
            let (ne, nb) = if has_backing || allocated {
                if m.geo.extended {
                    (0, ALL_ZERO_BITS)
                } else if m.h.version >= 3 {
                    (ZERO, 0)
                } else {
                    (0, 0)
                }
            } else {
                (e, b)
            };
            if (ne, nb) != (e, b) {
                m.set_entry(io, gc, ne, nb)?;
                if allocated {
                    queue_entry_free(&mut m, e, cs, kind);
                }
            }
        }
        self.flush_if_many_frees(&mut m)
    }
}

/// Queues the host clusters of L2 entry `e` for freeing (`kind`: what freed them, which decides
/// whether their space goes back to the file system).
pub(crate) fn queue_entry_free(m: &mut Meta, e: u64, cs: u64, kind: DiscardKind) {
    if m.geo.data_file {
        // Data file clusters are not refcounted (they map guest clusters 1:1): as in qemu, one
        // that a guest request, an emptying or a shrink unmaps goes back to the file system at
        // once. The caller holds the guest cluster in the range lock, and it reads as zeros (or
        // as discarded) whether or not the L2 change reaches the disk.
        let allocated = e & COMPRESSED == 0 && e & COPIED != 0;
        let unmapping = matches!(kind, DiscardKind::Request | DiscardKind::Snapshot | DiscardKind::Always);
        if allocated && unmapping && m.passes(kind) {
            if let Some(data) = &m.external_data {
                // Advisory, as in qemu: a failed punch only leaves the old bytes in the file.
                let _ = data.discard(e & OFFSET_MASK, cs);
            }
        }
        return;
    }
    if e & COMPRESSED != 0 {
        let (off, size) = m.geo.compressed(e);
        let first = off / cs * cs;
        let last = (off + size - 1) / cs * cs;
        m.queue_free(first, (last - first) / cs + 1, kind);
        return;
    }
    let host = e & OFFSET_MASK;
    if host != 0 {
        m.queue_free(host, 1, kind);
    }
}
