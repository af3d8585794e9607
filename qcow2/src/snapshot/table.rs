//! The snapshot table: decoding with every field checked, and encoding.
//!
//! Each entry is a 40-byte fixed part, extra data (vdisk knows the first 24 bytes: the 64-bit VM
//! state size, the disk size and the instruction count; anything after them is kept as it is and
//! written back), the id and the name. Entries start on 8-byte boundaries. Reading is bounded:
//! extra data over [`MAX_SNAPSHOT_EXTRA_DATA`] and tables over [`MAX_SNAPSHOT_TABLE_BYTES`] are
//! refused, or with `repair` trimmed the way `check -r all` trims them.

use blockdev::{read_exact_at, Error, Result, Storage};

use crate::cache::get_u64;
use crate::limits::{MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES};

/// Size of an entry's fixed part.
pub const ENTRY_HEADER_SIZE: u64 = 40;
/// Size of the extra data vdisk understands (and writes for every entry).
pub const KNOWN_EXTRA_SIZE: u32 = 24;
/// Extra data size every version 3 entry must have (VM state size and disk size).
pub const V3_MIN_EXTRA_SIZE: u32 = 16;
/// The instruction count of a snapshot taken without one.
pub const NO_ICOUNT: u64 = u64::MAX;

/// One internal snapshot as the table describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id (decimal by convention).
    pub id: String,
    /// The tag.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state.
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count, or [`NO_ICOUNT`].
    pub icount: u64,
    /// Extra data size as found (what `check` judges); written as at least [`KNOWN_EXTRA_SIZE`].
    pub extra_data_size: u32,
    /// Extra data after the known fields, preserved byte for byte.
    pub unknown_extra: Vec<u8>,
}

impl SnapshotEntry {
    /// Bytes this entry takes when written (without the padding before the next entry).
    pub fn encoded_len(&self) -> u64 {
        ENTRY_HEADER_SIZE
            + self.extra_data_size.max(KNOWN_EXTRA_SIZE) as u64
            + self.id.len() as u64
            + self.name.len() as u64
    }
}

/// A table as read, with what a repairing read had to drop.
#[derive(Debug, Default)]
pub struct ReadTable {
    /// The entries kept.
    pub entries: Vec<SnapshotEntry>,
    /// Bytes the kept entries occupy on disk (from the table offset to the end of the last one).
    pub size: u64,
    /// Entries dropped off the end because the table was too big (repair only).
    pub dropped_entries: u32,
    /// Entries whose extra data was trimmed (repair only).
    pub trimmed_extra: u32,
}

