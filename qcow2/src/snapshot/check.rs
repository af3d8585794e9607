//! `check` of the snapshot table: reading it with repair, and rewriting it after the refcounts
//! are right.
//!
//! Order (qemu's, so the same image gets the same report): the table is read first; with `-r
//! all` entries that make it too big are dropped (the header's count is lowered at once, which
//! only leaks clusters the refcount check then frees) and oversized extra data is trimmed.
//! Version 3 entries without the VM state and disk sizes are counted as corruptions. Only after
//! the refcount check, when the refcounts can be trusted for allocation, is the table rewritten
//! to repair what was found.

use blockdev::info::{error_report_line, CheckReport};
use blockdev::{Error, Result};

use crate::driver::Qcow2;
use crate::limits::MAX_SNAPSHOTS;
use crate::meta::Meta;
use crate::snapshot::table::{read_table, ENTRY_HEADER_SIZE, V3_MIN_EXTRA_SIZE};

impl Qcow2 {
    /// Reads the snapshot table into `m` for a check, repairing with `fix` what can be repaired
    /// before the refcount check. Findings go to `res`.
    pub(crate) fn check_read_snapshot_table(
        &self,
        m: &mut Meta,
        fix: bool,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> Result<()> {
        let io = self.file.as_ref();
        let cs = m.cluster_size();
        let mut nb = m.h.nb_snapshots as u64;
        let offset = m.h.snapshots_offset;
        let mut reduced = 0u64;
        if nb > MAX_SNAPSHOTS && fix {
            report(&format!("Discarding {} overhanging snapshots", nb - MAX_SNAPSHOTS));
            reduced += nb - MAX_SNAPSHOTS;
            nb = MAX_SNAPSHOTS;
        }
        let invalid = if nb > MAX_SNAPSHOTS {
            Some(("snapshot table too large", libc::EFBIG))
        } else if (i64::MAX as u64) - nb * ENTRY_HEADER_SIZE < offset || offset % cs != 0 {
            Some(("snapshot table offset invalid", libc::EINVAL))
        } else {
            None
        };
        if let Some((what, errno)) = invalid {
            res.check_errors += 1;
            report(&error_report_line(&format!("ERROR {what}")));
            if nb > MAX_SNAPSHOTS {
                report(&format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    nb - MAX_SNAPSHOTS
                ));
            }
            m.snapshots.clear();
            m.snapshots_size = 0;
            return Err(Error::from_errno("check", errno));
        }
        let size = m.h.size;
        let table = match read_table(io, offset, nb as u32, size, fix, report) {
            Ok(t) => t,
            Err(e) => {
                res.check_errors += 1;
                report(&error_report_line(&format!("ERROR failed to read the snapshot table: {}", e.message())));
                m.snapshots.clear();
                m.snapshots_size = 0;
                // (The message is reported above; the check fails with the errno.)
                return Err(Error::from_errno("check", e.errno().unwrap_or(libc::EIO)));
            }
        };
        reduced += table.dropped_entries as u64;
        res.corruptions += reduced + table.trimmed_extra as u64;
        m.snapshots = table.entries;
        m.snapshots_size = table.size;
        if reduced > 0 {
            // The refcount check counts what the header lists: lower the count now (the dropped
            // entries' clusters leak, and the refcount repair frees them).
            m.h.nb_snapshots = m.snapshots.len() as u32;
            if let Err(e) = m.write_header(io, false).and_then(|()| io.flush()) {
                res.check_errors += 1;
                report(&format!("ERROR failed to update the snapshot count in the image header: {}", e.message()));
                return Err(e);
            }
            res.corruptions_fixed += reduced;
            res.corruptions -= reduced;
        }
        if m.h.version >= 3 {
            let label = if fix { "Repairing" } else { "ERROR" };
            for (i, sn) in m.snapshots.iter().enumerate() {
                if sn.extra_data_size < V3_MIN_EXTRA_SIZE {
                    res.corruptions += 1;
                    report(&format!("{label} snapshot table entry {i} is incomplete"));
                }
            }
        }
        Ok(())
    }

    /// Rewrites the snapshot table when the read found corruptions and `fix` allows repairs.
    pub(crate) fn check_fix_snapshot_table(
        &self,
        m: &mut Meta,
        fix: bool,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> Result<()> {
        if res.corruptions == 0 || !fix {
            return Ok(());
        }
        let io = self.file.as_ref();
        let entries = m.snapshots.clone();
        if let Err(e) = m.write_snapshot_table(io, entries) {
            res.check_errors += 1;
            report(&format!("ERROR failed to update snapshot table: {}", e.message()));
            return Err(e);
        }
        res.corruptions_fixed += res.corruptions;
        res.corruptions = 0;
        Ok(())
    }
}
