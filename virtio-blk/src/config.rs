//! virtio-blk feature bits and the device configuration space (virtio 1.2, section 5.2), all
//! little-endian.

/// Maximum size of one segment (`size_max`) is given.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// Maximum number of segments in a request (`seg_max`) is given.
pub const F_SEG_MAX: u64 = 1 << 2;
/// The device is read-only.
pub const F_RO: u64 = 1 << 5;
/// The logical block size (`blk_size`) is given.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// FLUSH is supported.
pub const F_FLUSH: u64 = 1 << 9;
/// The topology fields are given.
pub const F_TOPOLOGY: u64 = 1 << 10;
/// More than one request queue (`num_queues`).
pub const F_MQ: u64 = 1 << 12;
/// DISCARD is supported.
pub const F_DISCARD: u64 = 1 << 13;
/// WRITE_ZEROES is supported.
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// Indirect descriptors.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// Used/available event index notification suppression.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// Virtio 1.0 or later (modern device).
pub const F_VERSION_1: u64 = 1 << 32;

/// Bytes of the configuration space this device presents (up to `write_zeroes_may_unmap` and
/// its padding).
pub const CONFIG_LEN: usize = 60;

/// The limits and sizes the configuration space reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Most segments (data descriptors) in a request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks (the image's cluster size, when it has one).
    pub opt_io_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Most segments in one DISCARD request.
    pub max_discard_seg: u32,
    /// Alignment of discards, in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may deallocate (the unmap flag is honoured).
    pub write_zeroes_may_unmap: bool,
}

impl DeviceConfig {
    /// The configuration space bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8) unused: no F_SIZE_MAX.
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // geometry (16..20) unused: no F_GEOMETRY.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment_offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = 1; // writeback (no F_CONFIG_WCE: informational)
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap as u8;
        b
    }
}
