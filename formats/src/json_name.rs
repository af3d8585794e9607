//! `json:{...}` image names, as qemu-img accepts them wherever a file name goes.
//!
//! The object is flattened to qemu's dotted option keys (`{"file": {"filename": "x"}}` becomes
//! `file.filename=x`). vdisk understands the format driver (`driver`), the file
//! (`file.filename`, `file` as a string, or `filename`) and a `file.driver` of `file` or
//! `host_device`, or an NBD node (`file.driver=nbd` with `file.server.*` or the flat `file.path`,
//! `file.host`, `file.port`, and `file.export`, turned into the export's URL), or an HTTP(S)
//! node (`file.driver=http`/`https`, `file.url` and the node options of
//! `httpfile::NODE_OPTION_KEYS`, with the `http` feature), and `"backing": null` (or the
//! deprecated `""`), which opens the image without its backing file; any other option is refused
//! with qemu's message rather than ignored.

use blockdev::{Error, Result};
use nbd::address::FileNodeOptions;
use serde_json::Value;

/// What a `json:` name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonName {
    /// The image file.
    pub filename: String,
    /// The format driver, if named.
    pub driver: Option<String>,
    /// Options of the protocol node (an HTTP node's `timeout`, ...), without `file.`.
    pub protocol_options: Vec<(String, String)>,
    /// `"backing": null` or `"backing": ""`: open the image without its backing file.
    pub no_backing: bool,
    /// The backing file was turned off with `"backing": ""`, which qemu accepts with a
    /// deprecation warning ([`EMPTY_BACKING_WARNING`]).
    pub empty_backing: bool,
    /// The format node's discard options (`discard`, qcow2's `pass-discard-*`), as given:
    /// applied with [`blockdev::DiscardOptions::take`] over the caller's.
    pub discard_options: Vec<(String, String)>,
}

