//! An open VHD: a fixed disk (the data, then the footer) or a sparse one (dynamic or
//! differencing: footer copy, dynamic header, block allocation table, blocks of a sector bitmap
//! plus data, footer).
//!
//! Invariants and update order for sparse disks:
//! - a new block is placed where the trailing footer is; under the allocation lock the footer is
//!   first written past the new block (the file never lacks a trailing footer), then the block's
//!   bitmap over the old footer; the data follows, outside the lock;
//! - the block allocation table, and the bitmaps of blocks already in the table, change in memory
//!   only; [`Vpc::flush`] syncs the file (every block a changed entry points at, and every sector
//!   a changed bitmap marks, is then durable) and only then writes the changed table sectors and
//!   bitmaps, and syncs again. A crash leaves at worst a block no entry points at, or a sector
//!   written but not yet marked (reading its old content);
//! - bitmaps: blocks vdisk allocates in a dynamic disk have every bit set (the unwritten rest of
//!   the block is a hole and reads as zeros), as qemu does; in a differencing disk only the
//!   sectors written are marked, the rest reads from the parent. Reads of a dynamic disk ignore
//!   the bitmap, as qemu does; reads of a differencing disk follow it;
//! - writes to a block whose table entry points into the header or the table are refused.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::info::ImageInfo;
use blockdev::range_lock::RangeLock;
use blockdev::{check_request, BlockDriver, Error, Extent, ExtentKind, ResizeOptions, Result, Storage, ZeroFlags};

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

