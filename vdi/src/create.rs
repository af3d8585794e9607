//! Creating VDI images as qemu-img does: header (`cbHeader` 384, qemu's banner), block map at
//! 512, data area after the map rounded up to a sector; `static=on` allocates every block at
//! creation (map entries 0..n, file extended to hold them, as a sparse file).
//!
//! `backing_file` (which qemu-img cannot do for vdi) makes a differencing image over a VDI
//! parent: type 4, the parent's create and modify UUIDs as link and parent-modify UUIDs, the
//! parent's size unless one is given. Its parent is found again by UUID ([`crate::parent`]).
//!
//! Order: the header and map are written, then (static) the file is extended, then flushed.
//! Invalid sizes are refused before the file is created (qemu leaves an empty file behind).

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{Error, Opener, Prealloc, Result};

use crate::header::{new_header, Header, ParentIds, BLOCK_SIZE, ENTRY_FREE, MAX_DISK_SIZE, SECTOR};

/// qemu-img's `-o` options for vdi.
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::with_default("static", OptionKind::Bool, "VDI static (pre-allocated) image", "off"),
    OptionSpec::new("backing_file", OptionKind::Str, "File name of the parent of a differencing image"),
    OptionSpec::new("backing_fmt", OptionKind::Str, "Must be 'vdi' if present"),
];

/// Map bytes written per request.
const MAP_CHUNK: u64 = 1 << 20;

/// A random version 4 UUID in the file's byte order (Microsoft GUID: the first three fields
/// little-endian).
fn new_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    blockdev::crypto::fill_random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    Ok(u)
}

/// Creates an image at `filename`.
pub fn create(filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
    let fixed = opts.get_bool("static")?.unwrap_or(false);
    let parent = match opts.get("backing_file") {
        Some(p) => Some(parent_ids(filename, p, opts, opener)?),
        None => None,
    };
    if parent.is_some() && fixed {
        return Err(Error::invalid_argument("A differencing VDI cannot be static"));
    }
    let size = match (opts.get_size("size")?, parent) {
        (Some(s), _) => s,
        (None, Some((_, parent_size))) => parent_size,
        (None, None) => 0,
    };
    let size = size.next_multiple_of(SECTOR as u64);
    let parent = parent.map(|(ids, _)| ids);
    if opts.get("preallocation") == Some("metadata") {
        return Err(Error::unsupported("Unsupported preallocation mode: metadata"));
    }
    if size > MAX_DISK_SIZE {
        return Err(Error::unsupported(format!(
            "Unsupported VDI image size (size is 0x{size:x}, max supported is 0x{MAX_DISK_SIZE:x})"
        )));
    }
    let header = new_header(size, fixed, [new_uuid()?, new_uuid()?], parent);
    let blocks = size.div_ceil(BLOCK_SIZE as u64);
    let map_bytes = (blocks * 4).next_multiple_of(SECTOR as u64);
    let storage = opener.create_storage(filename, &CreateOptions::new())?;
    blockdev::delete_on_error(opener, filename, || {
        blockdev::write_all_at(storage.as_ref(), 0, &header)?;
        let mut at = 0u64;
        while at < map_bytes {
            let n = MAP_CHUNK.min(map_bytes - at);
            let first = at / 4;
            let chunk: Vec<u8> = (first..first + n / 4)
                .flat_map(|i| {
                    let e = if i >= blocks {
                        0
                    } else if fixed {
                        i as u32
                    } else {
                        ENTRY_FREE
                    };
                    e.to_le_bytes()
                })
                .collect();
            blockdev::write_all_at(storage.as_ref(), 512 + at, &chunk)?;
            at += n;
        }
        if fixed {
            storage.set_len(512 + map_bytes + blocks * BLOCK_SIZE as u64, Prealloc::Off)?;
        }
        storage.flush()
    })
}

/// The identity and size of the parent `name` (relative to the new image `filename`).
fn parent_ids(filename: &str, name: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<(ParentIds, u64)> {
    if opts.get("backing_fmt").is_some_and(|f| f != "vdi") {
        return Err(Error::invalid_argument("backing_file must be a vdi image"));
    }
    let open_opts = blockdev::OpenOptions { no_backing: true, ..blockdev::OpenOptions::default() };
    let could_not = |e: Error| e.prefixed(format!("Could not open '{name}'"));
    let storage = opener.open_storage(filename, name, &open_opts).map_err(could_not)?;
    let file_len = storage.len()?;
    let mut head = vec![0u8; file_len.min(512) as usize];
    blockdev::read_exact_at(storage.as_ref(), 0, &mut head)?;
    let h = Header::parse(&head);
    h.validate(file_len).map_err(could_not)?;
    if h.uuid_create == [0; 16] {
        return Err(Error::invalid_argument(format!("'{name}' has no create UUID to link a differencing image to")));
    }
    Ok((ParentIds { create: h.uuid_create, modify: h.uuid_modify }, h.disk_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_in_guid_order() {
        let u = new_uuid().unwrap();
        assert_eq!(u[7] >> 4, 4);
        assert_eq!(u[8] >> 6, 2);
    }
}
