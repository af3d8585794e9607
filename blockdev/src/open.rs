//! Opening images: options, the policy for files an image refers to, chains, and the seams
//! ([`Opener`], [`Format`]) through which format drivers open and create what they need.
//!
//! An image may refer to other files: a backing file, VMDK extents, an external data file. Those
//! *implicit* opens go through an [`Opener`] (the format registry implements it), which resolves
//! relative names against the referring image's directory, applies the [`ReferencePolicy`], limits
//! chain depth and detects loops. Format drivers therefore never open files by themselves, and the
//! `qcow2` crate needs no dependency on the registry.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::driver::BlockDriver;
use crate::error::{Error, ErrorKind, Result};
use crate::host_file::CacheMode;
use crate::info::Measure;
use crate::options::{CreateOptions, OptionSpec};
use crate::storage::Storage;

/// Default limit on the length of a backing chain (images below the top one).
pub const DEFAULT_MAX_CHAIN_DEPTH: u32 = 64;

/// What to do with files an image refers to (backing files, extents, data files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReferencePolicy {
    /// Open any file, as qemu-img does.
    #[default]
    Allow,
    /// Open only files inside the referring image's directory tree (no absolute names, no `..`).
    Confine,
    /// Refuse every reference.
    Deny,
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open without write access.
    pub read_only: bool,
    /// Host cache mode for the image's files.
    pub cache: CacheMode,
    /// Take no locks that would conflict with writers, and tolerate writers (`-U`); read-only only.
    pub force_share: bool,
    /// Refuse to share write access with other processes even where the format would (qemu-img
    /// does this for convert's sources).
    pub exclusive: bool,
    /// Do not take or test image locks at all.
    pub no_locking: bool,
    /// Longest backing chain accepted below the top image.
    pub max_chain_depth: u32,
    /// Policy for files the image refers to.
    pub references: ReferencePolicy,
    /// Do not open the backing file (qemu's `BDRV_O_NO_BACKING`).
    pub no_backing: bool,
    /// Open for metadata only: no data will be read (qemu's `BDRV_O_NO_IO`; encrypted images open
    /// without a key).
    pub no_io: bool,
    /// Open for `check`/repair: images marked corrupt or lacking structures may be opened (qemu's
    /// `BDRV_O_CHECK`), and dirty images are not repaired automatically.
    pub for_check: bool,
    /// The external data file to use instead of the one the image records (qcow2's
    /// `data-file.filename` option).
    pub data_file: Option<String>,
    /// Sizes of the metadata caches of formats that have them (qcow2's `cache-size`,
    /// `l2-cache-size`, `refcount-cache-size`); unset parts take the driver's defaults.
    pub metadata_cache: MetadataCacheSizes,
    /// Where a driver reports what it does on its own during open (the findings of the automatic
    /// repair of a qcow2 image left dirty by lazy refcounts). Dropped when unset.
    pub diagnostics: Diagnostics,
    /// The passphrase of the image's own encryption (qemu's `key-secret` of a `luks` node,
    /// `encrypt.key-secret` of a qcow2 one); not passed on to backing files.
    pub key_secret: Option<crate::crypto::Secret>,
    /// Passphrases of the backing files' encryption, nearest backing file first (qemu's
    /// `backing.encrypt.key-secret`, `backing.backing.encrypt.key-secret`, ...); `None` for a
    /// backing file opened without one.
    pub backing_keys: Vec<Option<crate::crypto::Secret>>,
    /// The file to take as the parent of a differencing image that records its parent by UUID
    /// only (VDI), relative to the image as a backing name is (`--image-opts
    /// backing.file.filename=`). The driver still checks the UUID. Not passed on to backing files.
    pub parent_hint: Option<String>,
    /// Start writing large buffered writes of the image's own file back to the disk as soon as
    /// they are made (`sync_file_range`), so that a later flush finds little left to do. For
    /// servers whose clients flush (`vdisk serve`); durability still comes only from flush.
    pub eager_writeback: bool,
    /// Options of the image's protocol node (the `file.*` keys of a `json:` name or of
    /// `--image-opts` that the protocol driver takes, without `file.`: an HTTP node's `timeout`,
    /// `readahead`, ...). Empty for local files; never passed on to backing files.
    pub protocol_options: Vec<(String, String)>,
    /// What discards and zero writes may give back to the file system (qemu's `discard` node
    /// option and qcow2's `pass-discard-*`).
    pub discard: DiscardOptions,
}

