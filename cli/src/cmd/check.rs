//! `check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]]
//! [-T src_cache] [-U] filename`
//!
//! Exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 no checks for
//! this format.

use blockdev::info::CheckReport;
use blockdev::qobject::{to_json_pretty, Dict, Value};
use blockdev::{CacheMode, OpenOptions, RepairMode};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{cache_mode, img_open, output_format, Objects, OpenRequest, OutputFormat};
use crate::report::{error_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), Some("format")),
    opt("r", Some('r'), Some("repair")),
    opt("output", None, Some("output")),
    opt("T", Some('T'), None),
    flag("q", Some('q'), None),
    flag("U", Some('U'), Some("force-share")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Runs `check`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    let repair = match p.value("r") {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(v) => {
            return Err(CliError::usage(format!("Unknown option value for -r (expecting 'leaks' or 'all'): {v}")))
        }
    };
    Objects::parse(p.values("object"))?;
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let filename = &p.positional[0];
    let output = output_format(p.value("output"))?;
    let cache = cache_mode(p.value("T"), CacheMode::Writeback, "source cache")?;
    let quiet = p.has("q");
    let opts = OpenOptions {
        read_only: repair == RepairMode::None,
        cache,
        force_share: p.has("U"),
        for_check: true,
        ..OpenOptions::default()
    };
    let req = OpenRequest { name: filename, fmt: p.value("f"), image_opts: p.has("image-opts"), opts };
    let driver = img_open(&registry(), &req)?;
    let Some(checker) = driver.check() else {
        return Err(CliError::new(NO_CHECKS).with_code(63));
    };
    let out = StdoutText::new();
    let code = check_and_report(checker, repair, output, quiet, filename, driver.format(), &out);
    out.emit();
    code
}

/// Text for stdout. qemu-img's stdout is fully buffered when it is not a terminal, so there the
/// summary comes out at exit, after every message on stderr; on a terminal it is written at once.
struct StdoutText {
    held: Option<std::cell::RefCell<String>>,
}

impl StdoutText {
    fn new() -> Self {
        use std::io::IsTerminal;
        StdoutText { held: (!std::io::stdout().is_terminal()).then(Default::default) }
    }

    fn push(&self, text: &str) {
        match &self.held {
            Some(buf) => buf.borrow_mut().push_str(text),
            None => print!("{text}"),
        }
    }

    fn emit(self) {
        if let Some(buf) = self.held {
            print!("{}", buf.into_inner());
        }
    }
}

/// qemu-img's message for formats without checks (or without repair).
const NO_CHECKS: &str = "This image format does not support checks";

fn check_and_report(
    checker: &dyn blockdev::Check,
    repair: RepairMode,
    output: OutputFormat,
    quiet: bool,
    filename: &str,
    format: &str,
    out: &StdoutText,
) -> CmdResult {
    let mut print = |m: &str| match m.strip_prefix(blockdev::info::ERROR_REPORT_MARK) {
        Some(line) => error_report(line),
        None => eprintln!("{m}"),
    };
    let mut report = match checker.check(repair, &mut print) {
        Ok(r) => r,
        // A format that cannot repair refuses `-r` as qemu's -ENOTSUP from bdrv_check.
        Err(e) if e.kind() == blockdev::ErrorKind::Unsupported && e.message() == NO_CHECKS => {
            error_report(NO_CHECKS);
            return Ok(63);
        }
        Err(e) => {
            error_report(&format!("Check failed: {}", e.message()));
            return Ok(1);
        }
    };
    if report.corruptions_fixed > 0 || report.leaks_fixed > 0 {
        if output == OutputFormat::Human && !quiet {
            out.push(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                report.leaks_fixed, report.corruptions_fixed
            ));
        }
        let (lf, cf) = (report.leaks_fixed, report.corruptions_fixed);
        report = match checker.check(RepairMode::None, &mut print) {
            Ok(r) => r,
            Err(e) => {
                error_report(&format!("Check failed: {}", e.message()));
                return Ok(1);
            }
        };
        report.leaks_fixed = lf;
        report.corruptions_fixed = cf;
    }
    if !quiet {
        match output {
            OutputFormat::Human => out.push(&human(&report)),
            OutputFormat::Json => out.push(&format!("{}\n", to_json_pretty(&json_value(&report, filename, format)))),
        }
    }
    if report.check_errors > 0 {
        error_report("Check failed");
        return Ok(1);
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// qemu-img's human summary of a check.
pub fn human(c: &CheckReport) -> String {
    let mut out = String::new();
    if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if c.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                c.corruptions
            ));
        }
        if c.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                c.leaks
            ));
        }
        if c.check_errors > 0 {
            out.push_str(&format!("\n{} internal errors have occurred during the check.\n", c.check_errors));
        }
    }
    let total = c.total_clusters.unwrap_or(0);
    let alloc = c.allocated_clusters.unwrap_or(0);
    if total != 0 && alloc != 0 {
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            alloc,
            total,
            alloc as f64 * 100.0 / total as f64,
            c.fragmented_clusters.unwrap_or(0) as f64 * 100.0 / alloc as f64,
            c.compressed_clusters.unwrap_or(0) as f64 * 100.0 / alloc as f64
        ));
    }
    if let Some(end) = c.image_end_offset.filter(|&e| e != 0) {
        out.push_str(&format!("Image end offset: {end}\n"));
    }
    out
}

/// The QAPI ImageCheck object: optional fields only when non-zero, as qemu-img fills them.
pub fn json_value(c: &CheckReport, filename: &str, format: &str) -> Value {
    let nz = |v: u64| if v != 0 { Some(Value::from(v)) } else { None };
    let nzo = |v: Option<u64>| v.and_then(nz);
    let mut d = Dict::new();
    d.insert("filename", filename.into())
        .insert("format", format.into())
        .insert("check-errors", c.check_errors.into())
        .insert_opt("image-end-offset", nzo(c.image_end_offset))
        .insert_opt("corruptions", nz(c.corruptions))
        .insert_opt("leaks", nz(c.leaks))
        .insert_opt("corruptions-fixed", nz(c.corruptions_fixed))
        .insert_opt("leaks-fixed", nz(c.leaks_fixed))
        .insert_opt("total-clusters", nzo(c.total_clusters))
        .insert_opt("allocated-clusters", nzo(c.allocated_clusters))
        .insert_opt("fragmented-clusters", nzo(c.fragmented_clusters))
        .insert_opt("compressed-clusters", nzo(c.compressed_clusters));
    Value::Dict(d)
}
