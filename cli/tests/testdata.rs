//! The checked-in reference images under `testdata/` (made by `testdata/make.sh` with qemu-img
//! 10.0.2) against qemu-img: `info`, `map`, `check`, `convert -O raw` and `compare` must print the
//! same and exit the same; the corrupt images are repaired (`check -r`) on copies by both tools.
//!
//! Every expected output is computed at test time from the installed qemu-img, never hard-coded.
//! Commands run with the working directory set to the image's directory and relative file names,
//! because qemu resolves a relative external data file name against the working directory.
//!
//! Each test walks all images and reports every mismatch at once before failing.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk_tests::{output, qemu_tool, run_in, s, tempdir, Run};

/// Where the reference images live.
const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata");

/// One reference image.
struct Image {
    /// File name inside `testdata/`.
    file: &'static str,
    /// Its format.
    fmt: &'static str,
    /// Other files it needs next to it (backing file, external data file).
    companions: &'static [&'static str],
    /// Deliberately damaged: `qemu-img check` must report problems.
    corrupt: bool,
    /// For corrupt images: qemu-img's `check -r all` leaves it clean.
    repairable: bool,
}

const fn img(file: &'static str, fmt: &'static str, companions: &'static [&'static str]) -> Image {
    Image { file, fmt, companions, corrupt: false, repairable: false }
}

const fn corrupt(file: &'static str, repairable: bool) -> Image {
    Image { file, fmt: "qcow2", companions: &[], corrupt: true, repairable }
}

const IMAGES: &[Image] = &[
    img("raw.raw", "raw", &[]),
    img("v3-default.qcow2", "qcow2", &[]),
    img("v2.qcow2", "qcow2", &[]),
    img("cluster4k.qcow2", "qcow2", &[]),
    img("extended-l2.qcow2", "qcow2", &[]),
    img("compressed-zlib.qcow2", "qcow2", &[]),
    img("compressed-zstd.qcow2", "qcow2", &[]),
    img("backing-base.qcow2", "qcow2", &[]),
    img("backing-overlay.qcow2", "qcow2", &["backing-base.qcow2"]),
    img("zero.qcow2", "qcow2", &[]),
    img("refcount1.qcow2", "qcow2", &[]),
    img("refcount64.qcow2", "qcow2", &[]),
    img("lazy-refcounts.qcow2", "qcow2", &[]),
    img("datafile-raw.qcow2", "qcow2", &["datafile-raw.data"]),
    img("datafile.qcow2", "qcow2", &["datafile.data"]),
    corrupt("corrupt-leak.qcow2", true),
    corrupt("corrupt-refcount-high.qcow2", true),
    corrupt("corrupt-refcount-low.qcow2", true),
    corrupt("corrupt-l2-eof.qcow2", false),
];

fn testdata() -> PathBuf {
    Path::new(TESTDATA).canonicalize().unwrap_or_else(|e| panic!("{TESTDATA}: {e}"))
}

/// Runs qemu-img in `dir`.
fn qemu_img_in(dir: &Path, args: &[&str]) -> Run {
    run_in(Some(dir), &qemu_tool("qemu-img"), args)
}

/// Runs vdisk in `dir`, named `qemu-img` so its messages carry qemu-img's prefix.
fn vdisk_in(dir: &Path, args: &[&str]) -> Run {
    let bin = env!("CARGO_BIN_EXE_vdisk");
    let mut c = Command::new(bin);
    c.arg0("qemu-img").args(args).current_dir(dir).env("LC_ALL", "C");
    output(&mut c).unwrap_or_else(|e| panic!("cannot run {bin}: {e}")).into()
}

/// Describes a difference between qemu-img's and vdisk's results for `args`, if any.
fn diff(place: &str, args: &[&str], q: &Run, v: &Run) -> Option<String> {
    if (q.code, &q.stdout, &q.stderr) == (v.code, &v.stdout, &v.stderr) {
        return None;
    }
    Some(format!(
        "MISMATCH ({place}): qemu-img {}\n--- qemu-img: exit {}\nstdout:\n{}stderr:\n{}--- vdisk: exit {}\nstdout:\n{}stderr:\n{}",
        args.join(" "),
        q.code,
        q.stdout,
        q.stderr,
        v.code,
        v.stdout,
        v.stderr
    ))
}

