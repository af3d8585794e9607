//! The bitmap operations ([`PersistentBitmaps`] for [`Qcow2`]) and the recording of guest writes
//! into enabled bitmaps.
//!
//! Locks: the recording mutex is taken before the metadata lock, never after it. Guest writes
//! note their range before they change anything (so a write is never missing from a bitmap that
//! is later stored), outside the metadata lock.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use blockdev::bitmap::{BitmapChange, BitmapInfo, DirtyBitmap, MergeSource, PersistentBitmaps, MIN_GRANULARITY};
use blockdev::{Error, Result};

use crate::bitmap::dir::{check_new, entry_size, BitmapEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::bitmap::store::inconsistent;
use crate::driver::Qcow2;
use crate::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use crate::meta::Meta;

/// An enabled bitmap recording guest writes while the image is open (marked in use on disk).
#[derive(Debug)]
pub(crate) struct Recording {
    name: String,
    bits: DirtyBitmap,
}

/// What is recording now: `None` until the first guest write after open or after the last store.
pub(crate) type RecordingSlot = Option<Vec<Recording>>;

/// Whether any bitmap would record writes (enabled and consistent).
fn any_recording(m: &Meta) -> bool {
    m.bitmaps.iter().any(|e| e.auto() && !e.in_use())
}

fn not_found(name: &str) -> Error {
    Error::new(blockdev::ErrorKind::NotFound, format!("Dirty bitmap '{name}' not found"))
}

impl Qcow2 {
    fn recording(&self) -> MutexGuard<'_, RecordingSlot> {
        self.recording.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether guest writes must be noted (set at open and after every bitmap change; while a
    /// recording runs it stays set).
    pub(crate) fn refresh_bitmap_watch(&self, m: &Meta) {
        self.watch_bitmaps.store(any_recording(m), Ordering::Release);
    }

    /// Notes a guest change of `[offset, offset + len)` in every enabled bitmap; the first one
    /// after open marks them in use on disk.
    pub(crate) fn note_change(&self, offset: u64, len: u64) -> Result<()> {
        if !self.watch_bitmaps.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.recording();
        if slot.is_none() {
            let mut m = self.lock();
            let started = self.start_recording(&mut m)?;
            if started.is_empty() {
                self.refresh_bitmap_watch(&m);
                return Ok(());
            }
            *slot = Some(started);
        }
        for r in slot.iter_mut().flatten() {
            r.bits.set_range(offset, len);
        }
        Ok(())
    }

    /// Loads the enabled bitmaps and marks them in use on disk.
    fn start_recording(&self, m: &mut Meta) -> Result<Vec<Recording>> {
        let io = self.file.as_ref();
        let mut entries = m.bitmaps.clone();
        let mut out = Vec::new();
        for e in entries.iter_mut().filter(|e| e.auto() && !e.in_use()) {
            out.push(Recording { name: e.name.clone(), bits: m.load_bitmap(io, e)? });
            e.flags |= FLAG_IN_USE;
        }
        if !out.is_empty() {
            m.write_bitmap_directory(io, entries)?;
        }
        Ok(out)
    }

    /// Stores what the enabled bitmaps recorded and clears their in-use mark (close, and before
    /// every bitmap operation). On error they stay marked in use: inconsistent, not wrong.
    pub(crate) fn store_recorded(&self, slot: &mut RecordingSlot, m: &mut Meta) -> Result<()> {
        let Some(list) = slot.take() else { return Ok(()) };
        let mut entries = m.bitmaps.clone();
        let mut contents = HashMap::new();
        for r in list {
            if let Some(e) = entries.iter_mut().find(|e| e.name == r.name) {
                e.flags &= !FLAG_IN_USE;
                contents.insert(r.name, r.bits);
            }
        }
        if contents.is_empty() {
            return Ok(());
        }
        self.commit_bitmaps(m, entries, contents)
    }

    /// Writes `entries` as the bitmaps, the way qemu stores them when it closes an image: every
    /// consistent bitmap, in directory order, gets its content (from `contents`, else as stored
    /// now) written to new clusters; then the new directory goes in (see `store.rs` for the
    /// order); then the old tables and data are freed. Entries new to the image carry a zero
    /// table offset and must have their content in `contents`.
    fn commit_bitmaps(
        &self,
        m: &mut Meta,
        mut entries: Vec<BitmapEntry>,
        mut contents: HashMap<String, DirtyBitmap>,
    ) -> Result<()> {
        let io = self.file.as_ref();
        let mut old = Vec::new();
        let mut stored: Vec<BitmapEntry> = Vec::new();
        let r = (|| {
            for e in entries.iter_mut().filter(|e| !e.in_use()) {
                let bits = match contents.remove(&e.name) {
                    Some(b) => b,
                    None => m.load_bitmap(io, e)?,
                };
                let (off, size) = m
                    .store_bitmap_data(io, &bits)
                    .map_err(|err| err.prefixed(format!("Failed to write bitmap '{}' to file", e.name)))?;
                if e.table_offset != 0 {
                    old.push(e.clone());
                }
                e.table_offset = off;
                e.table_size = size;
                stored.push(e.clone());
            }
            m.write_bitmap_directory(io, entries.clone())
        })();
        // What a failed attempt wrote is freed again; on success the old copies go.
        let garbage = if r.is_ok() { old } else { stored };
        for e in &garbage {
            m.free_bitmap_clusters(io, e)?;
        }
        r?;
        m.flush(io)
    }

    /// Stores what is recording, on close.
    pub(crate) fn store_bitmaps_on_close(&self) -> Result<()> {
        let mut slot = self.recording();
        let mut m = self.lock();
        self.store_recorded(&mut slot, &mut m).map_err(|e| {
            e.prefixed(format!("Lost persistent bitmaps during inactivation of node '{}'", self.file.name()))
        })
    }

    /// Runs a bitmap change with the recording stored first and the watch flag refreshed after.
    fn change_bitmaps<R>(&self, f: impl FnOnce(&Self, &mut Meta) -> Result<R>) -> Result<R> {
        self.check_writable()?;
        let mut slot = self.recording();
        let mut m = self.lock();
        self.store_recorded(&mut slot, &mut m)?;
        let r = f(self, &mut m);
        self.refresh_bitmap_watch(&m);
        r
    }

    /// qemu's checks before a new persistent bitmap is added, with its messages.
    fn can_store_new(&self, m: &Meta, entries: &[BitmapEntry], name: &str, granularity: u64) -> Result<()> {
        if entries.iter().any(|e| e.name == name) {
            return Err(Error::invalid_argument(format!("Bitmap already exists: {name}")));
        }
        let why = (|| {
            if m.h.version < 3 {
                return Err(Error::unsupported("Cannot store dirty bitmaps in qcow2 v2 files"));
            }
            check_new(name, granularity, m.h.size, m.cluster_size())?;
            if entries.len() as u64 + 1 > MAX_BITMAPS as u64 {
                return Err(Error::invalid_argument("Maximum number of persistent bitmaps is already reached"));
            }
            let dir: u64 = entries.iter().map(|e| e.encoded_len()).sum::<u64>() + entry_size(name.len());
            if dir > MAX_BITMAP_DIRECTORY_SIZE {
                return Err(Error::invalid_argument("Not enough space in the bitmap directory"));
            }
            Ok(())
        })();
        why.map_err(|e| e.prefixed(format!("Can't make bitmap '{name}' persistent in '{}'", self.file.name())))
    }

    /// Loads every bitmap before a resize (all must be consistent), to store them resized after.
    pub(crate) fn bitmaps_before_resize(&self) -> Result<Vec<DirtyBitmap>> {
        let mut slot = self.recording();
        let mut m = self.lock();
        if m.bitmaps.is_empty() {
            return Ok(Vec::new());
        }
        self.store_recorded(&mut slot, &mut m)?;
        let io = self.file.as_ref();
        let list = m.bitmaps.clone();
        list.iter().map(|e| m.load_bitmap(io, e)).collect()
    }

    /// Stores the bitmaps loaded by [`Self::bitmaps_before_resize`] at the new disk size.
    pub(crate) fn bitmaps_after_resize(&self, before: Vec<DirtyBitmap>) -> Result<()> {
        if before.is_empty() {
            return Ok(());
        }
        let _slot = self.recording();
        let mut m = self.lock();
        let size = m.h.size;
        let mut contents = HashMap::new();
        for (e, bits) in m.bitmaps.iter().zip(&before) {
            contents.insert(e.name.clone(), bits.resized(size)?);
        }
        let entries = m.bitmaps.clone();
        self.commit_bitmaps(&mut m, entries, contents)
    }
}

/// The bitmaps as the changes of one [`PersistentBitmaps::apply`] call leave them, before they
/// are stored: the directory entries, and the content of every bitmap a change touched.
struct Working {
    entries: Vec<BitmapEntry>,
    contents: HashMap<String, DirtyBitmap>,
}

impl Working {
    /// Finds a consistent bitmap by name.
    fn usable(&self, name: &str) -> Result<usize> {
        let i = self.entries.iter().position(|e| e.name == name).ok_or_else(|| not_found(name))?;
        if self.entries[i].in_use() {
            return Err(inconsistent(name));
        }
        Ok(i)
    }

    /// The current content of the consistent bitmap `i`.
    fn bits(&self, q: &Qcow2, m: &Meta, i: usize) -> Result<DirtyBitmap> {
        match self.contents.get(&self.entries[i].name) {
            Some(b) => Ok(b.clone()),
            None => m.load_bitmap(q.file.as_ref(), &self.entries[i]),
        }
    }
}

impl Qcow2 {
    /// Makes one change to the working state (removing a bitmap that is on disk happens on disk
    /// at once, as in qemu).
    fn apply_one(&self, m: &mut Meta, w: &mut Working, c: &BitmapChange<'_>) -> Result<()> {
        match *c {
            BitmapChange::Add { name, granularity, enabled } => {
                if name.is_empty() {
                    return Err(Error::invalid_argument("Bitmap name cannot be empty"));
                }
                if let Some(g) = granularity {
                    if g < MIN_GRANULARITY || !g.is_power_of_two() {
                        return Err(Error::invalid_argument("Granularity must be power of 2 and at least 512"));
                    }
                }
                let g = granularity.unwrap_or_else(|| self.default_granularity());
                self.can_store_new(m, &w.entries, name, g)?;
                w.contents.insert(name.to_string(), DirtyBitmap::new(g, m.h.size)?);
                w.entries.push(BitmapEntry {
                    table_offset: 0,
                    table_size: 0,
                    flags: if enabled { FLAG_AUTO } else { 0 },
                    granularity_bits: g.trailing_zeros() as u8,
                    name: name.to_string(),
                });
            }
            BitmapChange::Remove(name) => {
                let i = w.entries.iter().position(|e| e.name == name).ok_or_else(|| not_found(name))?;
                w.entries.remove(i);
                w.contents.remove(name);
                if let Some(j) = m.bitmaps.iter().position(|e| e.name == name) {
                    let io = self.file.as_ref();
                    let mut on_disk = m.bitmaps.clone();
                    let gone = on_disk.remove(j);
                    m.write_bitmap_directory(io, on_disk)?;
                    // A table that cannot be read leaks its data clusters; the table still goes.
                    if m.free_bitmap_clusters(io, &gone).is_err() {
                        let cs = m.cluster_size();
                        m.queue_free(gone.table_offset, (gone.table_size as u64 * 8).div_ceil(cs), false);
                    }
                    m.flush(io)?;
                }
            }
            BitmapChange::Clear(name) => {
                let i = w.usable(name)?;
                let empty = DirtyBitmap::new(w.entries[i].granularity(), m.h.size)?;
                w.contents.insert(name.to_string(), empty);
            }
            BitmapChange::SetEnabled(name, enabled) => {
                let i = w.usable(name)?;
                if enabled {
                    w.entries[i].flags |= FLAG_AUTO;
                } else {
                    w.entries[i].flags &= !FLAG_AUTO;
                }
            }
            BitmapChange::Merge { name, from } => {
                let i = w.usable(name)?;
                let src = match from {
                    MergeSource::Bits(b) => b.clone(),
                    MergeSource::Bitmap(other) => {
                        let j = w.usable(other)?;
                        w.bits(self, m, j)?
                    }
                    MergeSource::Image(img, other) => img.read(other)?,
                };
                let mut bits = w.bits(self, m, i)?;
                bits.merge(&src)?;
                w.contents.insert(name.to_string(), bits);
            }
        }
        Ok(())
    }

    /// Removes every bitmap and frees its clusters (downgrade to version 2).
    pub(crate) fn drop_bitmaps(&self, m: &mut Meta) -> Result<()> {
        if m.exts.bitmaps.is_none() {
            return Ok(());
        }
        // (A recording still held is dropped at its store: its bitmaps are gone from the list.)
        let io = self.file.as_ref();
        let list = m.bitmaps.clone();
        m.write_bitmap_directory(io, Vec::new())?;
        for e in &list {
            m.free_bitmap_clusters(io, e)?;
        }
        self.refresh_bitmap_watch(m);
        m.flush(io)
    }
}

impl PersistentBitmaps for Qcow2 {
    fn supported(&self) -> bool {
        self.lock().h.version >= 3
    }

    fn list(&self) -> Result<Vec<BitmapInfo>> {
        let m = self.lock();
        Ok(m.bitmaps
            .iter()
            .map(|e| BitmapInfo {
                name: e.name.clone(),
                granularity: e.granularity(),
                enabled: e.auto(),
                in_use: e.in_use(),
            })
            .collect())
    }

    fn default_granularity(&self) -> u64 {
        self.cluster_size().clamp(4096, 65536)
    }

    fn apply(&self, changes: &[BitmapChange<'_>]) -> std::result::Result<(), (usize, Error)> {
        let r = self.change_bitmaps(|q, m| {
            let mut w = Working { entries: m.bitmaps.clone(), contents: HashMap::new() };
            let mut failed = None;
            for (i, c) in changes.iter().enumerate() {
                if let Err(e) = q.apply_one(m, &mut w, c) {
                    failed = Some((i, e));
                    break;
                }
            }
            // What succeeded is stored either way, and like qemu (which stores every bitmap it
            // loaded when it closes the image) every consistent bitmap is written anew.
            let store = w.entries != m.bitmaps || w.entries.iter().any(|e| !e.in_use());
            let stored = if store { q.commit_bitmaps(m, w.entries, w.contents) } else { Ok(()) };
            Ok(match (failed, stored) {
                (Some(f), _) => Err(f),
                (None, Err(e)) => Err((changes.len().saturating_sub(1), e)),
                (None, Ok(())) => Ok(()),
            })
        });
        r.map_err(|e| (0, e))?
    }

    fn read(&self, name: &str) -> Result<DirtyBitmap> {
        let slot = self.recording();
        if let Some(r) = slot.iter().flatten().find(|r| r.name == name) {
            return Ok(r.bits.clone());
        }
        let m = self.lock();
        let w = Working { entries: m.bitmaps.clone(), contents: HashMap::new() };
        let i = w.usable(name)?;
        w.bits(self, &m, i)
    }

    fn mark_dirty(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.note_change(offset, len)
    }
}
