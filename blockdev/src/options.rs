//! `-o key=value,...` option lists, parsed and validated as qemu-img does.
//!
//! Syntax: entries separated by `,`; a literal comma in a value is written `,,`; an entry without
//! `=` is a flag (`foo` = `foo=on`, `nofoo` = `foo=off`) and `help` or `?` asks for help. Later
//! entries win over earlier ones. Values are kept as the strings given and checked against the
//! [`OptionSpec`] of their key; typed getters convert them.

use std::fmt::Write;

use crate::error::{Error, Result};
use crate::size::{parse_size, SizeError};

/// The type of an option's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKind {
    /// A size with optional suffix.
    Size,
    /// `on`/`off` (and qemu's synonyms).
    Bool,
    /// An unsigned number (decimal, hex or octal as strtoull accepts).
    Number,
    /// Free text (validated by the format).
    Str,
}

/// One option a format accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionSpec {
    /// The key.
    pub name: &'static str,
    /// The value's type.
    pub kind: OptionKind,
    /// One line of help, as `-o help` prints it.
    pub help: &'static str,
    /// The default value qemu prints in the "Formatting" line when the option is not given.
    pub default: Option<&'static str>,
}

impl OptionSpec {
    /// An option without a printed default.
    pub const fn new(name: &'static str, kind: OptionKind, help: &'static str) -> OptionSpec {
        OptionSpec { name, kind, help, default: None }
    }

    /// An option with a default printed in the "Formatting" line.
    pub const fn with_default(
        name: &'static str,
        kind: OptionKind,
        help: &'static str,
        default: &'static str,
    ) -> OptionSpec {
        OptionSpec { name, kind, help, default: Some(default) }
    }
}

/// Splits an option string into (key, value) pairs; returns `None` if help was asked for.
pub fn split_options(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let len = s[i..].find(['=', ',']).unwrap_or(s.len() - i);
        if i + len < b.len() && b[i + len] == b'=' {
            let name = s[i..i + len].to_string();
            let (value, next) = take_value(s, i + len + 1);
            out.push((name, value));
            i = next;
        } else {
            let name = &s[i..i + len];
            i += len;
            if name == "help" || name == "?" {
                return None;
            }
            match name.strip_prefix("no") {
                Some(rest) => out.push((rest.to_string(), "off".to_string())),
                None => out.push((name.to_string(), "on".to_string())),
            }
        }
        if i < b.len() && b[i] == b',' {
            i += 1;
        }
    }
    Some(out)
}

/// Reads a value up to an unescaped comma (`,,` is a literal comma).
fn take_value(s: &str, mut i: usize) -> (String, usize) {
    let b = s.as_bytes();
    let mut v = String::new();
    let start = i;
    let mut seg = start;
    while i < b.len() {
        if b[i] == b',' {
            if i + 1 < b.len() && b[i + 1] == b',' {
                v.push_str(&s[seg..=i]);
                i += 2;
                seg = i;
                continue;
            }
            break;
        }
        i += 1;
    }
    v.push_str(&s[seg..i]);
    (v, i)
}

/// Whether an option string asks for help (`help`, `?`).
pub fn wants_help(s: &str) -> bool {
    split_options(s).is_none()
}

/// Parses a boolean with qemu's accepted spellings.
pub fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::invalid_argument(format!("Parameter '{name}' expects 'on' or 'off'"))),
    }
}

/// Parses a number as strtoull with base 0 does (decimal, `0x` hex, leading-zero octal).
pub fn parse_number(name: &str, value: &str) -> Result<u64> {
    let bad = || Error::invalid_argument(format!("Parameter '{name}' expects a number"));
    let t = value.trim_start();
    // strtoull accepts a sign and wraps negative values around.
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if t.is_empty() {
        return Err(bad());
    }
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let n = u64::from_str_radix(digits, radix)
        .map_err(|_| Error::invalid_argument(format!("Value '{value}' is too large for parameter '{name}'")))?;
    Ok(if negative { n.wrapping_neg() } else { n })
}

