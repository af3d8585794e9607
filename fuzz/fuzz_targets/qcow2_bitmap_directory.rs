//! Fuzzes qcow2's bitmap directory parser (`qcow2::bitmap::dir::parse_directory`) and encoder.
//!
//! Input layout: one byte of entry count, one byte choosing the cluster size (512 B to 2 MiB), one
//! byte choosing the disk size (2^n bytes), then the directory's bytes.
//!
//! Invariants asserted: parsing never panics; every directory that parses encodes back to bytes
//! that parse as the same entries, with the same length (the encoder writes what the parser
//! accepts, padding included), and every accepted entry keeps qemu's limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2::bitmap::dir::{encode_directory, parse_directory};
use qcow2::limits::{BITMAP_GRANULARITY_BITS, MAX_BITMAP_DATA_BYTES, MAX_BITMAP_NAME};

fuzz_target!(|data: &[u8]| {
    let [count, cluster, disk, dir @ ..] = data else { return };
    let nb = *count as u32;
    let cs = 1u64 << (9 + cluster % 13);
    let disk_size = 1u64 << (disk % 56);
    let Ok(entries) = parse_directory(dir, nb, cs, disk_size) else { return };
    assert_eq!(entries.len() as u32, nb);
    for e in &entries {
        assert!(BITMAP_GRANULARITY_BITS.contains(&(e.granularity_bits as u32)));
        assert!(e.table_size as u64 * cs <= MAX_BITMAP_DATA_BYTES);
        assert!(e.table_offset % cs == 0 && e.table_offset != 0);
        assert!(e.name.len() <= 3 * MAX_BITMAP_NAME, "a lossy name grows at most threefold");
    }
    let bytes = encode_directory(&entries);
    let again = parse_directory(&bytes, nb, cs, disk_size);
    // A name that was not UTF-8 is re-encoded with replacement characters: longer, maybe too long.
    if entries.iter().all(|e| e.name.len() <= MAX_BITMAP_NAME) {
        assert_eq!(again.expect("what was accepted reads back"), entries);
        if entries.iter().all(|e| !e.name.contains('\u{fffd}')) {
            assert_eq!(bytes.len(), dir.len(), "same directory size");
        }
    }
});
