//! Fuzzes the `key=value,...` option parser behind `-o` and `--image-opts`
//! (`blockdev::options::split_options`, which the command line's `--image-opts` parser is built
//! on), its validation against the formats' option lists (`CreateOptions::parse_into`, the typed
//! getters, the "Formatting" line), and the size, number and boolean value parsers.
//!
//! Input layout: one byte choosing the option list (mod 4: qcow2 create, raw create, qcow2
//! amend, qcow2 create + file options as `Registry::create_specs` gives them), then the option
//! string as UTF-8 (other inputs are skipped).
//!
//! Invariants asserted:
//! - `split_options` is a fixed point of its own encoding: writing the entries back as
//!   `key=value` with commas doubled and splitting again gives the same entries, and help is
//!   never found in the encoding of a list that did not ask for it;
//! - a list that `parse_into` accepts has every typed value readable with its getter;
//! - a size that parses reads back the same from its decimal and `0x` hexadecimal spellings and,
//!   when it is a whole number of KiB/MiB/..., from that suffix; a number that parses reads back
//!   the same from its decimal spelling; booleans parse as on/off consistently.

#![no_main]

use blockdev::options::{parse_bool, parse_number, split_options, CreateOptions, OptionKind, OptionSpec};
use blockdev::size::{parse_size, size_to_str};
use blockdev::Format;
use libfuzzer_sys::fuzz_target;

fn encode(entries: &[(String, String)]) -> String {
    entries.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect::<Vec<_>>().join(",")
}

fn check_size(s: &str) {
    let Ok(v) = parse_size(s) else { return };
    assert_eq!(parse_size(&v.to_string()), Ok(v), "decimal spelling of {s:?}");
    assert_eq!(parse_size(&format!("{v:#x}")), Ok(v), "hex spelling of {s:?}");
    for (i, suffix) in ["k", "M", "G", "T", "P", "E"].iter().enumerate() {
        let unit = 1u64 << (10 * (i + 1));
        if v % unit == 0 {
            assert_eq!(parse_size(&format!("{}{suffix}", v / unit)), Ok(v), "{s:?} with suffix {suffix}");
        }
    }
    assert!(size_to_str(v).ends_with('B'));
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(s) = std::str::from_utf8(rest) else { return };
    let reg = formats::Registry::new();
    let qcow2 = reg.format("qcow2").unwrap();
    let specs: Vec<OptionSpec> = match which % 4 {
        0 => qcow2.create_options().to_vec(),
        1 => reg.format("raw").unwrap().create_options().to_vec(),
        2 => qcow2::Qcow2Format.amend_options().unwrap().to_vec(),
        _ => reg.create_specs(qcow2),
    };

    // The splitter.
    if let Some(entries) = split_options(s) {
        let text = encode(&entries);
        let again = split_options(&text).expect("encoded options ask for help");
        assert_eq!(again, entries, "split/encode round trip via {text:?}");
        for (k, v) in &entries {
            check_size(v);
            if let Ok(n) = parse_number(k, v) {
                if !v.trim_start().starts_with('-') {
                    assert_eq!(parse_number(k, &n.to_string()).unwrap(), n);
                }
            }
            if let Ok(b) = parse_bool(k, v) {
                assert_eq!(parse_bool(k, if b { "on" } else { "off" }).unwrap(), b);
            }
        }
    } else {
        assert!(blockdev::options::wants_help(s));
    }

    // Validation against the option list.
    let mut opts = CreateOptions::new();
    if opts.parse_into(s, &specs).is_ok() {
        for spec in &specs {
            if !opts.has(spec.name) {
                continue;
            }
            match spec.kind {
                OptionKind::Size => assert!(opts.get_size(spec.name).is_ok()),
                OptionKind::Bool => assert!(opts.get_bool(spec.name).is_ok()),
                OptionKind::Number => assert!(opts.get_number(spec.name).is_ok()),
                OptionKind::Str => {}
            }
        }
        let _ = opts.formatting_line(&specs);
    }
    check_size(s);
});
