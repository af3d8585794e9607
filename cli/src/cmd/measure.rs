//! `measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef]
//! [--image-opts] [-f fmt] [-l snapshot_param] filename]`
//!
//! How much space an image of the output format needs: for a new image of `--size` bytes, or to
//! hold the content of an existing image. The command line is checked into a [`MeasureArgs`] value
//! with qemu-img's messages, then the format's [`blockdev::Format::measure`] answers.
//!
//! Unlike the other commands, qemu-img's measure lets getopt report an unknown option or a missing
//! argument in getopt's own words ("measure: unrecognized option '--foo'") and then prints the
//! full help and exits with 0; vdisk does the same.

use blockdev::options::CreateOptions;
use blockdev::qobject::to_json_pretty;
use blockdev::{Error, Measure};

use crate::args::{flag, opt, parse, Opt, Parsed};
use crate::cmd::{accumulate_options, cvtnum, registry};
use crate::common::{img_open, output_format, Objects, OpenRequest, OutputFormat};
use crate::report::{error_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    opt("O", Some('O'), None),
    opt("o", Some('o'), None),
    opt("l", Some('l'), None),
    flag("U", Some('U'), Some("force-share")),
    flag("image-opts", None, Some("image-opts")),
    opt("object", None, Some("object")),
    opt("output", None, Some("output")),
    opt("size", None, Some("size")),
];

/// Which internal snapshot `-l` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotParam {
    /// `-l name_or_id`.
    IdOrName(String),
    /// `-l snapshot.id=..,snapshot.name=..`.
    Options {
        /// `snapshot.id`.
        id: Option<String>,
        /// `snapshot.name`.
        name: Option<String>,
    },
}

/// Parses `-l`, with qemu-img's two messages for a bad `snapshot.` list.
pub fn parse_snapshot_param(arg: &str) -> Result<SnapshotParam, CliError> {
    if !arg.starts_with("snapshot.") {
        return Ok(SnapshotParam::IdOrName(arg.to_string()));
    }
    let failed = || CliError::new(format!("Failed in parsing snapshot param '{arg}'"));
    let entries = blockdev::options::split_options(arg).ok_or_else(failed)?;
    let (mut id, mut name) = (None, None);
    for (k, v) in entries {
        match k.as_str() {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => {
                error_report(&format!("Invalid parameter '{k}'"));
                return Err(failed());
            }
        }
    }
    Ok(SnapshotParam::Options { id, name })
}

/// Shows the snapshot `param` names in place of the disk (qemu-img's `-l`), with its messages.
pub fn load_snapshot(disk: &dyn blockdev::BlockDriver, param: &SnapshotParam) -> Result<(), CliError> {
    let failed = |e: blockdev::Error| CliError::new(format!("Failed to load snapshot: {}", e.message()));
    let Some(snaps) = disk.snapshots() else {
        return Err(CliError::new(format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading \
             internal snapshots",
            disk.format()
        )));
    };
    match param {
        SnapshotParam::Options { id: None, name: None } => {
            Err(CliError::new("Failed to load snapshot: snapshot_id and snapshot_name are both NULL"))
        }
        SnapshotParam::Options { id, name } => snaps.load_temporarily(id.as_deref(), name.as_deref()).map_err(failed),
        // By id first; when that finds nothing (or nothing valid), by name.
        SnapshotParam::IdOrName(key) => match snaps.load_temporarily(Some(key), None) {
            Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL)) => {
                snaps.load_temporarily(None, Some(key)).map_err(failed)
            }
            r => r.map_err(failed),
        },
    }
}

