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
