//! VMDK against qemu-img and qemu-io: every subformat qemu-img writes reads identically in vdisk
//! (content, `info`, `map`); what vdisk creates and writes, qemu-img reads identically and checks
//! clean; hostile headers and descriptors fail cleanly.

use std::path::Path;

use vdisk_tests::{pseudo_random, qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// A raw file with data, zeros and holes (8 MiB).
fn source(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    let mut bytes = pseudo_random(8 << 20, 7);
    bytes[(1 << 20)..(3 << 20)].fill(0);
    bytes[(5 << 20) + 100..(6 << 20)].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    raw
}

const SUBFORMATS: &[&str] =
    &["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"];

fn plaintext(tool: fn(&[&str]) -> Run, img: &Path, out: &Path) -> Vec<u8> {
    tool(&["convert", "-f", "vmdk", "-O", "raw", s(img), s(out)]).ok();
    std::fs::read(out).unwrap()
}

#[test]
fn every_subformat_qemu_writes_reads_identically() {
    let d = tempdir();
    let raw = source(d.path());
    for (i, sub) in SUBFORMATS.iter().enumerate() {
        for zeroed in ["off", "on"] {
            if zeroed == "on" && sub.ends_with("Flat") {
                continue;
            }
            let img = d.path().join(format!("q{i}{zeroed}.vmdk"));
            let o = format!("subformat={sub},zeroed_grain={zeroed},adapter_type=lsilogic");
            qemu_img(&["convert", "-f", "raw", "-O", "vmdk", "-o", &o, s(&raw), s(&img)]).ok();
            if *sub != "streamOptimized" {
                qemu_io(&["-f", "vmdk", "-c", "write -P 0x61 7M 65536", "-c", "write -z 0 128k", s(&img)]).ok();
            }
            let want = plaintext(qemu_img, &img, &d.path().join("q.raw"));
            let got = plaintext(vdisk, &img, &d.path().join("v.raw"));
            assert!(got == want, "{o}: content");
            for args in [
                vec!["info", s(&img)],
                vec!["info", "--output=json", s(&img)],
                vec!["map", "--output=json", s(&img)],
                vec!["map", s(&img)],
            ] {
                let (q, v) = (qemu_img(&args), vdisk(&args));
                assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{o}: {args:?}");
            }
        }
    }
}

#[test]
fn disks_vdisk_creates_match_qemu_layout_and_read_back() {
    let d = tempdir();
    let raw = source(d.path());
    let subformats = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"];
    for (i, sub) in subformats.iter().enumerate() {
        for (j, o) in ["", ",adapter_type=buslogic,hwversion=7", ",compat6=on,zeroed_grain=on", ",toolsversion=10240"]
            .iter()
            .enumerate()
        {
            let opts = format!("subformat={sub}{o}");
            // The same name in two directories: the files may differ only in the random CID.
            let (qd, vd) = (d.path().join(format!("q{i}{j}")), d.path().join(format!("v{i}{j}")));
            std::fs::create_dir(&qd).unwrap();
            std::fs::create_dir(&vd).unwrap();
            let (q, v) = (qd.join("disk.vmdk"), vd.join("disk.vmdk"));
            let size = if sub.starts_with("twoGb") { "5G" } else { "100M" };
            let qr = qemu_img(&["create", "-f", "vmdk", "-o", &opts, s(&q), size]);
            let vr = vdisk(&["create", "-f", "vmdk", "-o", &opts, s(&v), size]);
            let rel = |t: &str, dir: &Path| t.replace(s(dir), "DIR");
            assert_eq!((qr.code, rel(&qr.stdout, &qd)), (vr.code, rel(&vr.stdout, &vd)), "{opts}");
            assert_eq!(
                qr.stderr.replace(s(&qd), "DIR"),
                vr.stderr.replace(s(&vd), "DIR").replace("vdisk:", "qemu-img:")
            );
            if qr.code != 0 {
                continue;
            }
            let mut names: Vec<_> = std::fs::read_dir(&qd).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            let mut vnames: Vec<_> = std::fs::read_dir(&vd).unwrap().map(|e| e.unwrap().file_name()).collect();
            vnames.sort();
            assert_eq!(names, vnames, "{opts}: files");
            // Sparse files: every byte outside the descriptor area (sectors 1-20) as qemu's, and
            // the descriptor text but for its CID line; descriptor files: the text but the CID.
            let without_cid = |p: &Path| -> Vec<u8> {
                let t = std::fs::read(p).unwrap();
                let text_of = |b: &[u8]| -> Vec<u8> {
                    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
                    let text = String::from_utf8_lossy(&b[..end]).into_owned();
                    text.split('\n').filter(|l| !l.starts_with("CID=")).collect::<Vec<_>>().join("\n").into_bytes()
                };
                if t.starts_with(b"KDMV") {
                    let mut out = t[..512].to_vec();
                    out.extend(text_of(&t[512..21 * 512]));
                    out.extend(&t[21 * 512..]);
                    out
                } else {
                    text_of(&t)
                }
            };
            for n in &names {
                let (a, b) = (qd.join(n), vd.join(n));
                let len = std::fs::metadata(&a).unwrap().len();
                if len < (1 << 20) {
                    assert!(without_cid(&a) == without_cid(&b), "{opts}: {n:?} differs from qemu-img's");
                } else {
                    assert_eq!(len, std::fs::metadata(&b).unwrap().len(), "{opts}: {n:?}");
                }
            }
            qemu_img(&["check", s(&v)]).ok();
            if sub.starts_with("twoGb") {
                continue;
            }
            let before = cid(&v);
            vdisk(&["convert", "-n", "-f", "raw", "-O", "vmdk", s(&raw), s(&v)]).ok();
            qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&v)]).ok();
            qemu_img(&["check", s(&v)]).ok();
            assert_ne!(before, cid(&v), "{opts}: writing gives the disk a new CID");
        }
    }
}

