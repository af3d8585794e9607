//! `check` for VMDK, as qemu-img does it: every grain (and every flat extent) must point inside
//! its file; the first one that does not is reported as a corruption and ends the check. VMDK has
//! no reference counts, so there are no leaks and nothing to repair; a corruption makes the
//! check itself fail with EINVAL, as in qemu.

use blockdev::info::CheckReport;
use blockdev::{Check, RepairMode, Result};

use crate::driver::{ExtentData, Vmdk};
use crate::header::SECTOR;
use crate::sparse::Grain;

impl Check for Vmdk {
    fn check(&self, _repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        let mut res = CheckReport::default();
        'extents: for e in &self.extents {
            match &e.data {
                ExtentData::Zero => {}
                ExtentData::Flat { storage, offset } => {
                    if e.len > 0 && *offset >= storage.len()? {
                        report(&format!("ERROR: cluster offset for sector {} points after EOF", e.start / SECTOR));
                        res.corruptions += 1;
                        break;
                    }
                }
                ExtentData::Sparse(s) => {
                    let grain = s.header().grain_bytes();
                    let file_len = s.storage().len()?;
                    let mut within = 0;
                    while within < e.len {
                        let sector = (e.start + within) / SECTOR;
                        match s.entry(within) {
                            Err(_) => {
                                report(&format!("ERROR: could not get cluster_offset for sector {sector}"));
                                res.corruptions += 1;
                                break 'extents;
                            }
                            Ok(Grain::Data(at) | Grain::Compressed(at)) if at >= file_len => {
                                report(&format!("ERROR: cluster offset for sector {sector} points after EOF"));
                                res.corruptions += 1;
                                break 'extents;
                            }
                            Ok(_) => {}
                        }
                        within += grain;
                    }
                }
            }
        }
        if res.corruptions > 0 {
            // qemu's check fails outright (EINVAL) at the first bad grain.
            return Err(blockdev::Error::from_errno("check", libc::EINVAL));
        }
        Ok(res)
    }
}
