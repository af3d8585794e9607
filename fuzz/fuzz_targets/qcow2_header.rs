//! Fuzzes qcow2's header parsing: the fixed fields (`Header::parse`), the header extensions and
//! backing file name (`parse_extensions`, `backing_fields`), the unsupported-feature message, and
//! the encoders (`encode_fixed`, `encode_cluster`).
//!
//! Input layout: the first cluster of an image (as `Qcow2::open` reads it: bytes past the end of
//! the input read as zeros, up to the cluster size the header declares).
//!
//! Invariants asserted, for every header that parses:
//! - `encode_fixed` parses back to the same `Header`;
//! - `unsupported_features_message` ends with "Unknown incompatible feature: <hex>" naming exactly
//!   the bits of the mask that the feature table does not name;
//! - when the extensions parse too and `encode_cluster` fits them in a cluster: the encoded cluster
//!   parses back to the same header, and its extensions parse back to the same ones (except what
//!   the encoder normalizes: it writes qemu's feature table instead of the image's, and drops a data
//!   file name without the data-file bit); the only excuse for the encoded extensions not parsing
//!   is a name that grew past its limit when invalid UTF-8 became U+FFFD; and encoding what was
//!   parsed back gives the same bytes again (the encoding is a fixed point).

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2::header::{backing_fields, incompat, parse_extensions, unsupported_features_message, Extensions, Header};

/// The extensions as `encode_cluster` writes them for `h`.
fn normalized(h: &Header, e: &Extensions) -> Extensions {
    let mut e = e.clone();
    e.feature_table.clear();
    if h.incompatible & incompat::DATA_FILE == 0 {
        e.data_file = None;
    }
    e
}

fn lossy(e: &Extensions) -> bool {
    [&e.backing_file, &e.backing_format, &e.data_file]
        .iter()
        .any(|s| s.as_ref().is_some_and(|s| s.contains('\u{fffd}')))
}

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data) else { return };

    // The fixed fields encode and parse back.
    let fixed = h.encode_fixed();
    assert_eq!(fixed.len(), h.header_length() as usize);
    let again = Header::parse(&fixed).expect("encoded fixed header must parse");
    assert_eq!(again, h, "fixed header round trip");

    let cs = h.cluster_size() as usize;
    let mut cluster = data[..data.len().min(cs)].to_vec();
    cluster.resize(cs, 0);
    let (bo, bsz) = backing_fields(&cluster);
    let exts = match parse_extensions(&h, &cluster, bo, bsz) {
        Ok(e) => e,
        Err(_) => {
            // Still build the message the way open does for a refused image.
            let msg = unsupported_features_message(&Extensions::default(), h.incompatible);
            assert!(msg.starts_with("Unsupported qcow2 feature(s): "));
            return;
        }
    };

    // The message names every bit: known ones by the table's name, the rest in hex.
    for mask in [h.incompatible & !incompat::KNOWN, h.incompatible, h.compatible | 1, u64::MAX] {
        let msg = unsupported_features_message(&exts, mask);
        assert!(msg.starts_with("Unsupported qcow2 feature(s): "));
        let mut rest = mask;
        for f in &exts.feature_table {
            if f.kind == 0 && f.bit < 64 {
                rest &= !(1u64 << f.bit);
            }
        }
        if rest != 0 {
            let unknown = format!("Unknown incompatible feature: {rest:x}");
            assert!(msg.ends_with(&unknown), "mask {mask:x}: {msg}");
        }
    }

    // The whole first cluster round trip.
    let Ok(c2) = h.encode_cluster(&exts) else { return };
    assert_eq!(c2.len(), cs);
    let h2 = Header::parse(&c2).expect("encoded cluster must parse");
    assert_eq!(h2, h, "header round trip through encode_cluster");
    let (bo2, bsz2) = backing_fields(&c2);
    let exts2 = match parse_extensions(&h2, &c2, bo2, bsz2) {
        Ok(e) => e,
        Err(e) => {
            assert!(lossy(&exts), "encoded extensions do not parse: {e:?}\n{exts:?}");
            return;
        }
    };
    let want_table = h.version >= 3 && cs > 4096;
    assert_eq!(!exts2.feature_table.is_empty(), want_table);
    assert_eq!(normalized(&h, &exts2), normalized(&h, &exts), "extensions round trip");
    let c3 = h2.encode_cluster(&exts2).expect("re-encoding what was encoded must fit");
    assert!(c3 == c2, "encode_cluster is not a fixed point");
});