/// Every subformat x adapter x zeroed_grain x backing vdisk creates and writes: qemu-img accepts
/// and refuses the same option sets, reads vdisk's content identically (`compare` against the
/// source), checks clean, and prints the same `info` for vdisk's file as vdisk does.
#[test]
fn every_layout_vdisk_writes_reads_identically_in_qemu() {
    let d = tempdir();
    let raw = source(d.path());
    let parent = d.path().join("parent.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&parent), "8M"]).ok();
    qemu_io(&["-f", "vmdk", "-c", "write -P 0x77 0 8M", s(&parent)]).ok();
    let mut written = 0;
    for (i, sub) in SUBFORMATS.iter().enumerate() {
        for (j, adapter) in ["ide", "buslogic", "lsilogic", "legacyESX"].iter().enumerate() {
            for zeroed in ["off", "on"] {
                for backing in [false, true] {
                    let (qd, vd) = (d.path().join(format!("q{i}{j}{zeroed}{backing}")), d.path().join("v"));
                    let _ = std::fs::remove_dir_all(&vd);
                    std::fs::create_dir(&vd).unwrap();
                    std::fs::create_dir(&qd).unwrap();
                    let (q, v) = (qd.join("disk.vmdk"), vd.join("disk.vmdk"));
                    let o = format!("subformat={sub},adapter_type={adapter},zeroed_grain={zeroed}");
                    let mut args = vec!["create", "-q", "-f", "vmdk", "-o", &o];
                    if backing {
                        args.extend(["-b", s(&parent), "-F", "vmdk"]);
                    }
                    let qr = qemu_img(&[&args[..], &[s(&q), "8M"]].concat());
                    let vr = vdisk(&[&args[..], &[s(&v), "8M"]].concat());
                    let case = format!("{o} backing={backing}");
                    assert_eq!(
                        (qr.code, qr.stderr.replace(s(&qd), "DIR")),
                        (vr.code, vr.stderr.replace(s(&vd), "DIR").replace("vdisk:", "qemu-img:")),
                        "{case}: create"
                    );
                    if qr.code != 0 {
                        continue;
                    }
                    vdisk(&["convert", "-n", "-f", "raw", "-O", "vmdk", s(&raw), s(&v)]).ok();
                    qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&v)]).ok();
                    let c = qemu_img(&["check", s(&v)]);
                    assert!(c.code == 0 || c.stderr.contains("does not support checks"), "{case}: {c:?}");
                    let (qi, vi) = (qemu_img(&["info", s(&v)]), vdisk(&["info", s(&v)]));
                    assert_eq!((qi.code, &qi.stdout), (vi.code, &vi.stdout), "{case}: info");
                    written += 1;
                }
            }
        }
    }
    assert!(written >= 40, "only {written} layouts were created");
}

