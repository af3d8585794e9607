//! Limits that keep hostile images from costing unbounded memory or time.
//!
//! Every count and size read from an image is checked against these before anything is allocated
//! or read. Limits that are not qcow2's own: the backing chain depth
//! ([`blockdev::DEFAULT_MAX_CHAIN_DEPTH`]) and the clusters `check` keeps counters for
//! (`MAX_IMRT_CLUSTERS` in the check module). The values match QEMU's implementation limits, so every image QEMU accepts is
//! accepted here and every image QEMU refuses for size reasons is refused with the same words.

/// Smallest cluster size: 2^9 = 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size: 2^21 = 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest active or snapshot L1 table, in bytes (32 MiB = 4M entries).
pub const MAX_L1_SIZE: u64 = 32 << 20;
/// Largest refcount table, in bytes (8 MiB = 1M refcount blocks).
pub const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Largest host offset a cluster may have (56 bits).
pub const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// Longest backing file name, in bytes.
pub const MAX_BACKING_NAME: u64 = 1023;
/// A compressed cluster is read as at most one cluster plus this many bytes, whatever size its
/// L2 entry claims: a compressor never needs more (qemu writes at most a cluster, and the
/// descriptor's sector count can overstate that by less than a sector).
pub const MAX_COMPRESSED_SLACK: u64 = 512;
/// Largest zstd window a compressed cluster may ask for (2^22 bytes): twice the largest cluster,
/// so a hostile frame cannot make the decoder allocate its default 128 MiB.
pub const ZSTD_MAX_WINDOW_LOG: u32 = MAX_CLUSTER_BITS + 1;
/// Cluster frees queued before a write flushes metadata by itself (frees wait for the flush that
/// makes the L2 change dropping the reference durable; this bounds the queue when the guest never
/// flushes).
pub const MAX_QUEUED_FREES: usize = 1024;
/// Default L2 cache budget in bytes (enough for 256 GiB of 64 KiB clusters); qemu's default.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Default refcount cache budget in bytes.
pub const DEFAULT_REFCOUNT_CACHE_BYTES: u64 = 4 << 20;
/// At least this many tables stay cached, whatever the budget.
pub const MIN_CACHE_TABLES: usize = 4;
/// Largest virtual size vdisk creates or resizes to: what an L1 table of `MAX_L1_SIZE` can map
/// is checked separately; this is the absolute cap (2^63 - 512 like qemu's int64 byte counts).
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !511;
/// Largest extra data of one snapshot table entry, known and unknown fields together.
pub const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// Largest snapshot table in bytes.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS;
/// Largest number of persistent bitmaps in an image (qemu's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory, in bytes (1 KiB per bitmap).
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Largest bitmap table, in entries.
pub const MAX_BITMAP_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap data, in bytes (its table's clusters): bounds the memory a loaded bitmap takes.
pub const MAX_BITMAP_DATA_BYTES: u64 = 0x2000_0000;
/// Granularity bits qemu accepts for a bitmap (512 B to 2 GiB).
pub const BITMAP_GRANULARITY_BITS: std::ops::RangeInclusive<u32> = 9..=31;
/// Longest bitmap name, in bytes.
pub const MAX_BITMAP_NAME: usize = 1023;
/// Separate guest ranges the enabled bitmaps record in memory before they are stored and start
/// over (about 64 MiB at most; a guest writing sequentially needs one).
pub const MAX_RECORDED_RANGES: usize = 1 << 20;
