//! An open VMDK disk: its descriptor, its extents in guest order, and its parent (delta disks).
//!
//! Requests are split at extent and grain boundaries. Flat extents map 1:1 onto their file from
//! the extent's offset (bytes past the file's end read as zeros), ZERO and NOACCESS extents read
//! as zeros, sparse extents through their grain tables; unallocated grains read from the parent
//! disk, or as zeros without one.
//!
//! Reads, writes and block status run on the mapping core ([`blockdev::mapped`]): this module
//! says where a guest range lives ([`MappedImage::map`]) and makes a range writable
//! ([`MappedImage::prepare_write`]). A write to a sparse extent that hits an unallocated (or
//! zeroed) grain reserves a grain at the end of the file; the core writes the whole grain (parent
//! data or zeros around the new bytes) and the grain table entry changes only after that, all
//! under that grain's range lock so that two writers never allocate the same grain twice. The first write of an open gives the
//! disk a new CID (written into the descriptor, as VMware and qemu do), so that delta disks made
//! on the old content notice the change, and sets the unclean-shutdown flag of every writable
//! sparse extent, durable before any data is written; `close` clears the flag after a final
//! flush (qemu never sets it; VMware checks a disk that has it set).

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use blockdev::info::ImageInfo;
use blockdev::mapped::{self, DataWritten, Fill, FillSource, Holes, Mapped, MappedImage, Mapping, WritePlan, Zeroing};
use blockdev::qobject::{Dict, Value};
use blockdev::range_lock::{RangeGuard, RangeLock};
use blockdev::{check_request, BlockDriver, Error, ResizeOptions, Result, Storage, ZeroFlags};

use crate::descriptor::{Access, Descriptor, ExtentLine};
use crate::header::SECTOR;
use crate::sparse::{Grain, SparseExtent};

/// Most grains appended by one request.
const MAX_RUN_GRAINS: u64 = 256;

/// What backs one extent.
#[derive(Debug)]
pub(crate) enum ExtentData {
    /// Plain sectors from byte `offset` of the file.
    Flat { storage: Arc<dyn Storage>, offset: u64 },
    /// A hosted sparse extent.
    Sparse(Box<SparseExtent>),
    /// No data: zeros.
    Zero,
}

/// One extent of the disk.
#[derive(Debug)]
pub(crate) struct DiskExtent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Access mode.
    pub access: Access,
    /// The descriptor's line (for `info`).
    pub line: ExtentLine,
    /// Where the data is.
    pub data: ExtentData,
}

/// Where the descriptor lives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DescriptorPlace {
    /// Its own file (the image's main file).
    File,
    /// Inside the sparse file: byte offset and room in bytes.
    Embedded(u64, u64),
    /// Nowhere (a bare sparse extent without an embedded descriptor): the CID is not recorded.
    None,
}

/// An open VMDK disk.
pub struct Vmdk {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) descriptor: Mutex<Descriptor>,
    pub(crate) place: DescriptorPlace,
    pub(crate) extents: Vec<DiskExtent>,
    pub(crate) size: u64,
    pub(crate) backing: Option<Arc<dyn BlockDriver>>,
    /// Whether the parent's CID is the child's parentCID; reads that reach a changed parent fail
    /// with EINVAL, as in qemu (the child's data would mix with content it was not made on).
    pub(crate) parent_cid_ok: bool,
    pub(crate) read_only: bool,
    pub(crate) cid_updated: AtomicBool,
    /// The writer of a streamOptimized disk opened for writing while empty.
    pub(crate) stream: Option<crate::stream::StreamWriter>,
    pub(crate) grain_locks: RangeLock,
}

impl std::fmt::Debug for Vmdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmdk").field("file", &self.storage.name()).field("extents", &self.extents.len()).finish()
    }
}

