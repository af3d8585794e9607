//! [`Qcow2`]: the open image as a [`BlockDriver`] — the read side, block status, info, flush.
//!
//! Concurrency: metadata lives in `meta` (a mutex held only for lookups and metadata changes);
//! guest data moves without it. Writes, zeroing and discards hold the guest clusters they touch in
//! `writes` (a range lock) for their whole duration, so two requests never allocate the same
//! cluster and a cluster is never freed under a write. Reads hold nothing while reading data; a
//! counter of reads in flight keeps freed clusters from being reused while a read might still be
//! looking at them (frees are applied only when no read is in flight).

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::info::ImageInfo;
use blockdev::qobject::{Dict, Value};
use blockdev::range_lock::RangeLock;
use blockdev::{check_request, BlockDriver, Check, Extent, ResizeOptions, Result, Storage, ZeroFlags};

use crate::compress::decompress;
use crate::entry::Geometry;
use crate::header::{autoclear, compat, incompat, CompressionType};
use crate::limits::MAX_COMPRESSED_SLACK;
use crate::meta::Meta;

/// Where a backing file name came from, for `info`.
#[derive(Debug, Clone, Default)]
pub struct BackingInfo {
    /// As stored in the image.
    pub name: Option<String>,
    /// Resolved against the image's directory.
    pub full: Option<String>,
    /// The backing format stored in the image.
    pub format: Option<String>,
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) data: Arc<dyn Storage>,
    pub(crate) backing: Option<Arc<dyn BlockDriver>>,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) writes: RangeLock,
    pub(crate) size: AtomicU64,
    pub(crate) geo: Geometry,
    pub(crate) compression: CompressionType,
    pub(crate) read_only: bool,
    pub(crate) reads_in_flight: AtomicUsize,
    pub(crate) closed: AtomicBool,
    pub(crate) backing_info: BackingInfo,
    /// Whether the image is preallocated with metadata only (see `status.rs`): 0 not yet
    /// known, 1 no, 2 yes.
    pub(crate) metadata_prealloc: std::sync::atomic::AtomicU8,
    /// Enabled bitmaps recording guest writes (see `bitmap/ops.rs`).
    pub(crate) recording: Mutex<crate::bitmap::RecordingSlot>,
    /// Whether guest writes must be noted in bitmaps: some bitmap is enabled and consistent.
    pub(crate) watch_bitmaps: AtomicBool,
    /// How the image is encrypted (for `info`), if it is.
    pub(crate) crypt_scheme: Option<crate::crypt::Scheme>,
    /// The key to the data of an encrypted image opened for data (see `crypt.rs`).
    pub(crate) cipher: Option<crate::crypt::DataCipher>,
    /// The sector lock of an encrypted image's writes (see `mapping.rs`).
    pub(crate) crypt_sectors: Option<blockdev::mapped::Granularity>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2").field("file", &self.file.name()).field("size", &self.size).finish()
    }
}

