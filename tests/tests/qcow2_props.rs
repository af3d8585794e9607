//! Property tests: random sequences of write / zeroes / discard / grow / flush / reopen on a qcow2
//! image (with and without a backing file, with subclusters) must read back like an in-memory model
//! after every step (`vdisk_tests::model`), and the image must pass `qemu-img check` and compare
//! equal to the model through QEMU afterwards. proptest shrinks any failure to a minimal sequence.

use blockdev::OpenOptions;
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::model::{self, Op, Subject};
use vdisk_tests::{qemu_img, s, tempdir};

const SIZE: u64 = 4 << 20;

/// Sector-aligned requests of up to 256 KiB, and byte-granular ones of up to 8 KiB.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![3 => model::ops(SIZE, 512, 256 << 10), 1 => model::ops(SIZE, 1, 8 << 10)]
}

fn run(ops: &[Op], cluster: &str, backing: bool, extended: bool) -> Result<(), TestCaseError> {
    let d = tempdir();
    let reg = Registry::new();
    let backing_len = 3 << 20;
    let (img, initial) =
        vdisk_tests::model_qcow2(d.path(), &reg, SIZE, cluster, extended, backing.then_some(backing_len))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let backing_bytes = vec![0x77u8; backing_len as usize];
    let open = || vdisk_tests::open_image(&reg, &img, Some("qcow2"), &OpenOptions::read_write());
    let subject = Subject { open: &open, backing: backing.then_some(&backing_bytes[..]) };
    let model = model::run(&subject, initial, ops).map_err(TestCaseError::fail)?;
    let c = qemu_img(&["check", s(&img)]);
    prop_assert_eq!(c.code, 0, "qemu-img check: {}{}", c.stdout, c.stderr);
    let raw = d.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    let m = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)]);
    prop_assert_eq!(m.code, 0, "qemu-img compare: {}{}", m.stdout, m.stderr);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model::cases(24), max_shrink_iters: 200, .. ProptestConfig::default() })]

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
