//! Creating VMDK disks with qemu-img's options and layouts: monolithicSparse (header, embedded
//! descriptor, redundant grain directory and tables, grain directory and tables, all tables
//! preallocated, first grain at a grain boundary) and monolithicFlat (a descriptor file and a
//! `-flat` data file), twoGbMaxExtentSparse/Flat (split into 2 GiB extent files), and
//! streamOptimized in the layout of VMware's specification (see `stream.rs`).

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{Error, ErrorKind, Opener, Prealloc, Result, Storage};

use crate::descriptor::{NewDescriptor, NO_PARENT};
use crate::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
    GD_AT_END, MAX_GD_ENTRIES, SECTOR,
};

/// qemu-img's `-o` options for vmdk, in its order.
pub const CREATE_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
    OptionSpec::new(
        "adapter_type",
        OptionKind::Str,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    OptionSpec::new("backing_file", OptionKind::Str, "File name of a base image"),
    OptionSpec::new("backing_fmt", OptionKind::Str, "Must be 'vmdk' if present"),
    OptionSpec::with_default("compat6", OptionKind::Bool, "VMDK version 6 image", "off"),
    OptionSpec::with_default("hwversion", OptionKind::Str, "VMDK hardware version", "undefined"),
    OptionSpec::new("toolsversion", OptionKind::Str, "VMware guest tools version"),
    OptionSpec::new(
        "subformat",
        OptionKind::Str,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    OptionSpec::new("zeroed_grain", OptionKind::Bool, "Enable efficient zero writes using the zeroed-grain GTE feature"),
];

/// Sectors qemu reserves for an embedded descriptor.
const DESC_SECTORS: u64 = 20;
/// Default grain: 64 KiB.
const GRAIN_SECTORS: u64 = 128;
/// Entries per grain table.
const GTES: u64 = 512;

/// The options of one creation.
struct Params {
    size: u64,
    adapter: String,
    hw_version: String,
    tools_version: String,
    subformat: String,
    zeroed_grain: bool,
    /// `backing_file`: the parent of a delta disk.
    backing: Option<String>,
}

fn params(opts: &CreateOptions) -> Result<Params> {
    let bad = |m: String| Error::invalid_argument(m);
    let size = opts.get_size("size")?.unwrap_or(0);
    let adapter = opts.get("adapter_type").unwrap_or("ide").to_string();
    if !matches!(adapter.as_str(), "ide" | "lsilogic" | "buslogic" | "legacyESX") {
        return Err(bad(format!("Unknown adapter type: '{adapter}'")));
    }
    let compat6 = opts.get_bool("compat6")?.unwrap_or(false);
    let hw = opts.get("hwversion").filter(|v| *v != "undefined");
    if compat6 && hw.is_some() {
        return Err(bad("compat6 cannot be enabled with hwversion set".into()));
    }
    let hw_version = hw.map(str::to_string).unwrap_or_else(|| if compat6 { "6" } else { "4" }.to_string());
    let tools_version = opts.get("toolsversion").unwrap_or("2147483647").to_string();
    let subformat = opts.get("subformat").unwrap_or("monolithicSparse").to_string();
    if !matches!(
        subformat.as_str(),
        "monolithicSparse" | "monolithicFlat" | "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat" | "streamOptimized"
    ) {
        return Err(bad(format!("Unknown subformat: '{subformat}'")));
    }
    let backing = opts.get("backing_file").map(str::to_string);
    if let Some(f) = opts.get("backing_fmt") {
        if f != "vmdk" {
            return Err(bad("backing_file must be a vmdk image".into()));
        }
    }
    if backing.is_some() && subformat.ends_with("Flat") {
        return Err(bad("Flat image can't have backing file".into()));
    }
    let zeroed_grain = opts.get_bool("zeroed_grain")?.unwrap_or(false);
    if zeroed_grain && subformat.ends_with("Flat") {
        return Err(bad("Flat image can't enable zeroed grain".into()));
    }
    Ok(Params { size, adapter, hw_version, tools_version, subformat, zeroed_grain, backing })
}

/// qemu's geometry: 63 sectors, 16 heads for IDE and 255 otherwise, cylinders from the size.
fn geometry(size: u64, adapter: &str) -> (u64, u32, u32) {
    let heads: u32 = if adapter == "ide" { 16 } else { 255 };
    (size / (63 * heads as u64 * SECTOR), heads, 63)
}

/// The file name part of `path`.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Creates a disk at `filename`.
pub fn create(filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
    let mut p = params(opts)?;
    let mut parent_cid = NO_PARENT;
    if let Some(b) = &p.backing {
        let (size, cid) = parent_of(filename, b, opener)?;
        parent_cid = cid;
        if opts.get_size("size")?.is_none() {
            p.size = size;
        }
    }
    let sectors = p.size.div_ceil(SECTOR);
    let mut cid = [0u8; 4];
    blockdev::crypto::fill_random(&mut cid)?;
    let cid = u32::from_le_bytes(cid);
    let describe = |create_type: &str, extents: &[String]| {
        NewDescriptor {
            cid,
            parent_cid,
            create_type,
            parent_hint: p.backing.as_deref(),
            extents,
            hw_version: &p.hw_version,
            geometry: geometry(p.size, &p.adapter),
            adapter: &p.adapter,
            tools_version: &p.tools_version,
        }
        .render()
    };
    match p.subformat.as_str() {
        "monolithicSparse" => {
            let text = describe("monolithicSparse", &[format!("RW {sectors} SPARSE \"{}\"", base_name(filename))]);
            let layout = SparseLayout::new(sectors, p.zeroed_grain, text.as_bytes())?;
            let storage = opener.create_storage(filename, &CreateOptions::new())?;
            blockdev::delete_on_error(opener, filename, || {
                layout.write(storage.as_ref(), text.as_bytes())?;
                storage.flush()
            })
        }
        "streamOptimized" => {
            let text = describe("streamOptimized", &[format!("RW {sectors} SPARSE \"{}\"", base_name(filename))]);
            if text.len() as u64 > DESC_SECTORS * SECTOR {
                return Err(Error::invalid_argument("VMDK descriptor too long"));
            }
            let header = SparseHeader {
                version: 3,
                flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
                capacity: sectors,
                grain_sectors: GRAIN_SECTORS,
                desc_offset: 1,
                desc_size: DESC_SECTORS,
                gtes_per_gt: GTES as u32,
                rgd_offset: 0,
                gd_offset: GD_AT_END,
                overhead: GRAIN_SECTORS,
                unclean: false,
                compression: COMPRESSION_DEFLATE,
            };
            header.validate("").map_err(|_| Error::invalid_argument("Image size too large"))?;
            let storage = opener.create_storage(filename, &CreateOptions::new())?;
            blockdev::delete_on_error(opener, filename, || {
                let mut head = vec![0u8; (GRAIN_SECTORS * SECTOR) as usize];
                head[..512].copy_from_slice(&header.encode());
                head[512..512 + text.len()].copy_from_slice(text.as_bytes());
                blockdev::write_all_at(storage.as_ref(), 0, &head)?;
                // An empty stream: no grains, an empty directory, the footer, end of stream.
                crate::stream::StreamWriter::new(storage.clone(), header).finish_new()?;
                storage.flush()
            })
        }
        "monolithicFlat" => {
            let flat = flat_name(filename);
            let text = describe("monolithicFlat", &[format!("RW {sectors} FLAT \"{}\" 0", base_name(&flat))]);
            // As qemu: the descriptor file first, then the data file; the descriptor is written
            // even when the data file cannot take the size (qemu-img leaves both behind).
            let desc = opener.create_storage(filename, &CreateOptions::new())?;
            let data = create_flat(opener, &flat, sectors);
            write_descriptor_file(desc.as_ref(), &text)?;
            data
        }
        "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat" => {
            let sparse = p.subformat == "twoGbMaxExtentSparse";
            let pieces = split_extents(sectors);
            let names: Vec<String> =
                (1..=pieces.len()).map(|i| extent_name(filename, if sparse { 's' } else { 'f' }, i)).collect();
            let lines: Vec<String> = pieces
                .iter()
                .zip(&names)
                .map(|(n, name)| match sparse {
                    true => format!("RW {n} SPARSE \"{}\"", base_name(name)),
                    false => format!("RW {n} FLAT \"{}\" 0", base_name(name)),
                })
                .collect();
            let text = describe(&p.subformat, &lines);
            let desc = opener.create_storage(filename, &CreateOptions::new())?;
            let extents = (|| -> Result<()> {
                for (n, name) in pieces.iter().zip(&names) {
                    if sparse {
                        let layout = SparseLayout::new(*n, p.zeroed_grain, b"")?;
                        let extent = opener.create_storage(name, &CreateOptions::new())?;
                        layout.write(extent.as_ref(), b"")?;
                        extent.flush()?;
                    } else {
                        create_flat(opener, name, *n)?;
                    }
                }
                Ok(())
            })();
            write_descriptor_file(desc.as_ref(), &text)?;
            extents
        }
        other => Err(Error::unsupported(format!("vdisk cannot create VMDK subformat {other} yet"))),
    }
}

/// Most sectors in one extent of a twoGbMaxExtent disk (qemu's 2 GiB).
const SPLIT_SECTORS: u64 = 4_194_304;

/// Sizes of the extents a split disk of `sectors` sectors has.
fn split_extents(sectors: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut left = sectors;
    while left > 0 {
        let n = left.min(SPLIT_SECTORS);
        v.push(n);
        left -= n;
    }
    if v.is_empty() {
        v.push(0);
    }
    v
}

/// `dir/name-s001.vmdk` (or `-f001`) for extent `i` of `dir/name.vmdk`.
fn extent_name(filename: &str, kind: char, i: usize) -> String {
    let stem = filename.strip_suffix(".vmdk").unwrap_or(filename);
    format!("{stem}-{kind}{i:03}.vmdk")
}

/// The size and CID of the parent `backing` of a new delta disk `filename`.
fn parent_of(filename: &str, backing: &str, opener: &dyn Opener) -> Result<(u64, u32)> {
    let opts = blockdev::OpenOptions { no_backing: true, ..blockdev::OpenOptions::default() };
    let parent = opener
        .open_image(filename, backing, None, &opts, &blockdev::Chain::new())
        .map_err(|e| e.prefixed(format!("Could not open '{backing}'")))?;
    if parent.format() != "vmdk" {
        return Err(Error::invalid_argument(format!(
            "Invalid backing file format: {}. Must be vmdk.",
            parent.format()
        )));
    }
    let info = parent.info()?;
    let cid = match info.format_specific.as_ref().and_then(|(_, d)| d.get("cid").cloned()) {
        Some(blockdev::qobject::Value::Int(c)) => c as u32,
        _ => NO_PARENT,
    };
    Ok((parent.size(), cid))
}

/// `dir/name-flat.vmdk` for `dir/name.vmdk`.
fn flat_name(filename: &str) -> String {
    match filename.strip_suffix(".vmdk") {
        Some(stem) => format!("{stem}-flat.vmdk"),
        None => format!("{filename}-flat.vmdk"),
    }
}

/// Writes descriptor `text` as the whole of the descriptor file `desc`.
fn write_descriptor_file(desc: &dyn Storage, text: &str) -> Result<()> {
    blockdev::write_all_at(desc, 0, text.as_bytes())?;
    desc.set_len(text.len() as u64, Prealloc::Off)?;
    desc.flush()
}

/// Creates the flat extent file `name` of `sectors` sectors (a hole: qemu's file driver sizes it
/// and writes only its first block). A size past the file system's limit fails in qemu's words,
/// `Could not resize file: File too large` (not the generic message for formats whose size limit
/// is their own).
fn create_flat(opener: &dyn Opener, name: &str, sectors: u64) -> Result<()> {
    let mut o = CreateOptions::new();
    o.set("size", &(sectors * SECTOR).to_string());
    match opener.create_storage(name, &o) {
        Ok(data) => data.flush(),
        Err(e) if e.errno() == Some(libc::EFBIG) => {
            Err(Error::new(ErrorKind::OutOfRange, format!("Could not resize file: {}", e.message())))
        }
        Err(e) => Err(e),
    }
}

/// Grain directory entries written per request when a sparse extent is created (64 KiB).
const GD_CHUNK_ENTRIES: u64 = 16 * 1024;

/// qemu's layout of an empty hosted sparse extent: header, embedded descriptor, redundant grain
/// directory and its tables, grain directory and its tables, padded to the first grain. Every
/// table is preallocated in the file and empty.
#[derive(Debug)]
struct SparseLayout {
    header: SparseHeader,
    /// Entries in each grain directory.
    gd_entries: u64,
    /// Sectors of one grain table.
    gt_sectors: u64,
    /// First sector of the redundant grain tables and of the grain tables.
    rgt: u64,
    gt: u64,
}

impl SparseLayout {
    /// The layout of an extent of `sectors` sectors embedding descriptor `desc`, checked against
    /// the limits vdisk (and qemu) open sparse extents with, before anything is written.
    fn new(sectors: u64, zeroed_grain: bool, desc: &[u8]) -> Result<SparseLayout> {
        if desc.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(Error::invalid_argument("VMDK descriptor too long"));
        }
        let too_large = || Error::invalid_argument("Image size too large");
        let gt_sectors = (GTES * 4).div_ceil(SECTOR);
        let gd_entries = sectors.div_ceil(GRAIN_SECTORS * GTES).max(1);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(too_large());
        }
        // With at most MAX_GD_ENTRIES entries none of this overflows, and every table offset
        // fits the directory's 32-bit entries.
        let gd_sectors = (gd_entries * 4).div_ceil(SECTOR);
        let rgd = 1 + DESC_SECTORS;
        let rgt = rgd + gd_sectors;
        let gd = rgt + gd_entries * gt_sectors;
        let gt = gd + gd_sectors;
        let end = gt + gd_entries * gt_sectors;
        let overhead = end.next_multiple_of(GRAIN_SECTORS);
        if overhead > u32::MAX as u64 / 2 {
            return Err(too_large());
        }
        let header = SparseHeader {
            version: if zeroed_grain { 2 } else { 1 },
            flags: FLAG_NL_DETECT | FLAG_RGD | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
            capacity: sectors,
            grain_sectors: GRAIN_SECTORS,
            desc_offset: 1,
            desc_size: DESC_SECTORS,
            gtes_per_gt: GTES as u32,
            rgd_offset: rgd,
            gd_offset: gd,
            overhead,
            unclean: false,
            compression: 0,
        };
        header.validate("")?;
        Ok(SparseLayout { header, gd_entries, gt_sectors, rgt, gt })
    }

    /// Writes the layout into the empty file `storage`: the file is extended to the first grain
    /// (so the tables and the rest read as zeros without being written), then the header, the
    /// descriptor and both directories' entries are written, a bounded chunk at a time.
    fn write(&self, storage: &dyn Storage, desc: &[u8]) -> Result<()> {
        let h = &self.header;
        storage.set_len(h.overhead * SECTOR, Prealloc::Off)?;
        blockdev::write_all_at(storage, 0, &h.encode())?;
        if !desc.is_empty() {
            blockdev::write_all_at(storage, h.desc_offset * SECTOR, desc)?;
        }
        let mut chunk = Vec::with_capacity((GD_CHUNK_ENTRIES * 4) as usize);
        for (dir, tables) in [(h.rgd_offset, self.rgt), (h.gd_offset, self.gt)] {
            let mut first = 0;
            while first < self.gd_entries {
                let n = GD_CHUNK_ENTRIES.min(self.gd_entries - first);
                chunk.clear();
                for i in first..first + n {
                    // Below 2^31 (checked in `new`).
                    chunk.extend_from_slice(&((tables + i * self.gt_sectors) as u32).to_le_bytes());
                }
                blockdev::write_all_at(storage, dir * SECTOR + first * 4, &chunk)?;
                first += n;
            }
        }
        Ok(())
    }
}
