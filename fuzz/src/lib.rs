//! Helpers shared by the fuzz targets.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use blockdev::{Chain, Format, RepairMode, ZeroFlags};

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

/// A guest request of [`exercise_image`].
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// A read.
    Read { offset: u32, len: u16 },
    /// A write of one byte value.
    Write { offset: u32, len: u16, byte: u8 },
    /// A zero write.
    Zeroes { offset: u32, len: u32 },
    /// A block-status query.
    Status { offset: u32, len: u32 },
    /// A flush.
    Flush,
    /// A check (formats that have one), repairing everything when `repair` and the image is
    /// writable.
    Check { repair: bool },
}

/// Opens fuzzed bytes (split by [`flag_ops_image`]) as an image of `format` in memory, isolated
/// from other files, runs the operations on it, asks for its info and closes it. Errors are fine;
/// a panic, a hang or an unbounded allocation is a bug.
pub fn exercise_image(format: &dyn Format, name: &str, data: &[u8]) {
    let Ok((writable, ops, image)) = flag_ops_image::<Op>(data) else { return };
    let storage = Arc::new(blockdev::MemStorage::new(name, image));
    let opts = isolated_open_options(writable);
    let registry = formats::Registry::new();
    let Ok(img) = format.open(storage, &opts, &Chain::new(), &registry) else { return };
    let size = img.size();
    let clamp =
        |offset: u64, len: u64| -> Option<(u64, u64)> { (offset < size).then(|| (offset, len.min(size - offset))) };
    for op in ops {
        match op {
            Op::Read { offset, len } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64) {
                    let mut buf = vec![0u8; l as usize];
                    let _ = img.read_at(o, &mut [IoSliceMut::new(&mut buf)]);
                }
            }
            Op::Write { offset, len, byte } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64) {
                    let _ = img.write_at(o, &[IoSlice::new(&vec![byte; l as usize])]);
                }
            }
            Op::Zeroes { offset, len } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64 % (64 << 20)) {
                    let _ = img.write_zeroes(o, l, ZeroFlags::default());
                }
            }
            Op::Status { offset, len } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64) {
                    let _ = img.block_status(o, l.max(1));
                }
            }
            Op::Flush => {
                let _ = img.flush();
            }
            Op::Check { repair } => {
                if let Some(c) = img.check() {
                    let mode = if repair && writable { RepairMode::All } else { RepairMode::None };
                    let _ = c.check(mode, &mut |_| {});
                }
            }
        }
    }
    let _ = img.info();
    let _ = img.close();
}