impl Vmdk {
    /// The extent holding guest byte `offset` (an index into `extents`).
    fn extent_at(&self, offset: u64) -> Option<usize> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        (i < self.extents.len()).then_some(i)
    }

    /// The extent holding guest byte `offset` and the offset within it.
    fn locate(&self, offset: u64) -> Result<(&DiskExtent, u64)> {
        let i = self.extent_at(offset).ok_or_else(|| Error::out_of_range("request past the end of the VMDK"))?;
        let e = &self.extents[i];
        Ok((e, offset - e.start))
    }

    fn writable_extent(&self, e: &DiskExtent) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        match (&e.data, e.access) {
            (_, Access::ReadWrite) if !matches!(e.data, ExtentData::Zero) => Ok(()),
            _ => Err(Error::read_only().with_message(format!(
                "{}: extent {} is not writable",
                self.storage.name(),
                e.line.file.as_deref().unwrap_or(&e.line.type_name)
            ))),
        }
    }

    /// Writable sparse extents whose header carries the unclean-shutdown flag (not the
    /// streamOptimized ones, whose header is rewritten at the end of the stream).
    fn flagged_extents(&self) -> impl Iterator<Item = &SparseExtent> {
        self.extents.iter().filter_map(|e| match &e.data {
            ExtentData::Sparse(s) if e.access == Access::ReadWrite && !s.header().compressed() => Some(&**s),
            _ => None,
        })
    }

    /// Before the first change of an open: a new CID in the descriptor, and the unclean-shutdown
    /// flag set in every writable sparse extent and made durable before any data is written, so
    /// that a crash from here on leaves the flag set for VMware to check the disk. `close`
    /// clears it once everything is durable.
    fn begin_changes(&self) -> Result<()> {
        if self.cid_updated.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut cid = [0u8; 4];
        blockdev::crypto::fill_random(&mut cid)?;
        let cid = u32::from_le_bytes(cid);
        {
            let mut d = self.descriptor.lock().unwrap_or_else(|p| p.into_inner());
            let text = d.with_key("CID", &format!("{cid:x}"));
            self.write_descriptor(&text)?;
            *d = Descriptor::parse(text.as_bytes())?;
        }
        let mut flagged = false;
        for s in self.flagged_extents() {
            s.mark_unclean(true)?;
            flagged = true;
        }
        if flagged {
            self.flush()?;
        }
        Ok(())
    }

    /// Stores descriptor `text` where the descriptor lives.
    pub(crate) fn write_descriptor(&self, text: &str) -> Result<()> {
        match self.place {
            DescriptorPlace::File => {
                blockdev::write_all_at(self.storage.as_ref(), 0, text.as_bytes())?;
                self.storage.set_len(text.len() as u64, blockdev::Prealloc::Off)?;
            }
            DescriptorPlace::None => {}
            DescriptorPlace::Embedded(at, room) => {
                if text.len() as u64 > room {
                    return Err(Error::out_of_range("The VMDK descriptor does not fit its embedded area"));
                }
                let mut area = vec![0u8; room as usize];
                area[..text.len()].copy_from_slice(text.as_bytes());
                blockdev::write_all_at(self.storage.as_ref(), at, &area)?;
            }
        }
        Ok(())
    }

    /// Plans a write into sparse extent `s` (starting at guest `ext_start`) from byte `within`,
    /// at most `len` bytes: a run of whole unallocated grains appended in one request, or the
    /// part of one grain, allocated (copy-on-write from the parent) if it was not.
    fn prepare_sparse<'a>(
        &'a self,
        s: &'a SparseExtent,
        ext_start: u64,
        within: u64,
        len: u64,
    ) -> Result<WritePlan<PendingWrite<'a>>> {
        if s.header().compressed() {
            return Err(Error::unsupported("Writing into a compressed (streamOptimized) VMDK is not supported"));
        }
        let grain = s.header().grain_bytes();
        let in_grain = within % grain;
        let whole = if in_grain == 0 { len / grain } else { 0 };
        if whole > 1 {
            let run = self.unallocated_run(s, within, whole.min(MAX_RUN_GRAINS))?;
            if run > 1 {
                let bytes = run * grain;
                let guard = self.grain_locks.lock(ext_start + within, ext_start + within + bytes);
                if self.unallocated_run(s, within, run)? == run {
                    let at = s.reserve(bytes);
                    let fill = Fill::new(ext_start + within, at, bytes, FillSource::Zeros);
                    let pending = Pending::Fresh { _guard: guard, extent: s, within, at, grains: run };
                    return Ok(WritePlan {
                        len: bytes,
                        storage: s.storage().clone(),
                        host: at,
                        fill: Some(fill),
                        pending: PendingWrite(pending),
                    });
                }
            }
        }
        let n = (grain - in_grain).min(len);
        let grain_start = within - in_grain;
        let guard = self.grain_locks.lock(ext_start + grain_start, ext_start + grain_start + grain);
        let (host, fill, pending) = match s.lookup(within)? {
            // A grain inside the header or tables would overwrite metadata: refuse, as qcow2 does.
            Grain::Data(at) if at < s.header().overhead * SECTOR => {
                return Err(Error::corrupt(format!(
                    "{}: grain for offset {within} points into the metadata (byte {at}); refusing to write",
                    s.storage().name()
                )));
            }
            Grain::Data(at) => (at + in_grain, None, Pending::InPlace(guard)),
            found => {
                let at = s.reserve(grain);
                let source = if found == Grain::Unallocated { FillSource::Backing } else { FillSource::Zeros };
                let fill = Fill::new(ext_start + grain_start, at, grain, source);
                let pending = Pending::Fresh { _guard: guard, extent: s, within: grain_start, at, grains: 1 };
                (at + in_grain, Some(fill), pending)
            }
        };
        Ok(WritePlan { len: n, storage: s.storage().clone(), host, fill, pending: PendingWrite(pending) })
    }

    /// How many of the `max` grains from byte `within` of `s` are unallocated or zeroed (whole
    /// grains that a write may replace without reading them).
    fn unallocated_run(&self, s: &SparseExtent, within: u64, max: u64) -> Result<u64> {
        let grain = s.header().grain_bytes();
        let mut n = 0;
        while n < max && matches!(s.lookup(within + n * grain)?, Grain::Unallocated | Grain::Zero) {
            n += 1;
        }
        Ok(n)
    }

    /// The extent list `info` shows.
    fn extent_infos(&self) -> Vec<Value> {
        self.extents
            .iter()
            .map(|e| {
                let mut d = Dict::new();
                d.insert("virtual-size", Value::Int(e.len as i64));
                d.insert("filename", e.line.file.clone().unwrap_or_default().as_str().into());
                if let ExtentData::Sparse(s) = &e.data {
                    d.insert("cluster-size", Value::Int(s.header().grain_bytes() as i64));
                    if s.header().compressed() {
                        d.insert("compressed", true.into());
                    }
                }
                d.insert("format", e.line.type_name.as_str().into());
                Value::Dict(d)
            })
            .collect()
    }
}

