//! The bitmap operations ([`PersistentBitmaps`] for [`Qcow2`]) and the recording of guest writes
//! into enabled bitmaps.
//!
//! Locks: the recording mutex is taken before the metadata lock, never after it. Guest writes
//! note their range before they change anything (so a write is never missing from a bitmap that
//! is later stored), outside the metadata lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use blockdev::bitmap::{BitmapChange, BitmapInfo, DirtyBitmap, MergeSource, PersistentBitmaps, MIN_GRANULARITY};
use blockdev::{Error, Result};

use crate::bitmap::dir::{check_new, entry_size, BitmapEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::bitmap::store::inconsistent;
use crate::driver::Qcow2;
use crate::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE, MAX_RECORDED_RANGES};
use crate::meta::Meta;

/// What the enabled bitmaps (marked in use on disk meanwhile) have to record: the guest ranges
/// changed since recording began, merged. Memory follows the guest's writes, not the bitmaps'
/// sizes: past [`MAX_RECORDED_RANGES`] separate ranges the recording is stored and starts over.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    /// The bitmaps recording (enabled and consistent when recording began).
    names: Vec<String>,
    /// start -> end of each changed range; ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl Recording {
    /// Adds `[start, end)`, merging it with the ranges it overlaps or touches.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Sets the recorded ranges in `bits` if `name` is recording.
    fn apply_to(&self, name: &str, bits: &mut DirtyBitmap) {
        if self.names.iter().any(|n| n == name) {
            for (&s, &e) in &self.ranges {
                bits.set_range(s, e - s);
            }
        }
    }
}

/// What is recording now: `None` until the first guest write after open or after the last store.
pub(crate) type RecordingSlot = Option<Recording>;

