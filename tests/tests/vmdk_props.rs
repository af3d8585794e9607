//! VMDK on the shared model layer (`vdisk_tests::model`): random operation sequences on every
//! writable subformat, with and without zeroed grains and over a parent disk, read back like the
//! model after every step; afterwards `qemu-img check` is clean, `qemu-img compare` agrees with the
//! model, and the unclean-shutdown flag is clear again. Also: the flag is set (durably, before
//! data) while an open has changed the disk, and the untrusted open policy confines the files a
//! descriptor names.

use std::path::{Path, PathBuf};

use blockdev::{ErrorKind, OpenOptions};
use formats::Registry;
use proptest::prelude::*;
use vdisk_tests::model::{self, Op, Subject};
use vdisk_tests::{pseudo_random, qemu_img, qemu_io, s, tempdir};

const SIZE: u64 = 3 << 20;

/// One disk layout under test.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Sparse,
    SparseZeroedGrains,
    Flat,
    SplitSparse,
    /// A monolithicSparse delta disk over a parent holding data.
    Delta,
}

/// The unclean-shutdown byte of each sparse extent file in `dir`.
fn unclean_flags(dir: &Path) -> Vec<(PathBuf, u8)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        if bytes.starts_with(b"KDMV") {
            out.push((p, bytes[72]));
        }
    }
    out
}

fn run(layout: Layout, ops: &[Op]) -> Result<(), TestCaseError> {
    let d = tempdir();
    let reg = Registry::new();
    let img = d.path().join("disk.vmdk");
    let size = SIZE.to_string();
    let mut parent_content = None;
    let create = |opts: &str| qemu_img(&["create", "-q", "-f", "vmdk", "-o", opts, s(&img), &size]).ok();
    match layout {
        Layout::Sparse => drop(create("subformat=monolithicSparse")),
        Layout::SparseZeroedGrains => drop(create("zeroed_grain=on")),
        Layout::Flat => drop(create("subformat=monolithicFlat")),
        Layout::SplitSparse => drop(create("subformat=twoGbMaxExtentSparse")),
        Layout::Delta => {
            let parent = d.path().join("parent.vmdk");
            qemu_img(&["create", "-q", "-f", "vmdk", s(&parent), &size]).ok();
            let raw = d.path().join("parent.raw");
            let mut bytes = pseudo_random(SIZE as usize, 3);
            bytes[(1 << 20)..(2 << 20)].fill(0);
            std::fs::write(&raw, &bytes).unwrap();
            qemu_img(&["convert", "-q", "-n", "-f", "raw", "-O", "vmdk", s(&raw), s(&parent)]).ok();
            qemu_img(&["create", "-q", "-f", "vmdk", "-b", s(&parent), "-F", "vmdk", s(&img)]).ok();
            parent_content = Some(bytes);
        }
    }
    let open = || vdisk_tests::open_image(&reg, &img, Some("vmdk"), &OpenOptions::read_write());
    let subject = Subject { open: &open, backing: parent_content.as_deref() };
    let initial = parent_content.clone().unwrap_or_else(|| vec![0; SIZE as usize]);
    let model = model::run(&subject, initial, ops).map_err(TestCaseError::fail)?;
    let c = qemu_img(&["check", "-f", "vmdk", s(&img)]);
    prop_assert_eq!(c.code, 0, "{:?}: qemu-img check: {}{}", layout, c.stdout, c.stderr);
    let raw = d.path().join("expected.raw");
    std::fs::write(&raw, &model).unwrap();
    let m = qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&img)]);
    prop_assert_eq!(m.code, 0, "{:?}: qemu-img compare: {}{}", layout, m.stdout, m.stderr);
    for (file, flag) in unclean_flags(d.path()) {
        prop_assert_eq!(flag, 0, "{:?}: {} keeps its unclean-shutdown flag after close", layout, s(&file));
    }
    Ok(())
}

/// Operations a VMDK takes: everything but growth (qemu-img cannot resize vmdk either).
fn vmdk_ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![model::ops(SIZE, 512, 192 << 10), model::ops(SIZE, 1, 4096)]
        .prop_filter("VMDK disks are not resized", |op| !matches!(op, Op::Grow { .. }));
    prop::collection::vec(op, 1..30)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model::cases(12), max_shrink_iters: 100, .. ProptestConfig::default() })]

    #[test]
    fn monolithic_sparse_reads_back_like_the_model(ops in vmdk_ops()) {
        run(Layout::Sparse, &ops)?;
    }

    #[test]
    fn zeroed_grain_disks_read_back_like_the_model(ops in vmdk_ops()) {
        run(Layout::SparseZeroedGrains, &ops)?;
    }

    #[test]
    fn flat_disks_read_back_like_the_model(ops in vmdk_ops()) {
        run(Layout::Flat, &ops)?;
    }

    #[test]
    fn split_sparse_disks_read_back_like_the_model(ops in vmdk_ops()) {
        run(Layout::SplitSparse, &ops)?;
    }

    #[test]
    fn delta_disks_read_back_like_the_model(ops in vmdk_ops()) {
        run(Layout::Delta, &ops)?;
    }
}

