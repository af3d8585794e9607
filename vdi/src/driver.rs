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

use std::sync::{Arc, Mutex, RwLock};

use blockdev::info::ImageInfo;
use blockdev::mapped::{DataWritten, Fill, FillSource, Holes, Mapped, MappedImage, Mapping, WritePlan, Zeroing};
use blockdev::range_lock::{RangeGuard, RangeLock};
use blockdev::{check_request, BlockDriver, Error, ResizeOptions, Result, Storage, ZeroFlags};

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

    fn block_range(&self, b: u64) -> (u64, u64) {
        let bs = self.block_bytes();
        (b * bs, (b + 1) * bs)
    }

    /// How long the run of blocks mapped like block `b` is, from byte `in_block` of it, up to
    /// `max_len` bytes: data blocks while they follow each other in the file; in a differencing
    /// image free and zero blocks apart (free ones read from the parent), otherwise together.
    fn run_len(&self, b: u64, first: Block, in_block: u64, max_len: u64) -> u64 {
        let bs = self.block_bytes();
        let mut len = (bs - in_block).min(max_len);
        let mut next = b + 1;
        while len < max_len {
            let found = self.lookup(next);
            let same = match (first, found) {
                (Block::Data(at), Block::Data(here)) => here == at + (next - b) * bs,
                _ if self.differencing() => first == found,
                _ => first.unallocated() && found.unallocated(),
            };
            if !same {
                break;
            }
            len = (len + bs).min(max_len);
            next += 1;
        }
        len
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

    /// Appends guest block `b` holding `data` (a whole block) to the data area and points its
    /// map entry at it, in the order of the module docs (`check -r` copies shared blocks so).
    /// The caller has the block to itself.
    pub(crate) fn allocate(&self, b: u64, data: &[u8]) -> Result<()> {
        let index = self.take_indices(1)?;
        self.zero_extra(index, 1)?;
        blockdev::write_all_at(self.storage.as_ref(), self.header.data_offset(index), data)?;
        self.publish(b, index, 1)
    }

    /// Zeros the extra areas in front of blocks `index..index + n`, if the image has them.
    fn zero_extra(&self, index: u32, n: u64) -> Result<()> {
        let extra = self.header.block_extra as u64;
        if extra == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; extra as usize];
        for k in 0..n as u32 {
            blockdev::write_all_at(self.storage.as_ref(), self.header.data_offset(index + k) - extra, &zeros)?;
        }
        Ok(())
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

/// What a planned write of a [`Vdi`] publishes once its data is written.
pub struct PendingWrite<'a>(Pending<'a>);

/// Nothing (the block was allocated; its lock is held until the data is written), or fresh blocks.
enum Pending<'a> {
    /// Data goes into allocated blocks.
    InPlace(#[allow(dead_code)] RangeGuard<'a>),
    /// Blocks `first..first + n` get data-area indices `index..`.
    Fresh { _guard: RangeGuard<'a>, first: u64, index: u32, n: u64 },
}

impl MappedImage for Vdi {
    type Pending<'a> = PendingWrite<'a>;

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let max_len = max_len.min(MAX_STATUS_BYTES);
        let bs = self.block_bytes();
        let (b, in_block) = (offset / bs, offset % bs);
        let found = self.lookup(b);
        let len = self.run_len(b, found, in_block, max_len);
        let mapping = match found {
            Block::Free if self.differencing() => Mapping::Unallocated,
            Block::Free | Block::Zero => Mapping::Zero,
            Block::Bad(e) => return Err(self.bad_entry(b, e)),
            Block::Data(at) => {
                Mapping::Data { storage: self.storage.clone(), offset: at + in_block, holes: Holes::AllocatedZeros }
            }
        };
        Ok(Mapped::new(len, mapping))
    }

    /// A run of whole unallocated blocks gets consecutive indices (one write of the run); any
    /// other write is planned block by block.
    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<PendingWrite<'_>>> {
        let bs = self.block_bytes();
        let (b, in_block) = (offset / bs, offset % bs);
        let whole = if in_block == 0 && self.header.block_extra == 0 { (len / bs).min(MAX_RUN_BLOCKS) } else { 0 };
        let run = if whole > 1 { self.unallocated_run(b, whole) } else { 0 };
        if run > 1 {
            let guard = self.block_locks.lock(b, b + run);
            if self.unallocated_run(b, run) == run {
                let index = self.take_indices(run)?;
                let host = self.header.data_offset(index);
                let fill = Fill::new(offset, host, run * bs, FillSource::Zeros);
                let pending = PendingWrite(Pending::Fresh { _guard: guard, first: b, index, n: run });
                return Ok(WritePlan { len: run * bs, storage: self.storage.clone(), host, fill: Some(fill), pending });
            }
        }
        let n = (bs - in_block).min(len);
        let (start, end) = self.block_range(b);
        let guard = self.block_locks.lock(b, b + 1);
        let found = self.lookup(b);
        let (host, fill, pending) = match found {
            Block::Data(at) => (at + in_block, None, PendingWrite(Pending::InPlace(guard))),
            Block::Bad(e) => return Err(self.bad_entry(b, e)),
            Block::Free | Block::Zero => {
                let index = self.take_indices(1)?;
                self.zero_extra(index, 1)?;
                let at = self.header.data_offset(index);
                let source =
                    if found == Block::Free && self.differencing() { FillSource::Backing } else { FillSource::Zeros };
                let fill = Fill::new(start, at, end - start, source);
                (at + in_block, Some(fill), PendingWrite(Pending::Fresh { _guard: guard, first: b, index, n: 1 }))
            }
        };
        Ok(WritePlan { len: n, storage: self.storage.clone(), host, fill, pending })
    }

    fn commit_write(&self, pending: PendingWrite<'_>, _written: DataWritten) -> Result<()> {
        match pending.0 {
            Pending::InPlace(_) => Ok(()),
            Pending::Fresh { first, index, n, .. } => self.publish(first, index, n),
        }
    }

    /// In a differencing image a free block zeroed whole becomes a zero block; the core does the
    /// rest (free and zero blocks already read as zeros elsewhere and are left alone; qemu
    /// writes zero buffers and so allocates them).
    fn zero_range(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<Zeroing> {
        if !self.differencing() {
            return Ok(Zeroing::Fallback(len));
        }
        let bs = self.block_bytes();
        let (b, in_block) = (offset / bs, offset % bs);
        let n = (bs - in_block).min(len);
        if n == bs {
            let _guard = self.block_locks.lock(b, b + 1);
            if self.lookup(b) == Block::Free {
                self.set_entry(b, ENTRY_ZERO)?;
                return Ok(Zeroing::Done(n));
            }
        }
        Ok(Zeroing::Fallback(n))
    }
}

impl BlockDriver for Vdi {
    blockdev::mapped_io!(read_at, write_at, write_zeroes, block_status);

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
