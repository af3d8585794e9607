//! Creating VHDs with qemu-img's options and layouts.
//!
//! Size: without `force_size`, the requested sectors are raised until the CHS geometry of the
//! specification covers them, and the disk is exactly that geometry (creator `qemu`), unless the
//! geometry is the largest one, in which case the requested size stands; with `force_size=on`
//! the size is the requested one (rounded up to a sector), the geometry the largest, and the
//! creator `qem2`. Disks above 2040 GiB are refused.
//!
//! Layouts: dynamic = footer copy, dynamic header at 512, block allocation table at 1536 (all
//! entries unallocated, its last sector filled with them), footer; fixed = the data (a hole, or
//! allocated with `preallocation`), then the footer.
//!
//! Differencing disks (`backing_file`, which qemu-img cannot create for vpc): the dynamic layout
//! with the parent's size, geometry, creator and identity, the parent's name in the header, and
//! two parent locators after the table: `W2ru` (the name relative to the child, UTF-16LE, as
//! Windows reads it) and `MacX` (a `file://` URL of the absolute path, UTF-8).

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{Error, Opener, Result};

use crate::footer::{
    geometry, DynamicHeader, Footer, MAX_CHS_SECTORS, MAX_SECTORS, SECTOR, TYPE_DIFFERENCING, TYPE_DYNAMIC, TYPE_FIXED,
    VHD_EPOCH,
};

/// qemu-img's `-o` options for vpc, in its order (the file's own options follow).
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::new(
        "subformat",
        OptionKind::Str,
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    ),
    OptionSpec::new(
        "force_size",
        OptionKind::Bool,
        "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    ),
    OptionSpec::new("backing_file", OptionKind::Str, "File name of the parent of a differencing disk"),
    OptionSpec::new("backing_fmt", OptionKind::Str, "Must be 'vpc' if present"),
];

/// Block size of the disks qemu and vdisk create.
const BLOCK_SIZE: u64 = 2 << 20;
/// Where the dynamic header and the table go.
const HEADER_AT: u64 = 512;
const TABLE_AT: u64 = 1536;

/// The sectors and geometry of a new disk of `size` bytes, and whether the size was forced.
fn sizing(size: u64, force: bool) -> Result<(u64, (u16, u8, u8))> {
    let requested = size.div_ceil(SECTOR);
    let too_large = || Error::invalid_argument("The image size is too large for file format 'vpc'");
    if force {
        if requested > MAX_SECTORS {
            return Err(too_large());
        }
        return Ok((requested, (65535, 16, 255)));
    }
    // Raise the sector count until the geometry covers what was asked for.
    let wanted = requested.min(MAX_CHS_SECTORS);
    let mut probe = wanted;
    let mut g = (0u16, 0u8, 0u8);
    let covered = |g: (u16, u8, u8)| g.0 as u64 * g.1 as u64 * g.2 as u64;
    while covered(g) < wanted {
        g = geometry(probe);
        probe += 1;
    }
    if covered(g) == MAX_CHS_SECTORS {
        if requested > MAX_SECTORS {
            return Err(too_large());
        }
        return Ok((requested, g));
    }
    Ok((covered(g), g))
}

/// A new random (version 4) UUID.
fn new_uuid() -> Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    blockdev::crypto::fill_random(&mut uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}

/// Seconds since the VHD epoch.
fn vhd_now() -> u32 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    now.saturating_sub(VHD_EPOCH) as u32
}

/// Creates a disk at `filename`.
pub fn create(filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
    if let Some(parent) = opts.get("backing_file") {
        if opts.get("backing_fmt").is_some_and(|f| f != "vpc") {
            return Err(Error::invalid_argument("backing_file must be a vpc image"));
        }
        return create_differencing(filename, parent, opener);
    }
    let size = opts.get_size("size")?.unwrap_or(0);
    let fixed = match opts.get("subformat").unwrap_or("dynamic") {
        "dynamic" => false,
        "fixed" => true,
        other => return Err(Error::invalid_argument(format!("Parameter 'subformat' does not accept value '{other}'"))),
    };
    let force = opts.get_bool("force_size")?.unwrap_or(false);
    let (sectors, geometry) = sizing(size, force)?;
    let bytes = sectors * SECTOR;
    let footer = Footer {
        data_offset: if fixed { u64::MAX } else { HEADER_AT },
        timestamp: vhd_now(),
        creator_app: if force { *b"qem2" } else { *b"qemu" },
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: bytes,
        current_size: bytes,
        geometry,
        disk_type: if fixed { TYPE_FIXED } else { TYPE_DYNAMIC },
        checksum: 0,
        uuid: new_uuid()?,
        saved_state: 0,
    }
    .encode();
    if fixed {
        // qemu-img accepts `preallocation` here but leaves the data a hole all the same.
        let mut file_opts = CreateOptions::new();
        file_opts.set("size", &(bytes + SECTOR).to_string());
        let storage = opener.create_storage(filename, &file_opts)?;
        return blockdev::delete_on_error(opener, filename, || {
            blockdev::write_all_at(storage.as_ref(), bytes, &footer)?;
            storage.flush()
        });
    }
    let entries = bytes.div_ceil(BLOCK_SIZE);
    let image = sparse_image(&footer, entries, &[0; 16], 0, "", &[])?;
    let storage = opener.create_storage(filename, &CreateOptions::new())?;
    blockdev::delete_on_error(opener, filename, || {
        blockdev::write_all_at(storage.as_ref(), 0, &image)?;
        storage.flush()
    })
}

