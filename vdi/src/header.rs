//! The VDI header (little-endian, at offset 0) and its validation.
//!
//! Layout: a 64-byte text banner, the signature `0xBEDA107F` at 64, the version at 68, then the
//! version 1.1 header proper whose size is `cbHeader` (qemu writes 384, VirtualBox 400 with the
//! logical geometry). The fields vdisk uses are decoded into [`Header`]; the raw first sector is
//! kept so that nothing vdisk does not understand is lost when it rewrites `blocksAllocated`,
//! the only field it ever changes in an existing image.
//!
//! [`Header::validate`] checks every field that a read or write depends on against qemu's limits
//! (with qemu's messages) and then against the file itself (vdisk's own, stricter checks: the
//! block map and the data area must lie inside the file and must not overlap the header or
//! each other; the block count must be the one the disk size needs).

use blockdev::{Error, Result};

/// The signature at offset 64.
pub const SIGNATURE: u32 = 0xBEDA_107F;
/// Version 1.1, the only one qemu and VirtualBox write.
pub const VERSION: u32 = 0x0001_0001;
/// `cbHeader` as qemu writes it.
pub const HEADER_SIZE: u32 = 384;
/// The banner qemu writes.
pub const QEMU_TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Image type: dynamic (blocks allocated on write).
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: fixed (every block allocated at creation).
pub const TYPE_STATIC: u32 = 2;
/// Image type: differencing (free blocks read from the parent named by `uuidLinkage`).
pub const TYPE_DIFFERENCING: u32 = 4;
/// The only block size qemu (and vdisk) accepts: 1 MiB.
pub const BLOCK_SIZE: u32 = 1 << 20;
/// Sector size recorded in the legacy geometry.
pub const SECTOR: u32 = 512;
/// Block map entry: block not allocated (reads as zeros, or from the parent).
pub const ENTRY_FREE: u32 = 0xFFFF_FFFF;
/// Block map entry: block reads as zeros.
pub const ENTRY_ZERO: u32 = 0xFFFF_FFFE;
/// Most blocks qemu accepts in an image.
pub const MAX_BLOCKS: u32 = 0x1FFF_FF80;
/// Largest virtual size qemu accepts.
pub const MAX_DISK_SIZE: u64 = MAX_BLOCKS as u64 * BLOCK_SIZE as u64;
/// End of the fields of a version 1.1 header with `cbHeader` 384 (72 + 384).
pub const HEADER_END: u64 = 456;
/// Largest `blockExtra` vdisk accepts (qemu writes 0).
pub const MAX_BLOCK_EXTRA: u32 = 1 << 20;

/// Byte offset of `blocksAllocated`.
pub const OFF_BLOCKS_ALLOCATED: u64 = 388;

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The first 512 bytes as read (zero-padded for short files).
    pub raw: [u8; 512],
    /// Signature (must be [`SIGNATURE`]).
    pub signature: u32,
    /// Version, major in the high 16 bits.
    pub version: u32,
    /// `cbHeader`.
    pub header_size: u32,
    /// Image type (1 dynamic, 2 static, 3 undo, 4 differencing).
    pub image_type: u32,
    /// Byte offset of the block map.
    pub off_blocks: u32,
    /// Byte offset of the data area.
    pub off_data: u32,
    /// Sector size in the legacy geometry.
    pub sector_size: u32,
    /// Virtual size in bytes.
    pub disk_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Bytes stored before each block's data.
    pub block_extra: u32,
    /// Blocks in the image (entries in the block map).
    pub blocks: u32,
    /// Blocks with data in the data area.
    pub blocks_allocated: u32,
    /// UUID given at creation.
    pub uuid_create: [u8; 16],
    /// UUID of the last modification.
    pub uuid_modify: [u8; 16],
    /// Create UUID of the parent (differencing images).
    pub uuid_link: [u8; 16],
    /// Modify UUID of the parent (differencing images).
    pub uuid_parent_modify: [u8; 16],
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn uuid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[at..at + 16]);
    u
}

fn unsupported(what: String) -> Error {
    Error::unsupported(format!("unsupported VDI image ({what})"))
}

