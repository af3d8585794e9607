//! A hosted sparse extent: grain directory, grain tables (and their redundant copies), grains
//! (plain or deflate-compressed), allocation at the end of the file.
//!
//! Invariants and update order:
//! - every table offset is checked against the file before it is read, and every grain offset
//!   before it is followed; a table or grain inside the header or the grain directory is
//!   corruption, reported as such;
//! - grain table entries change in memory only (the cached table is marked dirty) and reach the
//!   file in [`SparseExtent::write_back`], which runs in this order: sync the file (every grain a
//!   dirty entry points at was written before the entry changed, so it is now durable), write the
//!   dirty tables and their redundant copies, and if tables were allocated, sync again and write
//!   their grain directory entries (primary and redundant). The caller's final sync makes the
//!   directory durable. So a crash leaves at worst grains or tables no entry points at, never an
//!   entry pointing at data that is not there;
//! - a new grain table is reserved at the end of the file and exists in memory only until the
//!   write-back writes it; its directory entry is written after it;
//! - grain tables are cached in memory, bounded by [`MAX_CACHED_TABLES`]; dirty tables are never
//!   evicted, and more than [`MAX_DIRTY_TABLES`] of them make the next change write back first;
//! - the write-back runs one at a time (a later one never writes older copies over newer ones).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::{Error, Result, Storage};

use crate::header::{SparseHeader, GD_AT_END, SECTOR};

/// Grain tables kept in memory at most (2 KiB each with 512 entries).
pub const MAX_CACHED_TABLES: usize = 8192;

/// Dirty grain tables at most before a change writes them back (2 KiB each with 512 entries).
pub const MAX_DIRTY_TABLES: usize = 4096;

/// Byte offset of the header's unclean-shutdown flag.
const UNCLEAN_SHUTDOWN_AT: u64 = 72;

/// Largest compressed grain record vdisk reads: twice the grain plus slack (deflate may expand).
fn max_compressed(grain: u64) -> u64 {
    grain * 2 + 4096
}

/// Where a grain of the extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated: reads from the parent disk, or zeros.
    Unallocated,
    /// A zeroed grain (table entry 1).
    Zero,
    /// Plain data at this byte offset of the file.
    Data(u64),
    /// A compressed grain record at this byte offset.
    Compressed(u64),
}

struct State {
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    tables: HashMap<u64, Arc<Vec<u32>>>,
    /// Byte offset where the next grain or table is appended.
    end: u64,
    /// Directory indices of cached tables that differ from the file.
    dirty_tables: BTreeSet<u64>,
    /// Directory indices whose entries (tables allocated since the last write-back) differ from
    /// the file.
    dirty_directory: BTreeSet<u64>,
}

/// An open sparse extent.
pub struct SparseExtent {
    storage: Arc<dyn Storage>,
    /// The effective header (the footer's copy for streamOptimized files that have one).
    header: SparseHeader,
    state: Mutex<State>,
    /// Serializes write-backs.
    write_back_lock: Mutex<()>,
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseExtent").field("file", &self.storage.name()).field("header", &self.header).finish()
    }
}

fn corrupt(storage: &dyn Storage, what: String) -> Error {
    Error::invalid_image(format!("{}: {what}", storage.name()))
}

