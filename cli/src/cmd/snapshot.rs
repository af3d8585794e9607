//! `snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot |
//! -d snapshot] filename` (and `-f fmt`, which qemu-img accepts too)

use blockdev::OpenOptions;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{img_open, Objects, OpenRequest};
use crate::infofmt::{snapshot_header, snapshot_line};
use crate::report::{errno_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    flag("l", Some('l'), None),
    opt("a", Some('a'), None),
    opt("c", Some('c'), None),
    opt("d", Some('d'), None),
    opt("f", Some('f'), None),
    flag("q", Some('q'), None),
    flag("U", Some('U'), Some("force-share")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Runs `snapshot`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    let actions =
        ["l", "a", "c", "d"].iter().map(|a| if p.has(a) { p.values(a).len().max(1) } else { 0 }).sum::<usize>();
    if actions > 1 {
        return Err(CliError::usage("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    Objects::parse(p.values("object"))?;
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let name = &p.positional[0];
    let list = p.has("l");
    // qemu-img opens without discard=unmap here (snapshot frees are passed on regardless).
    let opts = OpenOptions {
        read_only: list,
        force_share: p.has("U"),
        discard: blockdev::DiscardOptions::ignore(),
        ..OpenOptions::default()
    };
    let req = OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts };
    let drv = img_open(&registry(), &req)?;
    let snaps = drv.snapshots();
    if list {
        if let Some(s) = snaps {
            let all = s.list()?;
            if !all.is_empty() {
                println!("Snapshot list:");
                println!("{}", snapshot_header());
                for sn in &all {
                    println!("{}", snapshot_line(sn));
                }
            }
        }
    } else if let Some(tag) = p.value("c") {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let r = match snaps {
            Some(s) => s.create(tag, now.as_secs() as i64, now.subsec_micros() as i64 * 1000),
            None => Err(blockdev::Error::from_errno("snapshot", libc::ENOTSUP)),
        };
        r.map_err(|e| CliError::new(format!("Could not create snapshot '{tag}': {}", e.message())))?;
    } else if let Some(tag) = p.value("a") {
        // Applying a snapshot rewinds the disk under the bitmaps, which would then describe
        // writes that no longer exist; qemu refuses while the image has any (even disabled or
        // inconsistent ones), before it looks for the snapshot.
        let has_bitmaps = match drv.bitmaps() {
            Some(b) => !b
                .list()
                .map_err(|e| CliError::new(format!("Could not apply snapshot '{tag}': {}", e.message())))?
                .is_empty(),
            None => false,
        };
        if has_bitmaps {
            return Err(CliError::new(format!("Could not apply snapshot '{tag}': Device has active dirty bitmaps")));
        }
        let r = match snaps {
            Some(s) => s
                .apply(tag)
                .map_err(|e| blockdev::Error::new(e.kind(), format!("Failed to load snapshot: {}", errno_report(&e)))),
            None => Err(blockdev::Error::unsupported("Block driver does not support snapshots")),
        };
        r.map_err(|e| CliError::new(format!("Could not apply snapshot '{tag}': {}", e.message())))?;
    } else if let Some(tag) = p.value("d") {
        // As qemu-img: the snapshot whose id is the tag, else the first whose name is.
        let all = match snaps {
            Some(s) => s.list().unwrap_or_default(),
            None => Vec::new(),
        };
        let found = all.iter().find(|sn| sn.id == *tag).or_else(|| all.iter().find(|sn| sn.name == *tag));
        let (Some(sn), Some(s)) = (found, snaps) else {
            return Err(CliError::new(format!("Could not delete snapshot '{tag}': snapshot not found")));
        };
        s.delete(Some(&sn.id), Some(&sn.name))
            .map_err(|e| CliError::new(format!("Could not delete snapshot '{tag}': {}", e.message())))?;
    }
    drv.close()?;
    Ok(0)
}