/// What a planned write of a [`Vmdk`] publishes once its data is written.
pub struct PendingWrite<'a>(Pending<'a>);

/// Nothing (a flat extent, or an allocated grain whose lock is held until the data is
/// written), or fresh grains of a sparse extent.
enum Pending<'a> {
    Nothing,
    InPlace(#[allow(dead_code)] RangeGuard<'a>),
    Fresh { _guard: RangeGuard<'a>, extent: &'a SparseExtent, within: u64, at: u64, grains: u64 },
}

impl MappedImage for Vmdk {
    type Pending<'a> = PendingWrite<'a>;

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let (e, within) = self.locate(offset)?;
        let max_len = max_len.min(e.len - within);
        Ok(match (&e.data, e.access) {
            (_, Access::NoAccess) | (ExtentData::Zero, _) => Mapped::new(max_len, Mapping::Zero),
            (ExtentData::Flat { storage, offset: base }, _) => Mapped::new(
                max_len,
                Mapping::Data { storage: storage.clone(), offset: base + within, holes: Holes::AllocatedZeros },
            ),
            (ExtentData::Sparse(s), _) => map_sparse(s, within, max_len)?,
        })
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<PendingWrite<'_>>> {
        let (e, within) = self.locate(offset)?;
        self.writable_extent(e)?;
        let len = len.min(e.len - within);
        match &e.data {
            ExtentData::Flat { storage, offset: base } => Ok(WritePlan {
                len,
                storage: storage.clone(),
                host: base + within,
                fill: None,
                pending: PendingWrite(Pending::Nothing),
            }),
            ExtentData::Sparse(s) => self.prepare_sparse(s, e.start, within, len),
            ExtentData::Zero => Err(Error::read_only().with_message("a ZERO extent is not writable")),
        }
    }

    fn commit_write(&self, pending: PendingWrite<'_>, _written: DataWritten) -> Result<()> {
        match pending.0 {
            Pending::Nothing | Pending::InPlace(_) => Ok(()),
            Pending::Fresh { extent, within, at, grains, .. } => extent.publish_grains(within, at, grains),
        }
    }

    /// Decompresses the grains of a run [`MappedImage::map`] reported as compressed.
    fn read_compressed(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let (e, mut within) = self.locate(offset)?;
        let ExtentData::Sparse(s) = &e.data else {
            return Err(Error::corrupt("compressed data outside a sparse extent"));
        };
        let grain = s.header().grain_bytes();
        let mut scratch = vec![0u8; grain as usize];
        let mut loaded = None;
        for buf in bufs.iter_mut() {
            let mut filled = 0;
            while filled < buf.len() {
                let in_grain = within % grain;
                let n = ((grain - in_grain) as usize).min(buf.len() - filled);
                if loaded != Some(within / grain) {
                    s.read_grain(s.lookup(within)?, &mut scratch)?;
                    loaded = Some(within / grain);
                }
                buf[filled..filled + n].copy_from_slice(&scratch[in_grain as usize..in_grain as usize + n]);
                filled += n;
                within += n as u64;
            }
        }
        Ok(())
    }

    fn before_write(&self) -> Result<()> {
        self.begin_changes()
    }

    fn check_backing_read(&self) -> Result<()> {
        if self.backing.is_some() && !self.parent_cid_ok {
            return Err(Error::from_errno("read", libc::EINVAL));
        }
        Ok(())
    }

    /// Whole grains of zeroed_grain extents become zeroed grains; the core does the rest
    /// (unallocated grains without a parent already read as zeros and stay unallocated).
    fn zero_range(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<Zeroing> {
        let (e, within) = self.locate(offset)?;
        let n = len.min(e.len - within);
        let ExtentData::Sparse(s) = &e.data else { return Ok(Zeroing::Fallback(n)) };
        let grain = s.header().grain_bytes();
        if within % grain != 0 {
            return Ok(Zeroing::Fallback(n.min(grain - within % grain)));
        }
        let whole = n / grain;
        if whole == 0 || s.header().compressed() || !s.header().zeroed_grains() {
            return Ok(Zeroing::Fallback(n));
        }
        self.writable_extent(e)?;
        let _guard = self.grain_locks.lock(offset, offset + whole * grain);
        self.begin_changes()?;
        s.zero_grains(within, whole as usize)?;
        Ok(Zeroing::Done(whole * grain))
    }
}

