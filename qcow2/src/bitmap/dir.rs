//! The bitmaps header extension and the bitmap directory: parsing with qemu's checks, encoding.

use blockdev::{read_exact_at, Error, Result, Storage};

use crate::cache::get_u64;
use crate::limits::{
    BITMAP_GRANULARITY_BITS, MAX_BITMAPS, MAX_BITMAP_DATA_BYTES, MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAP_NAME,
    MAX_BITMAP_TABLE_SIZE,
};

/// Directory entry flag: the bitmap was not stored cleanly and may be wrong.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap records every write (it is enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags qemu refuses (everything but in_use and auto, including extra_data_compatible: qemu
/// supports no extra data).
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: a dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Fixed part of a directory entry, before extra data and name.
const ENTRY_HEADER: usize = 24;

/// The bitmaps header extension: how many bitmaps there are and where their directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps (1 to [`MAX_BITMAPS`]).
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory offset (cluster aligned).
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Length of the extension's data.
    pub const LEN: usize = 24;

    /// Parses the extension's data (exactly [`Self::LEN`] bytes) with qemu's checks.
    pub fn parse(d: &[u8]) -> Result<BitmapsExt> {
        let nb = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        if d[4..8] != [0; 4] {
            return Err(Error::invalid_image("bitmaps_ext: Reserved field is not zero"));
        }
        let e = BitmapsExt { nb_bitmaps: nb, directory_size: get_u64(d, 1), directory_offset: get_u64(d, 2) };
        if nb > MAX_BITMAPS {
            return Err(Error::invalid_image(format!(
                "bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
            )));
        }
        if nb == 0 {
            return Err(Error::invalid_image("found bitmaps extension with zero bitmaps"));
        }
        // (The cluster alignment of the offset is checked against the cluster size at open.)
        if e.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::invalid_image(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})",
                e.directory_size
            )));
        }
        Ok(e)
    }

    /// The extension's data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Where the bitmap table is (cluster aligned).
    pub table_offset: u64,
    /// Entries in the bitmap table (one per cluster of bit data).
    pub table_size: u32,
    /// [`FLAG_IN_USE`], [`FLAG_AUTO`].
    pub flags: u32,
    /// log2 of the bytes of disk per bit.
    pub granularity_bits: u8,
    /// The name (a name that is not UTF-8 is kept with replacement characters).
    pub name: String,
}

impl BitmapEntry {
    /// Bytes of disk per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Whether the bitmap records writes.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Whether the bitmap was not stored cleanly.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Size of this entry in the directory.
    pub fn encoded_len(&self) -> u64 {
        entry_size(self.name.len())
    }
}

/// Size of a directory entry with a name of `name_len` bytes and no extra data.
pub fn entry_size(name_len: usize) -> u64 {
    (ENTRY_HEADER + name_len).div_ceil(8) as u64 * 8
}

/// Bitmap table entries a bitmap over `disk_size` bytes at `granularity` needs with clusters of
/// `cs` bytes.
pub fn table_entries(disk_size: u64, granularity: u64, cs: u64) -> u64 {
    blockdev::bitmap::DirtyBitmap::bytes_needed(granularity, disk_size).div_ceil(cs)
}

/// qemu's constraints on a bitmap's size and name, for one that is about to be stored; the
/// message says which is broken.
pub fn check_new(name: &str, granularity: u64, disk_size: u64, cs: u64) -> Result<()> {
    let bits = granularity.trailing_zeros();
    if bits > *BITMAP_GRANULARITY_BITS.end() {
        return Err(Error::invalid_argument(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << BITMAP_GRANULARITY_BITS.end()
        )));
    }
    if bits < *BITMAP_GRANULARITY_BITS.start() {
        return Err(Error::invalid_argument(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << BITMAP_GRANULARITY_BITS.start()
        )));
    }
    let bytes = blockdev::bitmap::DirtyBitmap::bytes_needed(granularity, disk_size);
    if bytes > MAX_BITMAP_DATA_BYTES || bytes > MAX_BITMAP_TABLE_SIZE * cs {
        return Err(Error::invalid_argument("Too much space will be occupied by the bitmap. Use larger granularity"));
    }
    if name.len() > MAX_BITMAP_NAME {
        return Err(Error::invalid_argument(format!("Name length exceeds maximum ({MAX_BITMAP_NAME} characters)")));
    }
    Ok(())
}

/// Whether a directory entry breaks qemu's rules (for a disk of `disk_size` bytes).
fn entry_is_valid(e: &BitmapEntry, kind: u8, name_size: usize, cs: u64, disk_size: u64) -> bool {
    let phys = e.table_size as u64 * cs;
    let basic = e.table_size != 0
        && e.table_offset != 0
        && e.table_offset % cs == 0
        && (e.table_size as u64) <= MAX_BITMAP_TABLE_SIZE
        && BITMAP_GRANULARITY_BITS.contains(&(e.granularity_bits as u32))
        && e.flags & RESERVED_FLAGS == 0
        && name_size <= MAX_BITMAP_NAME
        && kind == TYPE_DIRTY_TRACKING
        && phys <= MAX_BITMAP_DATA_BYTES;
    // A consistent bitmap's table must cover the whole disk.
    basic && (e.in_use() || disk_size <= (phys * 8) << e.granularity_bits)
}

