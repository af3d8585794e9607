//! vdisk's VMDK driver.
//!
//! Reads VMware's hosted disks: a descriptor (its own file, or embedded in a monolithic sparse
//! file) naming FLAT, SPARSE and ZERO extents with their access modes; sparse extents of header
//! versions 1 to 3 with grain directories, grain tables and their redundant copies, zeroed grains
//! and compressed grains (streamOptimized, qemu's layout and the spec's footer layout); delta
//! disks read through to their parent, whose CID must match the child's parentCID. Writes go to
//! flat and uncompressed sparse extents (grains appended at the end of the file). Creates every
//! subformat qemu-img creates, in its layout (streamOptimized in the spec's), preallocated
//! tables left as holes.
//!
//! # Hostile images
//! Descriptors are bounded in size and extent count ([`descriptor`]); header fields are checked
//! against qemu's limits before anything is read ([`header::SparseHeader::validate`]); table and
//! grain offsets are checked against the file before they are followed ([`sparse`]); files a
//! descriptor names go through the open policy ([`blockdev::check_reference`]).

mod check;
mod create;
pub mod descriptor;
mod driver;
pub mod header;
pub mod sparse;
mod stream;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use blockdev::options::{CreateOptions, OptionSpec};
use blockdev::range_lock::RangeLock;
use blockdev::{BlockDriver, Chain, Error, Format, OpenOptions, Opener, Result, Storage};

use descriptor::{Access, Descriptor, ExtentLine, ExtentType, MAX_DESCRIPTOR_BYTES, NO_PARENT};
pub use driver::Vmdk;
use driver::{DescriptorPlace, DiskExtent, ExtentData};
use header::{SparseHeader, MAGIC, SECTOR};
use sparse::SparseExtent;

/// The vmdk format's registry entry.
#[derive(Debug, Default)]
pub struct VmdkFormat;

impl Format for VmdkFormat {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        let sparse = head.len() >= 4 && u32::from_le_bytes([head[0], head[1], head[2], head[3]]) == MAGIC;
        if sparse || Descriptor::probe(head) {
            100
        } else {
            0
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: &Chain,
        opener: &dyn Opener,
    ) -> Result<Arc<dyn BlockDriver>> {
        Ok(Arc::new(open(storage, opts, chain, opener)?))
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

/// Reads the sparse header at the start of `storage`, if it has one.
fn sparse_header(storage: &dyn Storage) -> Result<Option<SparseHeader>> {
    if storage.len()? < SECTOR {
        return Ok(None);
    }
    let mut head = [0u8; 512];
    blockdev::read_exact_at(storage, 0, &mut head)?;
    if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) != MAGIC {
        return Ok(None);
    }
    SparseHeader::parse(&head).map(Some)
}

fn open(storage: Arc<dyn Storage>, opts: &OpenOptions, chain: &Chain, opener: &dyn Opener) -> Result<Vmdk> {
    let file_len = storage.len()?;
    let name = storage.name().to_string();
    let mut stream = None;
    let (descriptor, place, extents) = if let Some(h) = sparse_header(storage.as_ref())? {
        h.validate(&name)?;
        let (descriptor, place) = embedded_descriptor(storage.as_ref(), &h, file_len)?;
        let capacity = h.capacity * SECTOR;
        let mut line = descriptor.extents.first().cloned().unwrap_or_else(|| ExtentLine {
            access: Access::ReadWrite,
            sectors: h.capacity,
            kind: ExtentType::Sparse,
            type_name: String::new(),
            file: None,
            offset: 0,
        });
        // qemu shows the monolithic file itself as the extent, with an empty type.
        line.file = Some(name.clone());
        line.type_name = String::new();
        let access = line.access;
        let sparse = SparseExtent::open(storage.clone(), h.clone())?;
        // An empty stream disk opened for writing takes a stream of compressed grains.
        if h.compressed() && !opts.read_only && !storage.is_read_only() && sparse.is_empty()? {
            stream = Some(stream::StreamWriter::new(storage.clone(), h));
        }
        let data = ExtentData::Sparse(Box::new(sparse));
        let extent = DiskExtent { start: 0, len: capacity, access, line, data };
        (descriptor, place, vec![extent])
    } else {
        let text = descriptor_text(storage.as_ref(), file_len)?;
        let descriptor = Descriptor::parse(&text)?;
        if !DESCRIPTOR_FILE_TYPES.contains(&descriptor.create_type.as_str()) {
            return Err(Error::unsupported(format!("Unsupported image type '{}'", descriptor.create_type)));
        }
        let extents = open_extents(&name, &descriptor, opts, opener)?;
        (descriptor, DescriptorPlace::File, extents)
    };
    let size = extents.last().map(|e| e.start + e.len).unwrap_or(0);
    let parent = open_parent(&name, &descriptor, opts, chain, opener)?;
    let parent_cid_ok = parent.as_ref().is_none_or(|(_, ok)| *ok);
    let backing = parent.map(|(p, _)| p);
    Ok(Vmdk {
        read_only: opts.read_only || storage.is_read_only(),
        storage,
        descriptor: Mutex::new(descriptor),
        place,
        extents,
        size,
        backing,
        parent_cid_ok,
        cid_updated: AtomicBool::new(false),
        stream,
        grain_locks: RangeLock::new(),
    })
}

/// The `createType`s qemu opens from a descriptor file (the others are embedded in their
/// sparse file).
const DESCRIPTOR_FILE_TYPES: &[&str] =
    &["monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"];

/// The text of a descriptor file of `file_len` bytes, with qemu's errors for files that are
/// none: an empty file is "too small", and one whose text (up to its first NUL byte) has no
/// `createType` is an "invalid VMDK image descriptor" — what qemu says of any file that is not
/// a VMDK (raw, qcow2, ...) opened with `-f vmdk`. At most [`MAX_DESCRIPTOR_BYTES`] are read.
fn descriptor_text(storage: &dyn Storage, file_len: u64) -> Result<Vec<u8>> {
    if file_len == 0 {
        return Err(Error::invalid_image("File is too small, not a valid image"));
    }
    let mut text = vec![0u8; file_len.min(MAX_DESCRIPTOR_BYTES as u64) as usize];
    blockdev::read_exact_at(storage, 0, &mut text)?;
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    if !text[..end].windows(b"createType".len()).any(|w| w == b"createType") {
        return Err(Error::invalid_image("invalid VMDK image descriptor"));
    }
    if file_len > MAX_DESCRIPTOR_BYTES as u64 {
        return Err(Error::invalid_image(format!("{}: not a VMDK descriptor (file too large)", storage.name())));
    }
    text.truncate(end);
    Ok(text)
}

/// The descriptor inside a sparse file (or one made up for a bare sparse extent).
fn embedded_descriptor(
    storage: &dyn Storage,
    h: &SparseHeader,
    file_len: u64,
) -> Result<(Descriptor, DescriptorPlace)> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        let text = format!(
            "version=1\nCID=ffffffff\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW {} SPARSE \"{}\"\n",
            h.capacity.max(1),
            storage.name()
        );
        return Ok((Descriptor::parse(text.as_bytes())?, DescriptorPlace::None));
    }
    let at = h.desc_offset.checked_mul(SECTOR);
    let len = h.desc_size.checked_mul(SECTOR).filter(|&l| l <= MAX_DESCRIPTOR_BYTES as u64);
    let (at, len) = match (at, len) {
        (Some(a), Some(l)) if a.checked_add(l).is_some_and(|e| e <= file_len) => (a, l),
        _ => {
            return Err(Error::invalid_image(format!("{}: embedded descriptor lies outside the file", storage.name())))
        }
    };
    let mut text = vec![0u8; len as usize];
    blockdev::read_exact_at(storage, at, &mut text)?;
    Ok((Descriptor::parse(&text)?, DescriptorPlace::Embedded(at, len)))
}

