//! Fuzzes reading qcow2's snapshot table (`qcow2::snapshot::table::read_table`), strictly (as an
//! open reads it) and repairing (as `check -r all` reads it), and the encoder.
//!
//! Input layout: one byte of entry count, then the table's bytes, which start at offset 0 of an
//! in-memory file (reads past its end are zeros, so every count reads that many entries; counts
//! stay small so that runs stay fast; the table-too-big path is covered by iotest 261).
//!
//! Invariants asserted:
//! - neither read panics, and what a strict read accepts a repairing read accepts identically;
//! - a repairing read never keeps more than the table's limits allow;
//! - every table that reads back encodes to `encoded_size` bytes and reads back from those bytes
//!   as the same entries, except that the extra data is written whole (at least the known 24
//!   bytes), and encoding that again gives the same bytes.

#![no_main]

use blockdev::MemStorage;
use libfuzzer_sys::fuzz_target;
use qcow2::limits::{MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES};
use qcow2::snapshot::table::{encode_table, encoded_size, read_table, KNOWN_EXTRA_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((&count, table_bytes)) = data.split_first() else { return };
    let nb = count as u32;
    let file = MemStorage::new("table", table_bytes.to_vec());
    let strict = read_table(&file, 0, nb, 1 << 30, false, &mut |_| {});
    let repaired = read_table(&file, 0, nb, 1 << 30, true, &mut |_| {});
    if let (Ok(s), Ok(r)) = (&strict, &repaired) {
        assert_eq!(s.entries, r.entries, "a strict read and a repairing read disagree");
        assert_eq!((r.dropped_entries, r.trimmed_extra), (0, 0));
    }
    let Ok(table) = repaired else { return };
    assert!(table.entries.iter().all(|e| e.extra_data_size as u64 <= MAX_SNAPSHOT_EXTRA_DATA));
    let bytes = encode_table(&table.entries);
    assert_eq!(bytes.len() as u64, encoded_size(&table.entries));
    assert!(bytes.len() as u64 <= MAX_SNAPSHOT_TABLE_BYTES + 24 * table.entries.len() as u64);
    let back = read_table(
        &MemStorage::new("encoded", bytes.clone()),
        0,
        table.entries.len() as u32,
        1 << 30,
        true,
        &mut |_| {},
    );
    let back = back.expect("an encoded table must read back");
    let mut want = table.entries.clone();
    for e in &mut want {
        if e.extra_data_size < KNOWN_EXTRA_SIZE {
            // Fields the short extra data lacked are written with the values they were read as.
            e.extra_data_size = KNOWN_EXTRA_SIZE;
        }
    }
    assert_eq!(back.entries, want, "encoded table reads back differently");
    assert_eq!(encode_table(&back.entries), bytes, "encoding is not a fixed point");
});
