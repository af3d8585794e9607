//! `check` for VDI, with qemu-img's messages: every map entry that points into the data area
//! must be below the block count and used once, and their number must be the header's
//! `blocksAllocated`. Each problem is a corruption; there is nothing vdisk (or qemu) repairs,
//! so `check -r` is refused as qemu refuses it ("This image format does not support checks").

use blockdev::info::CheckReport;
use blockdev::{Check, Error, RepairMode, Result};

use crate::driver::Vdi;
use crate::header::{ENTRY_FREE, ENTRY_ZERO};

impl Check for Vdi {
    fn check(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        if repair != RepairMode::None {
            return Err(Error::unsupported("This image format does not support checks"));
        }
        let mut res = CheckReport::default();
        let blocks = self.header.blocks;
        let mut used = vec![false; blocks as usize];
        let mut count: u32 = 0;
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        for (b, &entry) in map.iter().enumerate() {
            if entry == ENTRY_FREE || entry == ENTRY_ZERO {
                continue;
            }
            if entry < blocks {
                if used[entry as usize] {
                    report(&format!("ERROR: block index {entry} also used by {entry}"));
                    res.corruptions += 1;
                } else {
                    used[entry as usize] = true;
                }
                count += 1;
            } else {
                report(&format!("ERROR: block index {b} too large, is {entry}"));
                res.corruptions += 1;
            }
        }
        let header_count = self.alloc.lock().unwrap_or_else(|p| p.into_inner()).header_count;
        if count != header_count {
            report(&format!("ERROR: allocated blocks mismatch, is {count}, should be {header_count}"));
            res.corruptions += 1;
        }
        Ok(res)
    }
}