#[test]
fn unclean_shutdown_flag_is_set_while_changes_are_open() {
    let d = tempdir();
    let reg = Registry::new();
    let img = d.path().join("disk.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&img), "4M"]).ok();
    let pristine = std::fs::read(&img).unwrap();
    let flag = || std::fs::read(&img).unwrap()[72];

    // Opening for writing and reading changes nothing: not the flag, not the CID.
    let drv = vdisk_tests::open_image(&reg, &img, Some("vmdk"), &OpenOptions::read_write()).unwrap();
    let mut buf = vec![0u8; 4096];
    drv.read_exact_at(0, &mut buf).unwrap();
    drv.close().unwrap();
    drop(drv);
    assert!(std::fs::read(&img).unwrap() == pristine, "a read-only session leaves the file alone");

    let drv = vdisk_tests::open_image(&reg, &img, Some("vmdk"), &OpenOptions::read_write()).unwrap();
    drv.write_all_at(65536, &[0x5a; 4096]).unwrap();
    assert_eq!(flag(), 1, "the flag is on disk once a write has been made");
    drv.flush().unwrap();
    assert_eq!(flag(), 1, "a flush does not end the session");
    drop(drv);
    // Dropped without close: a crash as far as the file can tell. qemu ignores the flag.
    assert_eq!(flag(), 1);
    qemu_io(&["-f", "vmdk", "-c", "read -P 0x5a 64k 4k", s(&img)]).ok();

    let drv = vdisk_tests::open_image(&reg, &img, Some("vmdk"), &OpenOptions::read_write()).unwrap();
    drv.write_all_at(0, &[1; 512]).unwrap();
    drv.close().unwrap();
    assert_eq!(flag(), 0, "a clean close clears the flag");
    drop(drv);
    qemu_img(&["check", s(&img)]).ok();
}

#[test]
fn untrusted_descriptors_reach_only_their_own_directory_tree() {
    let d = tempdir();
    let reg = Registry::new();
    let inner = d.path().join("vm");
    std::fs::create_dir_all(inner.join("disks")).unwrap();
    std::fs::write(inner.join("disks").join("data-flat.vmdk"), vec![0x42u8; 1 << 20]).unwrap();
    std::fs::write(d.path().join("outside-flat.vmdk"), vec![0x24u8; 1 << 20]).unwrap();
    let descriptor = |name: &str, extent: &str| {
        let p = inner.join(name);
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
             RW 2048 FLAT \"{extent}\" 0\nddb.adapterType = \"ide\"\n"
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    let inside = descriptor("inside.vmdk", "disks/data-flat.vmdk");
    let absolute = descriptor("absolute.vmdk", s(&d.path().join("outside-flat.vmdk")));
    let dotdot = descriptor("dotdot.vmdk", "../outside-flat.vmdk");
    let sneaky = descriptor("sneaky.vmdk", "disks/../../outside-flat.vmdk");

    let drv = vdisk_tests::open_image(&reg, &inside, None, &OpenOptions::untrusted()).unwrap();
    let mut buf = vec![0u8; 512];
    drv.read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    for refused in [&absolute, &dotdot, &sneaky] {
        let e = vdisk_tests::open_image(&reg, refused, None, &OpenOptions::untrusted()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{}: {e}", s(refused));
        assert!(e.to_string().contains("outside-flat.vmdk"), "{e}");
        // Trusted input (qemu-img's behaviour) opens the same descriptor.
        let drv = vdisk_tests::open_image(&reg, refused, None, &OpenOptions::default()).unwrap();
        drv.read_exact_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x24));
    }

    // A delta disk's parent is a reference like any other.
    let parent = d.path().join("parent.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&parent), "1M"]).ok();
    let child = inner.join("child.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-b", "../parent.vmdk", "-F", "vmdk", s(&child)]).ok();
    let e = vdisk_tests::open_image(&reg, &child, None, &OpenOptions::untrusted()).unwrap_err();
    assert!(e.to_string().contains("parent.vmdk"), "{e}");
    vdisk_tests::open_image(&reg, &child, None, &OpenOptions::default()).unwrap();
}
