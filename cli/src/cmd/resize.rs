//! `resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink]
//! filename [+ | -]size`
//!
//! The size is taken off the end of the arguments before options are parsed, so `-1G` is a size
//! and not an option, as in qemu-img.

use blockdev::options::parse_size_option;
use blockdev::{OpenOptions, Prealloc, ResizeOptions};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{img_open, Objects, OpenRequest};
use crate::report::{warn_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    flag("q", Some('q'), None),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
    opt("preallocation", None, Some("preallocation")),
    flag("shrink", None, Some("shrink")),
];

/// Runs `resize`.
pub fn run(args: &[String]) -> CmdResult {
    if args.len() < 2 {
        return Err(CliError::usage("Not enough arguments"));
    }
    let (size_arg, rest) = args.split_last().ok_or_else(|| CliError::usage("Not enough arguments"))?;
    let p = parse(rest, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    let prealloc = match p.value("preallocation") {
        None => Prealloc::Off,
        Some(v) => Prealloc::parse(v).ok_or_else(|| CliError::new(format!("Invalid preallocation mode '{v}'")))?,
    };
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting image file name and size"));
    }
    let filename = &p.positional[0];
    let (relative, digits) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i128, &size_arg[1..]),
        Some(b'-') => (-1i128, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = parse_size_option("size", digits)?;
    let quiet = p.has("q");
    let opts = OpenOptions { read_only: false, ..OpenOptions::default() };
    let drv = img_open(
        &registry(),
        &OpenRequest { name: filename, fmt: p.value("f"), image_opts: p.has("image-opts"), opts },
    )?;
    let current = drv.size() as i128;
    let total = if relative != 0 { current + relative * n as i128 } else { n as i128 };
    if total <= 0 {
        return Err(CliError::new("New image size must be positive"));
    }
    if total <= current && prealloc != Prealloc::Off {
        return Err(CliError::new("Preallocation can only be used for growing images"));
    }
    if total < current && !p.has("shrink") {
        let e = CliError::new("Use the --shrink option to perform a shrink operation.");
        e.emit();
        warn_report(
            "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
        );
        return Err(CliError::silent(1));
    }
    let total = u64::try_from(total).map_err(|_| CliError::new("New image size is too large"))?;
    drv.resize(total, &ResizeOptions { prealloc, allow_shrink: true })?;
    drv.close()?;
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}
