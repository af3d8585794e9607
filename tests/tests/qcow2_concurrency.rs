//! Concurrent writers and readers on one `Arc` of a qcow2 image: threads write interleaved 1 KiB
//! pieces of the same clusters (so allocations and copy-on-write of one cluster race), zero and
//! read back their own pieces, with metadata caches at their minimum so L2 tables and refcount
//! blocks are evicted and reloaded all the time. Afterwards the image must pass `qemu-img check`
//! and read, through QEMU, exactly what the threads wrote.

use std::sync::Arc;

use blockdev::{BlockDriver, MetadataCacheSizes, OpenOptions, ZeroFlags};
use formats::Registry;
use vdisk_tests::{pseudo_random, qemu_img, s, tempdir};

const SIZE: u64 = 24 << 20;
const PIECE: u64 = 1024;
const THREADS: u64 = 4;

/// Pieces each thread writes per round.
const ROUND: u64 = 600;

/// The `i`th piece thread `t` writes: the threads' `i`th pieces are neighbours in one cluster
/// (so they race for its allocation), and successive ones stride across many L2 tables.
fn piece_of(t: u64, i: u64) -> u64 {
    (i * 97 % (SIZE / PIECE / THREADS)) * THREADS + t
}

/// What thread `t` writes to piece `p` in round `r`.
fn pattern(t: u64, p: u64, r: u64) -> Vec<u8> {
    pseudo_random(PIECE as usize, (t << 48) ^ (p << 8) ^ r)
}

fn run(cluster: &str, extended: bool, backing: bool) {
    let d = tempdir();
    let reg = Registry::new();
    let (img, mut model) =
        vdisk_tests::model_qcow2(d.path(), &reg, SIZE, cluster, extended, backing.then_some(16 << 20)).unwrap();
    let mut opts = OpenOptions::read_write();
    // The smallest caches qemu accepts: every few steps evict a table.
    opts.metadata_cache = MetadataCacheSizes { total: None, l2: Some(1), refcount: Some(1) };
    let drv: Arc<dyn BlockDriver> = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &opts).unwrap();

    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let drv = drv.clone();
            scope.spawn(move || {
                for r in 0..3u64 {
                    for i in 0..ROUND {
                        let piece = piece_of(t, i);
                        let off = piece * PIECE;
                        let zero = (piece + r) % 7 == 0;
                        if zero {
                            let flags = ZeroFlags { may_unmap: r == 1, no_fallback: false };
                            drv.write_zeroes(off, PIECE, flags).unwrap();
                        } else {
                            drv.write_all_at(off, &pattern(t, piece, r)).unwrap();
                        }
                        let mut back = vec![0u8; PIECE as usize];
                        drv.read_exact_at(off, &mut back).unwrap();
                        let want = if zero { vec![0u8; PIECE as usize] } else { pattern(t, piece, r) };
                        assert!(back == want, "thread {t} round {r}: piece {piece} reads back wrong");
                    }
                    if r == 1 {
                        drv.flush().unwrap();
                    }
                }
            });
        }
    });
    // The model: the last round of each piece.
    for t in 0..THREADS {
        for i in 0..ROUND {
            let piece = piece_of(t, i);
            let off = (piece * PIECE) as usize;
            let want = if (piece + 2) % 7 == 0 { vec![0u8; PIECE as usize] } else { pattern(t, piece, 2) };
            model[off..off + PIECE as usize].copy_from_slice(&want);
        }
    }
    drv.close().unwrap();
    drop(drv);
    let check = qemu_img(&["check", s(&img)]);
    assert_eq!(check.code, 0, "cluster {cluster} extended {extended} backing {backing}: {}", check.stdout);
    let expected = d.path().join("expected.raw");
    std::fs::write(&expected, &model).unwrap();
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&expected), s(&img)]);
    assert_eq!(cmp.code, 0, "cluster {cluster} extended {extended} backing {backing}: {}", cmp.stdout);
}

#[test]
fn concurrent_writers_on_shared_clusters_4k() {
    run("4096", false, false);
}

#[test]
fn concurrent_writers_with_backing_file_64k() {
    run("65536", false, true);
}

#[test]
fn concurrent_writers_extended_l2_with_backing_file() {
    run("65536", true, true);
}
