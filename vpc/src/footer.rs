//! VHD on-disk structures (all big-endian): the 512-byte footer (kept at the end of every VHD and,
//! for dynamic and differencing disks, copied at offset 0), the 1024-byte dynamic disk header,
//! its parent locators, and the CHS geometry of the specification.
//!
//! Parsing never trusts a field: checksums are verified by the caller choosing between the two
//! footer copies, and every size and offset is checked against limits in [`DynamicHeader::validate`]
//! and by the opener against the file.

use blockdev::{Error, Result};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic header's cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk types.
pub const TYPE_FIXED: u32 = 2;
/// A dynamic (sparse) disk.
pub const TYPE_DYNAMIC: u32 = 3;
/// A differencing disk (sparse, over a parent).
pub const TYPE_DIFFERENCING: u32 = 4;
/// Largest geometry the CHS fields can express (cylinders x heads x sectors).
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Largest disk qemu creates and opens: 2040 GiB.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// Most block allocation table entries vdisk reads (64 MiB of table; 2040 GiB in 2 MiB blocks
/// needs about a million).
pub const MAX_TABLE_ENTRIES: u64 = 16 << 20;
/// Largest block size vdisk accepts (the specification's default is 2 MiB).
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The one's complement of the byte sum of `b`, the checksum field (at `at`) counted as zero.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b.iter().enumerate().filter(|(i, _)| !(at..at + 4).contains(i)).map(|(_, &v)| v as u32);
    !sum.fold(0u32, u32::wrapping_add)
}

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header (all ones for fixed disks).
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// The creating application (`vpc `, `qemu`, `qem2`, `win `...).
    pub creator_app: [u8; 4],
    /// The creating application's version.
    pub creator_version: u32,
    /// The creating host OS (`Wi2k`, `Mac `).
    pub creator_os: [u8; 4],
    /// Size at creation, in bytes.
    pub original_size: u64,
    /// Current size, in bytes.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// `TYPE_FIXED`, `TYPE_DYNAMIC` or `TYPE_DIFFERENCING`.
    pub disk_type: u32,
    /// The stored checksum.
    pub checksum: u32,
    /// The disk's identity.
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

impl Footer {
    /// Parses 512 bytes; `None` if the cookie is not there.
    pub fn parse(b: &[u8]) -> Option<Footer> {
        if b.len() < 512 || &b[..8] != FOOTER_COOKIE {
            return None;
        }
        Some(Footer {
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().expect("4 bytes"),
            creator_version: be32(b, 32),
            creator_os: b[36..40].try_into().expect("4 bytes"),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: (be16(b, 56), b[58], b[59]),
            disk_type: be32(b, 60),
            checksum: be32(b, 64),
            uuid: b[68..84].try_into().expect("16 bytes"),
            saved_state: b[84],
        })
    }

    /// Whether the stored checksum matches the bytes `b` it was parsed from.
    pub fn checksum_ok(b: &[u8]) -> bool {
        b.len() >= 512 && checksum(&b[..512], 64) == be32(b, 64)
    }

    /// The 512 bytes, with a fresh checksum.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes());
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Sectors the CHS geometry covers.
    pub fn chs_sectors(&self) -> u64 {
        self.geometry.0 as u64 * self.geometry.1 as u64 * self.geometry.2 as u64
    }

    /// The disk size, by qemu 10's rule: Virtual PC (`vpc `) and qemu (`qemu`) size disks by
    /// their CHS geometry unless it is the largest one; every other creator (Hyper-V, Azure,
    /// VirtualBox, qemu's `qem2` for force_size...) by the current size.
    pub fn disk_size(&self) -> u64 {
        let by_chs = matches!(&self.creator_app, b"vpc " | b"qemu") && self.chs_sectors() != MAX_CHS_SECTORS;
        if by_chs {
            self.chs_sectors() * SECTOR
        } else {
            self.current_size
        }
    }
}

/// A parent locator entry of a differencing disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    /// Platform code (`W2ku`, `W2ru`, `Wi2k`, `Wi2r`, `MacX`, `Mac `).
    pub code: [u8; 4],
    /// Bytes of locator data used.
    pub data_len: u32,
    /// Where the data is, in bytes.
    pub data_offset: u64,
}

