//! Guest workloads shared by the crash-consistency tests of every writable format: request lists
//! (`crate::crash::GuestOp`) built from a seed, so that a failure reproduces.

use crate::crash::{GuestOp, SECTOR};
use crate::XorShift;

/// Sequential 20 KiB writes starting half a sector-run into a cluster, so both ends copy on write.
pub fn sequential_fill(size: u64) -> Vec<GuestOp> {
    let mut ops = vec![];
    let mut off = 3 * SECTOR;
    let mut byte = 1u8;
    while off + 20 * 1024 <= size / 2 {
        ops.push(GuestOp::Write { offset: off, len: 20 * 1024, byte });
        byte = byte.wrapping_add(1).max(1);
        if ops.len() % 4 == 3 {
            ops.push(GuestOp::Flush);
        }
        off += 20 * 1024;
    }
    ops
}

/// A random run of 1 to `max_sectors` sectors inside the first `size` bytes: (offset, length).
pub fn random_range(rng: &mut XorShift, size: u64, max_sectors: u64) -> (u64, u64) {
    let len = (1 + rng.below(max_sectors)) * SECTOR;
    let offset = rng.below((size - len) / SECTOR + 1) * SECTOR;
    (offset, len)
}

/// Random writes of 1 to 24 sectors over a partly written disk, a flush every few requests.
pub fn random_overwrite(size: u64, seed: u64) -> Vec<GuestOp> {
    let mut rng = XorShift::new(seed);
    let mut ops = vec![GuestOp::Write { offset: 0, len: size / 4, byte: 0xa0 }, GuestOp::Flush];
    for i in 0..48u64 {
        let (offset, len) = random_range(&mut rng, size / 2, 24);
        ops.push(GuestOp::Write { offset, len, byte: (i % 250) as u8 + 2 });
        if rng.below(5) == 0 {
            ops.push(GuestOp::Flush);
        }
    }
    ops
}

/// Writes, zeroes (with and without unmap) and discards of up to 6 clusters.
pub fn discard_zeroes_mix(size: u64, cluster: u64, seed: u64) -> Vec<GuestOp> {
    let mut rng = XorShift::new(seed);
    let mut ops = vec![GuestOp::Write { offset: 0, len: size / 2, byte: 0xb0 }, GuestOp::Flush];
    for i in 0..48u64 {
        let (offset, len) = random_range(&mut rng, size / 2, 6 * cluster / SECTOR);
        ops.push(match rng.below(4) {
            0 | 1 => GuestOp::Write { offset, len, byte: (i % 250) as u8 + 2 },
            2 => GuestOp::Zeroes { offset, len, unmap: rng.below(2) == 0 },
            _ => GuestOp::Discard { offset, len },
        });
        if rng.below(4) == 0 {
            ops.push(GuestOp::Flush);
        }
    }
    ops
}
