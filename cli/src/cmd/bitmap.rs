//! `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file
//! [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap`
//!
//! The actions run in command-line order on the image opened read-write without its backing
//! chain; the first that fails stops the rest ("Operation ACTION on bitmap NAME failed: ...").
//! `--merge SOURCE` takes bitmap SOURCE from the image itself or from `-b source_file`.

use blockdev::bitmap::{BitmapChange, MergeSource, PersistentBitmaps};
use blockdev::{BlockDriver, OpenOptions};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::{cvtnum, registry};
use crate::common::{img_open, Objects, OpenRequest};
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("b", Some('b'), None),
    opt("f", Some('f'), None),
    opt("F", Some('F'), None),
    opt("g", Some('g'), Some("granularity")),
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
    // qemu hands the granularity on as 32 bits: 4G becomes 0 (and is refused as too small).
    let granularity =
        p.value("g").map(|g| cvtnum("granularity", g)).transpose()?.filter(|&g| g != 0).map(|g| g as u32 as u64);
    let reg = registry();
    let opts = OpenOptions { read_only: false, no_backing: true, ..OpenOptions::default() };
    let drv = img_open(&reg, &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts })?;
    let src = match p.value("b") {
        Some(b) => {
            let opts = OpenOptions { read_only: true, no_backing: true, ..OpenOptions::default() };
            Some(img_open(&reg, &OpenRequest { name: b, fmt: p.value("F"), image_opts: false, opts })?)
        }
        None => None,
    };
    let src_drv = src.as_ref().unwrap_or(&drv);
    let actions = p.in_order(&["add", "remove", "clear", "enable", "disable", "merge"]);
    let result = run_actions(drv.as_ref(), src_drv.as_ref(), src.is_some(), &actions, bitmap, granularity);
    if let Some(s) = src {
        let _ = s.close();
    }
    if let Err(e) = drv.close() {
        if let Err(first) = result {
            crate::report::error_report(first.message());
        }
        return Err(CliError::new(format!("Error while closing the image: {}", e.message())));
    }
    result
}

/// Runs the actions in order as one batch (stored once, as qemu stores its bitmaps on close);
/// the first failure is reported as "Operation ACTION on bitmap NAME failed: ...".
fn run_actions(
    drv: &dyn BlockDriver,
    src: &dyn BlockDriver,
    other_source: bool,
    actions: &[(&'static str, Option<String>)],
    bitmap: &str,
    granularity: Option<u64>,
) -> CmdResult {
    let failed = |action: &str, e: blockdev::Error| {
        Err(CliError::new(format!("Operation {action} on bitmap {bitmap} failed: {}", e.message())))
    };
    let Some(b) = drv.bitmaps() else {
        let (action, _) = actions[0];
        return failed(
            action,
            match action {
                "add" => blockdev::Error::from_errno("bitmap", libc::ENOTSUP)
                    .prefixed(format!("Can't store persistent bitmaps to {}", drv.filename())),
                _ => not_found(bitmap),
            },
        );
    };
    let src_bitmaps = src.bitmaps();
    let changes: Vec<BitmapChange<'_>> = actions
        .iter()
        .map(|(action, value)| match *action {
            "add" => BitmapChange::Add { name: bitmap, granularity, enabled: true },
            "remove" => BitmapChange::Remove(bitmap),
            "clear" => BitmapChange::Clear(bitmap),
            "enable" => BitmapChange::SetEnabled(bitmap, true),
            "disable" => BitmapChange::SetEnabled(bitmap, false),
            _ => {
                let source = value.as_deref().unwrap_or_default();
                let from = match (other_source, src_bitmaps) {
                    (false, _) => MergeSource::Bitmap(source),
                    (true, Some(sb)) => MergeSource::Image(sb, source),
                    (true, None) => MergeSource::Image(&NoBitmaps, source),
                };
                BitmapChange::Merge { name: bitmap, from }
            }
        })
        .collect();
    match b.apply(&changes) {
        Ok(()) => Ok(0),
        Err((i, e)) => failed(actions[i].0, e),
    }
}

/// The bitmaps of an image format that has none (a merge source that finds nothing).
struct NoBitmaps;

impl PersistentBitmaps for NoBitmaps {
    fn supported(&self) -> bool {
        false
    }
    fn list(&self) -> blockdev::Result<Vec<blockdev::bitmap::BitmapInfo>> {
        Ok(Vec::new())
    }
    fn default_granularity(&self) -> u64 {
        65536
    }
    fn apply(&self, changes: &[BitmapChange<'_>]) -> Result<(), (usize, blockdev::Error)> {
        Err((0, blockdev::Error::unsupported(format!("{} changes to an image without bitmaps", changes.len()))))
    }
    fn read(&self, name: &str) -> blockdev::Result<blockdev::bitmap::DirtyBitmap> {
        Err(not_found(name))
    }
    fn mark_dirty(&self, _offset: u64, _len: u64) -> blockdev::Result<()> {
        Ok(())
    }
}

fn not_found(name: &str) -> blockdev::Error {
    blockdev::Error::invalid_argument(format!("Dirty bitmap '{name}' not found"))
}
