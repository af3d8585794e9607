//! [`HostFile`]: a local file, block device or character device as a [`Storage`].
//!
//! What it owns:
//! - positional, vectored I/O (`preadv`/`pwritev`), never the shared file position;
//! - the cache modes of QEMU ([`CacheMode`]): `writeback` (page cache, flush = `fdatasync`),
//!   `writethrough` (`O_DSYNC`), `none` (`O_DIRECT`), `directsync` (`O_DIRECT|O_DSYNC`) and `unsafe`
//!   (page cache, flush does nothing);
//! - with `O_DIRECT`, requests or buffers that are not aligned are bounced through aligned buffers; an
//!   unaligned write becomes read-modify-write of the aligned window, done under a range lock so that
//!   concurrent writes to neighbouring bytes are never lost, and a write that extends the file is
//!   trimmed back to its true end so the file length stays what the caller wrote;
//! - `SEEK_DATA`/`SEEK_HOLE` block status, `fallocate` (punch hole, zero range, preallocation,
//!   and [`Storage::reserve`] before a driver fills fresh space), `copy_file_range` offload, and
//!   QEMU-compatible image locking ([`Perms`], see `lock.rs`);
//! - optionally (servers), writeback of large buffered writes started at once with
//!   `sync_file_range`, so a client's flush has little left to wait for; flush stays the only
//!   durability point.

mod lock;
pub(crate) mod sys;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use lock::LockState;
pub use lock::Perms;

use crate::buffer::AlignedBuf;
use crate::error::{Error, ErrorKind, Result};
use crate::range_lock::RangeLock;
use crate::storage::{checked_end, iov_len, iov_len_mut, Alignment, Prealloc, Storage};

/// QEMU's cache modes for a host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Page cache; flush makes data durable.
    #[default]
    Writeback,
    /// Page cache, every write durable on return.
    Writethrough,
    /// Bypass the page cache (`O_DIRECT`); flush makes data durable.
    None,
    /// Bypass the page cache and make every write durable on return.
    DirectSync,
    /// Page cache; flush is ignored (fast, unsafe on a crash).
    Unsafe,
}

impl CacheMode {
    /// Parses qemu's names (`writeback`, `writethrough`, `none`/`off`, `directsync`, `unsafe`).
    pub fn parse(s: &str) -> Option<CacheMode> {
        match s {
            "writeback" => Some(CacheMode::Writeback),
            "writethrough" => Some(CacheMode::Writethrough),
            "none" | "off" => Some(CacheMode::None),
            "directsync" => Some(CacheMode::DirectSync),
            "unsafe" => Some(CacheMode::Unsafe),
            _ => None,
        }
    }

    /// Whether the mode uses `O_DIRECT`.
    pub fn is_direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Whether every write is durable on return.
    pub fn is_sync(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }
}

/// How to open a [`HostFile`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HostOpenOptions {
    /// Open without write access.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Create the file (truncating an existing one).
    pub create: bool,
    /// Do not take or test QEMU image locks at all (`locking=off`).
    pub no_locking: bool,
    /// Start writeback of large buffered writes at once (see `OpenOptions::eager_writeback`).
    pub eager_writeback: bool,
}

/// Buffered writes at least this long start their writeback at once with `eager_writeback`.
const EAGER_WRITEBACK_MIN: u64 = 256 << 10;

/// A local file (or block or character device) holding an image's bytes.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    name: String,
    path: PathBuf,
    read_only: bool,
    cache: CacheMode,
    align: Alignment,
    /// A block or character device (qemu's `host_device`): its length is the device's, it cannot
    /// be grown, truncated, punched or preallocated, and it does not read as zeros when new.
    is_device: bool,
    /// A character device (`/dev/null`, `/dev/zero`): no block-device ioctls; its length is what
    /// seeking to its end gives (0 for those two), as qemu takes it.
    is_char_device: bool,
    locking: bool,
    locks: Mutex<LockState>,
    /// Aligned windows of direct writes in flight (only used with `O_DIRECT`).
    windows: RangeLock,
    /// Serialises direct writes that reach past the end of the file.
    extend: Mutex<()>,
    /// The file system refused `fallocate` once: [`Storage::reserve`] stops trying.
    cannot_reserve: AtomicBool,
    /// The file system refused `FALLOC_FL_ZERO_RANGE` once: [`Storage::zero_without_writing`]
    /// stops trying.
    cannot_zero_range: AtomicBool,
    /// Start writeback of large buffered writes at once.
    eager_writeback: bool,
}