/// Reads `nb` entries at `offset`. `disk_size` is the size recorded for entries without one.
/// With `repair`, what is over the limits is dropped with qemu's messages on `report` instead
/// of failing.
pub fn read_table(
    io: &dyn Storage,
    offset: u64,
    nb: u32,
    disk_size: u64,
    repair: bool,
    report: &mut dyn FnMut(&str),
) -> Result<ReadTable> {
    let mut out = ReadTable::default();
    let mut pos = offset;
    let mut table_len = 0u64;
    let failed = |e: Error| e.prefixed("Failed to read snapshot table");
    for i in 0..nb {
        let entry_start = pos;
        table_len = table_len.div_ceil(8) * 8;
        pos = pos.div_ceil(8) * 8;
        let mut h = [0u8; ENTRY_HEADER_SIZE as usize];
        read_exact_at(io, pos, &mut h).map_err(failed)?;
        pos += ENTRY_HEADER_SIZE;
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let id_len = u16::from_be_bytes([h[12], h[13]]) as u64;
        let name_len = u16::from_be_bytes([h[14], h[15]]) as u64;
        let mut sn = SnapshotEntry {
            l1_offset: get_u64(&h, 0),
            l1_size: be32(8),
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: get_u64(&h, 3),
            vm_state_size: be32(32) as u64,
            extra_data_size: be32(36),
            icount: NO_ICOUNT,
            disk_size,
            ..SnapshotEntry::default()
        };
        let stored_extra = sn.extra_data_size as u64;
        if stored_extra > MAX_SNAPSHOT_EXTRA_DATA {
            if !repair {
                return Err(Error::from_errno("open", libc::EFBIG).with_message(format!(
                    "Too much extra metadata in snapshot table entry {i}\nYou can force-remove this extra metadata \
                     with qemu-img check -r all"
                )));
            }
            report(&format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({stored_extra} > {MAX_SNAPSHOT_EXTRA_DATA})"
            ));
            out.trimmed_extra += 1;
            sn.extra_data_size = MAX_SNAPSHOT_EXTRA_DATA as u32;
        }
        // Known extra data, then unknown extra data, then the id and the name.
        let kept_extra = sn.extra_data_size as usize;
        let mut extra = vec![0u8; kept_extra];
        read_exact_at(io, pos, &mut extra).map_err(failed)?;
        if kept_extra >= 8 {
            sn.vm_state_size = get_u64(&extra, 0);
        }
        if kept_extra >= 16 {
            sn.disk_size = get_u64(&extra, 1);
        }
        if kept_extra >= 24 {
            sn.icount = get_u64(&extra, 2);
        }
        if kept_extra > KNOWN_EXTRA_SIZE as usize {
            sn.unknown_extra = extra[KNOWN_EXTRA_SIZE as usize..].to_vec();
        }
        pos += stored_extra;
        let mut names = vec![0u8; (id_len + name_len) as usize];
        read_exact_at(io, pos, &mut names).map_err(failed)?;
        pos += id_len + name_len;
        sn.id = c_string(&names[..id_len as usize]);
        sn.name = c_string(&names[id_len as usize..]);
        table_len += ENTRY_HEADER_SIZE + sn.extra_data_size as u64 + id_len + name_len;
        if table_len > MAX_SNAPSHOT_TABLE_BYTES || pos - offset > i32::MAX as u64 {
            let over = nb - i;
            if !repair {
                return Err(Error::from_errno("open", libc::EFBIG).with_message(format!(
                    "Snapshot table is too big\nYou can force-remove all {over} overhanging snapshots with qemu-img \
                     check -r all"
                )));
            }
            report(&format!("Discarding {over} overhanging snapshots (snapshot table is too big)"));
            out.dropped_entries += over;
            pos = entry_start;
            break;
        }
        out.entries.push(sn);
    }
    out.size = pos - offset;
    Ok(out)
}

/// Bytes up to the first NUL, as a C string ends (lossy for non-UTF-8 names, and cut back to
/// what the 16-bit length field can record should the replacement characters make it longer).
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let mut s = String::from_utf8_lossy(&b[..end]).into_owned();
    truncate_at_char(&mut s, u16::MAX as usize);
    s
}

/// Cuts `s` to at most `max` bytes without splitting a character.
pub fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

/// Bytes the table takes when written.
pub fn encoded_size(entries: &[SnapshotEntry]) -> u64 {
    entries.iter().fold(0u64, |at, sn| at.div_ceil(8) * 8 + sn.encoded_len())
}