/// Everything the command line says, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasureArgs {
    /// `--output`.
    pub output: OutputFormat,
    /// `-O` (default raw).
    pub out_fmt: String,
    /// `-o`, accumulated.
    pub options: Option<String>,
    /// `--size`.
    pub size: Option<u64>,
    /// The image to measure.
    pub filename: Option<String>,
    /// `-f`.
    pub fmt: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-l`.
    pub snapshot: Option<SnapshotParam>,
    /// `-U`.
    pub force_share: bool,
}

/// Checks the parsed command line in qemu-img's order.
pub fn check_args(p: &Parsed) -> Result<MeasureArgs, CliError> {
    let options = accumulate_options(p.values("o"))?;
    let mut snapshot = None;
    for l in p.values("l") {
        snapshot = Some(parse_snapshot_param(l)?);
    }
    let mut output = OutputFormat::Human;
    for o in p.values("output") {
        output = output_format(Some(o))?;
    }
    let mut size = None;
    for s in p.values("size") {
        size = Some(cvtnum("image size", s)?);
    }
    Objects::parse(p.values("object"))?;
    if p.positional.len() > 1 {
        return Err(CliError::new("At most one filename argument is allowed."));
    }
    let filename = p.positional.first().cloned();
    let (fmt, image_opts) = (p.value("f").map(str::to_string), p.has("image-opts"));
    if filename.is_none() && (image_opts || fmt.is_some() || snapshot.is_some()) {
        return Err(CliError::new("--image-opts, -f, and -l require a filename argument."));
    }
    if filename.is_some() && size.is_some() {
        return Err(CliError::new("--size N cannot be used together with a filename."));
    }
    if filename.is_none() && size.is_none() {
        return Err(CliError::new("Either --size N or one filename must be specified."));
    }
    Ok(MeasureArgs {
        output,
        out_fmt: p.value("O").unwrap_or("raw").to_string(),
        options,
        size,
        filename,
        fmt,
        image_opts,
        snapshot,
        force_share: p.has("U"),
    })
}

/// Parses `-o` entry by entry as qemu's `qemu_opts_do_parse` does: `help` is not special there
/// and is refused like any unknown parameter.
pub fn parse_options(s: &str, specs: &[blockdev::options::OptionSpec]) -> Result<CreateOptions, Error> {
    let mut opts = CreateOptions::new();
    for entry in raw_entries(s) {
        if entry == "help" || entry == "?" {
            return Err(Error::invalid_argument(format!("Invalid parameter '{entry}'")));
        }
        opts.parse_into(entry, specs)?;
    }
    Ok(opts)
}

/// Splits an option list into its entries, each still in option syntax (`,,` escapes kept).
fn raw_entries(s: &str) -> Vec<&str> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        if i < b.len() && b[i] == b'=' {
            while i < b.len() {
                if b[i] == b',' {
                    if b.get(i + 1) == Some(&b',') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
        }
        out.push(&s[start..i]);
        i += 1;
    }
    out
}

/// The human lines or the JSON object, as qemu-img prints them.
pub fn render(m: &Measure, output: OutputFormat) -> String {
    match output {
        OutputFormat::Human => {
            let mut s = format!("required size: {}\nfully allocated size: {}\n", m.required, m.fully_allocated);
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s
        }
        OutputFormat::Json => format!("{}\n", to_json_pretty(&m.to_value())),
    }
}

/// getopt's own complaint about a bad option, which qemu-img's measure lets through.
fn getopt_message(e: &CliError) -> String {
    let quoted = |m: &str, prefix: &str| m.strip_prefix(prefix).map(|t| t.trim_end_matches('\'').to_string());
    if let Some(tok) = quoted(e.message(), "unrecognized option '") {
        if let Some(long) = tok.strip_prefix("--") {
            // A flag given a value ("--image-opts=x") is a different complaint.
            let name = long.trim_end_matches("...").split('=').next().unwrap_or(long);
            let flag = OPTS
                .iter()
                .filter(|o| !o.value)
                .filter_map(|o| o.long)
                .find(|l| !name.is_empty() && l.starts_with(name));
            return match flag {
                Some(full) => format!("option '--{full}' doesn't allow an argument"),
                None => format!("unrecognized option '{tok}'"),
            };
        }
        let bad = tok.chars().skip(1).find(|c| !"hU".contains(*c)).unwrap_or('?');
        return format!("invalid option -- '{bad}'");
    }
    if let Some(tok) = quoted(e.message(), "missing argument for option '") {
        if let Some(long) = tok.strip_prefix("--") {
            let full = OPTS.iter().filter_map(|o| o.long).find(|l| l.starts_with(long)).unwrap_or(long);
            return format!("option '--{full}' requires an argument");
        }
        return format!("option requires an argument -- '{}'", tok.chars().last().unwrap_or('?'));
    }
    e.message().to_string()
}

/// Runs `measure`.
pub fn run(args: &[String]) -> CmdResult {
    let p = match parse(args, OPTS) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("measure: {}", getopt_message(&e));
            return crate::cmd::help();
        }
    };
    if p.has("help") {
        return crate::cmd::help();
    }
    let a = check_args(&p)?;
    let reg = registry();
    let source = match &a.filename {
        Some(name) => {
            let req = OpenRequest::read_only(name, a.fmt.as_deref(), a.image_opts, a.force_share);
            let disk = img_open(&reg, &req)?;
            if let Some(sn) = &a.snapshot {
                load_snapshot(disk.as_ref(), sn)?;
            }
            Some(disk)
        }
        None => None,
    };
    let format = reg.format_or(&a.out_fmt, || crate::common::unknown_file_format(&a.out_fmt))?;
    let mut opts = match &a.options {
        Some(o) => parse_options(o, &reg.create_specs(format)).map_err(|e| {
            error_report(e.message());
            error_report(&format!("Invalid options for file format '{}'", a.out_fmt));
            CliError::silent(1)
        })?,
        None => CreateOptions::new(),
    };
    opts.set_secrets(crate::common::defined_secrets());
    if let Some(s) = a.size {
        opts.set("size", &s.to_string());
    }
    let size = opts.get_size("size").map_err(CliError::from)?.unwrap_or(0);
    let m = format.measure(size, source.as_deref(), &opts).map_err(CliError::from)?;
    print!("{}", render(&m, a.output));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::options::{OptionKind, OptionSpec};

    fn check(v: &[&str]) -> Result<MeasureArgs, CliError> {
        let args: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        check_args(&parse(&args, OPTS)?)
    }

    #[test]
    fn argument_rules_match_qemu() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "Either --size N or one filename must be specified."),
            (&["--size", "2G", "img"], "--size N cannot be used together with a filename."),
            (&["img", "a"], "At most one filename argument is allowed."),
            (&["--image-opts"], "--image-opts, -f, and -l require a filename argument."),
            (&["-f", "qcow2"], "--image-opts, -f, and -l require a filename argument."),
            (&["-l", "snap1"], "--image-opts, -f, and -l require a filename argument."),
            (&["-o", ","], "Invalid option list: ,"),
            (&["-l", "snapshot.foo=bar"], "Failed in parsing snapshot param 'snapshot.foo=bar'"),
            (&["--output", "foo"], "--output must be used with human or json as argument."),
            (&["--size", "-1"], "Invalid image size specified. Must be between 0 and 9223372036854775807."),
        ];
        for (args, want) in cases {
            assert_eq!(check(args).unwrap_err().message(), *want, "{args:?}");
        }
        let a = check(&["--output=json", "-O", "raw", "-o", "preallocation=full", "-o", "size=1M", "--size", "1G"])
            .unwrap();
        assert_eq!(a.output, OutputFormat::Json);
        assert_eq!(a.options.as_deref(), Some("preallocation=full,size=1M"));
        assert_eq!(a.size, Some(1 << 30));
        assert_eq!(
            check(&["-l", "snapshot.id=1,snapshot.name=x", "img"]).unwrap().snapshot,
            Some(SnapshotParam::Options { id: Some("1".into()), name: Some("x".into()) })
        );
    }

    #[test]
    fn option_lists_refuse_help_as_a_parameter() {
        const SPECS: &[OptionSpec] =
            &[OptionSpec::new("size", OptionKind::Size, ""), OptionSpec::new("preallocation", OptionKind::Str, "")];
        assert_eq!(raw_entries("a=1,,2,help,b"), ["a=1,,2", "help", "b"]);
        assert_eq!(parse_options("size=1M,help", SPECS).unwrap_err().message(), "Invalid parameter 'help'");
        assert_eq!(parse_options("bogus=1,help", SPECS).unwrap_err().message(), "Invalid parameter 'bogus'");
        assert_eq!(parse_options("?", SPECS).unwrap_err().message(), "Invalid parameter '?'");
        let o = parse_options("size=1k,preallocation=a,,b", SPECS).unwrap();
        assert_eq!(o.get("preallocation"), Some("a,b"));
        assert_eq!(o.get_size("size").unwrap(), Some(1024));
    }

    #[test]
    fn output_matches_qemu_layout() {
        let m = Measure { required: 5, fully_allocated: 6, bitmaps: None };
        assert_eq!(render(&m, OutputFormat::Human), "required size: 5\nfully allocated size: 6\n");
        assert_eq!(render(&m, OutputFormat::Json), "{\n    \"required\": 5,\n    \"fully-allocated\": 6\n}\n");
        let m = Measure { bitmaps: Some(7), ..m };
        assert!(render(&m, OutputFormat::Human).ends_with("bitmaps size: 7\n"));
    }

    #[test]
    fn getopt_words_for_bad_options() {
        assert_eq!(getopt_message(&CliError::usage("unrecognized option '--foo=1'")), "unrecognized option '--foo=1'");
        assert_eq!(getopt_message(&CliError::usage("unrecognized option '-Ux'")), "invalid option -- 'x'");
        assert_eq!(
            getopt_message(&CliError::usage("unrecognized option '--image-opts...'")),
            "option '--image-opts' doesn't allow an argument"
        );
        assert_eq!(
            getopt_message(&CliError::usage("missing argument for option '-f'")),
            "option requires an argument -- 'f'"
        );
        assert_eq!(
            getopt_message(&CliError::usage("missing argument for option '--out'")),
            "option '--output' requires an argument"
        );
    }
}