/// Opens the extents a descriptor file names.
fn open_extents(name: &str, d: &Descriptor, opts: &OpenOptions, opener: &dyn Opener) -> Result<Vec<DiskExtent>> {
    let mut out = Vec::with_capacity(d.extents.len());
    let mut start = 0u64;
    for line in &d.extents {
        let len = line.sectors.checked_mul(SECTOR).ok_or_else(|| Error::invalid_image("VMDK extent too large"))?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= 1 << 62)
            .ok_or_else(|| Error::invalid_image("Image size too large"))?;
        let file_opts = OpenOptions { read_only: opts.read_only || line.access != Access::ReadWrite, ..opts.clone() };
        let data = match line.kind {
            ExtentType::Zero => ExtentData::Zero,
            ExtentType::Unsupported => {
                // The file is opened first, as qemu does (a missing file is the error it reports).
                opener.open_storage(name, line.file.as_deref().unwrap_or_default(), &file_opts)?;
                return Err(Error::unsupported(format!("VMDK extent type {} is not supported", line.type_name)));
            }
            ExtentType::Flat => {
                let file = line.file.as_deref().unwrap_or_default();
                let storage = opener.open_storage(name, file, &file_opts)?;
                let offset =
                    line.offset.checked_mul(SECTOR).ok_or_else(|| Error::invalid_image("Invalid extent offset"))?;
                ExtentData::Flat { storage, offset }
            }
            ExtentType::Sparse => {
                let file = line.file.as_deref().unwrap_or_default();
                let storage = opener.open_storage(name, file, &file_opts)?;
                let h = sparse_header(storage.as_ref())?
                    .ok_or_else(|| Error::invalid_image(format!("{}: not a VMDK sparse extent", storage.name())))?;
                ExtentData::Sparse(Box::new(SparseExtent::open(storage, h)?))
            }
        };
        let mut line = line.clone();
        if let Some(f) = &line.file {
            line.file = Some(blockdev::resolve_reference(name, f));
        }
        out.push(DiskExtent { start, len, access: line.access, line, data });
        start = end;
    }
    Ok(out)
}

/// Opens the parent of a delta disk: the parent, and whether it is still the disk the child was
/// made on (its CID is the child's parentCID).
fn open_parent(
    name: &str,
    d: &Descriptor,
    opts: &OpenOptions,
    chain: &Chain,
    opener: &dyn Opener,
) -> Result<Option<(Arc<dyn BlockDriver>, bool)>> {
    let Some(hint) = d.parent_hint.as_deref().filter(|_| d.parent_cid != NO_PARENT) else { return Ok(None) };
    if opts.no_backing {
        return Ok(None);
    }
    let parent = opener
        .open_image(name, hint, None, &opts.for_backing(), chain)
        .map_err(|e| e.prefixed("Could not open backing file"))?;
    let matches = match parent.format() {
        "vmdk" => {
            let info = parent.info()?;
            let cid = info.format_specific.as_ref().and_then(|(_, d)| d.get("cid").cloned());
            cid == Some(blockdev::qobject::Value::Int(d.parent_cid as i64))
        }
        _ => true,
    };
    Ok(Some((parent, matches)))
}