/// Encodes the table (entries 8-byte aligned; the known extra data is always written).
pub fn encode_table(entries: &[SnapshotEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(encoded_size(entries) as usize);
    for sn in entries {
        // (Entries come from `read_table` or from callers that keep names short: their lengths
        // fit the 16-bit fields.)
        debug_assert!(sn.id.len() <= u16::MAX as usize && sn.name.len() <= u16::MAX as usize);
        b.resize(b.len().div_ceil(8) * 8, 0);
        let extra_size = sn.extra_data_size.max(KNOWN_EXTRA_SIZE);
        b.extend_from_slice(&sn.l1_offset.to_be_bytes());
        b.extend_from_slice(&sn.l1_size.to_be_bytes());
        b.extend_from_slice(&(sn.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(sn.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&sn.date_sec.to_be_bytes());
        b.extend_from_slice(&sn.date_nsec.to_be_bytes());
        b.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
        // A VM state too large for 32 bits is recorded as none there, so that readers that only
        // know this field see a disk-only snapshot instead of a truncated state.
        let small = u32::try_from(sn.vm_state_size).unwrap_or(0);
        b.extend_from_slice(&small.to_be_bytes());
        b.extend_from_slice(&extra_size.to_be_bytes());
        b.extend_from_slice(&sn.vm_state_size.to_be_bytes());
        b.extend_from_slice(&sn.disk_size.to_be_bytes());
        b.extend_from_slice(&sn.icount.to_be_bytes());
        let unknown = (extra_size - KNOWN_EXTRA_SIZE) as usize;
        let start = b.len();
        b.extend_from_slice(&sn.unknown_extra[..unknown.min(sn.unknown_extra.len())]);
        b.resize(start + unknown, 0);
        b.extend_from_slice(sn.id.as_bytes());
        b.extend_from_slice(sn.name.as_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemStorage;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_offset: 0x30000,
            l1_size: 2,
            id: id.into(),
            name: name.into(),
            date_sec: 7,
            date_nsec: 8,
            vm_clock_nsec: 9,
            vm_state_size: 5 << 32,
            disk_size: 1 << 30,
            icount: 3,
            extra_data_size: 30,
            unknown_extra: b"abcdef".to_vec(),
        }
    }

    #[test]
    fn table_round_trips_with_unknown_extra_data_and_large_vm_state() {
        let table = vec![entry("1", "first"), entry("22", "second snapshot")];
        let bytes = encode_table(&table);
        assert_eq!(bytes.len() as u64, encoded_size(&table));
        // The second entry starts 8-byte aligned.
        assert_eq!(&bytes[..8], &0x30000u64.to_be_bytes());
        let mem = MemStorage::new("t", Vec::new());
        blockdev::write_all_at(&mem, 4096, &bytes).unwrap();
        let read = read_table(&mem, 4096, 2, 0, false, &mut |_| {}).unwrap();
        assert_eq!(read.entries, table);
        assert_eq!(read.size, bytes.len() as u64);
        // The 32-bit VM state field says "none" for a state that does not fit.
        assert_eq!(&bytes[32..36], &[0, 0, 0, 0]);
    }

    #[test]
    fn short_extra_data_takes_defaults_and_is_written_whole() {
        let mut sn = entry("1", "a");
        sn.extra_data_size = 0;
        sn.unknown_extra.clear();
        sn.vm_state_size = 100;
        let mut bytes = encode_table(&[sn.clone()]);
        // Pretend the entry had no extra data at all (as version 2 writers left it).
        bytes.drain(40..64);
        bytes[36..40].copy_from_slice(&0u32.to_be_bytes());
        let mem = MemStorage::new("t", Vec::new());
        blockdev::write_all_at(&mem, 0, &bytes).unwrap();
        let read = read_table(&mem, 0, 1, 777, false, &mut |_| {}).unwrap();
        let got = &read.entries[0];
        assert_eq!((got.vm_state_size, got.disk_size, got.icount, got.extra_data_size), (100, 777, NO_ICOUNT, 0));
        assert_eq!(encode_table(&read.entries).len(), 40 + 24 + 2);
    }

    #[test]
    fn too_much_extra_data_fails_or_is_trimmed_on_repair() {
        let mut sn = entry("1", "a");
        sn.extra_data_size = 2000;
        sn.unknown_extra = vec![7; 2000 - 24];
        let bytes = encode_table(&[sn]);
        let mem = MemStorage::new("t", Vec::new());
        blockdev::write_all_at(&mem, 0, &bytes).unwrap();
        let e = read_table(&mem, 0, 1, 0, false, &mut |_| {}).unwrap_err();
        assert!(e.message().starts_with("Too much extra metadata in snapshot table entry 0\n"), "{}", e.message());
        let mut said = Vec::new();
        let read = read_table(&mem, 0, 1, 0, true, &mut |m| said.push(m.to_string())).unwrap();
        assert_eq!(read.trimmed_extra, 1);
        assert_eq!(read.entries[0].extra_data_size, 1024);
        assert_eq!(read.entries[0].unknown_extra.len(), 1000);
        assert_eq!(read.entries[0].name, "a");
        assert_eq!(said, ["Discarding too much extra metadata in snapshot table entry 0 (2000 > 1024)"]);
    }

    #[test]
    fn names_end_at_nul() {
        assert_eq!(c_string(b"ab\0cd"), "ab");
    }
}
