//! A temporary overlay: a VMM's snapshot mode (QEMU's `-snapshot`, `snapshot=on`).
//!
//! [`TemporaryOverlay`] opens an image read-only and puts a throwaway qcow2 image over it. The
//! guest reads through to the image and writes into the overlay; nothing reaches the image unless
//! [`TemporaryOverlay::commit`] is called, which copies what the overlay holds into the image and
//! empties the overlay so the session goes on.
//!
//! What it owns and the rules it keeps:
//! - **The overlay file** is created in a private temporary location: a new file (`O_EXCL`, mode
//!   0600) in [`OverlayOptions::dir`] or else `std::env::temp_dir()` (which honours `TMPDIR`). It is
//!   unlinked as soon as the qcow2 driver has it open, so it lives only as long as the open file
//!   and no crash leaves it behind; until then a guard removes it on every error path. Like
//!   QEMU's temporary snapshot it uses cache mode `unsafe`: its content is worthless after the
//!   process ends, so flushing it to the disk would buy nothing.
//! - **The base** (the image) is opened read-only through the [`Registry`] with the caller's
//!   [`OpenOptions`]; its backing chain is opened as usual. The overlay's qcow2 header records the
//!   base's absolute name and format, but the overlay does not open it by name: its backing image
//!   is a slot holding the base driver this module opened (`BaseSlot`), which is what lets commit
//!   swap the read-only base for a read-write one and back.
//! - **Commit** holds off guest requests (a gate every request passes through shared, commit
//!   exclusively; requests in flight finish first), then: drops the read-only base (releasing its
//!   locks), reopens it read-write with the same options (the locks of a read-write open, so no
//!   other process may be using it), grows it if the overlay grew, copies every range the overlay
//!   allocates (data, and zeroes as efficient zero writes) and flushes it ([`crate::commit`]),
//!   closes it (clean marks), only then empties the overlay (the base must be durable first), and
//!   reopens the base read-only. The base driver is always reopened rather than kept: its metadata
//!   caches (a qcow2 L1 table read at open) would be stale after another driver instance wrote the
//!   file. If the copy fails, the overlay is not emptied,
//!   so the guest still sees its data (the base may then hold part of it); if the base cannot be
//!   reopened, reads that fall through to it fail with an error until the next successful commit.
//! - **Dropping** without commit writes nothing to the base: it was only ever open read-only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use blockdev::info::ImageInfo;
use blockdev::options::CreateOptions;
use blockdev::{
    BlockDriver, CacheMode, Chain, Error, ErrorKind, Extent, HostFile, HostOpenOptions, OpenOptions, Opener, Perms,
    ResizeOptions, Result, Storage, ZeroFlags,
};

use crate::Registry;

/// How to set up a [`TemporaryOverlay`].
#[derive(Debug, Clone, Default)]
pub struct OverlayOptions {
    /// How to open the base image. It is always opened read-only (`read_only` is ignored);
    /// `commit` reopens it read-write with the same options otherwise (`force_share` off).
    pub base: OpenOptions,
    /// Directory for the overlay file; `None` uses `std::env::temp_dir()` (`TMPDIR`, else `/tmp`).
    pub dir: Option<PathBuf>,
}

/// A disk image opened read-only under a throwaway qcow2 overlay (snapshot mode).
///
/// Implements [`BlockDriver`]: reads fall through to the image where the overlay holds nothing,
/// writes, zeroes and discards land in the overlay. [`TemporaryOverlay::commit`] writes the
/// overlay's content into the image; dropping the overlay without committing leaves the image
/// byte-for-byte unchanged. See the module docs for the rules.
#[derive(Debug)]
pub struct TemporaryOverlay {
    registry: Arc<Registry>,
    /// The image as the caller named it, and the format the caller asked for (`None`: probed).
    base_name: String,
    base_format: Option<String>,
    /// The base's open options, read-only.
    base_opts: OpenOptions,
    base: Arc<BaseSlot>,
    /// The qcow2 overlay; its backing image is `base`.
    top: Arc<dyn BlockDriver>,
    /// Taken shared by every request, exclusively by `commit`.
    gate: RwLock<()>,
    /// Where the overlay file was created (unlinked once open).
    path: PathBuf,
}

