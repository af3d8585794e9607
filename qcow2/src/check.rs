//! `check` and repair, with qemu-img's findings, messages, counts and fixes.
//!
//! Flow (the order qemu uses, so the same image gets the same report):
//! 1. count every reference into an in-memory refcount table (`imrt.rs`);
//! 2. compare it with the stored refcounts, reporting each difference; a stored count of zero for
//!    a used cluster, or a broken refcount structure, means the structure must be rebuilt;
//! 3. with `-r all` and a rebuild needed: write a new structure (`rebuild.rs`), recount, and fix
//!    the leaks the old structure now is; otherwise fix in place what `-r` allows;
//! 4. check the COPIED flags of the active tables against the (now correct) refcounts;
//! 5. after a successful repair, clear the dirty and corrupt bits.
//!
//! Every write of a repair keeps the crash-consistency order: a rebuilt structure is durable
//! before the header points to it.

use blockdev::info::CheckReport;
use blockdev::{read_exact_at, write_all_at, Check, Error, ErrorKind, RepairMode, Result};

use crate::cache::get_u64;
use crate::driver::Qcow2;
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::header::incompat;
use crate::imrt::{walk_bitmaps, walk_l1, walk_refblocks, walk_snapshots, Imrt, Sink};
use crate::meta::Meta;