/// The CID qemu-img reports.
fn cid(img: &Path) -> u64 {
    let info = qemu_img(&["info", "--output=json", s(img)]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["format-specific"]["data"]["cid"].as_u64().unwrap()
}

#[test]
fn writes_through_vdisk_match_qemu_io() {
    let d = tempdir();
    for (i, zeroed) in ["off", "on"].iter().enumerate() {
        let q = d.path().join(format!("q{i}.vmdk"));
        let v = d.path().join(format!("v{i}.vmdk"));
        let o = format!("zeroed_grain={zeroed}");
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", &o, s(&q), "16M"]).ok();
        std::fs::copy(&q, &v).unwrap();
        let ops = ["write -P 0x11 1000 70000", "write -P 0x22 3M 1M", "write -z 3M 64k", "write -P 0x33 16775000 1000"];
        for op in ops {
            qemu_io(&["-f", "vmdk", "-c", op, s(&q)]).ok();
        }
        // vdisk writes the same through `dd`-free means: convert -n of qemu's result into a copy.
        vdisk(&["convert", "-n", "-f", "vmdk", "-O", "vmdk", s(&q), s(&v)]).ok();
        qemu_img(&["compare", s(&q), s(&v)]).ok();
        qemu_img(&["check", s(&v)]).ok();
    }
}

/// Zero writes through vdisk: whole grains of a zeroed_grain disk become zeroed grains (as
/// qemu-io's `write -z` makes them), the rest is written as zeros; qemu-img reads the same.
#[test]
fn zero_writes_become_zeroed_grains() {
    let d = tempdir();
    let (z, y) = (d.path().join("z.vmdk"), d.path().join("y.vmdk"));
    for img in [&z, &y] {
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", s(img), "4M"]).ok();
        qemu_io(&["-f", "vmdk", "-c", "write -P 1 0 4M", s(img)]).ok();
    }
    qemu_io(&["-f", "vmdk", "-c", "write -z 64k 192k", "-c", "write -z 1000 2000", s(&z)]).ok();
    vdisk(&["convert", "-n", "-f", "vmdk", "-O", "vmdk", s(&z), s(&y)]).ok();
    qemu_img(&["compare", s(&z), s(&y)]).ok();
    qemu_img(&["check", s(&y)]).ok();
    let map = qemu_img(&["map", "--output=json", s(&y)]).ok().stdout;
    assert!(
        map.contains(
            "{ \"start\": 65536, \"length\": 196608, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"
        ),
        "{map}"
    );
}

/// A delta disk vdisk creates over a qemu-made parent reads through to it, records the parent's
/// CID, and refuses to open once the parent changed (its CID no longer matches).
#[test]
fn delta_disks_follow_and_check_their_parent() {
    let d = tempdir();
    let (base, delta) = (d.path().join("base.vmdk"), d.path().join("delta.vmdk"));
    qemu_img(&["create", "-q", "-f", "vmdk", s(&base), "8M"]).ok();
    qemu_io(&["-f", "vmdk", "-c", "write -P 5 0 8M", s(&base)]).ok();
    let r = vdisk(&["create", "-f", "vmdk", "-b", s(&base), "-F", "vmdk", s(&delta)]);
    let q = qemu_img(&["create", "-f", "vmdk", "-b", s(&base), "-F", "vmdk", s(&d.path().join("q.vmdk"))]);
    assert_eq!((r.code, r.stdout.replace("delta.vmdk", "X")), (q.code, q.stdout.replace("q.vmdk", "X")));
    qemu_io(&["-f", "vmdk", "-c", "write -P 6 1M 100k", s(&delta)]).ok();
    let out = d.path().join("flat.raw");
    vdisk(&["convert", "-O", "raw", s(&delta), s(&out)]).ok();
    let mut want = vec![5u8; 8 << 20];
    want[1 << 20..(1 << 20) + 102400].fill(6);
    assert!(std::fs::read(&out).unwrap() == want, "parent plus child");
    let (qi, vi) = (qemu_img(&["info", s(&delta)]), vdisk(&["info", s(&delta)]));
    assert_eq!((qi.code, &qi.stdout), (vi.code, &vi.stdout));
    // Writing the parent gives it a new CID: the delta no longer matches it.
    vdisk(&["convert", "-n", "-O", "vmdk", s(&out), s(&base)]).ok();
    let args = ["info", s(&delta)];
    let (q, v) = (qemu_img(&args), vdisk(&args));
    assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "info");
    // Reading through the changed parent fails as in qemu (which reports each failed request).
    let args = ["convert", "-O", "raw", s(&delta), s(&out)];
    let (q, v) = (qemu_img(&args), vdisk(&args));
    assert_eq!((q.code, q.stderr.lines().next()), (v.code, v.stderr.lines().next()), "convert");
    assert_eq!(v.code, 1);
}

