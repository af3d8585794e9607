//! Helpers shared by the fuzz targets.

use arbitrary::{Arbitrary, Unstructured};

/// Splits the input of an image target: a flag byte (bit 0: open writable), an operation count
/// byte (mod 17), that many operations decoded with `arbitrary`, then the image bytes (so that
/// seed files are a two-byte prefix and a real image).
pub fn flag_ops_image<'a, Op: Arbitrary<'a>>(data: &'a [u8]) -> arbitrary::Result<(bool, Vec<Op>, Vec<u8>)> {
    let mut u = Unstructured::new(data);
    let writable = u.arbitrary::<u8>()? & 1 == 1;
    let count = u.arbitrary::<u8>()? % 17;
    let mut ops = Vec::with_capacity(count as usize);
    for _ in 0..count {
        ops.push(u.arbitrary()?);
    }
    Ok((writable, ops, u.take_rest().to_vec()))
}

/// Options for opening a fuzzed image in memory: writable or not, and never following a
/// reference to another file (backing files, data files, extents).
pub fn isolated_open_options(writable: bool) -> blockdev::OpenOptions {
    blockdev::OpenOptions {
        read_only: !writable,
        no_backing: true,
        references: blockdev::ReferencePolicy::Deny,
        ..blockdev::OpenOptions::default()
    }
}
