//! The mapping-based format core: a format says where guest data lives and how to make a guest
//! range writable; this module does the I/O once, for every format.
//!
//! A format implements [`MappedImage`] (two questions, see its docs) and forwards the
//! [`crate::BlockDriver`] I/O methods to the functions here ([`read`], [`write`],
//! [`write_zeroes`], [`block_status`]), usually with [`crate::mapped_io!`] inside its
//! `impl BlockDriver`:
//!
//! ```ignore
//! impl BlockDriver for MyFormat {
//!     blockdev::mapped_io!(read_at, write_at, write_zeroes, block_status);
//!     // format, size, flush, info, ...
//! }
//! ```
//!
//! What the core does, so that no format repeats it: range checks against the disk size and the
//! read-only state; scatter-gather straight between the caller's buffers and the container (no
//! contiguous copy of a request); reads of unallocated ranges from the backing image (zeros past
//! its end or without one); zero fill; copy-on-write of the part of a fresh allocation unit that a
//! write does not cover (from the backing image, or zeros, or nothing when the container can zero
//! the unit without writing it); read-modify-write of partial sectors for formats that track
//! sectors; `write_zeroes` dispatch (ranges that already read as zeros are left alone, the format
//! may zero ranges in its metadata, everything else gets zeros written); block status from the
//! same mapping the reads use.
//!
//! # Invariants
//! - [`MappedImage::map`] describes a non-empty prefix of what it is asked, never more; the core
//!   refuses an empty answer as corruption instead of looping.
//! - A write goes in three steps, in this order: [`MappedImage::prepare_write`] (the format
//!   locks what it must, looks up or reserves the host range, and may write metadata that nothing
//!   points at yet), the data write by the core (the caller's bytes plus the fill of a fresh
//!   unit), then [`MappedImage::commit_write`] (the format publishes the new mapping in its crash
//!   order). `commit_write` takes a [`DataWritten`] that only this module can make, so a format
//!   cannot publish a mapping before its data is written. A failed data write drops the pending
//!   value without committing: the reserved space leaks, nothing points at it.
//! - The core never holds a lock of its own across I/O, except the sector lock of a
//!   [`Granularity`], held for the whole of a write to a format that tracks sectors.

mod io;
pub mod iov;
#[cfg(test)]
mod tests;

use std::fmt::Debug;
use std::io::IoSliceMut;
use std::sync::Arc;

use crate::driver::{BlockDriver, ZeroFlags};
use crate::error::{Error, Result};
use crate::range_lock::RangeLock;
use crate::storage::Storage;

pub use io::{block_status, read, read_backing, read_mapped, write, write_mapped, write_zeroes};

