//! The format registry and the drivers that live beside it.
//!
//! [`Registry`] knows every format vdisk has: it probes files by content, opens images by name or
//! probe (taking QEMU-compatible locks once the format is known), creates images from `-o` options,
//! and implements [`Opener`] so drivers can open the backing files, extents and data files their
//! images refer to — always through the [`ReferencePolicy`], the chain depth limit and loop
//! detection of [`OpenOptions`].
//!
//! Lock policy (matching what QEMU processes take, so each side sees the other): every open holds
//! consistent-read, read-write opens also hold write (and resize for formats with metadata);
//! formats with metadata refuse to share write and resize, raw shares everything unless the caller
//! asks for exclusivity (convert's sources); `force_share` opens hold consistent-read only and
//! share everything.

pub mod commit;
pub mod file;
pub mod json_name;
pub mod luks;
pub mod overlay;
pub mod raw;
pub mod remote;

use std::sync::Arc;

use blockdev::options::{CreateOptions, OptionSpec};
use blockdev::{
    check_reference, resolve_reference, BlockDriver, Chain, Error, ErrorKind, Format, HostFile, HostOpenOptions,
    OpenOptions, Opener, Perms, Result, Storage,
};

pub use file::FILE_CREATE_OPTIONS;
pub use overlay::{OverlayOptions, TemporaryOverlay};

/// Bytes read from the start of a file to probe its format (qemu's BLOCK_PROBE_BUF_SIZE).
pub const PROBE_SIZE: usize = 512;

/// An opened image and how its format was decided.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The image.
    pub driver: Arc<dyn BlockDriver>,
    /// The format was guessed as raw because nothing else matched (qemu warns about this).
    pub probed_raw: bool,
}

