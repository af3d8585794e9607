//! Opens fuzzed bytes as a qcow2 image (in memory; backing and data files are never opened) and
//! runs a short sequence of reads, writes, zeroes, discards, flushes, block-status queries,
//! internal snapshot operations (list, create with or without VM state, apply, delete),
//! persistent bitmap operations (add, remove, clear, enable, disable, merge, read) and a check on
//! it. Any panic, hang or unbounded allocation is a bug: errors are fine.

#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use arbitrary::Arbitrary;
use blockdev::bitmap::{BitmapChange, MergeSource};
use blockdev::{BlockDriver, Chain, RepairMode, ZeroFlags};
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
    BitmapAdd { granularity_bits: u8, enabled: bool },
    BitmapChange { index: u8, what: u8 },
    BitmapRead { index: u8 },
}

fuzz_target!(|data: &[u8]| {
    let Ok((writable, ops, image)) = vdisk_fuzz::flag_ops_image::<Op>(data) else { return };
    let storage = Arc::new(blockdev::MemStorage::new("fuzz.qcow2", image));
    let opts = vdisk_fuzz::isolated_open_options(writable);
    let registry = formats::Registry::new();
    let Ok(img) = qcow2::Qcow2::open(storage, &opts, &Chain::new(), &registry) else { return };
    for op in ops {
        // (Applying a snapshot may change the size.)
        let size = img.size();
        let clamp =
            |offset: u64, len: u64| -> Option<(u64, u64)> { (offset < size).then(|| (offset, len.min(size - offset))) };
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
            Op::BitmapAdd { granularity_bits, enabled } => {
                if let Some(b) = img.bitmaps() {
                    let g = 1u64 << (granularity_bits % 40);
                    let _ = b.add(&format!("f{granularity_bits}"), Some(g), enabled);
                }
            }
            Op::BitmapChange { index, what } => bitmap_op(&img, index, what),
            Op::BitmapRead { index } => bitmap_op(&img, index, 5),
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

/// Changes or reads the `index`th bitmap (`what` picks the operation).
fn bitmap_op(img: &qcow2::Qcow2, index: u8, what: u8) {
    let Some(b) = img.bitmaps() else { return };
    let Ok(list) = b.list() else { return };
    if list.is_empty() {
        return;
    }
    let target = &list[index as usize % list.len()];
    let other = &list[(index as usize + 1) % list.len()].name;
    let name = target.name.as_str();
    let change = match what % 6 {
        0 => BitmapChange::Remove(name),
        1 => BitmapChange::Clear(name),
        2 => BitmapChange::SetEnabled(name, true),
        3 => BitmapChange::SetEnabled(name, false),
        4 => BitmapChange::Merge { name, from: MergeSource::Bitmap(other) },
        _ => {
            if let Ok(bits) = b.read(name) {
                let _ = bits.dirty_ranges().take(1000).count();
            }
            return;
        }
    };
    let _ = b.apply(&[change]);
}