impl BlockDriver for Vmdk {
    blockdev::mapped_io!(read_at, block_status);

    fn format(&self) -> &'static str {
        "vmdk"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> &str {
        self.storage.name()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let Some(stream) = &self.stream else {
            return mapped::write(self, offset, bufs);
        };
        let len = blockdev::iov_len(bufs);
        check_request(offset, len, self.size)?;
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        self.begin_changes()?;
        // Whole grains only, each compressed as it arrives.
        let data: Vec<u8> = bufs.iter().map(|b| &b[..]).collect::<Vec<&[u8]>>().concat();
        let grain = stream.grain_bytes();
        let whole = offset % grain == 0 && (len % grain == 0 || offset + len == self.size);
        if !whole {
            return Err(Error::unsupported("streamOptimized VMDK disks are written in whole grains"));
        }
        for (i, chunk) in data.chunks(grain as usize).enumerate() {
            let mut unit = chunk.to_vec();
            unit.resize(grain as usize, 0);
            let c = crate::stream::StreamWriter::compress(&unit)?;
            stream.write_grain(offset + i as u64 * grain, &c)?;
        }
        Ok(())
    }

    /// A streamOptimized disk being written gets compressed zero grains (it has no other way to
    /// say zeros); any other disk goes through the mapping core.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.stream.is_none() {
            return mapped::write_zeroes(self, offset, len, flags);
        }
        check_request(offset, len, self.size)?;
        if flags.no_fallback {
            return Err(Error::unsupported("VMDK cannot write zeroes here without writing data"));
        }
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(offset + done, &[IoSlice::new(&zeros[..n as usize])])?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        for e in &self.extents {
            if let ExtentData::Sparse(s) = &e.data {
                s.write_back()?;
            }
        }
        let mut seen: Vec<*const ()> = Vec::new();
        for e in &self.extents {
            let s: &Arc<dyn Storage> = match &e.data {
                ExtentData::Flat { storage, .. } => storage,
                ExtentData::Sparse(s) => s.storage(),
                ExtentData::Zero => continue,
            };
            let p = Arc::as_ptr(s) as *const ();
            if !seen.contains(&p) {
                seen.push(p);
                s.flush()?;
            }
        }
        self.storage.flush()
    }

    fn resize(&self, _new_size: u64, _opts: &ResizeOptions) -> Result<()> {
        Err(Error::unsupported("Image format driver does not support resize"))
    }

    fn info(&self) -> Result<ImageInfo> {
        let file = blockdev::info::storage_info(self.storage.as_ref())?;
        let d = self.descriptor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut spec = Dict::new();
        spec.insert("cid", Value::Int(d.cid as i64))
            .insert("parent-cid", Value::Int(d.parent_cid as i64))
            .insert("create-type", d.create_type.as_str().into())
            .insert("extents", Value::List(self.extent_infos()));
        let cluster_size = self.extents.iter().find_map(|e| match &e.data {
            ExtentData::Sparse(s) => Some(s.header().grain_bytes()),
            _ => None,
        });
        // Extents in files of their own are child nodes `extents.N`, listed last one first and
        // before `file` (qemu lists a node's children newest first); the disk size counts every
        // file.
        let mut children = Vec::new();
        let mut actual = file.actual_size;
        for (i, e) in self.extents.iter().enumerate() {
            let s = match &e.data {
                ExtentData::Flat { storage, .. } => storage,
                ExtentData::Sparse(s) => s.storage(),
                ExtentData::Zero => continue,
            };
            if Arc::ptr_eq(s, &self.storage) {
                continue;
            }
            let info = blockdev::info::storage_info(s.as_ref())?;
            actual = match (actual, info.actual_size) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            children.push((format!("extents.{i}"), info));
        }
        children.reverse();
        children.push(("file".to_string(), file));
        Ok(ImageInfo {
            filename: self.storage.name().to_string(),
            format: "vmdk".into(),
            dirty_flag: Some(false),
            actual_size: actual,
            virtual_size: self.size,
            cluster_size,
            backing_filename: d.parent_hint.clone(),
            backing_filename_format: d.parent_hint.as_ref().map(|_| "vmdk".to_string()),
            full_backing_filename: d.parent_hint.as_ref().map(|h| blockdev::resolve_reference(self.storage.name(), h)),
            format_specific: Some(("vmdk".into(), spec)),
            children,
            ..ImageInfo::default()
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        self.backing.clone()
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.storage.clone())
    }

    fn has_zero_init(&self) -> bool {
        self.extents.iter().all(|e| matches!(e.data, ExtentData::Sparse(_) | ExtentData::Zero))
    }

    fn check(&self) -> Option<&dyn blockdev::Check> {
        Some(self)
    }

    fn compressed(&self) -> Option<&dyn blockdev::CompressedWrite> {
        self.stream.as_ref().map(|_| self as &dyn blockdev::CompressedWrite)
    }

    fn close(&self) -> Result<()> {
        if let Some(stream) = &self.stream {
            stream.finish()?;
        }
        self.flush()?;
        if self.read_only || !self.cid_updated.load(Ordering::Acquire) {
            return Ok(());
        }
        for s in self.flagged_extents() {
            s.mark_unclean(false)?;
        }
        self.flush()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.extents.iter().find_map(|e| match &e.data {
            ExtentData::Sparse(s) => Some(s.header().grain_bytes()),
            _ => None,
        })
    }
}

