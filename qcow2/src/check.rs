//! `check` and repair: recount every reference, compare with the stored refcounts, fix.
//!
//! The walk counts the header, the active L1 table and its L2 tables and data clusters (compressed
//! ranges included), snapshot L1 tables and their L2 tables, the refcount table and blocks, and the
//! encryption header. Each finding is reported in qemu-img's words. Leaks are fixed by lowering the
//! stored count; any other refcount error is fixed by rebuilding the whole refcount structure at
//! the end of the image (new table and blocks that describe themselves), switching the header to
//! it and then forgetting the old one — a crash during the rebuild leaves the old structure in
//! force.
//!
//! Memory is bounded by the number of clusters the image file can hold (one counter each).

use blockdev::info::CheckReport;
use blockdev::{read_exact_at, write_all_at, Check, Error, RepairMode, Result};

use crate::cache::get_u64;
use crate::driver::Qcow2;
use crate::entry::{COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO};
use crate::meta::Meta;

/// Expected reference counts, one per host cluster.
struct Counts {
    counts: Vec<u32>,
    cluster_bits: u32,
    file_clusters: u64,
}

impl Counts {
    fn inc(&mut self, report: &mut dyn FnMut(&str), res: &mut CheckReport, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        if last >= self.file_clusters {
            report(&format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            res.corruptions += 1;
            return;
        }
        for c in first..=last {
            let slot = &mut self.counts[c as usize];
            *slot = slot.saturating_add(1);
        }
    }
}

/// What the walk found besides the counts.
#[derive(Default)]
struct Walk {
    /// Guest clusters whose COPIED flag disagrees with the refcount: (l1 index, l2 index or None).
    copied_checks: Vec<(u64, u64, bool)>, // (table offset, entry index, is_l1)
}

impl Qcow2 {
    fn walk(&self, m: &mut Meta, report: &mut dyn FnMut(&str), res: &mut CheckReport) -> Result<(Counts, Walk)> {
        let io = self.file.as_ref();
        let cs = m.cluster_size();
        let file_len = io.len()?;
        let file_clusters = file_len.div_ceil(cs);
        if file_clusters > (1 << 32) {
            return Err(Error::out_of_range("image file too large to check"));
        }
        let mut c = Counts { counts: vec![0; file_clusters as usize], cluster_bits: m.geo.cluster_bits, file_clusters };
        let mut walk = Walk::default();
        c.inc(report, res, 0, cs);
        // Active L1 and everything below it.
        let l1 = m.l1.clone();
        c.inc(report, res, m.h.l1_table_offset, l1.len() as u64 * 8);
        self.walk_l1(m, &l1, m.h.l1_table_offset, true, &mut c, &mut walk, report, res)?;
        // Snapshots: their L1 tables and the tables below.
        for (l1_off, l1_size) in self.snapshot_l1s(m, report, res)? {
            c.inc(report, res, l1_off, l1_size * 8);
            let mut raw = vec![0u8; (l1_size * 8) as usize];
            read_exact_at(io, l1_off, &mut raw)?;
            let table: Vec<u64> = (0..l1_size as usize).map(|i| get_u64(&raw, i)).collect();
            self.walk_l1(m, &table, l1_off, false, &mut c, &mut walk, report, res)?;
        }
        // Refcount structures.
        c.inc(report, res, m.rc.table_offset, m.rc.table_clusters * cs);
        for (i, e) in m.rc.table.clone().into_iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                report(&format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                res.corruptions += 1;
                continue;
            }
            if off >= file_len {
                report(&format!("ERROR refcount block {i} is outside image"));
                res.corruptions += 1;
                continue;
            }
            c.inc(report, res, off, cs);
        }
        if let Some((off, len)) = m.exts.crypto {
            c.inc(report, res, off, len);
        }
        Ok((c, walk))
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_l1(
        &self,
        m: &mut Meta,
        l1: &[u64],
        l1_off: u64,
        active: bool,
        c: &mut Counts,
        walk: &mut Walk,
        report: &mut dyn FnMut(&str),
        res: &mut CheckReport,
    ) -> Result<()> {
        let io = self.file.as_ref();
        let cs = m.cluster_size();
        let geo = m.geo;
        let entries = geo.l2_entries() as usize;
        let mut table = vec![0u8; cs as usize];
        for (i, &e) in l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                report(&format!("ERROR found L1 entry with reserved bits set: {e:x}"));
                res.corruptions += 1;
            }
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if active {
                walk.copied_checks.push((l1_off, i as u64, true));
            }
            if l2 % cs != 0 {
                report(&format!("ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"));
                res.corruptions += 1;
                continue;
            }
            c.inc(report, res, l2, cs);
            if l2 >= io.len()? {
                continue;
            }
            read_exact_at(io, l2, &mut table)?;
            let mut next_contiguous = 0u64;
            for j in 0..entries {
                let (le, bm) = if geo.extended {
                    (get_u64(&table, 2 * j), get_u64(&table, 2 * j + 1))
                } else {
                    (get_u64(&table, j), 0)
                };
                if le & COMPRESSED != 0 {
                    if le & COPIED != 0 {
                        let (o, _) = geo.compressed(le & !COPIED);
                        report(&format!(
                            "ERROR: coffset=0x{o:x}: copied flag must never be set for compressed clusters"
                        ));
                        res.corruptions += 1;
                    }
                    if geo.data_file {
                        report(&format!("ERROR compressed cluster {j} with data file, entry=0x{le:x}"));
                        res.corruptions += 1;
                        continue;
                    }
                    if bm != 0 {
                        report(&format!(
                            "ERROR compressed cluster {j} with non-zero subcluster allocation bitmap, entry=0x{le:x}"
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    let (o, size) = geo.compressed(le & !COPIED);
                    c.inc(report, res, o, size);
                    if active {
                        res.allocated_clusters = Some(res.allocated_clusters.unwrap_or(0) + 1);
                        res.compressed_clusters = Some(res.compressed_clusters.unwrap_or(0) + 1);
                        res.fragmented_clusters = Some(res.fragmented_clusters.unwrap_or(0) + 1);
                    }
                    continue;
                }
                let reserved = if geo.extended { L2_RESERVED | ZERO } else { L2_RESERVED };
                if le & reserved != 0 {
                    report(&format!("ERROR found l2 entry with reserved bits set: {le:x}"));
                    res.corruptions += 1;
                }
                let host = le & OFFSET_MASK;
                let has_host = host != 0 || (geo.data_file && le & COPIED != 0);
                if !has_host {
                    if geo.extended && bm & 0xffff_ffff != 0 {
                        report("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                        res.corruptions += 1;
                    }
                    continue;
                }
                if geo.extended && (bm >> 32) & bm != 0 {
                    report(&format!(
                        "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                    ));
                    res.corruptions += 1;
                }
                if host % cs != 0 {
                    res.corruptions += 1;
                    let data = if geo.extended { bm & 0xffff_ffff != 0 } else { le & ZERO == 0 };
                    if data {
                        report(&format!(
                            "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
                        ));
                    } else {
                        report(&format!(
                            "ERROR offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                        ));
                    }
                }
                if active {
                    res.allocated_clusters = Some(res.allocated_clusters.unwrap_or(0) + 1);
                    if next_contiguous != 0 && host != next_contiguous {
                        res.fragmented_clusters = Some(res.fragmented_clusters.unwrap_or(0) + 1);
                    }
                    next_contiguous = host + cs;
                    walk.copied_checks.push((l2, j as u64, false));
                }
                if !geo.data_file {
                    c.inc(report, res, host, cs);
                }
            }
        }
        Ok(())
    }

    /// (L1 offset, L1 size) of every internal snapshot, read from the snapshot table.
    fn snapshot_l1s(&self, m: &Meta, report: &mut dyn FnMut(&str), res: &mut CheckReport) -> Result<Vec<(u64, u64)>> {
        let io = self.file.as_ref();
        let mut out = Vec::new();
        let mut off = m.h.snapshots_offset;
        let file_len = io.len()?;
        for i in 0..m.h.nb_snapshots {
            let mut hdr = [0u8; 40];
            read_exact_at(io, off, &mut hdr)?;
            let l1_off = u64::from_be_bytes(hdr[0..8].try_into().unwrap_or([0; 8]));
            let l1_size = u32::from_be_bytes(hdr[8..12].try_into().unwrap_or([0; 4])) as u64;
            let id_len = u16::from_be_bytes([hdr[12], hdr[13]]) as u64;
            let name_len = u16::from_be_bytes([hdr[14], hdr[15]]) as u64;
            let extra = u32::from_be_bytes(hdr[36..40].try_into().unwrap_or([0; 4])) as u64;
            let entry = (40 + extra + id_len + name_len).div_ceil(8) * 8;
            if l1_off % m.cluster_size() != 0
                || l1_size * 8 > crate::limits::MAX_L1_SIZE
                || l1_off + l1_size * 8 > file_len
            {
                report(&format!("ERROR snapshot {i} has an invalid L1 table (offset {l1_off:#x}, size {l1_size:#x})"));
                res.corruptions += 1;
            } else {
                out.push((l1_off, l1_size));
            }
            off += entry;
        }
        Ok(out)
    }

    /// Runs the check; `repair` as for `qemu-img check -r`.
    fn check_image(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        let mut m = self.lock();
        let io = self.file.as_ref();
        if repair != RepairMode::None {
            m.flush(io, self.data.as_ref())?;
        }
        let mut res = CheckReport::default();
        let cs = m.cluster_size();
        let (counts, walk) = self.walk(&mut m, report, &mut res)?;
        // Compare with the stored refcounts.
        let covered = m.rc.table.len() as u64 * m.rc.block_entries();
        let nb = counts.file_clusters.max(covered.min(counts.file_clusters));
        let mut fix_leaks = Vec::new();
        let mut errors = 0u64;
        let mut highest = 0u64;
        for i in 0..nb {
            let want = counts.counts.get(i as usize).copied().unwrap_or(0) as u64;
            let have = match m.rc.get(io, i) {
                Ok(v) => v,
                Err(e) => {
                    report(&format!("Can't get refcount for cluster {i}: {}", e.message()));
                    res.check_errors += 1;
                    continue;
                }
            };
            if want > 0 || have > 0 {
                highest = i;
            }
            if want == have {
                continue;
            }
            let leak = have > want;
            let fixing = match repair {
                RepairMode::All => true,
                RepairMode::Leaks => leak,
                RepairMode::None => false,
            };
            let label = if fixing {
                "Repairing"
            } else if !leak {
                "ERROR"
            } else {
                "Leaked"
            };
            report(&format!("{label} cluster {i} refcount={have} reference={want}"));
            if fixing {
                if leak {
                    fix_leaks.push((i, want));
                } else {
                    errors += 1;
                }
            } else if leak {
                res.leaks += 1;
            } else {
                res.corruptions += 1;
            }
        }
        // COPIED flags on the active tables (only meaningful once counts are right).
        for (table, idx, is_l1) in &walk.copied_checks {
            let entry = if *is_l1 {
                m.l1.get(*idx as usize).copied().unwrap_or(0)
            } else {
                let esz = m.geo.l2_entry_size();
                let mut b = [0u8; 8];
                read_exact_at(io, table + idx * esz, &mut b)?;
                u64::from_be_bytes(b)
            };
            let host = entry & OFFSET_MASK;
            if m.geo.data_file && !is_l1 {
                continue;
            }
            let rc = counts.counts.get((host / cs) as usize).copied().unwrap_or(0) as u64;
            let want_copied = rc == 1;
            if (entry & COPIED != 0) != want_copied {
                let fixing = repair == RepairMode::All;
                let label = if fixing { "Repairing" } else { "ERROR" };
                if *is_l1 {
                    report(&format!(
                        "{label} OFLAG_COPIED L2 cluster: l1_index={idx} l1_entry={entry:x} refcount={rc}"
                    ));
                } else {
                    report(&format!("{label} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"));
                }
                if fixing {
                    let fixed = if want_copied { entry | COPIED } else { entry & !COPIED };
                    if *is_l1 {
                        m.l1[*idx as usize] = fixed;
                        m.l1_dirty.insert(*idx as usize);
                    } else {
                        m.l2.remove(*table);
                        write_all_at(io, table + idx * m.geo.l2_entry_size(), &fixed.to_be_bytes())?;
                    }
                    res.corruptions_fixed += 1;
                } else {
                    res.corruptions += 1;
                }
            }
        }
        if errors > 0 {
            report("Rebuilding refcount structure");
            self.rebuild(&mut m, &counts)?;
            res.corruptions_fixed += errors;
            res.leaks_fixed += fix_leaks.len() as u64;
        } else if !fix_leaks.is_empty() {
            for (i, want) in &fix_leaks {
                let have = m.rc.get(io, *i)?;
                m.rc.update(io, *i, *want as i64 - have as i64)?;
            }
            res.leaks_fixed += fix_leaks.len() as u64;
        }
        if repair != RepairMode::None {
            m.flush(io, self.data.as_ref())?;
        }
        res.image_end_offset = Some((highest + 1) * cs);
        res.total_clusters = Some(self.disk_size().div_ceil(cs));
        Ok(res)
    }

    /// Writes a fresh refcount structure holding `counts` (see `Meta::install_refcounts`).
    fn rebuild(&self, m: &mut Meta, counts: &Counts) -> Result<()> {
        let counts: Vec<u64> = counts.counts.iter().map(|&c| c as u64).collect();
        let order = m.rc.order;
        m.install_refcounts(self.file.as_ref(), counts, order)
    }

    /// Rebuilds refcounts of an image left dirty by lazy refcounts, then clears the dirty bit.
    pub(crate) fn repair_after_crash(&self) -> Result<()> {
        let mut sink = |_: &str| {};
        let r = self.check_image(RepairMode::All, &mut sink)?;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(Error::corrupt("the image has errors that cannot be repaired automatically"));
        }
        let mut m = self.lock();
        m.h.incompatible &= !crate::header::incompat::DIRTY;
        m.write_header(self.file.as_ref(), false)?;
        self.file.flush()?;
        m.dirty_on_disk = false;
        Ok(())
    }
}

impl Check for Qcow2 {
    fn check(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        self.check_image(repair, report)
    }
}
