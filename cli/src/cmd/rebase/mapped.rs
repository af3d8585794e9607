//! Safe rebase's fast path: comparing backing views where they keep plain data in local files by
//! mapping the files' pages read-only, a window at a time, instead of copying both views through
//! read buffers. A view that reads as zeros over a run is compared as a shared zero buffer.
//!
//! Windows are unmapped once their differences are written, so the process's memory stays small
//! (the pages compared are the page cache's). Differences go to a [`DiffWriter`] with the window
//! they are written from; compressed writes are done in place, in order.

use std::sync::Arc;

use blockdev::{BlockDriver, ExtentKind};

use super::writer::{DiffWriter, Job};
use super::{differing_units, write_runs, zero_run, MAPPED_CHUNK};

/// Bytes of the zero buffer: a mapped run (up to [`MAPPED_CHUNK`], rounded up to the largest
/// unit, a 2 MiB cluster).
const ZERO_BUFFER: usize = if MAPPED_CHUNK > 2 << 20 { MAPPED_CHUNK as usize } else { 2 << 20 };
use crate::report::CliError;

/// Mapping offsets must be multiples of the page size (4 KiB or a multiple of it on Linux hosts
/// vdisk runs on; 64 KiB covers the larger pages too).
const PAGE: u64 = 65536;

/// The local files that backing views keep plain data in, and the zero buffer.
pub(super) struct Maps {
    /// By container name; `None` when the file cannot be opened (then reads are used).
    files: std::collections::HashMap<Arc<str>, Option<std::fs::File>>,
    /// Zeros standing in for a view that has no data over a run ([`ZERO_BUFFER`] bytes, lazily
    /// zeroed memory: it costs next to nothing).
    zeros: Arc<Vec<u8>>,
}

impl Default for Maps {
    fn default() -> Maps {
        Maps { files: Default::default(), zeros: Arc::new(vec![0; ZERO_BUFFER]) }
    }
}

/// A read-only mapping of part of a file: `map[skip..]` is the range asked for.
pub(super) struct Window {
    map: memmap2::Mmap,
    skip: usize,
}

/// Where a backing view's bytes for a run come from (see [`Maps::side`]).
enum Side {
    /// `(file, offset, length)` of plain data in a local file.
    Mapped(Arc<str>, u64, u64),
    /// This many bytes read as zeros.
    Zero(u64),
}

impl Side {
    fn len(&self) -> u64 {
        match self {
            Side::Mapped(_, _, n) | Side::Zero(n) => *n,
        }
    }
}

/// A side's bytes for one comparison, owned so that they can travel to the writer.
pub(super) enum SideBytes {
    /// A mapped window of a file.
    Mapped(Window),
    /// The first this many bytes of the shared zero buffer.
    Zero(Arc<Vec<u8>>, usize),
}

impl SideBytes {
    /// The bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            SideBytes::Mapped(w) => &w.map[w.skip..],
            SideBytes::Zero(z, n) => &z[..*n],
        }
    }
}

/// What [`Maps::compare_mapped`] compares: the image, both backing views and the run.
pub(super) struct Run<'a> {
    pub top: &'a dyn BlockDriver,
    pub old: Option<&'a dyn BlockDriver>,
    pub new: Option<&'a dyn BlockDriver>,
    pub start: u64,
    pub len: u64,
    pub unit: u64,
    pub old_size: u64,
    pub compress: bool,
}

impl Maps {
    /// Compares the prefix of the run where both views are plain data in local files, or one is
    /// and the other reads as zeros (whole units), hands the differences to `writer` (or writes
    /// them, when compressing), and returns the prefix's length (0: the caller reads instead).
    pub(super) fn compare_mapped(&mut self, r: &Run<'_>, writer: &mut DiffWriter) -> Result<u64, CliError> {
        let (Some(a), Some(b)) = (self.side(r.old, r.start, r.len)?, self.side(r.new, r.start, r.len)?) else {
            return Ok(0);
        };
        let m = a.len().min(b.len()).min(self.zeros.len() as u64) / r.unit * r.unit;
        if m == 0 || matches!((&a, &b), (Side::Zero(_), Side::Zero(_))) {
            return Ok(0);
        }
        let (Some(old), Some(new)) = (self.bytes(&a, m), self.bytes(&b, m)) else { return Ok(0) };
        let mask = differing_units(old.bytes(), new.bytes(), r.unit as usize);
        drop(new);
        if !mask.contains(&true) {
            return Ok(m);
        }
        let written = if r.compress {
            write_runs(r.top, r.start, old.bytes(), &mask, r.unit, r.old_size, true)
        } else {
            writer.send(Job { start: r.start, old, mask, unit: r.unit, old_size: r.old_size })
        };
        written.map_err(|e| CliError::new(format!("Error while writing to COW image: {}", e.message())))?;
        Ok(m)
    }

    /// Where `view` keeps `[at, at + len)` as plain bytes of a local file: the file, the offset
    /// and how many bytes from `at` are contiguous there.
    fn locate(&mut self, view: Option<&dyn BlockDriver>, at: u64, len: u64) -> Option<(Arc<str>, u64, u64)> {
        let v = view?;
        if at >= v.size() {
            return None;
        }
        let (ext, _) = blockdev::chain_status(v, at, len.min(v.size() - at)).ok()?;
        if ext.kind != ExtentKind::Data || ext.compressed {
            return None;
        }
        let (name, off) = ext.host?;
        let file = self.files.entry(name.clone()).or_insert_with(|| std::fs::File::open(&*name).ok()).as_ref()?;
        let n = ext.len.min(len);
        (off.checked_add(n)? <= file.metadata().ok()?.len()).then_some((name, off, n))
    }

    /// How `view` keeps `[at, at + len)` from `at` on: plain bytes of a local file, or zeros;
    /// `None` when neither (the run is read instead).
    fn side(&mut self, view: Option<&dyn BlockDriver>, at: u64, len: u64) -> Result<Option<Side>, CliError> {
        if let Some((name, off, n)) = self.locate(view, at, len) {
            return Ok(Some(Side::Mapped(name, off, n)));
        }
        let zeros = zero_run(view, at, len)?;
        Ok((zeros > 0).then_some(Side::Zero(zeros)))
    }

    /// The first `len` bytes of `side`.
    fn bytes(&self, side: &Side, len: u64) -> Option<SideBytes> {
        match side {
            Side::Mapped(name, off, _) => self.window(name, *off, len).map(SideBytes::Mapped),
            Side::Zero(_) => Some(SideBytes::Zero(self.zeros.clone(), len as usize)),
        }
    }

    /// Maps `[off, off + len)` of the file called `name` (opened by [`Maps::locate`]).
    fn window(&self, name: &Arc<str>, off: u64, len: u64) -> Option<Window> {
        let file = self.files.get(name)?.as_ref()?;
        let start = off / PAGE * PAGE;
        let skip = (off - start) as usize;
        let opts = {
            let mut o = memmap2::MmapOptions::new();
            o.offset(start).len(skip + len as usize);
            o
        };
        // SAFETY: the mapping is read-only, of a backing file rebase opened without write
        // permission and holds shared locks on (a writer honouring QEMU's locks cannot truncate
        // it meanwhile), and lies within the file's length (checked by `locate`); its bytes are
        // only compared and copied out, and it is unmapped when the window is dropped.
        let map = unsafe { opts.map(file) }.ok()?;
        Some(Window { map, skip })
    }
}
