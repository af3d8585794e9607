//! `measure` against qemu-img: the same figures in human and JSON output, for new images and for
//! existing ones, and the same messages and exit codes.

use std::path::Path;

use vdisk_tests::{qemu_img, qemu_io_write, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

fn assert_same(args: &[&str]) {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    let q = qemu_img(&full);
    let v = vdisk(&full);
    assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{full:?}");
}

#[test]
fn measure_new_images_like_qemu_img() {
    for output in ["human", "json"] {
        let out = format!("--output={output}");
        for size in ["0", "1", "511", "1000", "2G", "64G", "1T", "2P", "7E", "0x1000", "1.5M"] {
            assert_same(&[&out, "--size", size]);
            assert_same(&[&out, "-O", "raw", "--size", size]);
        }
        assert_same(&[&out, "-o", "preallocation=full", "--size", "1M"]);
        assert_same(&[&out, "-o", "size=4M,nocow=on", "--size", "1M"]);
    }
    assert_same(&["--size", "1M", "--output", "human", "--output=json"]);
}

#[test]
fn measure_existing_raw_images_like_qemu_img() {
    let d = tempdir();
    let empty = d.path().join("empty.raw");
    qemu_img(&["create", "-f", "raw", s(&empty), "0"]).ok();
    let data = d.path().join("data.raw");
    qemu_img(&["create", "-f", "raw", s(&data), "1G"]).ok();
    qemu_io_write(&data, "raw", 0xcd, 512, 512);
    qemu_io_write(&data, "raw", 0xcd, 128 << 20, 63 << 10);
    let full = d.path().join("full.raw");
    qemu_img(&["create", "-f", "raw", s(&full), "8M"]).ok();
    qemu_io_write(&full, "raw", 0x01, 0, 8 << 20);
    let odd = d.path().join("odd.raw");
    std::fs::write(&odd, vdisk_tests::pseudo_random(1000, 3)).unwrap();
    for output in ["--output=human", "--output=json"] {
        for img in [&empty, &data, &full, &odd] {
            assert_same(&[output, "-f", "raw", "-O", "raw", s(img)]);
            assert_same(&[output, s(img)]);
            assert_same(&[output, "-U", "-o", "preallocation=full", "-f", "raw", s(img)]);
        }
        let opts = format!("driver=raw,file.filename={}", s(&data));
        assert_same(&[output, "--image-opts", &opts]);
    }
}

#[test]
fn measure_errors_match_qemu_img() {
    let d = tempdir();
    let img = d.path().join("t.raw");
    qemu_img(&["create", "-f", "raw", s(&img), "1G"]).ok();
    let missing = d.path().join("missing");
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--size", "2G", s(&img)],
        vec![s(&img), "a"],
        vec!["--object", "secret,id=sec0,data=MTIzNDU2,format=base64"],
        vec!["--image-opts"],
        vec!["-f", "qcow2"],
        vec!["-l", "snap1"],
        vec!["-o", ","],
        vec!["-l", "snapshot.foo=bar"],
        vec!["--size", "-1"],
        vec!["--size", "9E"],
        vec!["-O", "foo", s(&img)],
        vec!["-o", "help", "--size", "1M"],
        vec!["-o", "size=1M,?", "--size", "1M"],
        vec!["-o", "foo=bar", "--size", "1M"],
        vec!["-o", "size=1Q", "--size", "1M"],
        vec!["-o", "nocow=maybe", "--size", "1M"],
        vec!["-o", "size=4M"],
        vec!["-l", "foo", s(&img)],
        vec!["-l", "snapshot.id=3", "-f", "raw", s(&img)],
        vec![s(&missing)],
        vec!["-f", "nosuchfmt", s(&img)],
    ];
    for args in cases {
        assert_same(&args);
    }
}

#[test]
fn measure_in_upstream_words() {
    // Debian's qemu-img rewords these; vdisk follows upstream QEMU 10.0.2's qemu-img.c.
    let v = vdisk(&["measure", "--output", "foo"]);
    assert_eq!((v.code, v.stderr.as_str()), (1, "qemu-img: --output must be used with human or json as argument.\n"));
    let v = vdisk(&["measure", "--size", "1Q"]);
    assert_eq!(
        (v.code, v.stderr.as_str()),
        (
            1,
            "qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n\
             qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"
        )
    );
    // Upstream's measure lets getopt complain in its own words, then prints the help and exits 0.
    for (args, complaint) in [
        (&["--foo"][..], "measure: unrecognized option '--foo'\n"),
        (&["-x"], "measure: invalid option -- 'x'\n"),
        (&["-f"], "measure: option requires an argument -- 'f'\n"),
        (&["--size"], "measure: option '--size' requires an argument\n"),
    ] {
        let mut full = vec!["measure"];
        full.extend_from_slice(args);
        let v = vdisk(&full);
        assert_eq!((v.code, v.stderr.as_str()), (0, complaint), "{full:?}");
        assert!(v.stdout.contains("Command syntax:"), "{full:?}");
    }
}

/// A character device measures as the empty raw image qemu-img sees in it.
#[test]
fn measure_character_devices_like_qemu_img() {
    for dev in ["/dev/null", "/dev/zero"] {
        assert_same(&["-f", "raw", dev]);
        assert_same(&[dev]);
        assert_same(&["-f", "raw", "-O", "qcow2", dev]);
        assert_same(&["--output=json", "-O", "qcow2", dev]);
    }
}