/// Runs `args` with both tools in `dir` and records any difference in exit code, stdout or stderr.
fn same(dir: &Path, args: &[&str], failures: &mut Vec<String>) -> (Run, Run) {
    let q = qemu_img_in(dir, args);
    let v = vdisk_in(dir, args);
    failures.extend(diff(&format!("in {}", dir.display()), args, &q, &v));
    (q, v)
}

fn finish(what: &str, failures: Vec<String>) {
    assert!(failures.is_empty(), "{} {what} mismatch(es):\n\n{}", failures.len(), failures.join("\n\n"));
}

/// Copies `image` and its companions into `dir`.
fn copy_into(image: &Image, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in std::iter::once(&image.file).chain(image.companions) {
        std::fs::copy(testdata().join(f), dir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

#[test]
fn every_reference_image_is_listed_and_present() {
    let dir = testdata();
    let mut listed: Vec<&str> =
        IMAGES.iter().flat_map(|i| std::iter::once(i.file).chain(i.companions.iter().copied())).collect();
    listed.sort_unstable();
    listed.dedup();
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| [".qcow2", ".raw", ".data"].iter().any(|x| n.ends_with(x)))
        .collect();
    found.sort_unstable();
    assert_eq!(found, listed, "testdata/ and this test's image list disagree; run testdata/make.sh");
    for i in IMAGES {
        let len = std::fs::metadata(dir.join(i.file)).unwrap().len();
        assert!(len > 0 && len <= 512 * 1024, "{}: {len} bytes", i.file);
    }
}

#[test]
fn info_matches_qemu_img() {
    let dir = testdata();
    let mut failures = Vec::new();
    for i in IMAGES {
        for args in [
            &["info", i.file][..],
            &["info", "--output=json", i.file],
            &["info", "-f", i.fmt, i.file],
            &["info", "-f", i.fmt, "--output=json", i.file],
            &["info", "--backing-chain", i.file],
            &["info", "--backing-chain", "--output=json", i.file],
        ] {
            let (q, _) = same(&dir, args, &mut failures);
            assert_eq!(q.code, 0, "qemu-img {args:?} failed: {}", q.stderr);
        }
    }
    finish("info", failures);
}

#[test]
fn map_matches_qemu_img() {
    let dir = testdata();
    let mut failures = Vec::new();
    for i in IMAGES {
        for args in [
            &["map", "--output=json", i.file][..],
            &["map", "--output=json", "-f", i.fmt, i.file],
            &["map", "-f", i.fmt, i.file],
        ] {
            same(&dir, args, &mut failures);
        }
    }
    finish("map", failures);
}

#[test]
fn check_matches_qemu_img() {
    let dir = testdata();
    let mut failures = Vec::new();
    for i in IMAGES {
        for args in [&["check", i.file][..], &["check", "--output=json", i.file], &["check", "-f", i.fmt, i.file]] {
            let (q, _) = same(&dir, args, &mut failures);
            // The reference images are what they claim to be.
            let expect = match (i.fmt, i.corrupt) {
                ("raw", _) => 63,
                (_, false) => 0,
                (_, true) if i.file == "corrupt-leak.qcow2" => 3,
                (_, true) => 2,
            };
            assert_eq!(q.code, expect, "qemu-img {args:?}: {}{}", q.stdout, q.stderr);
        }
    }
    finish("check", failures);
}

#[test]
fn convert_to_raw_and_compare_match_qemu_img() {
    let dir = testdata();
    let d = tempdir();
    let mut failures = Vec::new();
    for i in IMAGES {
        let stem = i.file.replace('.', "_");
        let (qdir, vdir) = (d.path().join(format!("{stem}_q")), d.path().join(format!("{stem}_v")));
        std::fs::create_dir_all(&qdir).unwrap();
        std::fs::create_dir_all(&vdir).unwrap();
        let (qout, vout) = (qdir.join("out.raw"), vdir.join("out.raw"));
        let q = qemu_img_in(&dir, &["convert", "-f", i.fmt, "-O", "raw", i.file, s(&qout)]);
        assert_eq!(q.code, 0, "qemu-img convert {}: {}", i.file, q.stderr);
        let v = vdisk_in(&dir, &["convert", "-f", i.fmt, "-O", "raw", i.file, s(&vout)]);
        let shown = ["convert", "-f", i.fmt, "-O", "raw", i.file, "<tmp>/out.raw"];
        failures.extend(diff("in testdata/", &shown, &q, &v));
        if v.code != 0 {
            continue;
        }
        // vdisk's raw output holds the image's content, per qemu-img ...
        let c = qemu_img_in(&dir, &["compare", "-f", i.fmt, "-F", "raw", i.file, s(&vout)]);
        if (c.code, c.stdout.as_str()) != (0, "Images are identical.\n") {
            failures.push(format!(
                "MISMATCH: qemu-img compare -f {} -F raw {} <vdisk's convert -O raw>: exit {}\n{}{}",
                i.fmt, i.file, c.code, c.stdout, c.stderr
            ));
        }
        // ... and is byte for byte qemu-img's.
        let (qb, vb) = (std::fs::read(&qout).unwrap(), std::fs::read(&vout).unwrap());
        if qb != vb {
            failures.push(format!(
                "MISMATCH: convert -f {} -O raw {}: raw outputs differ ({} vs {} bytes, first difference at {:?})",
                i.fmt,
                i.file,
                qb.len(),
                vb.len(),
                qb.iter().zip(&vb).position(|(a, b)| a != b)
            ));
        }

        // compare against qemu-img's raw: identical, strict, and after changing the last byte.
        same(&dir, &["compare", "-f", i.fmt, "-F", "raw", i.file, s(&qout)], &mut failures);
        same(&dir, &["compare", "-s", "-f", i.fmt, "-F", "raw", i.file, s(&qout)], &mut failures);
        same(&dir, &["compare", "-f", "raw", "-F", i.fmt, s(&qout), i.file], &mut failures);
        let changed = qdir.join("changed.raw");
        let mut bytes = qb;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&changed, &bytes).unwrap();
        let (q, _) = same(&dir, &["compare", "-f", i.fmt, "-F", "raw", i.file, s(&changed)], &mut failures);
        assert_eq!(q.code, 1, "qemu-img compare with a changed last byte: {}{}", q.stdout, q.stderr);
    }
    finish("convert/compare", failures);
}

#[test]
fn check_repair_on_copies_matches_qemu_img() {
    let d = tempdir();
    let mut failures = Vec::new();
    for i in IMAGES.iter().filter(|i| i.fmt == "qcow2") {
        let modes: &[&str] = if i.corrupt { &["all", "leaks"] } else { &["all"] };
        for mode in modes {
            // Same file names in two directories, so messages naming files are comparable.
            let stem = format!("{}_{mode}", i.file.replace('.', "_"));
            let (qdir, vdir) = (d.path().join(format!("{stem}_q")), d.path().join(format!("{stem}_v")));
            copy_into(i, &qdir);
            copy_into(i, &vdir);
            let args = ["check", "-r", mode, i.file];
            let q = qemu_img_in(&qdir, &args);
            let v = vdisk_in(&vdir, &args);
            failures.extend(diff("on a copy", &args, &q, &v));

            // Afterwards qemu-img judges both copies alike.
            let after = ["check", i.file];
            let qa = qemu_img_in(&qdir, &after);
            let va = qemu_img_in(&vdir, &after);
            if let Some(m) = diff("on the repaired copies", &after, &qa, &va) {
                failures.push(format!(
                    "MISMATCH after check -r {mode} (left: qemu-img's repaired copy, right: vdisk's; both checked by qemu-img):\n{m}"
                ));
            }
            if *mode == "all" && (!i.corrupt || i.repairable) {
                assert_eq!(qa.code, 0, "qemu-img check -r all left {} unclean: {}{}", i.file, qa.stdout, qa.stderr);
                if va.code != 0 {
                    failures.push(format!(
                        "MISMATCH: qemu-img check of vdisk's `check -r all` copy of {} is not clean: exit {}\n{}{}",
                        i.file, va.code, va.stdout, va.stderr
                    ));
                }
            }
            // Both repaired copies read the same (each converted by qemu-img in its own directory,
            // where its external data file and backing file are).
            let content = |dir: &Path| {
                qemu_img_in(dir, &["convert", "-f", "qcow2", "-O", "raw", i.file, "content.raw"]).ok();
                std::fs::read(dir.join("content.raw")).unwrap()
            };
            if content(&qdir) != content(&vdir) {
                failures.push(format!(
                    "MISMATCH: after check -r {mode} {}: qemu-img's and vdisk's repaired copies read differently",
                    i.file
                ));
            }
        }
    }
    finish("check -r", failures);
}
