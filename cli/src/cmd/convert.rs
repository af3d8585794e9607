//! `convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps]
//! [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt]
//! [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size]
//! [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename`
//!
//! The checks run in qemu-img's order so that the same mistake gets the same message; the data
//! moves through the copy engine (`blockdev::copy`): holes are never read, zero runs of at least
//! `-S` bytes are left out, `-m` workers run in parallel and writes stay in order unless `-W`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blockdev::bitmap::{BitmapChange, MergeSource};
use blockdev::copy::{
    budget_buf_size, count_data, default_workers, Copy, CopyOptions, Progress as CopyProgress, DEFAULT_BUF_SIZE,
};
use blockdev::options::{wants_help, CreateOptions};
use blockdev::{BlockDriver, CacheMode, Concat, DiscardOptions, OpenOptions};

use crate::args::{flag, opt, parse, Opt, Parsed};
use crate::cmd::create::print_option_help;
use crate::cmd::{accumulate_options, cvtnum, registry};
use crate::common::{cache_mode, img_open, Objects, OpenRequest};
use crate::progress::Progress;
use crate::report::{warn_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    opt("O", Some('O'), None),
    opt("B", Some('B'), None),
    flag("C", Some('C'), None),
    flag("c", Some('c'), None),
    opt("F", Some('F'), None),
    opt("o", Some('o'), None),
    opt("l", Some('l'), None),
    opt("S", Some('S'), None),
    flag("p", Some('p'), None),
    opt("t", Some('t'), None),
    opt("T", Some('T'), None),
    flag("q", Some('q'), None),
    flag("n", Some('n'), None),
    opt("m", Some('m'), None),
    flag("W", Some('W'), None),
    flag("U", Some('U'), Some("force-share")),
    opt("r", Some('r'), None),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
    flag("target-image-opts", None, Some("target-image-opts")),
    flag("salvage", None, Some("salvage")),
    flag("target-is-zero", None, Some("target-is-zero")),
    flag("bitmaps", None, Some("bitmaps")),
    flag("skip-broken-bitmaps", None, Some("skip-broken-bitmaps")),
];

/// qemu-img's limit on `-m`.
const MAX_COROUTINES: i64 = 16;
/// qemu-img's limit on `-S`, in bytes (32768 sectors).
const MAX_SPARSE: u64 = 32768 * 512;

/// Everything the command line says, checked.
struct Args<'a> {
    p: &'a Parsed,
    sources: &'a [String],
    out: &'a str,
    out_fmt: Option<&'a str>,
    options: Option<String>,
    min_sparse: u64,
    workers: usize,
    quiet: bool,
}

/// Runs `convert`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    let options = accumulate_options(p.values("o"))?;
    let min_sparse = match p.value("S") {
        None => 4096,
        Some(v) => {
            let s = cvtnum("buffer size for sparse output", v)?;
            if s % 512 != 0 || s > MAX_SPARSE {
                return Err(CliError::new(format!(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. \
                     Select 0 to disable sparse detection (fully allocates output)."
                )));
            }
            s
        }
    };
    let workers = match p.value("m") {
        None => default_workers(),
        Some(v) => match parse_c_long(v) {
            Some(n) if (1..=MAX_COROUTINES).contains(&n) => n as usize,
            _ => {
                return Err(CliError::new(format!(
                    "Invalid number of coroutines. Allowed number of coroutines is between 1 and {MAX_COROUTINES}"
                )))
            }
        },
    };
    if let Some(r) = p.value("r") {
        cvtnum("rate limit", r)?;
    }
    Objects::parse(p.values("object"))?;
    let tgt_image_opts = p.has("target-image-opts");
    let out_fmt = p.value("O").or(if tgt_image_opts { None } else { Some("raw") });
    let skip_create = p.has("n");
    let checks: [(bool, &str); 6] = [
        (p.has("skip-broken-bitmaps") && !p.has("bitmaps"), "Use of --skip-broken-bitmaps requires --bitmaps"),
        (p.has("c") && p.has("C"), "Cannot enable copy offloading when -c is used"),
        (p.has("S") && p.has("C"), "Cannot enable copy offloading when -S is used"),
        (p.has("C") && p.has("salvage"), "Cannot use copy offloading in salvaging mode"),
        (tgt_image_opts && !skip_create, "--target-image-opts requires use of -n flag"),
        (skip_create && options.is_some(), "-o has no effect when skipping image creation"),
    ];
    if let Some((_, msg)) = checks.iter().find(|(bad, _)| *bad) {
        return Err(CliError::new(*msg));
    }
    if p.has("target-is-zero") && !skip_create {
        return Err(CliError::new("--target-is-zero requires use of -n flag"));
    }
    let n = p.positional.len();
    let out = if n >= 2 { Some(p.positional[n - 1].as_str()) } else { None };
    if let Some(o) = &options {
        if wants_help(o) {
            return match out_fmt {
                Some(f) => print_option_help(&registry(), out.or(p.positional.first().map(String::as_str)), f),
                None => Err(CliError::new("Option help requires a format be specified")),
            };
        }
    }
    let Some(out) = out else {
        return Err(CliError::new("Must specify image file name"));
    };
    let a =
        Args { p: &p, sources: &p.positional[..n - 1], out, out_fmt, options, min_sparse, workers, quiet: p.has("q") };
    convert(&a)
}