/// A read in flight, counted until it drops.
pub(crate) struct ReadGuard<'a>(&'a AtomicUsize);

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Qcow2 {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    pub(crate) fn disk_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Counts a read in flight until the guard drops (frees wait for reads, see the module docs).
    pub(crate) fn reading(&self) -> ReadGuard<'_> {
        self.reads_in_flight.fetch_add(1, Ordering::AcqRel);
        ReadGuard(&self.reads_in_flight)
    }

    /// Reads guest bytes `[offset, offset+len)` into `bufs`; the range may lie past the disk's
    /// size (the VM state area), callers check it.
    pub(crate) fn read_range(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let _reading = self.reading();
        blockdev::mapped::read_mapped(self, offset, bufs)
    }

    /// Decompresses the cluster whose compressed bytes start at host byte `coff`.
    pub(crate) fn decompress_cluster(&self, coff: u64, size: u64, out: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        // A larger count in a hostile entry is clamped rather than trusted.
        let size = size.min(cs + MAX_COMPRESSED_SLACK);
        let mut input = vec![0u8; size as usize];
        blockdev::read_exact_at(self.file.as_ref(), coff, &mut input)?;
        decompress(self.compression, &input, out)
    }

    /// Flushes metadata, which applies the queued frees, once [`MAX_QUEUED_FREES`](crate::limits::MAX_QUEUED_FREES) are queued and
    /// no read could still be looking at the clusters. Frees are never applied before such a
    /// flush: until the L2 changes that dropped the references are durable, the clusters are
    /// still in use on disk, so neither their decreased refcounts nor new data may reach them.
    pub(crate) fn flush_if_many_frees(&self, m: &mut Meta) -> Result<()> {
        if m.frees.len() >= crate::limits::MAX_QUEUED_FREES && self.reads_in_flight.load(Ordering::Acquire) == 0 {
            m.flush(self.file.as_ref())?;
        }
        Ok(())
    }

    /// The qcow2 part of `info` (ImageInfoSpecificQCow2, fields in QAPI order).
    fn specific_info(&self, m: &Meta) -> Dict {
        let mut d = Dict::new();
        if m.h.version == 2 {
            d.insert("compat", "0.10".into())
                .insert("refcount-bits", Value::Int(m.h.refcount_bits() as i64))
                .insert_opt("encrypt", self.crypt_scheme.as_ref().map(crate::crypt::info));
        } else {
            let has_data_file = m.h.incompatible & incompat::DATA_FILE != 0;
            d.insert("compat", "1.1".into())
                .insert_opt("data-file", m.exts.data_file.clone().filter(|_| has_data_file).map(Value::from))
                .insert_opt(
                    "data-file-raw",
                    has_data_file.then_some(Value::Bool(m.h.autoclear & autoclear::DATA_FILE_RAW != 0)),
                )
                .insert("extended-l2", Value::Bool(m.h.extended_l2()))
                .insert("lazy-refcounts", Value::Bool(m.h.compatible & compat::LAZY_REFCOUNTS != 0))
                .insert("corrupt", Value::Bool(m.h.incompatible & incompat::CORRUPT != 0))
                .insert("refcount-bits", Value::Int(m.h.refcount_bits() as i64))
                .insert_opt("encrypt", self.crypt_scheme.as_ref().map(crate::crypt::info))
                .insert_opt("bitmaps", (!m.bitmaps.is_empty()).then(|| bitmap_list(m)));
        }
        d.insert("compression-type", m.h.compression().name().into());
        d
    }
}

/// The `bitmaps` list of `info` (Qcow2BitmapInfo: name, granularity, flags).
fn bitmap_list(m: &Meta) -> Value {
    let one = |e: &crate::bitmap::BitmapEntry| {
        let mut flags = Vec::new();
        if e.in_use() {
            flags.push(Value::from("in-use"));
        }
        if e.auto() {
            flags.push(Value::from("auto"));
        }
        let mut d = Dict::new();
        d.insert("name", e.name.as_str().into())
            .insert("granularity", Value::UInt(e.granularity()))
            .insert("flags", Value::List(flags));
        Value::Dict(d)
    };
    Value::List(m.bitmaps.iter().map(one).collect())
}

impl BlockDriver for Qcow2 {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn filename(&self) -> &str {
        self.file.name()
    }

