//! Command-line parsing with qemu-img's (GNU getopt) behaviour on top of clap.
//!
//! qemu-img's commands take short options that may be bundled (`-qp`) or carry attached values
//! (`-fraw`), long options with `=` or a separate value, unique prefixes of long options, options
//! after positional arguments, and `--` to end options. Values are taken as given even when they
//! start with `-`. Errors use qemu-img's words: "unrecognized option '--x'" and "missing argument
//! for option '-f'", followed by the hint to try `--help`.

use std::collections::HashMap;

use clap::error::{ContextKind, ContextValue, ErrorKind as ClapKind};
use clap::{Arg, ArgAction, Command};

use crate::report::CliError;

/// One option a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// Key used to look the option up.
    pub id: &'static str,
    /// Short letter.
    pub short: Option<char>,
    /// Long name.
    pub long: Option<&'static str>,
    /// Whether it takes a value.
    pub value: bool,
}

/// A flag (no value) with a short letter and maybe a long name.
pub const fn flag(id: &'static str, short: Option<char>, long: Option<&'static str>) -> Opt {
    Opt { id, short, long, value: false }
}

/// An option with a value.
pub const fn opt(id: &'static str, short: Option<char>, long: Option<&'static str>) -> Opt {
    Opt { id, short, long, value: true }
}

/// Parsed arguments of one command.
#[derive(Debug, Default)]
pub struct Parsed {
    values: HashMap<&'static str, Vec<String>>,
    counts: HashMap<&'static str, usize>,
    /// Where each occurrence of an option was on the command line (argument indices).
    indices: HashMap<&'static str, Vec<usize>>,
    /// Positional arguments in order.
    pub positional: Vec<String>,
}

impl Parsed {
    /// The last value of an option.
    pub fn value(&self, id: &str) -> Option<&str> {
        self.values.get(id).and_then(|v| v.last()).map(String::as_str)
    }