impl Qcow2 {
    /// Counts every reference in the image; with `fix_errors`, repairs misaligned L2 entries that
    /// hold no data on the way.
    fn calculate(
        &self,
        m: &mut Meta,
        fix_errors: bool,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> Result<(Imrt, bool)> {
        let io = self.file.as_ref();
        let cs = m.cluster_size();
        let mut imrt = Imrt::new(io.len()?, m.geo.cluster_bits, m.rc.max_value())?;
        let mut sink = Sink { report, res, rebuild: false, frag: true, fix_errors, l2_fixes: Vec::new() };
        imrt.inc(&mut sink, 0, cs);
        walk_l1(m, io, &mut imrt, &mut sink, &m.l1, m.h.l1_table_offset)?;
        sink.frag = false;
        walk_snapshots(m, io, &mut imrt, &mut sink)?;
        imrt.inc(&mut sink, m.rc.table_offset, m.rc.table.len() as u64 * 8);
        if let Some((off, len)) = m.exts.crypto {
            imrt.inc(&mut sink, off, len);
        }
        walk_bitmaps(m, io, &mut imrt, &mut sink)?;
        walk_refblocks(m, &mut imrt, &mut sink);
        let rebuild = sink.rebuild;
        for (at, value) in std::mem::take(&mut sink.l2_fixes) {
            m.l2.remove(at / cs * cs);
            write_all_at(io, at, &value.to_be_bytes())?;
            io.flush()?;
        }
        Ok((imrt, rebuild))
    }

    /// Compares counted and stored refcounts; fixes what `fix` allows. Returns the highest used
    /// cluster.
    fn compare(
        &self,
        m: &mut Meta,
        imrt: &Imrt,
        fix: RepairMode,
        rebuild: &mut bool,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> u64 {
        let io = self.file.as_ref();
        let mut highest = 0;
        // Stored refcounts are read a refcount block at a time; a block that cannot be read is
        // retried cluster by cluster so that each one is reported.
        let per = m.rc.block_entries();
        let mut run = Vec::new();
        let mut run_start = u64::MAX;
        for i in 0..imrt.counts.len() {
            if i % per == 0 || run_start == u64::MAX {
                run_start = i;
                run.resize((per - i % per).min(imrt.counts.len() - i) as usize, 0);
                if m.rc.get_run(io, i, &mut run).is_err() {
                    run.clear();
                }
            }
            let stored = run.get((i - run_start) as usize).copied();
            let have = match stored.map_or_else(|| m.rc.get(io, i), Ok) {
                Ok(v) => v,
                Err(e) => {
                    let why = if e.kind() == ErrorKind::Corrupt {
                        "Input/output error".to_string()
                    } else {
                        e.message().to_string()
                    };
                    report(&format!("Can't get refcount for cluster {i}: {why}"));
                    res.check_errors += 1;
                    continue;
                }
            };
            let want = imrt.get(i);
            if have > 0 || want > 0 {
                highest = i;
            }
            if have == want {
                continue;
            }
            #[derive(PartialEq)]
            enum Fixed {
                No,
                Leak,
                Corruption,
            }
            let fixing = if have == 0 {
                *rebuild = true;
                Fixed::No
            } else if have > want && fix != RepairMode::None {
                Fixed::Leak
            } else if have < want && fix == RepairMode::All {
                Fixed::Corruption
            } else {
                Fixed::No
            };
            let label = if fixing != Fixed::No {
                "Repairing"
            } else if have < want {
                "ERROR"
            } else {
                "Leaked"
            };
            report(&format!("{label} cluster {i} refcount={have} reference={want}"));
            if fixing != Fixed::No && m.rc.update(io, i, want as i64 - have as i64).is_ok() {
                match fixing {
                    Fixed::Leak => res.leaks_fixed += 1,
                    _ => res.corruptions_fixed += 1,
                }
                continue;
            }
            if have < want {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
        highest
    }

    /// Checks (and with repair, fixes) the COPIED flags of the active L1 and L2 tables.
    fn check_copied(
        &self,
        m: &mut Meta,
        fix: RepairMode,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> Result<()> {
        let io = self.file.as_ref();
        let cs = m.cluster_size();
        let repair = match fix {
            RepairMode::All => true,
            RepairMode::Leaks => res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0,
            RepairMode::None => false,
        };
        let label = if repair { "Repairing" } else { "ERROR" };
        let esz = m.geo.l2_entry_size() as usize;
        let mut table = vec![0u8; cs as usize];
        for i in 0..m.l1.len() {
            let e = m.l1[i];
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Ok(rc) = m.rc.get(io, l2 / cs) else { continue };
            if (rc == 1) != (e & COPIED != 0) {
                res.corruptions += 1;
                report(&format!("{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"));
                if repair {
                    m.l1[i] = if rc == 1 { e | COPIED } else { e & !COPIED };
                    m.l1_dirty.insert(i);
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            if l2 % cs != 0 {
                continue;
            }
            if let Err(e) = read_exact_at(io, l2, &mut table) {
                report(&format!("ERROR: Could not read L2 table: {}", e.message()));
                res.check_errors += 1;
                return Err(e);
            }
            let mut dirty = 0;
            for j in 0..m.geo.l2_entries() as usize {
                let le = get_u64(&table, j * esz / 8);
                if le & COMPRESSED != 0 {
                    continue;
                }
                let host = le & OFFSET_MASK;
                if host == 0 && !(m.geo.data_file && le & COPIED != 0) {
                    continue;
                }
                let rc = if m.geo.data_file {
                    1
                } else {
                    match m.rc.get(io, host / cs) {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (le & COPIED != 0) {
                    res.corruptions += 1;
                    report(&format!("{label} OFLAG_COPIED data cluster: l2_entry={le:x} refcount={rc}"));
                    if repair {
                        let fixed = if rc == 1 { le | COPIED } else { le & !COPIED };
                        let at = j * esz;
                        table[at..at + 8].copy_from_slice(&fixed.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Some(what) = m.overlaps(l2, cs, false) {
                    report(&format!(
                        "ERROR: Could not write L2 table; metadata overlap check failed: overlaps with {what}"
                    ));
                    res.check_errors += 1;
                    return Err(Error::corrupt("metadata overlap"));
                }
                m.l2.remove(l2);
                write_all_at(io, l2, &table)?;
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }

    /// Runs the check; `repair` as for `qemu-img check -r`.
    fn check_image(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        let mut guard = self.lock();
        let m = &mut *guard;
        let io = self.file.as_ref();
        if repair != RepairMode::None {
            m.flush(io)?;
            m.flush(io)?;
        }
        let cs = m.cluster_size();
        let mut res = CheckReport { total_clusters: Some(self.disk_size().div_ceil(cs)), ..CheckReport::default() };
        let fix_errors = repair == RepairMode::All;
        // The snapshot table's findings are kept apart and added at the end, after its repair.
        let mut sn_res = CheckReport::default();
        let r = self
            .check_read_snapshot_table(m, fix_errors, report, &mut sn_res)
            .and_then(|()| self.check_refcounts(m, repair, report, &mut res))
            .and_then(|()| self.check_fix_snapshot_table(m, fix_errors, report, &mut sn_res));
        add_findings(&mut res, &sn_res);
        r?;
        if repair != RepairMode::None {
            m.flush(io)?;
            if res.check_errors == 0 && res.corruptions == 0 {
                let before = m.h.incompatible;
                m.h.incompatible &= !(incompat::DIRTY | incompat::CORRUPT);
                if m.h.incompatible != before {
                    m.write_header(io, false)?;
                    io.flush()?;
                    m.dirty_on_disk = false;
                }
            }
        }
        Ok(res)
    }

    /// The refcount part of the check: count every reference, compare with the stored
    /// refcounts, rebuild or repair, then check the COPIED flags.
    fn check_refcounts(
        &self,
        m: &mut Meta,
        repair: RepairMode,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> Result<()> {
        let io = self.file.as_ref();
        let cs = m.cluster_size();
        let (imrt, mut rebuild) = self.calculate(m, repair == RepairMode::All, report, res)?;
        let pre = res.clone();
        let mut highest = self.compare(m, &imrt, RepairMode::None, &mut rebuild, report, res);
        if rebuild && repair == RepairMode::All {
            let old = res.clone();
            report("Rebuilding refcount structure");
            m.rebuild_refcounts(io, &mut imrt.counts.to_wide())?;
            res.corruptions = 0;
            res.leaks = 0;
            rebuild = false;
            let (imrt2, _) = self.calculate(m, true, report, res)?;
            let saved = std::mem::take(res);
            let mut tmp = CheckReport::default();
            highest = self.compare(m, &imrt2, RepairMode::Leaks, &mut rebuild, report, &mut tmp);
            if rebuild {
                report("ERROR rebuilt refcount structure is still broken");
            }
            let fresh_leaks = tmp.leaks;
            *res = saved;
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if repair != RepairMode::None {
            if rebuild {
                report("ERROR need to rebuild refcount structures");
                return Err(Error::from_errno("check", libc::EIO));
            }
            if res.leaks > 0 || res.corruptions > 0 {
                *res = pre;
                highest = self.compare(m, &imrt, repair, &mut rebuild, report, res);
            }
        }
        self.check_copied(m, repair, report, res)?;
        res.image_end_offset = Some((highest + 1) * cs);
        Ok(())
    }

    /// Rebuilds refcounts of an image left dirty by lazy refcounts, then clears the dirty bit.
    pub(crate) fn repair_after_crash(&self, diagnostics: &blockdev::Diagnostics) -> Result<()> {
        let mut sink = |m: &str| diagnostics.report(m);
        let r = self.check_image(RepairMode::All, &mut sink)?;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(Error::corrupt("the image has errors that cannot be repaired automatically"));
        }
        Ok(())
    }
}

impl Check for Qcow2 {
    fn check(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        self.check_image(repair, report)
    }
}

/// Adds the counts of `more` to `res` (qemu's qcow2_add_check_result without the allocation
/// figures).
fn add_findings(res: &mut CheckReport, more: &CheckReport) {
    res.corruptions += more.corruptions;
    res.leaks += more.leaks;
    res.check_errors += more.check_errors;
    res.corruptions_fixed += more.corruptions_fixed;
    res.leaks_fixed += more.leaks_fixed;
}
