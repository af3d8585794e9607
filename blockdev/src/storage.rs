//! The protocol layer: bytes in a container.
//!
//! A [`Storage`] is where an image's bytes live — a local file ([`crate::HostFile`]) today, an NBD export
//! or an HTTP object later, a crash-recording file in tests. Format drivers see only
//! `Arc<dyn Storage>` and never a concrete file type, so every format runs on every container.
//!
//! Contracts every implementation keeps:
//! - all methods take `&self` and may be called from many threads at once; positional I/O never
//!   depends on a shared file position;
//! - a read that reaches past the end of the container returns zeros for the part past the end (as
//!   QEMU's file driver does: images whose last cluster is only partly written must read back). Format
//!   drivers validate offsets against [`Storage::len`] before trusting them;
//! - [`Storage::flush`] returns only when every write that completed before the call is durable (unless
//!   the cache mode is `unsafe`, which the user chose);
//! - `write_zeroes` and `discard` leave the range reading as zeros; `discard` may be a no-op on
//!   containers that cannot deallocate, in which case it must still not change content other than
//!   to zeros.

use std::fmt::Debug;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use crate::error::{Error, Result};

/// How space is reserved when a container grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing is reserved; new space is a hole.
    #[default]
    Off,
    /// Format metadata is preallocated (the container itself treats this as `Off`).
    Metadata,
    /// Space is reserved with `fallocate`; it reads as zeros.
    Falloc,
    /// Zeros are written to the whole new range.
    Full,
}

impl Prealloc {
    /// Parses qemu's spelling (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(s: &str) -> Option<Prealloc> {
        match s {
            "off" => Some(Prealloc::Off),
            "metadata" => Some(Prealloc::Metadata),
            "falloc" => Some(Prealloc::Falloc),
            "full" => Some(Prealloc::Full),
            _ => None,
        }
    }

    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// Alignment a container requires of requests (O_DIRECT files need both to be a multiple of the
/// logical block size). Callers need not honour it: implementations bounce unaligned requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Offsets and lengths should be multiples of this (1 = byte granular).
    pub request: u32,
    /// Buffer addresses should be multiples of this.
    pub memory: u32,
}

impl Default for Alignment {
    fn default() -> Self {
        Alignment { request: 1, memory: 1 }
    }
}

/// Bytes in a container: the seam under every format driver. See the module docs for the contracts.
pub trait Storage: Send + Sync + Debug {
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;

    /// Whether the container is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `bufs` from `offset`; the part past the end of the container reads as zeros.
    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;

    /// Writes all of `bufs` at `offset`, growing the container if needed.
    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Sets the length; growth is reserved according to `prealloc`.
    fn set_len(&self, len: u64, prealloc: Prealloc) -> Result<()>;

    /// Reserves space for `[offset, offset+len)` just before a write fills it, growing the
    /// container when the range reaches past its end; what the range reads does not change
    /// (unallocated parts stay zeros). A hint that makes the following write cheaper (the file
    /// system allocates one extent instead of block by block): containers that cannot reserve do
    /// nothing, and failures are left for the write to report.
    fn reserve(&self, _offset: u64, _len: u64) {}

    /// Makes `[offset, offset+len)` read as zeros without writing the bytes (the file system marks
    /// the range zeroed), growing the container when the range reaches past its end, and returns
    /// true. Returns false, changing nothing, when the container cannot do that cheaply: the
    /// caller then writes the zeros itself. Drivers use it before filling part of fresh space,
    /// so that only the bytes they bring are written.
    fn zero_without_writing(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Makes `[offset, offset+len)` read as zeros; with `may_unmap` the space may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;

    /// Deallocates `[offset, offset+len)` where the container can; the range then reads as zeros
    /// (or is left unchanged where deallocation is unsupported).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Whether `offset` starts data (true) or a hole (false), and how far that state extends, at most
    /// `max_len` bytes. A container that cannot tell reports data up to `max_len`.
    fn data_status(&self, offset: u64, max_len: u64) -> Result<(bool, u64)>;

    /// Bytes actually allocated in the container (`disk size`), when known.
    fn allocated_size(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Alignment the container would like requests to have.
    fn alignment(&self) -> Alignment {
        Alignment::default()
    }

    /// Whether the container was opened read-only.
    fn is_read_only(&self) -> bool;

    /// Whether newly grown space reads as zeros (true for files).
    fn has_zero_init(&self) -> bool {
        false
    }

    /// Copies `len` bytes from `offset` in this container to `dst_offset` in `dst` without passing
    /// them through user space, if both containers support it. `None` means "not possible here; copy
    /// by hand"; `Some(Ok(n))` reports bytes copied (may be short: call again for the rest).
    fn copy_range_to(&self, _offset: u64, _dst: &dyn Storage, _dst_offset: u64, _len: u64) -> Option<Result<u64>> {
        None
    }

    /// The file descriptor behind a local file, for offload between two local files.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The name used in messages and in `info`'s child node (the file name as given).
    fn name(&self) -> &str;

    /// The local path, if the container is a local file.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// The protocol driver's name as qemu-img prints it (`file`, `nbd`, `http`).
    fn protocol(&self) -> &'static str;

    /// Whether the bytes live on another machine (an NBD export): `info` then shows no dirty
    /// flag and no format-specific node for the container, as qemu-img does.
    fn is_remote(&self) -> bool {
        false
    }

    /// Takes qemu's permission locks for holding `perm` while sharing `shared` with other
    /// processes, where the container has such locks (local files); others accept any set.
    fn set_permissions(&self, _perm: crate::Perms, _shared: crate::Perms) -> Result<()> {
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes at `offset` (zeros past the end).
pub fn read_exact_at(storage: &dyn Storage, offset: u64, buf: &mut [u8]) -> Result<()> {
    storage.read_at(offset, &mut [IoSliceMut::new(buf)])
}

/// Writes all of `buf` at `offset`.
pub fn write_all_at(storage: &dyn Storage, offset: u64, buf: &[u8]) -> Result<()> {
    storage.write_at(offset, &[IoSlice::new(buf)])
}

/// Total length of a list of buffers.
pub fn iov_len(bufs: &[IoSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Total length of a list of mutable buffers.
pub fn iov_len_mut(bufs: &[IoSliceMut<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Runs `fill` on one contiguous buffer covering `bufs` (the single slice itself when there is
/// only one; otherwise a temporary copied back into the slices), for drivers that work on
/// contiguous bytes.
pub fn with_contiguous_mut(bufs: &mut [IoSliceMut<'_>], fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<()> {
    if bufs.len() == 1 {
        return fill(&mut bufs[0]);
    }
    let mut tmp = vec![0u8; iov_len_mut(bufs) as usize];
    fill(&mut tmp)?;
    let mut at = 0;
    for b in bufs.iter_mut() {
        let n = b.len();
        b.copy_from_slice(&tmp[at..at + n]);
        at += n;
    }
    Ok(())
}

/// `offset + len` without overflow, as an [`crate::ErrorKind::OutOfRange`] error when it would.
pub fn checked_end(offset: u64, len: u64) -> Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| Error::out_of_range(format!("request at offset {offset} of length {len} overflows")))
}
