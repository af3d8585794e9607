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

/// A lazy-refcounts image whose writer died keeps the dirty bit: `info` says so in text
/// ("cleanly shut down: no") and JSON ("dirty-flag": true), exactly as qemu-img does; once
/// qemu-img check repairs it, both report a clean image again.
#[test]
fn info_reports_the_qcow2_dirty_bit() {
    let d = tempdir();
    let img = d.path().join("dirty.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&img), "64M"]).ok();
    // qemu-io's abort leaves the image as a crash would: data written, dirty bit set.
    let _ = vdisk_tests::qemu_io(&["-c", "write -P 7 0 1M", "-c", "abort", s(&img)]);
    let text = ["info", s(&img)];
    let json = ["info", "--output=json", s(&img)];
    for args in [&text[..], &json[..]] {
        let q = qemu_img(args).ok();
        let v = vdisk(args).ok();
        assert_eq!(q.stdout, v.stdout, "{args:?}");
    }
    assert!(vdisk(&text).stdout.contains("cleanly shut down: no\n"));
    assert!(vdisk(&json).stdout.contains("\"dirty-flag\": true"));

    // Repaired, the image is clean in both tools.
    qemu_img(&["check", "-r", "all", s(&img)]).ok();
    for args in [&text[..], &json[..]] {
        let q = qemu_img(args).ok();
        let v = vdisk(args).ok();
        assert_eq!(q.stdout, v.stdout, "{args:?}");
        assert!(!v.stdout.contains("cleanly shut down") && !v.stdout.contains("\"dirty-flag\": true"));
    }
}

/// A minimal bochs growing redolog (1 MiB, every extent unallocated) that qemu-img opens.
fn bochs_image() -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..22].copy_from_slice(b"Bochs Virtual HD Image");
    h[32..39].copy_from_slice(b"Redolog");
    h[48..55].copy_from_slice(b"Growing");
    // version 2, header size, catalog entries, bitmap size, extent size; then the disk size.
    for (i, v) in [0x0002_0000u32, 512, 256, 512, 4096].into_iter().enumerate() {
        h[64 + 4 * i..68 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    h[88..96].copy_from_slice(&(1u64 << 20).to_le_bytes());
    h.extend(std::iter::repeat_n(0xff, 256 * 4));
    h
}

/// A cloop image with no blocks (qemu-img opens it as a 0-byte disk).
fn cloop_image() -> Vec<u8> {
    let preamble = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    let mut c = vec![0u8; 128];
    c[..preamble.len()].copy_from_slice(preamble);
    c.extend(512u32.to_be_bytes()); // block size
    c.extend(0u32.to_be_bytes()); // blocks
    c.extend(144u64.to_be_bytes()); // the end offset of the (no) blocks
    c
}

/// Every format qemu-img probes that vdisk cannot open yet is refused with its name, where vdisk
/// used to open it as raw (and `convert` copied the container's bytes as the disk): each file here
/// probes as that format in qemu-img (checked live), and vdisk's info and convert fail naming it,
/// writing nothing. `-f raw` still opens it as raw with qemu-img's output, and `-f NAME` says the
/// format is not supported yet.
#[test]
fn formats_vdisk_lacks_are_refused_by_name_not_opened_as_raw() {
    let d = tempdir();
    let mut cases: Vec<(&str, &str, std::path::PathBuf)> = Vec::new();
    for (fmt, description) in
        [("vhdx", "vhdx"), ("qed", "qed"), ("qcow", "qcow (version 1)"), ("parallels", "parallels")]
    {
        let p = d.path().join(format!("disk.{fmt}"));
        qemu_img(&["create", "-f", fmt, s(&p), "64M"]).ok();
        cases.push((fmt, description, p));
    }
    for (fmt, bytes) in [("bochs", bochs_image()), ("cloop", cloop_image()), ("dmg", vec![0u8; 4096])] {
        let p = d.path().join(format!("disk.{fmt}"));
        std::fs::write(&p, bytes).unwrap();
        cases.push((fmt, fmt, p));
    }
    for (fmt, description, img) in &cases {
        let q = qemu_img(&["info", s(img)]);
        if *fmt == "dmg" {
            // No magic: qemu picks dmg by the name alone, then finds no UDIF trailer.
            assert!(q.stderr.contains("UDIF trailer"), "{fmt}: {}", q.stderr);
        } else {
            assert!(q.stdout.contains(&format!("file format: {fmt}\n")), "{fmt}: {}", q.stdout);
        }
        let v = vdisk(&["info", s(img)]);
        assert_eq!(v.code, 1, "{fmt}");
        assert_eq!(
            v.stderr,
            format!(
                "qemu-img: Could not open '{}': Image is in the {description} format, which vdisk does not support yet\n",
                s(img)
            )
        );
        let out = d.path().join(format!("{fmt}.raw"));
        let v = vdisk(&["convert", "-O", "raw", s(img), s(&out)]);
        assert_eq!(v.code, 1, "{fmt}");
        assert!(v.stderr.contains(&format!("in the {description} format")), "{fmt}: {}", v.stderr);
        assert!(!out.exists(), "{fmt}: convert created its target");

        let named = vdisk(&["info", "-f", fmt, s(img)]);
        assert_eq!(named.code, 1, "{fmt}");
        assert!(named.stderr.contains(&format!("Image format '{fmt}' is not supported by vdisk yet")), "{fmt}");

        let args = ["info", "-f", "raw", s(img)];
        assert_eq!(qemu_img(&args).ok().stdout, vdisk(&args).ok().stdout, "{fmt} as raw");
    }
    // Naming a format vdisk lacks as a target says so too.
    let out = d.path().join("out");
    let source = d.path().join("source.raw");
    std::fs::write(&source, vec![0u8; 65536]).unwrap();
    for args in [
        vec!["create", "-f", "vhdx", s(&out), "1M"],
        vec!["convert", "-O", "qed", s(&source), s(&out)],
        vec!["measure", "-O", "parallels", "--size", "1M"],
    ] {
        let v = vdisk(&args);
        assert_eq!(v.code, 1, "{args:?}");
        assert!(v.stderr.contains("is not supported by vdisk yet"), "{args:?}: {}", v.stderr);
        assert!(!out.exists());
    }
}

/// Images of every format vdisk opens, made by qemu-img, probe as the format qemu-img probes them
/// as (the `file format` line of `info`, same text).
#[test]
fn every_format_vdisk_has_probes_as_in_qemu_img() {
    let d = tempdir();
    for (fmt, extra) in [
        ("raw", vec![]),
        ("qcow2", vec![]),
        ("vmdk", vec![]),
        ("vmdk", vec!["-o", "subformat=streamOptimized"]),
        ("vdi", vec![]),
        ("vpc", vec![]),
        ("luks", vec!["--object", "secret,id=s0,data=pw", "-o", "key-secret=s0,iter-time=10"]),
    ] {
        let img = d.path().join(format!("probe-{fmt}-{}", extra.len()));
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend(&extra);
        args.extend([s(&img), "1M"]);
        qemu_img(&args).ok();
        let line = |out: String| out.lines().find(|l| l.starts_with("file format:")).map(str::to_string);
        let q = line(qemu_img(&["info", s(&img)]).ok().stdout);
        assert_eq!(q.as_deref(), Some(format!("file format: {fmt}").as_str()));
        assert_eq!(line(vdisk(&["info", s(&img)]).ok().stdout), q, "{fmt} {extra:?}");
    }
}

/// Probing follows qemu for files shorter than its 512-byte probe: an empty file is raw, and a
/// shorter one is probed as if padded with zeros (so a file holding only the start of cloop's
/// preamble is raw, and one holding only a magic is that format).
#[test]
fn short_files_probe_as_in_qemu() {
    let d = tempdir();
    for (name, bytes) in [("empty", &b""[..]), ("short", &b"#!/bin/sh\n"[..]), ("magic", &b"vhdxfile"[..])] {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let args = ["info", s(&p)];
        let (q, v) = (qemu_img(&args), vdisk(&args));
        if name == "magic" {
            assert!(q.stderr.contains("No valid VHDX header found"), "{}", q.stderr);
            assert!(v.stderr.contains("in the vhdx format"), "{}", v.stderr);
        } else {
            assert_eq!((q.code, q.stdout), (0, v.stdout), "{name}");
        }
    }
}

/// `data_file_raw=on` maps every guest cluster 1:1 onto the raw data file from creation on (qemu
/// forces metadata preallocation), and keeps doing so when the disk grows: bytes written straight
/// into the data file read back through the qcow2, as with qemu-img's image.
#[test]
fn data_file_raw_maps_the_data_file_one_to_one() {
    let d = tempdir();
    let path = |n: &str| d.path().join(n);
    let (vq, vd, qq, qd) = (path("v.qcow2"), path("v.data"), path("q.qcow2"), path("q.data"));
    let create = |img: &std::path::Path, data: &std::path::Path| {
        let o = format!("data_file={},data_file_raw=on", s(data));
        ["create", "-f", "qcow2", "-o", &o, s(img), "4M"].map(String::from)
    };
    let (a, b) = (create(&qq, &qd), create(&vq, &vd));
    let q = qemu_img(&a.each_ref().map(String::as_str)).ok();
    let v = vdisk(&b.each_ref().map(String::as_str)).ok();
    assert_eq!(q.stdout.replace(s(&qq), "X").replace(s(&qd), "D"), v.stdout.replace(s(&vq), "X").replace(s(&vd), "D"));

    let map = |img: &std::path::Path| qemu_img(&["map", "--output=json", s(img)]).ok().stdout;
    for (size, at) in [(None, 1u64 << 20), (Some("8M"), 6 << 20)] {
        if let Some(size) = size {
            qemu_img(&["resize", s(&qq), size]).ok();
            vdisk(&["resize", s(&vq), size]).ok();
        }
        assert_eq!(map(&qq), map(&vq), "mapping after growing to {size:?}");
        assert!(map(&vq).contains("\"data\": true"), "{}", map(&vq));
        // Bytes written into the raw file itself are the disk's bytes.
        use std::os::unix::fs::FileExt;
        let data = std::fs::OpenOptions::new().write(true).open(&vd).unwrap();
        data.write_all_at(&vdisk_tests::pseudo_random(65536 + 512, at), at + 512).unwrap();
        drop(data);
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&vq), s(&vd)]).ok();
        let check = qemu_img(&["check", s(&vq)]).ok();
        assert!(check.stdout.contains("No errors were found"), "{}", check.stdout);
    }
    assert_eq!(std::fs::metadata(&vq).unwrap().len(), std::fs::metadata(&qq).unwrap().len());
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
