//! [`BlockDriver`]: a guest-visible disk, and the types that describe its contents.
//!
//! A driver is a format (raw, qcow2, vmdk, ...) on top of one or more [`Storage`]s. Consumers hold
//! `Arc<dyn BlockDriver>` and call it from many threads at once: every method takes `&self`, and a
//! driver serialises internally only what must be serialised (metadata updates), never holding a lock
//! across data I/O.
//!
//! Contracts:
//! - offsets and lengths are in bytes of the virtual disk; a request that reaches past
//!   [`BlockDriver::size`] fails with [`crate::ErrorKind::OutOfRange`] and changes nothing;
//! - reads of ranges that are neither written in this image nor in a backing image return zeros;
//! - [`BlockDriver::block_status`] describes a prefix of the range it is asked about and never returns
//!   a zero-length extent for a non-empty request below the size;
//! - [`BlockDriver::flush`] makes every completed write (data and metadata) durable;
//! - [`BlockDriver::close`] flushes and clears dirty/unclean marks; a driver dropped without `close`
//!   leaves an image that the next open must be able to repair or read.

use std::fmt::Debug;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::info::{CheckReport, ImageInfo};
use crate::storage::{checked_end, Prealloc, Storage};

/// What a range of the virtual disk holds, as far as this image knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// The range holds data in this image (it may still happen to be zeros).
    Data,
    /// The range reads as zeros, decided by this image (zero flag, hole, zeroed grain).
    Zero,
    /// The range is allocated as data in this image, but its host range is a hole, so it reads as
    /// zeros (qemu reports both "data" and "zero": a qcow2 image preallocated with metadata).
    ZeroData,
    /// Nothing in this image: reads fall through to the backing image, or are zeros without one.
    Unallocated,
}

/// A run of the virtual disk with one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never zero for a non-empty request).
    pub len: u64,
    /// What the run holds.
    pub kind: ExtentKind,
    /// Where the run starts in a container, when it maps to plain bytes there: (container name,
    /// offset). Compressed or encrypted data has no plain mapping for copy offload, but qemu's
    /// `map` still reports the host offset of compressed clusters.
    pub host: Option<(Arc<str>, u64)>,
    /// The data is stored compressed.
    pub compressed: bool,
}

impl Extent {
    /// An extent without a host mapping.
    pub fn new(len: u64, kind: ExtentKind) -> Extent {
        Extent { len, kind, host: None, compressed: false }
    }

    /// An extent mapped to `offset` in the container called `file`.
    pub fn mapped(len: u64, kind: ExtentKind, file: Arc<str>, offset: u64) -> Extent {
        Extent { len, kind, host: Some((file, offset)), compressed: false }
    }
}

/// Flags for [`BlockDriver::write_zeroes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range may be deallocated if it then still reads as zeros.
    pub may_unmap: bool,
    /// Fail with [`crate::ErrorKind::Unsupported`] instead of writing zero buffers when the driver
    /// cannot zero efficiently (NBD's FAST_ZERO, qemu's BDRV_REQ_NO_FALLBACK).
    pub no_fallback: bool,
}

/// Options for [`BlockDriver::resize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResizeOptions {
    /// How new space is reserved when growing.
    pub prealloc: Prealloc,
    /// Shrinking is allowed (`--shrink`); without it, shrinking fails.
    pub allow_shrink: bool,
}

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepairMode {
    /// Only report.
    #[default]
    None,
    /// Repair leaks only (`-r leaks`).
    Leaks,
    /// Repair everything repairable (`-r all`).
    All,
}

/// Consistency checking (`qemu-img check`), for formats that have metadata to check.
pub trait Check {
    /// Checks the image, repairing according to `repair`; problems are reported through `report`
    /// as qemu-img words them (one message per call, without trailing newline) and counted in the
    /// returned report.
    fn check(&self, repair: RepairMode, report: &mut dyn FnMut(&str)) -> Result<CheckReport>;
}

/// A guest-visible disk. See the module docs for the contracts.
pub trait BlockDriver: Send + Sync + Debug {
    /// The format name as qemu-img prints it (`raw`, `qcow2`, ...).
    fn format(&self) -> &'static str;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// The image's file name as the user gave it (for messages and `info`).
    fn filename(&self) -> &str;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Reads `[offset, offset + len(bufs))` into `bufs`.
    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;