impl Header {
    /// Decodes `head` (the start of the file; missing bytes read as zeros, as qemu reads them).
    pub fn parse(head: &[u8]) -> Header {
        let mut raw = [0u8; 512];
        let n = head.len().min(512);
        raw[..n].copy_from_slice(&head[..n]);
        let b = &raw;
        Header {
            raw,
            signature: u32_at(b, 64),
            version: u32_at(b, 68),
            header_size: u32_at(b, 72),
            image_type: u32_at(b, 76),
            off_blocks: u32_at(b, 340),
            off_data: u32_at(b, 344),
            sector_size: u32_at(b, 360),
            disk_size: u64::from_le_bytes(b[368..376].try_into().expect("8 bytes")),
            block_size: u32_at(b, 376),
            block_extra: u32_at(b, 380),
            blocks: u32_at(b, 384),
            blocks_allocated: u32_at(b, 388),
            uuid_create: uuid_at(b, 392),
            uuid_modify: uuid_at(b, 408),
            uuid_link: uuid_at(b, 424),
            uuid_parent_modify: uuid_at(b, 440),
        }
    }

    /// Checks the header against qemu's limits and against a file of `file_len` bytes.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        if self.signature != SIGNATURE {
            return Err(Error::invalid_image(format!(
                "Image not in VDI format (bad signature {:08x})",
                self.signature
            )));
        }
        if self.version >> 16 != 1 {
            return Err(unsupported(format!("version {}.{}", self.version >> 16, self.version & 0xffff)));
        }
        if self.off_blocks % SECTOR != 0 {
            return Err(unsupported(format!("unaligned block map offset 0x{:x}", self.off_blocks)));
        }
        if self.off_data % SECTOR != 0 {
            return Err(unsupported(format!("unaligned data offset 0x{:x}", self.off_data)));
        }
        if self.sector_size != SECTOR {
            return Err(unsupported(format!("sector size {} is not {SECTOR}", self.sector_size)));
        }
        if self.block_size != BLOCK_SIZE {
            return Err(unsupported(format!("block size {} is not {BLOCK_SIZE}", self.block_size)));
        }
        if self.disk_size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "Unsupported VDI image size (size is 0x{:x}, max supported is 0x{MAX_DISK_SIZE:x})",
                self.disk_size
            )));
        }
        let room = self.blocks as u64 * self.block_size as u64;
        if self.disk_size > room {
            return Err(unsupported(format!("disk size {}, image bitmap has room for {room}", self.disk_size)));
        }
        if self.blocks > MAX_BLOCKS {
            return Err(unsupported(format!("too many blocks {}, max is {MAX_BLOCKS}", self.blocks)));
        }
        // qemu refuses every image with parent UUIDs; vdisk opens differencing images with
        // their parent and keeps qemu's messages for the others.
        if self.is_differencing() {
            if self.uuid_link == [0; 16] {
                return Err(unsupported("differencing image without a parent UUID".into()));
            }
        } else if self.uuid_link != [0; 16] {
            return Err(unsupported("non-NULL link UUID".into()));
        } else if self.uuid_parent_modify != [0; 16] {
            return Err(unsupported("non-NULL parent UUID".into()));
        }
        // vdisk's own checks: what the block map and data area need from the file.
        let needed = self.disk_size.div_ceil(self.block_size as u64);
        if self.blocks as u64 != needed {
            return Err(unsupported(format!(
                "{} blocks for a disk of {} bytes, expected {needed}",
                self.blocks, self.disk_size
            )));
        }
        if self.block_extra % SECTOR != 0 || self.block_extra > MAX_BLOCK_EXTRA {
            return Err(unsupported(format!("block extra data size {} is not supported", self.block_extra)));
        }
        if (self.off_blocks as u64) < HEADER_END {
            return Err(unsupported(format!("block map offset 0x{:x} lies inside the header", self.off_blocks)));
        }
        let map_end = self.map_end();
        if map_end > file_len {
            return Err(Error::invalid_image(format!(
                "VDI block map ({} entries at 0x{:x}) reaches past the end of the file ({file_len} bytes)",
                self.blocks, self.off_blocks
            )));
        }
        if (self.off_data as u64) < map_end {
            return Err(unsupported(format!(
                "data offset 0x{:x} overlaps the block map ending at 0x{map_end:x}",
                self.off_data
            )));
        }
        if self.off_data as u64 > file_len {
            return Err(Error::invalid_image(format!(
                "VDI data offset 0x{:x} lies past the end of the file ({file_len} bytes)",
                self.off_data
            )));
        }
        Ok(())
    }

    /// Whether free blocks read from a parent image.
    pub fn is_differencing(&self) -> bool {
        self.image_type == TYPE_DIFFERENCING
    }

    /// First byte after the block map.
    pub fn map_end(&self) -> u64 {
        self.off_blocks as u64 + self.blocks as u64 * 4
    }

    /// Bytes one block takes in the data area (extra data and data).
    pub fn block_stride(&self) -> u64 {
        self.block_extra as u64 + self.block_size as u64
    }

    /// File offset of the data of the block stored at index `index` of the data area.
    pub fn data_offset(&self, index: u32) -> u64 {
        self.off_data as u64 + index as u64 * self.block_stride() + self.block_extra as u64
    }
}

