//! An open VMDK disk: its descriptor, its extents in guest order, and its parent (delta disks).
//!
//! Requests are split at extent and grain boundaries. Flat extents map 1:1 onto their file from
//! the extent's offset (bytes past the file's end read as zeros), ZERO and NOACCESS extents read
//! as zeros, sparse extents through their grain tables; unallocated grains read from the parent
//! disk, or as zeros without one.
//!
//! Writes to a sparse extent that hit an unallocated (or zeroed) grain build the whole grain
//! (parent data or zeros, then the new bytes) and append it, holding that grain's range lock so
//! that two writers never allocate the same grain twice. The first write of an open gives the
//! disk a new CID (written into the descriptor, as VMware and qemu do), so that delta disks made
//! on the old content notice the change, and sets the unclean-shutdown flag of every writable
//! sparse extent, durable before any data is written; `close` clears the flag after a final
//! flush (qemu never sets it; VMware checks a disk that has it set).

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use blockdev::info::ImageInfo;
use blockdev::qobject::{Dict, Value};
use blockdev::range_lock::RangeLock;
use blockdev::{check_request, BlockDriver, Error, Extent, ExtentKind, ResizeOptions, Result, Storage, ZeroFlags};

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

    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.backing.is_some() && !self.parent_cid_ok {
            return Err(Error::from_errno("read", libc::EINVAL));
        }
        blockdev::read_backing(self.backing.as_ref(), offset, buf)
    }

    /// Reads `buf.len()` bytes at guest `offset` (within the disk).
    fn read_into(&self, mut offset: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let i = self.extent_at(offset).ok_or_else(|| Error::out_of_range("read past the end of the VMDK"))?;
            let e = &self.extents[i];
            let within = offset - e.start;
            let n = ((e.len - within) as usize).min(buf.len());
            let (now, rest) = buf.split_at_mut(n);
            match (&e.data, e.access) {
                (_, Access::NoAccess) | (ExtentData::Zero, _) => now.fill(0),
                (ExtentData::Flat { storage, offset: base }, _) => {
                    let at = base + within;
                    let file_len = storage.len()?;
                    let have = (file_len.saturating_sub(at) as usize).min(n);
                    blockdev::read_exact_at(storage.as_ref(), at, &mut now[..have])?;
                    now[have..].fill(0);
                }
                (ExtentData::Sparse(s), _) => self.read_sparse(s, e.start, within, now)?,
            }
            offset += n as u64;
            buf = rest;
        }
        Ok(())
    }

    fn read_sparse(&self, s: &SparseExtent, ext_start: u64, mut within: u64, mut buf: &mut [u8]) -> Result<()> {
        let grain = s.header().grain_bytes();
        let mut scratch: Vec<u8> = Vec::new();
        while !buf.is_empty() {
            let in_grain = within % grain;
            let mut n = ((grain - in_grain) as usize).min(buf.len());
            let found = s.lookup(within)?;
            if let Grain::Data(at) = found {
                // Grains stored one after another in the file are read in one request.
                let mut next = at + in_grain + n as u64;
                while n < buf.len() {
                    match s.lookup(within + n as u64)? {
                        Grain::Data(a) if a == next => {
                            let m = (grain as usize).min(buf.len() - n);
                            n += m;
                            next += m as u64;
                        }
                        _ => break,
                    }
                }
            }
            let (now, rest) = buf.split_at_mut(n);
            match found {
                Grain::Unallocated => self.read_parent(ext_start + within, now)?,
                Grain::Zero => now.fill(0),
                Grain::Data(at) => s.read_grain(Grain::Data(at + in_grain), now)?,
                g @ Grain::Compressed(_) => {
                    scratch.resize(grain as usize, 0);
                    s.read_grain(g, &mut scratch)?;
                    now.copy_from_slice(&scratch[in_grain as usize..in_grain as usize + n]);
                }
            }
            within += n as u64;
            buf = rest;
        }
        Ok(())
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

    /// Writes `data` at guest `offset` (within one extent).
    fn write_into(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let i = self.extent_at(at).ok_or_else(|| Error::out_of_range("write past the end of the VMDK"))?;
            let e = &self.extents[i];
            self.writable_extent(e)?;
            let within = at - e.start;
            let n = ((e.len - within) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            match &e.data {
                ExtentData::Flat { storage, offset: base } => {
                    blockdev::write_all_at(storage.as_ref(), base + within, piece)?
                }
                ExtentData::Sparse(s) => self.write_sparse(s, e.start, within, piece)?,
                ExtentData::Zero => unreachable!("checked by writable_extent"),
            }
            done += n;
        }
        Ok(())
    }

    fn write_sparse(&self, s: &SparseExtent, ext_start: u64, mut within: u64, mut data: &[u8]) -> Result<()> {
        if s.header().compressed() {
            return Err(Error::unsupported("Writing into a compressed (streamOptimized) VMDK is not supported"));
        }
        let grain = s.header().grain_bytes();
        while !data.is_empty() {
            let in_grain = within % grain;
            // A run of whole unallocated grains is appended in one request.
            let whole = if in_grain == 0 { data.len() as u64 / grain } else { 0 };
            if whole > 1 {
                let run = self.unallocated_run(s, within, whole.min(MAX_RUN_GRAINS))?;
                if run > 1 {
                    let bytes = run * grain;
                    let _g = self.grain_locks.lock(ext_start + within, ext_start + within + bytes);
                    if self.unallocated_run(s, within, run)? == run {
                        s.allocate_grains(within, &data[..bytes as usize])?;
                        within += bytes;
                        data = &data[bytes as usize..];
                        continue;
                    }
                }
            }
            let n = ((grain - in_grain) as usize).min(data.len());
            let (now, rest) = data.split_at(n);
            let grain_start = within - in_grain;
            let _g = self.grain_locks.lock(ext_start + grain_start, ext_start + grain_start + grain);
            match s.lookup(within)? {
                // A grain inside the header or tables would overwrite metadata: refuse, as qcow2 does.
                Grain::Data(at) if at < s.header().overhead * SECTOR => {
                    return Err(Error::corrupt(format!(
                        "{}: grain for offset {within} points into the metadata (byte {at}); refusing to write",
                        s.storage().name()
                    )));
                }
                Grain::Data(at) => blockdev::write_all_at(s.storage().as_ref(), at + in_grain, now)?,
                g => {
                    let mut full = vec![0u8; grain as usize];
                    let ext_len = s.header().capacity * SECTOR;
                    if g == Grain::Unallocated && n as u64 != grain {
                        let have = (ext_len - grain_start).min(grain) as usize;
                        self.read_parent(ext_start + grain_start, &mut full[..have])?;
                    }
                    full[in_grain as usize..in_grain as usize + n].copy_from_slice(now);
                    s.allocate_grains(grain_start, &full)?;
                }
            }
            within += n as u64;
            data = rest;
        }
        Ok(())
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

impl BlockDriver for Vmdk {
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

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        check_request(offset, blockdev::iov_len_mut(bufs), self.size)?;
        blockdev::with_contiguous_mut(bufs, |buf| self.read_into(offset, buf))
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let len = blockdev::iov_len(bufs);
        check_request(offset, len, self.size)?;
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        self.begin_changes()?;
        if let Some(stream) = &self.stream {
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
            return Ok(());
        }
        if bufs.len() == 1 {
            return self.write_into(offset, &bufs[0]);
        }
        let data: Vec<u8> = bufs.iter().map(|b| &b[..]).collect::<Vec<&[u8]>>().concat();
        self.write_into(offset, &data)
    }

    /// Whole grains of zeroed_grain extents become zeroed grains; unallocated grains without a
    /// parent already read as zeros and stay unallocated; everything else gets zeros written.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_request(offset, len, self.size)?;
        if self.read_only {
            return Err(Error::read_only().with_path(self.storage.name()));
        }
        const CHUNK: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let i = self.extent_at(at).ok_or_else(|| Error::out_of_range("write past the end of the VMDK"))?;
            let e = &self.extents[i];
            let within = at - e.start;
            let mut n = (len - done).min(e.len - within).min(CHUNK);
            if let ExtentData::Sparse(s) = &e.data {
                let grain = s.header().grain_bytes();
                let whole = if within % grain == 0 { n / grain } else { 0 };
                if whole > 0 && !s.header().compressed() {
                    self.writable_extent(e)?;
                    let _g = self.grain_locks.lock(at, at + whole * grain);
                    if s.header().zeroed_grains() {
                        self.begin_changes()?;
                        s.zero_grains(within, whole as usize)?;
                        done += whole * grain;
                        continue;
                    }
                    if self.backing.is_none() && self.unallocated_run(s, within, whole)? == whole {
                        done += whole * grain;
                        continue;
                    }
                } else if whole == 0 && within % grain != 0 {
                    n = n.min(grain - within % grain);
                }
            }
            if flags.no_fallback {
                return Err(Error::unsupported("VMDK cannot write zeroes here without writing data"));
            }
            let zeros = vec![0u8; n as usize];
            self.write_at(at, &[IoSlice::new(&zeros)])?;
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

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        if max_len == 0 {
            return Err(Error::out_of_range(format!("block status at offset {offset} is past the end of the disk")));
        }
        let i = self.extent_at(offset).ok_or_else(|| Error::out_of_range("block status past the end"))?;
        let e = &self.extents[i];
        let within = offset - e.start;
        let max_len = max_len.min(e.len - within);
        Ok(match (&e.data, e.access) {
            (_, Access::NoAccess) | (ExtentData::Zero, _) => Extent::new(max_len, ExtentKind::Zero),
            (ExtentData::Flat { storage, offset: base }, _) => {
                // As qemu, the file's holes show as zeros (allocated, reading zeros).
                let at = base + within;
                let (data, len) = match storage.len()? {
                    end if at >= end => (false, max_len),
                    end => {
                        let (data, len) = storage.data_status(at, max_len.min(end - at))?;
                        (data, len.clamp(1, max_len))
                    }
                };
                let kind = if data { ExtentKind::Data } else { ExtentKind::ZeroData };
                Extent::mapped(len, kind, storage.name().into(), at)
            }
            (ExtentData::Sparse(s), _) => sparse_status(s, within, max_len)?,
        })
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

/// Block status within a sparse extent: a run of grains of one kind (data runs only while
/// their file offsets are contiguous).
fn sparse_status(s: &SparseExtent, within: u64, max_len: u64) -> Result<Extent> {
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
            (Grain::Compressed(_), Grain::Compressed(_)) => true,
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
    let file: Arc<str> = s.storage().name().into();
    Ok(match first {
        Grain::Unallocated => Extent::new(len, ExtentKind::Unallocated),
        Grain::Zero => Extent::new(len, ExtentKind::Zero),
        Grain::Data(at) => Extent::mapped(len, ExtentKind::Data, file, at + within % grain),
        // qemu reports no host offset for compressed grains.
        Grain::Compressed(_) => Extent { len, kind: ExtentKind::Data, host: None, compressed: true },
    })
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