    /// Writes `bufs` at `offset`.
    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()>;

    /// Makes a range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Tells the driver a range is no longer needed; afterwards it reads as zeros or keeps its
    /// content (drivers decide, as qemu's discard does), never anything else.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Describes the start of `[offset, offset + max_len)`.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent>;

    /// Changes the virtual size.
    fn resize(&self, new_size: u64, opts: &ResizeOptions) -> Result<()>;

    /// What `qemu-img info` reports about this image (without backing-chain entries).
    fn info(&self) -> Result<ImageInfo>;

    /// The opened backing image, if any.
    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        None
    }

    /// The main container (the file the image lives in).
    fn storage(&self) -> Option<Arc<dyn Storage>>;

    /// The container whose byte `x` is the guest's byte `x`, for drivers that map 1:1 (raw): lets
    /// the copy engine offload plain runs to `copy_file_range`.
    fn identity_storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }

    /// Whether a freshly created image of this driver reads as zeros everywhere without being
    /// written (lets convert skip writing zeros).
    fn has_zero_init(&self) -> bool {
        false
    }

    /// The allocation unit (cluster, grain, block) when there is one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Flushes and clears dirty/unclean marks. Further I/O is not allowed afterwards.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Consistency checking, if the format has any.
    fn check(&self) -> Option<&dyn Check> {
        None
    }

    /// Compressed cluster writes (`convert -c`), if the format has them.
    fn compressed(&self) -> Option<&dyn CompressedWrite> {
        None
    }

    /// Changing creation options of an existing image (`amend`), if the format can.
    fn amend(&self) -> Option<&dyn Amend> {
        None
    }

    /// Internal snapshots, if the format has them.
    fn snapshots(&self) -> Option<&dyn Snapshots> {
        None
    }

    /// Persistent dirty bitmaps, if the format stores them.
    fn bitmaps(&self) -> Option<&dyn crate::bitmap::PersistentBitmaps> {
        None
    }

    /// Changing the backing file and emptying the image (`rebase`, `commit`), if the format has
    /// backing files.
    fn backing_ops(&self) -> Option<&dyn BackingOps> {
        None
    }
}

/// What is recorded about a new internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotParams {
    /// The tag.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: i64,
    /// Creation time, nanoseconds part.
    pub date_nsec: i64,
    /// The guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// The instruction count at the snapshot, when the VMM records one.
    pub icount: Option<u64>,
}

/// Internal snapshots (`qemu-img snapshot`, and a VMM's savevm/loadvm).
///
/// Snapshot operations wait for writes in flight on the same image and hold off new ones while
/// they run. Reads are not held off: during `apply` and `delete`, which free clusters, the caller
/// must have no reads in flight (a VMM pauses its guest for loadvm and delvm, as QEMU does).
pub trait Snapshots {
    /// The snapshots, in table order.
    fn list(&self) -> Result<Vec<crate::info::SnapshotInfo>>;

    /// Takes a disk-only snapshot called `name` at the given wall-clock time (`qemu-img snapshot
    /// -c`: no VM state, guest clock and instruction count 0).
    fn create(&self, name: &str, date_sec: i64, date_nsec: i64) -> Result<()> {
        let params = SnapshotParams { name: name.to_string(), date_sec, date_nsec, vm_clock_nsec: 0, icount: Some(0) };
        self.save(&params, &[])
    }

    /// Takes a snapshot that also stores `vm_state`, a VMM's saved machine state (`savevm`).
    fn save(&self, params: &SnapshotParams, vm_state: &[u8]) -> Result<()>;

    /// Reverts the disk to the snapshot whose id, else whose name, is `id_or_name`; afterwards
    /// [`Snapshots::read_vm_state`] reads the VM state saved with it (`loadvm`).
    fn apply(&self, id_or_name: &str) -> Result<()>;

    /// Reads VM state bytes at `offset` of the state area of the current disk (after
    /// [`Snapshots::apply`], the state saved with that snapshot; its size is in [`Snapshots::list`]).
    fn read_vm_state(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Deletes the snapshot with this id and this name (either may be `None`, not both).
    fn delete(&self, id: Option<&str>, name: Option<&str>) -> Result<()>;

    /// Shows the snapshot with this id and/or name in place of the current disk, read-only, for
    /// the rest of this open (`convert -l`, `measure -l`). The image must be open read-only. The
    /// disk keeps its current size (as in qemu): past the snapshot's own size it reads zeros.
    fn load_temporarily(&self, id: Option<&str>, name: Option<&str>) -> Result<()>;
}

/// Backing-file operations of formats that have backing files.
pub trait BackingOps {
    /// Records a new backing file name and format (or none) without touching data.
    fn set_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()>;

