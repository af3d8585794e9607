//! vdisk's block layer core. It knows no image format.
//!
//! Two seams carry everything:
//! - [`Storage`]: bytes in a container (a local [`HostFile`] today; network exports and test
//!   doubles such as [`MemStorage`] plug in the same way);
//! - [`BlockDriver`]: a guest-visible disk, i.e. a format on top of one or more storages.
//!
//! Around them: [`Error`] (one error type with a matchable [`ErrorKind`] and context), opening and
//! chains ([`OpenOptions`], [`Opener`], [`Format`], [`ReferencePolicy`]), `-o` option lists
//! ([`options`]), qemu-compatible sizes ([`size`]) and structured output ([`qobject`]), and the
//! [`copy`] engine used by convert, dd, commit and rebase.
//!
//! Every trait method may be called from many threads at once; implementations serialise only
//! what must be serialised and never hold a lock across data I/O.

pub mod bitmap;
pub mod buffer;
pub mod compare;
mod concat;
pub mod copy;
pub mod crypto;
mod driver;
mod error;
mod host_file;
pub mod info;
pub mod mapped;
mod mem;
mod open;
pub mod options;
pub mod protocol;
pub mod qobject;
pub mod range_lock;
pub mod size;
mod storage;

pub use concat::Concat;
pub use driver::{
    chain_status, check_request, read_backing, Amend, BackingOps, BlockDriver, Check, CompressedWrite, Extent,
    ExtentKind, RepairMode, ResizeOptions, SnapshotParams, Snapshots, ZeroFlags,
};
pub use error::{io_text, Context, Error, ErrorKind, Result};
pub use host_file::{CacheMode, HostFile, HostOpenOptions, Perms};
pub use info::{CheckReport, ImageInfo, Measure, SnapshotInfo};
pub use mem::MemStorage;
pub use open::{
    check_reference, delete_on_error, resolve_reference, Chain, Diagnostics, DiscardOptions, Format,
    MetadataCacheSizes, OpenOptions, Opener, ReferencePolicy, DEFAULT_MAX_CHAIN_DEPTH,
};
pub use protocol::{has_protocol_prefix, Protocol};
pub use storage::{
    checked_end, iov_len, iov_len_mut, read_exact_at, with_contiguous_mut, write_all_at, Alignment, Prealloc, Storage,
};