/// Every format vdisk knows.
pub struct Registry {
    formats: Vec<Arc<dyn Format>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.formats.iter().map(|x| x.name())).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// The registry with all built-in formats.
    pub fn new() -> Registry {
        Registry {
            formats: vec![
                Arc::new(raw::RawFormat),
                Arc::new(qcow2::Qcow2Format),
                Arc::new(luks::LuksFormat),
                Arc::new(vmdk::VmdkFormat),
                Arc::new(vpc::VpcFormat),
                Arc::new(vdi::VdiFormat),
            ],
        }
    }

    /// Adds a format (a later registration with the same name replaces the earlier one).
    pub fn register(&mut self, format: Arc<dyn Format>) {
        self.formats.retain(|f| f.name() != format.name());
        self.formats.push(format);
    }

    /// The format called `name`.
    pub fn format(&self, name: &str) -> Option<&dyn Format> {
        self.formats.iter().find(|f| f.name() == name).map(|f| f.as_ref())
    }

    /// Names of all formats, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.formats.iter().map(|f| f.name()).collect();
        v.sort_unstable();
        v
    }

    /// The format whose probe scores `head` highest (raw if nothing else matches).
    pub fn probe_bytes(&self, head: &[u8], filename: &str) -> &dyn Format {
        let mut best: Option<(&dyn Format, u32)> = None;
        for f in &self.formats {
            let score = f.probe(head, filename);
            if score > 0 && best.is_none_or(|(_, s)| score > s) {
                best = Some((f.as_ref(), score));
            }
        }
        best.map(|(f, _)| f).unwrap_or_else(|| self.format("raw").expect("raw is always registered"))
    }

    /// Create options of `format` followed by the file protocol's (without duplicates): the list
    /// qemu-img validates `-o` against and prints in the "Formatting" line.
    pub fn create_specs(&self, format: &dyn Format) -> Vec<OptionSpec> {
        let own = format.create_options();
        let mut v = own.to_vec();
        v.extend(FILE_CREATE_OPTIONS.iter().filter(|s| !own.iter().any(|o| o.name == s.name)));
        v
    }

    /// Opens `filename` as `format` (or the probed format) with `opts`.
    pub fn open(&self, filename: &str, format: Option<&str>, opts: &OpenOptions) -> Result<Opened> {
        self.open_in_chain(filename, format, opts, &Chain::new())
    }

    fn open_in_chain(&self, filename: &str, format: Option<&str>, opts: &OpenOptions, chain: &Chain) -> Result<Opened> {
        if let Some(json) = filename.strip_prefix("json:") {
            let spec = json_name::parse(json)?;
            let fmt = match (format, spec.driver.as_deref()) {
                (Some(f), Some(d)) if f != d => {
                    return Err(Error::invalid_argument(format!(
                        "Cannot use image format '{f}' with a json: name that says driver '{d}'"
                    )))
                }
                (f, d) => f.or(d).map(str::to_string),
            };
            let mut opts = OpenOptions { protocol_options: spec.protocol_options, ..opts.clone() };
            for (k, v) in &spec.discard_options {
                opts.discard.take(k, v)?;
            }
            return self.open_in_chain(&spec.filename, fmt.as_deref(), &opts, chain);
        }
        if opts.force_share && !opts.read_only {
            return Err(Error::invalid_argument("force-share=on can only be used with read-only images"));
        }
        let named = match format {
            Some(name) => {
                Some(self.format(name).ok_or_else(|| Error::invalid_argument(format!("Unknown driver '{name}'")))?)
            }
            None => None,
        };
        let (storage, file, filename) = match remote::open(filename, opts)? {
            Some(remote) => (remote, None, filename.to_string()),
            None => {
                let local = local_path(filename);
                let file = Arc::new(HostFile::open(&local, &host_options(opts))?);
                (file.clone() as Arc<dyn Storage>, Some(file), local)
            }
        };
        let filename = filename.as_str();
        let (fmt, probed_raw) = match named {
            Some(f) => (f, false),
            None => {
                let mut head = vec![0u8; PROBE_SIZE];
                let len = storage.len()?;
                let n = (len.min(PROBE_SIZE as u64)) as usize;
                blockdev::read_exact_at(storage.as_ref(), 0, &mut head[..n])?;
                let f = self.probe_bytes(&head[..n], filename);
                if f.name() == "raw" && is_qcow1(&head[..n]) {
                    // qemu probes this as its "qcow" driver (and fails on a damaged qcow2 header
                    // whose version reads 1); treating it as raw would expose the metadata as data.
                    return Err(Error::unsupported(
                        "Image is in the qcow (version 1) format, which vdisk does not support",
                    ));
                }
                (f, f.name() == "raw")
            }
        };
        if let Some(file) = &file {
            let (perm, shared) = lock_perms(fmt, opts);
            file.set_permissions(perm, shared)?;
        }
        let chain = chain.enter(std::path::Path::new(filename), opts.max_chain_depth)?;
        let driver: Arc<dyn BlockDriver> = if probed_raw && !opts.read_only {
            let guard: raw::ProbeCheck = {
                let this = self.formats.clone();
                Arc::new(move |sector: &[u8]| {
                    let best = this.iter().map(|f| (f.probe(sector, ""), f.name())).max_by_key(|(s, _)| *s);
                    best.is_none_or(|(_, name)| name == "raw")
                })
            };
            Arc::new(raw::RawDriver::new(storage, opts.read_only, Some(guard))?)
        } else {
            fmt.open(storage, opts, &chain, self)?
        };
        Ok(Opened { driver, probed_raw })
    }

    /// Creates `filename` as `format` with already validated `opts`.
    pub fn create(&self, format: &str, filename: &str, opts: &CreateOptions) -> Result<()> {
        let f =
            self.format(format).ok_or_else(|| Error::invalid_argument(format!("Unknown file format '{format}'")))?;
        f.create(filename, opts, self)
    }
}

