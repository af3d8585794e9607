//! Reading and writing bitmap tables, bitmap data and the directory (metadata-lock side).
//!
//! Nothing is ever changed in place: new content goes to new clusters, the directory is written
//! anew and the header switched to it, and only then are the old clusters freed (see the module
//! docs of `bitmap` for the order).

use blockdev::bitmap::DirtyBitmap;
use blockdev::{read_exact_at, write_all_at, Error, Result, Storage};

use crate::bitmap::dir::{encode_directory, table_entries, BitmapEntry, BitmapsExt};
use crate::cache::get_u64;
use crate::header::autoclear;
use crate::limits::MAX_BITMAP_DIRECTORY_SIZE;
use crate::meta::Meta;

/// Bits of a bitmap table entry that must be zero.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// The host offset in a bitmap table entry.
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// With no offset: the cluster reads as all ones.
const TABLE_ALL_ONES: u64 = 1;

/// Whether a bitmap table entry follows the format's rules.
pub fn table_entry_is_valid(entry: u64, cs: u64) -> bool {
    let off = entry & TABLE_OFFSET;
    entry & TABLE_RESERVED == 0 && (off == 0 || (entry & TABLE_ALL_ONES == 0 && off % cs == 0))
}

/// The host cluster a bitmap table entry points to (0: none).
pub fn table_entry_offset(entry: u64) -> u64 {
    entry & TABLE_OFFSET
}

impl Meta {
    /// Reads `e`'s bitmap table, checking every entry.
    pub(crate) fn read_bitmap_table(&self, io: &dyn Storage, e: &BitmapEntry) -> Result<Vec<u64>> {
        let fail = || format!("Could not read bitmap_table table from image for bitmap '{}'", e.name);
        let mut raw = vec![0u8; e.table_size as usize * 8];
        read_exact_at(io, e.table_offset, &mut raw).map_err(|err| err.prefixed(fail()))?;
        let cs = self.cluster_size();
        let table: Vec<u64> = (0..e.table_size as usize).map(|i| get_u64(&raw, i)).collect();
        if table.iter().any(|&t| !table_entry_is_valid(t, cs)) {
            return Err(Error::invalid_image(format!("{}: Invalid argument", fail())));
        }
        Ok(table)
    }

    /// Checks that `e`'s table reads back and covers the disk (before a bitmap starts recording).
    pub(crate) fn check_bitmap_table(&self, io: &dyn Storage, e: &BitmapEntry) -> Result<()> {
        let table = self.read_bitmap_table(io, e)?;
        if table.len() as u64 != table_entries(self.h.size, e.granularity(), self.cluster_size()) {
            return Err(Error::invalid_image(format!(
                "Could not read bitmap '{}' from image: Invalid argument",
                e.name
            )));
        }
        Ok(())
    }

    /// Loads the content of the consistent bitmap `e`, which covers a disk of `size` bytes (the
    /// current size, or the size before a resize). Bounded by qemu's limit on a bitmap's data
    /// (`MAX_BITMAP_DATA_BYTES`, checked when the directory was read).
    pub(crate) fn load_bitmap(&self, io: &dyn Storage, e: &BitmapEntry, size: u64) -> Result<DirtyBitmap> {
        let cs = self.cluster_size();
        let fail = || format!("Could not read bitmap '{}' from image", e.name);
        if e.in_use() {
            return Err(inconsistent(&e.name));
        }
        let table = self.read_bitmap_table(io, e)?;
        if table.len() as u64 != table_entries(size, e.granularity(), cs) {
            return Err(Error::invalid_image(format!("{}: Invalid argument", fail())));
        }
        let mut bits = DirtyBitmap::new(e.granularity(), size)?;
        let mut buf = vec![0u8; cs as usize];
        for (i, &t) in table.iter().enumerate() {
            let at = i * cs as usize;
            let off = table_entry_offset(t);
            if off != 0 {
                read_exact_at(io, off, &mut buf).map_err(|err| err.prefixed(fail()))?;
                bits.load_bytes(at, &buf);
            } else if t & TABLE_ALL_ONES != 0 {
                bits.fill_bytes(at, cs as usize);
            }
        }
        Ok(bits)
    }

