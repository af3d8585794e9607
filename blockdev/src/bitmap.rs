//! Persistent dirty bitmaps: what a format that stores them offers ([`PersistentBitmaps`]), and
//! the in-memory form of one bitmap's content ([`DirtyBitmap`]).
//!
//! A dirty bitmap has one bit per `granularity` bytes of the disk; a set bit means that range was
//! written while the bitmap was enabled. Incremental backup reads a bitmap, copies the ranges it
//! marks, and clears it. A bitmap whose image was not closed cleanly is *in use* (inconsistent):
//! it can only be listed and removed.

use crate::{Error, Result};

/// Smallest granularity a bitmap may have (one 512-byte sector per bit).
pub const MIN_GRANULARITY: u64 = 512;

/// One persistent bitmap as the image lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name (unique in the image).
    pub name: String,
    /// Bytes of disk per bit.
    pub granularity: u64,
    /// Whether it records writes (qcow2's `auto` flag).
    pub enabled: bool,
    /// Whether it was not saved cleanly and may be wrong (qcow2's `in_use` flag).
    pub in_use: bool,
}

/// A bitmap's content: bit `i` covers disk bytes `[i * granularity, (i + 1) * granularity)` of a
/// disk of `size` bytes. Bits past the disk's end are always clear.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    /// Bit `i` is bit `i % 8` (least significant first) of byte `i / 8`: qcow2's on-disk order.
    bytes: Vec<u8>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("granularity", &self.granularity)
            .field("size", &self.size)
            .field("dirty_bytes", &self.dirty_bytes())
            .finish()
    }
}

impl DirtyBitmap {
    /// An empty bitmap over a disk of `size` bytes. `granularity` must be a power of two of at
    /// least [`MIN_GRANULARITY`]; the caller bounds `size / granularity` (the bits are allocated).
    pub fn new(granularity: u64, size: u64) -> Result<DirtyBitmap> {
        if granularity < MIN_GRANULARITY || !granularity.is_power_of_two() {
            return Err(Error::invalid_argument("Granularity must be power of 2 and at least 512"));
        }
        let bytes = Self::bytes_needed(granularity, size);
        let bytes = usize::try_from(bytes).map_err(|_| Error::invalid_argument("Bitmap is too big"))?;
        Ok(DirtyBitmap { granularity, size, bytes: vec![0; bytes] })
    }

    /// Bytes of bit data a bitmap over `size` bytes at `granularity` needs.
    pub fn bytes_needed(granularity: u64, size: u64) -> u64 {
        size.div_ceil(granularity).div_ceil(8)
    }

    /// Bytes of disk per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The disk size the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bits in on-disk order (see the struct docs).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Sets the bits from on-disk bytes starting at byte `at` of the bit data; bits past the
    /// disk's end are ignored.
    pub fn load_bytes(&mut self, at: usize, data: &[u8]) {
        if at >= self.bytes.len() {
            return;
        }
        let n = data.len().min(self.bytes.len() - at);
        self.bytes[at..at + n].copy_from_slice(&data[..n]);
        self.clear_tail();
    }

    /// Sets every bit of bytes `[at, at + len)` of the bit data (an all-ones cluster).
    pub fn fill_bytes(&mut self, at: usize, len: usize) {
        if at >= self.bytes.len() {
            return;
        }
        let end = (at + len).min(self.bytes.len());
        self.bytes[at..end].fill(0xff);
        self.clear_tail();
    }

    /// Clears the bits past the disk's end in the last byte.
    fn clear_tail(&mut self) {
        let bits = self.size.div_ceil(self.granularity);
        let used = (bits % 8) as u32;
        if used != 0 {
            if let Some(last) = self.bytes.last_mut() {
                *last &= (1u8 << used) - 1;
            }
        }
    }

