//! vdisk's VHD driver (qemu's format name `vpc`): Virtual PC, Hyper-V, Azure and VirtualBox disks.
//!
//! Reads fixed, dynamic and differencing disks. The footer is taken from the end of the file and,
//! when that copy is missing or its checksum is wrong, from the copy at offset 0 that sparse
//! disks keep (and the other way round). The disk size follows qemu 10's rule
//! ([`footer::Footer::disk_size`]). Differencing disks read through to their parent, found by
//! the parent locators (relative `W2ru` first, then `W2ku`, `MacX`, then the header's parent
//! name); qemu ignores the parent of a differencing disk. Writes go to fixed disks in place and
//! to sparse disks block by block (see [`driver`] for the update order). Creates dynamic and
//! fixed disks as qemu-img lays them out ([`create`]).
//!
//! # Hostile images
//! Every header field is checked before anything is allocated or read: the table size against
//! [`footer::MAX_TABLE_ENTRIES`] and the file, the block size against [`footer::MAX_BLOCK_SIZE`],
//! the disk size against the table and, for fixed disks, the file; locator data against the file
//! and a 64 KiB bound; the parent chain's depth through the open [`Chain`]. Table entries that
//! point into the metadata are refused for writes.

mod create;
pub mod driver;
pub mod footer;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use blockdev::mapped::Granularity;
use blockdev::options::{CreateOptions, OptionSpec};
use blockdev::range_lock::RangeLock;
use blockdev::{BlockDriver, Chain, Error, Format, OpenOptions, Opener, Result, Storage};

use driver::{Sparse, SparseState, Vpc, UNALLOCATED};
use footer::{
    DynamicHeader, Footer, Locator, FOOTER_COOKIE, MAX_SECTORS, SECTOR, TYPE_DIFFERENCING, TYPE_DYNAMIC, TYPE_FIXED,
};

/// Largest parent locator vdisk reads.
const MAX_LOCATOR_BYTES: u32 = 64 << 10;

/// The vpc format's registry entry.
#[derive(Debug, Default)]
pub struct VpcFormat;

