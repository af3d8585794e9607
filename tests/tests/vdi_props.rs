//! VDI on the shared model layer (`vdisk_tests::model`): random operation sequences on dynamic and
//! static images read back like the model after every step; then `qemu-img check` is clean and
//! `qemu-img compare` agrees with the model.

use blockdev::OpenOptions;
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::model::{self, Op, Subject};
use vdisk_tests::{qemu_img, s, tempdir};

const SIZE: u64 = 3 << 20;

fn run(fixed: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let d = tempdir();
    let reg = Registry::new();
    let img = d.path().join("disk.vdi");
    let o = if fixed { "static=on" } else { "static=off" };
    qemu_img(&["create", "-q", "-f", "vdi", "-o", o, s(&img), &SIZE.to_string()]).ok();
    let open = || vdisk_tests::open_image(&reg, &img, Some("vdi"), &OpenOptions::read_write());
    let subject = Subject { open: &open, backing: None };
    let model = model::run(&subject, vec![0; SIZE as usize], ops).map_err(TestCaseError::fail)?;
    let c = qemu_img(&["check", "-f", "vdi", s(&img)]);
    prop_assert_eq!(c.code, 0, "{}: qemu-img check: {}{}", o, c.stdout, c.stderr);
    let raw = d.path().join("expected.raw");
    std::fs::write(&raw, &model).unwrap();
    let m = qemu_img(&["compare", "-f", "raw", "-F", "vdi", s(&raw), s(&img)]);
    prop_assert_eq!(m.code, 0, "{}: qemu-img compare: {}{}", o, m.stdout, m.stderr);
    Ok(())
}

/// Operations a VDI takes: everything but growth (not resized here).
fn vdi_ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![model::ops(SIZE, 512, 1536 << 10), model::ops(SIZE, 1, 4096)]
        .prop_filter("not resized", |op| !matches!(op, Op::Grow { .. }));
    prop::collection::vec(op, 1..30)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model::cases(12), max_shrink_iters: 100, .. ProptestConfig::default() })]

    #[test]
    fn dynamic_images_read_back_like_the_model(ops in vdi_ops()) {
        run(false, &ops)?;
    }

    #[test]
    fn static_images_read_back_like_the_model(ops in vdi_ops()) {
        run(true, &ops)?;
    }
}
