//! Writing streamOptimized extents in the layout of VMware's specification (what ESXi and OVF
//! importers expect): header (version 3, compressed grains and markers, `gdOffset` = all ones),
//! embedded descriptor, then compressed grain records (LBA, size, zlib data, padded to a sector),
//! then for every non-empty grain table a GT marker and the table, a GD marker and the grain
//! directory, a footer marker and the footer (the header with the real `gdOffset`), and the
//! end-of-stream marker.
//!
//! A stream is written once: a disk is writable this way only while it holds no grains (as
//! created). Grains are appended as they come (the copy engine compresses them in parallel and
//! hands them over in order); the tables live in memory until [`StreamWriter::finish`] writes
//! them and the footer. Until then the file has no valid footer: a crash mid-stream leaves a disk
//! that does not open, never one that reads wrong data.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use blockdev::{Error, Prealloc, Result, Storage};

use crate::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, GD_AT_END, SECTOR,
};

/// Marker types.
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

struct State {
    /// Where the next record goes.
    pos: u64,
    /// Grain tables by directory index (absent: no grain written under it), so memory grows
    /// with the grains written, not with the disk's size.
    tables: BTreeMap<u64, Vec<u32>>,
    /// A grain was written: the file must get its new tables and footer.
    written: bool,
    finished: bool,
}

/// The writer of one streamOptimized extent.
pub(crate) struct StreamWriter {
    storage: Arc<dyn Storage>,
    header: SparseHeader,
    state: Mutex<State>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter").field("file", &self.storage.name()).finish()
    }
}

