//! Opens fuzzed bytes as a qcow2 image (in memory; backing and data files are never opened) and
//! runs a short sequence of reads, writes, zeroes, discards, flushes, block-status queries,
//! internal snapshot operations (list, create with or without VM state, apply, delete) and a check
//! on it. Any panic, hang or unbounded allocation is a bug: errors are fine.

#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use arbitrary::Arbitrary;
use blockdev::{BlockDriver, Chain, OpenOptions, RepairMode, ZeroFlags};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u32, len: u16 },
    Write { offset: u32, len: u16, byte: u8 },
    Zeroes { offset: u32, len: u32, unmap: bool },
    Discard { offset: u32, len: u32 },
    Status { offset: u32, len: u32 },
    Flush,
    Check { repair: bool },
    SnapshotCreate { vm_state: u16 },
    SnapshotApply { index: u8 },
    SnapshotDelete { index: u8 },
}

/// Input layout: a flag byte (bit 0: open writable), an operation count byte, the operations,
/// then the image bytes (so that seed files are a two-byte prefix and a real image).
fn parse(data: &[u8]) -> arbitrary::Result<(bool, Vec<Op>, Vec<u8>)> {
    let mut u = arbitrary::Unstructured::new(data);
    let writable = u.arbitrary::<u8>()? & 1 == 1;
    let count = u.arbitrary::<u8>()? % 17;
    let mut ops = Vec::with_capacity(count as usize);
    for _ in 0..count {
        ops.push(u.arbitrary()?);
    }
    Ok((writable, ops, u.take_rest().to_vec()))
}

fuzz_target!(|data: &[u8]| {
    let Ok((writable, ops, image)) = parse(data) else { return };
    let storage = Arc::new(blockdev::MemStorage::new("fuzz.qcow2", image));
    let opts = OpenOptions {
        read_only: !writable,
        no_backing: true,
        references: blockdev::ReferencePolicy::Deny,
        ..OpenOptions::default()
    };
    let registry = formats::Registry::new();
    let Ok(img) = qcow2::Qcow2::open(storage, &opts, &Chain::new(), &registry) else { return };
    for op in ops {
        // (Applying a snapshot may change the size.)
        let size = img.size();
        let clamp = |offset: u64, len: u64| -> Option<(u64, u64)> {
            (offset < size).then(|| (offset, len.min(size - offset)))
        };
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
            Op::Zeroes { offset, len, unmap } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64 % (64 << 20)) {
                    let _ = img.write_zeroes(o, l, ZeroFlags { may_unmap: unmap, no_fallback: false });
                }
            }
            Op::Discard { offset, len } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64 % (64 << 20)) {
                    let _ = img.discard(o, l);
                }
            }
            Op::Status { offset, len } => {
                if let Some((o, l)) = clamp(offset as u64, len as u64) {
                    if l > 0 {
                        let _ = img.block_status(o, l);
                    }
                }
            }
            Op::Flush => {
                let _ = img.flush();
            }
            Op::SnapshotCreate { vm_state } => {
                if let Some(sn) = img.snapshots() {
                    let params = blockdev::SnapshotParams { name: "fuzz".into(), ..Default::default() };
                    let _ = sn.save(&params, &vec![0x5a; vm_state as usize]);
                }
            }
            Op::SnapshotApply { index } | Op::SnapshotDelete { index } => {
                let Some(sn) = img.snapshots() else { continue };
                let Ok(list) = sn.list() else { continue };
                let Some(target) = list.get(index as usize % list.len().max(1)) else { continue };
                if matches!(op, Op::SnapshotApply { .. }) {
                    if sn.apply(&target.id).is_ok() {
                        let mut buf = vec![0u8; (target.vm_state_size as usize).min(1 << 16)];
                        let _ = sn.read_vm_state(0, &mut buf);
                    }
                } else {
                    let _ = sn.delete(Some(&target.id), Some(&target.name));
                }
            }
            Op::Check { repair } => {
                if let Some(c) = img.check() {
                    let mode = if repair { RepairMode::All } else { RepairMode::None };
                    let _ = c.check(mode, &mut |_| {});
                }
            }
        }
    }
    let _ = img.close();
});