/// Reads and checks the directory `ext` points to, as qemu does (same messages).
pub fn read_directory(io: &dyn Storage, ext: &BitmapsExt, cs: u64, disk_size: u64) -> Result<Vec<BitmapEntry>> {
    if ext.directory_size == 0 {
        return Err(Error::invalid_image("Requested bitmap directory size is zero"));
    }
    if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid_image("Requested bitmap directory size is too big"));
    }
    if ext.directory_offset % cs != 0 {
        return Err(Error::invalid_image("bitmaps_ext: invalid bitmap directory offset"));
    }
    if ext.directory_offset.checked_add(ext.directory_size).is_none_or(|end| end > io.len().unwrap_or(u64::MAX)) {
        return Err(Error::invalid_image("Failed to read bitmap directory: Input/output error"));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    read_exact_at(io, ext.directory_offset, &mut dir).map_err(|e| e.prefixed("Failed to read bitmap directory"))?;
    parse_directory(&dir, ext.nb_bitmaps, cs, disk_size)
}

/// Parses directory bytes that should hold `nb` entries.
pub fn parse_directory(dir: &[u8], nb: u32, cs: u64, disk_size: u64) -> Result<Vec<BitmapEntry>> {
    let broken = || Error::invalid_image("Broken bitmap directory");
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        if at + ENTRY_HEADER > dir.len() {
            return Err(broken());
        }
        if out.len() as u32 >= nb {
            return Err(Error::invalid_image("More bitmaps found than specified in header extension"));
        }
        let d = &dir[at..];
        let name_size = u16::from_be_bytes([d[18], d[19]]) as usize;
        let extra = u32::from_be_bytes([d[20], d[21], d[22], d[23]]) as usize;
        let size = (ENTRY_HEADER + extra + name_size).div_ceil(8) * 8;
        if size > d.len() {
            return Err(broken());
        }
        if extra != 0 {
            return Err(Error::invalid_image("Bitmap extra data is not supported"));
        }
        let raw_name = &d[ENTRY_HEADER..ENTRY_HEADER + name_size];
        let e = BitmapEntry {
            table_offset: get_u64(d, 0),
            table_size: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
            flags: u32::from_be_bytes([d[12], d[13], d[14], d[15]]),
            granularity_bits: d[17],
            name: String::from_utf8_lossy(raw_name).into_owned(),
        };
        if !entry_is_valid(&e, d[16], name_size, cs, disk_size) {
            return Err(Error::invalid_image(format!("Bitmap '{}' doesn't satisfy the constraints", e.name)));
        }
        out.push(e);
        at += size;
    }
    if out.len() as u32 != nb {
        return Err(Error::invalid_image("Less bitmaps found than specified in header extension"));
    }
    Ok(out)
}

/// The directory bytes for `entries`.
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let start = b.len();
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(TYPE_DIRTY_TRACKING);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(e.name.as_bytes());
        b.resize(start + e.encoded_len() as usize, 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> BitmapEntry {
        BitmapEntry { table_offset: 0x30000, table_size: 1, flags, granularity_bits: 16, name: name.into() }
    }

    #[test]
    fn directory_round_trips() {
        let list = vec![entry("b0", FLAG_AUTO), entry("a longer name", FLAG_IN_USE)];
        let d = encode_directory(&list);
        assert_eq!(d.len() as u64, entry_size(2) + entry_size(13));
        assert_eq!(parse_directory(&d, 2, 65536, 10 << 20).unwrap(), list);
    }

    #[test]
    fn directory_checks_say_what_is_wrong() {
        let d = encode_directory(&[entry("b0", 0)]);
        let msg = |r: Result<Vec<BitmapEntry>>| r.unwrap_err().message().to_string();
        assert_eq!(
            msg(parse_directory(&d, 2, 65536, 1 << 20)),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(parse_directory(&d, 0, 65536, 1 << 20)),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(msg(parse_directory(&d[..20], 1, 65536, 1 << 20)), "Broken bitmap directory");
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB; a bigger disk needs more.
        assert_eq!(msg(parse_directory(&d, 1, 65536, (32 << 30) + 1)), "Bitmap 'b0' doesn't satisfy the constraints");
        let mut bad = d.clone();
        bad[16] = 2;
        assert_eq!(msg(parse_directory(&bad, 1, 65536, 1 << 20)), "Bitmap 'b0' doesn't satisfy the constraints");
        let mut extra = d.clone();
        extra[23] = 1;
        assert_eq!(msg(parse_directory(&extra, 1, 65536, 1 << 20)), "Bitmap extra data is not supported");
    }

    #[test]
    fn new_bitmaps_are_bounded_like_qemu() {
        assert!(check_new("b", 512, 1 << 30, 65536).is_ok());
        let e = check_new("b", 1 << 32, 1 << 30, 65536).unwrap_err();
        assert_eq!(e.message(), "Granularity exceeds maximum (2147483648 bytes)");
        let e = check_new("b", 512, 1 << 50, 65536).unwrap_err();
        assert!(e.message().starts_with("Too much space"), "{e}");
        assert!(check_new(&"n".repeat(1024), 512, 1, 65536).is_err());
    }

    #[test]
    fn the_extension_round_trips_and_refuses_nonsense() {
        let e = BitmapsExt { nb_bitmaps: 3, directory_size: 96, directory_offset: 0x50000 };
        assert_eq!(BitmapsExt::parse(&e.encode()).unwrap(), e);
        let zero = BitmapsExt { nb_bitmaps: 0, ..e };
        assert_eq!(
            BitmapsExt::parse(&zero.encode()).unwrap_err().message(),
            "found bitmaps extension with zero bitmaps"
        );
        let big = BitmapsExt { directory_size: MAX_BITMAP_DIRECTORY_SIZE + 1, ..e };
        assert!(BitmapsExt::parse(&big.encode()).is_err());
    }
}
