//! Persistent dirty bitmaps through the library, as a VMM uses them: enabled bitmaps record the
//! guest's writes, zeroes and discards while the image is open (marked in use on disk meanwhile),
//! a clean close stores them, and QEMU (qemu-nbd) then reads exactly the bits a model of the
//! same requests predicts. A crash (the driver never closed) leaves them inconsistent, never
//! silently stale.

use std::path::Path;

use blockdev::bitmap::DirtyBitmap;
use blockdev::{OpenOptions, ZeroFlags};
use vdisk_tests::bitmaps::dirty_ranges_via_qemu;
use vdisk_tests::{open_image, qemu_img, s, tempdir, XorShift};

const SIZE: u64 = 16 << 20;

fn rw() -> OpenOptions {
    OpenOptions { read_only: false, ..OpenOptions::default() }
}

/// An image with an enabled 64 KiB bitmap, an enabled 512-byte one and a disabled one (made by
/// qemu-img).
fn image(dir: &Path, cluster: &str) -> std::path::PathBuf {
    let img = dir.join("vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cluster}"), s(&img), "16M"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "64k", s(&img), "coarse"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "fine"]).ok();
    qemu_img(&["bitmap", "--add", "--disable", s(&img), "off"]).ok();
    img
}

fn flags(img: &Path) -> String {
    let r = qemu_img(&["info", "--output=json", "-U", s(img)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["format-specific"]["data"]["bitmaps"].to_string()
}

fn ranges(b: &DirtyBitmap) -> Vec<(u64, u64)> {
    b.dirty_ranges().collect()
}

#[test]
fn guest_writes_are_recorded_and_qemu_reads_them() {
    for cluster in ["65536", "4096"] {
        let d = tempdir();
        let img = image(d.path(), cluster);
        let reg = formats::Registry::new();
        let drv = open_image(&reg, &img, Some("qcow2"), &rw()).unwrap();
        let mut coarse = DirtyBitmap::new(65536, SIZE).unwrap();
        let mut fine = DirtyBitmap::new(512, SIZE).unwrap();
        let mut rng = XorShift::new(7 + cluster.len() as u64);
        for i in 0..60 {
            let off = rng.below(SIZE / 512) * 512;
            let len = (1 + rng.below(64)) * 512;
            let len = len.min(SIZE - off);
            match i % 4 {
                0 | 1 => drv.write_all_at(off, &vec![i as u8 + 1; len as usize]).unwrap(),
                2 => drv.write_zeroes(off, len, ZeroFlags { may_unmap: true, ..ZeroFlags::default() }).unwrap(),
                _ => drv.discard(off, len).unwrap(),
            }
            coarse.set_range(off, len);
            fine.set_range(off, len);
            if i == 0 {
                let f = flags(&img);
                assert_eq!(f.matches("in-use").count(), 2, "enabled bitmaps are in use while open: {f}");
            }
        }
        let api = drv.bitmaps().unwrap();
        api.mark_dirty(SIZE - 512, 512).unwrap();
        coarse.set_range(SIZE - 512, 512);
        fine.set_range(SIZE - 512, 512);
        assert_eq!(ranges(&api.read("fine").unwrap()), ranges(&fine));
        assert!(api.read("off").unwrap().is_empty());
        drv.close().unwrap();
        drop(drv);
        assert!(!flags(&img).contains("in-use"), "a clean close stores them: {}", flags(&img));
        let c = qemu_img(&["check", s(&img)]);
        assert_eq!(c.code, 0, "{}", c.stdout);
        let got = dirty_ranges_via_qemu(&img, &["coarse", "fine", "off"]);
        assert_eq!(got[0], ranges(&coarse), "coarse, cluster {cluster}");
        assert_eq!(got[1], ranges(&fine), "fine, cluster {cluster}");
        assert!(got[2].is_empty(), "the disabled bitmap records nothing");
    }
}

#[test]
fn a_crash_leaves_the_recording_bitmaps_inconsistent() {
    let d = tempdir();
    let img = image(d.path(), "65536");
    let reg = formats::Registry::new();
    let drv = open_image(&reg, &img, Some("qcow2"), &rw()).unwrap();
    drv.write_all_at(1 << 20, &[5; 4096]).unwrap();
    drv.flush().unwrap();
    // The machine dies now: what the disk holds is a copy taken before the close.
    let crashed = d.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    drv.close().unwrap();
    drop(drv);
    let img = crashed;
    let f = flags(&img);
    assert_eq!(f.matches("in-use").count(), 2, "{f}");
    // A crash may leak clusters (the directory replaced when recording began), nothing worse.
    let c = qemu_img(&["check", s(&img)]);
    assert!(c.code == 0 || (c.code == 3 && !c.stdout.contains("ERROR")), "{}{}", c.stdout, c.stderr);
    let drv = open_image(&reg, &img, Some("qcow2"), &rw()).unwrap();
    let api = drv.bitmaps().unwrap();
    let e = api.read("coarse").unwrap_err();
    assert!(e.message().contains("inconsistent"), "{e}");
    // The disabled one was not recording and stays usable; writes no longer mark the others.
    drv.write_all_at(0, &[1; 512]).unwrap();
    assert!(api.read("off").unwrap().is_empty());
    api.remove("coarse").unwrap();
    api.remove("fine").unwrap();
    drv.close().unwrap();
    drop(drv);
    assert!(qemu_img(&["check", s(&img)]).code != 1);
    assert!(!flags(&img).contains("in-use"));
}

#[test]
fn changes_in_one_batch_are_stored_once_and_stop_at_the_first_failure() {
    use blockdev::bitmap::{BitmapChange, MergeSource};
    let d = tempdir();
    let img = image(d.path(), "65536");
    let reg = formats::Registry::new();
    let drv = open_image(&reg, &img, Some("qcow2"), &rw()).unwrap();
    drv.write_all_at(0, &[1; 65536]).unwrap();
    let api = drv.bitmaps().unwrap();
    let r = api.apply(&[
        BitmapChange::Add { name: "copy", granularity: Some(4096), enabled: false },
        BitmapChange::Merge { name: "copy", from: MergeSource::Bitmap("coarse") },
        BitmapChange::Clear("coarse"),
        BitmapChange::Remove("nosuch"),
        BitmapChange::Remove("fine"),
    ]);
    let (i, e) = r.unwrap_err();
    assert_eq!(i, 3);
    assert_eq!(e.message(), "Dirty bitmap 'nosuch' not found");
    let names: Vec<String> = api.list().unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["coarse", "fine", "off", "copy"]);
    assert_eq!(ranges(&api.read("copy").unwrap()), [(0, 65536)]);
    assert!(api.read("coarse").unwrap().is_empty());
    drv.close().unwrap();
    drop(drv);
    assert_eq!(qemu_img(&["check", s(&img)]).code, 0);
    let got = dirty_ranges_via_qemu(&img, &["copy", "coarse", "fine"]);
    assert_eq!(got, [vec![(0, 65536)], vec![], vec![(0, 65536)]]);
}

#[test]
fn hostile_bitmap_directories_fail_cleanly() {
    let d = tempdir();
    let img = image(d.path(), "65536");
    let bytes = std::fs::read(&img).unwrap();
    let ext = bytes.windows(4).position(|w| w == [0x23, 0x85, 0x28, 0x75]).unwrap();
    let data = ext + 8;
    let reg = formats::Registry::new();
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("zero bitmaps", Box::new(move |b: &mut Vec<u8>| b[data..data + 4].copy_from_slice(&0u32.to_be_bytes()))),
        ("too many", Box::new(move |b: &mut Vec<u8>| b[data..data + 4].copy_from_slice(&70000u32.to_be_bytes()))),
        (
            "huge directory",
            Box::new(move |b: &mut Vec<u8>| b[data + 8..data + 16].copy_from_slice(&u64::MAX.to_be_bytes())),
        ),
        (
            "directory past the end",
            Box::new(move |b: &mut Vec<u8>| b[data + 16..data + 24].copy_from_slice(&(1u64 << 50).to_be_bytes())),
        ),
        ("unaligned directory", Box::new(move |b: &mut Vec<u8>| b[data + 23] |= 8)),
        ("fewer bitmaps than counted", Box::new(move |b: &mut Vec<u8>| b[data + 3] += 1)),
    ];
    for (what, corrupt) in cases {
        let mut b = bytes.clone();
        corrupt(&mut b);
        let bad = d.path().join("bad.qcow2");
        std::fs::write(&bad, &b).unwrap();
        let r = open_image(&reg, &bad, Some("qcow2"), &OpenOptions::default());
        let e = r.expect_err(what);
        let q = qemu_img(&["info", s(&bad)]);
        assert_ne!(q.code, 0, "{what}: qemu-img refuses it too");
        assert!(!e.message().is_empty(), "{what}");
        // check opens it all the same (to report and repair) unless the extension itself is bad.
        let for_check = OpenOptions { for_check: true, ..OpenOptions::default() };
        let opened = open_image(&reg, &bad, Some("qcow2"), &for_check);
        let ext_broken = ["zero bitmaps", "too many", "huge directory"].contains(&what);
        assert_eq!(opened.is_ok(), !ext_broken, "{what}");
    }
}