/// streamOptimized files vdisk writes have the specification's layout (header with the
/// directory at the end, footer marker and footer 1536 and 1024 bytes before the end, the
/// end-of-stream marker last), read identically in qemu-img and in libvmdk (an independent
/// reader, Debian's python3-libvmdk), and check clean.
#[test]
fn stream_optimized_files_have_the_spec_layout_and_read_everywhere() {
    let d = tempdir();
    let raw = source(d.path());
    let img = d.path().join("s.vmdk");
    vdisk(&["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", s(&raw), s(&img)]).ok();
    qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&img)]).ok();
    qemu_img(&["check", s(&img)]).ok();
    let bytes = std::fs::read(&img).unwrap();
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_eq!((le32(4), le32(8), le64(56)), (3, 0x30001, u64::MAX), "header: v3, compressed + markers, GD at end");
    let end = bytes.len();
    assert_eq!((le32(end - 1536 + 8), le32(end - 1536 + 12)), (0, 3), "footer marker");
    assert_eq!(&bytes[end - 1024..end - 1020], b"KDMV", "footer");
    let gd = le64(end - 1024 + 56) as usize * 512;
    assert_eq!((le32(gd - 512 + 8), le32(gd - 512 + 12)), (0, 2), "GD marker before the directory");
    assert!(bytes[end - 512..].iter().all(|&b| b == 0), "end-of-stream marker");
    let script = format!(
        "import pyvmdk\nh = pyvmdk.handle()\nh.open('{}')\nh.open_extent_data_files()\n\
         n = h.get_media_size()\nd = h.read_buffer(n)\nr = open('{}', 'rb').read()\n\
         r += bytes(n - len(r))\nprint('same' if d == r else 'differs')\n",
        s(&img),
        s(&raw)
    );
    let out = std::process::Command::new("/usr/bin/python3").args(["-c", &script]).output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "same", "libvmdk (python3-libvmdk): {}", String::from_utf8_lossy(&out.stderr));
    // An empty stream vdisk creates is one too, and qemu-img writes into its own files alike.
    let empty = d.path().join("e.vmdk");
    vdisk(&["create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", s(&empty), "3M"]).ok();
    qemu_img(&["check", s(&empty)]).ok();
    let (qi, vi) = (qemu_img(&["map", "--output=json", s(&empty)]), vdisk(&["map", "--output=json", s(&empty)]));
    assert_eq!((qi.code, &qi.stdout), (vi.code, &vi.stdout));
    // A qemu-made empty stream disk opened for writing but not written stays as it was; one
    // that is written takes vdisk's stream (rewritten in the spec's layout).
    let q = d.path().join("q.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", s(&q), "8M"]).ok();
    let before = std::fs::read(&q).unwrap();
    let zeros = d.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).unwrap();
    vdisk(&["convert", "-n", "--target-is-zero", "-f", "raw", "-O", "vmdk", s(&zeros), s(&q)]).ok();
    assert!(std::fs::read(&q).unwrap() == before, "an unwritten stream disk is left alone");
    vdisk(&["convert", "-n", "-f", "raw", "-O", "vmdk", s(&raw), s(&q)]).ok();
    qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s(&raw), s(&q)]).ok();
}

