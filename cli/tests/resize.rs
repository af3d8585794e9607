//! `resize` against qemu-img: same messages and exit codes, same resulting files.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

#[test]
fn resize_matches_qemu_img_for_raw_and_qcow2() {
    let d = tempdir();
    let steps: &[&[&str]] = &[
        &["+1M"],
        &["--preallocation=full", "+64k"],
        &["--preallocation=falloc", "3M"],
        &["--preallocation=metadata", "+1M"],
        &["2M"],
        &["--shrink", "2M"],
        &["--shrink", "-512k"],
        &["--preallocation=off", "--shrink", "1M"],
        &["--preallocation=full", "1M"],
        &["--preallocation=bogus", "4M"],
        &["0"],
        &["--", "-5M"],
        &["1Q"],
    ];
    for fmt in ["raw", "qcow2"] {
        let q = d.path().join(format!("q.{fmt}"));
        let v = d.path().join(format!("v.{fmt}"));
        for p in [&q, &v] {
            qemu_img(&["create", "-f", fmt, s(p), "1M"]).ok();
            qemu_io(&["-f", fmt, "-c", "write -P 0x33 0 1M", s(p)]).ok();
        }
        for step in steps {
            let mut a = vec!["resize", "-f", fmt];
            a.extend_from_slice(step);
            let qa: Vec<&str> = a.iter().copied().chain([s(&q)]).collect::<Vec<_>>();
            // The size goes last.
            let mut qa2 = qa.clone();
            let mut va: Vec<&str> = a.iter().copied().chain([s(&v)]).collect();
            let size_q = qa2.remove(qa2.len() - 2);
            qa2.push(size_q);
            let size_v = va.remove(va.len() - 2);
            va.push(size_v);
            let qr = qemu_img(&qa2);
            let vr = vdisk(&va);
            assert_eq!(
                (qr.code, &qr.stdout),
                (vr.code, &vr.stdout),
                "{fmt} {step:?}: qemu stderr {} vdisk stderr {}",
                qr.stderr,
                vr.stderr
            );
            if qr.code == 0 {
                if fmt == "raw" {
                    // qcow2 may lay preallocated metadata out differently; raw files must match.
                    let (mq, mv) = (std::fs::metadata(&q).unwrap(), std::fs::metadata(&v).unwrap());
                    assert_eq!(mq.len(), mv.len(), "{fmt} {step:?}: file sizes");
                    assert_eq!(mq.blocks(), mv.blocks(), "{fmt} {step:?}: allocation");
                }
                qemu_img(&["compare", "-f", fmt, "-F", fmt, s(&q), s(&v)]).ok();
                if fmt == "qcow2" {
                    qemu_img(&["check", s(&v)]).ok();
                }
            } else {
                assert_eq!(
                    qr.stderr.lines().next().map(|l| l.starts_with("qemu-img:")),
                    vr.stderr.lines().next().map(|l| l.starts_with("qemu-img:"))
                );
            }
        }
    }
}

#[test]
fn usage_errors_use_upstream_words() {
    let v = vdisk(&["resize", "x"]);
    assert_eq!(
        (v.code, v.stderr.as_str()),
        (1, "qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information\n")
    );
    let d = tempdir();
    let p = d.path().join("a.raw");
    qemu_img(&["create", "-f", "raw", s(&p), "2M"]).ok();
    let v = vdisk(&["resize", "-f", "raw", s(&p), "1M"]);
    assert_eq!(v.code, 1);
    assert_eq!(
        v.stderr,
        "qemu-img: Use the --shrink option to perform a shrink operation.\nqemu-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n"
    );
}

/// Preallocating resizes of qcow2 lay the file out as qemu-img does, byte for byte: metadata,
/// falloc and full modes, with and without extended L2 entries and a backing file that reaches
/// past the old end.
#[test]
fn preallocating_qcow2_resize_is_byte_identical_to_qemu_img() {
    let d = tempdir();
    let backing = d.path().join("backing.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&backing), "1M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 0 1M", s(&backing)]).ok();
    let mut cases = 0;
    for (cluster, extended) in [(512, "off"), (4096, "off"), (65536, "off"), (65536, "on"), (2097152, "on")] {
        for with_backing in [false, true] {
            for initial in ["off", "metadata"] {
                for mode in ["metadata", "falloc", "full"] {
                    let q = d.path().join("q.qcow2");
                    let opts = format!("cluster_size={cluster},extended_l2={extended},preallocation={initial}");
                    let mut create = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
                    if with_backing {
                        create.extend(["-b", s(&backing), "-F", "qcow2"]);
                    }
                    create.extend([s(&q), "300K"]);
                    // qemu refuses preallocation with a backing file unless entries are extended.
                    if qemu_img(&create).code != 0 {
                        continue;
                    }
                    qemu_io(&["-f", "qcow2", "-c", "write -P 3 1K 70K", s(&q)]).ok();
                    let v = d.path().join("v.qcow2");
                    std::fs::copy(&q, &v).unwrap();
                    let arg = format!("--preallocation={mode}");
                    let qr = qemu_img(&["resize", "-q", &arg, s(&q), "+80K"]);
                    if qr.code != 0 {
                        continue;
                    }
                    vdisk(&["resize", "-q", &arg, s(&v), "+80K"]).ok();
                    let what = format!("{opts} backing={with_backing} resize {mode}");
                    assert!(std::fs::read(&q).unwrap() == std::fs::read(&v).unwrap(), "{what}: files differ");
                    qemu_img(&["check", "-q", s(&v)]).ok();
                    cases += 1;
                }
            }
        }
    }
    assert!(cases >= 20, "only {cases} combinations ran");
}

/// `create` with preallocation writes the file qemu-img writes.
#[test]
fn preallocated_qcow2_create_is_byte_identical_to_qemu_img() {
    let d = tempdir();
    for cluster in ["512", "4096", "65536", "2097152"] {
        for mode in ["metadata", "falloc", "full"] {
            let (q, v) = (d.path().join("q.qcow2"), d.path().join("v.qcow2"));
            let opts = format!("cluster_size={cluster},preallocation={mode}");
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&q), "5M"]).ok();
            vdisk(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&v), "5M"]).ok();
            assert!(std::fs::read(&q).unwrap() == std::fs::read(&v).unwrap(), "{opts}: files differ");
        }
    }
}
