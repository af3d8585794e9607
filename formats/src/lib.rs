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
pub mod foreign;
pub mod json_name;
pub mod luks;
pub mod overlay;
pub mod raw;
pub mod remote;

use std::sync::Arc;

use blockdev::options::{CreateOptions, OptionSpec};
use blockdev::{
    check_reference, resolve_reference, BlockDriver, Chain, Error, ErrorKind, Format, OpenOptions, Opener, Perms,
    Protocol, Result, Storage,
};

pub use file::FILE_CREATE_OPTIONS;
pub use foreign::{foreign_format, ForeignFormat, FOREIGN_FORMATS};
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

/// What probing found: a format vdisk has, or one qemu has and vdisk cannot open yet.
#[derive(Clone, Copy)]
pub enum Probed<'a> {
    /// A registered format (raw when nothing else matched).
    Format(&'a dyn Format),
    /// A format vdisk refuses by name.
    Foreign(&'static ForeignFormat),
}

impl Probed<'_> {
    /// qemu's name of the probed format.
    pub fn name(&self) -> &'static str {
        match self {
            Probed::Format(f) => f.name(),
            Probed::Foreign(f) => f.name,
        }
    }

    /// The probed format's score for `head` and `filename`.
    pub fn score(&self, head: &[u8], filename: &str) -> u32 {
        match self {
            Probed::Format(f) => f.probe(head, filename),
            Probed::Foreign(f) => (f.probe)(head, filename),
        }
    }
}