/// qemu's discard options of a node.
///
/// `unmap` is qemu's `discard=unmap` (`BDRV_O_UNMAP`): guest discards are carried out and zero
/// writes may deallocate. With `discard=ignore` a discard changes nothing and zero writes keep
/// their space allocated. qemu's default for a node is `ignore`, but qemu-img opens with `unmap`
/// where it matters (convert unless `-S 0`, commit; qemu-io too): vdisk's default is `unmap`, and
/// the commands that qemu-img opens without it say so.
///
/// The `pass_*` fields are qcow2's `pass-discard-request`, `pass-discard-snapshot` and
/// `pass-discard-other`: whether a cluster whose refcount drops to zero is also deallocated in
/// the image file, by what freed it (a guest discard or zero write; a snapshot operation or the
/// emptying of an image; anything else, such as copy-on-write). `None` takes qemu's default:
/// `unmap` for requests, on for snapshots, off for others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardOptions {
    /// `discard=unmap` (true) or `discard=ignore` (false).
    pub unmap: bool,
    /// `pass-discard-request`.
    pub pass_request: Option<bool>,
    /// `pass-discard-snapshot`.
    pub pass_snapshot: Option<bool>,
    /// `pass-discard-other`.
    pub pass_other: Option<bool>,
}

impl Default for DiscardOptions {
    fn default() -> Self {
        DiscardOptions { unmap: true, pass_request: None, pass_snapshot: None, pass_other: None }
    }
}

impl DiscardOptions {
    /// `discard=ignore`, as qemu-img opens images for most commands and qemu-nbd by default.
    pub fn ignore() -> Self {
        DiscardOptions { unmap: false, ..DiscardOptions::default() }
    }

    /// Parses the value of qemu's `discard` option (`unmap`/`on` or `ignore`/`off`).
    pub fn parse_mode(value: &str) -> Result<bool> {
        match value {
            "unmap" | "on" => Ok(true),
            "ignore" | "off" => Ok(false),
            _ => Err(Error::invalid_argument("Invalid discard option")),
        }
    }

    /// Takes node option `key` if it is one of these (`discard`, `pass-discard-request`,
    /// `pass-discard-snapshot`, `pass-discard-other`): returns whether it was, or qemu's error for
    /// a bad value.
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool> {
        let flag = || crate::options::parse_bool(key, value).map(Some);
        match key {
            "discard" => self.unmap = Self::parse_mode(value)?,
            "pass-discard-request" => self.pass_request = flag()?,
            "pass-discard-snapshot" => self.pass_snapshot = flag()?,
            "pass-discard-other" => self.pass_other = flag()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `pass-discard-request` with its default applied.
    pub fn request(&self) -> bool {
        self.pass_request.unwrap_or(self.unmap)
    }

    /// `pass-discard-snapshot` with its default applied.
    pub fn snapshot(&self) -> bool {
        self.pass_snapshot.unwrap_or(true)
    }

    /// `pass-discard-other` with its default applied.
    pub fn other(&self) -> bool {
        self.pass_other.unwrap_or(false)
    }
}

/// Requested metadata cache sizes in bytes, as qemu's qcow2 node options give them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataCacheSizes {
    /// `cache-size`: L2 and refcount caches together.
    pub total: Option<u64>,
    /// `l2-cache-size`.
    pub l2: Option<u64>,
    /// `refcount-cache-size`.
    pub refcount: Option<u64>,
}

/// A function receiving diagnostic messages.
type MessageFn = dyn Fn(&str) + Send + Sync;

/// A sink for messages a driver emits without being asked (qemu prints these to stderr).
#[derive(Clone, Default)]
pub struct Diagnostics(Option<Arc<MessageFn>>);

impl Diagnostics {
    /// A sink calling `f` for each message.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Diagnostics(Some(Arc::new(f)))
    }

    /// A sink writing each message as a line on stderr.
    pub fn stderr() -> Self {
        Diagnostics::new(|m| eprintln!("{m}"))
    }

    /// Reports one message.
    pub fn report(&self, msg: &str) {
        if let Some(f) = &self.0 {
            f(msg);
        }
    }
}

impl std::fmt::Debug for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Diagnostics(sink)" } else { "Diagnostics(none)" })
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            cache: CacheMode::Writeback,
            force_share: false,
            exclusive: false,
            no_locking: false,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            references: ReferencePolicy::Allow,
            no_backing: false,
            no_io: false,
            for_check: false,
            data_file: None,
            metadata_cache: MetadataCacheSizes::default(),
            diagnostics: Diagnostics::default(),
            key_secret: None,
            backing_keys: Vec::new(),
            parent_hint: None,
            eager_writeback: false,
            protocol_options: Vec::new(),
            discard: DiscardOptions::default(),
        }
    }
}

impl OpenOptions {
    /// Options for images from untrusted sources: read-only, references confined to the image's
    /// directory tree.
    pub fn untrusted() -> Self {
        OpenOptions { references: ReferencePolicy::Confine, ..OpenOptions::default() }
    }

