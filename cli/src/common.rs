//! What every command shares: opening images the way qemu-img's `img_open` does, `--image-opts`
//! and `--object` arguments, cache modes and the `--output` switch.

use blockdev::crypto::Secret;
use std::sync::Arc;

use blockdev::options::split_options;
use blockdev::{BlockDriver, CacheMode, OpenOptions};
use formats::Registry;
use nbd::address::FileNodeOptions;

use crate::report::{warn_report, CliError};

/// `--output=human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// QEMU-style JSON.
    Json,
}

/// qemu-img's error for a format name it does not know (`create -f`, `convert -O`, `measure -O`,
/// `amend -f`); used with [`Registry::format_or`], which names the formats qemu knows and vdisk
/// cannot handle yet instead.
pub fn unknown_file_format(name: &str) -> blockdev::Error {
    blockdev::Error::invalid_argument(format!("Unknown file format '{name}'"))
}

/// Parses `--output`, with qemu-img's message for anything else.
pub fn output_format(v: Option<&str>) -> Result<OutputFormat, CliError> {
    match v {
        None | Some("human") => Ok(OutputFormat::Human),
        Some("json") => Ok(OutputFormat::Json),
        Some(_) => Err(CliError::new("--output must be used with human or json as argument.")),
    }
}

/// Parses a cache mode argument (`-t` / `-T`); `what` is "cache" or "source cache".
pub fn cache_mode(v: Option<&str>, default: CacheMode, what: &str) -> Result<CacheMode, CliError> {
    match v {
        None => Ok(default),
        Some(s) => CacheMode::parse(s).ok_or_else(|| CliError::new(format!("Invalid {what} option: {s}"))),
    }
}

/// Cache mode for the image a bulk-copying command writes (commit's base, rebase's image): `-t` when
/// given, otherwise `none` (`O_DIRECT`) where `path` is a local file that accepts it, and
/// `writeback` where it does not (tmpfs, protocols, `json:` names).
///
/// Both commands flush before they report success, so durability is the same in every mode; what
/// bypassing the page cache saves is staging gigabytes of copied clusters in freshly allocated
/// cache pages (and evicting the host's working set to make room), which was most of commit's
/// time (BENCHMARKS.md).
pub fn bulk_write_cache(v: Option<&str>, path: &str) -> Result<CacheMode, CliError> {
    if v.is_some() {
        return cache_mode(v, CacheMode::Writeback, "cache");
    }
    Ok(if accepts_direct_io(path) { CacheMode::None } else { CacheMode::Writeback })
}

/// Whether `path` is a regular file that can be opened with `O_DIRECT`.
fn accepts_direct_io(path: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        _ => return false,
    }
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).is_ok()
}

/// Secrets given with `--object secret,id=..,data=..|file=..`; kept for the commands that need keys.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// (id, secret bytes)
    pub secrets: Vec<(String, Vec<u8>)>,
}

impl Objects {
    /// Parses every `--object` argument.
    pub fn parse(args: &[String]) -> Result<Objects, CliError> {
        let mut objs = Objects::default();
        for a in args {
            let entries = split_options(&format!("qom-type={a}"))
                .ok_or_else(|| CliError::new("help is not available for --object in vdisk"))?;
            let get = |k: &str| entries.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let ty = get("qom-type").unwrap_or_default();
            if ty != "secret" {
                return Err(CliError::new(format!("invalid object type: {ty}")));
            }
            let id = get("id").ok_or_else(|| CliError::new("Parameter 'id' is missing"))?;
            let raw = match (get("data"), get("file")) {
                (Some(d), None) => d.into_bytes(),
                (None, Some(f)) => std::fs::read(&f)
                    .map_err(|e| CliError::new(format!("Unable to read {f}: {}", blockdev::io_text(&e))))?,
                (Some(_), Some(_)) => return Err(CliError::new("'data' and 'file' are mutually exclusive")),
                (None, None) => return Err(CliError::new("Either 'data' or 'file' must be provided")),
            };
            let bytes = match get("format").as_deref() {
                None | Some("raw") => raw,
                Some("base64") => decode_base64(&raw).ok_or_else(|| CliError::new("Invalid base64 data"))?,
                Some(f) => return Err(CliError::new(format!("Invalid parameter 'format': {f}"))),
            };
            objs.secrets.push((id, bytes));
        }
        let mut defined = DEFINED_SECRETS.lock().unwrap_or_else(|p| p.into_inner());
        defined.extend(objs.secrets.iter().map(|(id, b)| (id.clone(), blockdev::crypto::Secret::new(b.clone()))));
        Ok(objs)
    }
}