    /// Marks `[offset, offset + len)` dirty (clipped to the disk).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        let mut bit = first;
        while bit <= last {
            if bit % 8 == 0 && last - bit >= 7 {
                let whole = ((last - bit + 1) / 8) as usize;
                let at = (bit / 8) as usize;
                self.bytes[at..at + whole].fill(0xff);
                bit += whole as u64 * 8;
            } else {
                self.bytes[(bit / 8) as usize] |= 1 << (bit % 8);
                bit += 1;
            }
        }
    }

    /// Marks the whole disk dirty.
    pub fn set_all(&mut self) {
        self.bytes.fill(0xff);
        self.clear_tail();
    }

    /// Whether the bit covering disk byte `offset` is set.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let bit = offset / self.granularity;
        self.bytes[(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.bytes.fill(0);
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.bytes.iter().all(|&b| b == 0)
    }

    /// Disk bytes the set bits cover (the last bit counts only up to the disk's end).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().map(|(o, l)| l.min(self.size - o)).sum()
    }

    /// The dirty ranges `(offset, len)` in disk order, each as long as possible; the last may end
    /// at the disk's end.
    pub fn dirty_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let bits = self.size.div_ceil(self.granularity);
        let g = self.granularity;
        let mut bit = 0u64;
        std::iter::from_fn(move || {
            let start = self.next_bit(bit, bits, true)?;
            let end = self.next_bit(start, bits, false).unwrap_or(bits);
            bit = end;
            Some((start * g, ((end * g).min(self.size)) - start * g))
        })
    }

    /// The first bit at or after `from` (below `bits`) whose value is `set`.
    fn next_bit(&self, from: u64, bits: u64, set: bool) -> Option<u64> {
        let skip = if set { 0u8 } else { 0xff };
        let mut bit = from;
        while bit < bits {
            let byte = self.bytes[(bit / 8) as usize];
            if bit % 8 == 0 && byte == skip {
                bit += 8;
                continue;
            }
            if (byte & (1 << (bit % 8)) != 0) == set {
                return Some(bit);
            }
            bit += 1;
        }
        None
    }

    /// Sets every bit that is set in `other`, which must cover the same disk size. Bitmaps of
    /// different granularity merge range by range.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<()> {
        if other.size != self.size {
            return Err(Error::invalid_argument(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                self.size, other.size
            )));
        }
        if other.granularity == self.granularity {
            for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
                *a |= b;
            }
        } else {
            let ranges: Vec<_> = other.dirty_ranges().collect();
            for (o, l) in ranges {
                self.set_range(o, l);
            }
        }
        Ok(())
    }

    /// The same dirty ranges over a disk of `size` bytes (grown: the new part is clean; shrunk:
    /// bits past the new end are dropped).
    pub fn resized(&self, size: u64) -> Result<DirtyBitmap> {
        let mut new = DirtyBitmap::new(self.granularity, size)?;
        let n = new.bytes.len().min(self.bytes.len());
        new.bytes[..n].copy_from_slice(&self.bytes[..n]);
        new.clear_tail();
        Ok(new)
    }
}

