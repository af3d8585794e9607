//! The hosted sparse extent header (`KDMV`, little-endian, sizes in 512-byte sectors), its
//! validation against the file and vdisk's limits, and its encoding.

use blockdev::{Error, Result};

/// `KDMV`.
pub const MAGIC: u32 = 0x564D_444B;
/// Sector size of every offset and size in the header.
pub const SECTOR: u64 = 512;
/// `gdOffset` of a streamOptimized header whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;

/// Flag: the newline-detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: grain table entry 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: the file has markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;

/// `compressAlgorithm` deflate.
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Largest grain qemu accepts (1 GiB), in sectors.
pub const MAX_GRAIN_SECTORS: u64 = 2 << 20;
/// Most grain directory entries qemu accepts.
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Most entries per grain table qemu accepts.
pub const MAX_GTES: u32 = 512;

/// A parsed sparse extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// Format version, 1 to 3.
    pub version: u32,
    /// Flags (`FLAG_*`).
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors (a power of two).
    pub grain_sectors: u64,
    /// Sector of the embedded descriptor (0 if none).
    pub desc_offset: u64,
    /// Sectors reserved for the embedded descriptor.
    pub desc_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory ([`GD_AT_END`]: in the footer).
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    /// Unclean-shutdown flag.
    pub unclean: bool,
    /// `compressAlgorithm`.
    pub compression: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SparseHeader {
    /// Parses the first 512 bytes of a sparse extent (the magic already matched or not).
    pub fn parse(b: &[u8]) -> Result<SparseHeader> {
        if b.len() < 512 || le32(b, 0) != MAGIC {
            return Err(Error::invalid_image("Not a VMDK sparse extent (bad magic)"));
        }
        Ok(SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_sectors: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean: b[72] != 0,
            compression: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    /// The 512-byte encoding.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = self.unclean as u8;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compression.to_le_bytes());
        b
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Bytes of guest data one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        self.grain_bytes() * self.gtes_per_gt as u64
    }

    /// Entries in the grain directory.
    pub fn gd_entries(&self) -> u64 {
        self.capacity.div_ceil(self.grain_sectors * self.gtes_per_gt as u64)
    }

    /// Whether grains are compressed.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Whether grain table entry 1 means a zeroed grain.
    pub fn zeroed_grains(&self) -> bool {
        self.version >= 2 && self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Checks the fields against vdisk's (qemu's) limits, with qemu's messages where it has
    /// them. Offsets pointing past the file are checked where the tables are read.
    pub fn validate(&self, name: &str) -> Result<()> {
        if self.version > 3 {
            return Err(Error::unsupported(format!("Unsupported VMDK version {}", self.version)));
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES {
            return Err(Error::invalid_image("L2 table size too big"));
        }
        if self.grain_sectors == 0 || !self.grain_sectors.is_power_of_two() || self.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(Error::invalid_image(format!("Invalid granularity, image may be corrupt: {name}")));
        }
        if self.gd_entries() > MAX_GD_ENTRIES {
            return Err(Error::invalid_image("L1 size too big"));
        }
        if self.capacity.checked_mul(SECTOR).is_none_or(|b| b > (1u64 << 62)) {
            return Err(Error::invalid_image("Image size too large"));
        }
        if self.compressed() && self.compression != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(format!("Unsupported VMDK compression algorithm {}", self.compression)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_validates() {
        let h = SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 204800,
            grain_sectors: 128,
            desc_offset: 1,
            desc_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 38,
            overhead: 128,
            unclean: false,
            compression: 0,
        };
        assert_eq!(SparseHeader::parse(&h.encode()).unwrap(), h);
        h.validate("x").unwrap();
        assert_eq!(h.gd_entries(), 4);
        for bad in [
            SparseHeader { version: 4, ..h.clone() },
            SparseHeader { grain_sectors: 3, ..h.clone() },
            SparseHeader { grain_sectors: 4 << 20, ..h.clone() },
            SparseHeader { gtes_per_gt: 4096, ..h.clone() },
            SparseHeader { capacity: u64::MAX / 256, ..h.clone() },
        ] {
            assert!(bad.validate("x").is_err(), "{bad:?}");
        }
    }
}
