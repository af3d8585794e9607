//! Opens fuzzed bytes as a VMDK disk (in memory: a monolithic sparse or streamOptimized file, or
//! a descriptor whose extents need no other file; references to other files are refused) and
//! runs a short sequence of reads, writes, zero writes, block-status queries, flushes and a check,
//! then closes it (which ends a stream). Any panic, hang or unbounded allocation is a bug: errors
//! are fine.

#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use arbitrary::Arbitrary;
use blockdev::{Chain, Format, RepairMode, ZeroFlags};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u32, len: u16 },
    Write { offset: u32, len: u16, byte: u8 },
    Zeroes { offset: u32, len: u32 },
    Status { offset: u32, len: u32 },
    Flush,
    Check,
}

fuzz_target!(|data: &[u8]| {
    let Ok((writable, ops, image)) = vdisk_fuzz::flag_ops_image::<Op>(data) else { return };
    let storage = Arc::new(blockdev::MemStorage::new("fuzz.vmdk", image));
    let opts = vdisk_fuzz::isolated_open_options(writable);
    let registry = formats::Registry::new();
    let Ok(img) = vmdk::VmdkFormat.open(storage, &opts, &Chain::new(), &registry) else { return };
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
            Op::Check => {
                if let Some(c) = img.check() {
                    let _ = c.check(RepairMode::None, &mut |_| {});
                }
            }
        }
    }
    let _ = img.info();
    let _ = img.close();
});
