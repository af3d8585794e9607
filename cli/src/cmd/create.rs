//! `create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options]
//! filename [size]`

use blockdev::options::{help_text, wants_help, CreateOptions};
use blockdev::{resolve_reference, OpenOptions};
use formats::Registry;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::{accumulate_options, parse_img_size, registry};
use crate::common::{unknown_file_format, Objects};
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("F", Some('F'), None),
    opt("b", Some('b'), None),
    opt("f", Some('f'), None),
    opt("o", Some('o'), None),
    flag("q", Some('q'), None),
    flag("u", Some('u'), None),
    opt("object", None, Some("object")),
];

/// Runs `create`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    let fmt = p.value("f").unwrap_or("raw");
    let options = accumulate_options(p.values("o"))?;
    let reg = registry();
    let filename = p.positional.first().map(String::as_str);
    if let Some(o) = &options {
        if wants_help(o) {
            return print_option_help(&reg, filename, fmt);
        }
    }
    let Some(filename) = filename else {
        return Err(CliError::usage("Expecting image file name"));
    };
    let size = match p.positional.get(1) {
        Some(s) => Some(parse_img_size(s)?),
        None => None,
    };
    if let Some(extra) = p.positional.get(2) {
        return Err(CliError::usage(format!("Unexpected argument: {extra}")));
    }
    let req = CreateRequest {
        filename,
        fmt,
        backing: p.value("b"),
        backing_fmt: p.value("F"),
        options: options.as_deref(),
        size,
        no_backing_open: p.has("u"),
        quiet: p.has("q"),
    };
    img_create(&reg, &req).map_err(|e| CliError::new(format!("{filename}: {e}")))?;
    Ok(0)
}

/// What `bdrv_img_create` needs: shared by `create` and `convert`.
#[derive(Debug, Clone)]
pub struct CreateRequest<'a> {
    /// Image to create.
    pub filename: &'a str,
    /// Its format.
    pub fmt: &'a str,
    /// `-b`.
    pub backing: Option<&'a str>,
    /// `-F`.
    pub backing_fmt: Option<&'a str>,
    /// `-o`, accumulated.
    pub options: Option<&'a str>,
    /// The size argument.
    pub size: Option<u64>,
    /// `-u`: do not open the backing file.
    pub no_backing_open: bool,
    /// `-q`: no "Formatting" line.
    pub quiet: bool,
}

/// Creates an image as qemu's `bdrv_img_create` does (checks, "Formatting" line, create). Errors
/// carry the message only; callers add the filename prefix.
pub fn img_create(reg: &Registry, req: &CreateRequest<'_>) -> Result<(), String> {
    let format = reg
        .format_or(req.fmt, || blockdev::Error::invalid_argument(format!("Unknown file format '{}'", req.fmt)))
        .map_err(|e| e.message().to_string())?;
    let specs = reg.create_specs(format);
    let mut opts = CreateOptions::new();
    opts.set_secrets(crate::common::defined_secrets());
    if let Some(o) = req.options {
        opts.parse_into(o, &specs).map_err(|e| e.message().to_string())?;
    }
    if opts.has("size") {
        if req.size.is_some() {
            return Err("The image size must be specified only once".into());
        }
    } else if let Some(s) = req.size {
        opts.set("size", &s.to_string());
    }
    let has_spec = |k: &str| specs.iter().any(|s| s.name == k);
    if let Some(b) = req.backing {
        if !has_spec("backing_file") {
            return Err(format!("Backing file not supported for file format '{}'", req.fmt));
        }
        opts.set("backing_file", b);
    }
    if let Some(f) = req.backing_fmt {
        if !has_spec("backing_fmt") {
            return Err(format!("Backing file format not supported for file format '{}'", req.fmt));
        }
        opts.set("backing_fmt", f);
    }
    let backing_file = opts.get("backing_file").map(str::to_string);
    let backing_fmt = opts.get("backing_fmt").map(str::to_string);
    if let Some(b) = &backing_file {
        if b == req.filename {
            return Err("Error: Trying to create an image with the same filename as the backing file".into());
        }
        if b.is_empty() {
            return Err("Expected backing file name, got empty string".into());
        }
    }
    let mut size = opts.get_size("size").map_err(|e| e.message().to_string())?;
    match &backing_file {
        Some(b) if !req.no_backing_open => {
            let full = resolve_reference(req.filename, b);
            let ro = OpenOptions { force_share: true, no_io: true, no_backing: true, ..OpenOptions::default() };
            let opened = reg
                .open(&full, backing_fmt.as_deref(), &ro)
                .map_err(|e| format!("{}\nCould not open backing image.", e.message()))?;
            if backing_fmt.is_none() {
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    opened.driver.format()
                ));
            }
            if size.is_none() {
                let s = opened.driver.size();
                opts.set("size", &s.to_string());
                size = Some(s);
            }
        }
        Some(_) if backing_fmt.is_none() => return Err("Backing file specified without backing format".into()),
        _ => {}
    }
    if size.is_none() {
        return Err("Image creation needs a size parameter".into());
    }
    if !req.quiet {
        println!("Formatting '{}', fmt={} {}", req.filename, req.fmt, opts.formatting_line(&specs));
    }
    reg.create(req.fmt, req.filename, &opts).map_err(|e| {
        if e.errno() == Some(libc::EFBIG) {
            // qemu reads cluster_size with its default, so formats that have the option always hint.
            let cluster_size = opts.get_size("cluster_size").ok().flatten().or_else(|| {
                specs.iter().find(|s| s.name == "cluster_size").and_then(|s| s.default).and_then(|d| d.parse().ok())
            });
            let hint = if cluster_size.unwrap_or(0) != 0 { " (try using a larger cluster size)" } else { "" };
            format!("The image size is too large for file format '{}'{hint}", req.fmt)
        } else {
            e.message().to_string()
        }
    })
}

/// `-o help`: the format's options (and the file protocol's when a file name is given).
pub fn print_option_help(reg: &Registry, filename: Option<&str>, fmt: &str) -> CmdResult {
    let format = reg.format_or(fmt, || unknown_file_format(fmt))?;
    match filename {
        Some(_) => print!("{}", help_text("Supported options:", &reg.create_specs(format))),
        None => {
            print!("{}", help_text(&format!("Supported {fmt} options:"), format.create_options()));
            println!("\nThe protocol level may support further options.\nSpecify the target filename to include those options.");
        }
    }
    Ok(0)
}
