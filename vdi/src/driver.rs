//! An open VDI image: the header, the block map in memory, and block allocation.
//!
//! # Invariants
//! - The in-memory map equals the file's map for every entry not being allocated right now.
//! - A map entry is [`ENTRY_FREE`], [`ENTRY_ZERO`], or an index into the data area; indices at or
//!   past the block count are corrupt ([`Block::Bad`]): reads and writes of such blocks fail.
//! - `next_index` is above every index in the map, so a new block never reuses stored data.
//! - In a differencing image a free block reads from the parent (zeros past its end, or without
//!   one opened), a zero block reads zeros; a partial write to a free block copies the rest of
//!   the block from the parent first; zeroing a whole free block makes it a zero block.
//!
//! # Update order of an allocating write
//! 1. The block's index is taken (under the allocation mutex, never held across I/O) while the
//!    guest block's range lock is held, so no two writers allocate the same block;
//! 2. the whole block (the written bytes, zeros around them) is written at its place in the data
//!    area, and the file is flushed; when the file can zero the new block without writing it
//!    (`Storage::zero_without_writing`) and nothing comes from a parent, it does that and only
//!    the written bytes are written;
//! 3. the map entry is written, then the in-memory entry set;
//! 4. `blocksAllocated` (one field of the header sector) is written with the count of entries
//!    now pointing into the data area.
//!
//! A crash between the steps leaks at most the data area tail (the entry is not written), never
//! points an entry at unwritten data; a header count that lags the map is corrected on the next
//! allocation (the count comes from the map, not from the header).

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, RwLock};

use blockdev::info::ImageInfo;
use blockdev::range_lock::RangeLock;
use blockdev::{check_request, BlockDriver, Error, Extent, ExtentKind, ResizeOptions, Result, Storage, ZeroFlags};

use crate::header::{Header, ENTRY_FREE, ENTRY_ZERO, OFF_BLOCKS_ALLOCATED};

/// Most whole blocks appended by one request.
const MAX_RUN_BLOCKS: u64 = 64;
/// Longest run one block status answer describes.
const MAX_STATUS_BYTES: u64 = 1 << 30;

/// What a guest block maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Not allocated: zeros.
    Free,
    /// Explicitly zero.
    Zero,
    /// Stored at this file offset.
    Data(u64),
    /// The entry points past the data area (corrupt).
    Bad(u32),
}

impl Block {
    /// Whether the block has no data stored in the image.
    fn unallocated(self) -> bool {
        matches!(self, Block::Free | Block::Zero)
    }
}

/// Allocation state (behind a mutex that is never held across data I/O).
#[derive(Debug)]
pub(crate) struct Alloc {
    /// The next free index of the data area.
    pub next_index: u32,
    /// Map entries pointing into the data area.
    pub allocated: u32,
    /// `blocksAllocated` as the file's header has it now.
    pub header_count: u32,
}

/// An open VDI image.
pub struct Vdi {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) header: Header,
    pub(crate) map: RwLock<Vec<u32>>,
    pub(crate) alloc: Mutex<Alloc>,
    /// Held on guest block numbers while a block is looked up and possibly allocated.
    pub(crate) block_locks: RangeLock,
    pub(crate) read_only: bool,
    /// The parent of a differencing image, when opened.
    pub(crate) backing: Option<Arc<dyn BlockDriver>>,
    /// The parent's name relative to this image, when known.
    pub(crate) parent_name: Option<String>,
}

impl std::fmt::Debug for Vdi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vdi").field("file", &self.storage.name()).field("blocks", &self.header.blocks).finish()
    }
}

impl Vdi {
    fn block_bytes(&self) -> u64 {
        self.header.block_size as u64
    }

    /// What guest block `b` maps to.
    pub fn lookup(&self, b: u64) -> Block {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        self.classify(map.get(b as usize).copied().unwrap_or(ENTRY_FREE))
    }

    pub(crate) fn classify(&self, entry: u32) -> Block {
        match entry {
            ENTRY_FREE => Block::Free,
            ENTRY_ZERO => Block::Zero,
            i if i < self.header.blocks => Block::Data(self.header.data_offset(i)),
            i => Block::Bad(i),
        }
    }

