//! `snapshot`, `info`, `convert -l` and `measure -l` against qemu-img on the same images: what one
//! tool creates the other lists, applies and deletes identically, with the same messages and exit
//! codes, and `qemu-img check` stays clean after every vdisk operation.

use std::path::{Path, PathBuf};

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

fn check_clean(img: &Path, after: &str) {
    let c = qemu_img(&["check", s(img)]);
    assert_eq!(c.code, 0, "qemu-img check after {after}: {}{}", c.stdout, c.stderr);
}

/// Both tools give the same exit code, stdout and stderr.
fn same(args: &[&str]) -> Run {
    let q = qemu_img(args);
    let v = vdisk(args);
    assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{args:?}");
    v
}

fn raw_of(img: &Path, snapshot: Option<&str>, out: &Path) -> Vec<u8> {
    let mut args = vec!["convert", "-O", "raw"];
    let l;
    if let Some(sn) = snapshot {
        l = format!("snapshot.name={sn}");
        args.extend(["-l", &l]);
    }
    args.extend([s(img), s(out)]);
    qemu_img(&args).ok();
    std::fs::read(out).unwrap()
}

/// An image with data, written with qemu-io in several steps.
fn image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "8M"]).ok();
    qemu_io(&["-c", "write -P 1 0 2M", "-c", "write -c -P 7 4M 2M", "-c", "write -z 6M 1M", s(&img)]).ok();
    img
}

#[test]
fn snapshots_vdisk_takes_read_the_same_in_qemu_img() {
    let d = tempdir();
    for (i, opts) in [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "compat=0.10",
        "lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let img = image(d.path(), &format!("v{i}.qcow2"), opts);
        let want1 = raw_of(&img, None, &d.path().join("want1.raw"));
        vdisk(&["snapshot", "-c", "one", s(&img)]).ok();
        check_clean(&img, &format!("snapshot -c ({opts})"));
        qemu_io(&["-c", "write -P 2 1M 2M", "-c", "discard 0 64k", "-c", "write -z 5M 512", s(&img)]).ok();
        let want2 = raw_of(&img, None, &d.path().join("want2.raw"));
        vdisk(&["snapshot", "-c", "two", s(&img)]).ok();
        qemu_io(&["-c", "write -P 3 0 8M", s(&img)]).ok();
        check_clean(&img, &format!("writes after snapshots ({opts})"));
        // Listings agree (same image, so the same dates).
        same(&["snapshot", "-l", s(&img)]);
        same(&["info", s(&img)]);
        same(&["info", "--output=json", s(&img)]);
        same(&["measure", "-O", "qcow2", "-l", "snapshot.name=one", s(&img)]);
        same(&["measure", "--output=json", "-O", "raw", "-l", "two", s(&img)]);
        // Every snapshot reads as it was, through qemu-img and through vdisk's convert -l.
        assert!(raw_of(&img, Some("one"), &d.path().join("q1.raw")) == want1, "{opts}: one via qemu-img");
        assert!(raw_of(&img, Some("two"), &d.path().join("q2.raw")) == want2, "{opts}: two via qemu-img");
        let v2 = d.path().join("v2.raw");
        vdisk(&["convert", "-O", "raw", "-l", "two", s(&img), s(&v2)]).ok();
        assert!(std::fs::read(&v2).unwrap() == want2, "{opts}: two via vdisk convert -l");
        // Applying with vdisk gives the snapshot's content; deleting leaves a clean image.
        vdisk(&["snapshot", "-a", "one", s(&img)]).ok();
        check_clean(&img, &format!("snapshot -a ({opts})"));
        assert!(raw_of(&img, None, &d.path().join("a1.raw")) == want1, "{opts}: after -a one");
        vdisk(&["snapshot", "-d", "one", s(&img)]).ok();
        check_clean(&img, &format!("snapshot -d one ({opts})"));
        assert!(raw_of(&img, Some("two"), &d.path().join("q2b.raw")) == want2, "{opts}: two after deleting one");
        vdisk(&["snapshot", "-d", "two", s(&img)]).ok();
        check_clean(&img, &format!("snapshot -d two ({opts})"));
        assert!(raw_of(&img, None, &d.path().join("a1b.raw")) == want1, "{opts}: active after deleting all");
        let l = qemu_img(&["snapshot", "-l", s(&img)]).ok();
        assert_eq!(l.stdout, "", "{opts}: no snapshots left");
    }
}