    /// Drops every allocation of this image so that all reads fall through to the backing file.
    fn make_empty(&self) -> Result<()>;
}

/// Changing an image's options after creation (`qemu-img amend`).
pub trait Amend {
    /// The options `amend` accepts, in the format's order.
    fn amend_options(&self) -> &'static [crate::options::OptionSpec];

    /// Applies the options given in `opts` (only those; the others keep their values).
    /// `progress` receives the share done (0.0 to 1.0); `force` allows risky changes.
    fn amend(&self, opts: &crate::options::CreateOptions, force: bool, progress: &mut dyn FnMut(f32)) -> Result<()>;
}

impl dyn BlockDriver {
    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(offset, &mut [IoSliceMut::new(buf)])
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_at(offset, &[IoSlice::new(buf)])
    }
}

/// Reads `buf.len()` bytes at guest offset `offset` of `backing` as the image above it sees them:
/// bytes past the backing image's end, or all of them without a backing image, read as zeros.
pub fn read_backing(backing: Option<&Arc<dyn BlockDriver>>, offset: u64, buf: &mut [u8]) -> Result<()> {
    match backing {
        Some(b) if offset < b.size() => {
            let n = ((b.size() - offset) as usize).min(buf.len());
            b.read_exact_at(offset, &mut buf[..n])?;
            buf[n..].fill(0);
        }
        _ => buf.fill(0),
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes, with qemu's wording.
pub fn check_request(offset: u64, len: u64, size: u64) -> Result<()> {
    let end = checked_end(offset, len)?;
    if end > size {
        return Err(Error::out_of_range(format!(
            "Request of {len} bytes at offset {offset} reaches past the end of the disk ({size} bytes)"
        ))
        .with_offset(offset));
    }
    Ok(())
}

/// Follows a chain through unallocated extents: the status of `[offset, offset+max_len)` as the
/// guest sees it, with the depth (0 = top image) at which the range was decided. Ranges that no
/// image in the chain allocates come back as `Unallocated` with the depth of the last image.
pub fn chain_status(top: &dyn BlockDriver, offset: u64, max_len: u64) -> Result<(Extent, u32)> {
    let mut ext = top.block_status(offset, max_len)?;
    let mut depth = 0;
    let mut cur = top.backing();
    while ext.kind == ExtentKind::Unallocated {
        let Some(b) = cur else { break };
        depth += 1;
        if offset >= b.size() {
            // Past the end of a shorter backing file: zeros, decided by the layer above.
            ext = Extent::new(ext.len, ExtentKind::Zero);
            break;
        }
        let want = ext.len.min(b.size() - offset);
        ext = b.block_status(offset, want)?;
        cur = b.backing();
    }
    Ok((ext, depth))
}

/// Writing whole clusters compressed (`convert -c`).
///
/// Compression is split from storing so that callers can compress many clusters in parallel and
/// still store them in order: [`CompressedWrite::compress`] is pure computation and thread-safe;
/// [`CompressedWrite::write_compressed`] allocates and writes.
pub trait CompressedWrite: Send + Sync {
    /// The unit of compressed writes (the cluster size).
    fn compressed_unit(&self) -> u64;

    /// Compresses one unit of guest data (exactly `compressed_unit` bytes); `None` when the result
    /// would not be smaller, in which case the data is stored uncompressed.
    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Stores one unit at guest `offset` (unit-aligned, not yet allocated): `compressed` bytes if
    /// given, else `data` uncompressed.
    fn write_compressed(&self, offset: u64, data: &[u8], compressed: Option<&[u8]>) -> Result<()>;

    /// Ends a series of compressed writes (qcow2 pads its file to a whole sector, as qemu does).
    fn finish_compressed(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the image takes data only as compressed units (streamOptimized VMDK): `convert`
    /// then writes compressed without `-c`, as qemu-img does.
    fn compression_required(&self) -> bool {
        false
    }
}
