//! Encrypted qcow2 (LUKS and legacy AES) against qemu-img and qemu-io, both ways: random
//! unaligned writes, zeroes and discards through vdisk's library checked by `qemu-img check` and
//! `qemu-img compare` with the key; what qemu-io writes read identically by vdisk; `info`, and the
//! messages for missing and wrong keys.

use std::path::Path;

use blockdev::crypto::Secret;
use blockdev::options::CreateOptions;
use blockdev::{ErrorKind, OpenOptions, ZeroFlags};
use formats::Registry;
use vdisk_tests::{pseudo_random, qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

const PASS: &str = "correct horse";
const SECRET: &str = "secret,id=s0,data=correct horse";

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

fn keyed(path: &Path) -> String {
    format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", s(path))
}

fn key() -> Option<Secret> {
    Some(Secret::new(PASS.as_bytes().to_vec()))
}

/// Random writes at byte offsets (most not sector-aligned), zeroes and discards on a new
/// encrypted image created by vdisk with `opts`; then vdisk's view, `qemu-img check` and
/// `qemu-img compare` against a plain model.
fn exercise(dir: &Path, name: &str, opts: &[(&str, &str)], seed: u64) {
    let size: u64 = 8 << 20;
    let reg = Registry::new();
    let img = dir.join(format!("{name}.qcow2"));
    let mut o = CreateOptions::new();
    o.set_secrets(vec![("s0".into(), Secret::new(PASS.as_bytes().to_vec()))]);
    o.set("size", &size.to_string());
    o.set("encrypt.key-secret", "s0");
    for (k, v) in opts {
        o.set(k, v);
    }
    reg.create("qcow2", s(&img), &o).unwrap_or_else(|e| panic!("{name}: create: {e}"));
    let ro = OpenOptions { key_secret: None, ..OpenOptions::read_write() };
    let e = reg.open(s(&img), Some("qcow2"), &ro).unwrap_err();
    assert_eq!((e.kind(), e.message()), (ErrorKind::NeedsKey, "Parameter 'encrypt.key-secret' is required for cipher"));
    let d = reg
        .open(s(&img), Some("qcow2"), &OpenOptions { key_secret: key(), ..OpenOptions::read_write() })
        .unwrap()
        .driver;
    let mut model = vec![0u8; size as usize];
    let r = pseudo_random(60 * 24, seed);
    for i in 0..60 {
        let w = |k: usize| u64::from_le_bytes(r[i * 24 + k * 8..i * 24 + k * 8 + 8].try_into().unwrap());
        let off = w(1) % (size - 1);
        let len = (w(2) % 300_000).clamp(1, size - off);
        match w(0) % 10 {
            0..=6 => {
                let data = pseudo_random(len as usize, seed ^ (i as u64 + 1));
                d.write_all_at(off, &data).unwrap_or_else(|e| panic!("{name}: write {off}+{len}: {e:#}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            7 | 8 => {
                d.write_zeroes(off, len, ZeroFlags { may_unmap: w(0) % 10 == 8, no_fallback: false })
                    .unwrap_or_else(|e| panic!("{name}: zeroes {off}+{len}: {e:#}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                d.discard(off, len).unwrap_or_else(|e| panic!("{name}: discard {off}+{len}: {e:#}"));
                d.read_exact_at(off, &mut model[off as usize..(off + len) as usize]).unwrap();
            }
        }
    }
    let mut all = vec![0u8; size as usize];
    d.read_exact_at(0, &mut all).unwrap();
    assert!(all == model, "{name}: vdisk reads back something else than it wrote");
    d.close().unwrap();
    drop(d);
    let model_path = dir.join(format!("{name}.model"));
    std::fs::write(&model_path, &model).unwrap();
    qemu_img(&["check", "--object", SECRET, "--image-opts", &keyed(&img)]).ok();
    let raw = format!("driver=raw,file.filename={}", s(&model_path));
    qemu_img(&["compare", "--object", SECRET, "--image-opts", &keyed(&img), &raw]).ok();
    // The data clusters hold no plaintext.
    let file = std::fs::read(&img).unwrap();
    let probe = model.chunks(64).find(|c| c.iter().filter(|&&b| b != 0).count() > 56).unwrap();
    assert!(!file.windows(64).any(|w| w == probe), "{name}: plaintext found in the file");
}

#[test]
fn vdisk_writes_encrypted_images_qemu_reads() {
    let d = tempdir();
    exercise(d.path(), "luks", &[("encrypt.format", "luks"), ("encrypt.iter-time", "10")], 1);
    exercise(
        d.path(),
        "luks-cbc-essiv-4k",
        &[
            ("encrypt.format", "luks"),
            ("encrypt.iter-time", "10"),
            ("encrypt.cipher-alg", "aes-128"),
            ("encrypt.cipher-mode", "cbc"),
            ("encrypt.ivgen-alg", "essiv"),
            ("encrypt.ivgen-hash-alg", "sha256"),
            ("cluster_size", "4k"),
        ],
        2,
    );
    exercise(
        d.path(),
        "luks-extl2",
        &[("encrypt.format", "luks"), ("encrypt.iter-time", "10"), ("extended_l2", "on")],
        3,
    );
    exercise(d.path(), "aes", &[("encrypt.format", "aes")], 4);
    exercise(d.path(), "aes-v2", &[("encryption", "on"), ("compat", "0.10")], 5);
}

#[test]
fn images_qemu_writes_decrypt_identically() {
    let d = tempdir();
    for (i, o) in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha512,cluster_size=2M",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha384",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha224,cluster_size=4k",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb",
        "encrypt.format=aes",
    ]
    .iter()
    .enumerate()
    {
        let img = d.path().join(format!("q{i}.qcow2"));
        let opts = format!("{o},encrypt.key-secret=s0");
        qemu_img(&["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &opts, s(&img), "6M"]).ok();
        qemu_io(&[
            "--object",
            SECRET,
            "--image-opts",
            &keyed(&img),
            "-c",
            "write -P 0x11 0 100k",
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 3M 513",
            "-c",
            "write -z 64k 64k",
        ])
        .ok();
        let (q, v) = (d.path().join("q.raw"), d.path().join("v.raw"));
        for (tool, out) in [(qemu_img as fn(&[&str]) -> Run, &q), (vdisk, &v)] {
            tool(&["convert", "--object", SECRET, "--image-opts", &keyed(&img), "-O", "raw", s(out)]).ok();
        }
        assert!(std::fs::read(&q).unwrap() == std::fs::read(&v).unwrap(), "{o}");
        for args in
            [vec!["info", s(&img)], vec!["info", "--output=json", s(&img)], vec!["map", "--output=json", s(&img)]]
        {
            let (qr, vr) = (qemu_img(&args), vdisk(&args));
            assert_eq!((qr.code, &qr.stdout, &qr.stderr), (vr.code, &vr.stdout, &vr.stderr), "{o}: {args:?}");
        }
        let map = ["map", "--output=json", "--object", SECRET, "--image-opts", &keyed(&img)];
        let (qr, vr) = (qemu_img(&map), vdisk(&map));
        assert_eq!((qr.code, &qr.stdout), (vr.code, &vr.stdout), "{o}: keyed map");
        let wrong = ["check", "--object", "secret,id=s0,data=nope", "--image-opts", &keyed(&img)];
        let (qr, vr) = (qemu_img(&wrong), vdisk(&wrong));
        // Legacy AES has no way to tell a wrong key: both tools then read garbage.
        if o.contains("format=luks") {
            assert_eq!((qr.code, &qr.stderr), (vr.code, &vr.stderr), "{o}: wrong key");
            assert_eq!(vr.code, 1);
        }
    }
}

#[test]
fn create_matches_qemu_img() {
    let d = tempdir();
    for (i, o) in [
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,cluster_size=4k",
        "encrypt.format=aes,encrypt.key-secret=s0",
        "encryption=on,encrypt.key-secret=s0",
        "encrypt.format=luks",
        "encrypt.format=foo,encrypt.key-secret=s0",
        "encryption=on,encrypt.format=luks,encrypt.key-secret=s0",
        "encrypt.format=aes,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128",
        "encrypt.cipher-alg=aes-128",
    ]
    .iter()
    .enumerate()
    {
        let (q, v) = (d.path().join(format!("c{i}.q")), d.path().join(format!("c{i}.v")));
        let qr = qemu_img(&["create", "-f", "qcow2", "--object", SECRET, "-o", o, s(&q), "64M"]);
        let vr = vdisk(&["create", "-f", "qcow2", "--object", SECRET, "-o", o, s(&v), "64M"]);
        let strip = |t: &str, p: &Path| t.replace(s(p), "X");
        assert_eq!(
            (qr.code, strip(&qr.stdout, &q), strip(&qr.stderr, &q)),
            (vr.code, strip(&vr.stdout, &v), strip(&vr.stderr, &v)),
            "{o}"
        );
        if qr.code != 0 {
            continue;
        }
        assert_eq!(std::fs::metadata(&q).unwrap().len(), std::fs::metadata(&v).unwrap().len(), "{o}: file length");
        let info = |p: &Path| {
            qemu_img(&["info", s(p)])
                .ok()
                .stdout
                .lines()
                .filter(|l| !["uuid", "iters", "disk size", "image:", "filename"].iter().any(|k| l.contains(k)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(info(&q), info(&v), "{o}");
        qemu_img(&["check", "--object", SECRET, "--image-opts", &keyed(&v)]).ok();
    }
    let src = d.path().join("src.raw");
    std::fs::write(&src, pseudo_random(1 << 20, 9)).unwrap();
    let args = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        "--object",
        SECRET,
        s(&src),
    ];
    let (qr, vr) =
        (qemu_img(&[&args[..], &["/nonexistent/x"]].concat()), vdisk(&[&args[..], &["/nonexistent/x"]].concat()));
    assert_eq!((qr.code, &qr.stderr), (vr.code, &vr.stderr));
}

/// Downgrading an encrypted image to version 2 turns its zero clusters into data clusters, which
/// must then hold encrypted zeros (plain zeros would decrypt to garbage).
#[test]
fn downgrade_stores_encrypted_zeros() {
    let d = tempdir();
    for (i, fmt) in ["luks", "aes"].iter().enumerate() {
        let img = d.path().join(format!("z{i}.qcow2"));
        let o = format!("encrypt.format={fmt},encrypt.key-secret=s0,encrypt.iter-time=10");
        let o = if *fmt == "aes" { o.replace(",encrypt.iter-time=10", "") } else { o };
        vdisk(&["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, s(&img), "4M"]).ok();
        qemu_io(&[
            "--object",
            SECRET,
            "--image-opts",
            &keyed(&img),
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -z 1M 128k",
            "-c",
            "write -z 3M 64k",
        ])
        .ok();
        let before = d.path().join(format!("z{i}.before.raw"));
        vdisk(&["convert", "--object", SECRET, "--image-opts", &keyed(&img), "-O", "raw", s(&before)]).ok();
        vdisk(&["amend", "--object", SECRET, "-o", "compat=0.10", "--image-opts", &keyed(&img)]).ok();
        qemu_img(&["check", "--object", SECRET, "--image-opts", &keyed(&img)]).ok();
        let raw = format!("driver=raw,file.filename={}", s(&before));
        qemu_img(&["compare", "--object", SECRET, "--image-opts", &keyed(&img), &raw]).ok();
    }
}

/// A chain whose layers have different keys (`backing.encrypt.key-secret`): vdisk reads through
/// it, commits the top into the base with the base's key, and gives qemu-img's messages when
/// the backing key is missing or wrong; the library takes the keys as `backing_keys`.
#[test]
fn encrypted_chain_with_a_key_per_layer() {
    let d = tempdir();
    let (base, top) = (d.path().join("base.qcow2"), d.path().join("top.qcow2"));
    let (s0, s1) = ("secret,id=b0,data=base key", "secret,id=t1,data=top key");
    let luks = |id: &str| format!("encrypt.format=luks,encrypt.key-secret={id},encrypt.iter-time=10");
    vdisk(&["create", "-q", "-f", "qcow2", "--object", s0, "-o", &luks("b0"), s(&base), "4M"]).ok();
    let base_spec = format!("driver=qcow2,file.filename={},encrypt.key-secret=b0", s(&base));
    qemu_io(&["--object", s0, "-c", "write -P 0xa 0 4M", "--image-opts", &base_spec]).ok();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        s1,
        "-o",
        &luks("t1"),
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ])
    .ok();
    let top_only = format!("driver=qcow2,file.filename={},encrypt.key-secret=t1", s(&top));
    let spec =
        format!("{top_only},backing.driver=qcow2,backing.file.filename={},backing.encrypt.key-secret=b0", s(&base));
    qemu_io(&["--object", s0, "--object", s1, "-c", "write -P 0x9 512k 1M", "--image-opts", &spec]).ok();
    let mut want = vec![0xau8; 4 << 20];
    want[512 << 10..(512 + 1024) << 10].fill(0x9);

    let out = d.path().join("chain.raw");
    vdisk(&["convert", "--object", s0, "--object", s1, "--image-opts", &spec, "-O", "raw", s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == want, "vdisk reads the chain through both keys");
    let wrong_backing = format!("{top_only},backing.encrypt.key-secret=t1");
    for image in [&top_only, &wrong_backing] {
        let args = ["convert", "--object", s0, "--object", s1, "--image-opts", image.as_str(), "-O", "raw", s(&out)];
        let (q, v) = (qemu_img(&args), vdisk(&args));
        assert_eq!((q.code, &q.stderr), (v.code, &v.stderr.replace("vdisk:", "qemu-img:")), "{image}");
        assert_eq!(v.code, 1);
    }

    let reg = Registry::new();
    let opts = OpenOptions {
        key_secret: Some(Secret::new(b"top key".to_vec())),
        backing_keys: vec![Some(Secret::new(b"base key".to_vec()))],
        ..OpenOptions::default()
    };
    let chain = reg.open(s(&top), Some("qcow2"), &opts).unwrap().driver;
    let mut buf = vec![0u8; 4 << 20];
    chain.read_exact_at(0, &mut buf).unwrap();
    assert!(buf == want, "the library reads the chain with backing_keys");
    drop(chain);

    let r = vdisk(&["commit", "--object", s0, "--object", s1, "--image-opts", &spec]).ok();
    assert_eq!(r.stdout, "Image committed.\n");
    qemu_io(&["--object", s0, "-c", "read -P 0x9 512k 1M", "-c", "read -P 0xa 0 512k", "--image-opts", &base_spec])
        .ok();
    qemu_img(&["check", "--object", s0, "--image-opts", &base_spec]).ok();
}