#[test]
fn snapshots_qemu_img_takes_are_applied_and_deleted_by_vdisk() {
    let d = tempdir();
    let img = image(d.path(), "q.qcow2", "cluster_size=65536");
    let want = raw_of(&img, None, &d.path().join("want.raw"));
    for tag in ["a", "b", "c"] {
        qemu_img(&["snapshot", "-c", tag, s(&img)]).ok();
    }
    qemu_io(&["-c", "write -P 9 0 8M", s(&img)]).ok();
    same(&["snapshot", "-l", s(&img)]);
    // Middle, then newest, then oldest; applying the survivor in between.
    vdisk(&["snapshot", "-d", "b", s(&img)]).ok();
    check_clean(&img, "snapshot -d b");
    vdisk(&["snapshot", "-a", "c", s(&img)]).ok();
    check_clean(&img, "snapshot -a c");
    assert!(raw_of(&img, None, &d.path().join("c.raw")) == want);
    qemu_io(&["-c", "write -P 4 3M 1M", s(&img)]).ok();
    vdisk(&["snapshot", "-d", "c", s(&img)]).ok();
    check_clean(&img, "snapshot -d c");
    // Ids work as tags too (the id is tried first).
    vdisk(&["snapshot", "-a", "1", s(&img)]).ok();
    assert!(raw_of(&img, None, &d.path().join("a.raw")) == want);
    vdisk(&["snapshot", "-d", "1", s(&img)]).ok();
    check_clean(&img, "snapshot -d 1");
    same(&["snapshot", "-l", s(&img)]);
}

#[test]
fn snapshot_errors_match_qemu_img() {
    let d = tempdir();
    let img = image(d.path(), "e.qcow2", "cluster_size=65536");
    qemu_img(&["snapshot", "-c", "x", s(&img)]).ok();
    for args in [
        vec!["snapshot", "-a", "nope", s(&img)],
        vec!["snapshot", "-d", "nope", s(&img)],
        vec!["convert", "-O", "raw", "-l", "nope", s(&img), "/dev/null"],
        vec!["convert", "-O", "raw", "-l", "snapshot.id=1,snapshot.name=y", s(&img), "/dev/null"],
        vec!["measure", "-O", "raw", "-l", "snapshot.foo=1", s(&img)],
    ] {
        let r = same(&args);
        assert_ne!(r.code, 0, "{args:?} must fail");
    }
    // Creating a second snapshot with the same tag is allowed, with a new id.
    vdisk(&["snapshot", "-c", "x", s(&img)]).ok();
    let l = same(&["snapshot", "-l", s(&img)]).stdout;
    assert_eq!(l.lines().filter(|x| x.split_whitespace().nth(1) == Some("x")).count(), 2, "{l}");
    check_clean(&img, "duplicate tag");
    // Raw images have no snapshots.
    let raw = d.path().join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]).ok();
    for args in [vec!["snapshot", "-f", "raw", "-l", s(&raw)], vec!["snapshot", "-c", "x", "-f", "raw", s(&raw)]] {
        same(&args);
    }
}

