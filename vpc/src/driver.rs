//! An open VHD: a fixed disk (the data, then the footer) or a sparse one (dynamic or
//! differencing: footer copy, dynamic header, block allocation table, blocks of a sector bitmap
//! plus data, footer).
//!
//! Invariants and update order for sparse disks:
//! - reads, writes and block status run on the mapping core ([`blockdev::mapped`]): this module
//!   says where a guest range lives ([`MappedImage::map`]) and makes a range writable
//!   ([`MappedImage::prepare_write`]); writes are widened to whole sectors, the bitmap's unit;
//! - a new block is placed where the trailing footer is; under the allocation lock the footer is
//!   first written past the new block (the file never lacks a trailing footer), then the block's
//!   bitmap over the old footer; the data follows, outside the allocation lock but under the
//!   block's lock, and only then are its sectors marked in the bitmap;
//! - the block allocation table, and the bitmaps of blocks already in the table, change in memory
//!   only; [`Vpc::flush`] syncs the file (every block a changed entry points at, and every sector
//!   a changed bitmap marks, is then durable) and only then writes the changed table sectors and
//!   bitmaps, and syncs again. A crash leaves at worst a block no entry points at, or a sector
//!   written but not yet marked (reading its old content);
//! - bitmaps: blocks vdisk allocates in a dynamic disk have every bit set (the unwritten rest of
//!   the block is a hole and reads as zeros), as qemu does; in a differencing disk a new block
//!   starts with no bit set and only the sectors written are marked (after their data), the
//!   rest reads from the parent. Reads of a dynamic disk ignore
//!   the bitmap, as qemu does; reads of a differencing disk follow it;
//! - writes to a block whose table entry points into the header or the table are refused.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::info::ImageInfo;
use blockdev::mapped::{DataWritten, Granularity, Holes, Mapped, MappedImage, Mapping, WritePlan, Zeroing};
use blockdev::range_lock::{RangeGuard, RangeLock};
use blockdev::{BlockDriver, Error, ResizeOptions, Result, Storage, ZeroFlags};

use crate::footer::{DynamicHeader, Footer, SECTOR};

/// A block allocation table entry of a block with no data.
pub const UNALLOCATED: u32 = u32::MAX;
/// Changed bitmaps kept at most before a write makes them durable (512 bytes each for 2 MiB
/// blocks).
pub const MAX_PENDING_BITMAPS: usize = 4096;

/// The mutable part of a sparse disk.
#[derive(Debug)]
pub(crate) struct SparseState {
    /// The block allocation table (sector of each block's bitmap).
    pub bat: Vec<u32>,
    /// Table sectors (indices of 128-entry groups) changed since the last write-back.
    pub dirty: BTreeSet<u64>,
    /// Where the next block goes (the trailing footer's offset).
    pub end: u64,
}

/// What a sparse disk adds.
#[derive(Debug)]
pub(crate) struct Sparse {
    pub header: DynamicHeader,
    pub block_size: u64,
    pub bitmap_bytes: u64,
    /// First byte a block may use (past the header and the table).
    pub metadata_end: u64,
    pub differencing: bool,
    pub state: Mutex<SparseState>,
    /// Serializes block allocation (footer and bitmap writes at the end of the file).
    pub alloc: Mutex<()>,
    /// Serializes write-backs.
    pub write_back: Mutex<()>,
    /// Blocks whose bitmap is known to have every bit set.
    pub full: Mutex<HashSet<u64>>,
    /// Bitmaps changed since the last write-back, by block (what reads follow until then).
    pub pending_bitmaps: Mutex<HashMap<u64, Vec<u8>>>,
    pub locks: RangeLock,
    /// Writes cover whole sectors (the bitmap's unit).
    pub sectors: Granularity,
}

/// An open VHD.
pub struct Vpc {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) footer: Footer,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) sparse: Option<Sparse>,
    pub(crate) backing: Option<Arc<dyn BlockDriver>>,
    /// The parent's name as the locators gave it (differencing disks).
    pub(crate) parent_name: Option<String>,
}

