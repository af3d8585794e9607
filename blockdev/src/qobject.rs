//! Structured values printed the way QEMU prints them.
//!
//! qemu-img builds its JSON and its "Format specific information" sections from QObject trees. A
//! QEMU dictionary is a hash table of 512 buckets iterated in bucket order, each bucket a list with
//! the most recently inserted key first, so the order of keys in qemu-img's output is a function of
//! the key names and of insertion order. [`Value::Dict`] keeps insertion order and the printers here
//! reproduce QEMU's iteration order and layout, so scripts that compare output byte for byte keep
//! working.

use std::fmt::Write;

/// A QObject-like value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A signed integer.
    Int(i64),
    /// An unsigned integer (printed without sign).
    UInt(u64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<Value>),
    /// A dictionary, in insertion order.
    Dict(Dict),
}

/// A dictionary in insertion order (the printers apply QEMU's iteration order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dict(pub Vec<(String, Value)>);

impl Dict {
    /// An empty dictionary.
    pub fn new() -> Dict {
        Dict(Vec::new())
    }

    /// Appends `key` (insertion order matters for QEMU's ordering of keys in the same bucket).
    pub fn insert(&mut self, key: &str, value: Value) -> &mut Self {
        self.0.push((key.to_string(), value));
        self
    }

    /// Appends `key` if `value` is present.
    pub fn insert_opt(&mut self, key: &str, value: Option<Value>) -> &mut Self {
        if let Some(v) = value {
            self.insert(key, v);
        }
        self
    }

