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
            vec!["check", "-r", "all", s(&img)],
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
