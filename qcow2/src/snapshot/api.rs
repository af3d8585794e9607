//! [`blockdev::Snapshots`] for qcow2, the VM state area, and temporarily loaded snapshots.
//!
//! The VM state area lies in the guest address space right after the disk, starting at the first
//! L2 table boundary at or past the disk size. A VMM's state is written there, the snapshot taken
//! (its L1 copy then reaches the state), and the area dropped from the active tables again so the
//! next snapshot does not share it.

use blockdev::info::SnapshotInfo;
use blockdev::{Error, Result, SnapshotParams, Snapshots};

use crate::driver::Qcow2;
use crate::snapshot::ops::{find, read_l1, NewSnapshot};
use crate::snapshot::table::{SnapshotEntry, NO_ICOUNT};

impl Qcow2 {
    /// Guest offset of the VM state area.
    pub(crate) fn vm_state_offset(&self) -> u64 {
        self.geo.l1_entries_for(self.disk_size()) * self.geo.l2_coverage()
    }

    /// Writes `state` to the VM state area (growing the L1 table to cover it).
    fn write_vm_state(&self, state: &[u8]) -> Result<()> {
        let start = self.vm_state_offset();
        let end = start.checked_add(state.len() as u64).ok_or_else(|| Error::from_errno("savevm", libc::EFBIG))?;
        {
            let mut m = self.lock();
            let entries = m.geo.l1_entries_for(end);
            crate::resize::grow_l1(&mut m, self.file.as_ref(), entries)?;
        }
        self.write_range(start, &[std::io::IoSlice::new(state)])
    }
}

/// The table's entries as `info` and `snapshot -l` describe them.
pub(crate) fn infos(entries: &[SnapshotEntry]) -> Vec<SnapshotInfo> {
    entries
        .iter()
        .map(|sn| SnapshotInfo {
            id: sn.id.clone(),
            name: sn.name.clone(),
            vm_state_size: sn.vm_state_size,
            date_sec: sn.date_sec as i64,
            date_nsec: sn.date_nsec as i64,
            vm_clock_sec: (sn.vm_clock_nsec / 1_000_000_000) as i64,
            vm_clock_nsec: (sn.vm_clock_nsec % 1_000_000_000) as i64,
            icount: (sn.icount != NO_ICOUNT).then_some(sn.icount),
        })
        .collect()
}

impl Snapshots for Qcow2 {
    fn list(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(infos(&self.snapshot_entries()?))
    }

    fn save(&self, params: &SnapshotParams, vm_state: &[u8]) -> Result<()> {
        self.check_writable()?;
        if self.geo.data_file {
            return Err(Error::from_errno("snapshot", libc::ENOTSUP));
        }
        if !vm_state.is_empty() {
            self.write_vm_state(vm_state)?;
        }
        // As qemu: a tag is at most 255 bytes (longer ones are cut).
        let mut name = params.name.clone();
        crate::snapshot::table::truncate_at_char(&mut name, 255);
        let new = NewSnapshot {
            name,
            date_sec: params.date_sec as u32,
            date_nsec: params.date_nsec as u32,
            vm_clock_nsec: params.vm_clock_nsec,
            vm_state_size: vm_state.len() as u64,
            icount: params.icount.unwrap_or(NO_ICOUNT),
        };
        let created = self.snapshot_create(&new);
        if !vm_state.is_empty() {
            // The state is the snapshot's now (or, if taking it failed, nobody's): the active
            // disk does not need it.
            let cs = self.cluster_size();
            let first = self.vm_state_offset() / cs;
            let dropped = self.discard_clusters(
                first,
                first + (vm_state.len() as u64).div_ceil(cs),
                crate::discard::DiscardKind::Never,
            );
            created?;
            dropped?;
            return blockdev::BlockDriver::flush(self);
        }
        created
    }

    fn apply(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_apply(id_or_name)
    }

    fn read_vm_state(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.vm_state_offset().checked_add(offset).ok_or_else(|| Error::out_of_range("VM state offset"))?;
        at.checked_add(buf.len() as u64).ok_or_else(|| Error::out_of_range("VM state offset"))?;
        self.read_range(at, &mut [std::io::IoSliceMut::new(buf)])
    }

    fn delete(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.snapshot_delete(id, name)
    }

    fn load_temporarily(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if !self.read_only {
            return Err(Error::invalid_argument("Device is not readonly"));
        }
        let mut m = self.lock();
        if m.geo.data_file {
            return Err(Error::from_errno("snapshot", libc::ENOTSUP));
        }
        let i = find(&m.snapshots, id, name)
            .ok_or_else(|| Error::from_errno("snapshot", libc::ENOENT).with_message("Can't find snapshot"))?;
        let sn = m.snapshots[i].clone();
        let cs = m.cluster_size();
        let l1 = read_l1(self.file.as_ref(), &sn, cs, 0)?;
        m.l1 = l1;
        m.l1_dirty.clear();
        m.l2 = crate::cache::TableCache::new(m.l2.capacity());
        m.l2_tables = m.l1.iter().map(|e| e & crate::entry::OFFSET_MASK).filter(|o| *o != 0).collect();
        // The disk keeps its current size, as qemu's temporary load does: a larger disk reads
        // zeros past the snapshot's end.
        Ok(())
    }
}