/// Implements the listed [`crate::BlockDriver`] I/O methods (`read_at`, `write_at`,
/// `write_zeroes`, `block_status`) of a [`MappedImage`] by the mapping core; for use inside
/// `impl BlockDriver for ...`. A format that does something of its own first (a write guard, a
/// streaming writer) writes that method itself and calls the core function.
#[macro_export]
macro_rules! mapped_io {
    ($($method:ident),* $(,)?) => { $( $crate::mapped_io!(@one $method); )* };
    (@one read_at) => {
        fn read_at(&self, offset: u64, bufs: &mut [::std::io::IoSliceMut<'_>]) -> $crate::Result<()> {
            $crate::mapped::read(self, offset, bufs)
        }
    };
    (@one write_at) => {
        fn write_at(&self, offset: u64, bufs: &[::std::io::IoSlice<'_>]) -> $crate::Result<()> {
            $crate::mapped::write(self, offset, bufs)
        }
    };
    (@one write_zeroes) => {
        fn write_zeroes(&self, offset: u64, len: u64, flags: $crate::ZeroFlags) -> $crate::Result<()> {
            $crate::mapped::write_zeroes(self, offset, len, flags)
        }
    };
    (@one block_status) => {
        fn block_status(&self, offset: u64, max_len: u64) -> $crate::Result<$crate::Extent> {
            $crate::mapped::block_status(self, offset, max_len)
        }
    };
}

/// Where a run of the guest disk lives.
#[derive(Debug, Clone)]
pub enum Mapping {
    /// Plain bytes at `offset` in `storage` (bytes past the container's end read as zeros).
    Data {
        /// The container.
        storage: Arc<dyn Storage>,
        /// Host offset of the run's first byte.
        offset: u64,
        /// What block status makes of holes in the container under the run.
        holes: Holes,
    },
    /// Reads as zeros, decided by this image.
    Zero,
    /// Nothing in this image: reads come from the backing image, or are zeros without one.
    Unallocated,
    /// Host space is set aside for the run but holds none of its data: it reads as `reads` says
    /// (qcow2's preallocated zero clusters, and the unallocated subclusters of an allocated
    /// cluster). Block status reports the host offset with the run's kind.
    Reserved {
        /// The container.
        storage: Arc<dyn Storage>,
        /// Host offset of the run's first byte.
        offset: u64,
        /// What the run reads as.
        reads: Unwritten,
    },
    /// Stored compressed; [`MappedImage::read_compressed`] reads it.
    Compressed {
        /// Where the first compressed unit is, when block status should report it.
        host: Option<(Arc<dyn Storage>, u64)>,
    },
}

/// What a [`Mapping::Reserved`] run reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwritten {
    /// Zeros, decided by this image.
    Zeros,
    /// The backing image's bytes (zeros without one), as [`Mapping::Unallocated`].
    Backing,
}

/// What block status reports for a [`Mapping::Data`] run where the container has a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holes {
    /// The container is not asked: the run is reported as data (qemu does so for vpc blocks and
    /// vmdk grains).
    Ignored,
    /// Holes are allocated ranges reading as zeros (vdi blocks, vmdk flat extents).
    AllocatedZeros,
    /// The run is the container itself (raw): holes read as zeros and are reported as zeros,
    /// and a data run ending at an unaligned end of file covers the rest of the last block of
    /// the container's request alignment, as qemu rounds it.
    Container,
}

/// A mapping of a prefix of the range asked about.
#[derive(Debug, Clone)]
pub struct Mapped {
    /// Length of the run in bytes (never zero).
    pub len: u64,
    /// Where it lives.
    pub mapping: Mapping,
}

impl Mapped {
    /// A run of `len` bytes mapped as `mapping`.
    pub fn new(len: u64, mapping: Mapping) -> Mapped {
        Mapped { len, mapping }
    }
}

/// Where the bytes of a fresh allocation that a write does not cover come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillSource {
    /// Zeros (the unit was unallocated without a backing image, or a zero unit).
    Zeros,
    /// The backing image's bytes at the same guest offsets (copy-on-write).
    Backing,
    /// The bytes the image itself reads there now (its old unit, a compressed unit, the backing
    /// image or zeros): for formats that move a unit that already holds data (qcow2's
    /// copy-on-write of a shared or compressed cluster). The plan's range stays mapped as before
    /// until the commit, so the core reads the old bytes through [`MappedImage::map`].
    Current,
}

/// A fresh allocation unit that a write lands in: the core fills the part the write does not
/// cover before the format publishes the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// First guest byte of the unit.
    pub guest_start: u64,
    /// Host offset of the unit's first byte (in the plan's storage).
    pub host_start: u64,
    /// Length of the unit in bytes; the write lies inside it.
    pub len: u64,
    /// Where the uncovered bytes come from.
    pub source: FillSource,
    /// The unit's host space is new, at the container's end or freed, and nothing else reads
    /// it: when a read fill turns out to be zeros the core zeroes the unit without writing it
    /// ([`Storage::zero_without_writing`]) and writes only the request; otherwise (and when the
    /// request covers the unit whole) it reserves the unit ([`Storage::reserve`]) before writing
    /// it. Fills from [`FillSource::Zeros`] try the first either way.
    pub fresh_space: bool,
}

