//! `info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename`

use std::collections::HashSet;

use blockdev::info::ImageInfo;
use blockdev::OpenOptions;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{img_open, output_format, Objects, OpenRequest, OutputFormat};
use crate::infofmt;
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), Some("format")),
    opt("output", None, Some("output")),
    flag("backing-chain", None, Some("backing-chain")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
    flag("U", Some('U'), Some("force-share")),
];

/// Runs `info`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let output = output_format(p.value("output"))?;
    let chain = p.has("backing-chain");
    let list = collect(&p.positional[0], p.value("f"), p.has("image-opts"), chain, p.has("U"))?;
    match output {
        OutputFormat::Human => print!("{}", infofmt::human_list(&list)),
        OutputFormat::Json => println!("{}", infofmt::json(&list, chain)),
    }
    Ok(0)
}

/// Opens each image of the chain on its own (without its backing file) and collects its info,
/// refusing loops as qemu-img does.
pub fn collect(
    filename: &str,
    fmt: Option<&str>,
    image_opts: bool,
    chain: bool,
    force_share: bool,
) -> Result<Vec<ImageInfo>, CliError> {
    let reg = registry();
    let mut list = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((filename.to_string(), fmt.map(str::to_string), image_opts));
    while let Some((name, fmt, image_opts)) = next.take() {
        if !seen.insert(name.clone()) {
            return Err(CliError::new(format!("Backing file '{name}' creates an infinite loop.")));
        }
        let req = OpenRequest {
            name: &name,
            fmt: fmt.as_deref(),
            image_opts,
            opts: OpenOptions { force_share, no_backing: true, no_io: true, ..OpenOptions::default() },
        };
        let driver = img_open(&reg, &req)?;
        let info = driver.info().map_err(CliError::from)?;
        if chain {
            match (&info.full_backing_filename, &info.backing_filename) {
                (Some(full), _) => next = Some((full.clone(), info.backing_filename_format.clone(), false)),
                (None, Some(b)) => {
                    return Err(CliError::new(format!(
                        "Could not determine absolute backing filename, but backing filename '{b}' present"
                    )))
                }
                _ => {}
            }
        }
        list.push(info);
    }
    Ok(list)
}