impl std::fmt::Debug for Vpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vpc").field("file", &self.storage.name()).field("size", &self.size).finish()
    }
}

impl Sparse {
    fn lock(&self) -> MutexGuard<'_, SparseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bitmap offset of `block`, if allocated.
    fn entry(&self, block: u64) -> Option<u64> {
        let e = *self.lock().bat.get(block as usize)?;
        (e != UNALLOCATED).then_some(e as u64 * SECTOR)
    }
}

/// Whether `sector`'s bit is set in a block's bitmap (most significant bit first).
fn sector_marked(bitmap: &[u8], sector: u64) -> bool {
    bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0
}

/// Runs of set and clear bits of `bitmap` over sectors `[first, first + count)`: (set, sectors).
fn bit_runs(bitmap: &[u8], first: u64, count: u64) -> Vec<(bool, u64)> {
    let bit = |s: u64| sector_marked(bitmap, s);
    let mut runs: Vec<(bool, u64)> = Vec::new();
    for s in first..first + count {
        match runs.last_mut() {
            Some((set, n)) if *set == bit(s) => *n += 1,
            _ => runs.push((bit(s), 1)),
        }
    }
    runs
}

impl Vpc {
    /// The bitmap of `block` (at `at`): the pending copy if it changed since the last write-back.
    fn read_bitmap(&self, s: &Sparse, block: u64, at: u64) -> Result<Vec<u8>> {
        if let Some(b) = s.pending_bitmaps.lock().unwrap_or_else(|p| p.into_inner()).get(&block) {
            return Ok(b.clone());
        }
        let mut bitmap = vec![0u8; s.bitmap_bytes as usize];
        blockdev::read_exact_at(self.storage.as_ref(), at, &mut bitmap)?;
        Ok(bitmap)
    }

    /// Sets the bitmap bits of sectors `[first, first + count)` of an allocated block if they
    /// are not set (after the data is written), in the pending copy the write-back stores.
    fn mark_present(&self, s: &Sparse, block: u64, bitmap_at: u64, first: u64, count: u64) -> Result<()> {
        if s.full.lock().unwrap_or_else(|p| p.into_inner()).contains(&block) {
            return Ok(());
        }
        let pending = s.pending_bitmaps.lock().unwrap_or_else(|p| p.into_inner()).len();
        if pending >= MAX_PENDING_BITMAPS {
            self.write_back()?;
        }
        let mut bitmap = self.read_bitmap(s, block, bitmap_at)?;
        let before = bitmap.clone();
        for sector in first..first + count {
            bitmap[(sector / 8) as usize] |= 0x80 >> (sector % 8);
        }
        if bitmap != before {
            s.pending_bitmaps.lock().unwrap_or_else(|p| p.into_inner()).insert(block, bitmap.clone());
        }
        let sectors = s.block_size / SECTOR;
        if bit_runs(&bitmap, 0, sectors) == [(true, sectors)] {
            s.full.lock().unwrap_or_else(|p| p.into_inner()).insert(block);
        }
        Ok(())
    }

    /// Places a new block for `block` where the trailing footer is; returns its bitmap offset.
    /// A dynamic disk's block gets every bitmap bit set (the unwritten rest is a hole and reads
    /// as zeros); a differencing disk's block starts with none set, and the write that follows
    /// marks its sectors ([`Vpc::mark_present`]), so sectors never written keep reading from the
    /// parent. The table entry is set in memory here and written back at the next flush.
    fn allocate(&self, s: &Sparse, block: u64) -> Result<u64> {
        let _alloc = s.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let at = s.lock().end;
        let new_end = at + s.bitmap_bytes + s.block_size;
        let sector = u32::try_from(at / SECTOR).ok().filter(|&v| v != UNALLOCATED);
        let sector = sector.ok_or_else(|| Error::out_of_range("The VHD file is full"))?;
        blockdev::write_all_at(self.storage.as_ref(), new_end, &self.footer.encode())?;
        let mut bitmap = vec![0u8; s.bitmap_bytes as usize];
        if !s.differencing {
            let sectors = s.block_size / SECTOR;
            for sec in 0..sectors {
                bitmap[(sec / 8) as usize] |= 0x80 >> (sec % 8);
            }
            s.full.lock().unwrap_or_else(|p| p.into_inner()).insert(block);
        }
        blockdev::write_all_at(self.storage.as_ref(), at, &bitmap)?;
        let mut st = s.lock();
        st.end = new_end;
        st.bat[block as usize] = sector;
        st.dirty.insert(block / 128);
        Ok(at)
    }

