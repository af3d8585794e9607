//! L1 and L2 table entries: decoding and encoding.
//!
//! An L2 entry describes one guest cluster: unallocated, zero (with or without a preallocated host
//! cluster), a normal host cluster (with the "copied" flag meaning its refcount is exactly one), or
//! a compressed run of 512-byte sectors. With extended L2 entries each cluster has 32 subclusters
//! whose allocation and zero state come from a second 64-bit word; [`Geometry::subcluster`] folds both
//! encodings into one [`Sub`] status so the I/O paths need not care which one the image uses.

/// Bits 9..55 of L1 and standard L2 entries: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one (valid in the active tables).
pub const COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (standard L2 entries of version 3 only).
pub const ZERO: u64 = 1;
/// L1 bits that must be zero.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 bits that must be zero (besides the zero flag).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Sizes that follow from the cluster size and the entry format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries.
    pub extended: bool,
    /// External data file: offset 0 with COPIED is a valid mapping.
    pub data_file: bool,
}

/// What one subcluster (or, without extended L2, one cluster) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Data at this host cluster offset (the subcluster's bytes are at the same position inside).
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// Refcount is known to be one (write in place).
        copied: bool,
    },
    /// Reads as zeros; `host` is a preallocated cluster if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<u64>,
    },
    /// Not allocated here: read the backing file (or zeros); `host` is the cluster's host offset when
    /// the cluster has one (other subclusters allocated).
    Unallocated {
        /// Host cluster of the surrounding cluster.
        host: Option<u64>,
    },
    /// Compressed data.
    Compressed {
        /// Host byte offset of the compressed data (not aligned).
        offset: u64,
        /// Bytes to read (whole sectors from `offset`'s sector).
        size: u64,
    },
    /// The entry breaks the format's rules.
    Invalid(&'static str),
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Subclusters per cluster (32 with extended L2, else 1).
    pub fn subclusters(&self) -> u64 {
        if self.extended {
            32
        } else {
            1
        }
    }

    /// Subcluster size in bytes.
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters()
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Bit position of the sector count in compressed entries.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes a compressed entry into (host byte offset, bytes to read).
    pub fn compressed(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let offset = entry & ((1u64 << shift) - 1);
        let mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let sectors = ((entry >> shift) & mask) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Encodes a compressed entry for `len` bytes of compressed data at host byte `offset`.
    /// `None` if the data does not fit the entry's sector count or the offset its bits.
    pub fn encode_compressed(&self, offset: u64, len: u64) -> Option<u64> {
        let shift = self.csize_shift();
        if len == 0 || offset >= 1 << shift {
            return None;
        }
        let last_sector = (offset + len - 1) / 512;
        let extra = last_sector - offset / 512;
        if extra > (1u64 << (self.cluster_bits - 8)) - 1 {
            return None;
        }
        Some(COMPRESSED | (extra << shift) | offset)
    }

    /// The status of subcluster `index` of a cluster with L2 entry `entry` and (for extended L2)
    /// bitmap `bitmap`.
    pub fn subcluster(&self, entry: u64, bitmap: u64, index: u32) -> Sub {
        if entry & COMPRESSED != 0 {
            if self.extended && bitmap != 0 {
                return Sub::Invalid("compressed cluster with a non-zero subcluster bitmap");
            }
            let (offset, size) = self.compressed(entry);
            return Sub::Compressed { offset, size };
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        let has_host = host != 0 || (self.data_file && copied);
        if !self.extended {
            return match (entry & ZERO != 0, has_host) {
                (true, true) => Sub::Zero { host: Some(host) },
                (true, false) => Sub::Zero { host: None },
                (false, true) => Sub::Data { host, copied },
                (false, false) => Sub::Unallocated { host: None },
            };
        }
        let alloc = bitmap & (1 << index) != 0;
        let zero = bitmap & (1 << (32 + index)) != 0;
        match (has_host, alloc, zero) {
            (_, true, true) => Sub::Invalid("subcluster both allocated and zero"),
            (true, true, false) => Sub::Data { host, copied },
            (true, false, true) => Sub::Zero { host: Some(host) },
            (true, false, false) => Sub::Unallocated { host: Some(host) },
            (false, true, _) => Sub::Invalid("allocated subcluster in an unallocated cluster"),
            (false, false, true) => Sub::Zero { host: None },
            (false, false, false) => Sub::Unallocated { host: None },
        }
    }
}

/// Bitmap value for subclusters `[first, first+count)` (bits 0..31 of a 64-bit word).
pub fn sub_mask(first: u32, count: u32) -> u64 {
    if count == 0 {
        return 0;
    }
    let m = if count >= 32 { 0xffff_ffffu64 } else { (1u64 << count) - 1 };
    (m << first) & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry { cluster_bits: 16, extended: false, data_file: false };
    const X: Geometry = Geometry { cluster_bits: 16, extended: true, data_file: false };

    #[test]
    fn standard_entries() {
        assert_eq!(G.subcluster(0, 0, 0), Sub::Unallocated { host: None });
        assert_eq!(G.subcluster(ZERO, 0, 0), Sub::Zero { host: None });
        assert_eq!(G.subcluster(ZERO | 0x50000, 0, 0), Sub::Zero { host: Some(0x50000) });
        assert_eq!(G.subcluster(COPIED | 0x50000, 0, 0), Sub::Data { host: 0x50000, copied: true });
        let df = Geometry { data_file: true, ..G };
        assert_eq!(df.subcluster(COPIED, 0, 0), Sub::Data { host: 0, copied: true });
    }

    #[test]
    fn compressed_entries_round_trip() {
        // 64 KiB clusters: the sector count starts at bit 54.
        let e = G.encode_compressed(0x12345, 3000).unwrap();
        assert_eq!(e >> 54 & 0xff, (0x12345 + 3000 - 1) / 512 - 0x12345 / 512);
        let (off, size) = G.compressed(e);
        assert_eq!(off, 0x12345);
        assert!((3000..3000 + 512).contains(&size));
        assert!(G.encode_compressed(1 << 54, 10).is_none());
        let small = Geometry { cluster_bits: 9, extended: false, data_file: false };
        assert!(small.encode_compressed(0, 1024).is_some());
        assert!(small.encode_compressed(0, 1025).is_none(), "512-byte clusters hold two sectors at most");
    }

    #[test]
    fn extended_entries() {
        let host = 0x70000;
        let bm = sub_mask(0, 2) | (sub_mask(2, 1) << 32);
        assert_eq!(X.subcluster(host, bm, 0), Sub::Data { host, copied: false });
        assert_eq!(X.subcluster(host, bm, 2), Sub::Zero { host: Some(host) });
        assert_eq!(X.subcluster(host, bm, 3), Sub::Unallocated { host: Some(host) });
        assert!(matches!(X.subcluster(0, 1, 0), Sub::Invalid(_)));
        assert!(matches!(X.subcluster(host, 1 | (1 << 32), 0), Sub::Invalid(_)));
        assert_eq!(X.l2_entries(), 4096);
        assert_eq!(sub_mask(30, 5), 0xc000_0000);
        assert_eq!(sub_mask(0, 32), 0xffff_ffff);
    }
}