impl TemporaryOverlay {
    /// Opens `filename` (as `format`, or the probed format) read-only and creates a qcow2 overlay
    /// over it as the module docs describe. Errors name the file concerned: the image if it cannot
    /// be opened, the overlay file if it cannot be created.
    pub fn open(
        registry: Arc<Registry>,
        filename: &str,
        format: Option<&str>,
        opts: &OverlayOptions,
    ) -> Result<TemporaryOverlay> {
        let base_opts = OpenOptions { read_only: true, ..opts.base.clone() };
        let base = registry.open(filename, format, &base_opts)?.driver;
        let slot = Arc::new(BaseSlot::new(base.clone()));

        let dir = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
        let file = PrivateFile::create(&dir)?;
        let name = file.name()?;
        let context = |e: Error| e.prefixed(format!("Could not create temporary overlay '{name}'")).with_path(name);

        let mut create = CreateOptions::new();
        create.set("size", &base.size().to_string());
        create.set("backing_file", &absolute_name(filename));
        create.set("backing_fmt", base.format());
        registry.create("qcow2", name, &create).map_err(context)?;

        let host = HostFile::open(
            name,
            &HostOpenOptions {
                read_only: false,
                cache: CacheMode::Unsafe,
                create: false,
                no_locking: false,
                eager_writeback: false,
            },
        )
        .map_err(context)?;
        host.set_permissions(
            Perms::CONSISTENT_READ.union(Perms::WRITE).union(Perms::RESIZE),
            Perms::ALL.minus(Perms::WRITE).minus(Perms::RESIZE),
        )
        .map_err(context)?;
        let qcow2 = registry
            .format("qcow2")
            .ok_or_else(|| Error::unsupported("The qcow2 format is not registered; it is needed for the overlay"))?;
        let top_opts = OpenOptions { read_only: false, cache: CacheMode::Unsafe, ..OpenOptions::default() };
        let top = qcow2
            .open(Arc::new(host), &top_opts, &Chain::new(), &SlotOpener { slot: slot.clone() })
            .map_err(context)?;
        let path = file.unlink()?;
        drop(base);
        Ok(TemporaryOverlay {
            registry,
            base_name: filename.to_string(),
            base_format: format.map(str::to_string),
            base_opts,
            base: slot,
            top,
            gate: RwLock::new(()),
            path,
        })
    }

    /// Where the overlay file was created. It is already unlinked: the name is for messages.
    pub fn overlay_path(&self) -> &Path {
        &self.path
    }

    /// The base image (as the overlay's backing image sees it: reopened across commits).
    pub fn base(&self) -> Arc<dyn BlockDriver> {
        self.base.clone()
    }

