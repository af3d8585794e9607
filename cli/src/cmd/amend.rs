//! `amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options
//! filename`

use blockdev::options::{help_text, wants_help, CreateOptions, OptionSpec};
use blockdev::{CacheMode, OpenOptions};
use formats::Registry;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::{accumulate_options, registry};
use crate::common::{cache_mode, img_open, Objects, OpenRequest};
use crate::progress::Progress;
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("o", Some('o'), None),
    opt("f", Some('f'), None),
    opt("t", Some('t'), None),
    flag("p", Some('p'), None),
    flag("q", Some('q'), None),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
    flag("force", None, Some("force")),
];

fn print_help(reg: &Registry, fmt: &str) -> CmdResult {
    let f = reg.format_or(fmt, || crate::common::unknown_file_format(fmt))?;
    let specs = f
        .amend_options()
        .ok_or_else(|| CliError::new(format!("Format driver '{fmt}' does not support option amendment")))?;
    print!("{}", help_text(&format!("Amend options for '{fmt}':"), specs));
    Ok(0)
}

fn parse_amend(options: &str, amend: &[OptionSpec], create: &[OptionSpec]) -> Result<CreateOptions, CliError> {
    let mut o = CreateOptions::new();
    if let Err(e) = o.parse_into(options, amend) {
        let mut all = amend.to_vec();
        all.extend_from_slice(create);
        let creation_only = CreateOptions::new().parse_into(options, &all).is_ok();
        let mut msg = e.message().to_string();
        if creation_only {
            msg.push_str("\nThis option is only supported for image creation");
        }
        return Err(CliError::new(msg));
    }
    Ok(o)
}

/// Runs `amend`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    let Some(options) = accumulate_options(p.values("o"))? else {
        return Err(CliError::usage("Must specify options (-o)"));
    };
    let reg = registry();
    if let Some(fmt) = p.value("f") {
        if wants_help(&options) {
            return print_help(&reg, fmt);
        }
    }
    if p.positional.len() != 1 {
        return Err(CliError::new("Expecting one image file name"));
    }
    let quiet = p.has("q");
    let cache = cache_mode(p.value("t"), CacheMode::Writeback, "cache")?;
    let name = &p.positional[0];
    let opts = OpenOptions { read_only: false, cache, ..OpenOptions::default() };
    let drv = img_open(&reg, &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts })?;
    let fmt = drv.format();
    if wants_help(&options) {
        return print_help(&reg, fmt);
    }
    let Some(amender) = drv.amend() else {
        return Err(CliError::new(format!("Format driver '{fmt}' does not support option amendment")));
    };
    let create_specs = reg.format(fmt).map(|f| reg.create_specs(f)).unwrap_or_default();
    let mut parsed = parse_amend(&options, amender.amend_options(), &create_specs)?;
    parsed.set_secrets(crate::common::defined_secrets());
    let progress = Progress::new(p.has("p") && !quiet, 1.0);
    progress.set(0.0);
    let result = amender.amend(&parsed, p.has("force"), &mut |share| progress.set(share * 100.0));
    if result.is_ok() {
        progress.set(100.0);
    }
    progress.end();
    // Zero cluster expansion reports a driver's detail on its own line, then the errno.
    const EXPAND: &str = "Failed to turn zero into data clusters: ";
    let result = result.map_err(|e| match e.message().strip_prefix(EXPAND) {
        Some(detail) if e.errno().is_some() => {
            let inner = blockdev::Error::from_errno("amend", e.errno().unwrap_or(0)).with_message(detail);
            let text = crate::report::errno_report(&inner);
            blockdev::Error::new(e.kind(), format!("{EXPAND}{text}"))
        }
        _ => e,
    });
    result?;
    drv.close()?;
    Ok(0)
}