/// Reads `n` little-endian u32 entries at byte offset `at`.
fn read_table(storage: &dyn Storage, at: u64, n: u64) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; (n * 4) as usize];
    blockdev::read_exact_at(storage, at, &mut raw)?;
    Ok(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

impl SparseExtent {
    /// Opens the sparse extent in `storage` whose header is `header` (for streamOptimized
    /// files with the directory at the end, the footer's copy).
    pub fn open(storage: Arc<dyn Storage>, mut header: SparseHeader) -> Result<SparseExtent> {
        let file_len = storage.len()?;
        header.validate(storage.name())?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(storage.as_ref(), file_len)?;
            header.validate(storage.name())?;
        }
        let expected = header.overhead.saturating_mul(SECTOR);
        if file_len.div_ceil(SECTOR) < header.overhead {
            return Err(Error::invalid_image(format!("File truncated, expecting at least {expected} bytes")));
        }
        let entries = header.gd_entries();
        let gd_bytes = entries * 4;
        let check_table = |sector: u64, what: &str| -> Result<u64> {
            let at = sector.checked_mul(SECTOR).filter(|&a| a > 0 && a.saturating_add(gd_bytes) <= file_len);
            at.ok_or_else(|| corrupt(storage.as_ref(), format!("{what} at sector {sector} lies outside the file")))
        };
        let gd_at = check_table(header.gd_offset, "grain directory")?;
        let gd = read_table(storage.as_ref(), gd_at, entries)?;
        let rgd = if header.flags & crate::header::FLAG_RGD != 0 && header.rgd_offset != 0 {
            let at = check_table(header.rgd_offset, "redundant grain directory")?;
            Some(read_table(storage.as_ref(), at, entries)?)
        } else {
            None
        };
        let end = file_len.next_multiple_of(SECTOR);
        let state = State {
            gd,
            rgd,
            tables: HashMap::new(),
            end,
            dirty_tables: BTreeSet::new(),
            dirty_directory: BTreeSet::new(),
        };
        Ok(SparseExtent { storage, header, state: Mutex::new(state), write_back_lock: Mutex::new(()) })
    }

    /// The effective header.
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The extent's file.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Byte offset of the directory's table `sector` entries, checked.
    fn table_at(&self, sector: u32) -> Result<u64> {
        let at = sector as u64 * SECTOR;
        let len = self.header.gtes_per_gt as u64 * 4;
        let meta_end = self.header.gd_offset.saturating_mul(SECTOR).saturating_add(self.header.gd_entries() * 4);
        if at == 0 || at.saturating_add(len) > self.lock_end() {
            return Err(corrupt(
                self.storage.as_ref(),
                format!("grain table at sector {sector} lies outside the file"),
            ));
        }
        if at < meta_end && at + len > self.header.gd_offset * SECTOR {
            return Err(corrupt(
                self.storage.as_ref(),
                format!("grain table at sector {sector} overlaps the grain directory"),
            ));
        }
        Ok(at)
    }

    fn lock_end(&self) -> u64 {
        self.lock().end
    }

    /// The grain table of directory entry `gd_index`, if allocated.
    fn table(&self, gd_index: u64) -> Result<Option<Arc<Vec<u32>>>> {
        let sector = {
            let st = self.lock();
            if let Some(t) = st.tables.get(&gd_index) {
                return Ok(Some(t.clone()));
            }
            match st.gd.get(gd_index as usize) {
                Some(&0) | None => return Ok(None),
                Some(&s) => s,
            }
        };
        let at = self.table_at(sector)?;
        let table = Arc::new(read_table(self.storage.as_ref(), at, self.header.gtes_per_gt as u64)?);
        let mut st = self.lock();
        if let Some(cached) = st.tables.get(&gd_index) {
            // Another request loaded (and perhaps changed) it meanwhile.
            return Ok(Some(cached.clone()));
        }
        if st.tables.len() >= MAX_CACHED_TABLES {
            let State { tables, dirty_tables, .. } = &mut *st;
            tables.retain(|i, _| dirty_tables.contains(i));
        }
        st.tables.insert(gd_index, table.clone());
        Ok(Some(table))
    }

    /// Where the grain holding byte `offset` of the extent is, checked against the file.
    pub fn lookup(&self, offset: u64) -> Result<Grain> {
        let g = self.entry(offset)?;
        if let Grain::Data(at) | Grain::Compressed(at) = g {
            if at >= self.lock_end() {
                return Err(corrupt(
                    self.storage.as_ref(),
                    format!("grain for offset {offset} at byte {at} lies outside the file"),
                ));
            }
        }
        Ok(g)
    }

    /// What the grain table says about the grain holding byte `offset`, unchecked (`check`).
    pub fn entry(&self, offset: u64) -> Result<Grain> {
        let grain = self.header.grain_bytes();
        let gd_index = offset / self.header.gt_coverage();
        let gt_index = (offset / grain) % self.header.gtes_per_gt as u64;
        let Some(table) = self.table(gd_index)? else { return Ok(Grain::Unallocated) };
        Ok(match table[gt_index as usize] {
            0 => Grain::Unallocated,
            1 if self.header.zeroed_grains() => Grain::Zero,
            s if self.header.compressed() => Grain::Compressed(s as u64 * SECTOR),
            s => Grain::Data(s as u64 * SECTOR),
        })
    }

    /// Reads the whole grain at `at` into `out` (a grain's bytes), decompressing if needed.
    pub fn read_grain(&self, grain: Grain, out: &mut [u8]) -> Result<()> {
        match grain {
            Grain::Unallocated | Grain::Zero => out.fill(0),
            Grain::Data(at) => {
                let file_end = self.lock_end();
                let n = (file_end.saturating_sub(at)).min(out.len() as u64) as usize;
                blockdev::read_exact_at(self.storage.as_ref(), at, &mut out[..n])?;
                out[n..].fill(0);
            }
            Grain::Compressed(at) => self.read_compressed(at, out)?,
        }
        Ok(())
    }

    fn read_compressed(&self, at: u64, out: &mut [u8]) -> Result<()> {
        let mut head = [0u8; 12];
        blockdev::read_exact_at(self.storage.as_ref(), at, &mut head)?;
        let size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64;
        let limit = max_compressed(self.header.grain_bytes());
        if size == 0 || size > limit || at + 12 + size > self.lock_end() {
            return Err(corrupt(self.storage.as_ref(), format!("compressed grain at {at} has a bad size {size}")));
        }
        let mut data = vec![0u8; size as usize];
        blockdev::read_exact_at(self.storage.as_ref(), at + 12, &mut data)?;
        let mut z = flate2::Decompress::new(true);
        match z.decompress(&data, out, flate2::FlushDecompress::Finish) {
            Ok(_) => {
                let n = z.total_out() as usize;
                out[n..].fill(0);
                Ok(())
            }
            Err(_) => Err(corrupt(self.storage.as_ref(), format!("compressed grain at {at} does not inflate"))),
        }
    }

    /// Points consecutive grains, from the one holding byte `offset`, at `entries` (sectors, or
    /// 1 for zeroed grains), allocating grain tables as needed. The change is made in the cached
    /// tables; [`SparseExtent::write_back`] writes it.
    fn set_entries(&self, offset: u64, entries: &[u32]) -> Result<()> {
        if self.lock().dirty_tables.len() >= MAX_DIRTY_TABLES {
            self.write_back()?;
        }
        let gtes = self.header.gtes_per_gt as u64;
        let mut done = 0usize;
        while done < entries.len() {
            let off = offset + done as u64 * self.header.grain_bytes();
            let gd_index = off / self.header.gt_coverage();
            let gt_index = (off / self.header.grain_bytes()) % gtes;
            let n = ((gtes - gt_index) as usize).min(entries.len() - done);
            let Some(loaded) = self.table(gd_index)? else {
                self.allocate_table(gd_index)?;
                continue;
            };
            let mut st = self.lock();
            // Evicted since it was loaded only if it was clean, so `loaded` is still its content.
            let table = st.tables.entry(gd_index).or_insert(loaded);
            Arc::make_mut(table)[gt_index as usize..gt_index as usize + n].copy_from_slice(&entries[done..done + n]);
            st.dirty_tables.insert(gd_index);
            done += n;
        }
        Ok(())
    }

    /// Reserves zeroed grain tables for directory entry `gd_index` (and its redundant copy) at
    /// the end of the file and points the in-memory directories at them; the write-back writes
    /// both. Nothing happens if another request allocated them first.
    fn allocate_table(&self, gd_index: u64) -> Result<()> {
        let len = (self.header.gtes_per_gt as u64 * 4).next_multiple_of(SECTOR);
        let mut st = self.lock();
        let idx = gd_index as usize;
        match st.gd.get(idx) {
            None => return Err(Error::out_of_range("VMDK grain directory index out of range")),
            Some(&0) if !st.tables.contains_key(&gd_index) => {}
            Some(_) => return Ok(()),
        }
        let copies = if st.rgd.is_some() { 2 } else { 1 };
        let at = st.end;
        let sector = |b: u64| u32::try_from(b / SECTOR).map_err(|_| Error::out_of_range("VMDK sparse extent is full"));
        let (gt, rgt) = (sector(at)?, sector(at + len)?);
        st.end += len * copies;
        st.gd[idx] = gt;
        if let Some(r) = st.rgd.as_mut() {
            r[idx] = rgt;
        }
        st.tables.insert(gd_index, Arc::new(vec![0u32; self.header.gtes_per_gt as usize]));
        st.dirty_tables.insert(gd_index);
        st.dirty_directory.insert(gd_index);
        Ok(())
    }

    /// Writes the changed grain tables and directory entries, in the order the module docs give
    /// (sync, tables, sync, directory entries); the caller syncs afterwards. On failure the
    /// changes stay dirty for the next attempt.
    pub fn write_back(&self) -> Result<()> {
        let _one_at_a_time = self.write_back_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (table_ids, directory_ids) = {
            let mut st = self.lock();
            (std::mem::take(&mut st.dirty_tables), std::mem::take(&mut st.dirty_directory))
        };
        if table_ids.is_empty() && directory_ids.is_empty() {
            return Ok(());
        }
        let (tables, entries) = {
            let st = self.lock();
            let rgd = |i: u64| st.rgd.as_ref().map_or(0, |r| r[i as usize]);
            let tables: Vec<(u32, u32, Arc<Vec<u32>>)> = table_ids
                .iter()
                .filter_map(|&i| Some((st.gd[i as usize], rgd(i), st.tables.get(&i)?.clone())))
                .collect();
            let entries: Vec<(u64, u32, u32)> = directory_ids.iter().map(|&i| (i, st.gd[i as usize], rgd(i))).collect();
            (tables, entries)
        };
        let result = (|| -> Result<()> {
            self.storage.flush()?;
            for (gt, rgt, table) in &tables {
                let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
                blockdev::write_all_at(self.storage.as_ref(), *gt as u64 * SECTOR, &bytes)?;
                if *rgt != 0 {
                    blockdev::write_all_at(self.storage.as_ref(), *rgt as u64 * SECTOR, &bytes)?;
                }
            }
            if entries.is_empty() {
                return Ok(());
            }
            self.storage.flush()?;
            for (i, gt, rgt) in &entries {
                blockdev::write_all_at(
                    self.storage.as_ref(),
                    self.header.gd_offset * SECTOR + i * 4,
                    &gt.to_le_bytes(),
                )?;
                if *rgt != 0 {
                    let at = self.header.rgd_offset * SECTOR + i * 4;
                    blockdev::write_all_at(self.storage.as_ref(), at, &rgt.to_le_bytes())?;
                }
            }
            Ok(())
        })();
        if result.is_err() {
            let mut st = self.lock();
            st.dirty_tables.extend(table_ids);
            st.dirty_directory.extend(directory_ids);
        }
        result
    }

    /// Reserves `len` bytes at the end of the file for new grains; returns where they start.
    /// Nothing points at them until [`SparseExtent::publish_grains`].
    pub fn reserve(&self, len: u64) -> u64 {
        let mut st = self.lock();
        let at = st.end;
        st.end += len.next_multiple_of(SECTOR);
        at
    }

    /// Points `count` consecutive grains, from the one holding byte `offset` (a grain boundary),
    /// at the grains written from byte `at` of the file (reserved, then written, by the caller).
    pub fn publish_grains(&self, offset: u64, at: u64, count: u64) -> Result<()> {
        let first = at / SECTOR;
        let sectors = (0..count)
            .map(|i| u32::try_from(first + i * self.header.grain_sectors))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| Error::out_of_range("VMDK sparse extent is full"))?;
        self.set_entries(offset, &sectors)
    }

    /// Marks `count` grains from the one holding byte `offset` as zeroed grains (zeroed_grain
    /// images only).
    pub fn zero_grains(&self, offset: u64, count: usize) -> Result<()> {
        self.set_entries(offset, &vec![1u32; count])
    }

    /// Whether no grain is allocated (every directory entry empty, or every table all zeros).
    pub fn is_empty(&self) -> Result<bool> {
        for i in 0..self.header.gd_entries() {
            if let Some(t) = self.table(i)? {
                if t.iter().any(|&e| e != 0) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Sets or clears the unclean-shutdown flag in the file's header (the header read at open
    /// keeps the value it had). The caller orders it: set and made durable before the first
    /// change, cleared after the last change is durable.
    pub fn mark_unclean(&self, unclean: bool) -> Result<()> {
        blockdev::write_all_at(self.storage.as_ref(), UNCLEAN_SHUTDOWN_AT, &[unclean as u8])
    }

    /// Bytes of the file in use (for `check`'s image end offset).
    pub fn end(&self) -> u64 {
        self.lock_end()
    }
}

impl Drop for SparseExtent {
    /// A disk dropped without a flush still gets its table changes written (in order).
    fn drop(&mut self) {
        let _ = self.write_back();
    }
}

/// Reads the footer header of a streamOptimized file (512 bytes, 1024 bytes before the end,
/// behind a footer marker), qemu's and the spec's way to find the grain directory.
fn read_footer(storage: &dyn Storage, file_len: u64) -> Result<SparseHeader> {
    if file_len < 1536 {
        return Err(Error::invalid_image(format!("{}: streamOptimized file has no footer", storage.name())));
    }
    let mut marker = [0u8; 512];
    blockdev::read_exact_at(storage, file_len - 1536, &mut marker)?;
    let kind = u32::from_le_bytes([marker[12], marker[13], marker[14], marker[15]]);
    let size = u32::from_le_bytes([marker[8], marker[9], marker[10], marker[11]]);
    if size != 0 || kind != 3 {
        return Err(Error::invalid_image(format!("{}: streamOptimized file has no footer marker", storage.name())));
    }
    let mut footer = [0u8; 512];
    blockdev::read_exact_at(storage, file_len - 1024, &mut footer)?;
    let h = SparseHeader::parse(&footer)?;
    if h.gd_offset == GD_AT_END {
        return Err(Error::invalid_image(format!(
            "{}: the footer does not locate the grain directory",
            storage.name()
        )));
    }
    Ok(h)
}