/// A parsed dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Offset of the block allocation table, in bytes.
    pub table_offset: u64,
    /// Entries in the block allocation table.
    pub max_table_entries: u32,
    /// Bytes of data per block.
    pub block_size: u32,
    /// The parent's identity (differencing disks).
    pub parent_uuid: [u8; 16],
    /// The parent's modification time.
    pub parent_timestamp: u32,
    /// The parent's name (UTF-16BE in the file).
    pub parent_name: String,
    /// Parent locators in use.
    pub locators: Vec<Locator>,
}

impl DynamicHeader {
    /// Parses 1024 bytes; fails if the cookie is wrong. The checksum is checked by
    /// [`DynamicHeader::checksum_ok`] (after the limits, so that hostile headers get qemu's
    /// messages).
    pub fn parse(b: &[u8]) -> Result<DynamicHeader> {
        if b.len() < 1024 || &b[..8] != HEADER_COOKIE {
            return Err(Error::invalid_image("VHD dynamic header not found (bad cookie)"));
        }
        let units: Vec<u16> = b[64..576].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        let parent_name = String::from_utf16_lossy(&units[..end]);
        let locators = (0..8)
            .map(|i| {
                let e = &b[576 + i * 24..600 + i * 24];
                Locator { code: e[..4].try_into().expect("4 bytes"), data_len: be32(e, 8), data_offset: be64(e, 16) }
            })
            .filter(|l| l.code != [0; 4] && l.data_len > 0)
            .collect();
        Ok(DynamicHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_uuid: b[40..56].try_into().expect("16 bytes"),
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    /// Whether the stored checksum matches the 1024 bytes `b`.
    pub fn checksum_ok(b: &[u8]) -> bool {
        b.len() >= 1024 && checksum(&b[..1024], 36) == be32(b, 36)
    }

    /// The 1024 bytes of a header without parent, with a fresh checksum.
    pub fn encode(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Checks the fields against vdisk's limits and the disk size; returns the bytes of a block's
    /// sector bitmap (rounded up to whole sectors).
    pub fn validate(&self, disk_size: u64, file_len: u64) -> Result<u64> {
        let bs = self.block_size as u64;
        if !bs.is_power_of_two() || !(SECTOR..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(Error::invalid_image(format!("Invalid block size {bs}")));
        }
        let entries = self.max_table_entries as u64;
        if entries > MAX_TABLE_ENTRIES {
            return Err(Error::invalid_image(format!("Max Table Entries too large ({entries})")));
        }
        if entries * bs < disk_size {
            return Err(Error::invalid_image("Page table too small"));
        }
        let table_end = self.table_offset.checked_add(entries * 4);
        if table_end.is_none_or(|e| e > file_len) {
            return Err(Error::invalid_image("Block allocation table lies outside the file"));
        }
        Ok((bs / SECTOR).div_ceil(8).next_multiple_of(SECTOR))
    }
}

/// The specification's CHS geometry for a disk of `sectors` (at most the largest geometry):
/// (cylinders, heads, sectors per track).
pub fn geometry(sectors: u64) -> (u16, u8, u8) {
    let ts = sectors.min(MAX_CHS_SECTORS);
    let (spt, heads, per_track_heads) = if ts >= 65535 * 16 * 63 {
        (255u64, 16u64, ts / 255)
    } else {
        let mut spt = 17;
        let mut cth = ts / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = ts / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = ts / spt;
        }
        (spt, heads, cth)
    };
    ((per_track_heads / heads) as u16, heads as u8, spt as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_specification_examples() {
        // qemu-img create -f vpc 100M: 1004 cylinders, 12 heads, 17 sectors (104,865,792 bytes
        // once the size is raised to cover it).
        assert_eq!(geometry(204_816), (1004, 12, 17));
        assert_eq!(geometry(MAX_CHS_SECTORS), (65535, 16, 255));
        assert_eq!(geometry(u64::MAX), (65535, 16, 255));
    }

    #[test]
    fn footer_round_trips_with_its_checksum() {
        let f = Footer {
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"qemu",
            creator_version: 0x0005_0003,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: (30, 4, 17),
            disk_type: TYPE_DYNAMIC,
            checksum: 0,
            uuid: [9; 16],
            saved_state: 0,
        };
        let b = f.encode();
        assert!(Footer::checksum_ok(&b));
        let back = Footer::parse(&b).unwrap();
        assert_eq!(back.current_size, f.current_size);
        assert_eq!(back.disk_size(), 30 * 4 * 17 * 512);
        let mut bad = b;
        bad[100] ^= 1;
        assert!(!Footer::checksum_ok(&bad));
    }
}
