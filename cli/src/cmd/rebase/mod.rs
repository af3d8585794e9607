//! `rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p]
//! [-u] [-c] -b backing_file [-F backing_fmt] filename`
//!
//! Safe mode keeps what the guest sees: wherever the image itself allocates nothing, the old and
//! new backing files are compared (in units of the image's subclusters, clusters when
//! compressing) and differing units are copied from the old view into the image before the
//! backing file name changes. Unsafe mode (`-u`) only changes the name.
//!
//! Where both backing views keep a run as plain data in local files, or one does and the other
//! reads as zeros, the files' pages are compared in place ([`mapped`]) and the differences are
//! written by a thread of their own ([`writer`]) while the next run is compared; everything else
//! is read through the drivers into buffers. All writes have completed, and any error has been
//! reported, before the backing file name changes.

mod mapped;
mod writer;

use mapped::{Maps, Run};
use writer::DiffWriter;

use std::io::IoSliceMut;
use std::sync::Arc;

use blockdev::{resolve_reference, BlockDriver, CacheMode, ExtentKind, OpenOptions, ZeroFlags};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{bulk_write_cache, cache_mode, img_open, Objects, OpenRequest};
use crate::progress::Progress;
use crate::report::{error_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    opt("F", Some('F'), None),
    opt("b", Some('b'), None),
    flag("u", Some('u'), None),
    flag("p", Some('p'), None),
    opt("t", Some('t'), None),
    opt("T", Some('T'), None),
    flag("q", Some('q'), None),
    flag("U", Some('U'), Some("force-share")),
    flag("c", Some('c'), None),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Largest unit read and compared at once.
const CHUNK: u64 = 2 << 20;
/// Largest unit compared at once where the views are mapped files (nothing is buffered; the two
/// windows compared, and the one being written, are what rebase keeps in memory).
const MAPPED_CHUNK: u64 = 1 << 20;

/// Runs `rebase`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    let quiet = p.has("q");
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let unsafe_mode = p.has("u");
    let new_name = p.value("b");
    if !unsafe_mode && new_name.is_none() {
        return Err(CliError::usage("Must specify backing file (-b) or use unsafe mode (-u)"));
    }
    let name = &p.positional[0];
    let progress = Progress::new(p.has("p") && !quiet, 2.0);
    progress.add(0.0, 100.0);
    let result = rebase(&p, name, new_name, unsafe_mode, &progress);
    progress.end();
    result
}

fn rebase(
    p: &crate::args::Parsed,
    name: &str,
    new_name: Option<&str>,
    unsafe_mode: bool,
    progress: &Progress,
) -> CmdResult {
    let cache = bulk_write_cache(p.value("t"), name)?;
    let src_cache = cache_mode(p.value("T"), CacheMode::Writeback, "source cache")?;
    let reg = registry();
    let opts = OpenOptions { read_only: false, cache, no_backing: true, ..OpenOptions::default() };
    let top = img_open(&reg, &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts })?;
    if p.has("c") && top.compressed().is_none() {
        return Err(CliError::new("Compression not supported for this file format"));
    }
    let new_fmt = p.value("F");
    if let Some(f) = new_fmt {
        // Protocol drivers are valid backing formats too.
        if reg.format(f).is_none() && f != "file" && f != "host_device" {
            return Err(CliError::new(format!("Invalid format name: '{f}'")));
        }
    }
    let new_name = new_name.filter(|n| !n.is_empty());
    if !unsafe_mode {
        let info = top.info()?;
        let src = OpenOptions { cache: src_cache, force_share: true, ..OpenOptions::default() };
        let old: Option<Arc<dyn BlockDriver>> = match &info.full_backing_filename {
            Some(path) => Some(
                reg.open(path, info.backing_filename_format.as_deref(), &src)
                    .map_err(|e| CliError::new(format!("Could not open old backing file '{path}': {}", e.message())))?
                    .driver,
            ),
            None => None,
        };
        let new: Option<Arc<dyn BlockDriver>> = match new_name {
            Some(n) => {
                let path = resolve_reference(name, n);
                let src = OpenOptions { force_share: p.has("U") || src.force_share, ..src.clone() };
                Some(
                    reg.open(&path, new_fmt, &src)
                        .map_err(|e| CliError::new(format!("Could not open new backing file '{n}': {}", e.message())))?
                        .driver,
                )
            }
            None => None,
        };
        copy_differences(&top, old.as_deref(), new.as_deref(), p.has("c"), progress)?;
    }
    let ops = top.backing_ops();
    if new_name.is_some() && new_fmt.is_none() && ops.is_some() {
        error_report(&format!(
            "Could not change the backing file to '{}': backing format must be specified",
            new_name.unwrap_or("")
        ));
        return Ok(1);
    }
    let result = match ops {
        Some(o) => o.set_backing(new_name, new_fmt),
        None => Err(blockdev::Error::from_errno("rebase", libc::ENOTSUP)),
    };
    let shown = new_name.unwrap_or("");
    match result {
        Err(e) if e.errno() == Some(libc::ENOSPC) => {
            error_report(&format!("Could not change the backing file to '{shown}': No space left in the file header"));
            return Ok(1);
        }
        Err(e) => {
            error_report(&format!("Could not change the backing file to '{shown}': {}", e.message()));
            return Ok(1);
        }
        Ok(()) => {}
    }
    progress.set(100.0);
    top.close()?;
    Ok(0)
}

