//! The virtio-blk device: features, configuration space, and request execution against an image.
//!
//! # Invariants
//! - A request touches the image only after its chain parsed and every check passed: data
//!   direction, 512-byte multiples, range within the capacity, segment counts and sizes within
//!   the advertised limits, no writes on a read-only device (`IOERR`, as the specification says).
//! - The status byte is written last, after the image operation returned; `FLUSH` reports OK
//!   only once the image flushed (durable).
//! - Data moves between the image and guest memory without a bounce buffer: the image reads
//!   into and writes from the guest's pages. Overlapping writable segments (which no driver
//!   sends) are refused, so no two mutable views alias.
//! - A chain without a usable status byte cannot be answered: it is returned with length 0 and
//!   the device counts itself broken ([`BlockDevice::is_broken`]).

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blockdev::{BlockDriver, ZeroFlags};
use vm_memory::{GuestMemory, Permissions};

use crate::config::*;
use crate::request::{self, kind, read_from, write_guest, Desc, Request, Segment};

/// Request completed.
pub const S_OK: u8 = 0;
/// Request failed.
pub const S_IOERR: u8 = 1;
/// Request type or flags not supported.
pub const S_UNSUPP: u8 = 2;

/// Sector size of the protocol.
pub const SECTOR: u64 = 512;
/// Most data segments in a request (`seg_max`).
pub const SEG_MAX: u32 = 254;
/// Most sectors in one discard or write-zeroes segment.
pub const MAX_ZERO_SECTORS: u32 = 1 << 22;
/// Most segments in one discard or write-zeroes request.
pub const MAX_ZERO_SEGMENTS: u32 = 16;
/// Length of the id GET_ID returns.
pub const ID_LEN: usize = 20;

/// How a device is set up.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Refuse writes (and offer `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Request queues (more than one offers `VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// The serial GET_ID returns (the first 20 bytes).
    pub serial: String,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions { read_only: false, num_queues: 1, serial: "vdisk".into() }
    }
}

/// A virtio-blk device backed by an image. Shared by every queue (`&self` methods).
pub struct BlockDevice {
    image: Arc<dyn BlockDriver>,
    read_only: bool,
    config: DeviceConfig,
    serial: [u8; ID_LEN],
    broken: AtomicBool,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice").field("image", &self.image.filename()).field("config", &self.config).finish()
    }
}

impl BlockDevice {
    /// A device serving `image`.
    pub fn new(image: Arc<dyn BlockDriver>, opts: &DeviceOptions) -> BlockDevice {
        let read_only = opts.read_only || image.is_read_only();
        let cluster = image.cluster_size().unwrap_or(0);
        let opt_io = if cluster >= SECTOR { (cluster / SECTOR).min(u32::MAX as u64) as u32 } else { 0 };
        let config = DeviceConfig {
            capacity: image.size() / SECTOR,
            seg_max: SEG_MAX,
            blk_size: SECTOR as u32,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: opt_io,
            num_queues: opts.num_queues.max(1),
            max_discard_sectors: MAX_ZERO_SECTORS,
            max_discard_seg: MAX_ZERO_SEGMENTS,
            discard_sector_alignment: (opt_io.max(1)),
            max_write_zeroes_sectors: MAX_ZERO_SECTORS,
            max_write_zeroes_seg: MAX_ZERO_SEGMENTS,
            write_zeroes_may_unmap: true,
        };
        let mut serial = [0u8; ID_LEN];
        let s = opts.serial.as_bytes();
        serial[..s.len().min(ID_LEN)].copy_from_slice(&s[..s.len().min(ID_LEN)]);
        BlockDevice { image, read_only, config, serial, broken: AtomicBool::new(false) }
    }

    /// The image served.
    pub fn image(&self) -> &Arc<dyn BlockDriver> {
        &self.image
    }