#[test]
fn hostile_images_fail_cleanly() {
    let d = tempdir();
    let good = d.path().join("good.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&good), "10M"]).ok();
    let base = std::fs::read(&good).unwrap();
    let patch = |name: &str, at: usize, bytes: &[u8]| {
        let mut b = base.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        let p = d.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let cases = [
        patch("version.vmdk", 4, &9u32.to_le_bytes()),
        patch("grain.vmdk", 20, &3u64.to_le_bytes()),
        patch("hugegrain.vmdk", 20, &(1u64 << 40).to_le_bytes()),
        patch("capacity.vmdk", 12, &(u64::MAX / 2).to_le_bytes()),
        patch("gtes.vmdk", 44, &100000u32.to_le_bytes()),
        patch("gd.vmdk", 56, &(1u64 << 40).to_le_bytes()),
        patch("gt.vmdk", 27 * 512, &0x7fff_ffffu32.to_le_bytes()),
    ];
    for img in &cases {
        let r = vdisk(&["convert", "-O", "raw", s(img), s(&d.path().join("out.raw"))]);
        assert_ne!(r.code, 0, "{}: {}", s(img), r.stdout);
        assert!(!r.stderr.contains("panicked"), "{}: {}", s(img), r.stderr);
    }
    // A grain table entry pointing at the header: reads see header bytes, writes are refused.
    let meta = patch("meta.vmdk", 27 * 512, &1u32.to_le_bytes());
    let r = qemu_io(&["-f", "vmdk", "-c", "read 0 512", s(&meta)]);
    assert_eq!(r.code, 0);
    let raw = d.path().join("one.raw");
    std::fs::write(&raw, vec![7u8; 10 << 20]).unwrap();
    let r = vdisk(&["convert", "-n", "-f", "raw", "-O", "vmdk", s(&raw), s(&meta)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("points into the metadata"), "{}", r.stderr);
    assert_eq!(&std::fs::read(&meta).unwrap()[..4], b"KDMV", "the header survives");
    let desc = d.path().join("desc.vmdk");
    let mut text = String::from("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"custom\"\n");
    for _ in 0..5000 {
        text.push_str("RW 1 ZERO\n");
    }
    std::fs::write(&desc, &text).unwrap();
    let r = vdisk(&["info", s(&desc)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    // A flat extent starting past the end of its file reads as zeros, and check calls it
    // corrupt, as in qemu; a huge extent in a missing file fails the open.
    std::fs::write(d.path().join("small-flat.vmdk"), pseudo_random(4096, 9)).unwrap();
    let head =
        "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"small-flat.vmdk\" 4096\n";
    std::fs::write(&desc, head).unwrap();
    let (qo, vo) = (d.path().join("q.raw"), d.path().join("v.raw"));
    assert!(plaintext(qemu_img, &desc, &qo) == plaintext(vdisk, &desc, &vo), "a flat extent past EOF");
    let (q, v) = (qemu_img(&["check", s(&desc)]), vdisk(&["check", s(&desc)]));
    assert_eq!((q.code, &q.stdout), (v.code, &v.stdout), "check of a flat extent past EOF");
    std::fs::write(&desc, format!("{head}RW 1000000000000 SPARSE \"missing.vmdk\"\n")).unwrap();
    let (q, v) = (qemu_img(&["info", s(&desc)]), vdisk(&["info", s(&desc)]));
    assert_eq!((q.code, &q.stderr), (v.code, &v.stderr), "a missing extent");
    std::fs::write(&desc, "version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"/etc/passwd\" 0\n").unwrap();
    let r = vdisk(&["info", "--image-opts", &format!("driver=vmdk,file.filename={}", s(&desc))]);
    assert_eq!(r.code, 0, "trusted input may name absolute paths: {}", r.stderr);
}

/// Bytes a file takes on disk (`du`).
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Sum of [`du`] over the files of a directory, and how many there are.
fn du_dir(d: &Path) -> (u64, usize) {
    let files: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
    (files.iter().map(|f| du(f)).sum(), files.len())
}

/// `info` without the lines that differ by the random CID or by the file's size (compared
/// apart: streamOptimized files differ in layout), the directory written as `DIR`.
fn info_without_names(tool: fn(&[&str]) -> Run, img: &Path, dir: &Path) -> String {
    let out = tool(&["info", s(img)]).ok().stdout;
    let keep = |l: &&str| !l.contains("cid:") && !l.contains("disk size:") && !l.contains("file length:");
    out.lines().filter(keep).collect::<Vec<_>>().join("\n").replace(s(dir), "DIR")
}

/// A 4 TiB monolithicSparse disk (with and without zeroed grains) has its 512 MiB of grain
/// tables preallocated but not written: the file is qemu's byte for byte but for the CID, takes
/// no more disk than qemu-img's (1 MiB: header and both directories), reads identically, checks
/// clean and shows the same `info`. So do the other subformats at sizes that make many files.
#[test]
fn create_leaves_preallocated_tables_sparse_like_qemu() {
    let d = tempdir();
    let cases = [
        ("subformat=monolithicSparse", "4T"),
        ("subformat=monolithicSparse,zeroed_grain=on,hwversion=7", "4T"),
        ("subformat=streamOptimized", "4T"),
        ("subformat=twoGbMaxExtentSparse", "64G"),
        ("subformat=twoGbMaxExtentFlat", "64G"),
        ("subformat=monolithicFlat", "4T"),
    ];
    for (i, (o, size)) in cases.iter().enumerate() {
        let (qd, vd) = (d.path().join(format!("q{i}")), d.path().join(format!("v{i}")));
        std::fs::create_dir(&qd).unwrap();
        std::fs::create_dir(&vd).unwrap();
        let (q, v) = (qd.join("disk.vmdk"), vd.join("disk.vmdk"));
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", o, s(&q), size]).ok();
        let start = std::time::Instant::now();
        vdisk(&["create", "-q", "-f", "vmdk", "-o", o, s(&v), size]).ok();
        let took = start.elapsed();
        assert!(took.as_secs() < 5, "{o}: create took {took:?}");
        let ((qdu, qn), (vdu, vn)) = (du_dir(&qd), du_dir(&vd));
        assert_eq!(qn, vn, "{o}: files");
        // streamOptimized: vdisk writes the spec's layout, whose empty directory is smaller.
        assert!(vdu <= qdu, "{o}: vdisk takes {vdu} bytes on disk, qemu-img {qdu}");
        assert_eq!(info_without_names(qemu_img, &q, &qd), info_without_names(qemu_img, &v, &vd), "{o}: info");
        let (qi, vi) = (qemu_img(&["info", "--output=json", s(&v)]), vdisk(&["info", "--output=json", s(&v)]));
        assert_eq!((qi.code, &qi.stdout), (vi.code, &vi.stdout), "{o}: info of vdisk's disk");
        if o.contains("monolithicSparse") {
            // Everything but the descriptor (sectors 1 to 20, which hold the CID) is qemu's.
            let (mut a, mut b) = (std::fs::File::open(&q).unwrap(), std::fs::File::open(&v).unwrap());
            assert_eq!(a.metadata().unwrap().len(), b.metadata().unwrap().len(), "{o}: length");
            let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
            use std::io::Read;
            let mut at = 0u64;
            while let Ok(n) = a.read(&mut x) {
                if n == 0 {
                    break;
                }
                b.read_exact(&mut y[..n]).unwrap();
                let skip = |k: usize| (512..21 * 512).contains(&(at as usize + k));
                assert!((0..n).all(|k| skip(k) || x[k] == y[k]), "{o}: bytes differ in the MiB at {at}");
                at += n as u64;
            }
            qemu_img(&["compare", s(&q), s(&v)]).ok();
        }
        if i == 0 {
            qemu_img(&["check", s(&v)]).ok();
        }
    }
}

/// Runs `program` with `args` under a 2 GiB address-space limit.
fn limited(program: &Path, args: &[&str]) -> Run {
    let mut c = std::process::Command::new("prlimit");
    c.arg("--as=2147483648").arg(program).args(args).env("LC_ALL", "C");
    vdisk_tests::output(&mut c).expect("prlimit (util-linux)").into()
}

/// 32 TiB disks are created (and converted into) within 2 GiB of address space, as qemu-img
/// does: the 4 GiB of preallocated tables are never held in memory.
#[test]
fn huge_disks_are_created_in_bounded_memory_like_qemu() {
    let d = tempdir();
    let qemu = vdisk_tests::qemu_tool("qemu-img");
    let bin = Path::new(env!("CARGO_BIN_EXE_vdisk"));
    for o in ["subformat=monolithicSparse", "subformat=streamOptimized", "subformat=monolithicSparse,zeroed_grain=on"] {
        let (q, v) = (d.path().join("q.vmdk"), d.path().join("v.vmdk"));
        limited(&qemu, &["create", "-q", "-f", "vmdk", "-o", o, s(&q), "32T"]).ok();
        limited(bin, &["create", "-q", "-f", "vmdk", "-o", o, s(&v), "32T"]).ok();
        assert!(du(&v) <= du(&q), "{o}: du {} > qemu-img's {}", du(&v), du(&q));
        assert_eq!(
            info_without_names(qemu_img, &q, d.path()).replace("q.vmdk", "X"),
            info_without_names(qemu_img, &v, d.path()).replace("v.vmdk", "X"),
            "{o}"
        );
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&v).unwrap();
    }
    let src = d.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "32T"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 20T 64k", s(&src)]).ok();
    let (q, v) = (d.path().join("q.vmdk"), d.path().join("v.vmdk"));
    limited(&qemu, &["convert", "-O", "vmdk", s(&src), s(&q)]).ok();
    limited(bin, &["convert", "-O", "vmdk", s(&src), s(&v)]).ok();
    assert!(du(&v) <= du(&q) + (64 << 10), "convert: du {} vs qemu-img's {}", du(&v), du(&q));
    let read = |img: &Path| qemu_io(&["-f", "vmdk", "-c", "read -P 7 20T 64k", "-c", "read -P 0 0 1M", s(img)]);
    read(&v).ok();
}

/// `info` of a split disk lists its extent files as qemu-img does (last extent first), in text
/// and JSON.
#[test]
fn info_lists_split_extents_like_qemu() {
    let d = tempdir();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let img = d.path().join(format!("{sub}.vmdk"));
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", &format!("subformat={sub}"), s(&img), "5G"]).ok();
        for args in [vec!["info", s(&img)], vec!["info", "--output=json", s(&img)]] {
            let (q, v) = (qemu_img(&args), vdisk(&args));
            assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{sub}: {args:?}");
            assert!(q.stdout.contains("extents.2"), "{}", q.stdout);
        }
    }
}

/// Files that are not VMDK disks, opened with `-f vmdk`, fail with qemu-img's message and code.
#[test]
fn other_files_opened_as_vmdk_fail_like_qemu() {
    let d = tempdir();
    let p = |n: &str| d.path().join(n);
    qemu_img(&["create", "-q", "-f", "raw", s(&p("big.raw")), "3M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 0x41 0 3M", s(&p("big.raw"))]).ok();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("c.qcow2")), "1M"]).ok();
    std::fs::write(p("small.raw"), pseudo_random(3000, 3)).unwrap();
    std::fs::write(p("tiny"), b"abc").unwrap();
    std::fs::write(p("empty"), b"").unwrap();
    std::fs::write(p("text.vmdk"), "# Disk DescriptorFile\nversion=1\nCID=1\n").unwrap();
    std::fs::write(p("ms.vmdk"), "version=1\ncreateType=\"monolithicSparse\"\nRW 8 FLAT \"tiny\" 0\n").unwrap();
    for n in ["big.raw", "c.qcow2", "small.raw", "tiny", "empty", "text.vmdk", "ms.vmdk"] {
        let file = p(n);
        for cmd in ["info", "check"] {
            let args = [cmd, "-f", "vmdk", s(&file)];
            let (q, v) = (qemu_img(&args), vdisk(&args));
            assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{args:?}");
            assert_eq!(q.code, 1, "{args:?}");
        }
    }
}