/// True for a file that starts like QEMU's original qcow (version 1) format: qcow2's magic with
/// version 1. qemu's `qcow` driver claims it; vdisk has no such driver and refuses it rather than
/// probing it as raw.
fn is_qcow1(head: &[u8]) -> bool {
    head.len() >= 8 && head[..4] == *b"QFI\xfb" && head[4..8] == 1u32.to_be_bytes()
}

/// The permissions an open of `format` with `opts` holds and shares.
fn lock_perms(format: &dyn Format, opts: &OpenOptions) -> (Perms, Perms) {
    if opts.force_share {
        return (Perms::CONSISTENT_READ, Perms::ALL);
    }
    let mut perm = Perms::CONSISTENT_READ;
    if !opts.read_only {
        perm = perm.union(Perms::WRITE);
        if !format.shares_writes() {
            perm = perm.union(Perms::RESIZE);
        }
    }
    let shared = if format.shares_writes() && !opts.exclusive {
        Perms::ALL
    } else {
        Perms::ALL.minus(Perms::WRITE).minus(Perms::RESIZE)
    };
    (perm, shared)
}

impl Opener for Registry {
    fn open_image(
        &self,
        referrer: &str,
        name: &str,
        format: Option<&str>,
        opts: &OpenOptions,
        chain: &Chain,
    ) -> Result<Arc<dyn BlockDriver>> {
        check_reference(opts.references, referrer, name)?;
        let path = resolve_reference(referrer, name);
        Ok(self.open_in_chain(&path, format, opts, chain)?.driver)
    }

    fn open_storage(&self, referrer: &str, name: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
        check_reference(opts.references, referrer, name)?;
        let path = resolve_reference(referrer, name);
        if let Some(remote) = remote::open(&path, opts)? {
            return Ok(remote);
        }
        let f = HostFile::open(&path, &host_options(opts))?;
        let (perm, shared) = lock_perms(self.format("raw").expect("raw is registered"), opts);
        f.set_permissions(perm, shared)?;
        Ok(Arc::new(f))
    }

    fn create_storage(&self, name: &str, opts: &CreateOptions) -> Result<Arc<dyn Storage>> {
        let size = opts.get_size("size")?.unwrap_or(0);
        let prealloc = file::file_prealloc(opts)?;
        if remote::is_remote(name) {
            return remote::create(name, size, prealloc);
        }
        let f: Arc<dyn Storage> = file::create_file(&local_path(name), size, prealloc)?;
        Ok(f)
    }

    fn delete_storage(&self, name: &str) {
        if remote::is_remote(name) {
            return;
        }
        let path = local_path(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

pub use blockdev::info::storage_info;

/// The options for opening an existing local file of an image opened with `opts`.
fn host_options(opts: &OpenOptions) -> HostOpenOptions {
    HostOpenOptions {
        read_only: opts.read_only,
        cache: opts.cache,
        create: false,
        no_locking: opts.no_locking,
        eager_writeback: opts.eager_writeback,
    }
}

/// The local path a file name refers to: a `file:` prefix is dropped, and a name whose first
/// colon comes before any slash (which qemu would read as a protocol prefix) gets `./` in front,
/// the way qemu spells such names in messages and `info`.
pub fn local_path(name: &str) -> String {
    let rest = name.strip_prefix("file:").unwrap_or(name);
    let colon = rest.find(':');
    let slash = rest.find('/');
    match (colon, slash) {
        (Some(_), None) => format!("./{rest}"),
        (Some(c), Some(s)) if c < s => format!("./{rest}"),
        _ => rest.to_string(),
    }
}

/// A container's length rounded up to whole 512-byte sectors: the size qemu reports for files
/// and raw images.
pub fn sector_len(storage: &dyn Storage) -> Result<u64> {
    let len = storage.len()?;
    Ok(len.div_ceil(512) * 512)
}

/// Whether an error means "the file does not exist".
pub fn is_not_found(e: &Error) -> bool {
    e.kind() == ErrorKind::NotFound
}