/// Secrets defined by this command's `--object` arguments ([`Objects::parse`] adds them), for
/// the options that name one (`key-secret`, `encrypt.key-secret`).
static DEFINED_SECRETS: std::sync::Mutex<Vec<(String, blockdev::crypto::Secret)>> = std::sync::Mutex::new(Vec::new());

/// Every secret defined so far, by id (a later definition of an id wins).
pub fn defined_secrets() -> Vec<(String, blockdev::crypto::Secret)> {
    DEFINED_SECRETS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The passphrase in the secret called `id`, with qemu's message when there is none or it is
/// not UTF-8 text.
pub fn secret(id: &str) -> Result<blockdev::crypto::Secret, String> {
    defined_secrets()
        .into_iter()
        .rev()
        .find(|(i, _)| i == id)
        .ok_or_else(|| format!("No secret with id '{id}'"))
        .and_then(|(_, s)| s.passphrase(id).map_err(|e| e.message().to_string()))
}

fn decode_base64(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in data.iter().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// What an `--image-opts` string names: the file, the format and node options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOpts {
    /// The file to open.
    pub filename: String,
    /// `driver=`.
    pub driver: Option<String>,
    /// `force-share=on`.
    pub force_share: Option<bool>,
    /// `cache.direct=on`.
    pub direct: bool,
    /// `cache.no-flush=on`.
    pub no_flush: bool,
    /// `data-file.filename=` (qcow2's external data file, overriding the image's record).
    pub data_file: Option<String>,
    /// Options of an HTTP(S) protocol node (`file.timeout`, ... without `file.`).
    pub protocol_options: Vec<(String, String)>,
    /// qcow2's `cache-size`, `l2-cache-size` and `refcount-cache-size`.
    pub metadata_cache: blockdev::MetadataCacheSizes,
    /// The node's discard options (`discard`, qcow2's `pass-discard-*`), checked, in the order
    /// given: applied with [`blockdev::DiscardOptions::take`].
    pub discard_options: Vec<(String, String)>,
    /// Options vdisk does not act on but accepts (`file.driver=file`, `file.locking=...`, keys).
    pub other: Vec<(String, String)>,
    /// Secret ids of the backing files' keys, nearest first (`backing.encrypt.key-secret`,
    /// `backing.backing.key-secret`, ...).
    pub backing_keys: Vec<Option<String>>,
    /// `backing.driver` / `backing.file.filename` (at any depth): vdisk opens the backing files
    /// the images record and checks that these name the same: `(depth, key, value)`.
    pub backing_nodes: Vec<(usize, String, String)>,
    /// `backing=` (empty): open the image without its backing file, as qemu does (with its
    /// deprecation warning; `backing=null` is refused like any other value).
    pub no_backing: bool,
}

/// Splits `backing.backing.KEY` into (2, KEY); `None` without a `backing.` prefix.
fn backing_option(key: &str) -> Option<(usize, &str)> {
    let mut rest = key;
    let mut depth = 0;
    while let Some(r) = rest.strip_prefix("backing.") {
        rest = r;
        depth += 1;
    }
    (depth > 0).then_some((depth, rest))
}

/// qcow2 node options vdisk accepts in `--image-opts` besides the cache sizes and the discard
/// options (the cache entry size and cleaning interval, `discard-no-unref` and overlap-check
/// policies are vdisk's own).
const QCOW2_NODE_OPTIONS: &[&str] = &[
    "l2-cache-entry-size",
    "cache-clean-interval",
    "lazy-refcounts",
    "discard-no-unref",
    "overlap-check",
    "overlap-check.template",
    "auto-read-only",
];

/// The on/off ones among [`QCOW2_NODE_OPTIONS`].
const QCOW2_BOOL_OPTIONS: &[&str] = &["lazy-refcounts", "discard-no-unref", "auto-read-only"];

/// Whether node options go to a qcow2 node: `driver=qcow2`, or no driver yet (probing decides).
fn qcow2_node(o: &ImageOpts) -> bool {
    o.driver.as_deref().is_none_or(|d| d == "qcow2")
}

/// Parses an `--image-opts` string (`driver=raw,file.filename=x`, or `file=x` / a bare name).
pub fn parse_image_opts(s: &str) -> Result<ImageOpts, CliError> {
    let entries = split_options(s).ok_or_else(|| CliError::new("help is not available for --image-opts in vdisk"))?;
    let mut o = ImageOpts::default();
    let mut nbd = FileNodeOptions::default();
    let mut http = httpfile::NodeOptions::default();
    for (i, (k, v)) in entries.iter().enumerate() {
        match k.as_str() {
            "file" | "file.filename" | "filename" => o.filename = v.clone(),
            "driver" => o.driver = Some(v.clone()),
            "backing" if v.is_empty() => o.no_backing = true,
            "force-share" => o.force_share = Some(blockdev::options::parse_bool(k, v)?),
            "cache.direct" => o.direct = blockdev::options::parse_bool(k, v)?,
            "cache.no-flush" => o.no_flush = blockdev::options::parse_bool(k, v)?,
            "file.driver" if v == "file" || v == "host_device" => {}
            k if nbd.take(k, v) || http.take(k, v) => {}
            "file.driver" => return Err(CliError::new(format!("Unknown protocol '{v}'"))),
            "discard" => {
                blockdev::DiscardOptions::default().take(k, v)?;
                o.discard_options.push((k.clone(), v.clone()))
            }
            "file.locking" | "locking" | "file.aio" | "read-only" | "detect-zeroes" => {
                o.other.push((k.clone(), v.clone()))
            }
            k if backing_option(k).is_some() => {
                let (depth, key) = backing_option(k).unwrap_or((1, k));
                match key {
                    "key-secret" | "encrypt.key-secret" => {
                        if o.backing_keys.len() < depth {
                            o.backing_keys.resize(depth, None);
                        }
                        o.backing_keys[depth - 1] = Some(v.clone());
                    }
                    "file.driver" if v == "file" || v == "host_device" => {}
                    "driver" | "file" | "file.filename" | "filename" => {
                        o.backing_nodes.push((depth, key.to_string(), v.clone()))
                    }
                    _ => {
                        let fmt = o.driver.clone().unwrap_or_else(|| "raw".into());
                        return Err(CliError::new(format!("Block format '{fmt}' does not support the option '{k}'")));
                    }
                }
            }
            k if k.ends_with("key-secret") => o.other.push((k.to_string(), v.clone())),
            "data-file" | "data-file.filename" if qcow2_node(&o) => o.data_file = Some(v.clone()),
            "data-file.driver" if qcow2_node(&o) && (v == "file" || v == "host_device") => {}
            "cache-size" | "l2-cache-size" | "refcount-cache-size" if qcow2_node(&o) => {
                let bytes = Some(blockdev::options::parse_size_option(k, v)?);
                match k.as_str() {
                    "cache-size" => o.metadata_cache.total = bytes,
                    "l2-cache-size" => o.metadata_cache.l2 = bytes,
                    _ => o.metadata_cache.refcount = bytes,
                }
            }
            "pass-discard-request" | "pass-discard-snapshot" | "pass-discard-other" if qcow2_node(&o) => {
                blockdev::DiscardOptions::default().take(k, v)?;
                o.discard_options.push((k.clone(), v.clone()))
            }
            k if qcow2_node(&o) && QCOW2_NODE_OPTIONS.contains(&k) => {
                if QCOW2_BOOL_OPTIONS.contains(&k) {
                    blockdev::options::parse_bool(k, v)?;
                }
                o.other.push((k.to_string(), v.clone()))
            }
            _ if i == 0 && v == "on" && !s.contains('=') => o.filename = k.clone(),
            _ => {
                let fmt = o.driver.clone().unwrap_or_else(|| "raw".into());
                return Err(CliError::new(format!("Block format '{fmt}' does not support the option '{k}'")));
            }
        }
    }
    let format = o.driver.as_deref().unwrap_or("raw");
    if let Some(url) = nbd.url(format).map_err(|e| CliError::new(e.message()))? {
        o.filename = url;
    }
    if let Some((url, options)) = http.node(format).map_err(|e| CliError::new(e.message()))? {
        o.filename = url;
        o.protocol_options = options;
    }
    if o.filename.is_empty() {
        return Err(CliError::new("A block device must be specified for \"file\""));
    }
    Ok(o)
}

/// How a command wants an image opened.
#[derive(Debug, Clone)]
pub struct OpenRequest<'a> {
    /// The name as given (or the `--image-opts` string).
    pub name: &'a str,
    /// `-f`.
    pub fmt: Option<&'a str>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// Open options.
    pub opts: OpenOptions,
}

