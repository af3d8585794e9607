//! `compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U]
//! filename1 filename2`
//!
//! Exit codes: 0 identical, 1 different, 2 an image could not be opened, 3 block status failed,
//! 4 a read failed.

use blockdev::compare::{compare, Failure, Outcome};
use blockdev::{CacheMode, OpenOptions};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{cache_mode, img_open, Objects, OpenRequest};
use crate::progress::Progress;
use crate::report::{error_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    opt("F", Some('F'), None),
    opt("T", Some('T'), None),
    flag("p", Some('p'), None),
    flag("q", Some('q'), None),
    flag("s", Some('s'), None),
    flag("U", Some('U'), Some("force-share")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Parallel readers for the comparison.
const WORKERS: usize = 2;

/// Runs `compare`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object")).map_err(|e| e.with_code(2))?;
    let quiet = p.has("q");
    if p.positional.len() != 2 {
        return Err(CliError::usage("Expecting two image file names"));
    }
    let (n1, n2) = (p.positional[0].as_str(), p.positional[1].as_str());
    let progress = Progress::new(p.has("p") && !quiet, 2.0);
    let result = run_compare(&p, n1, n2, quiet, &progress);
    progress.end();
    result
}

fn run_compare(p: &crate::args::Parsed, n1: &str, n2: &str, quiet: bool, progress: &Progress) -> CmdResult {
    let cache = cache_mode(p.value("T"), CacheMode::Writeback, "source cache").map_err(|e| e.with_code(2))?;
    let reg = registry();
    let opts = OpenOptions { cache, force_share: p.has("U"), ..OpenOptions::default() };
    let image_opts = p.has("image-opts");
    let a = img_open(&reg, &OpenRequest { name: n1, fmt: p.value("f"), image_opts, opts: opts.clone() })
        .map_err(|e| e.with_code(2))?;
    let b =
        img_open(&reg, &OpenRequest { name: n2, fmt: p.value("F"), image_opts, opts }).map_err(|e| e.with_code(2))?;
    let say = |m: &str| {
        if !quiet {
            println!("{m}");
        }
    };
    let base = a.size().max(b.size()).max(1) as f32;
    progress.add(0.0, 100.0);
    let on_chunk = |n: u64| progress.add(n as f32 / base * 100.0, 100.0);
    match compare(a.as_ref(), b.as_ref(), p.has("s"), WORKERS, &on_chunk) {
        Ok(Outcome::Identical) => {
            say("Images are identical.");
            Ok(0)
        }
        Ok(Outcome::IdenticalSizesDiffer) => {
            say("Warning: Image size mismatch!");
            say("Images are identical.");
            Ok(0)
        }
        Ok(Outcome::Mismatch(at)) => {
            if at >= a.size().min(b.size()) {
                say("Warning: Image size mismatch!");
            }
            say(&format!("Content mismatch at offset {at}!"));
            Ok(1)
        }
        Ok(Outcome::StrictSizeMismatch) => {
            say("Strict mode: Image size mismatch!");
            Ok(1)
        }
        Ok(Outcome::StrictStatusMismatch(at)) => {
            say(&format!("Strict mode: Offset {at} block status mismatch!"));
            Ok(1)
        }
        Err(Failure::Status { which, .. }) => {
            error_report(&format!("Sector allocation test failed for {}", if which == 1 { n1 } else { n2 }));
            Ok(3)
        }
        Err(Failure::Read { which, offset, error }) => {
            let name = if which == 1 { n1 } else { n2 };
            error_report(&format!("Error while reading offset {offset} of {name}: {}", error.message()));
            Ok(4)
        }
    }
}
