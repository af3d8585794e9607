//! Freed qcow2 clusters go back to the file system as qemu-img gives them back: `convert -n` of
//! zeros over data, `snapshot -d` / `-a` after a rewrite and `commit` (which empties the top)
//! leave the same allocated size (`st_blocks`, what `du` shows) as qemu-img does on the same
//! image, under the discard options (`discard=unmap|ignore`, `pass-discard-*`) given through
//! `--image-opts` and `json:` names, with the same exit codes and messages. Every result is
//! checked with `qemu-img check` and compared with its intended content by `qemu-img compare`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

const MIB: u64 = 1 << 20;

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

type Tool = fn(&[&str]) -> Run;
const TOOLS: [(&str, Tool); 2] = [("qemu-img", qemu_img), ("vdisk", vdisk)];

/// Bytes the file occupies on disk (`st_blocks` × 512).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A 64 MiB qcow2 image whose first `data_mib` MiB hold pattern 1, written by qemu-io.
fn image_with_data(path: &Path, data_mib: u64) {
    let _ = std::fs::remove_file(path);
    qemu_img(&["create", "-q", "-f", "qcow2", s(path), "64M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", &format!("write -P 1 0 {data_mib}M"), s(path)]).ok();
}

fn check_clean(img: &Path, what: &str) {
    let c = qemu_img(&["check", s(img)]);
    assert_eq!(c.code, 0, "qemu-img check after {what}: {}{}", c.stdout, c.stderr);
}

fn same_content(img: &Path, want: &Path, what: &str) {
    let c = qemu_img(&["compare", s(want), s(img)]);
    assert_eq!(c.code, 0, "{what}: content differs: {}{}", c.stdout, c.stderr);
}

/// The allocated sizes of the two tools' results agree to within one 64 KiB cluster (file
/// systems may round an extent differently) and lie in `[low, high]`.
fn assert_allocated(what: &str, qemu: u64, ours: u64, low: u64, high: u64) {
    assert!(qemu.abs_diff(ours) <= 64 << 10, "{what}: vdisk leaves {ours} bytes allocated, qemu-img {qemu}");
    assert!((low..=high).contains(&qemu), "{what}: qemu-img leaves {qemu} bytes, expected {low}..={high}");
}

/// Runs `args` (with `{img}` standing for the image) with both tools, each on its own fresh
/// image made by `make`; asserts the same exit code and output; returns the allocated sizes.
fn both(dir: &Path, make: &dyn Fn(&Path), args: &[&str]) -> (u64, u64, Vec<PathBuf>) {
    let mut runs = Vec::new();
    let mut sizes = Vec::new();
    let mut images = Vec::new();
    for (name, tool) in TOOLS {
        let img = dir.join(format!("{name}.qcow2"));
        make(&img);
        let args: Vec<String> = args.iter().map(|a| a.replace("{img}", s(&img))).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = tool(&args);
        // Messages name the image: make them comparable.
        runs.push((r.code, r.stdout.replace(s(&img), "{img}"), r.stderr.replace(s(&img), "{img}")));
        sizes.push(allocated(&img));
        images.push(img);
    }
    assert_eq!(runs[1], runs[0], "{args:?}: vdisk (left) and qemu-img (right) differ");
    (sizes[0], sizes[1], images)
}

#[test]
fn convert_n_of_zeros_over_data_gives_clusters_back_as_qemu_img_does() {
    let d = tempdir();
    let zeros = d.path().join("zeros.raw");
    std::fs::File::create(&zeros).unwrap().set_len(64 * MIB).unwrap();
    let z = s(&zeros);
    let make = |p: &Path| image_with_data(p, 64);
    // (target options, whether the freed clusters' space goes back)
    let cases: &[(&[&str], bool)] = &[
        (&["convert", "-n", "-O", "qcow2", z, "{img}"], true),
        (&["convert", "-n", "-S", "0", "-O", "qcow2", z, "{img}"], false),
        (&["convert", "-n", "--target-image-opts", z, "driver=qcow2,file.filename={img}"], true),
        (&["convert", "-n", "--target-image-opts", z, "driver=qcow2,file.filename={img},discard=ignore"], false),
        (&["convert", "-n", "--target-image-opts", z, "driver=qcow2,file.filename={img},discard=off"], false),
        (&["convert", "-n", "--target-image-opts", z, "driver=qcow2,file.filename={img},discard=unmap"], true),
        (
            &["convert", "-n", "--target-image-opts", z, "driver=qcow2,file.filename={img},pass-discard-request=off"],
            false,
        ),
        (
            &[
                "convert",
                "-n",
                "--target-image-opts",
                z,
                "driver=qcow2,file.filename={img},discard=ignore,pass-discard-request=on",
            ],
            false,
        ),
        (
            &[
                "convert",
                "-n",
                "-O",
                "qcow2",
                z,
                "json:{\"driver\":\"qcow2\",\"pass-discard-request\":false,\"file\":{\"filename\":\"{img}\"}}",
            ],
            false,
        ),
    ];
    for (args, gives_back) in cases {
        let (qemu, ours, images) = both(d.path(), &make, args);
        let (low, high) = if *gives_back { (0, MIB) } else { (64 * MIB, 66 * MIB) };
        assert_allocated(&format!("{args:?}"), qemu, ours, low, high);
        for img in &images {
            check_clean(img, &format!("{args:?}"));
            same_content(img, &zeros, &format!("{args:?}"));
        }
    }
}

