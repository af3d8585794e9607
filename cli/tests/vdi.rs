//! VDI against qemu-img and qemu-io: images qemu-img writes read identically in vdisk (content,
//! `info`, `map`, `check`); images vdisk creates are qemu-img's byte for byte but for the random
//! UUIDs; what vdisk writes, qemu-img reads identically and checks clean; hostile headers fail
//! cleanly.

use std::path::Path;

use vdisk_tests::{pseudo_random, qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// A raw file with data, zeros and holes (6 MiB and a bit).
fn source(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    let mut bytes = pseudo_random((6 << 20) + 4096, 13);
    bytes[(1 << 20)..(3 << 20) + 512].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    raw
}

fn plaintext(tool: fn(&[&str]) -> Run, img: &Path, out: &Path) -> Vec<u8> {
    tool(&["convert", "-f", "vdi", "-O", "raw", s(img), s(out)]).ok();
    std::fs::read(out).unwrap()
}

/// The bytes of a VDI with the creation and modification UUIDs blanked.
fn masked(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    if b.len() >= 424 {
        b[392..424].fill(0);
    }
    b
}

#[test]
fn images_qemu_writes_read_identically() {
    let d = tempdir();
    let raw = source(d.path());
    for o in ["static=off", "static=on"] {
        let img = d.path().join("q.vdi");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["convert", "-f", "raw", "-O", "vdi", "-o", o, s(&raw), s(&img)]).ok();
        qemu_io(&["-f", "vdi", "-c", "write -P 0x61 5M 70000", "-c", "write -z 4M 1M", s(&img)]).ok();
        let want = plaintext(qemu_img, &img, &d.path().join("q.raw"));
        assert!(plaintext(vdisk, &img, &d.path().join("v.raw")) == want, "{o}: content");
        for args in [
            vec!["info", s(&img)],
            vec!["info", "--output=json", s(&img)],
            vec!["map", "--output=json", s(&img)],
            vec!["map", s(&img)],
            vec!["check", s(&img)],
            vec!["check", "--output=json", s(&img)],
            vec!["resize", s(&img), "20M"],
            vec!["measure", "-O", "vdi", "--size", "1G"],
        ] {
            let (q, v) = (qemu_img(&args), vdisk(&args));
            assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{o}: {args:?}");
        }
    }
}

#[test]
fn images_vdisk_creates_are_qemu_img_s_byte_for_byte() {
    let d = tempdir();
    for o in ["static=off", "static=on"] {
        for size in ["0", "1000", "1M", "5M", "100M", "10G"] {
            if o == "static=on" && size == "10G" {
                continue;
            }
            let (q, v) = (d.path().join("q.vdi"), d.path().join("v.vdi"));
            let _ = (std::fs::remove_file(&q), std::fs::remove_file(&v));
            let qr = qemu_img(&["create", "-f", "vdi", "-o", o, s(&q), size]);
            let vr = vdisk(&["create", "-f", "vdi", "-o", o, s(&v), size]);
            let case = format!("{o} {size}");
            assert_eq!(
                (qr.code, qr.stdout.replace("q.vdi", "X")),
                (vr.code, vr.stdout.replace("v.vdi", "X")),
                "{case}"
            );
            assert_eq!(qr.stderr.replace("q.vdi", "X"), vr.stderr.replace("v.vdi", "X"), "{case}");
            if qr.code == 0 {
                assert!(masked(&q) == masked(&v), "{case}: vdisk's file differs from qemu-img's");
            }
        }
    }
}

#[test]
fn images_vdisk_writes_read_identically_in_qemu() {
    let d = tempdir();
    let raw = source(d.path());
    for o in ["static=off", "static=on"] {
        let img = d.path().join("v.vdi");
        let _ = std::fs::remove_file(&img);
        vdisk(&["convert", "-f", "raw", "-O", "vdi", "-o", o, s(&raw), s(&img)]).ok();
        qemu_img(&["compare", "-f", "raw", "-F", "vdi", s(&raw), s(&img)]).ok();
        qemu_img(&["check", s(&img)]).ok();
        let q = d.path().join("q.vdi");
        let _ = std::fs::remove_file(&q);
        qemu_img(&["convert", "-f", "raw", "-O", "vdi", "-o", o, s(&raw), s(&q)]).ok();
        assert!(masked(&q) == masked(&img), "{o}: convert output differs from qemu-img's");
        // Partial-sector overwrites and zero writes through vdisk.
        let patch = d.path().join("patch.raw");
        let mut bytes = std::fs::read(&raw).unwrap();
        bytes[(2 << 20) + 7..(2 << 20) + 9000].fill(0x5a);
        bytes[(5 << 20)..(5 << 20) + 65536].fill(0);
        std::fs::write(&patch, &bytes).unwrap();
        vdisk(&["convert", "-n", "-f", "raw", "-O", "vdi", s(&patch), s(&img)]).ok();
        qemu_img(&["compare", "-f", "raw", "-F", "vdi", s(&patch), s(&img)]).ok();
        qemu_img(&["check", s(&img)]).ok();
    }
}