/// The bytes of a new sparse disk: footer copy, header, table (`entries`, all unallocated),
/// each locator's data in a sector of its own (`(code, data)`), footer.
fn sparse_image(
    footer: &[u8; 512],
    entries: u64,
    parent_uuid: &[u8; 16],
    parent_timestamp: u32,
    parent_name: &str,
    locators: &[([u8; 4], Vec<u8>)],
) -> Result<Vec<u8>> {
    let header = DynamicHeader {
        table_offset: TABLE_AT,
        max_table_entries: entries as u32,
        block_size: BLOCK_SIZE as u32,
        parent_uuid: *parent_uuid,
        parent_timestamp,
        parent_name: String::new(),
        locators: Vec::new(),
    };
    let table_bytes = (entries * 4).next_multiple_of(SECTOR);
    let mut image = Vec::with_capacity((TABLE_AT + table_bytes + SECTOR) as usize);
    image.extend_from_slice(footer);
    let mut head = header.encode();
    // The parent's name (UTF-16BE, 256 units at most) and the locator entries.
    let units: Vec<u16> = parent_name.encode_utf16().collect();
    if units.len() > 256 {
        return Err(Error::invalid_argument("The parent's name is too long for a VHD header"));
    }
    for (i, u) in units.iter().enumerate() {
        head[64 + i * 2..66 + i * 2].copy_from_slice(&u.to_be_bytes());
    }
    let mut data_at = TABLE_AT + table_bytes;
    let mut data = Vec::new();
    for (i, (code, bytes)) in locators.iter().enumerate() {
        let space = (bytes.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
        let e = &mut head[576 + i * 24..600 + i * 24];
        e[..4].copy_from_slice(code);
        e[4..8].copy_from_slice(&(space as u32).to_be_bytes());
        e[8..12].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
        e[16..24].copy_from_slice(&data_at.to_be_bytes());
        let mut padded = bytes.clone();
        padded.resize(space as usize, 0);
        data.extend_from_slice(&padded);
        data_at += space;
    }
    let sum = crate::footer::checksum(&head, 36);
    head[36..40].copy_from_slice(&sum.to_be_bytes());
    image.extend_from_slice(&head);
    // qemu fills the table's whole last sector with unallocated entries.
    image.resize((TABLE_AT + table_bytes) as usize, 0xff);
    image.extend_from_slice(&data);
    image.extend_from_slice(footer);
    Ok(image)
}

/// Creates a differencing disk over `parent` (a VHD), named relative to `filename` or absolute.
fn create_differencing(filename: &str, parent: &str, opener: &dyn Opener) -> Result<()> {
    let open_opts = blockdev::OpenOptions { no_backing: true, ..blockdev::OpenOptions::default() };
    let could_not = |e: Error| e.prefixed(format!("Could not open '{parent}'"));
    let storage = opener.open_storage(filename, parent, &open_opts).map_err(could_not)?;
    let file_len = storage.len()?;
    let (pf, _) = crate::read_footer(storage.as_ref(), file_len).map_err(could_not)?;
    let bytes = pf.disk_size();
    let footer = Footer {
        data_offset: HEADER_AT,
        timestamp: vhd_now(),
        creator_app: pf.creator_app,
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: pf.current_size,
        current_size: pf.current_size,
        geometry: pf.geometry,
        disk_type: TYPE_DIFFERENCING,
        checksum: 0,
        uuid: new_uuid()?,
        saved_state: 0,
    }
    .encode();
    let absolute = std::path::Path::new(&blockdev::resolve_reference(filename, parent))
        .canonicalize()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| blockdev::resolve_reference(filename, parent));
    let relative = if parent.starts_with('/') { None } else { Some(format!(".\\{}", parent.replace('/', "\\"))) };
    let mut locators = Vec::new();
    if let Some(rel) = &relative {
        locators.push((*b"W2ru", rel.encode_utf16().flat_map(u16::to_le_bytes).collect()));
    }
    locators.push((*b"MacX", format!("file://{absolute}").into_bytes()));
    let image = sparse_image(&footer, bytes.div_ceil(BLOCK_SIZE), &pf.uuid, pf.timestamp, parent, &locators)?;
    let out = opener.create_storage(filename, &CreateOptions::new())?;
    blockdev::delete_on_error(opener, filename, || {
        blockdev::write_all_at(out.as_ref(), 0, &image)?;
        out.flush()
    })
}

#[cfg(test)]
mod tests {
    use super::sizing;

    #[test]
    fn sizes_round_up_to_the_geometry_as_qemu_img() {
        // Figures from qemu-img 10.0.2: `create -f vpc` then `info`.
        assert_eq!(sizing(100 << 20, false).unwrap().0 * 512, 104_865_792);
        assert_eq!(sizing(1 << 20, false).unwrap().0 * 512, 1_079_296);
        assert_eq!(sizing(1000, false).unwrap().0 * 512, 34_816);
        assert_eq!(sizing(1000, true).unwrap().0 * 512, 1024);
        assert_eq!(sizing(0, false).unwrap().0, 0);
        assert_eq!(sizing(100 << 30, false).unwrap().0 * 512, 107_374_632_960);
        assert_eq!(sizing(2040 << 30, false).unwrap().0 * 512, 2040 << 30);
        assert!(sizing(2041 << 30, false).is_err());
        assert!(sizing(2041 << 30, true).is_err());
    }
}