    /// Read-write options with defaults otherwise.
    pub fn read_write() -> Self {
        OpenOptions { read_only: false, ..OpenOptions::default() }
    }

    /// The options for an image referenced from one opened with `self` (backing files are opened
    /// read-only and never exclusively).
    pub fn for_backing(&self) -> Self {
        OpenOptions {
            read_only: true,
            exclusive: false,
            no_backing: false,
            for_check: false,
            data_file: None,
            key_secret: self.backing_keys.first().cloned().flatten(),
            backing_keys: self.backing_keys.iter().skip(1).cloned().collect(),
            parent_hint: None,
            protocol_options: Vec::new(),
            discard: DiscardOptions { unmap: self.discard.unmap, ..DiscardOptions::default() },
            ..self.clone()
        }
    }
}

/// Where in a chain an open happens: the images above it, for depth limits and loop detection.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    seen: Vec<PathBuf>,
}

impl Chain {
    /// An empty chain (for opening a top-level image).
    pub fn new() -> Chain {
        Chain::default()
    }

    /// Number of images above the one being opened.
    pub fn depth(&self) -> u32 {
        self.seen.len() as u32
    }

    /// The chain with `image` added, failing if it is already part of it (a loop) or if the
    /// chain would exceed `max_depth`.
    pub fn enter(&self, image: &Path, max_depth: u32) -> Result<Chain> {
        let canonical = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
        if self.seen.contains(&canonical) {
            return Err(Error::invalid_image(format!("Backing file '{}' creates an infinite loop.", image.display())));
        }
        if self.depth() > max_depth {
            return Err(Error::invalid_image(format!("Backing chain is longer than the limit of {max_depth} images")));
        }
        let mut seen = self.seen.clone();
        seen.push(canonical);
        Ok(Chain { seen })
    }
}

/// Resolves `name` (as stored in `referrer`) to the path to open, as qemu does: absolute names and
/// protocol URLs stay as they are, relative names are relative to the referrer's directory.
pub fn resolve_reference(referrer: &str, name: &str) -> String {
    if name.starts_with('/') || crate::protocol::has_protocol_prefix(name) {
        return name.to_string();
    }
    match referrer.rfind('/') {
        Some(i) => format!("{}{}", &referrer[..=i], name),
        None => name.to_string(),
    }
}

/// Applies `policy` to a reference `name` made by the image at `referrer`.
pub fn check_reference(policy: ReferencePolicy, referrer: &str, name: &str) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::new(
            ErrorKind::PermissionDenied,
            format!("Refusing to open '{name}' referenced by '{referrer}': {why}"),
        ))
    };
    match policy {
        ReferencePolicy::Allow => Ok(()),
        ReferencePolicy::Deny => refuse("references to other files are not allowed"),
        ReferencePolicy::Confine => {
            let p = Path::new(name);
            if crate::protocol::has_protocol_prefix(name) {
                return refuse("only local files inside the image's directory may be referenced");
            }
            if p.is_absolute() {
                return refuse("absolute paths are not allowed for untrusted images");
            }
            if p.components().any(|c| matches!(c, Component::ParentDir)) {
                return refuse("'..' is not allowed for untrusted images");
            }
            // A symlink inside the directory could still point outside it.
            let base = Path::new(referrer).parent().unwrap_or(Path::new("."));
            let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
            if let (Ok(dir), Ok(target)) = (std::fs::canonicalize(base), std::fs::canonicalize(base.join(p))) {
                if !target.starts_with(&dir) {
                    return refuse("it resolves outside the image's directory");
                }
            }
            Ok(())
        }
    }
}

/// Opens and creates the files an image refers to. Implemented by the format registry.
pub trait Opener: Send + Sync {
    /// Opens the image `name` referenced by `referrer` (already resolved with
    /// [`resolve_reference`]), with `format` if the referrer records one (probing otherwise).
    fn open_image(
        &self,
        referrer: &str,
        name: &str,
        format: Option<&str>,
        opts: &OpenOptions,
        chain: &Chain,
    ) -> Result<Arc<dyn BlockDriver>>;