/// A marker sector.
fn marker(value: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&value.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

impl StreamWriter {
    /// A writer for the empty stream extent in `storage` whose primary header is `header` (in
    /// qemu's layout or the spec's; the result is the spec's either way).
    pub(crate) fn new(storage: Arc<dyn Storage>, mut header: SparseHeader) -> StreamWriter {
        header.version = 3;
        header.flags = FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS;
        header.rgd_offset = 0;
        header.gd_offset = GD_AT_END;
        header.compression = COMPRESSION_DEFLATE;
        let pos = header.overhead * SECTOR;
        let state = State { pos, tables: BTreeMap::new(), written: false, finished: false };
        StreamWriter { storage, header, state: Mutex::new(state) }
    }

    /// Bytes per grain.
    pub(crate) fn grain_bytes(&self) -> u64 {
        self.header.grain_bytes()
    }

    /// Compresses one grain into its record body (a zlib stream, as VMware and qemu write).
    /// Each thread keeps one deflate state and resets it per grain: allocating a fresh one
    /// (some 300 KiB) per grain costs time, and its freed memory stays in the thread's heap.
    pub(crate) fn compress(data: &[u8]) -> Result<Vec<u8>> {
        thread_local! {
            static DEFLATE: std::cell::RefCell<flate2::Compress> =
                std::cell::RefCell::new(flate2::Compress::new(flate2::Compression::default(), true));
        }
        DEFLATE.with(|z| {
            let mut z = z.borrow_mut();
            z.reset();
            let mut out = Vec::with_capacity(data.len() / 2 + 64);
            loop {
                let before = z.total_in() as usize;
                let status = z
                    .compress_vec(&data[before..], &mut out, flate2::FlushCompress::Finish)
                    .map_err(|e| Error::invalid_argument(format!("deflate failed: {e}")))?;
                if status == flate2::Status::StreamEnd {
                    return Ok(out);
                }
                out.reserve(out.capacity().max(4096));
            }
        })
    }

    /// Appends the grain at extent byte `offset` (grain-aligned) with body `compressed`.
    pub(crate) fn write_grain(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        let grain = self.header.grain_bytes();
        if offset % grain != 0 || offset >= self.header.capacity * SECTOR {
            return Err(Error::invalid_argument("streamOptimized writes must cover whole grains"));
        }
        let len = 12 + compressed.len() as u64;
        let mut record = Vec::with_capacity(len.next_multiple_of(SECTOR) as usize);
        record.extend_from_slice(&(offset / SECTOR).to_le_bytes());
        record.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        record.extend_from_slice(compressed);
        record.resize(len.next_multiple_of(SECTOR) as usize, 0);
        let at = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.finished {
                return Err(Error::invalid_argument("the streamOptimized disk is already complete"));
            }
            let at = st.pos;
            st.pos += record.len() as u64;
            st.written = true;
            let sector = u32::try_from(at / SECTOR).map_err(|_| Error::out_of_range("VMDK stream too large"))?;
            let gd_index = offset / self.header.gt_coverage();
            let gt_index = ((offset / grain) % self.header.gtes_per_gt as u64) as usize;
            let gtes = self.header.gtes_per_gt as usize;
            st.tables.entry(gd_index).or_insert_with(|| vec![0; gtes])[gt_index] = sector;
            at
        };
        blockdev::write_all_at(self.storage.as_ref(), at, &record)
    }

    /// Ends the stream if a grain was written: writes the grain tables, the directory, the
    /// footer and the end-of-stream marker after the last grain, and cuts the file there. A disk
    /// opened for writing but not written stays as it was. Idempotent.
    pub(crate) fn finish(&self) -> Result<()> {
        self.end(false)
    }

    /// Ends the stream of a new disk (its metadata is written even without grains).
    pub(crate) fn finish_new(&self) -> Result<()> {
        self.end(true)
    }

    /// Writes the metadata after the last grain, in bounded pieces: the file is first cut at the
    /// last grain (dropping what an earlier, empty stream had there) and extended to the end of
    /// the new metadata, so the directory's runs of empty entries read as zeros unwritten.
    fn end(&self, always: bool) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.finished || !(always || st.written) {
            return Ok(());
        }
        let storage = self.storage.as_ref();
        let too_large = || Error::out_of_range("VMDK stream too large");
        let gt_bytes = (self.header.gtes_per_gt as u64 * 4).next_multiple_of(SECTOR);
        let gd_entries = self.header.gd_entries();
        let gd_bytes = (gd_entries * 4).next_multiple_of(SECTOR);
        let base = st.pos;
        let tables_end = base + st.tables.len() as u64 * (SECTOR + gt_bytes);
        let gd_at = tables_end + SECTOR;
        let footer_at = gd_at + gd_bytes;
        let file_end = footer_at + 3 * SECTOR;
        u32::try_from(gd_at / SECTOR).map_err(|_| too_large())?;
        storage.set_len(base, Prealloc::Off)?;
        storage.set_len(file_end, Prealloc::Off)?;
        // Grain tables, each behind its marker, written a batch at a time.
        const BATCH: usize = 1 << 20;
        let mut out = Vec::with_capacity(BATCH.min((tables_end - base) as usize));
        let mut out_at = base;
        let mut directory = Vec::with_capacity(st.tables.len());
        for (i, t) in &st.tables {
            if out.len() >= BATCH {
                blockdev::write_all_at(storage, out_at, &out)?;
                out_at += out.len() as u64;
                out.clear();
            }
            out.extend_from_slice(&marker(gt_bytes / SECTOR, MARKER_GT));
            // Below gd_at, checked above.
            directory.push((*i, ((out_at + out.len() as u64) / SECTOR) as u32));
            let start = out.len();
            out.extend(t.iter().flat_map(|e| e.to_le_bytes()));
            out.resize(start + gt_bytes as usize, 0);
        }
        out.extend_from_slice(&marker(gd_bytes / SECTOR, MARKER_GD));
        blockdev::write_all_at(storage, out_at, &out)?;
        // The directory: only the pieces holding an entry are written.
        const PIECE_ENTRIES: u64 = 16 * 1024;
        let mut piece: Vec<u8> = Vec::new();
        let mut k = 0;
        while k < directory.len() {
            let first = directory[k].0 / PIECE_ENTRIES * PIECE_ENTRIES;
            let n = PIECE_ENTRIES.min(gd_entries - first);
            piece.clear();
            piece.resize((n * 4) as usize, 0);
            while k < directory.len() && directory[k].0 < first + n {
                let (i, sector) = directory[k];
                let at = ((i - first) * 4) as usize;
                piece[at..at + 4].copy_from_slice(&sector.to_le_bytes());
                k += 1;
            }
            blockdev::write_all_at(storage, gd_at + first * 4, &piece)?;
        }
        let mut tail = Vec::with_capacity(3 * SECTOR as usize);
        tail.extend_from_slice(&marker(1, MARKER_FOOTER));
        let footer = SparseHeader { gd_offset: gd_at / SECTOR, ..self.header.clone() };
        tail.extend_from_slice(&footer.encode());
        tail.extend_from_slice(&marker(0, MARKER_EOS));
        blockdev::write_all_at(storage, footer_at, &tail)?;
        blockdev::write_all_at(storage, 0, &self.header.encode())?;
        st.finished = true;
        Ok(())
    }
}