impl std::fmt::Debug for Probed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every format and protocol vdisk knows.
pub struct Registry {
    formats: Vec<Arc<dyn Format>>,
    /// Asked in order; the last, `file`, claims every name.
    protocols: Vec<Arc<dyn Protocol>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("formats", &self.formats.iter().map(|x| x.name()).collect::<Vec<_>>())
            .field("protocols", &self.protocols.iter().map(|p| p.drivers()).collect::<Vec<_>>())
            .finish()
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
            protocols: vec![
                Arc::new(remote::NbdProtocol),
                Arc::new(remote::HttpProtocol),
                Arc::new(file::FileProtocol),
            ],
        }
    }

    /// Adds a protocol, asked before the ones already registered (so it may take names from
    /// them); `file` stays the fallback for names no protocol claims.
    pub fn register_protocol(&mut self, protocol: Arc<dyn Protocol>) {
        self.protocols.insert(0, protocol);
    }

    /// The protocol whose name `filename` is: the first that claims it, else `file`.
    pub fn protocol_for(&self, filename: &str) -> &dyn Protocol {
        let fallback = self.protocols.last().expect("file is always registered");
        self.protocols.iter().find(|p| p.claims(filename)).unwrap_or(fallback).as_ref()
    }

    /// The protocol answering to the node driver name `driver` (`file`, `nbd`, `https`, ...).
    pub fn protocol(&self, driver: &str) -> Option<&dyn Protocol> {
        self.protocols.iter().find(|p| p.drivers().contains(&driver)).map(|p| p.as_ref())
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

    /// The format whose probe scores `head` (the first bytes of a file called `filename`)
    /// highest, among the registered formats and the [`FOREIGN_FORMATS`] qemu knows and vdisk
    /// cannot open yet; raw if nothing else matches or the file is empty (as in qemu, which
    /// probes no format for an empty file). On equal scores the format listed first wins.
    pub fn probe_bytes(&self, head: &[u8], filename: &str) -> Probed<'_> {
        let raw = Probed::Format(self.format("raw").expect("raw is always registered"));
        if head.is_empty() {
            return raw;
        }
        let registered = self.formats.iter().map(|f| (Probed::Format(f.as_ref()), f.probe(head, filename)));
        let foreign = FOREIGN_FORMATS.iter().map(|f| (Probed::Foreign(f), (f.probe)(head, filename)));
        let mut best: Option<(Probed<'_>, u32)> = None;
        for (candidate, score) in registered.chain(foreign) {
            if score > 0 && best.as_ref().is_none_or(|(_, s)| score > *s) {
                best = Some((candidate, score));
            }
        }
        best.map(|(f, _)| f).unwrap_or(raw)
    }

    /// The guard of an image probed as raw and opened writable (qemu's): a write may not make
    /// sector 0 probe as any other format, one vdisk cannot open included.
    pub fn raw_probe_guard(&self) -> raw::ProbeCheck {
        let this = Registry { formats: self.formats.clone(), protocols: self.protocols.clone() };
        Arc::new(move |sector: &[u8]| this.probe_bytes(sector, "").name() == "raw")
    }

    /// The format called `name`, or the error for a name that is not one: a format qemu has and
    /// vdisk does not yet is refused by name ([`ForeignFormat::named_refusal`]); any other name gets
    /// `unknown`'s error (whose wording depends on the command).
    pub fn format_or(&self, name: &str, unknown: impl FnOnce() -> Error) -> Result<&dyn Format> {
        match (self.format(name), foreign_format(name)) {
            (Some(f), _) => Ok(f),
            (None, Some(foreign)) => Err(foreign.named_refusal()),
            (None, None) => Err(unknown()),
        }
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
            let no_backing = opts.no_backing || spec.no_backing;
            let mut opts = OpenOptions { protocol_options: spec.protocol_options, no_backing, ..opts.clone() };
            for (k, v) in &spec.discard_options {
                opts.discard.take(k, v)?;
            }
            return self.open_in_chain(&spec.filename, fmt.as_deref(), &opts, chain);
        }
        if opts.force_share && !opts.read_only {
            return Err(Error::invalid_argument("force-share=on can only be used with read-only images"));
        }
        let named = match format {
            Some(name) => Some(self.format_or(name, || Error::invalid_argument(format!("Unknown driver '{name}'")))?),
            None => None,
        };
        let storage = self.protocol_for(filename).open(filename, opts)?;
        // A local file is named by its path (`file:` dropped); others by the name given.
        let local = storage.path().map(|_| storage.name().to_string());
        let filename = local.as_deref().unwrap_or(filename);
        let (fmt, probed_raw) = match named {
            Some(f) => (f, false),
            None => {
                // As in qemu, a file shorter than the probe size is probed padded with zeros
                // (it reads as whole sectors); an empty one is raw.
                let mut head = vec![0u8; PROBE_SIZE];
                let len = storage.len()?;
                let n = (len.min(PROBE_SIZE as u64)) as usize;
                blockdev::read_exact_at(storage.as_ref(), 0, &mut head[..n])?;
                let head = if n == 0 { &head[..0] } else { &head[..] };
                let f = match self.probe_bytes(head, filename) {
                    Probed::Format(f) => f,
                    // Opening it as raw would expose the container's metadata as the disk.
                    Probed::Foreign(foreign) => return Err(foreign.refusal()),
                };
                (f, f.name() == "raw")
            }
        };
        let (perm, shared) = lock_perms(fmt, opts);
        storage.set_permissions(perm, shared)?;
        let chain = chain.enter(std::path::Path::new(filename), opts.max_chain_depth)?;
        let driver: Arc<dyn BlockDriver> = if probed_raw && !opts.read_only {
            Arc::new(raw::RawDriver::new(storage, opts.read_only, Some(self.raw_probe_guard()))?)
        } else {
            fmt.open(storage, opts, &chain, self)?
        };
        Ok(Opened { driver, probed_raw })
    }

    /// Creates `filename` as `format` with `opts`.
    ///
    /// Every option is checked against the format's create options and the file protocol's
    /// ([`Registry::create_specs`]): an unknown or misspelled key is refused, whichever way it was
    /// set. An overlay given a backing file and no size takes the backing image's size (opened
    /// read-only, sharing, without I/O, in the format `backing_fmt` names or the one it probes
    /// as); anything else without a size is refused.
    ///
    /// ```no_run
    /// use blockdev::options::CreateOptions;
    ///
    /// let reg = formats::Registry::new();
    /// let mut base = CreateOptions::new();
    /// base.set("size", "64M");
    /// reg.create("qcow2", "/tmp/base.qcow2", &base)?;
    /// let mut overlay = CreateOptions::new();
    /// overlay.set("backing_file", "base.qcow2"); // relative to the overlay
    /// overlay.set("backing_fmt", "qcow2");
    /// reg.create("qcow2", "/tmp/overlay.qcow2", &overlay)?; // 64 MiB, as its backing file
    /// # Ok::<(), blockdev::Error>(())
    /// ```
    pub fn create(&self, format: &str, filename: &str, opts: &CreateOptions) -> Result<()> {
        let f = self.format_or(format, || Error::invalid_argument(format!("Unknown file format '{format}'")))?;
        opts.validate(&self.create_specs(f))?;
        if opts.has("size") {
            return f.create(filename, opts, self);
        }
        let Some(backing) = opts.get("backing_file") else {
            return Err(Error::invalid_argument("Image creation needs a size parameter"));
        };
        let size = self.backing_size(filename, backing, opts.get("backing_fmt"))?;
        let mut sized = opts.clone();
        sized.set("size", &size.to_string());
        f.create(filename, &sized, self)
    }

    /// The virtual size of `backing` as the image `referrer` names it (for an overlay created
    /// without a size).
    fn backing_size(&self, referrer: &str, backing: &str, format: Option<&str>) -> Result<u64> {
        let path = resolve_reference(referrer, backing);
        let opts =
            OpenOptions { read_only: true, force_share: true, no_io: true, no_backing: true, ..OpenOptions::default() };
        let opened = self.open(&path, format, &opts).map_err(|e| e.prefixed("Could not open backing image"))?;
        Ok(opened.driver.size())
    }
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
        let storage = self.protocol_for(&path).open(&path, opts)?;
        let (perm, shared) = lock_perms(self.format("raw").expect("raw is registered"), opts);
        storage.set_permissions(perm, shared)?;
        Ok(storage)
    }

    fn create_storage(&self, name: &str, opts: &CreateOptions) -> Result<Arc<dyn Storage>> {
        let size = opts.get_size("size")?.unwrap_or(0);
        let prealloc = file::file_prealloc(opts)?;
        self.protocol_for(name).create(name, size, prealloc)
    }

    fn delete_storage(&self, name: &str) {
        self.protocol_for(name).delete(name);
    }
}

