//! Creating VMDK disks with qemu-img's options and layouts: monolithicSparse (header, embedded
//! descriptor, redundant grain directory and tables, grain directory and tables, all tables
//! preallocated, first grain at a grain boundary) and monolithicFlat (a descriptor file and a
//! `-flat` data file), twoGbMaxExtentSparse/Flat (split into 2 GiB extent files), and
//! streamOptimized in the layout of VMware's specification (see `stream.rs`).

use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{Error, Opener, Prealloc, Result};

use crate::descriptor::{NewDescriptor, NO_PARENT};
use crate::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
    GD_AT_END, SECTOR,
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
            let storage = opener.create_storage(filename, &CreateOptions::new())?;
            blockdev::delete_on_error(opener, filename, || {
                let image = sparse_image(sectors, p.zeroed_grain, text.as_bytes())?;
                blockdev::write_all_at(storage.as_ref(), 0, &image)?;
                storage.flush()
            })
        }
        "streamOptimized" => {
            let text = describe("streamOptimized", &[format!("RW {sectors} SPARSE \"{}\"", base_name(filename))]);
            let storage = opener.create_storage(filename, &CreateOptions::new())?;
            blockdev::delete_on_error(opener, filename, || {
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
            let mut data_opts = CreateOptions::new();
            data_opts.set("size", &(sectors * SECTOR).to_string());
            let data = opener.create_storage(&flat, &data_opts)?;
            data.flush()?;
            let desc = opener.create_storage(filename, &CreateOptions::new())?;
            blockdev::write_all_at(desc.as_ref(), 0, text.as_bytes())?;
            desc.set_len(text.len() as u64, Prealloc::Off)?;
            desc.flush()
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
            for (n, name) in pieces.iter().zip(&names) {
                if sparse {
                    let extent = opener.create_storage(name, &CreateOptions::new())?;
                    let image = sparse_image(*n, p.zeroed_grain, b"")?;
                    blockdev::write_all_at(extent.as_ref(), 0, &image)?;
                    extent.flush()?;
                } else {
                    let mut o = CreateOptions::new();
                    o.set("size", &(n * SECTOR).to_string());
                    opener.create_storage(name, &o)?.flush()?;
                }
            }
            let desc = opener.create_storage(filename, &CreateOptions::new())?;
            blockdev::write_all_at(desc.as_ref(), 0, text.as_bytes())?;
            desc.set_len(text.len() as u64, Prealloc::Off)?;
            desc.flush()
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

/// The metadata of an empty monolithic sparse extent of `sectors` sectors with descriptor
/// `desc`: header, descriptor, redundant directory and tables, directory and tables, padded to
/// the first grain (qemu's layout).
fn sparse_image(sectors: u64, zeroed_grain: bool, desc: &[u8]) -> Result<Vec<u8>> {
    if desc.len() as u64 > DESC_SECTORS * SECTOR {
        return Err(Error::invalid_argument("VMDK descriptor too long"));
    }
    let gt_sectors = (GTES * 4).div_ceil(SECTOR);
    let gd_entries = (sectors).div_ceil(GRAIN_SECTORS * GTES).max(1);
    let gd_sectors = (gd_entries * 4).div_ceil(SECTOR);
    let rgd = 1 + DESC_SECTORS;
    let rgt = rgd + gd_sectors;
    let gd = rgt + gd_entries * gt_sectors;
    let gt = gd + gd_sectors;
    let end = gt + gd_entries * gt_sectors;
    let overhead = end.next_multiple_of(GRAIN_SECTORS);
    if overhead > u32::MAX as u64 / 2 {
        return Err(Error::invalid_argument("Image size too large"));
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
    let mut image = vec![0u8; (overhead * SECTOR) as usize];
    image[..512].copy_from_slice(&header.encode());
    image[512..512 + desc.len()].copy_from_slice(desc);
    for i in 0..gd_entries {
        let put = |image: &mut Vec<u8>, dir: u64, table: u64| {
            let at = (dir * SECTOR + i * 4) as usize;
            image[at..at + 4].copy_from_slice(&((table + i * gt_sectors) as u32).to_le_bytes());
        };
        put(&mut image, rgd, rgt);
        put(&mut image, gd, gt);
    }
    Ok(image)
}