    /// The mapping of a differencing disk's allocated block from byte `within`: a run of
    /// sectors marked in the bitmap (data here) or not (the parent's), up to `max_len` bytes.
    fn map_marked(&self, s: &Sparse, block: u64, bitmap_at: u64, within: u64, max_len: u64) -> Result<Mapped> {
        let bitmap = self.read_bitmap(s, block, bitmap_at)?;
        let first = within / SECTOR;
        let last = (within + max_len).div_ceil(SECTOR).min(s.block_size / SECTOR);
        let set = sector_marked(&bitmap, first);
        let count = (first..last).take_while(|&sector| sector_marked(&bitmap, sector) == set).count() as u64;
        let len = ((first + count) * SECTOR - within).min(max_len);
        let mapping = if set {
            let offset = bitmap_at + s.bitmap_bytes + within;
            Mapping::Data { storage: self.storage.clone(), offset, holes: Holes::Ignored }
        } else {
            Mapping::Unallocated
        };
        Ok(Mapped::new(len, mapping))
    }

    /// Writes the changed table sectors: sync (blocks first), then the table; the caller syncs.
    fn write_back(&self) -> Result<()> {
        let Some(s) = &self.sparse else { return Ok(()) };
        let _one = s.write_back.lock().unwrap_or_else(|p| p.into_inner());
        let dirty = std::mem::take(&mut s.lock().dirty);
        let bitmaps = std::mem::take(&mut *s.pending_bitmaps.lock().unwrap_or_else(|p| p.into_inner()));
        if dirty.is_empty() && bitmaps.is_empty() {
            return Ok(());
        }
        let result = (|| -> Result<()> {
            self.storage.flush()?;
            for (&block, bitmap) in &bitmaps {
                if let Some(at) = s.entry(block) {
                    blockdev::write_all_at(self.storage.as_ref(), at, bitmap)?;
                }
            }
            for &group in &dirty {
                let bytes: Vec<u8> = {
                    let st = s.lock();
                    let from = (group * 128) as usize;
                    let to = (from + 128).min(st.bat.len());
                    st.bat[from..to].iter().flat_map(|e| e.to_be_bytes()).collect()
                };
                blockdev::write_all_at(self.storage.as_ref(), s.header.table_offset + group * 512, &bytes)?;
            }
            Ok(())
        })();
        if result.is_err() {
            s.lock().dirty.extend(dirty);
            let mut pending = s.pending_bitmaps.lock().unwrap_or_else(|p| p.into_inner());
            for (block, bitmap) in bitmaps {
                pending.entry(block).or_insert(bitmap);
            }
        }
        result
    }
}

/// What a planned write of a [`Vpc`] does once its data is written: nothing for a fixed disk;
/// for a sparse one, mark the written sectors in the block's bitmap (the block's lock is held
/// until then).
pub struct PendingWrite<'a>(Option<Marking<'a>>);

struct Marking<'a> {
    _guard: RangeGuard<'a>,
    block: u64,
    bitmap_at: u64,
    first_sector: u64,
    sectors: u64,
}