/// A monolithicFlat disk larger than the file system's largest file fails as in qemu-img
/// (`Could not resize file: File too large`, exit 1), leaving the same files behind (the
/// descriptor and an empty data file).
#[test]
fn flat_create_past_the_file_size_limit_fails_like_qemu() {
    let d = tempdir();
    // ext4 (4 KiB blocks) holds files of at most 16 TiB; where the file system takes 64 TiB,
    // both tools must still agree.
    let probe = d.path().join("probe");
    let refused = std::fs::File::create(&probe).unwrap().set_len(64 << 40).is_err();
    std::fs::remove_file(&probe).unwrap();
    let (qd, vd) = (d.path().join("q"), d.path().join("v"));
    std::fs::create_dir(&qd).unwrap();
    std::fs::create_dir(&vd).unwrap();
    let (q, v) = (qd.join("d.vmdk"), vd.join("d.vmdk"));
    let args = ["create", "-f", "vmdk", "-o", "subformat=monolithicFlat"];
    let qr = qemu_img(&[&args[..], &[s(&q), "64T"]].concat());
    let vr = vdisk(&[&args[..], &[s(&v), "64T"]].concat());
    assert_eq!((qr.code, qr.stderr.replace(s(&qd), "D")), (vr.code, vr.stderr.replace(s(&vd), "D")));
    if refused {
        assert_eq!(vr.code, 1);
        assert_eq!(vr.stderr, format!("qemu-img: {}: Could not resize file: File too large\n", s(&v)));
    }
    // The descriptors match but for the random CID (whose hex width varies, so their lengths may
    // differ by a byte or two); the flat extents have the same length.
    let without_cid = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p).unwrap().lines().filter(|l| !l.starts_with("CID=")).map(str::to_string).collect()
    };
    assert_eq!(without_cid(&q), without_cid(&v));
    let (a, b) =
        (std::fs::metadata(qd.join("d-flat.vmdk")).unwrap(), std::fs::metadata(vd.join("d-flat.vmdk")).unwrap());
    assert_eq!(a.len(), b.len(), "d-flat.vmdk");
    let (qi, vi) = (info_without_names(qemu_img, &q, &qd), info_without_names(qemu_img, &v, &vd));
    assert_eq!(qi, vi);
}