    /// Opens the plain container `name` referenced by `referrer` (an extent, a data file).
    fn open_storage(&self, referrer: &str, name: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>>;

    /// Creates (truncating) the container `name` with the protocol-level options in `opts`
    /// (preallocation and friends for files) and returns it opened read-write and locked.
    fn create_storage(&self, name: &str, opts: &CreateOptions) -> Result<Arc<dyn Storage>>;

    /// Removes the container `name` that [`Opener::create_storage`] created, after the format
    /// failed to create an image in it (qemu's qcow2 and luks drivers leave no file behind a
    /// failed creation). Regular files only; the default removes nothing.
    fn delete_storage(&self, _name: &str) {}
}

/// Runs `build` (which fills the container `name` just created through `opener`); if it fails,
/// deletes the container and returns the error.
pub fn delete_on_error<T>(opener: &dyn Opener, name: &str, build: impl FnOnce() -> Result<T>) -> Result<T> {
    let result = build();
    if result.is_err() {
        opener.delete_storage(name);
    }
    result
}

/// One image format: the registry's entry for it.
pub trait Format: Send + Sync {
    /// qemu's name of the format.
    fn name(&self) -> &'static str;

    /// How sure the format is that `head` (the first bytes of a file called `filename`) is one of
    /// its images: 0 = not mine, 100 = certain (magic matches), 1 = raw's fallback.
    fn probe(&self, head: &[u8], filename: &str) -> u32;

    /// Opens an image from `storage`.
    fn open(
        &self,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: &Chain,
        opener: &dyn Opener,
    ) -> Result<Arc<dyn BlockDriver>>;

    /// The `-o` options of `create`, in the order qemu prints them in its "Formatting" line.
    fn create_options(&self) -> &'static [OptionSpec];

    /// Creates an image named `filename` with `opts` (which include `size`).
    fn create(&self, filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()>;

    /// Space needed for an image of this format holding `source` (or `size` bytes of data).
    fn measure(&self, size: u64, source: Option<&dyn BlockDriver>, opts: &CreateOptions) -> Result<Measure> {
        let _ = (size, source, opts);
        Err(Error::unsupported(format!("Block driver '{}' does not support size measurement", self.name())))
    }

    /// Whether the format passes writes straight through (raw): such images can share write
    /// access with other processes; formats with metadata refuse to.
    fn shares_writes(&self) -> bool {
        false
    }

    /// Whether the format can have a backing file.
    fn supports_backing(&self) -> bool {
        false
    }

    /// The options `amend` accepts, if the format supports amendment (for `amend -f FMT -o help`).
    fn amend_options(&self) -> Option<&'static [OptionSpec]> {
        None
    }

    /// Whether the format can store compressed clusters (`convert -c`).
    fn can_compress(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_references_resolve_against_the_referrer() {
        assert_eq!(resolve_reference("/a/b/top.qcow2", "base.qcow2"), "/a/b/base.qcow2");
        assert_eq!(resolve_reference("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(resolve_reference("dir/top", "../x"), "dir/../x");
        assert_eq!(resolve_reference("/a/top", "/abs/x"), "/abs/x");
        assert_eq!(resolve_reference("/a/top", "nbd://h/e"), "nbd://h/e");
        // A relative name in an image on a web server is relative to its URL, as in qemu.
        assert_eq!(resolve_reference("https://h/img/top.qcow2", "base.qcow2"), "https://h/img/base.qcow2");
        assert_eq!(resolve_reference("/a/top", "http://h/b"), "http://h/b");
        // qemu's rule, not a list of known protocols: any prefix before a colon is one.
        assert_eq!(resolve_reference("/a/top", "rbd:pool/image"), "rbd:pool/image");
        assert_eq!(resolve_reference("/a/top", "json:{}"), "json:{}");
        assert_eq!(resolve_reference("/a/top", "sub/a:b"), "/a/sub/a:b");
    }

    #[test]
    fn confine_policy_refuses_escapes() {
        let p = ReferencePolicy::Confine;
        assert!(check_reference(p, "/tmp/x/top", "base").is_ok());
        assert!(check_reference(p, "/tmp/x/top", "sub/base").is_ok());
        for bad in
            ["/etc/passwd", "../base", "a/../../b", "nbd://h/e", "http://h/b", "https://h/b", "nbd:h:1", "rbd:p/i"]
        {
            let e = check_reference(p, "/tmp/x/top", bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{bad}");
        }
        assert!(check_reference(ReferencePolicy::Deny, "t", "b").is_err());
        assert!(check_reference(ReferencePolicy::Allow, "t", "/etc/passwd").is_ok());
    }

    #[test]
    fn chains_detect_loops_and_depth() {
        let dir = std::env::temp_dir();
        let a = dir.join("vdisk-chain-test-a");
        let b = dir.join("vdisk-chain-test-b");
        let c = Chain::new().enter(&a, 1).unwrap().enter(&b, 1).unwrap();
        assert_eq!(c.depth(), 2);
        assert!(c.enter(&a, 10).unwrap_err().message().contains("infinite loop"));
        assert!(c.enter(&dir.join("z"), 1).unwrap_err().message().contains("limit"));
    }
}