/// The identity of a differencing image's parent: its create and modify UUIDs (file byte order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentIds {
    /// The parent's `uuidCreate` (the child's `uuidLinkage`).
    pub create: [u8; 16],
    /// The parent's `uuidModify` (the child's `uuidParentModify`).
    pub modify: [u8; 16],
}

/// The header of a new image of `disk_size` bytes (a multiple of 512) in qemu's layout: block
/// map at 512, data after the map rounded up to a sector. `uuids` are the create and modify
/// UUIDs in the file's byte order; with `parent` the image is a differencing one.
pub fn new_header(disk_size: u64, fixed: bool, uuids: [[u8; 16]; 2], parent: Option<ParentIds>) -> [u8; 512] {
    let blocks = disk_size.div_ceil(BLOCK_SIZE as u64) as u32;
    let map_bytes = (blocks as u64 * 4).next_multiple_of(SECTOR as u64);
    let mut h = [0u8; 512];
    h[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT);
    let mut put = |at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(64, SIGNATURE);
    put(68, VERSION);
    put(72, HEADER_SIZE);
    put(
        76,
        match (parent, fixed) {
            (Some(_), _) => TYPE_DIFFERENCING,
            (None, true) => TYPE_STATIC,
            (None, false) => TYPE_DYNAMIC,
        },
    );
    put(340, 512);
    put(344, (512 + map_bytes) as u32);
    put(360, SECTOR);
    put(376, BLOCK_SIZE);
    put(384, blocks);
    put(388, if fixed { blocks } else { 0 });
    h[368..376].copy_from_slice(&disk_size.to_le_bytes());
    h[392..408].copy_from_slice(&uuids[0]);
    h[408..424].copy_from_slice(&uuids[1]);
    if let Some(p) = parent {
        h[424..440].copy_from_slice(&p.create);
        h[440..456].copy_from_slice(&p.modify);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header::parse(&new_header(5 << 20, false, [[1; 16], [2; 16]], None))
    }

    #[test]
    fn new_header_validates_against_its_file() {
        let h = good();
        assert_eq!((h.off_blocks, h.off_data, h.blocks, h.blocks_allocated), (512, 1024, 5, 0));
        h.validate(1024).unwrap();
        let e = h.validate(520).unwrap_err();
        assert!(e.message().contains("block map"), "{}", e.message());
    }

    #[test]
    fn qemu_limits_have_qemu_messages() {
        let mut h = good();
        h.block_size = 2 << 20;
        assert_eq!(
            h.validate(1024).unwrap_err().message(),
            "unsupported VDI image (block size 2097152 is not 1048576)"
        );
        let mut h = good();
        h.blocks = 4;
        assert_eq!(
            h.validate(1024).unwrap_err().message(),
            "unsupported VDI image (disk size 5242880, image bitmap has room for 4194304)"
        );
        let mut h = good();
        h.signature = 0;
        assert_eq!(h.validate(1024).unwrap_err().message(), "Image not in VDI format (bad signature 00000000)");
        let mut h = good();
        h.uuid_link = [1; 16];
        assert_eq!(h.validate(1024).unwrap_err().message(), "unsupported VDI image (non-NULL link UUID)");
        h.image_type = TYPE_DIFFERENCING;
        h.validate(1024).unwrap();
        h.uuid_link = [0; 16];
        assert!(h.validate(1024).unwrap_err().message().contains("without a parent UUID"));
        // The size limit comes first, as in qemu (iotest 084).
        let mut h = good();
        h.disk_size = 1 << 60;
        h.blocks = u32::MAX;
        assert!(h.validate(1024).unwrap_err().message().starts_with("Unsupported VDI image size"));
        let mut h = good();
        h.blocks = u32::MAX;
        assert!(h.validate(1024).unwrap_err().message().contains("too many blocks"));
    }

    #[test]
    fn overlapping_areas_are_refused() {
        let mut h = good();
        h.off_data = 512;
        assert!(h.validate(1 << 20).is_err());
        let mut h = good();
        h.off_blocks = 0;
        assert!(h.validate(1 << 20).is_err());
        let mut h = good();
        h.blocks = 6;
        assert!(h.validate(1 << 20).is_err());
    }
}