    /// Every value of a repeatable option, in order.
    pub fn values(&self, id: &str) -> &[String] {
        self.values.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether a flag or option was given.
    pub fn has(&self, id: &str) -> bool {
        self.counts.get(id).copied().unwrap_or(0) > 0 || self.values.contains_key(id)
    }

    /// Every occurrence of the options `ids` in command-line order, with its value (for options
    /// that take one), for commands whose options are actions run in order (`bitmap`).
    pub fn in_order(&self, ids: &[&'static str]) -> Vec<(&'static str, Option<String>)> {
        let mut out: Vec<(usize, &'static str, Option<String>)> = Vec::new();
        for &id in ids.iter().filter(|id| self.has(id)) {
            let values = self.values.get(id);
            for (k, &at) in self.indices.get(id).into_iter().flatten().enumerate() {
                out.push((at, id, values.and_then(|v| v.get(k)).cloned()));
            }
        }
        out.sort_by_key(|o| o.0);
        out.into_iter().map(|(_, id, v)| (id, v)).collect()
    }
}

/// Parses `args` (without the command name) against `opts`. `-h`/`--help` is always accepted and
/// reported as id `help`.
pub fn parse(args: &[String], opts: &[Opt]) -> Result<Parsed, CliError> {
    let mut cmd = Command::new("qemu-img")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .infer_long_args(true)
        .arg(Arg::new("help").short('h').long("help").action(ArgAction::Count))
        .arg(
            Arg::new("__positional")
                .num_args(0..)
                .action(ArgAction::Append)
                .allow_hyphen_values(false)
                .trailing_var_arg(false),
        );
    for o in opts {
        let mut a = Arg::new(o.id);
        if let Some(s) = o.short {
            a = a.short(s);
        }
        if let Some(l) = o.long {
            a = a.long(l);
        }
        a = if o.value {
            a.num_args(1).action(ArgAction::Append).allow_hyphen_values(true)
        } else {
            // One value per occurrence (not a count), so that every occurrence keeps its position.
            a.num_args(0).default_missing_value("1").action(ArgAction::Append)
        };
        cmd = cmd.arg(a);
    }
    let matches = cmd.try_get_matches_from(args).map_err(|e| translate(e, args))?;
    let mut parsed = Parsed::default();
    for o in opts.iter().chain([&flag("help", Some('h'), Some("help"))]) {
        if let Some(at) = matches.indices_of(o.id) {
            parsed.indices.insert(o.id, at.collect());
        }
        if o.value {
            if let Some(v) = matches.get_many::<String>(o.id) {
                parsed.values.insert(o.id, v.cloned().collect());
            }
        } else {
            let n = if o.id == "help" {
                matches.get_count(o.id) as usize
            } else {
                matches.get_many::<String>(o.id).map_or(0, |v| v.count())
            };
            if n > 0 {
                parsed.counts.insert(o.id, n);
            }
        }
    }
    if let Some(v) = matches.get_many::<String>("__positional") {
        parsed.positional = v.cloned().collect();
    }
    Ok(parsed)
}

fn translate(e: clap::Error, args: &[String]) -> CliError {
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().unwrap_or(s).to_string(),
        _ => String::new(),
    };
    match e.kind() {
        ClapKind::UnknownArgument => {
            // qemu prints the argv element that failed (the whole bundle for short options).
            let token = args
                .iter()
                .find(|a| {
                    a.starts_with(arg.as_str())
                        || (a.starts_with('-') && !a.starts_with("--") && arg.len() == 2 && a.contains(&arg[1..]))
                })
                .cloned()
                .unwrap_or(arg);
            CliError::usage(format!("unrecognized option '{token}'"))
        }
        ClapKind::InvalidValue | ClapKind::NoEquals | ClapKind::WrongNumberOfValues | ClapKind::TooFewValues => {
            let token = args.last().cloned().unwrap_or(arg);
            CliError::usage(format!("missing argument for option '{token}'"))
        }
        ClapKind::ArgumentConflict | ClapKind::TooManyValues => CliError::usage(format!("unrecognized option '{arg}'")),
        _ => CliError::usage(
            e.to_string().lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: &[Opt] = &[
        opt("f", Some('f'), Some("format")),
        opt("o", Some('o'), None),
        flag("q", Some('q'), None),
        flag("p", Some('p'), None),
        opt("output", None, Some("output")),
        flag("U", Some('U'), Some("force-share")),
    ];

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn getopt_like_parsing() {
        let p = parse(&args(&["-fraw", "a", "-qp", "-o", "x=1", "-o", "-y", "b", "--out=json", "--force-share"]), OPTS)
            .unwrap();
        assert_eq!(p.value("f"), Some("raw"));
        assert_eq!(p.values("o"), ["x=1", "-y"]);
        assert!(p.has("q") && p.has("p") && p.has("U"));
        assert_eq!(p.value("output"), Some("json"));
        assert_eq!(p.positional, ["a", "b"]);
        let p = parse(&args(&["--", "-f"]), OPTS).unwrap();
        assert_eq!(p.positional, ["-f"]);
    }

    #[test]
    fn errors_in_qemu_words() {
        let e = parse(&args(&["--bogus", "a"]), OPTS).unwrap_err();
        assert_eq!(e.message(), "unrecognized option '--bogus'");
        let e = parse(&args(&["a", "-f"]), OPTS).unwrap_err();
        assert_eq!(e.message(), "missing argument for option '-f'");
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;

    #[test]
    fn repeated_flags_keep_every_position() {
        let args: Vec<String> =
            ["--add", "-g", "512", "--remove", "--add", "f", "b"].iter().map(|s| s.to_string()).collect();
        let p = parse(
            &args,
            &[flag("add", None, Some("add")), flag("remove", None, Some("remove")), opt("g", Some('g'), None)],
        )
        .unwrap();
        let got: Vec<&str> = p.in_order(&["add", "remove"]).into_iter().map(|(id, _)| id).collect();
        assert_eq!(got, ["add", "remove", "add"]);
    }
}