impl HostFile {
    /// Opens `path` as qemu's `file` driver would (`host_device` for block and character
    /// devices). Directories and other non-regular files are refused with qemu's message.
    pub fn open(path: &str, opts: &HostOpenOptions) -> Result<HostFile> {
        let mut o = FsOpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.create {
            o.create(true).truncate(true);
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.cache.is_direct() {
            flags |= libc::O_DIRECT;
        }
        if opts.cache.is_sync() {
            flags |= libc::O_DSYNC;
        }
        o.custom_flags(flags).mode(0o644);
        let file = o
            .open(path)
            .map_err(|e| Error::from_io("open", e).prefixed(format!("Could not open '{path}'")).with_path(path))?;
        let ft = file.metadata().map_err(|e| Error::from_io("stat", e).with_path(path))?.file_type();
        let is_char_device = ft.is_char_device();
        let is_device = ft.is_block_device() || is_char_device;
        if !ft.is_file() && !is_device {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("'file' driver requires '{path}' to be a regular file"),
            )
            .with_path(path));
        }
        let align = if opts.cache.is_direct() {
            let (request, memory) = sys::dio_alignment(file.as_raw_fd()).unwrap_or((4096, 4096));
            Alignment { request, memory }
        } else {
            Alignment::default()
        };
        Ok(HostFile {
            file,
            name: path.to_string(),
            path: PathBuf::from(path),
            read_only: opts.read_only,
            cache: opts.cache,
            align,
            is_device,
            is_char_device,
            locking: !opts.no_locking,
            locks: Mutex::new(LockState::default()),
            windows: RangeLock::default(),
            extend: Mutex::new(()),
            cannot_reserve: AtomicBool::new(is_device),
            cannot_zero_range: AtomicBool::new(is_device),
            eager_writeback: opts.eager_writeback && !opts.cache.is_sync() && opts.cache != CacheMode::Unsafe,
        })
    }

    /// The cache mode the file was opened with.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// Takes QEMU-compatible locks for holding `perm` while sharing only `shared` with other
    /// processes; fails with [`ErrorKind::Locked`] and qemu's message if another process conflicts.
    /// May be called again to change the set (for example when reopening read-write).
    pub fn set_permissions(&self, perm: Perms, shared: Perms) -> Result<()> {
        if !self.locking {
            return Ok(());
        }
        let mut state = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        state.apply(self.file.as_raw_fd(), &self.name, perm, shared)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only().with_path(&self.name));
        }
        Ok(())
    }

    fn current_len(&self) -> Result<u64> {
        if self.is_char_device {
            return match sys::seek(self.fd(), 0, libc::SEEK_END) {
                Ok(end) => Ok(end.unwrap_or(0)),
                Err(e) => Err(Error::from_errno("lseek", e).with_path(&self.name)),
            };
        }
        if self.is_device {
            return sys::block_device_size(self.fd());
        }
        Ok(sys::fstat(self.fd())?.st_size as u64)
    }

    fn needs_bounce(&self, offset: u64, lens_and_ptrs: impl Iterator<Item = (usize, usize)>) -> bool {
        if !self.cache.is_direct() {
            return false;
        }
        let ra = self.align.request as u64;
        let ma = self.align.memory as usize;
        if offset % ra != 0 {
            return true;
        }
        // Empty slices move no bytes (and may carry a dangling, unaligned pointer).
        lens_and_ptrs.into_iter().any(|(len, ptr)| len != 0 && (len as u64 % ra != 0 || ptr % ma != 0))
    }

    fn aligned_window(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let a = self.align.request as u64;
        let start = offset / a * a;
        let end = checked_end(offset, len)?.div_ceil(a) * a;
        Ok((start, end))
    }

    fn read_window(&self, start: u64, buf: &mut AlignedBuf) -> Result<()> {
        let n = sys::preadv_full(self.fd(), start, &mut [IoSliceMut::new(buf)])? as usize;
        buf[n..].fill(0);
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        let chunk = len.min(1 << 20) as usize;
        let zeros = AlignedBuf::new(chunk, self.align.memory as usize);
        let end = checked_end(offset, len)?;
        while offset < end {
            let n = (end - offset).min(chunk as u64) as usize;
            self.write_at(offset, &[IoSlice::new(&zeros[..n])])?;
            offset += n as u64;
        }
        Ok(())
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::from_io("truncate", e).with_path(&self.name))
    }
}