#[test]
fn resize_and_apply_across_sizes_match_qemu_img() {
    let d = tempdir();
    for tool in ["qemu", "vdisk"] {
        let img = image(d.path(), &format!("r-{tool}.qcow2"), "cluster_size=65536");
        let run = |args: &[&str]| if tool == "qemu" { qemu_img(args) } else { vdisk(args) };
        run(&["snapshot", "-c", "small", s(&img)]).ok();
        run(&["resize", "-q", s(&img), "24M"]).ok();
        qemu_io(&["-c", "write -P 5 20M 1M", s(&img)]).ok();
        run(&["snapshot", "-c", "big", s(&img)]).ok();
        run(&["snapshot", "-a", "small", s(&img)]).ok();
        check_clean(&img, &format!("{tool}: apply small"));
        let info = qemu_img(&["info", "--output=json", s(&img)]).ok().stdout;
        assert!(info.contains("\"virtual-size\": 8388608"), "{tool}: {info}");
        run(&["snapshot", "-a", "big", s(&img)]).ok();
        check_clean(&img, &format!("{tool}: apply big"));
        qemu_io(&["-c", "read -P 5 20M 1M", s(&img)]).ok();
    }
    // Version 2 images with snapshots cannot change size, in both tools.
    let v2 = image(d.path(), "v2.qcow2", "compat=0.10");
    qemu_img(&["snapshot", "-c", "s", s(&v2)]).ok();
    same(&["resize", s(&v2), "16M"]);
}

/// The bitmaps of a qcow2 image as qemu-img lists them (`info`'s format-specific `bitmaps`).
fn bitmaps_of(img: &Path) -> serde_json::Value {
    let info = qemu_img(&["info", "--output=json", s(img)]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&info).expect("info JSON");
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// qemu-img refuses to apply a snapshot while the image has persistent bitmaps (enabled,
/// disabled or left in use by a crash, and before it looks the tag up), and vdisk refuses it with the same message and exit code
/// without touching the file; creating and deleting snapshots goes on with bitmaps in both.
#[test]
fn apply_is_refused_while_the_image_has_bitmaps() {
    let d = tempdir();
    for (i, kind) in ["enabled", "disabled", "in-use"].into_iter().enumerate() {
        let src = image(d.path(), &format!("b{i}.qcow2"), "cluster_size=65536");
        let disable = if kind == "disabled" { "--disable" } else { "--enable" };
        qemu_img(&["bitmap", "--add", s(&src), "b0"]).ok();
        qemu_img(&["bitmap", disable, s(&src), "b0"]).ok();
        qemu_img(&["snapshot", "-c", "s", s(&src)]).ok();
        qemu_io(&["-c", "write -P 8 0 1M", s(&src)]).ok();
        if kind == "in-use" {
            // qemu-io dies while the enabled bitmap is marked in use on disk.
            let r = qemu_io(&["-c", "write -P 9 0 64k", "-c", "abort", s(&src)]);
            assert_ne!(r.code, 0, "qemu-io abort");
            assert!(qemu_img(&["info", s(&src)]).ok().stdout.contains("in-use"), "{kind}: bitmap not in use");
        }
        let (q, v) = (d.path().join(format!("q{i}.qcow2")), d.path().join(format!("v{i}.qcow2")));
        std::fs::copy(&src, &q).unwrap();
        std::fs::copy(&src, &v).unwrap();
        let before = std::fs::read(&v).unwrap();
        for tag in ["s", "1", "nosuch"] {
            let qr = qemu_img(&["snapshot", "-a", tag, s(&q)]);
            let vr = vdisk(&["snapshot", "-a", tag, s(&v)]);
            assert_eq!((vr.code, &vr.stdout, &vr.stderr), (qr.code, &qr.stdout, &qr.stderr), "-a {tag} ({kind})");
            assert_eq!(
                vr.stderr,
                format!("qemu-img: Could not apply snapshot '{tag}': Device has active dirty bitmaps\n")
            );
            assert!(std::fs::read(&v).unwrap() == before, "-a {tag}: the refused apply changed the image");
        }
        // Creating and deleting snapshots keeps the bitmaps, in both tools.
        for args in [["snapshot", "-c", "t"], ["snapshot", "-d", "s"], ["snapshot", "-d", "t"]] {
            let qr = qemu_img(&[args[0], args[1], args[2], s(&q)]);
            let vr = vdisk(&[args[0], args[1], args[2], s(&v)]);
            assert_eq!((vr.code, &vr.stdout, &vr.stderr), (qr.code, &qr.stdout, &qr.stderr), "{args:?}");
            check_clean(&v, &format!("{args:?} with bitmaps"));
            assert_eq!(bitmaps_of(&v), bitmaps_of(&q), "{args:?}");
        }
    }
}