#[test]
fn hostile_headers_fail_cleanly() {
    let d = tempdir();
    let good = d.path().join("good.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", s(&good), "4M"]).ok();
    qemu_io(&["-f", "vdi", "-c", "write -P 3 0 2M", s(&good)]).ok();
    let base = std::fs::read(&good).unwrap();
    let patch = |name: &str, at: usize, bytes: &[u8]| {
        let mut b = base.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        let p = d.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let out = d.path().join("out.raw");
    let cases = [
        patch("blocks.vdi", 384, &0x7fff_ffffu32.to_le_bytes()),
        patch("blocksize.vdi", 376, &3u32.to_le_bytes()),
        patch("disksize.vdi", 368, &(u64::MAX / 2).to_le_bytes()),
        patch("offblocks.vdi", 340, &0x7fff_fe00u32.to_le_bytes()),
        patch("offdata.vdi", 344, &0x7fff_fe00u32.to_le_bytes()),
        patch("version.vdi", 68, &0x0002_0001u32.to_le_bytes()),
    ];
    for img in &cases {
        let start = std::time::Instant::now();
        let r = vdisk(&["convert", "-f", "vdi", "-O", "raw", s(img), s(&out)]);
        assert_ne!(r.code, 0, "{}: {}", s(img), r.stdout);
        assert!(!r.stderr.contains("panicked"), "{}: {}", s(img), r.stderr);
        assert!(start.elapsed().as_secs() < 10, "{}: slow", s(img));
    }
    // Map entries past the data area or duplicated: no panic, whatever the verdict.
    for (name, at, v) in [("past.vdi", 512 + 4, 0x00ff_ffffu32), ("dup.vdi", 512 + 4, 0u32)] {
        let img = patch(name, at, &v.to_le_bytes());
        for args in [vec!["convert", "-O", "raw", s(&img), s(&out)], vec!["check", s(&img)], vec!["map", s(&img)]] {
            let r = vdisk(&args);
            assert!(!r.stderr.contains("panicked"), "{name} {args:?}: {}", r.stderr);
        }
    }
}