impl MappedImage for Vpc {
    type Pending<'a> = PendingWrite<'a>;

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let Some(s) = &self.sparse else {
            return Ok(Mapped::new(
                max_len,
                Mapping::Data { storage: self.storage.clone(), offset, holes: Holes::AllocatedZeros },
            ));
        };
        let (block, within) = (offset / s.block_size, offset % s.block_size);
        let mut len = (s.block_size - within).min(max_len);
        match s.entry(block) {
            None => {
                while len < max_len && s.entry((offset + len) / s.block_size).is_none() {
                    len = (len + s.block_size).min(max_len);
                }
                Ok(Mapped::new(len, if s.differencing { Mapping::Unallocated } else { Mapping::Zero }))
            }
            Some(bitmap_at) if s.differencing => self.map_marked(s, block, bitmap_at, within, len),
            Some(bitmap_at) => {
                let offset = bitmap_at + s.bitmap_bytes + within;
                Ok(Mapped::new(len, Mapping::Data { storage: self.storage.clone(), offset, holes: Holes::Ignored }))
            }
        }
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<PendingWrite<'_>>> {
        let Some(s) = &self.sparse else {
            return Ok(WritePlan {
                len,
                storage: self.storage.clone(),
                host: offset,
                fill: None,
                pending: PendingWrite(None),
            });
        };
        let (block, within) = (offset / s.block_size, offset % s.block_size);
        let n = (s.block_size - within).min(len);
        let block_start = block * s.block_size;
        let guard = s.locks.lock(block_start, block_start + s.block_size);
        let bitmap_at = match s.entry(block) {
            Some(b) => b,
            None => self.allocate(s, block)?,
        };
        if bitmap_at < s.metadata_end {
            return Err(Error::corrupt(format!(
                "{}: block {block} points into the VHD metadata (byte {bitmap_at}); not writing",
                self.storage.name()
            )));
        }
        let host = bitmap_at + s.bitmap_bytes + within;
        let marking = Marking { _guard: guard, block, bitmap_at, first_sector: within / SECTOR, sectors: n / SECTOR };
        Ok(WritePlan { len: n, storage: self.storage.clone(), host, fill: None, pending: PendingWrite(Some(marking)) })
    }

    fn commit_write(&self, pending: PendingWrite<'_>, _written: DataWritten) -> Result<()> {
        match (&self.sparse, pending.0) {
            (Some(s), Some(m)) => self.mark_present(s, m.block, m.bitmap_at, m.first_sector, m.sectors),
            _ => Ok(()),
        }
    }

    fn granularity(&self) -> Option<&Granularity> {
        self.sparse.as_ref().map(|s| &s.sectors)
    }

    /// A fixed disk zeroes its container range; a sparse one leaves it to the core (unallocated
    /// blocks of a dynamic disk already read as zeros and stay unallocated).
    fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<Zeroing> {
        if self.sparse.is_some() {
            return Ok(Zeroing::Fallback(len));
        }
        self.storage.write_zeroes(offset, len, flags.may_unmap)?;
        Ok(Zeroing::Done(len))
    }
}

impl BlockDriver for Vpc {
    blockdev::mapped_io!(read_at, write_at, write_zeroes, block_status);

    fn format(&self) -> &'static str {
        "vpc"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> &str {
        self.storage.name()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The format cannot give space back; discarded data keeps its content.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_back()?;
        self.storage.flush()
    }

    fn resize(&self, _new_size: u64, _opts: &ResizeOptions) -> Result<()> {
        Err(Error::unsupported("Image format driver does not support resize"))
    }

    fn info(&self) -> Result<ImageInfo> {
        blockdev::info::file_image_info(
            self.storage.as_ref(),
            "vpc",
            self.size,
            self.sparse.as_ref().map(|s| s.block_size),
            self.parent_name.as_deref(),
            "vpc",
        )
    }

    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        self.backing.clone()
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn has_zero_init(&self) -> bool {
        match &self.sparse {
            Some(s) => !s.differencing,
            None => self.storage.has_zero_init(),
        }
    }

    fn cluster_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    fn close(&self) -> Result<()> {
        self.flush()
    }
}

impl Drop for Vpc {
    /// A disk dropped without a flush still gets its table written (in order).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.write_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bit_runs;

    #[test]
    fn bit_runs_split_set_and_clear_sectors() {
        let bitmap = [0b1100_0001u8, 0xff];
        assert_eq!(bit_runs(&bitmap, 0, 10), vec![(true, 2), (false, 5), (true, 3)]);
        assert_eq!(bit_runs(&bitmap, 3, 2), vec![(false, 2)]);
    }
}
