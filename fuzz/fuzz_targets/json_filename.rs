//! Fuzzes the parser of `json:{...}` image names (`formats::json_name::parse`, what
//! `Registry::open` calls on the part after `json:`).
//!
//! Input layout: the text after `json:`, as UTF-8 (other inputs are skipped).
//!
//! Invariants asserted, when the text parses to a file name and a driver:
//! - writing them back as JSON, nested (`{"driver": D, "file": {"driver": "file", "filename": F}}`)
//!   or with qemu's dotted keys (`{"driver": D, "file.filename": F}`) or as `"file": F`, parses to
//!   the same name and driver (the parse is a fixed point), `"backing": null` or `""` written back
//!   when the name turned the backing file off;
//! - a text that fails to parse fails again (parsing is deterministic).

#![no_main]

use formats::json_name::{parse, JsonName};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fn reparse(v: serde_json::Value, want: &JsonName) {
    let text = v.to_string();
    match parse(&text) {
        Ok(got) => assert_eq!(&got, want, "round trip through {text}"),
        Err(e) => panic!("{text} does not parse back: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut name) = parse(text) else {
        assert!(parse(text).is_err());
        return;
    };
    // (The names written back below carry no node options.)
    name.discard_options.clear();
    let with_driver = |mut v: serde_json::Value| {
        if let Some(d) = &name.driver {
            v["driver"] = json!(d);
        }
        if name.no_backing {
            v["backing"] = if name.empty_backing { json!("") } else { json!(null) };
        }
        v
    };
    reparse(with_driver(json!({"file": {"driver": "file", "filename": name.filename}})), &name);
    reparse(with_driver(json!({"file.filename": name.filename})), &name);
    reparse(with_driver(json!({"file": name.filename})), &name);
});