/// Differencing VDIs (which qemu refuses): `create -b`, `convert -B`, `info`, `commit`, and a
/// parent named with `--image-opts` once the child has moved away from it.
#[test]
fn differencing_images_from_create_and_convert() {
    let d = tempdir();
    let p = |n: &str| d.path().join(n);
    let raw = source(d.path());
    let base = p("base.vdi");
    qemu_img(&["convert", "-f", "raw", "-O", "vdi", s(&raw), s(&base)]).ok();
    // The new content: the base with two ranges changed.
    let mut new = std::fs::read(&raw).unwrap();
    new[100..5000].copy_from_slice(&pseudo_random(4900, 77));
    new[(4 << 20) + 512..(5 << 20)].fill(0);
    let src = p("new.raw");
    std::fs::write(&src, &new).unwrap();

    // convert -B (as qemu-img's) writes the source's data and marks its zero blocks zero, so that
    // the parent does not show through them.
    let out = p("out.vdi");
    vdisk(&["convert", "-f", "raw", "-O", "vdi", "-B", "base.vdi", "-F", "vdi", s(&src), s(&out)]).ok();
    let q = qemu_img(&["info", s(&out)]);
    assert_ne!(q.code, 0, "qemu opens a differencing VDI?");
    assert!(q.stderr.contains("non-NULL link UUID"), "{}", q.stderr);
    let info: serde_json::Value =
        serde_json::from_str(&vdisk(&["info", "--output=json", s(&out)]).ok().stdout).unwrap();
    assert_eq!(info["backing-filename"], "base.vdi");
    assert_eq!(info["backing-filename-format"], "vdi");
    let head = std::fs::read(&out).unwrap();
    let allocated = u32::from_le_bytes(head[388..392].try_into().unwrap());
    let map: Vec<u32> = head[512..512 + 7 * 4].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(allocated, 5);
    assert_eq!((map[1], map[2]), (0xFFFF_FFFE, 0xFFFF_FFFE), "zero blocks: {map:x?}");
    assert!(plaintext(vdisk, &out, &p("out.raw")) == new);
    vdisk(&["check", s(&out)]).ok();

    // commit puts the child's blocks into the parent, which qemu then reads as the new content.
    vdisk(&["commit", "-q", s(&out)]).ok();
    let m = qemu_img(&["compare", "-f", "raw", "-F", "vdi", s(&src), s(&base)]);
    assert_eq!(m.code, 0, "{}{}", m.stdout, m.stderr);
    qemu_img(&["check", s(&base)]).ok();

    // create -b: the parent's size; a child moved elsewhere needs its parent named.
    std::fs::create_dir(p("elsewhere")).unwrap();
    let child = p("elsewhere/deep/child.vdi");
    std::fs::create_dir(p("elsewhere/deep")).unwrap();
    vdisk(&["create", "-q", "-f", "vdi", "-b", "../../base.vdi", "-F", "vdi", s(&child)]).ok();
    let r = vdisk(&["convert", "-O", "raw", s(&child), s(&p("child.raw"))]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("backing.file.filename"), "{}", r.stderr);
    let opts = format!("driver=vdi,file.filename={},backing.file.filename={}", s(&child), s(&base));
    let r = vdisk(&["info", "--image-opts", &opts]).ok();
    assert!(r.stdout.contains("virtual size: 6 MiB (6295552 bytes)"), "{}", r.stdout);
    vdisk(&["convert", "--image-opts", &opts, "-O", "raw", s(&p("child.raw"))]).ok();
    assert!(std::fs::read(p("child.raw")).unwrap() == new, "the child reads as its parent");
    // A named file that is not the parent is refused.
    let wrong = format!("driver=vdi,file.filename={},backing.file.filename={}", s(&child), s(&out));
    let r = vdisk(&["info", "--image-opts", &wrong]);
    assert!(r.code != 0 && r.stderr.contains("is not the parent"), "{}", r.stderr);
}

/// `check -r all` (qemu refuses `-r` for vdi) repairs what qemu's check reports: an entry past
/// the block count, two entries sharing data, a wrong allocated count. Afterwards qemu-img's
/// check is clean and every block that could be read still reads the same.
#[test]
fn check_repairs_what_qemu_reports() {
    let d = tempdir();
    let img = d.path().join("bad.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", s(&img), "6M"]).ok();
    qemu_io(&["-f", "vdi", "-c", "write -P 1 0 1M", "-c", "write -P 2 1M 1M", "-c", "write -P 3 2M 1M", s(&img)]).ok();
    let mut b = std::fs::read(&img).unwrap();
    let entry =
        |b: &mut Vec<u8>, block: usize, v: u32| b[512 + block * 4..516 + block * 4].copy_from_slice(&v.to_le_bytes());
    entry(&mut b, 1, 0x00ff_ffff); // block 1: index past the block count
    entry(&mut b, 3, 0); // block 3 shares block 0's data
    b[388..392].copy_from_slice(&7u32.to_le_bytes()); // allocated count
    std::fs::write(&img, &b).unwrap();
    let q = qemu_img(&["check", s(&img)]);
    assert_eq!(q.code, 2, "qemu sees the damage: {}{}", q.stdout, q.stderr);
    let v = vdisk(&["check", s(&img)]);
    assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "check agrees with qemu-img");
    // -r leaks has nothing to repair in a VDI.
    assert_eq!(vdisk(&["check", "-r", "leaks", s(&img)]).code, 2);

    let r = vdisk(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("were found and repaired:\n\n    0 leaked clusters\n    3 corruptions"), "{}", r.stdout);
    assert!(r.stdout.ends_with("No errors were found on the image.\n"), "{}", r.stdout);
    qemu_img(&["check", s(&img)]).ok();
    // Block 0 and 3 read the old shared data; writing one no longer changes the other.
    let mut want = vec![0u8; 6 << 20];
    want[..1 << 20].fill(1);
    want[2 << 20..3 << 20].fill(3);
    want[3 << 20..4 << 20].fill(1);
    assert!(plaintext(qemu_img, &img, &d.path().join("a.raw")) == want, "content after repair");
    qemu_io(&["-f", "vdi", "-c", "write -P 9 3M 1M", s(&img)]).ok();
    want[3 << 20..4 << 20].fill(9);
    assert!(plaintext(qemu_img, &img, &d.path().join("b.raw")) == want, "blocks 0 and 3 are separate");
    qemu_img(&["check", s(&img)]).ok();
}