/// 32 MiB of data, a snapshot, the same 32 MiB rewritten (so the image holds 64 MiB).
fn rewritten_after_snapshot(p: &Path) {
    image_with_data(p, 32);
    qemu_img(&["snapshot", "-c", "s1", s(p)]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 2 0 32M", s(p)]).ok();
}

#[test]
fn snapshot_delete_and_apply_give_clusters_back_as_qemu_img_does() {
    let d = tempdir();
    let want = |pattern: u8| {
        let p = d.path().join(format!("want{pattern}.raw"));
        let mut bytes = vec![pattern; 32 * MIB as usize];
        bytes.resize(64 * MIB as usize, 0);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let (after_delete, after_apply) = (want(2), want(1));
    let json = "json:{\"driver\":\"qcow2\",\"pass-discard-snapshot\":false,\"file\":{\"filename\":\"{img}\"}}";
    let cases: &[(&[&str], bool, &Path)] = &[
        (&["snapshot", "-d", "s1", "{img}"], true, &after_delete),
        (&["snapshot", "-a", "s1", "{img}"], true, &after_apply),
        (
            &["snapshot", "-d", "s1", "--image-opts", "driver=qcow2,file.filename={img},discard=ignore"],
            true,
            &after_delete,
        ),
        (
            &["snapshot", "-d", "s1", "--image-opts", "driver=qcow2,file.filename={img},pass-discard-snapshot=off"],
            false,
            &after_delete,
        ),
        (&["snapshot", "-a", "s1", json], false, &after_apply),
    ];
    for (args, gives_back, want) in cases {
        let (qemu, ours, images) = both(d.path(), &rewritten_after_snapshot, args);
        let (low, high) = if *gives_back { (32 * MIB, 34 * MIB) } else { (64 * MIB, 66 * MIB) };
        assert_allocated(&format!("{args:?}"), qemu, ours, low, high);
        for img in &images {
            check_clean(img, &format!("{args:?}"));
            same_content(img, want, &format!("{args:?}"));
        }
    }
}

#[test]
fn commit_empties_the_top_and_gives_its_space_back() {
    let d = tempdir();
    let make = |top: &Path| {
        let base = top.with_extension("base");
        image_with_data(&base, 32);
        let _ = std::fs::remove_file(top);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(top)]).ok();
        qemu_io(&["-f", "qcow2", "-c", "write -P 3 0 16M", s(top)]).ok();
    };
    let (qemu, ours, images) = both(d.path(), &make, &["commit", "{img}"]);
    assert_allocated("commit", qemu, ours, 0, MIB);
    let want = d.path().join("want.raw");
    let mut bytes = vec![3u8; 16 * MIB as usize];
    bytes.resize(32 * MIB as usize, 1);
    bytes.resize(64 * MIB as usize, 0);
    std::fs::write(&want, bytes).unwrap();
    for top in &images {
        check_clean(top, "commit");
        check_clean(&top.with_extension("base"), "commit");
        same_content(top, &want, "commit (top)");
        same_content(&top.with_extension("base"), &want, "commit (base)");
    }
}

#[test]
fn bad_discard_options_fail_as_in_qemu_img() {
    let d = tempdir();
    let make = |p: &Path| image_with_data(p, 1);
    for opts in [
        "driver=qcow2,file.filename={img},discard=foo",
        "driver=qcow2,file.filename={img},pass-discard-other=maybe",
        "driver=raw,file.filename={img},pass-discard-request=on",
    ] {
        both(d.path(), &make, &["info", "--image-opts", opts]);
    }
    for name in [
        "json:{\"driver\":\"qcow2\",\"discard\":\"sometimes\",\"file\":{\"filename\":\"{img}\"}}",
        "json:{\"driver\":\"qcow2\",\"pass-discard-snapshot\":\"x\",\"file\":{\"filename\":\"{img}\"}}",
    ] {
        both(d.path(), &make, &["info", name]);
    }
}

#[test]
fn convert_n_of_zeros_gives_external_data_file_space_back() {
    let d = tempdir();
    let zeros = d.path().join("zeros.raw");
    std::fs::File::create(&zeros).unwrap().set_len(64 * MIB).unwrap();
    let make = |p: &Path| {
        let data = p.with_extension("data");
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(&data);
        let o = format!("data_file={}", s(&data));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(p), "64M"]).ok();
        qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 64M", s(p)]).ok();
    };
    for (opts, gives_back) in [("", true), (",pass-discard-request=off", false), (",discard=ignore", false)] {
        let target = format!("driver=qcow2,file.filename={{img}}{opts}");
        let args = ["convert", "-n", "--target-image-opts", s(&zeros), &target];
        let (_, _, images) = both(d.path(), &make, &args);
        let data: Vec<u64> = images.iter().map(|i| allocated(&i.with_extension("data"))).collect();
        let (low, high) = if gives_back { (0, MIB) } else { (64 * MIB, 66 * MIB) };
        assert_allocated(&format!("{args:?} (data file)"), data[0], data[1], low, high);
        for img in &images {
            check_clean(img, &format!("{args:?}"));
            same_content(img, &zeros, &format!("{args:?}"));
        }
    }
}
