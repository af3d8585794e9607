//! `map` and `compare` against qemu-img on raw and qcow2 images with holes, zeros, compressed
//! clusters and backing chains: identical output and exit codes.

use std::path::Path;

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

fn same(args: &[&str]) {
    let q = qemu_img(args);
    let v = vdisk(args);
    assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{args:?}");
}

#[test]
fn map_matches_qemu_img() {
    let d = tempdir();
    let raw = d.path().join("a.raw");
    qemu_img(&["create", "-f", "raw", s(&raw), "16M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -z 4M 1M", "-c", "write -P 2 15M 64k", s(&raw)]).ok();
    let base = d.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "16M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 3 0 2M", "-c", "write -z 6M 1M", s(&base)]).ok();
    let top = d.path().join("t.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top), "20M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 4 1M 2M", "-c", "discard 6M 64k", "-c", "write -P 5 18M 1M", s(&top)])
        .ok();
    let comp = d.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&comp)]).ok();
    // Extended L2 entries over a shorter backing file: unallocated subclusters of allocated
    // clusters, inside and past the backing file.
    let ext = d.path().join("x.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "extended_l2=on", "-b", s(&base), "-F", "qcow2", s(&ext), "20M"]).ok();
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 6 1K 7K",
        "-c",
        "write -P 6 6100K 3K",
        "-c",
        "write -P 6 17M 3K",
        s(&ext),
    ])
    .ok();
    for img in [&raw, &top, &base, &comp, &ext] {
        for out in ["--output=human", "--output=json"] {
            same(&["map", out, s(img)]);
            same(&["map", out, "--start-offset=1M", "--max-length=5M", s(img)]);
        }
    }
    // Upstream's wording (Debian's qemu-img rewords size errors).
    let v = vdisk(&["map", "--start-offset=1Q", s(&raw)]);
    assert_eq!(v.code, 1);
    assert!(v
        .stderr
        .starts_with("qemu-img: Invalid start offset specified. You may use k, M, G, T, P or E suffixes for\n"));
    let v = vdisk(&["map", "--output=xml", s(&raw)]);
    assert_eq!((v.code, v.stderr.as_str()), (1, "qemu-img: --output must be used with human or json as argument.\n"));
    same(&["map", s(&d.path().join("missing"))]);
}

#[test]
fn compare_matches_qemu_img() {
    let d = tempdir();
    let a = d.path().join("a.raw");
    qemu_img(&["create", "-f", "raw", s(&a), "8M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 7 1M 3M", s(&a)]).ok();
    let b = d.path().join("b.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&a), s(&b)]).ok();
    let c = d.path().join("c.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&a), s(&c)]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 8 2M 1000", s(&c)]).ok();
    let big = d.path().join("big.raw");
    qemu_img(&["create", "-f", "raw", s(&big), "9M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 7 1M 3M", s(&big)]).ok();
    let bigdata = d.path().join("bigdata.raw");
    qemu_img(&["create", "-f", "raw", s(&bigdata), "9M"]).ok();
    qemu_io(&["-f", "raw", "-c", "write -P 7 1M 3M", "-c", "write -P 9 8200k 512", s(&bigdata)]).ok();
    for pair in [[&a, &b], [&b, &c], [&a, &big], [&a, &bigdata]] {
        same(&["compare", s(pair[0]), s(pair[1])]);
        same(&["compare", "-s", s(pair[0]), s(pair[1])]);
        same(&["compare", "-q", s(pair[0]), s(pair[1])]);
    }
    // Debian's qemu-img words its usage hint differently; this is upstream's.
    let v = vdisk(&["compare", s(&a)]);
    assert_eq!(
        (v.code, v.stderr.as_str()),
        (1, "qemu-img: Expecting two image file names\nTry 'qemu-img --help' for more information\n")
    );
    same(&["compare", s(&a), s(&d.path().join("missing"))]);
}