    /// Writes `bits` to new clusters (one per cluster of bit data that has a bit set) and a new
    /// table pointing at them; returns the table's offset and size. Nothing points at them yet.
    pub(crate) fn store_bitmap_data(&mut self, io: &dyn Storage, bits: &DirtyBitmap) -> Result<(u64, u32)> {
        let cs = self.cluster_size();
        let entries = table_entries(bits.size(), bits.granularity(), cs).max(1);
        let mut table = vec![0u8; (entries * 8) as usize];
        // Clusters allocated so far, (offset, count): freed again if a step fails.
        let mut written: Vec<(u64, u64)> = Vec::new();
        let r = (|| {
            for (i, chunk) in bits.as_bytes().chunks(cs as usize).enumerate() {
                if chunk.iter().all(|&b| b == 0) {
                    continue;
                }
                let off = self.alloc(io, 1)?;
                written.push((off, 1));
                let mut cluster = chunk.to_vec();
                cluster.resize(cs as usize, 0);
                write_all_at(io, off, &cluster)?;
                table[i * 8..i * 8 + 8].copy_from_slice(&off.to_be_bytes());
            }
            let table_clusters = (entries * 8).div_ceil(cs);
            let table_off = self.alloc(io, table_clusters)?;
            written.push((table_off, table_clusters));
            // Only the entries, as qemu writes them (the rest of the cluster stays as it is).
            write_all_at(io, table_off, &table)?;
            Ok((table_off, entries as u32))
        })();
        if r.is_err() {
            for (off, n) in written {
                self.queue_free(off, n, crate::discard::DiscardKind::Always);
            }
        }
        r
    }

    /// Queues the clusters of `e`'s table and data for freeing (after the next flush).
    pub(crate) fn free_bitmap_clusters(&mut self, io: &dyn Storage, e: &BitmapEntry) -> Result<()> {
        let cs = self.cluster_size();
        let table = self.read_bitmap_table(io, e)?;
        for t in table {
            let off = table_entry_offset(t);
            if off != 0 {
                self.queue_free(off, 1, crate::discard::DiscardKind::Always);
            }
        }
        self.queue_free(e.table_offset, (e.table_size as u64 * 8).div_ceil(cs), crate::discard::DiscardKind::Always);
        Ok(())
    }

    /// Writes `entries` as the new directory and switches the header to it: refcounts and
    /// everything the entries point at are made durable first, then the directory is written to
    /// new clusters and synced, then the header cluster is written and synced. The old
    /// directory is queued for freeing. No entries: the extension and its autoclear bit go.
    pub(crate) fn write_bitmap_directory(&mut self, io: &dyn Storage, entries: Vec<BitmapEntry>) -> Result<()> {
        let cs = self.cluster_size();
        let bytes = encode_directory(&entries);
        if bytes.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::invalid_argument("Bitmap directory is too large"));
        }
        let clusters = (bytes.len() as u64).div_ceil(cs);
        let offset = if clusters > 0 { self.alloc(io, clusters)? } else { 0 };
        let written = (|| {
            self.flush(io)?;
            if clusters > 0 {
                write_all_at(io, offset, &bytes)?;
            }
            io.flush()
        })();
        if let Err(e) = written {
            self.queue_free(offset, clusters, crate::discard::DiscardKind::Always);
            return Err(e.prefixed("Failed to update bitmap extension"));
        }
        let old_ext = self.exts.bitmaps;
        let old_autoclear = self.h.autoclear;
        self.exts.bitmaps = (!entries.is_empty()).then_some(BitmapsExt {
            nb_bitmaps: entries.len() as u32,
            directory_size: bytes.len() as u64,
            directory_offset: offset,
        });
        if entries.is_empty() {
            self.h.autoclear &= !autoclear::BITMAPS;
        } else {
            self.h.autoclear |= autoclear::BITMAPS;
        }
        // The extension can lie past the first sector: the whole header cluster is written.
        if let Err(e) = self.write_header(io, true).and_then(|()| io.flush()) {
            self.exts.bitmaps = old_ext;
            self.h.autoclear = old_autoclear;
            self.queue_free(offset, clusters, crate::discard::DiscardKind::Always);
            return Err(e.prefixed("Failed to update bitmap extension"));
        }
        self.bitmaps = entries;
        if let Some(old) = old_ext {
            self.queue_free(old.directory_offset, old.directory_size.div_ceil(cs), crate::discard::DiscardKind::Always);
        }
        Ok(())
    }
}

/// The error for using an inconsistent bitmap, with qemu's hint.
pub fn inconsistent(name: &str) -> Error {
    Error::invalid_argument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}
