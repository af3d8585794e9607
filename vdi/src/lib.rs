//! vdisk's VDI (VirtualBox) driver.
//!
//! Reads and writes dynamic and static (fixed) VDI images as qemu and VirtualBox write them
//! (`cbHeader` 384 or 400; block map and data area at any sector-aligned place, qemu's 512-byte
//! or VirtualBox's 1 MiB alignment), with free (`0xFFFFFFFF`) and zero (`0xFFFFFFFE`) map
//! entries; creates images byte for byte as qemu-img does (random UUIDs aside); checks them
//! with qemu-img's messages and repairs them ([`check`]'s docs). Differencing images (type 4), which qemu refuses, open with their
//! parent, found by UUID ([`parent`]); free blocks read from it, and `create -b` makes them.
//!
//! # Hostile images
//! The header is validated before anything else is read ([`header::Header::validate`]): qemu's
//! limits first, with qemu's messages, then vdisk's own: the block count must be the one the
//! disk size needs, the map and the data area must lie inside the file and not overlap, so the
//! map read at open is bounded by the file's length (and allocated fallibly). Map entries are
//! classified on use: an index beyond the block count makes reads and writes of that block
//! fail instead of reading or writing outside the data area. New blocks are appended after the
//! highest index in the map, so a damaged `blocksAllocated` never makes two blocks share data.
//!
//! The update order of allocating writes is in [`driver`]'s docs.

pub mod check;
mod create;
pub mod driver;
pub mod header;
pub mod parent;

use std::sync::{Arc, Mutex, RwLock};

use blockdev::options::{CreateOptions, OptionSpec};
use blockdev::range_lock::RangeLock;
use blockdev::{BlockDriver, Chain, Error, Format, OpenOptions, Opener, Result, Storage};

use driver::Alloc;
pub use driver::Vdi;
use header::{Header, ENTRY_FREE, ENTRY_ZERO, SIGNATURE};

/// The vdi format's registry entry.
#[derive(Debug, Default)]
pub struct VdiFormat;

impl Format for VdiFormat {
    fn name(&self) -> &'static str {
        "vdi"
    }

    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        match head.get(64..68) {
            Some(s) if u32::from_le_bytes([s[0], s[1], s[2], s[3]]) == SIGNATURE => 100,
            _ => 0,
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: &Chain,
        opener: &dyn Opener,
    ) -> Result<Arc<dyn BlockDriver>> {
        let mut vdi = open(storage, opts)?;
        if vdi.header.is_differencing() {
            open_parent(&mut vdi, opts, chain, opener)?;
        }
        Ok(Arc::new(vdi))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        create::CREATE_OPTIONS
    }

    fn create(&self, filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
        create::create(filename, opts, opener)
    }

    fn supports_backing(&self) -> bool {
        true
    }
}

/// Finds and opens the parent of the differencing image `vdi` (unless the open asks for no
/// backing file): the named one if the caller gave one, else the one [`parent::search`] finds.
fn open_parent(vdi: &mut Vdi, opts: &OpenOptions, chain: &Chain, opener: &dyn Opener) -> Result<()> {
    let name = vdi.storage.name().to_string();
    let link = vdi.header.uuid_link;
    let found = match &opts.parent_hint {
        Some(hint) => {
            if !parent::is_parent(&name, hint, &link) {
                return Err(Error::invalid_image(format!(
                    "Could not open backing file: '{hint}' is not the parent of '{name}' (no VDI with UUID {})",
                    parent::uuid_text(&link)
                )));
            }
            Some(hint.clone())
        }
        None => parent::search(&name, &link, opts.references)?,
    };
    vdi.parent_name = found.clone();
    if opts.no_backing {
        return Ok(());
    }
    let Some(found) = found else {
        return Err(Error::invalid_image(format!(
            "Could not open backing file: no parent of '{name}' (a VDI with UUID {}) next to it or in the directory \
             above; name it with --image-opts backing.file.filename=PARENT",
            parent::uuid_text(&link)
        )));
    };
    let parent = opener
        .open_image(&name, &found, Some("vdi"), &opts.for_backing(), chain)
        .map_err(|e| e.prefixed("Could not open backing file"))?;
    vdi.backing = Some(parent);
    Ok(())
}

/// Map entries read per request at open.
const MAP_CHUNK_ENTRIES: usize = 256 << 10;

/// Opens the VDI image in `storage`.
pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Vdi> {
    let file_len = storage.len()?;
    let mut head = vec![0u8; file_len.min(512) as usize];
    blockdev::read_exact_at(storage.as_ref(), 0, &mut head)?;
    let header = Header::parse(&head);
    header.validate(file_len)?;
    let blocks = header.blocks as usize;
    let mut map: Vec<u32> = Vec::new();
    map.try_reserve_exact(blocks).map_err(|_| Error::new(blockdev::ErrorKind::Io, "Could not allocate bmap"))?;
    let mut raw = vec![0u8; blocks.min(MAP_CHUNK_ENTRIES) * 4];
    let mut at = header.off_blocks as u64;
    while map.len() < blocks {
        let n = (blocks - map.len()).min(MAP_CHUNK_ENTRIES);
        blockdev::read_exact_at(storage.as_ref(), at, &mut raw[..n * 4])?;
        map.extend(raw[..n * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        at += n as u64 * 4;
    }
    let stored = |e: &&u32| **e != ENTRY_FREE && **e != ENTRY_ZERO && **e < header.blocks;
    let allocated = map.iter().filter(stored).count() as u32;
    let highest = map.iter().filter(stored).map(|e| e + 1).max().unwrap_or(0);
    let next_index = highest.max(header.blocks_allocated.min(header.blocks));
    let header_count = header.blocks_allocated;
    Ok(Vdi {
        read_only: opts.read_only || storage.is_read_only(),
        storage,
        header,
        map: RwLock::new(map),
        alloc: Mutex::new(Alloc { next_index, allocated, header_count }),
        block_locks: RangeLock::new(),
        backing: None,
        parent_name: None,
    })
}
