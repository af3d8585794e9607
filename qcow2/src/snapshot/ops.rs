//! Taking, reverting to and deleting internal snapshots, and rewriting the snapshot table.
//!
//! Every operation holds the whole disk in the write range lock and the metadata lock, starts
//! from flushed metadata and ends flushed. The orders keep a crash harmless (at worst clusters
//! leak, which `check -r leaks` repairs):
//! - create: copy the active L1 table to new clusters; add one to the refcount of everything the
//!   active table reaches and clear COPIED; flush; then write a new snapshot table and switch the
//!   header to it (below);
//! - table rewrite: write the whole table to new clusters; sync; point the header at it (one
//!   sector) and sync; only then free the old table;
//! - delete: first drop the entry from the table (the rewrite above); then take one from the
//!   refcount of everything its L1 table reaches and free that table; flush; then set COPIED
//!   again in the active tables where the count dropped to one; flush;
//! - apply: add one to everything the snapshot reaches; flush; write the snapshot's L1 entries over
//!   the active L1 table and sync; take one from everything the old active table reached; flush;
//!   recompute COPIED in the active tables; flush.

use blockdev::{read_exact_at, write_all_at, Error, Result, Storage};

use crate::cache::get_u64;
use crate::driver::Qcow2;
use crate::limits::{MAX_L1_SIZE, MAX_SNAPSHOTS, MAX_SNAPSHOT_TABLE_BYTES};
use crate::meta::Meta;
use crate::snapshot::table::{encode_table, encoded_size, SnapshotEntry, KNOWN_EXTRA_SIZE};

/// What the caller records about a new snapshot.
#[derive(Debug, Clone, Default)]
pub struct NewSnapshot {
    /// The tag.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state already written to the VM state area (see `api.rs`).
    pub vm_state_size: u64,
    /// Instruction count, or [`NO_ICOUNT`](crate::snapshot::table::NO_ICOUNT).
    pub icount: u64,
}

/// Finds a snapshot the way qemu does: by id and name when both are given, else by either.
pub fn find(list: &[SnapshotEntry], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    list.iter()
        .position(|sn| id.is_none_or(|i| sn.id == i) && name.is_none_or(|n| sn.name == n))
        .filter(|_| id.is_some() || name.is_some())
}

/// Finds a snapshot whose id is `key`, else one whose name is `key`.
pub fn find_id_or_name(list: &[SnapshotEntry], key: &str) -> Option<usize> {
    find(list, Some(key), None).or_else(|| find(list, None, Some(key)))
}

/// qemu's check of a snapshot's L1 table position and size before it is used.
pub fn validate_l1(sn: &SnapshotEntry, cs: u64) -> Result<()> {
    let entries = sn.l1_size as u64;
    if entries > MAX_L1_SIZE / 8 {
        return Err(Error::from_errno("snapshot", libc::EFBIG).with_message("Snapshot L1 table too large"));
    }
    let bytes = entries * 8;
    if (i64::MAX as u64) - bytes < sn.l1_offset || sn.l1_offset % cs != 0 {
        return Err(Error::from_errno("snapshot", libc::EINVAL).with_message("Snapshot L1 table offset invalid"));
    }
    Ok(())
}

/// Reads a snapshot's L1 table (validated first), padded with zeros to `min_len` entries.
pub fn read_l1(io: &dyn Storage, sn: &SnapshotEntry, cs: u64, min_len: usize) -> Result<Vec<u64>> {
    validate_l1(sn, cs)?;
    let mut raw = vec![0u8; sn.l1_size as usize * 8];
    read_exact_at(io, sn.l1_offset, &mut raw)?;
    let mut l1: Vec<u64> = (0..sn.l1_size as usize).map(|i| get_u64(&raw, i)).collect();
    if l1.len() < min_len {
        l1.resize(min_len, 0);
    }
    Ok(l1)
}