impl<'a> OpenRequest<'a> {
    /// A read-only open of `name`.
    pub fn read_only(name: &'a str, fmt: Option<&'a str>, image_opts: bool, force_share: bool) -> Self {
        OpenRequest { name, fmt, image_opts, opts: OpenOptions { force_share, ..OpenOptions::default() } }
    }

    /// A read-write open of `name`.
    pub fn read_write(name: &'a str, fmt: Option<&'a str>, image_opts: bool) -> Self {
        OpenRequest { name, fmt, image_opts, opts: OpenOptions::read_write() }
    }
}

/// Opens an image as qemu-img's `img_open` does: errors read "Could not open 'name': ...", a
/// read-write open of a probed raw image prints qemu's warning, and so does a deprecated
/// `"backing": ""` / `backing=`.
pub fn img_open(reg: &Registry, req: &OpenRequest<'_>) -> Result<Arc<dyn BlockDriver>, CliError> {
    open_image(reg, req, true)
}

/// [`img_open`] again on an image this command already opened with it: the same open, without
/// repeating the warnings qemu-img prints once (its single open of the image printed them).
pub fn img_reopen(reg: &Registry, req: &OpenRequest<'_>) -> Result<Arc<dyn BlockDriver>, CliError> {
    open_image(reg, req, false)
}