/// Runs of set and clear bits of `bitmap` over sectors `[first, first + count)`: (set, sectors).
fn bit_runs(bitmap: &[u8], first: u64, count: u64) -> Vec<(bool, u64)> {
    let bit = |s: u64| bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
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
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        blockdev::read_backing(self.backing.as_ref(), offset, buf)
    }

    /// The bitmap of `block` (at `at`): the pending copy if it changed since the last write-back.
    fn read_bitmap(&self, s: &Sparse, block: u64, at: u64) -> Result<Vec<u8>> {
        if let Some(b) = s.pending_bitmaps.lock().unwrap_or_else(|p| p.into_inner()).get(&block) {
            return Ok(b.clone());
        }
        let mut bitmap = vec![0u8; s.bitmap_bytes as usize];
        blockdev::read_exact_at(self.storage.as_ref(), at, &mut bitmap)?;
        Ok(bitmap)
    }

    /// Reads guest bytes `[offset, offset + buf.len())`.
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(s) = &self.sparse else {
            return blockdev::read_exact_at(self.storage.as_ref(), offset, buf);
        };
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (block, within) = (at / s.block_size, at % s.block_size);
            let n = ((s.block_size - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match s.entry(block) {
                None => self.read_parent(at, piece)?,
                Some(bitmap_at) if s.differencing => {
                    let data_at = bitmap_at + s.bitmap_bytes;
                    let bitmap = self.read_bitmap(s, block, bitmap_at)?;
                    // Sector-granular: a request that starts or ends inside a sector reads it whole.
                    let first = within / SECTOR;
                    let last = (within + n as u64).div_ceil(SECTOR);
                    let mut sector_buf = vec![0u8; ((last - first) * SECTOR) as usize];
                    let mut pos = 0u64;
                    for (set, count) in bit_runs(&bitmap, first, last - first) {
                        let part = &mut sector_buf[(pos * SECTOR) as usize..((pos + count) * SECTOR) as usize];
                        let guest = block * s.block_size + (first + pos) * SECTOR;
                        if set {
                            let file_at = data_at + (first + pos) * SECTOR;
                            blockdev::read_exact_at(self.storage.as_ref(), file_at, part)?;
                        } else {
                            self.read_parent(guest, part)?;
                        }
                        pos += count;
                    }
                    let skip = (within - first * SECTOR) as usize;
                    piece.copy_from_slice(&sector_buf[skip..skip + n]);
                }
                Some(bitmap_at) => {
                    blockdev::read_exact_at(self.storage.as_ref(), bitmap_at + s.bitmap_bytes + within, piece)?
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Writes sector-aligned `data` at sector-aligned guest `offset`.
    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        let Some(s) = &self.sparse else {
            return blockdev::write_all_at(self.storage.as_ref(), offset, data);
        };
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (block, within) = (at / s.block_size, at % s.block_size);
            let n = ((s.block_size - within) as usize).min(data.len() - done);
            let block_start = block * s.block_size;
            let _guard = s.locks.lock(block_start, block_start + s.block_size);
            let bitmap_at = match s.entry(block) {
                Some(b) => b,
                None => self.allocate(s, block, within, n as u64)?,
            };
            if bitmap_at < s.metadata_end {
                return Err(Error::corrupt(format!(
                    "{}: block {block} points into the VHD metadata (byte {bitmap_at}); not writing",
                    self.storage.name()
                )));
            }
            let data_at = bitmap_at + s.bitmap_bytes;
            blockdev::write_all_at(self.storage.as_ref(), data_at + within, &data[done..done + n])?;
            self.mark_present(s, block, bitmap_at, within / SECTOR, n as u64 / SECTOR)?;
            done += n;
        }
        Ok(())
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
    /// The write of `[within, within + len)` that follows sets the table entry's data; the entry
    /// itself is set in memory here and written back at the next flush.
    fn allocate(&self, s: &Sparse, block: u64, within: u64, len: u64) -> Result<u64> {
        let _alloc = s.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let at = s.lock().end;
        let new_end = at + s.bitmap_bytes + s.block_size;
        let sector = u32::try_from(at / SECTOR).ok().filter(|&v| v != UNALLOCATED);
        let sector = sector.ok_or_else(|| Error::out_of_range("The VHD file is full"))?;
        blockdev::write_all_at(self.storage.as_ref(), new_end, &self.footer.encode())?;
        let mut bitmap = vec![0u8; s.bitmap_bytes as usize];
        if s.differencing {
            // Only the sectors about to be written; the rest of the block reads from the parent.
            for sec in within / SECTOR..(within + len) / SECTOR {
                bitmap[(sec / 8) as usize] |= 0x80 >> (sec % 8);
            }
        } else {
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

impl BlockDriver for Vpc {
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

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        check_request(offset, blockdev::iov_len_mut(bufs), self.size)?;
        if self.sparse.is_none() {
            return self.storage.read_at(offset, bufs);
        }
        blockdev::with_contiguous_mut(bufs, |buf| self.read_into(offset, buf))
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len = blockdev::iov_len(bufs);
        check_request(offset, len, self.size)?;
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        if self.sparse.is_none() {
            return self.storage.write_at(offset, bufs);
        }
        let aligned = offset % SECTOR == 0 && len % SECTOR == 0;
        if aligned && bufs.len() == 1 {
            return self.write_sectors(offset, &bufs[0]);
        }
        // Widen to whole sectors: read the partial first and last sectors, patch them.
        let start = offset - offset % SECTOR;
        let end = (offset + len).next_multiple_of(SECTOR).min(self.size.next_multiple_of(SECTOR));
        let mut whole = vec![0u8; (end - start) as usize];
        if !aligned {
            let readable = self.size.min(end) - start;
            self.read_into(start, &mut whole[..readable as usize])?;
        }
        let mut at = (offset - start) as usize;
        for b in bufs {
            whole[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        self.write_sectors(start, &whole)
    }

    /// Unallocated blocks of a dynamic disk already read as zeros and stay unallocated; the rest
    /// gets zeros written.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_request(offset, len, self.size)?;
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        let Some(s) = &self.sparse else {
            return self.storage.write_zeroes(offset, len, flags.may_unmap);
        };
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let n = (s.block_size - at % s.block_size).min(len - done).min(1 << 20);
            if s.entry(at / s.block_size).is_some() || s.differencing {
                if flags.no_fallback {
                    return Err(Error::unsupported("VHD cannot write zeroes here without writing data"));
                }
                self.write_at(at, &[IoSlice::new(&vec![0u8; n as usize])])?;
            }
            done += n;
        }
        Ok(())
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

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        if max_len == 0 {
            return Err(Error::out_of_range(format!("block status at offset {offset} is past the end of the disk")));
        }
        let Some(s) = &self.sparse else {
            let (data, len) = self.storage.data_status(offset, max_len)?;
            let kind = if data { ExtentKind::Data } else { ExtentKind::ZeroData };
            return Ok(Extent::mapped(len.clamp(1, max_len), kind, self.storage.name().into(), offset));
        };
        // One allocated block (the next block's data is behind its bitmap), or a run of
        // unallocated ones.
        let first = s.entry(offset / s.block_size);
        let mut len = (s.block_size - offset % s.block_size).min(max_len);
        while first.is_none() && len < max_len && s.entry((offset + len) / s.block_size).is_none() {
            len = (len + s.block_size).min(max_len);
        }
        Ok(match first {
            None if s.differencing => Extent::new(len, ExtentKind::Unallocated),
            None => Extent::new(len, ExtentKind::Zero),
            Some(bitmap_at) => Extent::mapped(
                len,
                ExtentKind::Data,
                self.storage.name().into(),
                bitmap_at + s.bitmap_bytes + offset % s.block_size,
            ),
        })
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
