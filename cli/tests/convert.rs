//! `convert` against qemu-img: identical content, identical allocation (holes stay holes),
//! identical messages and progress lines.

use std::path::{Path, PathBuf};

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// A 64 MiB raw image with data, explicit zeros, a zero-written range and holes.
fn source(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    qemu_img(&["create", "-f", "raw", s(&p), "64M"]).ok();
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1M 3M",
        "-c",
        "write -z 2M 64k",
        "-c",
        "write -P 0 8M 1M",
        "-c",
        "write -P 1 20M 4k",
        "-c",
        "write -P 2 20M 512",
        "-c",
        "write -P 3 30M 6k",
        "-c",
        "write -P 0x11 63M 1M",
        s(&p),
    ])
    .ok();
    p
}

fn map_json(p: &Path) -> String {
    qemu_img(&["map", "--output=json", "-f", "raw", s(p)]).ok().stdout
}

#[test]
fn same_content_and_allocation_as_qemu_img_for_every_option_set() {
    let d = tempdir();
    let src = source(d.path());
    let q = d.path().join("q.raw");
    let v = d.path().join("v.raw");
    for extra in
        [&[][..], &["-S", "0"], &["-S", "512"], &["-S", "64k"], &["-W"], &["-m", "1"], &["-m", "16", "-W"], &["-C"]]
    {
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&v);
        let mut a: Vec<&str> = vec!["convert", "-f", "raw", "-O", "raw"];
        a.extend_from_slice(extra);
        let mut qa = a.clone();
        qa.extend([s(&src), s(&q)]);
        let mut va = a.clone();
        va.extend([s(&src), s(&v)]);
        let qr = qemu_img(&qa).ok();
        let vr = vdisk(&va).ok();
        assert_eq!(qr.stdout, vr.stdout, "{extra:?}");
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&v)]).ok();
        assert_eq!(map_json(&q), map_json(&v), "allocation differs for {extra:?}");
    }
}

#[test]
fn progress_lines_match_qemu_img() {
    let d = tempdir();
    let src = source(d.path());
    let q = qemu_img(&["convert", "-p", "-f", "raw", "-O", "raw", s(&src), s(&d.path().join("q"))]).ok();
    let v = vdisk(&["convert", "-p", "-f", "raw", "-O", "raw", s(&src), s(&d.path().join("v"))]).ok();
    assert!(q.stdout.contains("(100.00/100%)"));
    assert_eq!(q.stdout, v.stdout);
}

#[test]
fn concatenates_sources_and_writes_into_existing_targets() {
    let d = tempdir();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    qemu_img(&["create", "-f", "raw", s(&a), "1000"]).ok(); // rounded up to 1024
    qemu_io(&["-f", "raw", "-c", "write -P 7 0 512", s(&a)]).ok();
    qemu_img(&["create", "-f", "raw", s(&b), "2M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 9 1M 4k", s(&b)]).ok();
    let q = d.path().join("q.raw");
    let v = d.path().join("v.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", s(&a), s(&b), s(&q)]).ok();
    vdisk(&["convert", "-f", "raw", "-O", "raw", s(&a), s(&b), s(&v)]).ok();
    assert_eq!(std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
    // -n into a larger existing target full of garbage: the whole source range is overwritten,
    // zeros included, and the rest is left alone.
    let t = d.path().join("t.raw");
    std::fs::write(&t, vec![0x5a; 4 << 20]).unwrap();
    vdisk(&["convert", "-n", "-f", "raw", "-O", "raw", s(&b), s(&t)]).ok();
    let got = std::fs::read(&t).unwrap();
    let want = std::fs::read(&b).unwrap();
    assert_eq!(&got[..2 << 20], &want[..]);
    assert!(got[2 << 20..].iter().all(|&x| x == 0x5a));
    // A smaller existing target is refused.
    let small = d.path().join("small.raw");
    std::fs::write(&small, [0u8; 512]).unwrap();
    let r = vdisk(&["convert", "-n", "-f", "raw", "-O", "raw", s(&b), s(&small)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("output file is smaller than input file"), "{}", r.stderr);
}

#[test]
fn option_errors_match_qemu_img() {
    let d = tempdir();
    let src = source(d.path());
    let out = d.path().join("o");
    let cases: Vec<Vec<&str>> = vec![
        vec!["convert", "-c", "-C", s(&src), s(&out)],
        vec!["convert", "-S", "100", s(&src), s(&out)],
        vec!["convert", "-n", "-o", "size=1M", s(&src), s(&out)],
        vec!["convert", "--target-is-zero", s(&src), s(&out)],
        vec!["convert", "-c", "-O", "raw", s(&src), s(&out)],
        vec!["convert", "-B", "base", s(&src), s(&out)],
        vec!["convert", "-O", "nosuchfmt", s(&src), s(&out)],
        vec!["convert", "-O", "raw"],
        vec!["convert", "-f", "raw", s(&src)],
    ];
    for a in cases {
        let q = qemu_img(&a);
        let v = vdisk(&a);
        assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{a:?}");
    }
    // Debian's qemu-img rewords size errors; upstream QEMU 10.0 (and its iotests) print these two lines.
    let v = vdisk(&["convert", "-S", "1Q", s(&src), s(&out)]);
    assert_eq!(v.code, 1);
    assert_eq!(
        v.stderr,
        "qemu-img: Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\n\
         qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"
    );
}

#[test]
fn refuses_a_source_that_qemu_io_is_writing() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let d = tempdir();
    let src = source(d.path());
    // qemu-io in interactive mode holds the image read-write until its stdin closes.
    let mut child = Command::new(vdisk_tests::qemu_tool("qemu-io"))
        .args(["-f", "raw", s(&src)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = d.path().join("o");
    let v = vdisk(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&out)]);
    let u = vdisk(&["convert", "-U", "-f", "raw", "-O", "raw", s(&src), s(&out)]);
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"quit\n");
    drop(stdin);
    let _ = child.wait();
    assert_eq!(v.code, 1);
    assert!(v.stderr.contains("Failed to get shared \"write\" lock"), "{}", v.stderr);
    assert_eq!(u.code, 0, "{}", u.stderr);
}

/// Converting to qcow2 with clusters small enough that the data crosses many refcount blocks
/// (and, at 512 bytes, makes the L1 table grow) writes the file qemu-img writes, byte for byte:
/// refcount blocks land after the data that needs them, as qemu places them.
#[test]
fn qcow2_layout_across_refcount_blocks_matches_qemu_img() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    qemu_img(&["create", "-f", "raw", s(&src), "24M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 5 0 9M", "-c", "write -P 6 13M 5M", "-c", "write -P 7 23M 1M", s(&src)])
        .ok();
    for cluster in ["1024", "4096", "16384"] {
        let (q, v) = (d.path().join("q.qcow2"), d.path().join("v.qcow2"));
        let opts = format!("cluster_size={cluster}");
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", "-o", &opts, s(&src), s(&q)]).ok();
        vdisk(&["convert", "-f", "raw", "-O", "qcow2", "-o", &opts, s(&src), s(&v)]).ok();
        assert!(std::fs::read(&q).unwrap() == std::fs::read(&v).unwrap(), "cluster_size={cluster}: files differ");
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&v).unwrap();
    }
}