    /// Writes everything the overlay holds into the base image, makes it durable, and empties the
    /// overlay; guest requests wait while it runs. On error the overlay keeps its data (see the
    /// module docs for what the base then holds).
    pub fn commit(&self) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("Could not commit the temporary overlay into '{}'", self.base_name);
        // Our read-only open of the base unshares write access: release it first.
        drop(self.base.take());
        let rw_opts = OpenOptions { read_only: false, force_share: false, ..self.base_opts.clone() };
        let rw = match self.registry.open(&self.base_name, self.base_format.as_deref(), &rw_opts) {
            Ok(o) => o.driver,
            Err(e) => {
                // The commit error is the one to report; a failed reopen shows on the next read.
                let _ = self.reopen_base();
                return Err(e.prefixed(&prefix).with_path(&self.base_name));
            }
        };
        self.base.put(rw.clone());
        // What the overlay alone (depth 1) allocates. `commit_into` returns once the base is
        // flushed; the overlay is emptied only after that (the ordering rule of `crate::commit`).
        let copied = crate::commit::commit_into(self.top.as_ref(), rw.as_ref(), 1, &|_, _| {}).map_err(Error::from);
        let closed = rw.close();
        drop(self.base.take());
        drop(rw);
        let result = copied.and(closed).and_then(|()| match self.top.backing_ops() {
            Some(ops) => ops.make_empty(),
            None => Err(Error::unsupported("The overlay cannot be emptied")),
        });
        let reopened = self.reopen_base();
        result.map_err(|e| e.prefixed(&prefix).with_path(&self.base_name))?;
        reopened
    }

    /// Opens the base read-only again and puts it under the overlay.
    fn reopen_base(&self) -> Result<()> {
        let base = self.registry.open(&self.base_name, self.base_format.as_deref(), &self.base_opts).map_err(|e| {
            e.prefixed(format!("Could not reopen '{}' read-only after commit", self.base_name))
                .with_path(&self.base_name)
        })?;
        self.base.put(base.driver);
        Ok(())
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockDriver for TemporaryOverlay {
    fn format(&self) -> &'static str {
        self.top.format()
    }

    fn size(&self) -> u64 {
        self.top.size()
    }

    fn filename(&self) -> &str {
        self.top.filename()
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&self, offset: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> Result<()> {
        let _g = self.shared();
        self.top.read_at(offset, bufs)
    }

    fn write_at(&self, offset: u64, bufs: &[std::io::IoSlice<'_>]) -> Result<()> {
        let _g = self.shared();
        self.top.write_at(offset, bufs)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _g = self.shared();
        self.top.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.shared();
        self.top.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        let _g = self.shared();
        self.top.flush()
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let _g = self.shared();
        self.top.block_status(offset, max_len)
    }

    fn resize(&self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        let _g = self.shared();
        self.top.resize(new_size, opts)
    }

    fn info(&self) -> Result<ImageInfo> {
        let _g = self.shared();
        self.top.info()
    }

    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        Some(self.base())
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        self.top.storage()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.top.cluster_size()
    }

    fn close(&self) -> Result<()> {
        let _g = self.shared();
        self.top.close()
    }
}

/// The overlay's backing image: the base driver of the moment, swapped by commit. Requests take
/// the current driver and release the slot before doing I/O.
#[derive(Debug)]
struct BaseSlot {
    name: String,
    format: &'static str,
    /// The size of the last driver held, so the overlay sees a stable size while the slot is empty.
    size: AtomicU64,
    current: RwLock<Option<Arc<dyn BlockDriver>>>,
}

impl BaseSlot {
    fn new(base: Arc<dyn BlockDriver>) -> BaseSlot {
        BaseSlot {
            name: base.filename().to_string(),
            format: base.format(),
            size: AtomicU64::new(base.size()),
            current: RwLock::new(Some(base)),
        }
    }

    fn get(&self) -> Result<Arc<dyn BlockDriver>> {
        let cur = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        cur.ok_or_else(|| {
            Error::new(ErrorKind::Io, format!("The base image '{}' is not open (it could not be reopened)", self.name))
                .with_path(&self.name)
        })
    }

    fn take(&self) -> Option<Arc<dyn BlockDriver>> {
        self.current.write().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn put(&self, driver: Arc<dyn BlockDriver>) {
        self.size.store(driver.size(), Ordering::Release);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(driver);
    }
}

impl BlockDriver for BaseSlot {
    fn format(&self) -> &'static str {
        self.format
    }

    fn size(&self) -> u64 {
        match self.get() {
            Ok(d) => d.size(),
            Err(_) => self.size.load(Ordering::Acquire),
        }
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn is_read_only(&self) -> bool {
        self.get().map_or(true, |d| d.is_read_only())
    }

    fn read_at(&self, offset: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> Result<()> {
        self.get()?.read_at(offset, bufs)
    }

    fn write_at(&self, offset: u64, bufs: &[std::io::IoSlice<'_>]) -> Result<()> {
        self.get()?.write_at(offset, bufs)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.get()?.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.get()?.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.get()?.flush()
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.get()?.block_status(offset, max_len)
    }

    fn resize(&self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        self.get()?.resize(new_size, opts)
    }

    fn info(&self) -> Result<ImageInfo> {
        self.get()?.info()
    }

    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        self.get().ok()?.backing()
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        self.get().ok()?.storage()
    }

    fn identity_storage(&self) -> Option<Arc<dyn Storage>> {
        self.get().ok()?.identity_storage()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.get().ok()?.cluster_size()
    }

    fn close(&self) -> Result<()> {
        self.get()?.close()
    }
}

/// The opener the overlay is opened with: its backing image is the slot, whatever name the header
/// records; it refers to nothing else.
struct SlotOpener {
    slot: Arc<BaseSlot>,
}

impl Opener for SlotOpener {
    fn open_image(
        &self,
        _referrer: &str,
        _name: &str,
        _format: Option<&str>,
        _opts: &OpenOptions,
        _chain: &Chain,
    ) -> Result<Arc<dyn BlockDriver>> {
        Ok(self.slot.clone())
    }

    fn open_storage(&self, referrer: &str, name: &str, _opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
        Err(Error::unsupported(format!("The temporary overlay '{referrer}' cannot refer to '{name}'")))
    }

    fn create_storage(&self, name: &str, _opts: &CreateOptions) -> Result<Arc<dyn Storage>> {
        Err(Error::unsupported(format!("Cannot create '{name}' for a temporary overlay")))
    }
}

/// A new, private (0600) file that is removed on drop unless it was unlinked on purpose.
struct PrivateFile {
    path: PathBuf,
    linked: bool,
}

impl PrivateFile {
    /// Creates `dir/vdisk-overlay-<pid>-<n>-<nanos>.qcow2` exclusively.
    fn create(dir: &Path) -> Result<PrivateFile> {
        use std::os::unix::fs::OpenOptionsExt;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut last = None;
        for _ in 0..16 {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("vdisk-overlay-{}-{n}-{:08x}.qcow2", std::process::id(), nanos as u32));
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(_) => return Ok(PrivateFile { path, linked: true }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(Error::from_io("create", e)
                        .prefixed(format!("Could not create a temporary overlay in '{}'", dir.display()))
                        .with_path(path.display().to_string()))
                }
            }
        }
        let e = last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AlreadyExists));
        Err(Error::from_io("create", e)
            .prefixed(format!("Could not create a temporary overlay in '{}'", dir.display()))
            .with_path(dir.display().to_string()))
    }

    /// The path as the `&str` the registry takes.
    fn name(&self) -> Result<&str> {
        self.path.to_str().ok_or_else(|| {
            Error::invalid_argument(format!(
                "The temporary directory '{}' is not valid UTF-8; set TMPDIR or OverlayOptions::dir",
                self.path.display()
            ))
        })
    }

    /// Unlinks the file (it stays usable through open descriptors) and returns its former path.
    fn unlink(mut self) -> Result<PathBuf> {
        std::fs::remove_file(&self.path).map_err(|e| {
            Error::from_io("unlink", e)
                .prefixed(format!("Could not unlink temporary overlay '{}'", self.path.display()))
                .with_path(self.path.display().to_string())
        })?;
        self.linked = false;
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        if self.linked {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The name the overlay's header records for the base: absolute where the base is a local file
/// (so `qemu-img info` of the overlay file would make sense), else as given.
fn absolute_name(filename: &str) -> String {
    if filename.starts_with("json:") || filename.contains("://") {
        return filename.to_string();
    }
    let local = crate::local_path(filename);
    match std::fs::canonicalize(&local) {
        Ok(p) => p.to_str().map_or(local.clone(), str::to_string),
        Err(_) => local,
    }
}