/// Parses a size option value with qemu's messages.
pub fn parse_size_option(name: &str, value: &str) -> Result<u64> {
    match parse_size(value) {
        Ok(v) => Ok(v),
        Err(SizeError::Range) => {
            Err(Error::invalid_argument(format!("Value '{value}' is out of range for parameter '{name}'")))
        }
        Err(SizeError::Invalid) => Err(Error::invalid_argument(format!(
            "Parameter '{name}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        ))),
    }
}

/// A validated list of options for `create`, `amend` or `measure`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    entries: Vec<(String, String)>,
    /// Secrets by id, for options that name one (`key-secret`, `encrypt.key-secret`).
    secrets: Vec<(String, crate::crypto::Secret)>,
}

impl CreateOptions {
    /// An empty list.
    pub fn new() -> CreateOptions {
        CreateOptions::default()
    }

    /// Makes the secrets the user defined (qemu's `--object secret,id=..`) available to options
    /// that name them.
    pub fn set_secrets(&mut self, secrets: Vec<(String, crate::crypto::Secret)>) {
        self.secrets = secrets;
    }

    /// The passphrase named by option `key`: `None` if the option is not set; an error (qemu's)
    /// if it names no defined secret or one that is not UTF-8 text.
    pub fn secret(&self, key: &str) -> Result<Option<crate::crypto::Secret>> {
        let Some(id) = self.get(key) else { return Ok(None) };
        match self.secrets.iter().rev().find(|(i, _)| i == id) {
            Some((_, s)) => s.passphrase(id).map(Some),
            None => Err(Error::invalid_argument(format!("No secret with id '{id}'"))),
        }
    }

    /// Parses `s` and appends its entries after checking each key and value against `specs`.
    pub fn parse_into(&mut self, s: &str, specs: &[OptionSpec]) -> Result<()> {
        let entries = split_options(s).ok_or_else(|| Error::invalid_argument("help requested"))?;
        for (k, v) in entries {
            self.set_checked(&k, &v, specs)?;
        }
        Ok(())
    }

    /// Sets `key` after checking it against `specs`.
    pub fn set_checked(&mut self, key: &str, value: &str, specs: &[OptionSpec]) -> Result<()> {
        check_entry(key, value, specs)?;
        self.set(key, value);
        Ok(())
    }

    /// Checks every entry against `specs` as [`CreateOptions::set_checked`] does: an unknown or
    /// misspelled key, or a value of the wrong kind, is refused with qemu's message. The registry
    /// runs this on every create, so entries added with [`CreateOptions::set`] are checked too.
    pub fn validate(&self, specs: &[OptionSpec]) -> Result<()> {
        self.entries.iter().try_for_each(|(k, v)| check_entry(k, v, specs))
    }

    /// Sets `key`; the value is checked when the options are used ([`CreateOptions::validate`]).
    pub fn set(&mut self, key: &str, value: &str) {
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_string(), value.to_string()));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) {
        self.entries.retain(|(k, _)| k != key);
    }

    /// The raw string value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// `key` as a size.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| parse_size_option(key, v)).transpose()
    }

    /// `key` as a boolean.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| parse_bool(key, v)).transpose()
    }

    /// `key` as a number.
    pub fn get_number(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| parse_number(key, v)).transpose()
    }

    /// All entries, in the order set.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// The options part of qemu's "Formatting 'x', fmt=F ..." line: every spec in order that is
    /// set (sizes and numbers as their parsed value) or has a printed default.
    pub fn formatting_line(&self, specs: &[OptionSpec]) -> String {
        let mut out = String::new();
        for spec in specs {
            let given = self.get(spec.name);
            let Some(value) = given.or(spec.default) else {
                continue;
            };
            if !out.is_empty() {
                out.push(' ');
            }
            match (spec.kind, given) {
                (OptionKind::Size, Some(v)) => {
                    let _ = write!(out, "{}={}", spec.name, parse_size(v).unwrap_or(0));
                }
                (OptionKind::Number, Some(v)) => {
                    let _ = write!(out, "{}={}", spec.name, parse_number(spec.name, v).unwrap_or(0));
                }
                (OptionKind::Str, _) => {
                    let _ = write!(out, "{}={}", spec.name, value.replace(',', ",,"));
                }
                _ => {
                    let _ = write!(out, "{}={}", spec.name, value);
                }
            }
        }
        out
    }
}