/// Whether any bitmap would record writes (enabled and consistent, in an image open for writing).
fn any_recording(m: &Meta) -> bool {
    m.writable && m.bitmaps.iter().any(|e| e.auto() && !e.in_use())
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
            if started.names.is_empty() {
                self.refresh_bitmap_watch(&m);
                return Ok(());
            }
            *slot = Some(started);
        }
        let Some(r) = slot.as_mut() else { return Ok(()) };
        r.insert(offset, offset.saturating_add(len));
        if r.ranges.len() > MAX_RECORDED_RANGES {
            let mut m = self.lock();
            self.store_recorded(&mut slot, &mut m)?;
        }
        Ok(())
    }

    /// Marks the enabled bitmaps in use on disk (after checking their tables can be read back).
    fn start_recording(&self, m: &mut Meta) -> Result<Recording> {
        let io = self.file.as_ref();
        let mut entries = m.bitmaps.clone();
        let mut out = Recording::default();
        for e in entries.iter_mut().filter(|e| e.auto() && !e.in_use()) {
            m.check_bitmap_table(io, e)?;
            out.names.push(e.name.clone());
            e.flags |= FLAG_IN_USE;
        }
        if !out.names.is_empty() {
            m.write_bitmap_directory(io, entries)?;
        }
        Ok(out)
    }

    /// Stores what the enabled bitmaps recorded and clears their in-use mark (close, and before
    /// every bitmap operation). On error they stay marked in use: inconsistent, not wrong.
    pub(crate) fn store_recorded(&self, slot: &mut RecordingSlot, m: &mut Meta) -> Result<()> {
        let Some(rec) = slot.take() else { return Ok(()) };
        let mut entries = m.bitmaps.clone();
        let mut any = false;
        for e in entries.iter_mut().filter(|e| rec.names.contains(&e.name)) {
            e.flags &= !FLAG_IN_USE;
            any = true;
        }
        if !any {
            return Ok(());
        }
        self.commit_bitmaps(m, entries, HashMap::new(), Some(&rec), None)
    }

    /// Writes `entries` as the bitmaps, the way qemu stores them when it closes an image: every
    /// consistent bitmap, in directory order, gets its content (from `contents`, else as stored
    /// now, loaded one at a time; plus what `recorded` holds for it; loaded at `resized_from` and
    /// carried to the current disk size after a resize) written to new clusters; then the new
    /// directory goes in (see `store.rs` for the order); then the old tables and data are freed.
    /// Entries new to the image carry a zero table offset and must have their content in
    /// `contents`.
    fn commit_bitmaps(
        &self,
        m: &mut Meta,
        mut entries: Vec<BitmapEntry>,
        mut contents: HashMap<String, DirtyBitmap>,
        recorded: Option<&Recording>,
        resized_from: Option<u64>,
    ) -> Result<()> {
        let io = self.file.as_ref();
        let mut old = Vec::new();
        let mut stored: Vec<BitmapEntry> = Vec::new();
        let r = (|| {
            for e in entries.iter_mut().filter(|e| !e.in_use()) {
                let mut bits = match (contents.remove(&e.name), resized_from) {
                    (Some(b), _) => b,
                    (None, None) => m.load_bitmap(io, e, m.h.size)?,
                    (None, Some(was)) => m.load_bitmap(io, e, was)?.resized(m.h.size)?,
                };
                if let Some(rec) = recorded {
                    rec.apply_to(&e.name, &mut bits);
                }
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

    /// Before a resize: stores what is recording and refuses inconsistent bitmaps (as qemu
    /// does); returns the size the bitmaps cover now, if there are any.
    pub(crate) fn bitmaps_before_resize(&self) -> Result<Option<u64>> {
        let mut slot = self.recording();
        let mut m = self.lock();
        if m.bitmaps.is_empty() {
            return Ok(None);
        }
        self.store_recorded(&mut slot, &mut m)?;
        if let Some(e) = m.bitmaps.iter().find(|e| e.in_use()) {
            return Err(inconsistent(&e.name));
        }
        Ok(Some(m.h.size))
    }

    /// After a resize from `old_size`: stores every bitmap at the new disk size (one at a time).
    pub(crate) fn bitmaps_after_resize(&self, old_size: Option<u64>) -> Result<()> {
        let Some(was) = old_size else { return Ok(()) };
        let _slot = self.recording();
        let mut m = self.lock();
        let entries = m.bitmaps.clone();
        self.commit_bitmaps(&mut m, entries, HashMap::new(), None, Some(was))
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
            None => m.load_bitmap(q.file.as_ref(), &self.entries[i], m.h.size),
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
                        m.queue_free(
                            gone.table_offset,
                            (gone.table_size as u64 * 8).div_ceil(cs),
                            crate::discard::DiscardKind::Always,
                        );
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
            let stored = if store { q.commit_bitmaps(m, w.entries, w.contents, None, None) } else { Ok(()) };
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
        let m = self.lock();
        if let Some(rec) = slot.as_ref().filter(|r| r.names.iter().any(|n| n == name)) {
            // Marked in use on disk only because it is recording here: what it stored plus
            // what it recorded since.
            let e = m.bitmaps.iter().find(|e| e.name == name).ok_or_else(|| not_found(name))?;
            let stored = BitmapEntry { flags: e.flags & !FLAG_IN_USE, ..e.clone() };
            let mut bits = m.load_bitmap(self.file.as_ref(), &stored, m.h.size)?;
            rec.apply_to(name, &mut bits);
            return Ok(bits);
        }
        let w = Working { entries: m.bitmaps.clone(), contents: HashMap::new() };
        let i = w.usable(name)?;
        w.bits(self, &m, i)
    }

    fn mark_dirty(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.note_change(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(r: &Recording) -> Vec<(u64, u64)> {
        r.ranges.iter().map(|(&s, &e)| (s, e)).collect()
    }

    #[test]
    fn recorded_ranges_merge_when_they_overlap_or_touch() {
        let mut r = Recording { names: vec!["b".into()], ..Recording::default() };
        r.insert(100, 200);
        r.insert(300, 400);
        r.insert(500, 600);
        assert_eq!(ranges(&r), [(100, 200), (300, 400), (500, 600)]);
        r.insert(200, 300);
        assert_eq!(ranges(&r), [(100, 400), (500, 600)]);
        r.insert(50, 550);
        assert_eq!(ranges(&r), [(50, 600)]);
        r.insert(60, 70);
        r.insert(700, 700);
        assert_eq!(ranges(&r), [(50, 600), (700, 700)]);
        let mut bits = DirtyBitmap::new(512, 4096).unwrap();
        r.apply_to("other", &mut bits);
        assert!(bits.is_empty());
        r.apply_to("b", &mut bits);
        assert_eq!(bits.dirty_ranges().collect::<Vec<_>>(), [(0, 1024)]);
    }
}