fn open_image(reg: &Registry, req: &OpenRequest<'_>, warn: bool) -> Result<Arc<dyn BlockDriver>, CliError> {
    let mut opts = req.opts.clone();
    let mut backing_nodes = Vec::new();
    opts.diagnostics = blockdev::Diagnostics::stderr();
    let (filename, fmt) = if req.image_opts {
        if req.fmt.is_some() {
            return Err(CliError::new("--image-opts and --format are mutually exclusive"));
        }
        let io = parse_image_opts(req.name)
            .map_err(|e| CliError::new(format!("Could not open '{}': {}", req.name, e.message())))?;
        if io.no_backing {
            if warn {
                warn_report(formats::json_name::EMPTY_BACKING_WARNING);
            }
            opts.no_backing = true;
        }
        if let Some(fs) = io.force_share {
            if opts.force_share && !fs {
                return Err(CliError::new("--force-share/-U conflicts with image options"));
            }
            opts.force_share = fs;
        }
        if io.direct {
            opts.cache = CacheMode::None;
        } else if io.no_flush {
            opts.cache = CacheMode::Unsafe;
        }
        opts.data_file = io.data_file.clone();
        opts.protocol_options = io.protocol_options.clone();
        opts.metadata_cache = io.metadata_cache;
        for (k, v) in &io.discard_options {
            opts.discard
                .take(k, v)
                .map_err(|e| CliError::new(format!("Could not open '{}': {}", req.name, e.message())))?;
        }
        // A key given twice counts once, the last time (as qemu's option dictionaries do).
        let (key, backing_keys) =
            image_keys(&io, opts.no_io).map_err(|m| CliError::new(format!("Could not open '{}': {m}", req.name)))?;
        opts.key_secret = key;
        opts.backing_keys = backing_keys;
        backing_nodes = io.backing_nodes.clone();
        // A parent named for an image that records its parent by UUID only (VDI); qemu takes
        // backing.file.filename relative to the working directory, so it goes in absolute.
        opts.parent_hint =
            io.backing_nodes.iter().find(|(depth, key, _)| *depth == 1 && key != "driver").map(|(_, _, v)| absolute(v));
        (io.filename, io.driver)
    } else {
        // The registry opens a json: name itself; qemu warns about `"backing": ""` first.
        let spec = req.name.strip_prefix("json:").and_then(|j| formats::json_name::parse(j).ok());
        if warn && spec.is_some_and(|s| s.empty_backing) {
            warn_report(formats::json_name::EMPTY_BACKING_WARNING);
        }
        (req.name.to_string(), req.fmt.map(str::to_string))
    };
    let opened = reg
        .open(&filename, fmt.as_deref(), &opts)
        .map_err(|e| CliError::new(format!("Could not open '{}': {}", req.name, e.message())))?;
    if warn && opened.probed_raw && !opts.read_only {
        eprintln!(
            "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions."
        );
    }
    if !opts.no_backing {
        check_backing_nodes(&opened.driver, &backing_nodes)?;
    }
    Ok(opened.driver)
}

/// The keys an `--image-opts` string names: the image's own (the last `key-secret` /
/// `encrypt.key-secret` given) and its backing files'. Opening for metadata only (`no_io`,
/// `info`) does not look at them, as in qemu.
pub fn image_keys(io: &ImageOpts, no_io: bool) -> Result<(Option<Secret>, Vec<Option<Secret>>), String> {
    let lookup = |id: &Option<String>| match id {
        None => Ok(None),
        Some(_) if no_io => Ok(None),
        Some(id) => secret(id).map(Some),
    };
    let own =
        io.other.iter().rev().find(|(k, _)| k == "key-secret" || k == "encrypt.key-secret").map(|(_, v)| v.clone());
    let backing = io.backing_keys.iter().map(lookup).collect::<Result<Vec<_>, _>>()?;
    Ok((lookup(&own)?, backing))
}