impl Format for VpcFormat {
    fn name(&self) -> &'static str {
        "vpc"
    }

    /// Like qemu: only a footer copy at the start of the file (dynamic and differencing disks)
    /// identifies a VHD; fixed disks probe as raw.
    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        if head.len() >= 8 && &head[..8] == FOOTER_COOKIE {
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

/// The footer: the copy at the end of the file if its checksum is right, else the copy at
/// offset 0 if its checksum is right.
pub(crate) fn read_footer(storage: &dyn Storage, file_len: u64) -> Result<(Footer, bool)> {
    let name = storage.name();
    if file_len < SECTOR {
        return Err(Error::invalid_image(format!("{name}: file too small for a VHD")));
    }
    let mut tail = [0u8; 512];
    blockdev::read_exact_at(storage, file_len - SECTOR, &mut tail)?;
    let mut head = [0u8; 512];
    blockdev::read_exact_at(storage, 0, &mut head)?;
    let tail_footer = Footer::parse(&tail).filter(|_| Footer::checksum_ok(&tail));
    let head_footer = Footer::parse(&head).filter(|_| Footer::checksum_ok(&head));
    match (tail_footer, head_footer) {
        (Some(f), _) => Ok((f, true)),
        (None, Some(f)) if f.disk_type != TYPE_FIXED => Ok((f, false)),
        _ if Footer::parse(&tail).is_some() || Footer::parse(&head).is_some() => {
            Err(Error::invalid_image(format!("{name}: the VHD footer checksum is incorrect")))
        }
        _ => Err(Error::invalid_image(format!("{name}: not a VHD (no footer)"))),
    }
}

fn open(storage: Arc<dyn Storage>, opts: &OpenOptions, chain: &Chain, opener: &dyn Opener) -> Result<Vpc> {
    let file_len = storage.len()?;
    let name = storage.name().to_string();
    let (footer, trailing) = read_footer(storage.as_ref(), file_len)?;
    let size = footer.disk_size();
    if size > MAX_SECTORS * SECTOR {
        return Err(Error::invalid_image("Disk size is too large"));
    }
    let read_only = opts.read_only || storage.is_read_only();
    let mut vpc = Vpc { storage, footer, size, read_only, sparse: None, backing: None, parent_name: None };
    match vpc.footer.disk_type {
        TYPE_FIXED => {
            if size > file_len - SECTOR || !trailing {
                return Err(Error::invalid_image(format!("{name}: fixed VHD larger than its file")));
            }
        }
        TYPE_DYNAMIC | TYPE_DIFFERENCING => {
            let sparse = open_sparse(&vpc, file_len)?;
            if vpc.footer.disk_type == TYPE_DIFFERENCING {
                let candidates = parent_candidates(vpc.storage.as_ref(), &sparse.header, file_len)?;
                vpc.parent_name = candidates.first().cloned();
                if !opts.no_backing {
                    let (parent, parent_name) =
                        open_parent(&vpc, &sparse.header.parent_uuid, candidates, opts, chain, opener)?;
                    vpc.backing = Some(parent);
                    vpc.parent_name = Some(parent_name);
                }
            }
            vpc.sparse = Some(sparse);
        }
        t => return Err(Error::unsupported(format!("{name}: VHD disk type {t} is not supported"))),
    }
    Ok(vpc)
}

/// Reads and checks the dynamic header and the block allocation table.
fn open_sparse(vpc: &Vpc, file_len: u64) -> Result<Sparse> {
    let storage = vpc.storage.as_ref();
    let at = vpc.footer.data_offset;
    // Bytes of the header past the end of the file read as zeros (as in qemu).
    if at >= file_len {
        return Err(Error::invalid_image(format!("{}: VHD dynamic header lies outside the file", storage.name())));
    }
    let mut raw = [0u8; 1024];
    blockdev::read_exact_at(storage, at, &mut raw)?;
    let header = DynamicHeader::parse(&raw)?;
    let bitmap_bytes = header.validate(vpc.size, file_len)?;
    if !DynamicHeader::checksum_ok(&raw) {
        return Err(Error::invalid_image(format!("{}: the VHD dynamic header checksum is incorrect", storage.name())));
    }
    let entries = header.max_table_entries as usize;
    let mut table = vec![0u8; entries * 4];
    blockdev::read_exact_at(storage, header.table_offset, &mut table)?;
    let bat: Vec<u32> = table.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
    let block_size = header.block_size as u64;
    let table_end = header.table_offset + (entries as u64 * 4).next_multiple_of(SECTOR);
    let metadata_end = table_end.max(at + 1024);
    // New blocks go past everything in use: blocks, locator data, and the trailing footer's spot.
    let mut end = metadata_end.max(file_len.saturating_sub(SECTOR).next_multiple_of(SECTOR));
    let blocks_end =
        bat.iter().filter(|&&e| e != UNALLOCATED).map(|&e| e as u64 * SECTOR + bitmap_bytes + block_size).max();
    if let Some(blocks_end) = blocks_end {
        // A block past the end of the file: the file was cut short (qemu refuses it too).
        if blocks_end > file_len {
            return Err(Error::invalid_image(
                "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
            ));
        }
        end = end.max(blocks_end);
    }
    for l in &header.locators {
        end = end.max(l.data_offset.saturating_add((l.data_len as u64).next_multiple_of(SECTOR)));
    }
    Ok(Sparse {
        differencing: vpc.footer.disk_type == TYPE_DIFFERENCING,
        header,
        block_size,
        bitmap_bytes,
        metadata_end,
        state: Mutex::new(SparseState { bat, dirty: BTreeSet::new(), end: end.next_multiple_of(SECTOR) }),
        alloc: Mutex::new(()),
        write_back: Mutex::new(()),
        full: Mutex::new(HashSet::new()),
        pending_bitmaps: Mutex::new(std::collections::HashMap::new()),
        locks: RangeLock::new(),
        sectors: Granularity::new(SECTOR),
    })
}

/// The parent names a differencing disk records, in the order they are tried: relative
/// Windows (`W2ru`), absolute Windows (`W2ku`), Mac OS X (`MacX`, a file URL), then the header's
/// parent name. Windows separators become `/`; drive-letter paths are dropped (no such file here).
fn parent_candidates(storage: &dyn Storage, header: &DynamicHeader, file_len: u64) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let order: [&[u8; 4]; 3] = [b"W2ru", b"W2ku", b"MacX"];
    for code in order {
        for l in header.locators.iter().filter(|l| &l.code == code) {
            if let Some(name) = locator_name(storage, l, file_len)? {
                out.push(name);
            }
        }
    }
    out.push(header.parent_name.clone());
    let mut names: Vec<String> = Vec::new();
    for n in out {
        let n = n.replace('\\', "/");
        let n = n.strip_prefix("./").map(str::to_string).unwrap_or(n);
        let drive = n.len() >= 2 && n.as_bytes()[1] == b':';
        if !n.is_empty() && !drive && !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(names)
}

/// Decodes one locator's data.
fn locator_name(storage: &dyn Storage, l: &Locator, file_len: u64) -> Result<Option<String>> {
    if l.data_len > MAX_LOCATOR_BYTES || l.data_offset.checked_add(l.data_len as u64).is_none_or(|e| e > file_len) {
        return Err(Error::invalid_image(format!("{}: VHD parent locator lies outside the file", storage.name())));
    }
    let mut data = vec![0u8; l.data_len as usize];
    blockdev::read_exact_at(storage, l.data_offset, &mut data)?;
    Ok(match &l.code {
        b"W2ru" | b"W2ku" => {
            let units: Vec<u16> = data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
            Some(String::from_utf16_lossy(&units[..end]))
        }
        b"MacX" => {
            let text = String::from_utf8_lossy(&data).trim_end_matches('\0').to_string();
            text.strip_prefix("file://").map(|rest| {
                // file://localhost/path or file:///path
                let rest = rest.strip_prefix("localhost").unwrap_or(rest);
                rest.to_string()
            })
        }
        _ => None,
    })
}

/// Opens a differencing disk's parent: the first candidate name that opens as a VHD whose
/// footer carries `parent_uuid` (unless that is null). A parent with another UUID is not the
/// disk the child was made over (replaced, or a different one under the same name): its data
/// would not be what the child's blocks assume, so it is refused, as Hyper-V refuses it.
fn open_parent(
    vpc: &Vpc,
    parent_uuid: &[u8; 16],
    candidates: Vec<String>,
    opts: &OpenOptions,
    chain: &Chain,
    opener: &dyn Opener,
) -> Result<(Arc<dyn BlockDriver>, String)> {
    let name = vpc.storage.name();
    let mut first_error = None;
    for candidate in candidates {
        match opener.open_image(name, &candidate, Some("vpc"), &opts.for_backing(), chain) {
            Ok(parent) => match parent_identity(parent.as_ref()) {
                Ok(uuid) if *parent_uuid == [0; 16] || uuid == *parent_uuid => return Ok((parent, candidate)),
                Ok(uuid) => {
                    first_error.get_or_insert(Error::invalid_image(format!(
                        "'{candidate}' is not the parent of '{name}': its UUID is {}, the child's parent UUID {}",
                        uuid_text(&uuid),
                        uuid_text(parent_uuid)
                    )));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            },
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error
        .unwrap_or_else(|| Error::invalid_image(format!("{name}: differencing VHD names no parent")))
        .prefixed("Could not open backing file"))
}

/// The UUID in the footer of the opened VHD `parent`.
fn parent_identity(parent: &dyn BlockDriver) -> Result<[u8; 16]> {
    let storage = parent.storage().ok_or_else(|| Error::invalid_image("the parent has no file"))?;
    let (footer, _) = read_footer(storage.as_ref(), storage.len()?)?;
    Ok(footer.uuid)
}

/// A VHD UUID (big-endian, RFC 4122 byte order) as text.
fn uuid_text(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}