pub use blockdev::info::storage_info;

pub use file::local_path;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;

    #[test]
    fn foreign_magics_outrank_raw_and_lose_to_nothing_registered() {
        let reg = Registry::new();
        let mut head = vec![0u8; PROBE_SIZE];
        assert_eq!(reg.probe_bytes(&head, "x").name(), "raw");
        assert_eq!(reg.probe_bytes(&[], "x.dmg").name(), "raw", "an empty file is raw whatever its name");
        assert_eq!(reg.probe_bytes(&head, "x.dmg").name(), "dmg");
        head[..8].copy_from_slice(b"vhdxfile");
        assert!(matches!(reg.probe_bytes(&head, "x"), Probed::Foreign(f) if f.name == "vhdx"));
        head[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert!(matches!(reg.probe_bytes(&head, "x.dmg"), Probed::Format(f) if f.name() == "qcow2"));
    }

    /// A protocol serving in-memory containers under `mem:` names.
    #[derive(Debug, Default)]
    struct MemProtocol {
        disks: std::sync::Mutex<Vec<Arc<blockdev::MemStorage>>>,
    }

    impl Protocol for MemProtocol {
        fn drivers(&self) -> &'static [&'static str] {
            &["mem"]
        }
        fn claims(&self, filename: &str) -> bool {
            filename.starts_with("mem:")
        }
        fn open(&self, filename: &str, _opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
            let disks = self.disks.lock().unwrap();
            let found = disks.iter().find(|d| d.name() == filename).cloned();
            found
                .map(|d| d as Arc<dyn Storage>)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no disk {filename}")))
        }
        fn create(&self, filename: &str, size: u64, _prealloc: blockdev::Prealloc) -> Result<Arc<dyn Storage>> {
            let disk = Arc::new(blockdev::MemStorage::new(filename, vec![0u8; size as usize]));
            self.disks.lock().unwrap().push(disk.clone());
            Ok(disk)
        }
    }

    #[test]
    fn names_go_to_the_protocol_that_claims_them_and_file_takes_the_rest() {
        let reg = Registry::new();
        let driver = |name: &str| reg.protocol_for(name).drivers()[0];
        assert_eq!(driver("nbd://localhost/disk"), "nbd");
        assert_eq!(driver("nbd:localhost:10809"), "nbd");
        assert_eq!(driver("https://example.org/disk.qcow2"), "http");
        assert_eq!(driver("/images/disk.qcow2"), "file");
        assert_eq!(driver("file:disk.qcow2"), "file");
        assert_eq!(driver("relative/disk.qcow2"), "file");
        assert!(reg.protocol("https").is_some() && reg.protocol("rbd").is_none());
        assert!(!reg.protocol_for("/x").is_remote() && reg.protocol_for("nbd://h/e").is_remote());
    }

    #[test]
    fn a_registered_protocol_carries_any_format() {
        let mut reg = Registry::new();
        reg.register_protocol(Arc::new(MemProtocol::default()));
        let mut opts = CreateOptions::new();
        opts.set("size", "1M");
        reg.create("qcow2", "mem:top", &opts).unwrap();
        let opened = reg.open("mem:top", None, &OpenOptions::read_write()).unwrap();
        assert_eq!((opened.driver.format(), opened.driver.size()), ("qcow2", 1 << 20));
        opened.driver.write_at(4096, &[IoSlice::new(b"over a registered protocol")]).unwrap();
        opened.driver.close().unwrap();
        let again = reg.open("mem:top", Some("qcow2"), &OpenOptions::default()).unwrap();
        let mut back = [0u8; 26];
        again.driver.read_at(4096, &mut [std::io::IoSliceMut::new(&mut back)]).unwrap();
        assert_eq!(&back, b"over a registered protocol");
        assert!(reg.open("mem:missing", Some("raw"), &OpenOptions::default()).is_err());
    }

    #[test]
    fn a_probed_raw_image_refuses_a_sector_zero_that_probes_as_a_foreign_format() {
        let reg = Registry::new();
        let storage = Arc::new(blockdev::MemStorage::new("m", vec![0u8; 4096]));
        let raw = raw::RawDriver::new(storage, false, Some(reg.raw_probe_guard())).unwrap();
        let e = raw.write_at(0, &[IoSlice::new(b"WithoutFreeSpace\x02\0\0\0")]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM));
        raw.write_at(0, &[IoSlice::new(b"plain data")]).unwrap();
    }

    fn options(entries: &[(&str, &str)]) -> CreateOptions {
        let mut o = CreateOptions::new();
        entries.iter().for_each(|(k, v)| o.set(k, v));
        o
    }

    #[test]
    fn an_overlay_created_without_a_size_takes_its_backing_files() {
        let reg = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let name = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
        let mut tried = Vec::new();
        for fmt in reg.names() {
            if !reg.create_specs(reg.format(fmt).unwrap()).iter().any(|s| s.name == "backing_file") {
                continue;
            }
            let (base, overlay) = (format!("base.{fmt}"), format!("top.{fmt}"));
            reg.create(fmt, &name(&base), &options(&[("size", "48M")])).unwrap();
            let base_size = reg.open(&name(&base), Some(fmt), &ro).unwrap().driver.size();
            let o = options(&[("backing_file", &base), ("backing_fmt", fmt)]);
            reg.create(fmt, &name(&overlay), &o).unwrap_or_else(|e| panic!("{fmt}: {e}"));
            assert_eq!(reg.open(&name(&overlay), Some(fmt), &ro).unwrap().driver.size(), base_size, "{fmt}");
            tried.push(fmt);
        }
        assert!(tried.contains(&"qcow2") && tried.contains(&"vmdk"), "{tried:?}");
        // Without a size or a backing file there is nothing to take it from.
        let e = reg.create("qcow2", &name("none.qcow2"), &CreateOptions::new()).unwrap_err();
        assert_eq!(e.message(), "Image creation needs a size parameter");
        // A backing file that is not there is named in the error.
        let o = options(&[("backing_file", "missing.qcow2"), ("backing_fmt", "qcow2")]);
        let e = reg.create("qcow2", &name("orphan.qcow2"), &o).unwrap_err();
        assert!(e.message().starts_with("Could not open backing image"), "{}", e.message());
    }

    #[test]
    fn misspelled_create_options_are_refused_on_the_library_path() {
        let reg = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.qcow2").to_str().unwrap().to_string();
        let e = reg.create("qcow2", &img, &options(&[("size", "1M"), ("sise", "2M")])).unwrap_err();
        assert_eq!(e.message(), "Invalid parameter 'sise'");
        let e = reg.create("qcow2", &img, &options(&[("size", "1M"), ("lazy_refcounts", "maybe")])).unwrap_err();
        assert!(e.message().contains("lazy_refcounts"), "{}", e.message());
        assert!(!dir.path().join("x.qcow2").exists(), "a refused create made a file");
        reg.create("qcow2", &img, &options(&[("size", "1M"), ("cluster_size", "4k")])).unwrap();
    }

    #[test]
    fn a_second_writable_open_in_the_same_process_says_the_conflict_is_here() {
        let reg = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.qcow2").to_str().unwrap().to_string();
        reg.create("qcow2", &img, &options(&[("size", "1M")])).unwrap();
        let rw = OpenOptions { read_only: false, ..OpenOptions::default() };
        let first = reg.open(&img, Some("qcow2"), &rw).unwrap();
        let e = reg.open(&img, Some("qcow2"), &rw).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LockedInProcess, "{e:#}");
        assert!(format!("{e:#}").contains("in this process"), "{e:#}");
        // A read-only open that shares writes does not conflict; closing the first frees the image.
        let shared = OpenOptions { force_share: true, ..OpenOptions::default() };
        reg.open(&img, Some("qcow2"), &shared).unwrap();
        drop(first);
        reg.open(&img, Some("qcow2"), &rw).unwrap();
    }

    #[test]
    fn named_formats_vdisk_lacks_are_refused_by_name() {
        let reg = Registry::new();
        let unknown = || Error::invalid_argument("unknown");
        assert_eq!(reg.format_or("qcow2", unknown).map(|f| f.name()).ok(), Some("qcow2"));
        let message = |name| reg.format_or(name, unknown).err().map(|e| e.message().to_string());
        assert!(message("vhdx").unwrap().contains("'vhdx' is not supported by vdisk"));
        assert_eq!(message("nonsense").unwrap(), "unknown");
    }
}
