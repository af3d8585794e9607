//! `bitmap`, `convert --bitmaps`, `measure`, `info`, `resize` and `amend` with persistent dirty
//! bitmaps, against qemu-img: the same command sequence run by each tool on its own copy leaves
//! bitmaps that QEMU (qemu-nbd) reads with the same bits, `info` lists identically, and
//! `qemu-img check` finds clean; errors and warnings are qemu-img's, word for word.

use std::path::{Path, PathBuf};

use vdisk_tests::bitmaps::dirty_ranges_via_qemu;
use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

type Tool = fn(&[&str]) -> Run;

fn check_clean(img: &Path, after: &str) {
    let c = qemu_img(&["check", s(img)]);
    assert_eq!(c.code, 0, "qemu-img check after {after}: {}{}", c.stdout, c.stderr);
    assert!(!c.stdout.contains("leaked"), "leaks after {after}: {}", c.stdout);
}

/// The qcow2 block of `info --output=json`.
fn specific(img: &Path) -> serde_json::Value {
    let r = qemu_img(&["info", "--output=json", "-U", s(img)]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["format-specific"]["data"].clone()
}

fn bitmap_names(img: &Path) -> Vec<String> {
    specific(img)["bitmaps"]
        .as_array()
        .map(|a| a.iter().map(|b| b["name"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The bits of every consistent bitmap, as QEMU reads them.
fn contents(img: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let spec = specific(img);
    let names: Vec<String> = spec["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| !b["flags"].as_array().unwrap().iter().any(|f| f == "in-use"))
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    names.iter().cloned().zip(dirty_ranges_via_qemu(img, &refs)).collect()
}

/// qemu-iotests' qemu-img-bitmaps setup and merges, with `tool` as qemu-img and QEMU's qemu-io
/// writing: a base with one bitmap, an overlay with two (one disabled), clears, enables,
/// disables, a merge from the backing file through a temporary bitmap.
fn scenario(tool: Tool, dir: &Path, cluster: &str) -> (PathBuf, PathBuf) {
    let base = dir.join("t.base");
    let top = dir.join("t.top");
    let opts = format!("cluster_size={cluster}");
    tool(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&base), "10M"]).ok();
    tool(&["bitmap", "--add", "-f", "qcow2", s(&base), "b0"]).ok();
    qemu_io(&["-c", "w 3M 1M", s(&base)]).ok();
    tool(&["create", "-q", "-f", "qcow2", "-o", &opts, "-b", s(&base), "-F", "qcow2", s(&top), "10M"]).ok();
    qemu_io(&["-c", "w 0 1M", s(&top)]).ok();
    tool(&["bitmap", "--add", "-g", "512k", s(&top), "b1"]).ok();
    tool(&["bitmap", "--add", "--disable", s(&top), "b2"]).ok();
    qemu_io(&["-c", "w 3M 1M", s(&top)]).ok();
    tool(&["bitmap", "--clear", s(&top), "b1"]).ok();
    qemu_io(&["-c", "w 1M 1M", s(&top)]).ok();
    tool(&["bitmap", "--disable", s(&top), "b1"]).ok();
    tool(&["bitmap", "--enable", s(&top), "b2"]).ok();
    qemu_io(&["-c", "w 2M 1M", "-c", "w 9M 4k", s(&top)]).ok();
    tool(&["bitmap", "--add", "--disable", s(&top), "b0"]).ok();
    tool(&["bitmap", "--add", "--merge", "b0", "-b", s(&base), "-F", "qcow2", s(&top), "tmp"]).ok();
    tool(&["bitmap", "--merge", "tmp", s(&top), "b0"]).ok();
    tool(&["bitmap", "--remove", s(&top), "tmp"]).ok();
    (base, top)
}

#[test]
fn bitmap_commands_leave_what_qemu_img_leaves() {
    for cluster in ["65536", "512", "2M"] {
        let (dq, dv) = (tempdir(), tempdir());
        let (qb, qt) = scenario(qemu_img, dq.path(), cluster);
        let (vb, vt) = scenario(vdisk, dv.path(), cluster);
        for (q, v) in [(&qb, &vb), (&qt, &vt)] {
            check_clean(v, &format!("the bitmap commands (cluster {cluster})"));
            assert_eq!(specific(v), specific(q), "info, cluster {cluster}");
            let got = contents(v);
            assert_eq!(got, contents(q), "bits, cluster {cluster}");
            assert!(got.iter().any(|(_, r)| !r.is_empty()), "some bitmap has bits set");
            // The same layout (qemu's file size), and the same space reserved for bitmaps.
            let len = |p: &Path| std::fs::metadata(p).unwrap().len();
            assert_eq!(len(v), len(q), "file size, cluster {cluster}");
            let m = ["measure", "--output=json", "-O", "qcow2"];
            let bitmaps_size =
                |r: Run| serde_json::from_str::<serde_json::Value>(&r.ok().stdout).unwrap()["bitmaps"].clone();
            let want = bitmaps_size(qemu_img(&[&m[..], &[s(q)]].concat()));
            assert!(want.as_u64().unwrap() > 0);
            assert_eq!(bitmaps_size(vdisk(&[&m[..], &[s(v)]].concat())), want, "measure, cluster {cluster}");
        }
        assert_eq!(bitmap_names(&vt), ["b1", "b2", "b0"]);
    }
}

#[test]
fn errors_and_inconsistent_bitmaps_are_reported_as_qemu_img_does() {
    let d = tempdir();
    let (_, top) = scenario(qemu_img, d.path(), "65536");
    let same = |args: &[&str]| {
        let copy = d.path().join("copy.qcow2");
        std::fs::copy(&top, &copy).unwrap();
        let raw = format!("{}.raw", s(&copy));
        let sub = |a: &&str| match *a {
            "IMG" => s(&copy).to_string(),
            "IMG.raw" => raw.clone(),
            other => other.to_string(),
        };
        let argv: Vec<String> = args.iter().map(sub).collect();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let _ = std::fs::remove_file(&raw);
        let q = qemu_img(&argv);
        std::fs::copy(&top, &copy).unwrap();
        let _ = std::fs::remove_file(&raw);
        let v = vdisk(&argv);
        assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{args:?}");
        v
    };
    assert_ne!(same(&["bitmap", "--add", "IMG", "b0"]).code, 0);
    assert_ne!(same(&["bitmap", "--remove", "IMG", "nosuch"]).code, 0);
    assert_ne!(same(&["bitmap", "--merge", "nosuch", "IMG", "b0"]).code, 0);
    assert_ne!(same(&["bitmap", "--add", "-g", "1000", "IMG", "x"]).code, 0);
    assert_ne!(same(&["bitmap", "--add", "-g", "4G", "IMG", "x"]).code, 0);
    assert_ne!(same(&["bitmap", "--add", "-g", "512", "--add", "IMG", "x"]).code, 0);
    assert_ne!(same(&["bitmap", "--clear", "IMG", ""]).code, 0);
    assert_ne!(same(&["bitmap", "IMG", "b0"]).code, 0);
    assert_ne!(same(&["bitmap", "-g", "64k", "--clear", "IMG", "b0"]).code, 0);
    // Actions run in command-line order: remove then add succeeds, add then remove too.
    same(&["bitmap", "--remove", "--add", "IMG", "b2"]).ok();
    same(&["bitmap", "--add", "--remove", "IMG", "new"]).ok();
    assert_ne!(same(&["convert", "--bitmaps", "-O", "raw", "IMG", "IMG.raw"]).code, 0);

    // A crash while qemu-io had the image open leaves the enabled and disabled bitmaps in use.
    qemu_io(&["-c", "abort", s(&top)]);
    let listed = specific(&top);
    assert!(listed["bitmaps"].to_string().contains("in-use"), "{listed}");
    assert_ne!(same(&["bitmap", "--clear", "IMG", "b0"]).code, 0);
    assert_ne!(same(&["bitmap", "--enable", "IMG", "b0"]).code, 0);
    assert_ne!(same(&["bitmap", "--merge", "b0", "IMG", "b1"]).code, 0);
    same(&["info", "IMG"]);
    let out = d.path().join("out.qcow2");
    for skip in [false, true] {
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["convert", "--bitmaps", "-O", "qcow2"];
        if skip {
            args.push("--skip-broken-bitmaps");
        }
        args.extend([s(&top), s(&out)]);
        let q = qemu_img(&args);
        let qinfo = if skip { Some(specific(&out)) } else { None };
        let _ = std::fs::remove_file(&out);
        let v = vdisk(&args);
        assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{args:?}");
        if let Some(want) = qinfo {
            assert_eq!(specific(&out), want);
            check_clean(&out, "convert --skip-broken-bitmaps");
        }
    }
    // Removing the inconsistent ones (vdisk) makes the image convertible again.
    for b in ["b0", "b1", "b2"] {
        if bitmap_names(&top).iter().any(|n| n == b) && specific(&top)["bitmaps"].to_string().contains("in-use") {
            vdisk(&["bitmap", "--remove", s(&top), b]);
        }
    }
    check_clean(&top, "removing inconsistent bitmaps");
}

#[test]
fn convert_copies_bitmaps_as_qemu_img_does() {
    let d = tempdir();
    let (_, top) = scenario(qemu_img, d.path(), "65536");
    let (q, v) = (d.path().join("q.qcow2"), d.path().join("v.qcow2"));
    qemu_img(&["convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", s(&top), s(&q)]).ok();
    vdisk(&["convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", s(&top), s(&v)]).ok();
    check_clean(&v, "convert --bitmaps");
    assert!(std::fs::read(&v).unwrap() == std::fs::read(&q).unwrap(), "byte-identical to qemu-img's output");
    assert_eq!(specific(&v), specific(&q));
    assert_eq!(contents(&v), contents(&q));
    assert_eq!(contents(&v), contents(&top), "the bits survive the copy");
    // And the other way: a vdisk image with bitmaps copied by qemu-img.
    let back = d.path().join("back.qcow2");
    qemu_img(&["convert", "--bitmaps", "-O", "qcow2", s(&v), s(&back)]).ok();
    assert_eq!(contents(&back), contents(&top));
}

#[test]
fn resize_keeps_bitmaps_as_qemu_img_does() {
    for (grow, shrink) in [("+3M", "-6M"), ("20M", "5M")] {
        let (dq, dv) = (tempdir(), tempdir());
        let (_, q) = scenario(qemu_img, dq.path(), "65536");
        let (_, v) = scenario(vdisk, dv.path(), "65536");
        for (tool, img) in [(qemu_img as Tool, &q), (vdisk as Tool, &v)] {
            tool(&["resize", "-q", s(img), grow]).ok();
            qemu_io(&["-c", "w 12M 64k", s(img)]).ok();
            tool(&["resize", "-q", "--shrink", s(img), shrink]).ok();
        }
        check_clean(&v, "resize");
        assert_eq!(specific(&v), specific(&q));
        assert_eq!(contents(&v), contents(&q));
    }
}

#[test]
fn downgrade_drops_bitmaps_without_leaking() {
    let d = tempdir();
    let (_, top) = scenario(vdisk, d.path(), "65536");
    vdisk(&["amend", "-o", "compat=0.10", s(&top)]).ok();
    check_clean(&top, "amend compat=0.10");
    assert!(specific(&top).get("bitmaps").is_none());
    let r = vdisk(&["bitmap", "--add", s(&top), "b9"]);
    let q = qemu_img(&["bitmap", "--add", s(&top), "b9"]);
    assert_eq!(r.code, 1);
    assert_eq!(q.code, 1);
    assert!(r.stderr.contains("Cannot store dirty bitmaps in qcow2 v2 files"), "{}", r.stderr);
}

#[test]
fn bitmaps_left_by_a_program_without_bitmap_support_are_dropped() {
    let d = tempdir();
    let (_, top) = scenario(qemu_img, d.path(), "65536");
    // Clear the autoclear bit (byte 95 of the header): as a program that knows no bitmaps would.
    let mut bytes = std::fs::read(&top).unwrap();
    bytes[95] &= !1;
    std::fs::write(&top, &bytes).unwrap();
    assert!(bitmap_names(&top).is_empty(), "qemu-img ignores them");
    qemu_io(&["-c", "w 0 64k", s(&top)]).ok();
    let r = vdisk(&["info", "--output=json", s(&top)]).ok();
    assert!(!r.stdout.contains("bitmaps"), "{}", r.stdout);
    vdisk(&["bitmap", "--add", s(&top), "fresh"]).ok();
    assert_eq!(bitmap_names(&top), ["fresh"]);
    // Their clusters leak (as with qemu); nothing worse, and repair reclaims them.
    let c = qemu_img(&["check", s(&top)]);
    assert!(c.code == 3 && !c.stdout.contains("ERROR"), "only leaks: {}", c.stdout);
    vdisk(&["check", "-q", "-r", "leaks", s(&top)]).ok();
    check_clean(&top, "check -r leaks");
    assert_eq!(bitmap_names(&top), ["fresh"]);
}
