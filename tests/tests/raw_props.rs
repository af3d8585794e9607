//! Property tests for the raw format on the shared model layer (`vdisk_tests::model`): random
//! operation sequences read back like the model after every step, and `qemu-img compare` agrees.

use blockdev::OpenOptions;
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::model::{self, Op, Subject};
use vdisk_tests::{qemu_img, s, tempdir};

const SIZE: u64 = 2 << 20;

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let d = tempdir();
    let reg = Registry::new();
    let img = d.path().join("model.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&img), &SIZE.to_string()]).ok();
    let open = || vdisk_tests::open_image(&reg, &img, Some("raw"), &OpenOptions::read_write());
    let subject = Subject { open: &open, backing: None };
    let model = model::run(&subject, vec![0; SIZE as usize], ops).map_err(TestCaseError::fail)?;
    let raw = d.path().join("expected.raw");
    std::fs::write(&raw, &model).unwrap();
    let m = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&img), s(&raw)]);
    prop_assert_eq!(m.code, 0, "qemu-img compare: {}{}", m.stdout, m.stderr);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model::cases(32), max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn raw_reads_back_like_the_model(
        ops in prop::collection::vec(prop_oneof![model::ops(SIZE, 512, 128 << 10), model::ops(SIZE, 1, 4096)], 1..40)
    ) {
        run(&ops)?;
    }
}