    fn bad_entry(&self, b: u64, entry: u32) -> Error {
        Error::corrupt(format!(
            "{}: block map entry {b} points to block index {entry}, beyond the {} blocks of the image",
            self.storage.name(),
            self.header.blocks
        ))
    }

    /// Whether free blocks read from a parent rather than as zeros.
    fn differencing(&self) -> bool {
        self.header.is_differencing()
    }

    /// Reads the parent's bytes at guest offset `offset` (zeros past its end or without a parent).
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        blockdev::read_backing(self.backing.as_ref(), offset, buf)
    }

    /// Reads stored bytes at file offset `at` (bytes past the end of the file read as zeros).
    fn read_stored(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let file_len = self.storage.len()?;
        let have = (file_len.saturating_sub(at) as usize).min(buf.len());
        blockdev::read_exact_at(self.storage.as_ref(), at, &mut buf[..have])?;
        buf[have..].fill(0);
        Ok(())
    }

    pub(crate) fn read_into(&self, mut offset: u64, mut buf: &mut [u8]) -> Result<()> {
        let bs = self.block_bytes();
        while !buf.is_empty() {
            let b = offset / bs;
            let in_block = offset % bs;
            let mut n = ((bs - in_block) as usize).min(buf.len());
            let found = self.lookup(b);
            if let Block::Data(at) = found {
                // Blocks stored one after another are read in one request.
                let mut next = at + in_block + n as u64;
                let mut nb = b + 1;
                while n < buf.len() && self.lookup(nb) == Block::Data(next) {
                    let m = (bs as usize).min(buf.len() - n);
                    n += m;
                    next += m as u64;
                    nb += 1;
                }
            }
            let (now, rest) = buf.split_at_mut(n);
            match found {
                Block::Free if self.differencing() => self.read_parent(offset, now)?,
                Block::Free | Block::Zero => now.fill(0),
                Block::Data(at) => self.read_stored(at + in_block, now)?,
                Block::Bad(e) => return Err(self.bad_entry(b, e)),
            }
            offset += n as u64;
            buf = rest;
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        Ok(())
    }

    fn write_into(&self, mut offset: u64, mut data: &[u8]) -> Result<()> {
        let bs = self.block_bytes();
        while !data.is_empty() {
            let b = offset / bs;
            let in_block = offset % bs;
            // A run of whole unallocated blocks is appended in one request.
            let whole = if in_block == 0 { data.len() as u64 / bs } else { 0 };
            if whole > 1 {
                let run = self.unallocated_run(b, whole.min(MAX_RUN_BLOCKS));
                if run > 1 {
                    let _g = self.block_locks.lock(b, b + run);
                    if self.unallocated_run(b, run) == run {
                        let bytes = (run * bs) as usize;
                        self.allocate(b, &data[..bytes])?;
                        offset += bytes as u64;
                        data = &data[bytes..];
                        continue;
                    }
                }
            }
            let n = ((bs - in_block) as usize).min(data.len());
            let (now, rest) = data.split_at(n);
            let _g = self.block_locks.lock(b, b + 1);
            match self.lookup(b) {
                Block::Data(at) => blockdev::write_all_at(self.storage.as_ref(), at + in_block, now)?,
                Block::Bad(e) => return Err(self.bad_entry(b, e)),
                found @ (Block::Free | Block::Zero) => {
                    let from_parent = found == Block::Free && self.differencing();
                    if n as u64 == bs {
                        self.allocate(b, now)?;
                    } else if !from_parent && self.header.block_extra == 0 {
                        self.allocate_part(b, in_block, now)?;
                    } else {
                        let mut full = vec![0u8; bs as usize];
                        if from_parent {
                            self.read_parent(b * bs, &mut full)?;
                        }
                        full[in_block as usize..in_block as usize + n].copy_from_slice(now);
                        self.allocate(b, &full)?;
                    }
                }
            }
            offset += n as u64;
            data = rest;
        }
        Ok(())
    }

    /// Sets the map entry of guest block `b` (free or zero) to `entry`, in the file, then in memory.
    pub(crate) fn set_entry(&self, b: u64, entry: u32) -> Result<()> {
        blockdev::write_all_at(self.storage.as_ref(), self.header.off_blocks as u64 + b * 4, &entry.to_le_bytes())?;
        self.map.write().unwrap_or_else(|p| p.into_inner())[b as usize] = entry;
        Ok(())
    }

    /// How many of the `max` blocks from `b` are free or zero.
    fn unallocated_run(&self, b: u64, max: u64) -> u64 {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        (0..max).take_while(|i| matches!(map.get((b + i) as usize), Some(&ENTRY_FREE | &ENTRY_ZERO))).count() as u64
    }

    /// Appends whole blocks `first..` holding `data` (a multiple of the block size) to the data
    /// area and points their map entries at them, in the order of the module docs. The caller
    /// holds the blocks' range lock and has seen them unallocated.
    pub(crate) fn allocate(&self, first: u64, data: &[u8]) -> Result<()> {
        let bs = self.block_bytes();
        let n = data.len() as u64 / bs;
        let index = self.take_indices(n)?;
        // 1. The data (with zeroed extra areas, if the image has them).
        let at = self.header.data_offset(index);
        if self.header.block_extra == 0 {
            blockdev::write_all_at(self.storage.as_ref(), at, data)?;
        } else {
            let extra = vec![0u8; self.header.block_extra as usize];
            for (k, chunk) in data.chunks(bs as usize).enumerate() {
                let base = self.header.data_offset(index + k as u32);
                blockdev::write_all_at(self.storage.as_ref(), base - extra.len() as u64, &extra)?;
                blockdev::write_all_at(self.storage.as_ref(), base, chunk)?;
            }
        }
        self.publish(first, index, n)
    }

    /// Allocates guest block `b` (of an image without extra block areas) for a write of `part` at
    /// `in_block` that leaves the rest of the block zeros. Only `part` is written when the file
    /// can zero the new block without writing it ([`blockdev::Storage::zero_without_writing`]);
    /// otherwise the whole block is. Same order and locking as [`Vdi::allocate`].
    fn allocate_part(&self, b: u64, in_block: u64, part: &[u8]) -> Result<()> {
        let bs = self.block_bytes();
        let index = self.take_indices(1)?;
        let at = self.header.data_offset(index);
        if self.storage.zero_without_writing(at, bs) {
            blockdev::write_all_at(self.storage.as_ref(), at + in_block, part)?;
        } else {
            let mut full = vec![0u8; bs as usize];
            full[in_block as usize..in_block as usize + part.len()].copy_from_slice(part);
            blockdev::write_all_at(self.storage.as_ref(), at, &full)?;
        }
        self.publish(b, index, 1)
    }

    /// Takes `n` block indices from the end of the data area.
    fn take_indices(&self, n: u64) -> Result<u32> {
        let index = {
            let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            if a.next_index as u64 + n > self.header.blocks as u64 {
                return Err(Error::corrupt(format!(
                    "{}: no free block index left in the data area (next {}, {} blocks); run check",
                    self.storage.name(),
                    a.next_index,
                    self.header.blocks
                )));
            }
            let i = a.next_index;
            a.next_index += n as u32;
            i
        };
        Ok(index)
    }

    /// Steps 2 and 3 of an allocation, once the data of blocks `index..index + n` is written:
    /// sync, point the map entries of guest blocks `first..` at them, count them in the header.
    fn publish(&self, first: u64, index: u32, n: u64) -> Result<()> {
        self.storage.flush()?;
        // 2. The map entries.
        let entries: Vec<u32> = (0..n as u32).map(|k| index + k).collect();
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        blockdev::write_all_at(self.storage.as_ref(), self.header.off_blocks as u64 + first * 4, &bytes)?;
        {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            map[first as usize..(first + n) as usize].copy_from_slice(&entries);
        }
        // 3. The header's count.
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        a.allocated += n as u32;
        blockdev::write_all_at(self.storage.as_ref(), OFF_BLOCKS_ALLOCATED, &a.allocated.to_le_bytes())?;
        a.header_count = a.allocated;
        Ok(())
    }
}