    fn is_read_only(&self) -> bool {
        self.read_only || !self.lock().writable
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let _reading = self.reading();
        blockdev::mapped::read(self, offset, bufs)
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        check_request(offset, blockdev::iov_len(bufs), self.size())?;
        self.note_change(offset, blockdev::iov_len(bufs))?;
        blockdev::mapped::write(self, offset, bufs)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_request(offset, len, self.size())?;
        self.note_change(offset, len)?;
        // With `discard=ignore` zero writes keep their clusters, as qemu's do.
        let may_unmap = flags.may_unmap && self.lock().discard.unmap;
        self.zero_range(offset, len, ZeroFlags { may_unmap, ..flags })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.size())?;
        if !self.lock().discard.unmap {
            // `discard=ignore`: qemu drops the request and the data stays.
            return self.check_writable();
        }
        self.note_change(offset, len)?;
        self.discard_range(offset, len)
    }

    fn flush(&self) -> Result<()> {
        let mut m = self.lock();
        if !m.writable && !m.l2.has_dirty() {
            return self.data.flush();
        }
        // Frees are applied by `flush` itself; hold them back while reads are in flight.
        let held =
            if self.reads_in_flight.load(Ordering::Acquire) > 0 { std::mem::take(&mut m.frees) } else { Vec::new() };
        let r = m.flush(self.file.as_ref());
        m.frees.extend(held);
        r
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        // Decided before the mapping is asked, which then reports holes accordingly.
        self.metadata_preallocated()?;
        let extent = blockdev::mapped::block_status(self, offset, max_len)?;
        // Encrypted data has no plain bytes in the file to point at (qemu reports no offsets).
        Ok(if self.crypt_scheme.is_some() { Extent { host: None, ..extent } } else { extent })
    }

    fn resize(&self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        self.resize_image(new_size, opts)
    }

    fn info(&self) -> Result<ImageInfo> {
        let m = self.lock();
        let file = crate::storage_info(self.file.as_ref())?;
        let mut children = vec![("file".to_string(), file.clone())];
        if !Arc::ptr_eq(&self.file, &self.data) {
            children.push(("data-file".to_string(), crate::storage_info(self.data.as_ref())?));
        }
        Ok(ImageInfo {
            filename: self.file.name().to_string(),
            format: "qcow2".into(),
            // The incompatible dirty bit (set by lazy-refcount writes, cleared by a clean close or
            // the repair a writable open makes), as qemu's info reports it.
            dirty_flag: Some(m.dirty_on_disk),
            actual_size: file.actual_size,
            virtual_size: self.size(),
            cluster_size: Some(self.cluster_size()),
            encrypted: self.crypt_scheme.is_some().then_some(true),
            backing_filename: self.backing_info.name.clone(),
            full_backing_filename: self.backing_info.full.clone(),
            backing_filename_format: self.backing_info.format.clone(),
            snapshots: (!m.snapshots.is_empty()).then(|| crate::snapshot::infos(&m.snapshots)),
            format_specific: Some(("qcow2".into(), self.specific_info(&m))),
            children,
            ..ImageInfo::default()
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        self.backing.clone()
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.file.clone())
    }

    fn has_zero_init(&self) -> bool {
        self.backing.is_none() && self.file.has_zero_init()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Bitmaps first (their clusters are then flushed below); a failure to store them still
        // lets the metadata be flushed, and is reported after.
        let bitmaps = if self.read_only { Ok(()) } else { self.store_bitmaps_on_close() };
        let mut m = self.lock();
        if !m.writable {
            return bitmaps;
        }
        m.flush(self.file.as_ref())?;
        // Frees applied by that flush dirtied refcount blocks: write them too.
        m.flush(self.file.as_ref())?;
        if m.dirty_on_disk {
            m.h.incompatible &= !incompat::DIRTY;
            m.write_header(self.file.as_ref(), false)?;
            self.file.flush()?;
            m.dirty_on_disk = false;
        }
        bitmaps
    }

    fn check(&self) -> Option<&dyn Check> {
        Some(self)
    }

    fn compressed(&self) -> Option<&dyn blockdev::CompressedWrite> {
        Some(self)
    }

    fn amend(&self) -> Option<&dyn blockdev::Amend> {
        Some(self)
    }

    fn backing_ops(&self) -> Option<&dyn blockdev::BackingOps> {
        Some(self)
    }

    fn snapshots(&self) -> Option<&dyn blockdev::Snapshots> {
        Some(self)
    }

    fn bitmaps(&self) -> Option<&dyn blockdev::bitmap::PersistentBitmaps> {
        Some(self)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Best effort: an image dropped without close keeps its metadata (and the dirty bit with lazy
        // refcounts, which the next open repairs).
        if !self.closed.load(Ordering::Acquire) {
            let _ = self.close();
        }
    }
}