fn encode_l1(l1: &[u64]) -> Vec<u8> {
    l1.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Meta {
    /// Writes `entries` as the new snapshot table and switches the header to it (see the module
    /// docs for the order). On success the old table is queued for freeing.
    pub(crate) fn write_snapshot_table(&mut self, io: &dyn Storage, entries: Vec<SnapshotEntry>) -> Result<()> {
        let size = encoded_size(&entries);
        if size > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::from_errno("snapshot", libc::EFBIG));
        }
        let cs = self.cluster_size();
        let clusters = size.div_ceil(cs);
        let offset = if clusters > 0 { self.alloc(io, clusters)? } else { 0 };
        let written = (|| {
            self.flush(io)?;
            if clusters > 0 {
                write_all_at(io, offset, &encode_table(&entries))?;
            }
            io.flush()
        })();
        if let Err(e) = written {
            if clusters > 0 {
                self.queue_free(offset, clusters, crate::discard::DiscardKind::Never);
            }
            return Err(e);
        }
        let (old_offset, old_size) = (self.h.snapshots_offset, self.snapshots_size);
        let old_nb = self.h.nb_snapshots;
        self.h.nb_snapshots = entries.len() as u32;
        self.h.snapshots_offset = offset;
        if let Err(e) = self.write_header(io, false).and_then(|()| io.flush()) {
            self.h.nb_snapshots = old_nb;
            self.h.snapshots_offset = old_offset;
            return Err(e);
        }
        self.snapshots = entries;
        for sn in &mut self.snapshots {
            sn.extra_data_size = sn.extra_data_size.max(KNOWN_EXTRA_SIZE);
        }
        self.snapshots_size = size;
        if old_nb > 0 && old_size > 0 {
            let first = old_offset / cs * cs;
            self.queue_free(
                first,
                (old_offset + old_size).div_ceil(cs) - first / cs,
                crate::discard::DiscardKind::Snapshot,
            );
        }
        Ok(())
    }

    /// Recomputes COPIED throughout the active tables.
    fn fix_active_copied(&mut self, io: &dyn Storage) -> Result<()> {
        let mut l1 = self.l1.clone();
        let r = self.update_tree_refcounts(io, &mut l1, 0);
        self.mark_l1_changes(&l1);
        self.l1 = l1;
        r.map(|_| ())
    }

    /// Marks the active L1 entries that differ from `new` dirty (before `new` replaces them).
    fn mark_l1_changes(&mut self, new: &[u64]) {
        for (i, (&a, &b)) in self.l1.iter().zip(new).enumerate() {
            if a != b {
                self.l1_dirty.insert(i);
            }
        }
    }

    fn rebuild_l2_set(&mut self) {
        self.l2_tables = self.l1.iter().map(|e| e & crate::entry::OFFSET_MASK).filter(|o| *o != 0).collect();
    }
}

impl Qcow2 {
    /// Refuses snapshot operations qcow2 cannot do on this image.
    fn snapshot_preconditions(&self, m: &Meta) -> Result<()> {
        if m.geo.data_file {
            return Err(Error::from_errno("snapshot", libc::ENOTSUP));
        }
        Ok(())
    }

    /// The snapshots as the table lists them.
    pub(crate) fn snapshot_entries(&self) -> Result<Vec<SnapshotEntry>> {
        let m = self.lock();
        self.snapshot_preconditions(&m)?;
        Ok(m.snapshots.clone())
    }

    /// Takes a snapshot of the current disk.
    pub(crate) fn snapshot_create(&self, new: &NewSnapshot) -> Result<()> {
        self.check_writable()?;
        let _all = self.writes.lock(0, u64::MAX);
        let mut m = self.lock();
        let io = self.file.as_ref();
        self.snapshot_preconditions(&m)?;
        if m.snapshots.len() as u64 >= MAX_SNAPSHOTS {
            return Err(Error::from_errno("snapshot", libc::EFBIG));
        }
        m.flush(io)?;
        let next_id = m.snapshots.iter().map(|sn| leading_number(&sn.id)).max().unwrap_or(0) + 1;
        let cs = m.cluster_size();
        let l1_bytes = m.l1.len() as u64 * 8;
        let l1_clusters = l1_bytes.div_ceil(cs);
        let l1_offset = if l1_clusters > 0 { m.alloc(io, l1_clusters)? } else { 0 };
        // The copy keeps the active entries as they are (COPIED flags included; they mean
        // nothing in a snapshot's table).
        if l1_clusters > 0 {
            write_all_at(io, l1_offset, &encode_l1(&m.l1))?;
        }
        let mut l1 = m.l1.clone();
        let walked = m.update_tree_refcounts(io, &mut l1, 1);
        m.mark_l1_changes(&l1);
        m.l1 = l1;
        walked?;
        m.follow_reftable_move(io)?;
        m.flush(io)?;
        let sn = SnapshotEntry {
            l1_offset,
            l1_size: m.l1.len() as u32,
            id: next_id.to_string(),
            name: new.name.clone(),
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: new.vm_state_size,
            disk_size: self.disk_size(),
            icount: new.icount,
            extra_data_size: KNOWN_EXTRA_SIZE,
            unknown_extra: Vec::new(),
        };
        let mut entries = m.snapshots.clone();
        entries.push(sn);
        m.write_snapshot_table(io, entries)?;
        m.flush(io)
    }

