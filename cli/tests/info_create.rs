//! `create` and `info` against qemu-img: same text, same JSON, same files.

use vdisk_tests::{qemu_img, s, tempdir, vdisk_as_qemu_img};

fn vdisk(args: &[&str]) -> vdisk_tests::Run {
    vdisk_as_qemu_img(std::path::Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

#[test]
fn raw_create_matches_qemu_img_byte_for_byte() {
    let d = tempdir();
    for (size, opts) in [("1G", ""), ("100", ""), ("1.5M", "preallocation=falloc"), ("64k", "preallocation=full")] {
        let a = d.path().join("a.raw");
        let b = d.path().join("b.raw");
        let mut args_q = vec!["create", "-f", "raw"];
        if !opts.is_empty() {
            args_q.extend(["-o", opts]);
        }
        let mut args_v = args_q.clone();
        args_q.extend([s(&a), size]);
        args_v.extend([s(&b), size]);
        let q = qemu_img(&args_q).ok();
        let v = vdisk(&args_v).ok();
        assert_eq!(q.stdout.replace(s(&a), "X"), v.stdout.replace(s(&b), "X"));
        let (ma, mb) = (std::fs::metadata(&a).unwrap(), std::fs::metadata(&b).unwrap());
        assert_eq!(ma.len(), mb.len(), "size for {size} {opts}");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(ma.blocks(), mb.blocks(), "allocation for {size} {opts}");
    }
}

#[test]
fn info_json_and_human_equal_qemu_img() {
    let d = tempdir();
    let img = d.path().join("i.raw");
    qemu_img(&["create", "-f", "raw", s(&img), "10M"]).ok();
    vdisk_tests::qemu_io_write(&img, "raw", 0xab, 1 << 20, 65536);
    for args in
        [vec!["info", s(&img)], vec!["info", "--output=json", s(&img)], vec!["info", "-f", "raw", "-U", s(&img)]]
    {
        let q = qemu_img(&args).ok();
        let v = vdisk(&args).ok();
        assert_eq!(q.stdout, v.stdout, "{args:?}");
    }
}

#[test]
fn bad_input_gives_qemu_errors_not_panics() {
    let d = tempdir();
    let missing = d.path().join("missing");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["info", s(&missing)], "No such file or directory"),
        (vec!["info", s(d.path())], "to be a regular file"),
        (vec!["info", "-f", "nosuchfmt", s(&missing)], "Unknown driver 'nosuchfmt'"),
        (vec!["create", "-f", "nosuchfmt", s(&missing), "1M"], "Unknown file format 'nosuchfmt'"),
        (vec!["create", "-f", "raw", "-o", "bogus=1", s(&missing), "1M"], "Invalid parameter 'bogus'"),
        (vec!["create", "-f", "raw", s(&missing), "1Q"], "Invalid image size specified"),
        (vec!["create", "-f", "raw", s(&missing), "--", "-5"], "Must be between 0 and"),
        (vec!["nosuchcommand"], "Command not found: nosuchcommand"),
        (vec!["info", "--bogus", "x"], "unrecognized option '--bogus'"),
    ];
    for (args, want) in cases {
        let v = vdisk(&args);
        assert_eq!(v.code, 1, "{args:?}: {v:?}");
        assert!(v.stderr.contains(want), "{args:?}: {}", v.stderr);
        assert!(!v.stderr.contains("panicked"), "{args:?}");
    }
}

/// Character devices (`/dev/null`, `/dev/zero`) open as qemu's `host_device` nodes of length 0:
/// `info`, `map`, `compare`, `check` and `resize` print what qemu-img prints, with its exit codes.
#[test]
fn character_devices_open_as_in_qemu_img() {
    let same = |args: &[&str]| {
        let q = qemu_img(args);
        let v = vdisk(args);
        assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{args:?}");
    };
    for dev in ["/dev/null", "/dev/zero"] {
        same(&["info", dev]);
        same(&["info", "-f", "raw", "--output=json", dev]);
        same(&["info", "--backing-chain", dev]);
        same(&["map", dev]);
        same(&["map", "--output=json", dev]);
        same(&["compare", dev, "/dev/null"]);
        same(&["compare", "-s", dev, "/dev/zero"]);
        same(&["check", dev]);
        // A device keeps its size: qemu-img refuses every other one (nothing is written).
        same(&["resize", "-f", "raw", dev, "1M"]);
    }
    let d = tempdir();
    let img = d.path().join("x.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    same(&["compare", "/dev/null", s(&img)]);
    same(&["compare", "-s", "/dev/null", s(&img)]);
    // Nothing fits in /dev/null: create and convert fail as they do in qemu-img.
    let raw = d.path().join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]).ok();
    same(&["create", "-f", "raw", "/dev/null", "1M"]);
    same(&["convert", "-O", "raw", "-f", "raw", s(&raw), "/dev/null"]);
}