impl Storage for HostFile {
    fn len(&self) -> Result<u64> {
        self.current_len()
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len_mut(bufs);
        checked_end(offset, len)?;
        if !self.needs_bounce(offset, bufs.iter().map(|b| (b.len(), b.as_ptr() as usize))) {
            let n = sys::preadv_full(self.fd(), offset, bufs).map_err(|e| e.with_path(&self.name))?;
            if n < len {
                zero_tail(bufs, n);
            }
            return Ok(());
        }
        let (start, end) = self.aligned_window(offset, len)?;
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align.memory as usize);
        self.read_window(start, &mut bounce).map_err(|e| e.with_path(&self.name))?;
        let mut pos = (offset - start) as usize;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&bounce[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.check_writable()?;
        let len = iov_len(bufs);
        let end = checked_end(offset, len)?;
        if !self.cache.is_direct() {
            sys::pwritev_full(self.fd(), offset, bufs).map_err(|e| e.with_path(&self.name))?;
            if self.eager_writeback && len >= EAGER_WRITEBACK_MIN {
                sys::start_writeback(self.fd(), offset, len);
            }
            return Ok(());
        }
        let (wstart, wend) = self.aligned_window(offset, len)?;
        let _window = self.windows.lock(wstart, wend);
        let extending = wend > self.current_len()?;
        let _extend = if extending { Some(self.extend.lock().unwrap_or_else(|p| p.into_inner())) } else { None };
        if !self.needs_bounce(offset, bufs.iter().map(|b| (b.len(), b.as_ptr() as usize))) {
            sys::pwritev_full(self.fd(), offset, bufs).map_err(|e| e.with_path(&self.name))?;
        } else {
            // Read under the extend lock (when extending), so no other write grows the file
            // between this and the trim below.
            let len_before = if extending { self.current_len()? } else { wend };
            let mut bounce = AlignedBuf::new((wend - wstart) as usize, self.align.memory as usize);
            if wstart < offset || wend > end {
                self.read_window(wstart, &mut bounce).map_err(|e| e.with_path(&self.name))?;
            }
            let mut pos = (offset - wstart) as usize;
            for b in bufs {
                bounce[pos..pos + b.len()].copy_from_slice(b);
                pos += b.len();
            }
            sys::pwritev_full(self.fd(), wstart, &[IoSlice::new(&bounce)]).map_err(|e| e.with_path(&self.name))?;
            if wend > len_before && !self.is_device {
                self.truncate(end.max(len_before))?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.cache == CacheMode::Unsafe {
            return Ok(());
        }
        sys::fdatasync(self.fd()).map_err(|e| e.with_path(&self.name))
    }

    fn set_len(&self, len: u64, prealloc: Prealloc) -> Result<()> {
        self.check_writable()?;
        if self.is_device {
            // qemu's words, without the sizes (create and convert print them after the name).
            if len > self.current_len()? {
                return Err(Error::unsupported("Cannot grow device files"));
            }
            return Ok(());
        }
        let old = self.current_len()?;
        match prealloc {
            Prealloc::Off | Prealloc::Metadata => self.truncate(len),
            _ if len <= old => self.truncate(len),
            Prealloc::Falloc => sys::fallocate(self.fd(), 0, old, len - old).map_err(|e| {
                Error::from_errno("fallocate", e).prefixed("Could not preallocate new data").with_path(&self.name)
            }),
            Prealloc::Full => {
                self.truncate(len)?;
                self.write_zero_bytes(old, len - old)
            }
        }
    }

    fn reserve(&self, offset: u64, len: u64) {
        if self.read_only || len == 0 || self.cannot_reserve.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = sys::fallocate(self.fd(), 0, offset, len) {
            if e == libc::EOPNOTSUPP || e == libc::ENOSYS {
                self.cannot_reserve.store(true, Ordering::Relaxed);
            }
        }
    }

    fn zero_without_writing(&self, offset: u64, len: u64) -> bool {
        if self.read_only || self.is_device || len == 0 || self.cannot_zero_range.load(Ordering::Relaxed) {
            return false;
        }
        if checked_end(offset, len).is_err() {
            return false;
        }
        match sys::fallocate(self.fd(), libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Ok(()) => true,
            Err(e) => {
                if e == libc::EOPNOTSUPP || e == libc::ENOSYS {
                    self.cannot_zero_range.store(true, Ordering::Relaxed);
                }
                false
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        let end = checked_end(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let file_len = self.current_len()?;
        if !self.is_device {
            if may_unmap {
                let punch_end = end.min(file_len);
                let punched = punch_end <= offset
                    || sys::fallocate(
                        self.fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        punch_end - offset,
                    )
                    .is_ok();
                if punched {
                    if end > file_len {
                        self.truncate(end)?;
                    }
                    return Ok(());
                }
            }
            if sys::fallocate(self.fd(), libc::FALLOC_FL_ZERO_RANGE, offset, len).is_ok() {
                return Ok(());
            }
            if offset >= file_len {
                // Growing with a hole reads as zeros.
                return self.truncate(end);
            }
        }
        self.write_zero_bytes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let end = checked_end(offset, len)?.min(self.current_len()?);
        if end <= offset || self.is_device {
            return Ok(());
        }
        match sys::fallocate(self.fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, end - offset) {
            Ok(()) => Ok(()),
            Err(libc::EOPNOTSUPP) | Err(libc::ENOSYS) => Ok(()),
            Err(e) => Err(Error::from_errno("discard", e).with_path(&self.name).with_offset(offset)),
        }
    }

    fn data_status(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        if max_len == 0 {
            return Ok((true, 0));
        }
        let limit = checked_end(offset, max_len)?;
        let data = match sys::seek(self.fd(), offset, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok((false, max_len)), // no data after offset: hole to EOF and beyond
            Err(_) => return Ok((true, max_len)),
        };
        if data > offset {
            return Ok((false, data.min(limit) - offset));
        }
        match sys::seek(self.fd(), offset, libc::SEEK_HOLE) {
            Ok(Some(h)) if h > offset => Ok((true, h.min(limit) - offset)),
            _ => Ok((true, max_len)),
        }
    }

    fn allocated_size(&self) -> Result<Option<u64>> {
        Ok(Some(sys::fstat(self.fd())?.st_blocks as u64 * 512))
    }

    fn alignment(&self) -> Alignment {
        self.align
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn has_zero_init(&self) -> bool {
        !self.is_device
    }

    fn copy_range_to(&self, offset: u64, dst: &dyn Storage, dst_offset: u64, len: u64) -> Option<Result<u64>> {
        let dst_fd = dst.raw_fd()?;
        if dst.is_read_only() {
            return Some(Err(Error::read_only()));
        }
        match sys::copy_file_range(self.fd(), offset, dst_fd, dst_offset, len) {
            Ok(0) if len > 0 => None,
            Ok(n) => Some(Ok(n)),
            Err(libc::EXDEV) | Err(libc::EOPNOTSUPP) | Err(libc::ENOSYS) | Err(libc::EINVAL) => None,
            Err(e) => Some(Err(Error::from_errno("copy_file_range", e).with_path(&self.name).with_offset(offset))),
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn protocol(&self) -> &'static str {
        if self.is_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn set_permissions(&self, perm: Perms, shared: Perms) -> Result<()> {
        HostFile::set_permissions(self, perm, shared)
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        if self.locking {
            let fd = self.file.as_raw_fd();
            self.locks.get_mut().unwrap_or_else(|p| p.into_inner()).release(fd);
        }
    }
}

fn zero_tail(bufs: &mut [IoSliceMut<'_>], mut filled: u64) {
    for b in bufs.iter_mut() {
        let n = b.len() as u64;
        if filled >= n {
            filled -= n;
            continue;
        }
        b[filled as usize..].fill(0);
        filled = 0;
    }
}

#[cfg(test)]
mod tests;