/// strtol with base 0: decimal, hex or octal, optionally signed.
fn parse_c_long(v: &str) -> Option<i64> {
    let (neg, t) = match v.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse().ok()?
    };
    Some(if neg { -n } else { n })
}

fn convert(a: &Args<'_>) -> CmdResult {
    let p = a.p;
    let src_cache = cache_mode(p.value("T"), CacheMode::Writeback, "source cache")?;
    let progress = Progress::new(p.has("p") && !a.quiet, 1.0);
    progress.add(0.0, 100.0);
    let result = convert_inner(a, src_cache, &progress);
    if result.is_ok() {
        progress.set(100.0);
    }
    progress.end();
    result
}

fn convert_inner(a: &Args<'_>, src_cache: CacheMode, progress: &Progress) -> CmdResult {
    let p = a.p;
    let reg = registry();
    // Sources: read-only, not sharing writes with anybody (qemu-img's BDRV_O_NO_SHARE).
    let mut sources: Vec<Arc<dyn BlockDriver>> = Vec::new();
    for name in a.sources {
        let opts = OpenOptions { cache: src_cache, force_share: p.has("U"), exclusive: true, ..OpenOptions::default() };
        let req = OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts };
        sources.push(img_open(&reg, &req)?);
    }
    if let Some(snap) = p.value("l") {
        if sources.len() > 1 && !snap.starts_with("snapshot.") {
            return Err(CliError::new("No support for concatenating multiple snapshot"));
        }
        let param = crate::cmd::measure::parse_snapshot_param(snap)?;
        crate::cmd::measure::load_snapshot(sources[0].as_ref(), &param)?;
    }
    let total_size: u64 = sources.iter().map(|s| s.size().div_ceil(512) * 512).sum();
    // Target options.
    let mut create_opts = CreateOptions::new();
    create_opts.set_secrets(crate::common::defined_secrets());
    let mut target_backing = p.value("B").map(str::to_string);
    if !p.has("n") {
        let fmt_name = a.out_fmt.unwrap_or("raw");
        let format = reg.format_or(fmt_name, || crate::common::unknown_file_format(fmt_name))?;
        let specs = reg.create_specs(format);
        if let Some(o) = &a.options {
            create_opts.parse_into(o, &specs)?;
        }
        create_opts.set("size", &total_size.to_string());
        let has = |k: &str| specs.iter().any(|s| s.name == k);
        if let Some(b) = p.value("B") {
            if !has("backing_file") {
                return Err(CliError::new(format!("Backing file not supported for file format '{fmt_name}'")));
            }
            create_opts.set("backing_file", b);
        }
        if let Some(f) = p.value("F") {
            if !has("backing_fmt") {
                return Err(CliError::new(format!("Backing file format not supported for file format '{fmt_name}'")));
            }
            create_opts.set("backing_fmt", f);
        }
        if let Some(b) = create_opts.get("backing_file") {
            target_backing = Some(b.to_string());
        }
    }
    if p.has("target-is-zero") && target_backing.is_some() {
        return Err(CliError::new("Cannot use --target-is-zero when the destination image has a backing file"));
    }
    if sources.len() > 1 && target_backing.is_some() {
        return Err(CliError::new(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    if create_opts.has("backing_file") && !create_opts.has("backing_fmt") {
        return Err(CliError::new("Use of backing file requires explicit backing format"));
    }
    if p.has("c") {
        let fmt_name = a.out_fmt.unwrap_or("raw");
        if reg.format(fmt_name).is_some_and(|f| !f.can_compress()) {
            return Err(CliError::new("Compression not supported for this file format"));
        }
        if create_opts.get_bool("encryption").ok().flatten() == Some(true) || create_opts.has("encrypt.format") {
            return Err(CliError::new("Compression and encryption not supported at the same time"));
        }
        if create_opts.get("preallocation").is_some_and(|v| v != "off") {
            return Err(CliError::new("Compression and preallocation not supported at the same time"));
        }
    }
    let copy_bitmaps = p.has("bitmaps");
    if copy_bitmaps {
        if sources.len() > 1 {
            return Err(CliError::new("Copying bitmaps only possible with single source"));
        }
        check_bitmaps(sources[0].as_ref(), p.has("skip-broken-bitmaps"))?;
    }
    if !p.has("n") {
        let fmt_name = a.out_fmt.unwrap_or("raw");
        reg.create(fmt_name, a.out, &create_opts)
            .map_err(|e| CliError::new(format!("{}: error while converting {fmt_name}: {}", a.out, e.message())))?;
    }
    // Target: read-write with the output cache mode (unsafe by default: no flushes).
    let cache = cache_mode(p.value("t"), CacheMode::Unsafe, "cache")?;
    // An encrypted target is opened with the key it was created with (qemu passes the creation
    // options on to the open).
    let key_secret = match create_opts.secret("key-secret") {
        Ok(Some(s)) => Some(s),
        _ => create_opts.secret("encrypt.key-secret").ok().flatten(),
    };
    // qemu-img lets zero writes unmap (and frees clusters' space) unless -S 0 asked for a fully
    // allocated target.
    let discard = if a.min_sparse > 0 { DiscardOptions::default() } else { DiscardOptions::ignore() };
    let opts = OpenOptions { read_only: false, cache, key_secret, discard, ..OpenOptions::default() };
    let req = OpenRequest { name: a.out, fmt: a.out_fmt, image_opts: p.has("target-image-opts"), opts };
    let target = img_open(&reg, &req)?;
    if copy_bitmaps && !target.bitmaps().is_some_and(|b| b.supported()) {
        return Err(CliError::new(format!("Format driver '{}' does not support bitmaps", target.format())));
    }
    if p.has("c") && target.compressed().is_none() {
        return Err(CliError::new("Compression not supported for this file format"));
    }
    let compress = p.has("c") || target.compressed().is_some_and(|c| c.compression_required());
    if p.has("n") && target.size() < total_size {
        return Err(CliError::new("output file is smaller than input file"));
    }
    let source: Arc<dyn BlockDriver> =
        if sources.len() == 1 { sources.remove(0) } else { Arc::new(Concat::new(sources).map_err(CliError::from)?) };
    let target_new = !p.has("n");
    let zero_init = p.has("target-is-zero")
        || (target_new && a.min_sparse > 0 && target_backing.is_none() && target.has_zero_init());
    let request_align = target.storage().map(|s| s.alignment().request as u64).unwrap_or(512).max(512);
    let pow2floor = |v: u64| if v == 0 { 0 } else { 1u64 << (63 - v.leading_zeros()) };
    let copy = Copy {
        src: source.as_ref(),
        src_offset: 0,
        dst: target.as_ref(),
        dst_offset: 0,
        len: total_size,
        opts: CopyOptions {
            workers: a.workers,
            in_order: !p.has("W"),
            min_sparse: a.min_sparse,
            alignment: pow2floor(a.min_sparse).max(request_align),
            offload: p.has("C"),
            target_zeroed: zero_init,
            above: target_backing.is_some().then_some(1),
            // Progress lines are per job; with `-p` jobs are qemu-img's 2 MiB chunks so that the
            // lines match qemu-img's, otherwise they are sized to the memory budget.
            buf_size: if p.has("p") { DEFAULT_BUF_SIZE } else { budget_buf_size(a.workers) },
            salvage: p.has("salvage"),
            compress,
            detect_zeroes: true,
        },
    };
    let total = if p.has("p") && !a.quiet { count_data(&copy).map_err(CliError::from)? } else { 0 };
    let on_progress = |pr: CopyProgress| {
        if pr.total > 0 {
            progress.set((pr.done as f64 * 100.0 / pr.total as f64) as f32);
        }
    };
    let quiet = a.quiet;
    let on_warn = |m: &str| {
        if !quiet {
            warn_report(m);
        }
    };
    let cancel = AtomicBool::new(false);
    copy.run(&on_progress, &on_warn, &cancel, total).map_err(CliError::from)?;
    if copy_bitmaps {
        copy_bitmaps_into(source.as_ref(), target.as_ref(), p.has("skip-broken-bitmaps"))?;
    }
    target.close().map_err(|e| CliError::new(format!("error while closing '{}': {}", a.out, e.message())))?;
    Ok(0)
}

/// Refuses `--bitmaps` up front when the source cannot have bitmaps or has an inconsistent one
/// (unless they are to be skipped).
fn check_bitmaps(src: &dyn BlockDriver, skip_broken: bool) -> Result<(), CliError> {
    let Some(b) = src.bitmaps().filter(|b| b.supported()) else {
        return Err(CliError::new("Source lacks bitmap support"));
    };
    if skip_broken {
        return Ok(());
    }
    // qemu walks its bitmaps newest first: the last inconsistent one in the directory is named.
    if let Some(bad) = b.list()?.into_iter().rev().find(|i| i.in_use) {
        crate::report::error_report(&format!("Cannot copy inconsistent bitmap '{}'", bad.name));
        eprintln!("Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it");
        return Err(CliError::silent(1));
    }
    Ok(())
}

/// Copies every persistent bitmap of `src` into `dst` (after the data), in the source's order,
/// keeping granularity and enabled state; one batch, stored once (as qemu stores them on close).
fn copy_bitmaps_into(src: &dyn BlockDriver, dst: &dyn BlockDriver, skip_broken: bool) -> Result<(), CliError> {
    let (Some(from), Some(to)) = (src.bitmaps(), dst.bitmaps()) else { return Ok(()) };
    let list = from.list()?;
    // Warnings in qemu's order (newest first); the copies keep the source's directory order.
    for info in list.iter().rev().filter(|i| skip_broken && i.in_use) {
        warn_report(&format!("Skipping inconsistent bitmap '{}'", info.name));
    }
    let copied: Vec<_> = list.iter().filter(|i| !i.in_use).collect();
    let changes: Vec<BitmapChange<'_>> = copied
        .iter()
        .flat_map(|i| {
            let name = i.name.as_str();
            [
                BitmapChange::Add { name, granularity: Some(i.granularity), enabled: i.enabled },
                BitmapChange::Merge { name, from: MergeSource::Image(from, name) },
            ]
        })
        .collect();
    to.apply(&changes).map_err(|(k, e)| {
        let name = &copied[k / 2].name;
        if k % 2 == 0 {
            CliError::new(format!("Failed to create bitmap {name}: {}", e.message()))
        } else {
            let _ = to.remove(name);
            CliError::new(format!("Failed to populate bitmap {name}: {}", e.message()))
        }
    })
}