    /// The feature bits the device offers.
    pub fn features(&self) -> u64 {
        let mut f =
            F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX;
        if self.config.num_queues > 1 {
            f |= F_MQ;
        }
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    /// The configuration the device reports.
    pub fn config(&self) -> DeviceConfig {
        self.config
    }

    /// `len` bytes of the configuration space from `offset` (empty when out of range).
    pub fn read_config(&self, offset: u32, len: u32) -> Vec<u8> {
        let bytes = self.config.to_bytes();
        let (o, l) = (offset as usize, len as usize);
        match o.checked_add(l) {
            Some(end) if end <= bytes.len() => bytes[o..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Whether a chain could not be answered (no status byte): the driver broke the protocol.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Executes the request in the chain `descs` (chain order) and writes its status; returns the
    /// number of bytes written into the chain (the used length).
    pub fn handle_chain<M: GuestMemory>(&self, descs: &[Desc], mem: &M) -> u32 {
        let req = match request::parse(descs, mem) {
            Ok(r) => r,
            Err(_) => {
                return match request::status_address(descs, mem) {
                    Some(at) if write_guest(mem, at, &[S_IOERR]) => 1,
                    _ => {
                        self.broken.store(true, Ordering::Relaxed);
                        0
                    }
                };
            }
        };
        let (status, data_written) = self.execute(&req, mem);
        if !write_guest(mem, req.status, &[status]) {
            self.broken.store(true, Ordering::Relaxed);
            return 0;
        }
        (data_written + 1).min(u32::MAX as u64) as u32
    }

    /// Runs `req`: its status and the data bytes written into guest memory.
    fn execute<M: GuestMemory>(&self, req: &Request, mem: &M) -> (u8, u64) {
        match req.kind {
            kind::IN => {
                let len = req.writable_len();
                if req.readable_len() != 0 || !self.in_range(req.sector, len) || req.writable.len() > SEG_MAX as usize {
                    return (S_IOERR, 0);
                }
                match read_into_guest(self.image.as_ref(), req.sector * SECTOR, &req.writable, mem) {
                    true => (S_OK, len),
                    false => (S_IOERR, 0),
                }
            }
            kind::OUT => {
                let len = req.readable_len();
                if self.read_only
                    || req.writable_len() != 0
                    || !self.in_range(req.sector, len)
                    || req.readable.len() > SEG_MAX as usize
                {
                    return (S_IOERR, 0);
                }
                match write_from_guest(self.image.as_ref(), req.sector * SECTOR, &req.readable, mem) {
                    true => (S_OK, 0),
                    false => (S_IOERR, 0),
                }
            }
            kind::FLUSH => match self.image.flush() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            kind::GET_ID => {
                let n = (req.writable_len() as usize).min(ID_LEN);
                let mut done = 0;
                for s in &req.writable {
                    let k = (s.len as usize).min(n - done);
                    if k == 0 {
                        break;
                    }
                    if !write_guest(mem, s.addr, &self.serial[done..done + k]) {
                        return (S_IOERR, 0);
                    }
                    done += k;
                }
                (S_OK, done as u64)
            }
            kind::DISCARD | kind::WRITE_ZEROES => {
                if self.read_only || req.writable_len() != 0 {
                    return (S_IOERR, 0);
                }
                (self.zero_or_discard(req, mem), 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        len % SECTOR == 0
            && sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= self.config.capacity * SECTOR)
    }

    fn zero_or_discard<M: GuestMemory>(&self, req: &Request, mem: &M) -> u8 {
        let len = req.readable_len();
        if len == 0 || len % 16 != 0 || len / 16 > MAX_ZERO_SEGMENTS as u64 {
            return S_IOERR;
        }
        let mut raw = vec![0u8; len as usize];
        if !read_from(mem, &req.readable, 0, &mut raw) {
            return S_IOERR;
        }
        // Check every segment before doing any.
        let mut ranges = Vec::new();
        for seg in raw.chunks_exact(16) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            let allowed = if req.kind == kind::WRITE_ZEROES { 1 } else { 0 };
            if flags & !allowed != 0 {
                return S_UNSUPP;
            }
            if sectors > MAX_ZERO_SECTORS || !self.in_range(sector, sectors as u64 * SECTOR) {
                return S_IOERR;
            }
            ranges.push((sector * SECTOR, sectors as u64 * SECTOR, flags & 1 != 0));
        }
        for (offset, len, unmap) in ranges {
            let r = if req.kind == kind::DISCARD {
                self.image.discard(offset, len)
            } else {
                self.image.write_zeroes(offset, len, ZeroFlags { may_unmap: unmap, no_fallback: false })
            };
            if r.is_err() {
                return S_IOERR;
            }
        }
        S_OK
    }
}

/// Host views of guest segments, kept alive while the I/O runs.
fn guest_views<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    access: Permissions,
) -> Option<Vec<vm_memory::volatile_memory::PtrGuardMut>> {
    let mut guards = Vec::new();
    for s in segs {
        for vs in mem.get_slices(s.addr, s.len as usize, access).ok()? {
            guards.push(vs.ok()?.ptr_guard_mut());
        }
    }
    Some(guards)
}

/// Whether any two of the host ranges overlap.
fn overlapping(ranges: &mut [(usize, usize)]) -> bool {
    ranges.sort_unstable();
    ranges.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
}

/// Reads the image at `offset` straight into the guest segments.
fn read_into_guest<M: GuestMemory>(image: &dyn BlockDriver, offset: u64, segs: &[Segment], mem: &M) -> bool {
    let Some(guards) = guest_views(mem, segs, Permissions::Write) else { return false };
    let mut ranges: Vec<(usize, usize)> = guards.iter().map(|g| (g.as_ptr() as usize, g.len())).collect();
    if overlapping(&mut ranges) {
        return false;
    }
    let mut iovs: Vec<IoSliceMut<'_>> = guards
        .iter()
        // SAFETY: each guard maps `len` bytes of guest memory that stay mapped while `mem` is
        // borrowed (for the whole call); the ranges do not overlap (checked above), so no two
        // mutable slices alias; any byte value is a valid u8. The driver handed these buffers to
        // the device until the request is used, so the guest does not access them meanwhile
        // (a guest that does only corrupts its own buffer).
        .map(|g| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(g.as_ptr(), g.len()) }))
        .collect();
    image.read_at(offset, &mut iovs).is_ok()
}

/// Writes the guest segments to the image at `offset`.
fn write_from_guest<M: GuestMemory>(image: &dyn BlockDriver, offset: u64, segs: &[Segment], mem: &M) -> bool {
    let Some(guards) = guest_views(mem, segs, Permissions::Read) else { return false };
    let iovs: Vec<IoSlice<'_>> = guards
        .iter()
        // SAFETY: as in `read_into_guest`; the slices are only read, so overlaps are harmless.
        .map(|g| IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr() as *const u8, g.len()) }))
        .collect();
    image.write_at(offset, &iovs).is_ok()
}