    /// Looks a key up.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether the dictionary has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in the order QEMU iterates them.
    pub fn qemu_order(&self) -> Vec<&(String, Value)> {
        let mut entries: Vec<(usize, &(String, Value))> = self.0.iter().enumerate().collect();
        // Bucket ascending; within a bucket the newest insertion first.
        entries.sort_by(|a, b| bucket(&a.1 .0).cmp(&bucket(&b.1 .0)).then(b.0.cmp(&a.0)));
        entries.into_iter().map(|(_, e)| e).collect()
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<u64> for Value {
    fn from(i: u64) -> Value {
        Value::Int(i as i64)
    }
}

impl From<Dict> for Value {
    fn from(d: Dict) -> Value {
        Value::Dict(d)
    }
}

/// QEMU's dictionary hash (the gdbm/tdb string hash) reduced to one of 512 buckets.
fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add((c as u32) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// Pretty JSON exactly as QEMU's JSON writer prints it (four-space indentation, empty containers
/// spanning two lines), without a trailing newline.
pub fn to_json_pretty(v: &Value) -> String {
    let mut w = JsonWriter { out: String::new(), depth: 0, need_comma: false, stack: Vec::new(), pretty: true };
    w.value(None, v);
    w.out
}

/// Compact JSON as QEMU prints it (`{"a": 1, "b": [1, 2]}`).
pub fn to_json_compact(v: &Value) -> String {
    let mut w = JsonWriter { out: String::new(), depth: 0, need_comma: false, stack: Vec::new(), pretty: false };
    w.value(None, v);
    w.out
}

struct JsonWriter {
    out: String,
    depth: usize,
    need_comma: bool,
    stack: Vec<bool>, // true = array
    pretty: bool,
}

impl JsonWriter {
    fn newline(&mut self) {
        if self.pretty {
            self.out.push('\n');
            for _ in 0..self.depth * 4 {
                self.out.push(' ');
            }
        }
    }

    fn comma_name(&mut self, name: Option<&str>) {
        if self.need_comma {
            self.out.push(',');
            if self.pretty {
                self.newline();
            } else {
                self.out.push(' ');
            }
        } else {
            if !self.out.is_empty() {
                self.newline();
            }
            self.need_comma = true;
        }
        if self.stack.last() == Some(&false) {
            quote(&mut self.out, name.unwrap_or(""));
            self.out.push_str(": ");
        }
    }

    fn enter(&mut self, is_array: bool) {
        self.stack.push(is_array);
        self.depth += 1;
        self.need_comma = false;
    }

    fn leave(&mut self) {
        self.stack.pop();
        self.depth -= 1;
        self.need_comma = true;
        self.newline();
    }

    fn value(&mut self, name: Option<&str>, v: &Value) {
        match v {
            Value::Int(i) => {
                self.comma_name(name);
                let _ = write!(self.out, "{i}");
            }
            Value::UInt(i) => {
                self.comma_name(name);
                let _ = write!(self.out, "{i}");
            }
            Value::Bool(b) => {
                self.comma_name(name);
                self.out.push_str(if *b { "true" } else { "false" });
            }
            Value::Str(s) => {
                self.comma_name(name);
                quote(&mut self.out, s);
            }
            Value::List(items) => {
                self.comma_name(name);
                self.out.push('[');
                self.enter(true);
                for item in items {
                    self.value(None, item);
                }
                self.leave();
                self.out.push(']');
            }
            Value::Dict(d) => {
                self.comma_name(name);
                self.out.push('{');
                self.enter(false);
                for (k, item) in d.qemu_order() {
                    self.value(Some(k), item);
                }
                self.leave();
                self.out.push('}');
            }
        }
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The human dump QEMU uses for "Format specific information": `key: value` lines, dashes in keys
/// shown as spaces, nested containers indented by four spaces per level, list items as `[i]:`.
pub fn dump_human(out: &mut String, indentation: usize, v: &Value) {
    match v {
        Value::Dict(d) => {
            for (k, item) in d.qemu_order() {
                let composite = matches!(item, Value::Dict(_) | Value::List(_));
                let _ = write!(
                    out,
                    "{:width$}{}:{}",
                    "",
                    k.replace('-', " "),
                    if composite { '\n' } else { ' ' },
                    width = indentation * 4
                );
                dump_human(out, indentation + 1, item);
                if !composite {
                    out.push('\n');
                }
            }
        }
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let composite = matches!(item, Value::Dict(_) | Value::List(_));
                let _ =
                    write!(out, "{:width$}[{i}]:{}", "", if composite { '\n' } else { ' ' }, width = indentation * 4);
                dump_human(out, indentation + 1, item);
                if !composite {
                    out.push('\n');
                }
            }
        }
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Str(s) => out.push_str(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(entries: &[(&str, Value)]) -> Value {
        let mut d = Dict::new();
        for (k, v) in entries {
            d.insert(k, v.clone());
        }
        Value::Dict(d)
    }

    #[test]
    fn key_order_matches_qemu_info_output() {
        // qemu-img 10.0.2 `info --output=json` on a raw file prints children, virtual-size,
        // filename, format, actual-size, dirty-flag, whatever the insertion order.
        let v = dict(&[
            ("filename", "a".into()),
            ("format", "raw".into()),
            ("dirty-flag", false.into()),
            ("actual-size", Value::Int(4096)),
            ("virtual-size", Value::Int(1)),
            ("children", Value::List(vec![])),
        ]);
        let Value::Dict(d) = &v else { unreachable!() };
        let keys: Vec<&str> = d.qemu_order().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["children", "virtual-size", "filename", "format", "actual-size", "dirty-flag"]);
    }

    #[test]
    fn pretty_layout_matches_qemu_writer() {
        let v = dict(&[("required", Value::Int(5)), ("fully-allocated", Value::Int(6))]);
        assert_eq!(to_json_pretty(&v), "{\n    \"required\": 5,\n    \"fully-allocated\": 6\n}");
        let empty = dict(&[("children", Value::List(vec![])), ("data", dict(&[]))]);
        assert_eq!(to_json_pretty(&empty), "{\n    \"children\": [\n    ],\n    \"data\": {\n    }\n}");
        assert_eq!(to_json_compact(&Value::List(vec![Value::Int(1), "x\u{1}é".into()])), "[1, \"x\\u0001\\u00E9\"]");
    }

    #[test]
    fn human_dump_replaces_dashes_and_indents() {
        let v = dict(&[
            ("compat", "1.1".into()),
            ("lazy-refcounts", false.into()),
            ("list", Value::List(vec![Value::Int(3)])),
        ]);
        let mut s = String::new();
        dump_human(&mut s, 1, &v);
        assert!(s.contains("    compat: 1.1\n"));
        assert!(s.contains("    lazy refcounts: false\n"));
        assert!(s.contains("    list:\n        [0]: 3\n"));
    }
}
