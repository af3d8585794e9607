//! `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file
//! [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap`
//!
//! Persistent dirty bitmaps are not implemented by any vdisk format yet: every action fails the way
//! qemu-img fails for a format that cannot store them.

use blockdev::OpenOptions;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::{cvtnum, registry};
use crate::common::{img_open, Objects, OpenRequest};
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("b", Some('b'), None),
    opt("f", Some('f'), None),
    opt("F", Some('F'), None),
    opt("g", Some('g'), None),
    flag("add", None, Some("add")),
    flag("remove", None, Some("remove")),
    flag("clear", None, Some("clear")),
    flag("enable", None, Some("enable")),
    flag("disable", None, Some("disable")),
    opt("merge", None, Some("merge")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Runs `bitmap`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    let actions: Vec<&str> =
        ["add", "remove", "clear", "enable", "disable", "merge"].into_iter().filter(|a| p.has(a)).collect();
    if actions.is_empty() {
        return Err(CliError::new("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"));
    }
    if let Some(g) = p.value("g") {
        if !p.has("add") {
            return Err(CliError::new("granularity only supported with --add"));
        }
        cvtnum("granularity", g)?;
    }
    if p.has("F") && !p.has("b") {
        return Err(CliError::new("-F only supported with -b"));
    }
    if p.has("b") && !p.has("merge") {
        return Err(CliError::new("Merge bitmap source file only supported with --merge"));
    }
    if p.positional.len() != 2 {
        return Err(CliError::usage("Expecting filename and bitmap name"));
    }
    let (name, bitmap) = (&p.positional[0], &p.positional[1]);
    let opts = OpenOptions { read_only: false, ..OpenOptions::default() };
    let drv = img_open(&registry(), &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts })?;
    Err(CliError::new(format!(
        "Operation {} on bitmap {bitmap} failed: Can't store persistent bitmaps to {}: Operation not supported",
        actions[0],
        drv.filename()
    )))
}
