//! `check` for VDI, with qemu-img's messages: every map entry that points into the data area
//! must be below the block count and used once, and their number must be the header's
//! `blocksAllocated`. Each problem is a corruption.
//!
//! `check -r all` repairs them (qemu refuses `-r` for vdi); `-r leaks` has nothing to do, as VDI
//! has no leak accounting. Repairs keep what the guest reads where it can be read:
//! - an entry beyond the block count (reads of it fail) becomes free;
//! - an entry sharing its data with an earlier one gets a copy of that data in a new block
//!   (written and synced before the entry points at it), so the two guest blocks no longer
//!   change together;
//! - last, `blocksAllocated` is rewritten to the number of entries that point into the data area.

use blockdev::info::CheckReport;
use blockdev::{Check, Error, RepairMode, Result};

use crate::driver::Vdi;
use crate::header::{ENTRY_FREE, ENTRY_ZERO, OFF_BLOCKS_ALLOCATED};

/// The problems one pass over the map finds.
#[derive(Default)]
struct Findings {
    /// Guest blocks whose entry is beyond the block count.
    too_large: Vec<u64>,
    /// Guest blocks whose data index an earlier guest block uses too.
    shared: Vec<u64>,
    /// Entries pointing into the data area.
    count: u32,
}

impl Vdi {
    fn scan(&self, report: &mut dyn FnMut(&str), res: &mut CheckReport) -> Findings {
        let blocks = self.header.blocks;
        let mut used = vec![false; blocks as usize];
        let mut f = Findings::default();
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        for (b, &entry) in map.iter().enumerate() {
            if entry == ENTRY_FREE || entry == ENTRY_ZERO {
                continue;
            }
            if entry < blocks {
                if used[entry as usize] {
                    report(&format!("ERROR: block index {entry} also used by {entry}"));
                    res.corruptions += 1;
                    f.shared.push(b as u64);
                } else {
                    used[entry as usize] = true;
                }
                f.count += 1;
            } else {
                report(&format!("ERROR: block index {b} too large, is {entry}"));
                res.corruptions += 1;
                f.too_large.push(b as u64);
            }
        }
        f
    }

    /// [`Vdi::allocate`] for one block, into the lowest index no entry uses when the data area
    /// is full up to the block count (a damaged `blocksAllocated` can push `next_index` there).
    fn allocate_anywhere(&self, b: u64, data: &[u8]) -> Result<()> {
        let blocks = self.header.blocks;
        let saved = {
            let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            if a.next_index < blocks {
                None
            } else {
                let map = self.map.read().unwrap_or_else(|p| p.into_inner());
                let mut used = vec![false; blocks as usize];
                for &e in map.iter().filter(|&&e| e < blocks) {
                    used[e as usize] = true;
                }
                let Some(hole) = used.iter().position(|u| !u) else {
                    return Err(Error::corrupt("no unused block index left to copy shared data to"));
                };
                Some(std::mem::replace(&mut a.next_index, hole as u32))
            }
        };
        let r = self.allocate(b, data);
        if let Some(next) = saved {
            // next_index stays above every index in the map.
            self.alloc.lock().unwrap_or_else(|p| p.into_inner()).next_index = next;
        }
        r
    }

    fn repair(&self, f: &Findings, report: &mut dyn FnMut(&str)) -> Result<u64> {
        let mut fixed = 0;
        for &b in &f.too_large {
            report(&format!("Repairing block {b}: its index is too large; the block is now unallocated"));
            self.set_entry(b, ENTRY_FREE)?;
            fixed += 1;
        }
        for &b in &f.shared {
            report(&format!("Repairing block {b}: it shared its data with another block; it now has a copy"));
            // The copy is written and synced before the entry moves to it (allocate's order).
            let bs = self.header.block_size as u64;
            let mut data = vec![0u8; bs as usize];
            let n = bs.min(self.header.disk_size - b * bs) as usize;
            blockdev::mapped::read(self, b * bs, &mut [std::io::IoSliceMut::new(&mut data[..n])])?;
            self.allocate_anywhere(b, &data)?;
            fixed += 1;
        }
        let stored =
            self.map.read().unwrap_or_else(|p| p.into_inner()).iter().filter(|&&e| e < self.header.blocks).count()
                as u32;
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        if a.header_count != stored {
            report(&format!("Repairing allocated blocks count: {} in the header, {stored} in the map", a.header_count));
            blockdev::write_all_at(self.storage.as_ref(), OFF_BLOCKS_ALLOCATED, &stored.to_le_bytes())?;
            a.allocated = stored;
            a.header_count = stored;
            fixed += 1;
        }
        drop(a);
        self.storage.flush()?;
        Ok(fixed)
    }
}

impl Check for Vdi {
    fn check(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        if repair != RepairMode::None && blockdev::BlockDriver::is_read_only(self) {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        let mut res = CheckReport::default();
        let f = self.scan(report, &mut res);
        let header_count = self.alloc.lock().unwrap_or_else(|p| p.into_inner()).header_count;
        if f.count != header_count {
            report(&format!("ERROR: allocated blocks mismatch, is {}, should be {header_count}", f.count));
            res.corruptions += 1;
        }
        if repair == RepairMode::All && res.corruptions > 0 {
            res.corruptions_fixed = self.repair(&f, report)?;
            res.corruptions -= res.corruptions_fixed.min(res.corruptions);
        }
        Ok(res)
    }
}