/// qemu's warning for `"backing": ""` (in `json:` names and `--image-opts`), which it takes as
/// `"backing": null`.
pub const EMPTY_BACKING_WARNING: &str = "Use of \"backing\": \"\" is deprecated; use \"backing\": null instead";

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(map) if !map.is_empty() || prefix.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        // An empty object names an option all the same (`"backing": {}` is refused as qemu does).
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// Parses the part after `json:`.
pub fn parse(text: &str) -> Result<JsonName> {
    let v: Value =
        serde_json::from_str(text).map_err(|_| Error::invalid_argument("Could not parse the JSON options"))?;
    if !v.is_object() {
        return Err(Error::invalid_argument("Invalid JSON object given"));
    }
    let mut flat = Vec::new();
    // A bare protocol node (`{"driver": "https", "url": ...}`) is the file of a raw image.
    let bare_http = matches!(v.get("driver").and_then(Value::as_str), Some("http" | "https"));
    flatten(if bare_http { "file" } else { "" }, &v, &mut flat);
    let mut filename = None;
    let mut driver = None;
    let mut nbd = FileNodeOptions::default();
    let mut http = crate::remote::HttpNodeOptions::default();
    let (mut no_backing, mut empty_backing) = (false, false);
    let mut discard_options = Vec::new();
    for (k, v) in &flat {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => {
                if *b {
                    "on".into()
                } else {
                    "off".into()
                }
            }
            _ => String::new(),
        };
        match k.as_str() {
            "driver" => driver = Some(text),
            "backing" if v.is_null() => no_backing = true,
            "backing" if text.is_empty() && v.is_string() => (no_backing, empty_backing) = (true, true),
            "file" if v.is_object() => {}
            "file" | "file.filename" | "filename" => filename = Some(text),
            "file.driver" if text == "file" || text == "host_device" => {}
            k if nbd.take(k, &text) || http.take(k, &text) => {}
            "file.driver" => return Err(Error::unsupported(format!("Unknown protocol '{text}'"))),
            "file.locking" | "file.aio" | "read-only" | "file.read-only" | "cache.direct" | "cache.no-flush" => {}
            "discard" | "pass-discard-request" | "pass-discard-snapshot" | "pass-discard-other"
                if k == "discard" || driver.as_deref().is_none_or(|d| d == "qcow2") =>
            {
                // Checked here so that a bad value fails as qemu's does, whatever opens the name.
                blockdev::DiscardOptions::default().take(k, &text)?;
                discard_options.push((k.clone(), text));
            }
            _ => {
                let fmt = driver.clone().unwrap_or_else(|| "raw".into());
                return Err(Error::invalid_argument(format!("Block format '{fmt}' does not support the option '{k}'")));
            }
        }
    }
    let format = driver.as_deref().unwrap_or("raw");
    if let Some(url) = nbd.url(format)? {
        filename = Some(url);
    }
    let mut protocol_options = Vec::new();
    if let Some((url, options)) = http.node(format)? {
        filename = Some(url);
        protocol_options = options;
    }
    let filename = filename.ok_or_else(|| Error::invalid_argument("A block device must be specified for \"file\""))?;
    Ok(JsonName { filename, driver, protocol_options, no_backing, empty_backing, discard_options })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "http")]
    #[test]
    fn http_nodes() {
        let a = parse(r#"{"driver":"qcow2","file":{"driver":"https","url":"https://h/b.qcow2","timeout":3}}"#).unwrap();
        assert_eq!(a.filename, "https://h/b.qcow2");
        assert_eq!(a.driver.as_deref(), Some("qcow2"));
        assert_eq!(a.protocol_options, vec![("timeout".to_string(), "3".to_string())]);
        let bare = parse(r#"{"driver":"http","url":"http://h/x","readahead":"1M"}"#).unwrap();
        assert_eq!((bare.filename.as_str(), bare.driver), ("http://h/x", None));
        assert_eq!(bare.protocol_options, vec![("readahead".to_string(), "1M".to_string())]);
        assert!(parse(r#"{"file":{"driver":"http"}}"#).is_err(), "no url");
        assert!(parse(r#"{"file":{"driver":"http","url":"http://h/x","timeout":"x"}}"#).is_err());
    }

    #[test]
    fn nested_and_dotted_forms() {
        let a = parse(r#"{"driver":"qcow2","file":{"driver":"file","filename":"/x.qcow2"}}"#).unwrap();
        let want = JsonName {
            filename: "/x.qcow2".into(),
            driver: Some("qcow2".into()),
            protocol_options: vec![],
            no_backing: false,
            empty_backing: false,
            discard_options: vec![],
        };
        assert_eq!(a, want);
        let b = parse(r#"{"driver":"raw","file.filename":"y"}"#).unwrap();
        assert_eq!(b.filename, "y");
        assert!(parse("{").unwrap_err().message().contains("Could not parse"));
        assert!(parse("[1]").unwrap_err().message().contains("Invalid JSON object"));
        let nbd = parse(r#"{"driver":"qcow2","file":{"driver":"nbd","host":"h"}}"#).unwrap();
        assert_eq!((nbd.filename.as_str(), nbd.driver.as_deref()), ("nbd://h:10809/", Some("qcow2")));
        let unix = r#"{"file":{"driver":"nbd","server":{"type":"unix","path":"/s"},"export":"e"}}"#;
        assert_eq!(parse(unix).unwrap().filename, "nbd+unix:///e?socket=/s");
        assert!(parse(r#"{"file":{"driver":"nbd","export":"e"}}"#).is_err(), "no server");
        assert!(parse(r#"{"file":{"driver":"file","filename":"x","export":"e"}}"#).is_err(), "NBD key on a file");
        assert!(parse(r#"{"file":{"driver":"http","filename":"x"}}"#).is_err());
        assert!(parse(r#"{"driver":"raw"}"#).is_err());
    }

    #[test]
    fn backing_null_or_empty_turns_the_backing_file_off() {
        let null = parse(r#"{"driver":"qcow2","backing":null,"file":{"filename":"x"}}"#).unwrap();
        assert_eq!((null.no_backing, null.empty_backing), (true, false));
        let empty = parse(r#"{"driver":"qcow2","backing":"","file":"x"}"#).unwrap();
        assert_eq!((empty.no_backing, empty.empty_backing), (true, true));
        assert!(!parse(r#"{"driver":"qcow2","file":"x"}"#).unwrap().no_backing);
        for other in [r#""null""#, "{}", "0", "false", r#"{"driver":"qcow2"}"#] {
            let e = parse(&format!(r#"{{"driver":"qcow2","backing":{other},"file":"x"}}"#)).unwrap_err();
            assert!(e.message().starts_with("Block format 'qcow2' does not support the option 'backing"), "{other}");
        }
    }

    #[test]
    fn discard_options() {
        let a = parse(r#"{"driver":"qcow2","discard":"unmap","pass-discard-other":true,"file":"x"}"#).unwrap();
        let want = [("discard", "unmap"), ("pass-discard-other", "on")];
        assert_eq!(a.discard_options, want.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(parse(r#"{"discard":"x","file":"x"}"#).unwrap_err().message(), "Invalid discard option");
        let raw = parse(r#"{"driver":"raw","pass-discard-request":true,"file":"x"}"#).unwrap_err();
        assert_eq!(raw.message(), "Block format 'raw' does not support the option 'pass-discard-request'");
    }
}
