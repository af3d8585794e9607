//! Fuzzes the LUKS1 header parser (`blockdev::crypto::luks::LuksHeader::parse`), its encoder and
//! the `info` block built from it.
//!
//! Input layout: four bytes (little-endian) giving the LUKS area's length, then the header bytes.
//!
//! Invariants asserted: parsing never panics; whatever parses keeps every key slot's material
//! inside the area and after the header, has iteration counts within the cap, encodes to bytes
//! that parse as the same header, and yields an `info` block with eight slots.

#![no_main]

use blockdev::crypto::luks::{LuksHeader, HEADER_LEN, KEY_SLOTS, MAX_ITERATIONS};
use blockdev::crypto::volume::luks_info;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, header @ ..] = data else { return };
    let area_len = u32::from_le_bytes([*a, *b, *c, *d]) as u64;
    let Ok(h) = LuksHeader::parse(header, area_len) else { return };
    assert!(h.mk_digest_iterations >= 1 && h.mk_digest_iterations <= MAX_ITERATIONS);
    for i in 0..KEY_SLOTS {
        let r = h.material_range(i);
        assert!(r.start >= HEADER_LEN as u64 && r.end <= area_len, "slot {i} material outside the area");
        if h.slots[i].active {
            assert!(h.slots[i].iterations >= 1 && h.slots[i].iterations <= MAX_ITERATIONS);
        }
    }
    assert_eq!(h.spec.key_bytes(), h.key_bytes as usize);
    let again = LuksHeader::parse(&h.encode(), area_len).expect("an encoded header parses");
    assert_eq!(again, h);
    let info = luks_info(&h);
    match info.get("slots") {
        Some(blockdev::qobject::Value::List(l)) => assert_eq!(l.len(), KEY_SLOTS),
        other => panic!("slots: {other:?}"),
    }
});