/// The mapping within a sparse extent from byte `within`: a run of grains of one kind (data
/// runs only while their file offsets are contiguous), at most 256 MiB.
fn map_sparse(s: &SparseExtent, within: u64, max_len: u64) -> Result<Mapped> {
    let grain = s.header().grain_bytes();
    let first = s.lookup(within)?;
    let mut len = (grain - within % grain).min(max_len);
    let mut expect_next = match first {
        Grain::Data(at) => Some(at + within % grain + len),
        _ => None,
    };
    while len < max_len && len < (256 << 20) {
        let g = s.lookup(within + len)?;
        let same = match (first, g) {
            (Grain::Data(_), Grain::Data(at)) => Some(at) == expect_next,
            (a, b) => std::mem::discriminant(&a) == std::mem::discriminant(&b),
        };
        if !same {
            break;
        }
        let n = grain.min(max_len - len);
        if let Some(e) = expect_next.as_mut() {
            *e += n;
        }
        len += n;
    }
    let mapping = match first {
        Grain::Unallocated => Mapping::Unallocated,
        Grain::Zero => Mapping::Zero,
        Grain::Data(at) => {
            Mapping::Data { storage: s.storage().clone(), offset: at + within % grain, holes: Holes::Ignored }
        }
        // qemu reports no host offset for compressed grains.
        Grain::Compressed(_) => Mapping::Compressed { host: None },
    };
    Ok(Mapped::new(len, mapping))
}

impl blockdev::CompressedWrite for Vmdk {
    fn compressed_unit(&self) -> u64 {
        self.stream.as_ref().map(|s| s.grain_bytes()).unwrap_or(65536)
    }

    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        crate::stream::StreamWriter::compress(data).map(Some)
    }

    fn write_compressed(&self, offset: u64, data: &[u8], compressed: Option<&[u8]>) -> Result<()> {
        let stream =
            self.stream.as_ref().ok_or_else(|| Error::unsupported("Compression not supported for this file format"))?;
        self.begin_changes()?;
        match compressed {
            Some(c) => stream.write_grain(offset, c),
            None => stream.write_grain(offset, &crate::stream::StreamWriter::compress(data)?),
        }
    }

    fn finish_compressed(&self) -> Result<()> {
        match &self.stream {
            Some(s) => s.finish(),
            None => Ok(()),
        }
    }

    fn compression_required(&self) -> bool {
        self.stream.is_some()
    }
}