impl Fill {
    /// A unit of `len` bytes at guest `guest_start` and host `host_start`, its uncovered bytes
    /// from `source`, in space that is not [`Fill::fresh_space`].
    pub fn new(guest_start: u64, host_start: u64, len: u64, source: FillSource) -> Fill {
        Fill { guest_start, host_start, len, source, fresh_space: false }
    }
}

/// Where a write goes, from [`MappedImage::prepare_write`].
pub struct WritePlan<P> {
    /// Guest bytes of the request this plan covers (a non-empty prefix).
    pub len: u64,
    /// The container the bytes go to.
    pub storage: Arc<dyn Storage>,
    /// Host offset of the request's first byte.
    pub host: u64,
    /// The fresh unit around the write, when the plan allocated one.
    pub fill: Option<Fill>,
    /// What the format needs to publish the write (held locks, reserved indices).
    pub pending: P,
}

/// Proof that the data of a [`WritePlan`] is written; only the core makes one.
#[derive(Debug)]
pub struct DataWritten(());

/// What a format did with a `write_zeroes` range, from [`MappedImage::zero_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroing {
    /// The format zeroed the first `n` bytes in its metadata (or its container); done.
    Done(u64),
    /// The core handles the first `n` bytes: it leaves what already reads as zeros alone and
    /// writes zeros over the rest.
    Fallback(u64),
}

/// Sector tracking: writes are widened to whole `bytes`-sized sectors (the partial first and
/// last ones read and patched), under a lock on the sectors so that two writes never patch the
/// same sector at once.
#[derive(Debug)]
pub struct Granularity {
    bytes: u64,
    lock: RangeLock,
}

impl Granularity {
    /// Sectors of `bytes` (a power of two).
    pub fn new(bytes: u64) -> Granularity {
        Granularity { bytes: bytes.max(1).next_power_of_two(), lock: RangeLock::new() }
    }

    /// The sector size.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A format on the mapping core: where guest ranges live, and how a range becomes writable.
///
/// Contracts:
/// - [`MappedImage::map`] is asked about a range inside the disk and answers for a non-empty
///   prefix of it;
/// - [`MappedImage::prepare_write`] is asked about a range inside the disk of a writable image,
///   aligned to the [`Granularity`] if the format has one; it answers for a non-empty prefix,
///   which stays mapped as planned until the pending value is committed or dropped (the format
///   holds whatever lock that takes inside the pending value);
/// - [`MappedImage::commit_write`] publishes the plan's mapping in the format's crash order; it
///   runs only after the plan's data (and fill) is written.
pub trait MappedImage: BlockDriver {
    /// What a planned write carries to its commit (locks held, space reserved).
    type Pending<'a>
    where
        Self: 'a;

    /// Where `[offset, offset + max_len)` lives: a mapping of a non-empty prefix.
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped>;

    /// Makes a prefix of `[offset, offset + len)` writable: its host range, allocated if it was
    /// not, with the fill the core must write around the request in a fresh unit.
    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<Self::Pending<'_>>>;

    /// Publishes a planned write once its data is written.
    fn commit_write(&self, pending: Self::Pending<'_>, written: DataWritten) -> Result<()>;

    /// Reads a range [`MappedImage::map`] reported as [`Mapping::Compressed`].
    fn read_compressed(&self, _offset: u64, _bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        Err(Error::unsupported("this format has no compressed data"))
    }

    /// Runs before the first change a write makes (a new content id, an unclean mark).
    fn before_write(&self) -> Result<()> {
        Ok(())
    }

    /// Whether reads may go to the backing image now (vmdk refuses a changed parent).
    fn check_backing_read(&self) -> Result<()> {
        Ok(())
    }

    /// Sector tracking, for formats whose writes must cover whole sectors.
    fn granularity(&self) -> Option<&Granularity> {
        None
    }

    /// Lets the format zero a prefix of `[offset, offset + len)` in its metadata; the default
    /// leaves everything to the core.
    fn zero_range(&self, _offset: u64, len: u64, _flags: ZeroFlags) -> Result<Zeroing> {
        Ok(Zeroing::Fallback(len))
    }
}