/// Checks that `key` is one of `specs` and that `value` parses as its kind.
fn check_entry(key: &str, value: &str, specs: &[OptionSpec]) -> Result<()> {
    let spec = specs
        .iter()
        .find(|s| s.name == key)
        .ok_or_else(|| Error::invalid_argument(format!("Invalid parameter '{key}'")))?;
    match spec.kind {
        OptionKind::Size => parse_size_option(key, value).map(drop),
        OptionKind::Bool => parse_bool(key, value).map(drop),
        OptionKind::Number => parse_number(key, value).map(drop),
        OptionKind::Str => Ok(()),
    }
}

/// `-o help` text for `specs` after a `title` line: one line per option, sorted, as qemu-img
/// prints them.
pub fn help_text(title: &str, specs: &[OptionSpec]) -> String {
    let mut lines: Vec<String> = specs
        .iter()
        .map(|s| {
            let kind = match s.kind {
                OptionKind::Size => "size",
                OptionKind::Bool => "bool (on/off)",
                OptionKind::Number => "num",
                OptionKind::Str => "str",
            };
            let mut line = format!("  {}=<{}>", s.name, kind);
            if !s.help.is_empty() {
                while line.len() < 24 {
                    line.push(' ');
                }
                line.push_str(" - ");
                line.push_str(s.help);
            }
            line
        })
        .collect();
    lines.sort();
    let mut out = format!("{title}\n");
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec::new("size", OptionKind::Size, "Virtual disk size"),
        OptionSpec::new("nocow", OptionKind::Bool, "Turn off copy-on-write (valid only on btrfs)"),
        OptionSpec::new("preallocation", OptionKind::Str, "Preallocation mode"),
        OptionSpec::with_default("refcount_bits", OptionKind::Number, "Width", "16"),
    ];

    #[test]
    fn splits_flags_escapes_and_help() {
        assert_eq!(
            split_options("a=1,b=x,,y,nocow,c").unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("cow".into(), "off".into()),
                ("c".into(), "on".into())
            ]
        );
        assert!(wants_help("a=1,help"));
        assert!(wants_help("?"));
        assert!(!wants_help("a=help"));
    }

    #[test]
    fn validates_and_prints_like_qemu() {
        let mut o = CreateOptions::new();
        o.parse_into("preallocation=full,nocow=on,size=1M", SPECS).unwrap();
        assert_eq!(o.formatting_line(SPECS), "size=1048576 nocow=on preallocation=full refcount_bits=16");
        assert_eq!(o.parse_into("foo=bar", SPECS).unwrap_err().message(), "Invalid parameter 'foo'");
        assert_eq!(
            o.parse_into("nocow=maybe", SPECS).unwrap_err().message(),
            "Parameter 'nocow' expects 'on' or 'off'"
        );
        assert!(o
            .parse_into("size=1Q", SPECS)
            .unwrap_err()
            .message()
            .starts_with("Parameter 'size' expects a non-negative"));
        assert_eq!(
            o.parse_into("refcount_bits=x", SPECS).unwrap_err().message(),
            "Parameter 'refcount_bits' expects a number"
        );
        o.parse_into("size=2M", SPECS).unwrap();
        o.validate(SPECS).unwrap();
        o.set("sise", "2M");
        assert_eq!(o.validate(SPECS).unwrap_err().message(), "Invalid parameter 'sise'");
        o.remove("sise");
        o.set("nocow", "perhaps");
        assert!(o.validate(SPECS).is_err());
        o.remove("nocow");
        assert_eq!(o.get_size("size").unwrap(), Some(2 << 20));
        assert_eq!(parse_number("n", "0x10").unwrap(), 16);
        assert_eq!(parse_number("n", "010").unwrap(), 8);
    }
}
