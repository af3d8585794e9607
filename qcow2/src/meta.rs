//! The metadata of an open image and every change to it, under one lock.
//!
//! `Meta` owns the header, the active L1 table, the L2 table cache, the refcounts and the queue of
//! clusters waiting to be freed. The driver holds its mutex only while looking up or changing
//! metadata (which may read or write metadata tables), never while guest data moves.
//!
//! Update order (see the crate docs for the reasoning):
//! 1. a data cluster is written before its L2 entry is set (the driver does this);
//! 2. [`Meta::flush`] writes refcount blocks and refcount table entries, syncs (the data file
//!    too, if there is one), then writes L2 tables, syncs again if L1 entries changed, writes L1
//!    entries and syncs. The first sync is kept with lazy refcounts too: it is also the barrier
//!    between guest data (a copy-on-write, a zero cluster written in place) and the L2 entry that
//!    exposes it; an evicted dirty L2 table is written after the same barrier;
//! 3. refcount decreases are queued and applied only at the end of that flush, when nothing on
//!    disk refers to the cluster any more (the freed cluster cannot be reused, nor its decreased
//!    refcount written, before the L2 change is durable);
//! 4. header changes are written as the first sector after what they point to is durable.

use std::collections::{BTreeSet, HashSet};

use blockdev::{read_exact_at, write_all_at, Error, ErrorKind, Result, Storage};

use crate::cache::{get_u64, set_u64, TableCache};
use crate::discard::DiscardKind;
use crate::entry::{Geometry, Sub, COPIED, L1_RESERVED, OFFSET_MASK};
use crate::header::{incompat, Extensions, Header};
use crate::refcount::Refcounts;

/// Clusters to release once nothing on disk points at them.
#[derive(Debug, Clone, Copy)]
pub struct Free {
    /// Host offset.
    pub offset: u64,
    /// Number of clusters.
    pub clusters: u64,
    /// What freed them: whether their space goes back to the file system.
    pub kind: DiscardKind,
}

/// The metadata state of an open image.
pub struct Meta {
    /// Fixed header fields as they should be on disk.
    pub h: Header,
    /// Header extensions.
    pub exts: Extensions,
    /// Entry geometry.
    pub geo: Geometry,
    /// Active L1 table.
    pub l1: Vec<u64>,
    /// L1 entries changed since the last flush.
    pub l1_dirty: BTreeSet<usize>,
    /// Cached L2 tables.
    pub l2: TableCache,
    /// Refcounts and allocator.
    pub rc: Refcounts,
    /// Clusters waiting to be freed.
    pub frees: Vec<Free>,
    /// Host offsets of L2 tables the active L1 refers to (for overlap checks).
    pub l2_tables: HashSet<u64>,
    /// Lazy refcounts are in use for this session.
    pub lazy: bool,
    /// The dirty bit is set on disk.
    pub dirty_on_disk: bool,
    /// Writes are allowed (cleared when corruption is found).
    pub writable: bool,
    /// A corruption event was already reported.
    pub corruption_reported: bool,
    /// Where the next compressed cluster may start (0 = in a fresh cluster).
    pub free_byte_offset: u64,
    /// The external data file, when guest data lives outside the image file: it is synced
    /// before any L2 table that points into it is written.
    pub external_data: Option<std::sync::Arc<dyn Storage>>,
    /// The internal snapshots, as the table on disk lists them (empty when opened for check,
    /// which reads the table itself).
    pub snapshots: Vec<crate::snapshot::SnapshotEntry>,
    /// Bytes the snapshot table occupies at `h.snapshots_offset`.
    pub snapshots_size: u64,
    /// The persistent bitmaps' directory entries, in directory order (see `bitmap/`).
    pub bitmaps: Vec<crate::bitmap::BitmapEntry>,
    /// Which freed clusters are given back to the file system (`discard.rs`).
    pub discard: blockdev::DiscardOptions,
}

impl Meta {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Reports corruption the way qemu does and, when `fatal` and the image is writable, marks it
    /// corrupt on disk and refuses further writes. Returns the error to hand to the caller.
    pub fn corruption(&mut self, io: &dyn Storage, fatal: bool, msg: String) -> Error {
        if !self.corruption_reported {
            if fatal && self.writable {
                eprintln!("qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed");
            } else {
                eprintln!("qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed");
            }
            self.corruption_reported = true;
        }
        if fatal && self.writable {
            self.h.incompatible |= incompat::CORRUPT;
            let _ = self.write_header(io, false).and_then(|()| io.flush());
            self.writable = false;
        }
        Error::new(ErrorKind::Corrupt, msg)
    }

