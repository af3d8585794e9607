//! Property tests: random sequences of write / zeroes / discard / resize / flush on a qcow2 image
//! (with and without a backing file) must read back like an in-memory model, and the image must
//! pass `qemu-img check` afterwards. proptest shrinks any failure to a minimal sequence.

use blockdev::{OpenOptions, ResizeOptions, ZeroFlags};
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::{qemu_img, s, tempdir};

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Grow { by: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE / 512, 1..512u64).prop_map(|(o, l)| (o * 512, l * 512));
    prop_oneof![
        5 => (range.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (1..8u64).prop_map(|k| Op::Grow { by: k * 512 * 97 }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn run(ops: &[Op], cluster: &str, backing: bool, extended: bool) -> Result<(), TestCaseError> {
    let d = tempdir();
    let reg = Registry::new();
    let (img, mut model) =
        vdisk_tests::model_qcow2(d.path(), &reg, SIZE, cluster, extended, backing.then_some(3 << 20))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut drv = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write()).unwrap();
    let clamp = |off: u64, len: u64, size: u64| -> Option<(u64, u64)> {
        if off >= size {
            None
        } else {
            Some((off, len.min(size - off)))
        }
    };
    for op in ops {
        let size = model.len() as u64;
        match *op {
            Op::Write { off, len, byte } => {
                if let Some((off, len)) = clamp(off, len, size) {
                    drv.write_all_at(off, &vec![byte; len as usize]).unwrap();
                    model[off as usize..(off + len) as usize].fill(byte);
                }
            }
            Op::Zero { off, len, unmap } => {
                if let Some((off, len)) = clamp(off, len, size) {
                    drv.write_zeroes(off, len, ZeroFlags { may_unmap: unmap, no_fallback: false }).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
            }
            Op::Discard { off, len } => {
                if let Some((off, len)) = clamp(off, len, size) {
                    drv.discard(off, len).unwrap();
                    // Discard lets whole clusters change to zeros or the backing file's content.
                    let mut now = vec![0u8; len as usize];
                    drv.read_exact_at(off, &mut now).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&now);
                }
            }
            Op::Grow { by } => {
                let new = size + by;
                drv.resize(new, &ResizeOptions::default()).unwrap();
                // New space reads as the backing file (if it reaches there) or zeros.
                let old = model.len();
                model.resize(new as usize, 0);
                let mut tail = vec![0u8; new as usize - old];
                drv.read_exact_at(old as u64, &mut tail).unwrap();
                model[old..].copy_from_slice(&tail);
                prop_assert!(tail.iter().all(|&b| b == 0 || (backing && b == 0x77)));
            }
            Op::Flush => drv.flush().unwrap(),
            Op::Reopen => {
                drv.close().unwrap();
                drop(drv);
                drv = vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write()).unwrap();
            }
        }
    }
    let mut got = vec![0u8; model.len()];
    drv.read_exact_at(0, &mut got).unwrap();
    prop_assert!(got == model, "content differs from the model");
    drv.close().unwrap();
    drop(drv);
    let c = qemu_img(&["check", s(&img)]);
    prop_assert_eq!(c.code, 0, "qemu-img check: {}{}", c.stdout, c.stderr);
    let raw = d.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    let m = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)]);
    prop_assert_eq!(m.code, 0, "qemu-img compare: {}{}", m.stdout, m.stderr);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn small_clusters_without_backing(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops, "4k", false, false)?;
    }

    #[test]
    fn default_clusters_with_backing(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops, "64k", true, false)?;
    }

    #[test]
    fn subclusters_with_backing(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops, "32k", true, true)?;
    }
}
