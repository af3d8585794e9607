//! VHD (vpc) against qemu-img, qemu-io and libvhdi (Debian's python3-libvhdi, an independent
//! reader): disks qemu-img writes read identically in vdisk (content, `info`, `map`); disks vdisk
//! creates are qemu-img's byte for byte but for the timestamp, the UUID and their checksums;
//! what vdisk writes, qemu-img and libvhdi read identically; differencing disks read through
//! their parent; hostile footers and headers fail cleanly.

use std::path::Path;

use vdisk_tests::{pseudo_random, qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// A raw file with data, zeros and holes (9 MiB).
fn source(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    let mut bytes = pseudo_random(9 << 20, 11);
    bytes[(2 << 20)..(4 << 20) + 512].fill(0);
    bytes[(6 << 20) + 100..(7 << 20)].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    raw
}

const SUBFORMATS: &[&str] = &["subformat=dynamic", "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on"];

fn plaintext(tool: fn(&[&str]) -> Run, img: &Path, out: &Path) -> Vec<u8> {
    tool(&["convert", "-f", "vpc", "-O", "raw", s(img), s(out)]).ok();
    std::fs::read(out).unwrap()
}

/// The bytes of a VHD with the footers' timestamp, checksum and UUID blanked.
fn masked(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    let len = b.len();
    for base in [0, len.saturating_sub(512)] {
        if b.len() >= base + 512 && &b[base..base + 8] == b"conectix" {
            b[base + 24..base + 28].fill(0);
            b[base + 64..base + 84].fill(0);
        }
    }
    b
}

/// Reads `img` with libvhdi (its parent set when given) into the bytes of the whole disk.
fn libvhdi(img: &Path, parent: Option<&Path>) -> Vec<u8> {
    let out = img.with_extension("libvhdi");
    let set_parent =
        parent.map_or(String::new(), |p| format!("p = pyvhdi.file()\np.open('{}')\nf.set_parent(p)\n", s(p)));
    let script = format!(
        "import pyvhdi\nf = pyvhdi.file()\nf.open('{}')\n{set_parent}n = f.get_media_size()\n\
         open('{}', 'wb').write(f.read_buffer(n))\n",
        s(img),
        s(&out)
    );
    let r = std::process::Command::new("/usr/bin/python3").args(["-c", &script]).output().expect("python3");
    assert!(r.status.success(), "libvhdi (python3-libvhdi): {}", String::from_utf8_lossy(&r.stderr));
    std::fs::read(&out).unwrap()
}

#[test]
fn every_subformat_qemu_writes_reads_identically() {
    let d = tempdir();
    let raw = source(d.path());
    for (i, o) in SUBFORMATS.iter().enumerate() {
        let img = d.path().join(format!("q{i}.vhd"));
        qemu_img(&["convert", "-f", "raw", "-O", "vpc", "-o", o, s(&raw), s(&img)]).ok();
        qemu_io(&["-f", "vpc", "-c", "write -P 0x61 5M 70000", "-c", "write -z 8M 4096", s(&img)]).ok();
        let want = plaintext(qemu_img, &img, &d.path().join("q.raw"));
        let got = plaintext(vdisk, &img, &d.path().join("v.raw"));
        assert!(got == want, "{o}: content");
        for args in [
            vec!["info", "-f", "vpc", s(&img)],
            vec!["info", "-f", "vpc", "--output=json", s(&img)],
            vec!["map", "-f", "vpc", "--output=json", s(&img)],
            vec!["map", "-f", "vpc", s(&img)],
            vec!["check", "-f", "vpc", s(&img)],
            vec!["resize", "-f", "vpc", s(&img), "20M"],
            vec!["measure", "-O", "vpc", "--size", "1G"],
        ] {
            let (q, v) = (qemu_img(&args), vdisk(&args));
            assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{o}: {args:?}");
        }
    }
}

#[test]
fn disks_vdisk_creates_are_qemu_img_s_byte_for_byte() {
    let d = tempdir();
    for o in SUBFORMATS.iter().chain(&["subformat=fixed,preallocation=full", "subformat=bogus"]) {
        for size in ["0", "1000", "1M", "100M", "3G", "300G", "2040G", "2041G"] {
            // Fixed disks are as large as they say: the byte comparison reads them whole.
            if o.contains("fixed") && size.ends_with('G') {
                continue;
            }
            let (q, v) = (d.path().join("q.vhd"), d.path().join("v.vhd"));
            let _ = (std::fs::remove_file(&q), std::fs::remove_file(&v));
            let qr = qemu_img(&["create", "-f", "vpc", "-o", o, s(&q), size]);
            let vr = vdisk(&["create", "-f", "vpc", "-o", o, s(&v), size]);
            let case = format!("{o} {size}");
            assert_eq!(
                (qr.code, qr.stdout.replace("q.vhd", "X")),
                (vr.code, vr.stdout.replace("v.vhd", "X")),
                "{case}"
            );
            assert_eq!(qr.stderr.replace("q.vhd", "X"), vr.stderr.replace("v.vhd", "X"), "{case}");
            if qr.code == 0 {
                assert!(masked(&q) == masked(&v), "{case}: vdisk's file differs from qemu-img's");
                let (qi, vi) = (qemu_img(&["info", "-f", "vpc", s(&v)]), qemu_img(&["info", "-f", "vpc", s(&q)]));
                assert_eq!(qi.stdout.replace("v.vhd", "X"), vi.stdout.replace("q.vhd", "X"), "{case}: info");
            }
        }
    }
}

#[test]
fn disks_vdisk_writes_read_identically_in_qemu_and_libvhdi() {
    let d = tempdir();
    let raw = source(d.path());
    for (i, o) in SUBFORMATS.iter().enumerate() {
        let img = d.path().join(format!("v{i}.vhd"));
        vdisk(&["convert", "-f", "raw", "-O", "vpc", "-o", o, s(&raw), s(&img)]).ok();
        qemu_img(&["compare", "-f", "raw", "-F", "vpc", s(&raw), s(&img)]).ok();
        let mut want = std::fs::read(&raw).unwrap();
        let read = libvhdi(&img, None);
        want.resize(read.len(), 0);
        assert!(read == want, "{o}: libvhdi reads vdisk's disk differently");
        // The same bytes as qemu-img's convert, but for timestamp and UUID.
        let q = d.path().join(format!("q{i}.vhd"));
        qemu_img(&["convert", "-f", "raw", "-O", "vpc", "-o", o, s(&raw), s(&q)]).ok();
        assert!(masked(&q) == masked(&img), "{o}: convert output differs from qemu-img's");
        if *o == "subformat=fixed,force_size=on" {
            // What Azure asks for: a whole number of MiB exactly, then the footer.
            assert_eq!(std::fs::metadata(&img).unwrap().len(), (9 << 20) + 512, "Azure's fixed layout");
            assert_eq!(&std::fs::read(&img).unwrap()[9 << 20..(9 << 20) + 8], b"conectix");
        }
        // Overwrites, partial sectors and zero writes through vdisk, checked by qemu-io.
        let patch = d.path().join("patch.raw");
        let mut bytes = std::fs::read(&raw).unwrap();
        bytes[(3 << 20) + 7..(3 << 20) + 9000].fill(0x5a);
        bytes[(8 << 20)..(8 << 20) + 65536].fill(0);
        std::fs::write(&patch, &bytes).unwrap();
        vdisk(&["convert", "-n", "-f", "raw", "-O", "vpc", s(&patch), s(&img)]).ok();
        qemu_img(&["compare", "-f", "raw", "-F", "vpc", s(&patch), s(&img)]).ok();
    }
}

#[test]
fn differencing_disks_read_through_their_parent() {
    let d = tempdir();
    let raw = source(d.path());
    let parent = d.path().join("parent.vhd");
    qemu_img(&["convert", "-f", "raw", "-O", "vpc", s(&raw), s(&parent)]).ok();
    let child = d.path().join("child.vhd");
    // qemu-img has no differencing VHDs to create.
    let q = qemu_img(&["create", "-f", "vpc", "-b", s(&parent), "-F", "vpc", s(&d.path().join("q.vhd"))]);
    assert_ne!(q.code, 0);
    vdisk(&["create", "-q", "-f", "vpc", "-b", "parent.vhd", "-F", "vpc", s(&child)]).ok();
    let info = vdisk(&["info", s(&child)]).ok().stdout;
    assert!(info.contains("backing file: parent.vhd") && info.contains("backing file format: vpc"), "{info}");
    let chain = vdisk(&["info", "--backing-chain", s(&child)]).ok().stdout;
    assert_eq!(chain.matches("image: ").count(), 2, "{chain}");
    // The child reads the parent's content; libvhdi agrees.
    let mut want = std::fs::read(&raw).unwrap();
    let got = plaintext(vdisk, &child, &d.path().join("c.raw"));
    want.resize(got.len(), 0);
    assert!(got == want, "child over parent");
    assert!(libvhdi(&child, Some(&parent)) == want, "libvhdi: child over parent");
    // Whole-block writes into the child: the parent stays as it was.
    let patch = d.path().join("patch.raw");
    let mut changed = want.clone();
    changed[(4 << 20)..(6 << 20)].fill(0x42);
    std::fs::write(&patch, &changed).unwrap();
    let before = std::fs::read(&parent).unwrap();
    vdisk(&["convert", "-n", "-f", "raw", "-O", "vpc", s(&patch), s(&child)]).ok();
    assert!(plaintext(vdisk, &child, &d.path().join("c2.raw")) == changed);
    assert!(libvhdi(&child, Some(&parent)) == changed, "libvhdi: child after writes");
    assert!(std::fs::read(&parent).unwrap() == before, "the parent is untouched");
    // A parent replaced by another disk under the same name is refused by its UUID.
    let moved = d.path().join("parent.orig.vhd");
    std::fs::rename(&parent, &moved).unwrap();
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "vpc", s(&patch), s(&parent)]).ok();
    let r = vdisk(&["convert", "-O", "raw", s(&child), s(&d.path().join("c3.raw"))]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("is not the parent"), "{}", r.stderr);
    std::fs::rename(&moved, &parent).unwrap();
    assert!(plaintext(vdisk, &child, &d.path().join("c4.raw")) == changed, "the real parent opens again");
    // A differencing disk that names itself as its parent fails cleanly.
    let looped = d.path().join("loop.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&looped), "4M"]).ok();
    let x = d.path().join("x.vhd");
    vdisk(&["create", "-q", "-f", "vpc", "-b", "loop.vhd", "-F", "vpc", s(&x)]).ok();
    std::fs::copy(&x, &looped).unwrap();
    let r = vdisk(&["convert", "-O", "raw", s(&looped), s(&d.path().join("l.raw"))]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn hostile_footers_and_headers_fail_cleanly() {
    let d = tempdir();
    let good = d.path().join("good.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&good), "10M"]).ok();
    qemu_io(&["-f", "vpc", "-c", "write -P 3 0 3M", s(&good)]).ok();
    let base = std::fs::read(&good).unwrap();
    let len = base.len();
    let patch = |name: &str, edits: &[(usize, &[u8])]| {
        let mut b = base.clone();
        for (at, bytes) in edits {
            b[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        let p = d.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    // A damaged trailing footer: the copy at the start is used (content unchanged).
    let tail = patch("tail.vhd", &[(len - 512 + 40, &[9; 8])]);
    let out = d.path().join("out.raw");
    assert!(plaintext(vdisk, &tail, &out) == plaintext(qemu_img, &good, &d.path().join("good.raw")));
    // A header with a fixed-up checksum but absurd fields.
    let header = |name: &str, at: usize, bytes: &[u8]| {
        let mut b = base.clone();
        b[512 + at..512 + at + bytes.len()].copy_from_slice(bytes);
        b[512 + 36..512 + 40].fill(0);
        let sum = !b[512..1536].iter().map(|&v| v as u32).fold(0u32, u32::wrapping_add);
        b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
        let p = d.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let cases = [
        patch("both.vhd", &[(40, &[9; 8]), (len - 512 + 40, &[9; 8])]),
        header("entries.vhd", 28, &0x7fff_ffffu32.to_be_bytes()),
        header("blocksize.vhd", 32, &3u32.to_be_bytes()),
        header("hugeblock.vhd", 32, &(1u32 << 31).to_be_bytes()),
        header("table.vhd", 16, &(1u64 << 40).to_be_bytes()),
        header("small.vhd", 28, &1u32.to_be_bytes()),
        patch("headersum.vhd", &[(512 + 100, &[1])]),
        patch("size.vhd", &[(48, &(u64::MAX / 2).to_be_bytes()), (len - 512 + 48, &(u64::MAX / 2).to_be_bytes())]),
    ];
    for img in &cases {
        let start = std::time::Instant::now();
        let r = vdisk(&["convert", "-f", "vpc", "-O", "raw", s(img), s(&out)]);
        assert_ne!(r.code, 0, "{}: {}", s(img), r.stdout);
        assert!(!r.stderr.contains("panicked"), "{}: {}", s(img), r.stderr);
        assert!(start.elapsed().as_secs() < 10, "{}: slow", s(img));
    }
    // A table entry past the end of the file is refused at open, as in qemu; one pointing into
    // the header is refused for writes, and the header survives.
    let past = patch("past.vhd", &[(1536 + 4, &0x00ff_ffffu32.to_be_bytes())]);
    let (q, v) = (qemu_img(&["info", s(&past)]), vdisk(&["info", s(&past)]));
    assert_eq!((q.code, &q.stderr), (v.code, &v.stderr), "a block past the end of the file");
    let meta = patch("meta.vhd", &[(1536, &1u32.to_be_bytes())]);
    let data = d.path().join("data.raw");
    std::fs::write(&data, vec![7u8; 4096]).unwrap();
    let r = vdisk(&["convert", "-n", "-f", "raw", "-O", "vpc", s(&data), s(&meta)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("points into the VHD metadata"), "{}", r.stderr);
    assert_eq!(&std::fs::read(&meta).unwrap()[..8], b"conectix", "the footer copy survives");
}
