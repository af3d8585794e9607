//! The raw `luks` format against qemu-img and qemu-io, both ways: every cipher, mode, IV
//! generator and hash vdisk implements, data written by one tool read by the other, qemu-img's
//! messages for missing and wrong keys, and `info` of the same volume.

use std::path::Path;

use vdisk_tests::{pseudo_random, qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

const SECRET: &str = "secret,id=s0,data=correct horse";

/// `-o` strings for the combinations checked (qemu's create options). AES-192 outside XTS is
/// missing: its key material does not fill whole sectors and qemu-img 10.0.2 aborts on it.
const COMBOS: &[&str] = &[
    "",
    "cipher-alg=aes-128",
    "cipher-alg=aes-192,hash-alg=sha512",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha384",
    "cipher-mode=xts,ivgen-alg=plain,hash-alg=sha224",
    "cipher-mode=ecb",
];

fn opts(combo: &str) -> String {
    if combo.is_empty() {
        "key-secret=s0,iter-time=10".into()
    } else {
        format!("key-secret=s0,iter-time=10,{combo}")
    }
}

fn image_opts(path: &Path) -> String {
    format!("driver=luks,file.filename={},key-secret=s0", s(path))
}

/// Writes a pattern with qemu-io through qemu's LUKS driver.
fn qemu_io_writes(path: &Path) {
    qemu_io(&[
        "--object",
        SECRET,
        "--image-opts",
        &image_opts(path),
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -P 0x22 1000 3000",
        "-c",
        "write -P 0x33 1M 512",
        "-c",
        "write -z 1536k 4k",
    ])
    .ok();
}

/// The plaintext as `tool` decrypts it (convert to raw).
fn decrypt(tool: fn(&[&str]) -> Run, path: &Path, out: &Path) -> Vec<u8> {
    tool(&["convert", "--object", SECRET, "--image-opts", &image_opts(path), "-O", "raw", s(out)]).ok();
    std::fs::read(out).unwrap()
}

#[test]
fn volumes_qemu_creates_decrypt_identically_in_vdisk() {
    let d = tempdir();
    for (i, combo) in COMBOS.iter().enumerate() {
        let img = d.path().join(format!("q{i}.luks"));
        qemu_img(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", &opts(combo), s(&img), "2M"]).ok();
        qemu_io_writes(&img);
        let want = decrypt(qemu_img, &img, &d.path().join("q.raw"));
        assert!(want.contains(&0x22), "{combo}: qemu wrote data");
        let got = decrypt(vdisk, &img, &d.path().join("v.raw"));
        assert!(got == want, "{combo}: vdisk's plaintext differs from qemu's");
    }
}

#[test]
fn volumes_vdisk_creates_and_writes_are_read_by_qemu() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    let mut data = pseudo_random(3 << 20, 7);
    data[(1 << 20)..(2 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    for (i, combo) in COMBOS.iter().enumerate() {
        let img = d.path().join(format!("v{i}.luks"));
        let v =
            vdisk(&["convert", "--object", SECRET, "-f", "raw", "-O", "luks", "-o", &opts(combo), s(&src), s(&img)]);
        v.ok();
        let src_opts = format!("driver=raw,file.filename={}", s(&src));
        qemu_img(&["compare", "--object", SECRET, "--image-opts", &image_opts(&img), &src_opts]).ok();
        // qemu-io's writes land where vdisk reads them, and vdisk's rewrite of a partial sector
        // keeps the bytes around it.
        qemu_io_writes(&img);
        let want = decrypt(qemu_img, &img, &d.path().join("q.raw"));
        let got = decrypt(vdisk, &img, &d.path().join("v.raw"));
        assert!(got == want, "{combo}");
        let h = qemu_img(&["info", "--output=json", s(&img)]).ok().stdout;
        assert!(h.contains("\"format\": \"luks\""), "{combo}: {h}");
    }
}

#[test]
fn header_layout_matches_qemu_for_each_key_size() {
    let d = tempdir();
    let combos = ["", "cipher-alg=aes-128", "cipher-alg=aes-128,cipher-mode=cbc", "cipher-alg=aes-192"];
    for (i, combo) in combos.iter().enumerate() {
        let (q, v) = (d.path().join(format!("q{i}.luks")), d.path().join(format!("v{i}.luks")));
        qemu_img(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", &opts(combo), s(&q), "1M"]).ok();
        vdisk(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", &opts(combo), s(&v), "1M"]).ok();
        assert_eq!(std::fs::metadata(&q).unwrap().len(), std::fs::metadata(&v).unwrap().len(), "{combo}");
        let strip = |t: String| {
            t.lines()
                .filter(|l| {
                    !["uuid", "iters", "disk size", "actual-size", "image:", "filename"].iter().any(|k| l.contains(k))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let iq = strip(qemu_img(&["info", s(&q)]).ok().stdout);
        let iv = strip(qemu_img(&["info", s(&v)]).ok().stdout);
        assert_eq!(iq, iv, "{combo}");
    }
}

#[test]
fn info_and_key_errors_match_qemu_img() {
    let d = tempdir();
    let img = d.path().join("x.luks");
    qemu_img(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", &opts(""), s(&img), "1M"]).ok();
    for args in [
        vec!["info", s(&img)],
        vec!["info", "--output=json", s(&img)],
        vec!["map", "--output=json", s(&img)],
        vec!["convert", "-O", "raw", s(&img), "/dev/null"],
    ] {
        let (q, v) = (qemu_img(&args), vdisk(&args));
        assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{args:?}");
    }
    let wrong = format!("driver=luks,file.filename={},key-secret=s0", s(&img));
    for object in ["secret,id=s0,data=wrong", "secret,id=s1,data=x"] {
        let args = ["map", "--object", object, "--image-opts", wrong.as_str()];
        let (q, v) = (qemu_img(&args), vdisk(&args));
        assert_eq!((q.code, &q.stderr), (v.code, &v.stderr), "{object}");
        assert_eq!(v.code, 1);
    }
    let args = ["create", "-f", "luks", s(&img), "1M"];
    let (q, v) = (qemu_img(&args), vdisk(&args));
    assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr));
}

/// A `luks` creation that fails once the file exists (no key, a key that is not UTF-8, an unknown
/// secret) removes the file, even one that was there before, with qemu-img's messages.
#[test]
fn failed_creation_leaves_no_file_like_qemu_img() {
    let d = tempdir();
    let not_utf8 = "secret,id=s0,data=/w==,format=base64";
    for (object, o) in [(SECRET, "iter-time=10"), (not_utf8, "key-secret=s0"), (SECRET, "key-secret=nosuch")] {
        let mut outcomes = Vec::new();
        for (tool, name) in [(qemu_img as fn(&[&str]) -> Run, "q.luks"), (vdisk, "v.luks")] {
            let img = d.path().join(name);
            std::fs::write(&img, b"existing").unwrap();
            let r = tool(&["create", "-f", "luks", "--object", object, "-o", o, s(&img), "1M"]);
            outcomes.push((r.code, r.stdout.replace(name, "IMG"), r.stderr.replace(name, "IMG"), img.exists()));
        }
        assert_eq!(outcomes[0], outcomes[1], "{object} -o {o}");
        assert_eq!((outcomes[1].0, outcomes[1].3), (1, false), "{object} -o {o}: fails and removes the file");
    }
}

/// cryptsetup (an independent LUKS implementation) accepts the headers vdisk writes and unlocks
/// their key slot with the passphrase, and only with it.
#[test]
fn cryptsetup_accepts_and_unlocks_vdisk_headers() {
    let d = tempdir();
    let cryptsetup = std::process::Command::new("cryptsetup").arg("--version").output();
    assert!(cryptsetup.is_ok_and(|o| o.status.success()), "cryptsetup is missing (Debian package cryptsetup-bin)");
    for (i, combo) in ["", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1"].iter().enumerate() {
        let img = d.path().join(format!("c{i}.luks"));
        vdisk(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", &opts(combo), s(&img), "1M"]).ok();
        let dump = std::process::Command::new("cryptsetup").args(["luksDump", s(&img)]).output().unwrap();
        let text = String::from_utf8_lossy(&dump.stdout);
        assert!(dump.status.success(), "{combo}: {}", String::from_utf8_lossy(&dump.stderr));
        assert!(text.contains("Version:       \t1"), "{text}");
        assert!(text.contains("Key Slot 0: ENABLED") && text.contains("Key Slot 1: DISABLED"), "{combo}: {text}");
        for (pass, want) in [("correct horse", Some(0)), ("wrong horse", Some(2))] {
            let mut child = std::process::Command::new("cryptsetup")
                .args(["open", "--test-passphrase", "--key-file=-", s(&img)])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(pass.as_bytes()).unwrap();
            assert_eq!(child.wait().unwrap().code(), want, "{combo}: passphrase {pass:?}");
        }
    }
}

/// Unaligned, multi-slice writes and zeroes through the library (read-modify-write of partial
/// sectors) land where qemu-img reads them.
#[test]
fn library_writes_at_any_offset_match_qemu() {
    use blockdev::crypto::Secret;
    use blockdev::{OpenOptions, ZeroFlags};
    let d = tempdir();
    let img = d.path().join("w.luks");
    qemu_img(&["create", "-q", "-f", "luks", "--object", SECRET, "-o", &opts(""), s(&img), "3M"]).ok();
    // A fresh volume reads as whatever its unwritten sectors decrypt to, not zeros.
    let mut model = decrypt(qemu_img, &img, &d.path().join("fresh.raw"));
    let reg = formats::Registry::new();
    let key = Some(Secret::new(b"correct horse".to_vec()));
    let v =
        reg.open(s(&img), Some("luks"), &OpenOptions { key_secret: key, ..OpenOptions::read_write() }).unwrap().driver;
    let size = 3u64 << 20;
    assert_eq!(model.len() as u64, size);
    let r = pseudo_random(40 * 16, 77);
    for i in 0..40 {
        let w = |k: usize| u64::from_le_bytes(r[i * 16 + k * 8..i * 16 + k * 8 + 8].try_into().unwrap());
        let off = w(0) % (size - 1);
        let len = (w(1) % (1_500_000)).clamp(1, size - off);
        if i % 5 == 4 {
            v.write_zeroes(off, len, ZeroFlags::default()).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = pseudo_random(len as usize, i as u64);
            let cut = (len as usize / 3).max(1).min(data.len());
            let slices = [std::io::IoSlice::new(&data[..cut]), std::io::IoSlice::new(&data[cut..])];
            v.write_at(off, &slices).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
    v.flush().unwrap();
    drop(v);
    let got = decrypt(qemu_img, &img, &d.path().join("w.raw"));
    let first = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        got == model,
        "qemu-img reads something else than vdisk wrote (first at {first:?}, len {} vs {})",
        got.len(),
        model.len()
    );
}