impl BlockDriver for Vdi {
    fn format(&self) -> &'static str {
        "vdi"
    }

    fn size(&self) -> u64 {
        self.header.disk_size
    }

    fn filename(&self) -> &str {
        self.storage.name()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_request(offset, len, self.size())?;
        blockdev::with_contiguous_mut(bufs, |buf| self.read_into(offset, buf))
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_request(offset, len, self.size())?;
        self.writable()?;
        if bufs.len() == 1 {
            return self.write_into(offset, &bufs[0]);
        }
        let data: Vec<u8> = bufs.iter().map(|b| &b[..]).collect::<Vec<&[u8]>>().concat();
        self.write_into(offset, &data)
    }

    /// Free and zero blocks already read as zeros and are left alone (qemu writes zero buffers
    /// and so allocates them); allocated blocks get zeros written over the range. In a
    /// differencing image a free block zeroed whole becomes a zero block, zeroed in part it is
    /// allocated with the parent's data around the zeros.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_request(offset, len, self.size())?;
        self.writable()?;
        let bs = self.block_bytes();
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let b = at / bs;
            let n = (bs - at % bs).min(len - done);
            let _g = self.block_locks.lock(b, b + 1);
            match self.lookup(b) {
                Block::Free if self.differencing() && n == bs => self.set_entry(b, ENTRY_ZERO)?,
                Block::Free if self.differencing() => {
                    let mut full = vec![0u8; bs as usize];
                    self.read_parent(b * bs, &mut full)?;
                    full[(at % bs) as usize..(at % bs + n) as usize].fill(0);
                    self.allocate(b, &full)?;
                }
                Block::Free | Block::Zero => {}
                Block::Bad(e) => return Err(self.bad_entry(b, e)),
                Block::Data(host) => {
                    if flags.no_fallback {
                        return Err(Error::unsupported("VDI cannot zero an allocated block without writing data"));
                    }
                    let zeros = vec![0u8; n as usize];
                    blockdev::write_all_at(self.storage.as_ref(), host + at % bs, &zeros)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// VDI has no way to give space back without moving blocks; as in qemu, discard does nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.size())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush()
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size().saturating_sub(offset)).min(MAX_STATUS_BYTES);
        if max_len == 0 {
            return Err(Error::out_of_range(format!("block status at offset {offset} is past the end of the disk")));
        }
        let bs = self.block_bytes();
        let b = offset / bs;
        let first = self.lookup(b);
        let mut len = (bs - offset % bs).min(max_len);
        let mut nb = b + 1;
        let mut expect = match first {
            Block::Data(at) => Some(at + offset % bs + len),
            _ => None,
        };
        while len < max_len {
            let next = self.lookup(nb);
            let same = match (first, next) {
                (Block::Data(_), Block::Data(at)) => Some(at) == expect,
                // In a differencing image free (the parent's) and zero blocks differ.
                _ if self.differencing() => first == next,
                _ => first.unallocated() && next.unallocated(),
            };
            if !same {
                break;
            }
            let n = bs.min(max_len - len);
            if let Some(e) = expect.as_mut() {
                *e += n;
            }
            len += n;
            nb += 1;
        }
        Ok(match first {
            Block::Free if self.differencing() => Extent::new(len, ExtentKind::Unallocated),
            Block::Free | Block::Zero => Extent::new(len, ExtentKind::Zero),
            Block::Bad(e) => return Err(self.bad_entry(b, e)),
            Block::Data(host) => {
                // As qemu, the file's holes show as zeros (allocated, reading zeros).
                let at = host + offset % bs;
                let (data, len) = match self.storage.len()? {
                    end if at >= end => (false, len),
                    end => {
                        let (data, l) = self.storage.data_status(at, len.min(end - at))?;
                        (data, l.clamp(1, len))
                    }
                };
                let kind = if data { ExtentKind::Data } else { ExtentKind::ZeroData };
                Extent::mapped(len, kind, self.storage.name().into(), at)
            }
        })
    }

    fn resize(&self, _new_size: u64, _opts: &ResizeOptions) -> Result<()> {
        Err(Error::unsupported("Image format driver does not support resize"))
    }

    fn info(&self) -> Result<ImageInfo> {
        blockdev::info::file_image_info(
            self.storage.as_ref(),
            "vdi",
            self.size(),
            Some(self.block_bytes()),
            self.parent_name.as_deref(),
            "vdi",
        )
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        self.backing.clone()
    }

    fn has_zero_init(&self) -> bool {
        !self.differencing()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.block_bytes())
    }

    fn check(&self) -> Option<&dyn blockdev::Check> {
        Some(self)
    }
}