/// `--image-opts` with qcow2's cache options: sizes are honoured or refused with qemu-img's words,
/// and a bad value of any option fails the open as in qemu-img.
#[test]
fn image_opts_cache_sizes_and_bad_values_match_qemu_img() {
    let d = tempdir();
    let img = d.path().join("c.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "cluster_size=4096", s(&img), "64M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 9 0 1M", "-c", "write -P 8 40M 3M", s(&img)]).ok();
    for extra in [
        "cache-size=1M",
        "cache-size=1M,l2-cache-size=8k",
        "cache-size=1M,refcount-cache-size=8k",
        "l2-cache-size=1,refcount-cache-size=1",
        "cache-size=1M,l2-cache-size=512k,refcount-cache-size=256k",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "l2-cache-size=xyz",
        "lazy-refcounts=maybe",
        "force-share=xyz",
        "no-such-option=1",
    ] {
        let opts = format!("driver=qcow2,file.filename={},{extra}", s(&img));
        same(&["map", "--output=json", "--image-opts", &opts]);
        same(&["check", "--image-opts", &opts]);
    }
}

/// Strict mode reports the first offset where the block status differs, and qemu's status carries
/// an end-of-file flag: two disks whose extents start at the same offset but of which only one
/// reaches the end differ there, even when both extents are unallocated or both hold data.
/// Compared for every pair of a set of qcow2 and raw images, with and without `-s`.
#[test]
fn strict_compare_reports_the_first_status_difference_as_qemu_img() {
    let d = tempdir();
    let mut images = Vec::new();
    for (name, writes) in [
        ("empty", vec![]),
        ("data", vec!["write -P 1 1M 64k"]),
        ("zero", vec!["write -z 1M 64k"]),
        ("data-then-zero", vec!["write -P 1 1M 64k", "write -z 0 64k"]),
        ("two-data", vec!["write -P 1 1M 64k", "write -P 1 3M 64k"]),
        ("inner-diff", vec!["write -P 1 1M 64k", "write -P 2 1100000 1000"]),
        ("zero-alloc", vec!["write -P 3 2M 64k", "write -z 2M 64k"]),
        ("zero-bytes", vec!["write -P 0 1M 64k", "write -P 5 1058000 100"]),
    ] {
        let img = d.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).ok();
        for w in writes {
            qemu_io(&["-f", "qcow2", "-c", w, s(&img)]).ok();
        }
        images.push(img);
    }
    for (name, writes) in [("raw-empty", vec![]), ("raw-data", vec!["write -P 1 1M 64k"])] {
        let img = d.path().join(format!("{name}.raw"));
        qemu_img(&["create", "-q", "-f", "raw", s(&img), "4M"]).ok();
        for w in writes {
            qemu_io(&["-f", "raw", "-c", w, s(&img)]).ok();
        }
        images.push(img);
    }
    let bigger = d.path().join("bigger.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&bigger), "8M"]).ok();
    images.push(bigger);
    for a in &images {
        for b in &images {
            same(&["compare", "-s", s(a), s(b)]);
            same(&["compare", s(a), s(b)]);
        }
    }
}

/// `"backing": null` in a `json:` name, the deprecated `"backing": ""`, and `backing=` in
/// `--image-opts` open an image without its backing file (areas it does not allocate read as
/// zeros), with qemu-img's deprecation warning for the empty string; `backing=null` in
/// `--image-opts` and other values are refused as qemu-img refuses them.
#[test]
fn backing_null_opens_the_image_alone_as_qemu_img() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x11 0 4M", s(&base)]).ok();
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top), "4M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x22 1M 64k", s(&top)]).ok();
    let t = s(&top);
    let json = |backing: &str| {
        format!(r#"json:{{"driver":"qcow2","backing":{backing},"file":{{"driver":"file","filename":"{t}"}}}}"#)
    };
    let (null, empty) = (json("null"), json(r#""""#));
    let opts = format!("driver=qcow2,file.filename={t},backing=");
    let base_opts = format!("driver=qcow2,file.filename={}", s(&base));
    for name in [null.as_str(), empty.as_str()] {
        for args in [
            vec!["info", name],
            vec!["info", "--output=json", name],
            vec!["info", "--backing-chain", name],
            vec!["info", "--backing-chain", "--output=json", name],
            vec!["map", name],
            vec!["map", "--output=json", name],
            vec!["compare", name, s(&base)],
            vec!["compare", s(&base), name],
            vec!["compare", name, null.as_str()],
            vec!["check", name],
            vec!["measure", "-O", "qcow2", name],
            // Without its backing file the image has nothing to commit into.
            vec!["commit", name],
        ] {
            same(&args);
        }
    }
    for args in [
        vec!["info", "--image-opts", opts.as_str()],
        vec!["info", "--image-opts", "--output=json", &opts],
        vec!["info", "--image-opts", "--backing-chain", &opts],
        vec!["map", "--image-opts", &opts],
        vec!["map", "--image-opts", "--output=json", &opts],
        vec!["compare", "--image-opts", &opts, &base_opts],
        vec!["commit", "--image-opts", &opts],
    ] {
        same(&args);
    }
    // Refused spellings.
    same(&["info", "--image-opts", &format!("driver=qcow2,file.filename={t},backing=null")]);
    same(&["info", &json(r#""null""#)]);
    same(&["info", &json("{}")]);
    same(&["info", &json("false")]);
    // convert reads zeros where the top allocates nothing.
    for name in [null.as_str(), empty.as_str()] {
        let (q, v) = (d.path().join("q.raw"), d.path().join("v.raw"));
        let qr = qemu_img(&["convert", "-O", "raw", name, s(&q)]);
        let vr = vdisk(&["convert", "-O", "raw", name, s(&v)]);
        assert_eq!((vr.code, &vr.stdout, &vr.stderr), (qr.code, &qr.stdout, &qr.stderr), "convert {name}");
        let want = std::fs::read(&q).unwrap();
        assert!(want[..1 << 20].iter().all(|&b| b == 0) && want[1 << 20] == 0x22, "qemu-img's reading changed");
        assert!(std::fs::read(&v).unwrap() == want, "convert {name}: content differs");
    }
}