    /// Reverts the disk to the snapshot whose id, else name, is `key`.
    pub(crate) fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        let sn = {
            let m = self.lock();
            self.snapshot_preconditions(&m)?;
            let i = find_id_or_name(&m.snapshots, key).ok_or_else(|| Error::from_errno("snapshot", libc::ENOENT))?;
            let sn = m.snapshots[i].clone();
            validate_l1(&sn, m.cluster_size())?;
            sn
        };
        // The whole disk may change: enabled bitmaps must say so (the spec's `auto` rule).
        self.note_change(0, self.disk_size())?;
        if sn.disk_size != self.disk_size() {
            let opts = blockdev::ResizeOptions { allow_shrink: true, ..Default::default() };
            self.resize_image(sn.disk_size, &opts)?;
        }
        let _all = self.writes.lock(0, u64::MAX);
        let mut m = self.lock();
        let io = self.file.as_ref();
        m.flush(io)?;
        if sn.l1_size as usize > m.l1.len() {
            crate::resize::grow_l1(&mut m, io, sn.l1_size as u64)?;
        }
        let cs = m.cluster_size();
        let mut new_l1 = read_l1(io, &sn, cs, m.l1.len())?;
        let sn_l1_changed = m.update_tree_refcounts(io, &mut new_l1[..sn.l1_size as usize], 1)?;
        m.follow_reftable_move(io)?;
        m.flush(io)?;
        if sn_l1_changed {
            write_all_at(io, sn.l1_offset, &encode_l1(&new_l1[..sn.l1_size as usize]))?;
        }
        let at = m.h.l1_table_offset;
        let len = m.l1.len() as u64 * 8;
        if let Some(what) = m.overlaps_except_active_l1(at, len) {
            let msg = format!("Preventing invalid write on metadata (active L1 table overlaps with {what})");
            return Err(m.corruption(io, true, msg));
        }
        write_all_at(io, at, &encode_l1(&new_l1))?;
        io.flush()?;
        // The old active tree loses its reference; the in-memory table is still the old one.
        let mut old_l1 = std::mem::replace(&mut m.l1, new_l1);
        m.l1_dirty.clear();
        m.rebuild_l2_set();
        let r = m.update_tree_refcounts(io, &mut old_l1, -1);
        m.follow_reftable_move(io)?;
        r?;
        m.flush(io)?;
        m.fix_active_copied(io)?;
        m.flush(io)
    }

    /// Deletes the snapshot matching `id` and/or `name`.
    pub(crate) fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let _all = self.writes.lock(0, u64::MAX);
        let mut m = self.lock();
        let io = self.file.as_ref();
        self.snapshot_preconditions(&m)?;
        let i = find(&m.snapshots, id, name)
            .ok_or_else(|| Error::from_errno("snapshot", libc::ENOENT).with_message("Can't find the snapshot"))?;
        let sn = m.snapshots[i].clone();
        let cs = m.cluster_size();
        validate_l1(&sn, cs)?;
        m.flush(io)?;
        let mut entries = m.snapshots.clone();
        entries.remove(i);
        m.write_snapshot_table(io, entries).map_err(|e| e.prefixed("Failed to remove snapshot from snapshot list"))?;
        // From here on a failure only leaks clusters.
        let mut l1 = read_l1(io, &sn, cs, 0)?;
        m.update_tree_refcounts(io, &mut l1, -1).map_err(|e| e.prefixed("Failed to free the cluster and L1 table"))?;
        let l1_clusters = (sn.l1_size as u64 * 8).div_ceil(cs);
        if l1_clusters > 0 {
            let punch = m.passes(crate::discard::DiscardKind::Snapshot);
            m.rc.update_range_with(io, sn.l1_offset / cs, l1_clusters, -1, punch)?;
        }
        m.follow_reftable_move(io)?;
        m.flush(io)?;
        m.fix_active_copied(io).map_err(|e| e.prefixed("Failed to update snapshot status in disk"))?;
        m.flush(io)
    }
}

/// The number an id starts with (C's `strtoul`: 0 when there is none).
fn leading_number(id: &str) -> u64 {
    let digits: String = id.trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry { id: id.into(), name: name.into(), ..SnapshotEntry::default() }
    }

    #[test]
    fn lookup_prefers_ids_then_names() {
        let list = [sn("1", "2"), sn("2", "one"), sn("3", "one")];
        assert_eq!(find_id_or_name(&list, "2"), Some(1));
        assert_eq!(find_id_or_name(&list, "one"), Some(1));
        assert_eq!(find(&list, Some("3"), Some("one")), Some(2));
        assert_eq!(find(&list, Some("3"), Some("2")), None);
        assert_eq!(find(&list, None, None), None);
    }

    #[test]
    fn ids_number_like_strtoul() {
        assert_eq!(leading_number("12abc"), 12);
        assert_eq!(leading_number("x"), 0);
        assert_eq!(leading_number(" 7"), 7);
    }
}