/// Writes into `top`, wherever it allocates nothing, the units where the old backing view differs
/// from the new one.
fn copy_differences(
    top: &Arc<dyn BlockDriver>,
    old: Option<&dyn BlockDriver>,
    new: Option<&dyn BlockDriver>,
    compress: bool,
    progress: &Progress,
) -> Result<(), CliError> {
    let size = top.size();
    let unit = if compress {
        top.compressed().map(|c| c.compressed_unit()).unwrap_or(65536)
    } else {
        top.cluster_size().map(|c| c.min(subcluster(top.as_ref(), c))).unwrap_or(512)
    };
    let old_size = old.map(|b| b.size()).unwrap_or(0);
    let new_size = new.map(|b| b.size()).unwrap_or(0);
    // Aligned, so that differences written from them need no bounce buffer under O_DIRECT.
    let mut a = blockdev::buffer::AlignedBuf::new(CHUNK as usize, 4096);
    let mut b = blockdev::buffer::AlignedBuf::new(CHUNK as usize, 4096);
    let mut maps = Maps::default();
    let mut writer = DiffWriter::new(top.clone());
    let mut offset = 0u64;
    while offset < size {
        let ext = top.block_status(offset, (size - offset).min(MAPPED_CHUNK))?;
        let mut n = ext.len.clamp(1, size - offset);
        if ext.kind != ExtentKind::Unallocated {
            offset += n;
            progress.add(n as f32 / size as f32 * 100.0, 100.0);
            continue;
        }
        // Align the run to whole units (they are unallocated as a whole).
        let start = offset / unit * unit;
        n = ((offset + n).div_ceil(unit) * unit).min(size) - start;
        // Where both views read zeros they cannot differ: skip without reading.
        let zeros = zero_run(old, start, n)?.min(zero_run(new, start, n)?) / unit * unit;
        if zeros > 0 {
            progress.add((start + zeros - offset) as f32 / size as f32 * 100.0, 100.0);
            offset = start + zeros;
            continue;
        }
        // Where both views are plain data in local files (or one reads zeros), compare in place.
        let run = Run { top: top.as_ref(), old, new, start, len: n, unit, old_size, compress };
        let mapped = maps.compare_mapped(&run, &mut writer)?;
        if mapped > 0 {
            progress.add((start + mapped - offset) as f32 / size as f32 * 100.0, 100.0);
            offset = start + mapped;
            continue;
        }
        let n = n.min(CHUNK);
        let n_old = old_size.saturating_sub(start).min(n) as usize;
        let n_new = new_size.saturating_sub(start).min(n) as usize;
        // The two views are read at the same time (two files, often two disks' worth of reads).
        let (ra, rb) = std::thread::scope(|sc| {
            let (a, b) = (&mut a[..n as usize], &mut b[..n as usize]);
            let other = sc.spawn(move || read_view(new, start, b, n_new));
            (read_view(old, start, a, n_old), other.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        ra.map_err(|_| CliError::new("error while reading from old backing file"))?;
        rb.map_err(|_| CliError::new("error while reading from new backing file"))?;
        writer
            .settle()
            .and_then(|()| {
                write_differences(top.as_ref(), start, &a[..n as usize], &b[..n as usize], unit, old_size, compress)
            })
            .map_err(|e| CliError::new(format!("Error while writing to COW image: {}", e.message())))?;
        progress.add((start + n - offset) as f32 / size as f32 * 100.0, 100.0);
        offset = start + n;
    }
    writer.finish().map_err(|e| CliError::new(format!("Error while writing to COW image: {}", e.message())))
}

/// Writes into `top` at `start` the units where `old` (the old backing view) differs from `new`.
fn write_differences(
    top: &dyn BlockDriver,
    start: u64,
    old: &[u8],
    new: &[u8],
    unit: u64,
    old_size: u64,
    compress: bool,
) -> blockdev::Result<()> {
    let mask = differing_units(old, new, unit as usize);
    write_runs(top, start, old, &mask, unit, old_size, compress)
}

/// Writes into `top` at `start` the units of `old` that `mask` marks, each run of marked units in
/// one request (compressed units one by one).
fn write_runs(
    top: &dyn BlockDriver,
    start: u64,
    old: &[u8],
    mask: &[bool],
    unit: u64,
    old_size: u64,
    compress: bool,
) -> blockdev::Result<()> {
    let unit = unit as usize;
    let differs = |i: usize| mask[i / unit];
    let mut i = 0usize;
    while i < old.len() {
        if !differs(i) {
            i += unit;
            continue;
        }
        let at = start + i as u64;
        if compress && i + unit <= old.len() && at < old_size {
            let cw = top.compressed().ok_or_else(|| blockdev::Error::unsupported("compression"))?;
            let x = &old[i..i + unit];
            let c = cw.compress(x)?;
            cw.write_compressed(at, x, c.as_deref())?;
            i += unit;
            continue;
        }
        // The run of differing units on the same side of the old view's end.
        let past_end = at >= old_size;
        let mut j = i + unit;
        while j < old.len() && differs(j) && (start + j as u64 >= old_size) == past_end && !compress {
            j += unit;
        }
        let j = j.min(old.len());
        if past_end {
            top.write_zeroes(at, (j - i) as u64, ZeroFlags::default())?;
        } else {
            top.write_at(at, &[std::io::IoSlice::new(&old[i..j])])?;
        }
        i = j;
    }
    Ok(())
}

/// For each unit of `old`, whether `new` differs there; large ranges are compared by two threads.
fn differing_units(old: &[u8], new: &[u8], unit: usize) -> Vec<bool> {
    let units = old.len().div_ceil(unit);
    let compare = |range: std::ops::Range<usize>| -> Vec<bool> {
        range
            .map(|i| {
                let (s, e) = (i * unit, ((i + 1) * unit).min(old.len()));
                old[s..e] != new[s..e]
            })
            .collect()
    };
    if old.len() < (1 << 20) || units < 2 {
        return compare(0..units);
    }
    let half = units / 2;
    std::thread::scope(|sc| {
        let second = sc.spawn(|| compare(half..units));
        let mut first = compare(0..half);
        first.extend(second.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        first
    })
}

/// How many bytes from `at` (up to `len`) a backing view reads as zeros, by its block status
/// (no view: all of them).
fn zero_run(view: Option<&dyn BlockDriver>, at: u64, len: u64) -> Result<u64, CliError> {
    let Some(v) = view else { return Ok(len) };
    if at >= v.size() {
        return Ok(len);
    }
    let (ext, _) = blockdev::chain_status(v, at, len.min(v.size() - at))?;
    let zero = matches!(ext.kind, ExtentKind::Zero | ExtentKind::ZeroData | ExtentKind::Unallocated);
    Ok(if !zero {
        0
    } else if at + ext.len >= v.size() {
        len
    } else {
        ext.len.min(len)
    })
}

fn subcluster(top: &dyn BlockDriver, cluster: u64) -> u64 {
    // Images with extended L2 entries allocate in 1/32 of a cluster.
    match top.info() {
        Ok(i)
            if i.format_specific.as_ref().and_then(|(_, d)| d.get("extended-l2").cloned())
                == Some(blockdev::qobject::Value::Bool(true)) =>
        {
            cluster / 32
        }
        _ => cluster,
    }
}

fn read_view(d: Option<&dyn BlockDriver>, at: u64, buf: &mut [u8], valid: usize) -> blockdev::Result<()> {
    buf[valid..].fill(0);
    if let (Some(d), true) = (d, valid > 0) {
        d.read_at(at, &mut [IoSliceMut::new(&mut buf[..valid])])?;
    }
    Ok(())
}
