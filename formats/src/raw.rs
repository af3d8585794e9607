//! The raw format: the virtual disk is the container, byte for byte.
//!
//! Raw is the identity mapping on the mapping core ([`blockdev::mapped`]). Block status comes
//! from the container (`SEEK_DATA`/`SEEK_HOLE` on files), so holes stay holes
//! through convert and map. A raw image whose format was *probed* rather than named refuses writes
//! to its first sector that would make it look like another format (the classic attack where a
//! guest writes a qcow2 header into its raw disk and the next probe follows a backing file of the
//! guest's choosing), as qemu does.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockdev::info::ImageInfo;
use blockdev::mapped::{self, DataWritten, Holes, Mapped, MappedImage, Mapping, WritePlan, Zeroing};
use blockdev::options::{CreateOptions, OptionKind, OptionSpec};
use blockdev::{
    check_request, Chain, Error, Format, Measure, OpenOptions, Opener, Prealloc, ResizeOptions, Result, Storage,
    ZeroFlags,
};

use crate::file::file_prealloc;
use crate::storage_info;

/// Bytes at the start of a probed raw image that writes may not turn into another format's magic.
const PROBE_GUARD: u64 = 512;

/// The raw format's registry entry.
#[derive(Debug, Default)]
pub struct RawFormat;

/// The raw format's own create options (the file protocol adds its own after them).
const RAW_CREATE_OPTIONS: &[OptionSpec] = &[OptionSpec::new("size", OptionKind::Size, "Virtual disk size")];

impl Format for RawFormat {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _head: &[u8], _filename: &str) -> u32 {
        1
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        _chain: &Chain,
        _opener: &dyn Opener,
    ) -> Result<Arc<dyn blockdev::BlockDriver>> {
        Ok(Arc::new(RawDriver::new(storage, opts.read_only, None)?))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        RAW_CREATE_OPTIONS
    }

    fn create(&self, filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
        file_prealloc(opts)?;
        let storage = opener.create_storage(filename, opts)?;
        storage.flush()
    }

    fn measure(&self, size: u64, source: Option<&dyn blockdev::BlockDriver>, _opts: &CreateOptions) -> Result<Measure> {
        // Unallocated sectors count towards the file size of a raw image: both figures are the size
        // (the source's exact length, or the requested size rounded up to sectors).
        let required = match source {
            Some(src) => src.size(),
            None => size.checked_next_multiple_of(512).ok_or_else(|| Error::out_of_range("Image size too large"))?,
        };
        Ok(Measure { required, fully_allocated: required, bitmaps: None })
    }

    fn shares_writes(&self) -> bool {
        true
    }
}

/// Decides whether a new first sector would make the image probe as something other than raw.
pub type ProbeCheck = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// An open raw image.
pub struct RawDriver {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    read_only: bool,
    /// Set when the format was probed: returns true if a first sector is still raw.
    probe_guard: Option<ProbeCheck>,
}

impl std::fmt::Debug for RawDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDriver").field("storage", &self.storage.name()).field("size", &self.size).finish()
    }
}

impl RawDriver {
    /// Opens `storage` as raw, restricting first-sector writes with `probe_guard` when the format
    /// was probed.
    /// The size is the container's length rounded up to whole sectors, as qemu reports it (the
    /// tail past the end of the file reads as zeros).
    pub fn new(storage: Arc<dyn Storage>, read_only: bool, probe_guard: Option<ProbeCheck>) -> Result<RawDriver> {
        let size = crate::sector_len(storage.as_ref())?;
        Ok(RawDriver {
            read_only: read_only || storage.is_read_only(),
            storage,
            size: AtomicU64::new(size),
            probe_guard,
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        Ok(())
    }

    /// Refuses a write that would change the first sector into another format's header.
    fn guard_first_sector(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let Some(still_raw) = &self.probe_guard else {
            return Ok(());
        };
        if offset >= PROBE_GUARD {
            return Ok(());
        }
        let mut sector = [0u8; PROBE_GUARD as usize];
        blockdev::read_exact_at(self.storage.as_ref(), 0, &mut sector)?;
        let mut pos = offset as usize;
        for b in bufs {
            if pos >= sector.len() {
                break;
            }
            let n = b.len().min(sector.len() - pos);
            sector[pos..pos + n].copy_from_slice(&b[..n]);
            pos += n;
        }
        if still_raw(&sector) {
            Ok(())
        } else {
            Err(Error::from_errno("write", libc::EPERM).with_offset(offset))
        }
    }
}

/// The identity mapping: guest byte `x` is byte `x` of the container.
impl MappedImage for RawDriver {
    type Pending<'a> = ();

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        Ok(Mapped::new(max_len, Mapping::Data { storage: self.storage.clone(), offset, holes: Holes::Container }))
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<()>> {
        Ok(WritePlan { len, storage: self.storage.clone(), host: offset, fill: None, pending: () })
    }

    fn commit_write(&self, _pending: (), _written: DataWritten) -> Result<()> {
        Ok(())
    }

    /// The container zeroes the range (deallocating it under `may_unmap`), after the probe guard
    /// has seen the zeros that land in the first sector.
    fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<Zeroing> {
        if offset < PROBE_GUARD && self.probe_guard.is_some() {
            let zeros = vec![0u8; len.min(PROBE_GUARD - offset) as usize];
            self.guard_first_sector(offset, &[IoSlice::new(&zeros)])?;
        }
        self.storage.write_zeroes(offset, len, flags.may_unmap)?;
        Ok(Zeroing::Done(len))
    }
}

impl blockdev::BlockDriver for RawDriver {
    blockdev::mapped_io!(read_at, block_status);

    fn format(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn filename(&self) -> &str {
        self.storage.name()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.writable()?;
        check_request(offset, blockdev::iov_len(bufs), self.size())?;
        self.guard_first_sector(offset, bufs)?;
        mapped::write(self, offset, bufs)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        mapped::write_zeroes(self, offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_request(offset, len, self.size())?;
        self.storage.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn resize(&self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        self.writable()?;
        let old = self.size();
        if new_size < old && opts.prealloc != Prealloc::Off {
            return Err(Error::unsupported("Cannot use preallocation for shrinking files"));
        }
        if opts.prealloc == Prealloc::Metadata {
            return Err(Error::unsupported("Unsupported preallocation mode: metadata"));
        }
        // qemu resizes exactly: a device (block or character) keeps its size, so any other size
        // is refused, a smaller one too.
        if self.storage.protocol() == "host_device" && new_size != self.storage.len()? {
            return Err(Error::unsupported("Cannot resize device files"));
        }
        self.storage.set_len(new_size, opts.prealloc)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        let file = storage_info(self.storage.as_ref())?;
        Ok(ImageInfo {
            filename: self.storage.name().to_string(),
            format: "raw".into(),
            // qemu takes it from the container (files have one, NBD exports do not).
            dirty_flag: file.dirty_flag,
            actual_size: file.actual_size,
            virtual_size: self.size(),
            children: vec![("file".into(), file)],
            ..ImageInfo::default()
        })
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn identity_storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn has_zero_init(&self) -> bool {
        self.storage.has_zero_init()
    }
}