/// Checks `backing.driver` / `backing.file.filename` options against the chain `top` opened:
/// vdisk follows the backing files the images record and refuses to pretend it replaced one.
fn check_backing_nodes(top: &Arc<dyn BlockDriver>, nodes: &[(usize, String, String)]) -> Result<(), CliError> {
    for (depth, key, value) in nodes {
        let mut node = Some(top.clone());
        for _ in 0..*depth {
            node = node.and_then(|n| n.backing());
        }
        let matches = match &node {
            None => false,
            Some(n) if key == "driver" => n.format() == value,
            Some(n) => same_file(value, n.filename()),
        };
        if !matches {
            let prefix = "backing.".repeat(*depth);
            return Err(CliError::new(format!(
                "{prefix}{key}={value} names another backing file than the image records; vdisk cannot replace \
                 backing files through --image-opts (use 'rebase -u' to change the recorded one)"
            )));
        }
    }
    Ok(())
}

/// `name` as an absolute path (relative names are taken from the working directory).
fn absolute(name: &str) -> String {
    std::path::absolute(name).map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| name.to_string())
}

/// Whether two names refer to the same file.
pub fn same_file(a: &str, b: &str) -> bool {
    a == b
        || match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_opts_forms() {
        let o = parse_image_opts("driver=raw,file.filename=/x,,y").unwrap();
        assert_eq!(o.filename, "/x,y");
        assert_eq!(o.driver.as_deref(), Some("raw"));
        assert_eq!(parse_image_opts("/a/b").unwrap().filename, "/a/b");
        assert!(parse_image_opts("driver=raw,bogus=1,file=x").is_err());
    }

    #[test]
    fn image_opts_backing_keys_by_depth() {
        let o = parse_image_opts(
            "driver=qcow2,file.filename=t,backing.backing.key-secret=k2,backing.driver=qcow2,backing.encrypt.key-secret=k1",
        )
        .unwrap();
        assert_eq!(o.backing_keys, vec![Some("k1".to_string()), Some("k2".to_string())]);
        assert_eq!(o.backing_nodes, vec![(1, "driver".to_string(), "qcow2".to_string())]);
        assert!(parse_image_opts("driver=qcow2,file=t,backing.bogus=1").is_err());
    }

    #[test]
    fn image_opts_empty_backing_turns_the_backing_file_off() {
        assert!(parse_image_opts("driver=qcow2,file.filename=t,backing=").unwrap().no_backing);
        assert!(!parse_image_opts("driver=qcow2,file.filename=t").unwrap().no_backing);
        let e = parse_image_opts("driver=qcow2,file.filename=t,backing=null").unwrap_err();
        assert_eq!(e.message(), "Block format 'qcow2' does not support the option 'backing'");
    }

    #[test]
    fn secrets_from_data_file_and_base64() {
        let o = Objects::parse(&[
            "secret,id=s0,data=pw".to_string(),
            "secret,id=s1,data=cGFzc3dvcmQ=,format=base64".to_string(),
        ])
        .unwrap();
        assert_eq!(o.secrets[0], ("s0".to_string(), b"pw".to_vec()));
        assert_eq!(o.secrets[1].1, b"password");
        assert!(Objects::parse(&["iothread,id=x".to_string()]).is_err());
    }

    #[test]
    fn bulk_writes_bypass_the_page_cache_only_where_the_file_allows() {
        let dir = std::env::temp_dir().join(format!("vdisk-bulk-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("img");
        std::fs::write(&file, [0u8; 4096]).unwrap();
        let name = file.to_str().unwrap();
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&file).is_ok()
        };
        let want = if direct { CacheMode::None } else { CacheMode::Writeback };
        assert_eq!(bulk_write_cache(None, name).unwrap(), want);
        assert_eq!(bulk_write_cache(Some("writeback"), name).unwrap(), CacheMode::Writeback);
        assert_eq!(bulk_write_cache(Some("unsafe"), name).unwrap(), CacheMode::Unsafe);
        assert!(bulk_write_cache(Some("bogus"), name).is_err());
        for not_a_file in [dir.to_str().unwrap(), "json:{\"file.filename\": \"x\"}", "/nonexistent/x"] {
            assert_eq!(bulk_write_cache(None, not_a_file).unwrap(), CacheMode::Writeback, "{not_a_file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