    /// Writes the header: the first sector if only fixed fields changed, else the whole cluster.
    pub fn write_header(&self, io: &dyn Storage, whole: bool) -> Result<()> {
        let buf = self.h.encode_cluster(&self.exts)?;
        let n = if whole { buf.len() } else { 512.min(buf.len()) };
        write_all_at(io, 0, &buf[..n])
    }

    fn l2_offset(&mut self, io: &dyn Storage, l1_index: u64) -> Result<Option<u64>> {
        let Some(&e) = self.l1.get(l1_index as usize) else { return Ok(None) };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cluster_size() != 0 {
            return Err(self.corruption(
                io,
                true,
                format!("L2 table offset {off:#x} unaligned (L1 index: {})", c_hex(l1_index)),
            ));
        }
        Ok(Some(off))
    }

    /// Makes sure the L2 table at `off` is cached.
    pub fn load_l2(&mut self, io: &dyn Storage, off: u64) -> Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        let mut data = self.l2.buffer(self.cluster_size() as usize);
        // Every byte is overwritten (zeros past the end of the file).
        read_exact_at(io, off, &mut data)?;
        self.insert_l2(io, off, data, false)
    }

    fn insert_l2(&mut self, io: &dyn Storage, off: u64, data: Vec<u8>, dirty: bool) -> Result<()> {
        if let Some(ev) = self.l2.insert(off, data, dirty) {
            if ev.dirty {
                // An L2 table may only reach the disk after the refcounts and data it exposes.
                self.flush_refcounts(io, false)?;
                self.barrier(io)?;
                write_all_at(io, ev.offset, &ev.data)?;
            }
            self.l2.recycle(ev.data);
        }
        Ok(())
    }

    /// The L2 entry and subcluster bitmap of guest cluster `gc`.
    pub fn entry(&mut self, io: &dyn Storage, gc: u64) -> Result<(u64, u64)> {
        let n = self.geo.l2_entries();
        let Some(off) = self.l2_offset(io, gc / n)? else { return Ok((0, 0)) };
        self.load_l2(io, off)?;
        let t = self.l2.get(off).ok_or_else(|| Error::corrupt("L2 table vanished from the cache"))?;
        let i = (gc % n) as usize;
        Ok(if self.geo.extended { (get_u64(t, 2 * i), get_u64(t, 2 * i + 1)) } else { (get_u64(t, i), 0) })
    }

    /// Status of the run starting at guest byte `offset`, at most `max` bytes long and within one
    /// L2 table: the status and the run's length. Data runs have contiguous host offsets.
    pub fn map(&mut self, io: &dyn Storage, offset: u64, max: u64) -> Result<(Sub, u64)> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let sc = geo.subcluster_size();
        let n = geo.l2_entries();
        let table_end = (offset / geo.l2_coverage() + 1) * geo.l2_coverage();
        let end = offset.saturating_add(max).min(table_end);
        // The run lies within one L2 table: look it up once, then walk its entries.
        let l1_index = offset / cs / n;
        let l2 = self.l2_offset(io, l1_index)?;
        if let Some(off) = l2 {
            self.load_l2(io, off)?;
        }
        let table = match l2 {
            Some(off) => Some(self.l2.get(off).ok_or_else(|| Error::corrupt("L2 table vanished from the cache"))?),
            None => None,
        };
        let mut pos = offset;
        let mut first: Option<Sub> = None;
        let mut bad: Option<String> = None;
        while pos < end {
            let gc = pos / cs;
            let i = (gc % n) as usize;
            let (e, bm) = match table {
                Some(t) if geo.extended => (get_u64(t, 2 * i), get_u64(t, 2 * i + 1)),
                Some(t) => (get_u64(t, i), 0),
                None => (0, 0),
            };
            let index = ((pos % cs) / sc) as u32;
            let sub = geo.subcluster(e, bm, index);
            if let Sub::Invalid(why) = sub {
                bad = Some(format!("Invalid L2 entry for guest offset {pos:#x}: {why}"));
                break;
            }
            // As qemu: any host offset the entry carries (data, preallocated zero, or the cluster
            // of unallocated subclusters) must be cluster aligned.
            if let Sub::Data { host, .. } | Sub::Zero { host: Some(host) } | Sub::Unallocated { host: Some(host) } = sub
            {
                if host % cs != 0 {
                    let l2 = l2.unwrap_or(0);
                    bad = Some(format!(
                        "Cluster allocation offset {host:#x} unaligned (L2 offset: {}, L2 index: {})",
                        c_hex(l2),
                        c_hex(i as u64)
                    ));
                    break;
                }
            }
            let step_end = ((pos / sc) + 1) * sc;
            match first {
                None => first = Some(sub),
                Some(f) if !continues(f, sub, offset, pos, cs) => break,
                _ => {}
            }
            if matches!(sub, Sub::Compressed { .. }) {
                // Compressed clusters are handled one at a time.
                pos = ((pos / cs) + 1) * cs;
                break;
            }
            pos = step_end;
        }
        if let Some(why) = bad {
            return Err(self.corruption(io, true, why));
        }
        let first = first.unwrap_or(Sub::Unallocated { host: None });
        Ok((first, pos.min(end) - offset))
    }

    /// Makes the L2 table for `l1_index` exist and belong to this image alone; returns its offset.
    pub fn writable_l2(&mut self, io: &dyn Storage, l1_index: u64) -> Result<u64> {
        let i = l1_index as usize;
        if i >= self.l1.len() {
            return Err(Error::out_of_range("L1 table too small for this guest offset"));
        }
        let e = self.l1[i];
        if let Some(off) = self.l2_offset(io, l1_index)? {
            if let Some(what) = self.overlaps(off, self.cluster_size(), false) {
                let msg = format!("Preventing invalid write on metadata (L2 table at {off:#x} overlaps with {what})");
                return Err(self.corruption(io, true, msg));
            }
            if e & COPIED != 0 {
                self.load_l2(io, off)?;
                return Ok(off);
            }
            // Shared (a snapshot refers to it): copy it.
            self.load_l2(io, off)?;
            let data = self.l2.peek(off).map(<[u8]>::to_vec).ok_or_else(|| Error::corrupt("L2 table vanished"))?;
            let new = self.alloc(io, 1)?;
            self.insert_l2(io, new, data, true)?;
            self.queue_free(off, 1, DiscardKind::Other);
            self.l2_tables.remove(&off);
            return self.set_l1(i, new);
        }
        let new = self.alloc(io, 1)?;
        let zeros = vec![0u8; self.cluster_size() as usize];
        self.insert_l2(io, new, zeros, true)?;
        self.set_l1(i, new)
    }

    fn set_l1(&mut self, i: usize, table: u64) -> Result<u64> {
        self.l1[i] = table | COPIED;
        self.l1_dirty.insert(i);
        self.l2_tables.insert(table);
        Ok(table)
    }

    /// Sets the entry of guest cluster `gc` (its L2 table must be writable, see [`Self::writable_l2`]).
    pub fn set_entry(&mut self, io: &dyn Storage, gc: u64, entry: u64, bitmap: u64) -> Result<()> {
        let n = self.geo.l2_entries();
        let off = self.writable_l2(io, gc / n)?;
        let i = (gc % n) as usize;
        let extended = self.geo.extended;
        let t = self.l2.get_mut(off).ok_or_else(|| Error::corrupt("L2 table vanished from the cache"))?;
        if extended {
            set_u64(t, 2 * i, entry);
            set_u64(t, 2 * i + 1, bitmap);
        } else {
            set_u64(t, i, entry);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters, after making sure they do not overlap metadata.
    pub fn alloc(&mut self, io: &dyn Storage, n: u64) -> Result<u64> {
        if !self.writable {
            return Err(Error::read_only());
        }
        if self.lazy && !self.dirty_on_disk {
            self.h.incompatible |= incompat::DIRTY;
            self.write_header(io, false)?;
            io.flush()?;
            self.dirty_on_disk = true;
        }
        let off = self.rc.alloc(io, n)?;
        self.follow_reftable_move(io)?;
        if let Some(what) = self.overlaps_metadata(off, n * self.cluster_size()) {
            return Err(self.corruption(
                io,
                true,
                format!("Preventing invalid allocation of {what} at offset {off:#x} (refcounts say it is free)"),
            ));
        }
        Ok(off)
    }

    /// Points the header at the refcount table after the allocator moved it (it grows by moving),
    /// and queues the old table's clusters for freeing.
    pub fn follow_reftable_move(&mut self, io: &dyn Storage) -> Result<()> {
        if self.rc.table_offset != self.h.refcount_table_offset {
            self.h.refcount_table_offset = self.rc.table_offset;
            self.h.refcount_table_clusters = self.rc.table_clusters as u32;
            self.write_header(io, false)?;
            io.flush()?;
            for (o, c) in std::mem::take(&mut self.rc.retired) {
                self.queue_free(o, c, DiscardKind::Other);
            }
        }
        Ok(())
    }

    /// Names the metadata structure that `[off, off+len)` overlaps, if any.
    pub fn overlaps_metadata(&self, off: u64, len: u64) -> Option<&'static str> {
        self.overlaps(off, len, true)
    }

    /// Like [`Self::overlaps_metadata`], optionally not counting L2 tables (to check an L2 table
    /// against everything else).
    pub fn overlaps(&self, off: u64, len: u64, with_l2: bool) -> Option<&'static str> {
        self.overlaps_with(off, len, with_l2, true)
    }

    /// Like [`Self::overlaps_metadata`] without the active L1 table (to check a write over it).
    pub fn overlaps_except_active_l1(&self, off: u64, len: u64) -> Option<&'static str> {
        self.overlaps_with(off, len, true, false)
    }

    /// Like [`Self::overlaps`], optionally not counting the active L1 table either (to check a
    /// write of L1 entries against everything else).
    fn overlaps_with(&self, off: u64, len: u64, with_l2: bool, with_l1: bool) -> Option<&'static str> {
        let cs = self.cluster_size();
        let hit = |start: u64, size: u64| start < off + len && off < start + size;
        if hit(0, cs) {
            return Some("the header");
        }
        if with_l1 && self.h.l1_size > 0 && hit(self.h.l1_table_offset, self.h.l1_size as u64 * 8) {
            return Some("the active L1 table");
        }
        if hit(self.rc.table_offset, self.rc.table_clusters * cs) {
            return Some("the refcount table");
        }
        if self.h.nb_snapshots > 0 && hit(self.h.snapshots_offset, self.snapshots_size.max(1)) {
            return Some("the snapshot table");
        }
        if self.snapshots.iter().any(|sn| sn.l1_size > 0 && hit(sn.l1_offset, sn.l1_size as u64 * 8)) {
            return Some("an inactive L1 table");
        }
        if let Some(b) = &self.exts.bitmaps {
            if hit(b.directory_offset, b.directory_size.max(1)) {
                return Some("the bitmap directory");
            }
        }
        if self.bitmaps.iter().any(|e| hit(e.table_offset, e.table_size as u64 * 8)) {
            return Some("a bitmap table");
        }
        let first = off / cs;
        let last = (off + len - 1) / cs;
        for c in first..=last {
            let o = c * cs;
            if with_l2 && self.l2_tables.contains(&o) {
                return Some("an L2 table");
            }
            if self.rc.blocks.contains(&o) {
                return Some("a refcount block");
            }
        }
        None
    }

    /// Queues clusters to be freed after the next flush.
    pub fn queue_free(&mut self, offset: u64, clusters: u64, kind: DiscardKind) {
        if clusters > 0 {
            self.frees.push(Free { offset, clusters, kind });
        }
    }

    /// Whether clusters freed by `kind` are given back to the file system.
    pub fn passes(&self, kind: DiscardKind) -> bool {
        kind.passes(&self.discard)
    }

    /// Writes refcount blocks and table entries; with `sync`, makes them durable.
    pub fn flush_refcounts(&mut self, io: &dyn Storage, sync: bool) -> Result<()> {
        if !self.rc.is_dirty() {
            return Ok(());
        }
        if sync {
            return self.rc.make_durable(io);
        }
        self.rc.flush_blocks(io)?;
        if !self.rc.dirty_entries.is_empty() {
            io.flush()?;
            self.rc.flush_table_entries(io)?;
        }
        Ok(())
    }

    /// Makes guest data and everything written to the image file so far durable: the barrier
    /// between data (and refcount increases) and the L2 entries that expose them.
    fn barrier(&self, io: &dyn Storage) -> Result<()> {
        if let Some(d) = &self.external_data {
            d.flush()?;
        }
        io.flush()
    }

    /// Makes all metadata durable in the documented order, then applies queued frees and gives
    /// freed clusters back to the file system as the discard options say.
    pub fn flush(&mut self, io: &dyn Storage) -> Result<()> {
        let tables_dirty = self.l2.has_dirty() || !self.l1_dirty.is_empty();
        self.flush_refcounts(io, false)?;
        if tables_dirty {
            // Also with lazy refcounts: data copied on write, or written into a cluster that
            // was a zero cluster, must be durable before the L2 entry exposing it.
            self.barrier(io)?;
        }
        for off in self.l2.dirty() {
            if let Some(t) = self.l2.peek(off) {
                write_all_at(io, off, t)?;
            }
            self.l2.mark_clean(off);
        }
        if !self.l1_dirty.is_empty() {
            io.flush()?;
            self.write_l1_entries(io)?;
        }
        if !tables_dirty {
            // (With dirty tables, the barrier above already synced the data file.)
            if let Some(d) = &self.external_data {
                d.flush()?;
            }
        }
        io.flush()?;
        if !self.frees.is_empty() {
            self.apply_frees(io)?;
        }
        self.rc.punch_freed(io)
    }

    fn write_l1_entries(&mut self, io: &dyn Storage) -> Result<()> {
        let mut sectors = BTreeSet::new();
        for &i in &self.l1_dirty {
            sectors.insert(i / 64);
        }
        for s in sectors {
            let first = s * 64;
            let last = (first + 64).min(self.l1.len());
            let mut buf = Vec::with_capacity(512);
            for e in &self.l1[first..last] {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            let at = self.h.l1_table_offset + first as u64 * 8;
            // An L1 table placed on other metadata (the header, say) must not be written there.
            if let Some(what) = self.overlaps_with(at, buf.len() as u64, true, false) {
                let msg = format!("Preventing invalid write on metadata (active L1 table overlaps with {what})");
                return Err(self.corruption(io, true, msg));
            }
            write_all_at(io, at, &buf)?;
        }
        self.l1_dirty.clear();
        Ok(())
    }

    /// Applies queued frees (refcount decreases); clusters whose refcount drops to zero are
    /// queued for punching when their kind passes (the caller's [`Self::flush`] punches them).
    pub fn apply_frees(&mut self, io: &dyn Storage) -> Result<()> {
        let cs = self.cluster_size();
        for f in std::mem::take(&mut self.frees) {
            let punch = self.passes(f.kind);
            for c in 0..f.clusters {
                let off = f.offset + c * cs;
                if self.rc.update_with(io, off / cs, -1, punch)? == 0 {
                    self.l2.remove(off);
                }
            }
        }
        Ok(())
    }

    /// Validates the active L1 table: reserved bits clear and L2 offsets aligned.
    pub fn check_l1(&self) -> Result<()> {
        for (i, &e) in self.l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                return Err(Error::corrupt(format!("L1 entry {i} has reserved bits set ({e:#x})")));
            }
        }
        Ok(())
    }
}