/// One change to an image's bitmaps, for [`PersistentBitmaps::apply`].
#[derive(Debug, Clone, Copy)]
pub enum BitmapChange<'a> {
    /// Add an empty bitmap (granularity `None`: the image's default).
    Add {
        /// Its name.
        name: &'a str,
        /// Bytes of disk per bit.
        granularity: Option<u64>,
        /// Whether it records writes.
        enabled: bool,
    },
    /// Remove a bitmap (also an inconsistent one).
    Remove(&'a str),
    /// Clear every bit.
    Clear(&'a str),
    /// Enable or disable recording.
    SetEnabled(&'a str, bool),
    /// Set in bitmap `name` every bit set in `from`.
    Merge {
        /// The bitmap that receives the bits.
        name: &'a str,
        /// Where the bits come from.
        from: MergeSource<'a>,
    },
}

/// Where the bits of a [`BitmapChange::Merge`] come from.
#[derive(Debug, Clone, Copy)]
pub enum MergeSource<'a> {
    /// Another bitmap of the same image, as the earlier changes of the same call left it.
    Bitmap(&'a str),
    /// Bits read elsewhere.
    Bits(&'a DirtyBitmap),
    /// A bitmap of another image, read when the change is made (after the destination is
    /// checked, so errors come in qemu's order).
    Image(&'a dyn PersistentBitmaps, &'a str),
}

impl std::fmt::Debug for dyn PersistentBitmaps + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PersistentBitmaps")
    }
}

/// Persistent dirty bitmaps stored in an image (qcow2). Every change is on disk when the call
/// returns, except the recording of guest writes by enabled bitmaps, which the format keeps in
/// memory while the image is open for writing and stores when it is closed (until then the
/// bitmaps it records into are marked in use on disk, so a crash leaves them inconsistent, never
/// silently wrong).
pub trait PersistentBitmaps {
    /// Whether this image can hold bitmaps at all (qcow2: version 3; a version 2 image answers
    /// the other calls, but adding fails).
    fn supported(&self) -> bool;

    /// The bitmaps, in the image's order.
    fn list(&self) -> Result<Vec<BitmapInfo>>;

    /// The granularity a new bitmap gets when none is given (qemu: the cluster size, within
    /// 4 KiB to 64 KiB).
    fn default_granularity(&self) -> u64;

    /// Makes `changes` in order, then stores the result once (as `qemu-img bitmap` does with
    /// several actions). It stops at the first change that fails and returns its error with its
    /// index; the changes before it are stored all the same.
    fn apply(&self, changes: &[BitmapChange<'_>]) -> std::result::Result<(), (usize, Error)>;

    /// Adds an empty bitmap called `name`; `granularity` defaults to
    /// [`PersistentBitmaps::default_granularity`]. `enabled` bitmaps record later writes.
    fn add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.apply(&[BitmapChange::Add { name, granularity, enabled }]).map_err(|e| e.1)
    }

    /// Removes the bitmap called `name` (also an inconsistent one) and frees its clusters.
    fn remove(&self, name: &str) -> Result<()> {
        self.apply(&[BitmapChange::Remove(name)]).map_err(|e| e.1)
    }

    /// Clears every bit of `name`.
    fn clear(&self, name: &str) -> Result<()> {
        self.apply(&[BitmapChange::Clear(name)]).map_err(|e| e.1)
    }

    /// Enables or disables recording of writes into `name`.
    fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.apply(&[BitmapChange::SetEnabled(name, enabled)]).map_err(|e| e.1)
    }

    /// The content of `name` (which must be consistent), including writes recorded so far in
    /// this open.
    fn read(&self, name: &str) -> Result<DirtyBitmap>;

    /// Sets in `name` every bit set in `src` (`bitmap --merge`); `src` must cover the same size.
    fn merge(&self, name: &str, src: &DirtyBitmap) -> Result<()> {
        self.apply(&[BitmapChange::Merge { name, from: MergeSource::Bits(src) }]).map_err(|e| e.1)
    }

    /// Marks `[offset, offset + len)` dirty in every enabled bitmap, as a guest write there
    /// would. For changes the format does not see itself (a VMM that writes around the driver).
    fn mark_dirty(&self, offset: u64, len: u64) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip_and_clip_to_the_disk() {
        let mut b = DirtyBitmap::new(512, 10 * 512 + 100).unwrap();
        assert_eq!(b.as_bytes().len(), 2);
        b.set_range(0, 1);
        b.set_range(3 * 512 + 5, 512);
        b.set_range(10 * 512, 1 << 20);
        assert_eq!(b.dirty_ranges().collect::<Vec<_>>(), vec![(0, 512), (1536, 1024), (5120, 100)]);
        assert_eq!(b.dirty_bytes(), 512 + 1024 + 100);
        assert!(b.is_dirty(3 * 512) && b.is_dirty(4 * 512 + 511) && !b.is_dirty(5 * 512));
        assert!(!b.is_dirty(1 << 30));
    }

    #[test]
    fn whole_bytes_are_filled_at_once_and_the_tail_stays_clear() {
        let mut b = DirtyBitmap::new(4096, 100 * 4096).unwrap();
        b.set_range(4096, 98 * 4096);
        assert_eq!(b.dirty_ranges().collect::<Vec<_>>(), vec![(4096, 98 * 4096)]);
        b.set_all();
        assert_eq!(b.as_bytes()[12], 0x0f, "bits 96..99 only");
        assert_eq!(b.dirty_bytes(), 100 * 4096);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn merge_needs_equal_sizes_and_handles_other_granularities() {
        let mut a = DirtyBitmap::new(65536, 1 << 20).unwrap();
        let mut b = DirtyBitmap::new(512, 1 << 20).unwrap();
        b.set_range(70000, 10);
        a.merge(&b).unwrap();
        assert_eq!(a.dirty_ranges().collect::<Vec<_>>(), vec![(65536, 65536)]);
        let c = DirtyBitmap::new(65536, 2 << 20).unwrap();
        let e = a.merge(&c).unwrap_err();
        assert!(e.message().contains("destination size is 1048576, source size is 2097152"), "{e}");
    }

    #[test]
    fn resize_keeps_bits_inside_the_new_size() {
        let mut a = DirtyBitmap::new(512, 8192).unwrap();
        a.set_range(0, 8192);
        let s = a.resized(1000).unwrap();
        assert_eq!(s.dirty_ranges().collect::<Vec<_>>(), vec![(0, 1000)]);
        let g = s.resized(8192).unwrap();
        assert_eq!(g.dirty_ranges().collect::<Vec<_>>(), vec![(0, 1024)]);
        assert!(DirtyBitmap::new(1000, 1).is_err());
    }
}