/// Whether subcluster status `next` (at `pos`) continues a run that started with `first` at `start`.
fn continues(first: Sub, next: Sub, start: u64, pos: u64, cs: u64) -> bool {
    match (first, next) {
        (Sub::Data { host: h1, copied: c1 }, Sub::Data { host: h2, copied: c2 }) => {
            c1 == c2 && h2.wrapping_add(pos % cs) == h1.wrapping_add(start % cs).wrapping_add(pos - start)
        }
        (Sub::Zero { host: None }, Sub::Zero { host: None }) => true,
        (Sub::Zero { host: Some(h1) }, Sub::Zero { host: Some(h2) }) => {
            h2.wrapping_add(pos % cs) == h1.wrapping_add(start % cs).wrapping_add(pos - start)
        }
        (Sub::Unallocated { host: None }, Sub::Unallocated { host: None }) => true,
        // Unallocated subclusters of an allocated cluster carry its host offset (qemu's map
        // prints it), so runs of them end where the offsets stop being contiguous.
        (Sub::Unallocated { host: Some(h1) }, Sub::Unallocated { host: Some(h2) }) => {
            h2.wrapping_add(pos % cs) == h1.wrapping_add(start % cs).wrapping_add(pos - start)
        }
        _ => false,
    }
}

/// `v` as C's `%#x` prints it (qemu's messages): `0x` and hex digits, but plain `0` for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}
