//! `commit`, `rebase` and `amend` on qcow2 chains, checked against what qemu-img does to an
//! identical chain: same visible content, same allocation, clean `qemu-img check`.

use std::path::{Path, PathBuf};

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// base (16M) <- mid <- top, each with some data; returns (base, mid, top).
fn chain(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join(format!("base.{tag}"));
    let mid = dir.join(format!("mid.{tag}"));
    let top = dir.join(format!("top.{tag}"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 8M 1M", s(&base)]).ok();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&mid)]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 5 2M 1M", "-c", "write -P 6 10M 64k", s(&mid)]).ok();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&mid), "-F", "qcow2", s(&top), "20M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 3 1M 1M", "-c", "write -z 8M 64k", "-c", "write -P 4 18M 1M", s(&top)])
        .ok();
    (base, mid, top)
}

fn flat(img: &Path, out: &Path) {
    qemu_img(&["convert", "-O", "raw", s(img), s(out)]).ok();
}

/// The allocation map without host offsets: qemu-img's own commit job writes in parallel, so where
/// clusters land in the base differs from run to run even for qemu-img itself.
fn map(img: &Path) -> String {
    let out = qemu_img(&["map", "--output=json", s(img)]).ok().stdout;
    out.lines()
        .map(|l| match l.find(", \"offset\"") {
            Some(i) => format!("{}}}", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn commit_like_qemu_img() {
    let d = tempdir();
    for extra in [&[][..], &["-d"], &["-b", "BASE"]] {
        let (qb, _qm, qt) = chain(d.path(), "q");
        let (vb, _vm, vt) = chain(d.path(), "v");
        let want = d.path().join("want.raw");
        flat(&vt, &want);
        let qa: Vec<&str> = ["commit"]
            .into_iter()
            .chain(extra.iter().map(|a| if *a == "BASE" { s(&qb) } else { a }))
            .chain([s(&qt)])
            .collect();
        let va: Vec<&str> = ["commit"]
            .into_iter()
            .chain(extra.iter().map(|a| if *a == "BASE" { s(&vb) } else { a }))
            .chain([s(&vt)])
            .collect();
        let q = qemu_img(&qa);
        let v = vdisk(&va);
        assert_eq!((q.code, &q.stdout), (v.code, &v.stdout), "{extra:?}: {}", v.stderr);
        for img in [&vb, &vt] {
            qemu_img(&["check", s(img)]).ok();
        }
        qemu_img(&["compare", s(&vt), s(&want)]).ok();
        assert_eq!(map(&qt), map(&vt), "top after commit {extra:?}");
        let base_q = d.path().join("bq.raw");
        let base_v = d.path().join("bv.raw");
        flat(&qb, &base_q);
        flat(&vb, &base_v);
        assert!(std::fs::read(&base_q).unwrap() == std::fs::read(&base_v).unwrap(), "base content {extra:?}");
    }
    let lonely = d.path().join("lonely.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&lonely), "1M"]).ok();
    let v = vdisk(&["commit", s(&lonely)]);
    assert_eq!((v.code, v.stderr.as_str()), (1, "qemu-img: Image does not have a backing file\n"));
}

#[test]
fn rebase_keeps_content_and_matches_qemu_img() {
    let d = tempdir();
    for (mode, compress) in [("safe", false), ("safe", true), ("flatten", false), ("unsafe", false)] {
        let (qb, _qm, qt) = chain(d.path(), "q");
        let (vb, _vm, vt) = chain(d.path(), "v");
        let want = d.path().join("want.raw");
        flat(&vt, &want);
        let (qn, vn) = match mode {
            "flatten" => (String::new(), String::new()),
            _ => (s(&qb).to_string(), s(&vb).to_string()),
        };
        let mut qa = vec!["rebase", "-b", qn.as_str()];
        let mut va = vec!["rebase", "-b", vn.as_str()];
        if !qn.is_empty() {
            qa.extend(["-F", "qcow2"]);
            va.extend(["-F", "qcow2"]);
        }
        if mode == "unsafe" {
            qa.push("-u");
            va.push("-u");
        }
        if compress {
            qa.push("-c");
            va.push("-c");
        }
        qa.push(s(&qt));
        va.push(s(&vt));
        let q = qemu_img(&qa);
        let v = vdisk(&va);
        assert_eq!((q.code, &q.stdout, &q.stderr), (v.code, &v.stdout, &v.stderr), "{mode}");
        qemu_img(&["check", s(&vt)]).ok();
        let info_q = qemu_img(&["info", "--output=json", s(&qt)]).ok().stdout;
        let info_v = qemu_img(&["info", "--output=json", s(&vt)]).ok().stdout;
        let pick = |t: &str| {
            t.lines()
                .filter(|l| l.contains("backing-filename"))
                .map(|l| l.replace(".q\"", "").replace(".v\"", ""))
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(&info_q), pick(&info_v), "{mode}: backing");
        if mode != "unsafe" {
            qemu_img(&["compare", s(&vt), s(&want)]).ok();
            assert_eq!(map(&qt), map(&vt), "{mode} {compress}: allocation");
        }
    }
}

#[test]
fn amend_changes_what_qemu_img_changes() {
    let d = tempdir();
    for (create, amend) in [
        ("compat=1.1", "compat=0.10"),
        ("compat=0.10", "compat=1.1"),
        ("compat=1.1", "refcount_bits=1"),
        ("compat=1.1", "refcount_bits=64"),
        ("compat=1.1", "lazy_refcounts=on"),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"),
        ("compat=1.1", "size=32M"),
    ] {
        let q = d.path().join("a.q");
        let v = d.path().join("a.v");
        for p in [&q, &v] {
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", create, s(p), "16M"]).ok();
            qemu_io(&["-f", "qcow2", "-c", "write -P 9 0 1M", "-c", "write -z 4M 1M", "-c", "write -P 8 15M 1M", s(p)])
                .ok();
        }
        let want = d.path().join("want.raw");
        flat(&v, &want);
        let qr = qemu_img(&["amend", "-o", amend, s(&q)]);
        let vr = vdisk(&["amend", "-o", amend, s(&v)]);
        assert_eq!((qr.code, &qr.stdout, &qr.stderr), (vr.code, &vr.stdout, &vr.stderr), "{amend}");
        qemu_img(&["check", s(&v)]).ok();
        let iq = qemu_img(&["info", s(&q)]).ok().stdout.replace("a.q", "X");
        let iv = qemu_img(&["info", s(&v)]).ok().stdout.replace("a.v", "X");
        let strip = |t: &str| {
            t.lines().filter(|l| !l.contains("disk size") && !l.contains("file length")).collect::<Vec<_>>().join("\n")
        };
        assert_eq!(strip(&iq), strip(&iv), "{amend}");
        qemu_img(&["compare", "-F", "raw", s(&v), s(&want)]).ok();
    }
    let v = d.path().join("b.v");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&v), "1M"]).ok();
    for bad in ["compat=0.42", "foo=bar", "cluster_size=1k", "preallocation=on", "backing_file=/nonexistent"] {
        let q = qemu_img(&["amend", "-o", bad, s(&v)]);
        let r = vdisk(&["amend", "-o", bad, s(&v)]);
        assert_eq!((q.code, &q.stderr), (r.code, &r.stderr), "{bad}");
    }
}

/// Safe rebase between backing files of other kinds: a raw old backing (compared through its
/// mapped pages) onto a qcow2 new one holding compressed clusters, zero clusters and data written
/// at unaligned places (compared through reads): the result reads as before and allocates what
/// qemu-img's does.
#[test]
fn rebase_between_raw_and_compressed_backings_matches_qemu_img() {
    let d = tempdir();
    let old_raw = d.path().join("old.raw");
    let mut bytes = vec![0u8; 8 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = if (i >> 16) % 3 == 0 { 0 } else { (i >> 12) as u8 | 1 };
    }
    std::fs::write(&old_raw, &bytes).unwrap();
    let new_src = d.path().join("new.raw");
    bytes[(3 << 20) + 777..(3 << 20) + 5000].fill(0x55);
    bytes[(6 << 20)..(6 << 20) + 65536].fill(0);
    std::fs::write(&new_src, &bytes).unwrap();
    let new = d.path().join("new.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", s(&new_src), s(&new)]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 9 1M 100k", "-c", "write -z 5M 128k", s(&new)]).ok();
    let mut results = Vec::new();
    for (tool, tag) in [(qemu_img as fn(&[&str]) -> Run, "q"), (vdisk, "v")] {
        let top = d.path().join(format!("top.{tag}"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&old_raw), "-F", "raw", s(&top)]).ok();
        qemu_io(&["-f", "qcow2", "-c", "write -P 3 2M 64k", s(&top)]).ok();
        let want = d.path().join(format!("want.{tag}"));
        flat(&top, &want);
        tool(&["rebase", "-q", "-f", "qcow2", "-b", s(&new), "-F", "qcow2", s(&top)]).ok();
        qemu_img(&["check", s(&top)]).ok();
        qemu_img(&["compare", s(&top), s(&want)]).ok();
        results.push(map(&top));
    }
    assert_eq!(results[0], results[1], "allocation after rebase");
}

/// Safe rebase where the old backing view reads zeros (unallocated in a qcow2) over data of the
/// new one, a raw file with data, zero-filled bytes and a hole, and where the old view has data
/// over the new one's hole: every differing unit is written, with qemu-img's allocation.
#[test]
fn rebase_from_sparse_old_view_onto_raw_data_matches_qemu_img() {
    let d = tempdir();
    let old = d.path().join("old.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&old), "6M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 0 1M", "-c", "write -P 8 5M 64k", s(&old)]).ok();
    let new = d.path().join("new.raw");
    let mut bytes = vec![0u8; 6 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i >> 16) as u8 | 0x80;
    }
    bytes[(2 << 20)..(2 << 20) + 131072].fill(0);
    std::fs::write(&new, &bytes).unwrap();
    // A hole over the old view's data at 5M.
    let f = std::fs::OpenOptions::new().write(true).open(&new).unwrap();
    f.set_len(5 << 20).unwrap();
    f.set_len(6 << 20).unwrap();
    let mut results = Vec::new();
    for (tool, tag) in [(qemu_img as fn(&[&str]) -> Run, "q"), (vdisk, "v")] {
        let top = d.path().join(format!("sparse-top.{tag}"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&old), "-F", "qcow2", s(&top)]).ok();
        qemu_io(&["-f", "qcow2", "-c", "write -P 3 3M 64k", s(&top)]).ok();
        let want = d.path().join(format!("sparse-want.{tag}"));
        flat(&top, &want);
        tool(&["rebase", "-q", "-f", "qcow2", "-b", s(&new), "-F", "raw", s(&top)]).ok();
        qemu_img(&["check", s(&top)]).ok();
        qemu_img(&["compare", s(&top), s(&want)]).ok();
        results.push(map(&top));
    }
    assert_eq!(results[0], results[1], "allocation after rebase");
}

/// A qemu-io holding `image` open (read-only with `-r`) until dropped; it answers a read first, so
/// the image is open (and locked) once this returns.
struct Holder(std::process::Child);

impl Holder {
    fn new(image: &Path, read_only: bool) -> Holder {
        use std::io::{BufRead, Write};
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(vdisk_tests::qemu_tool("qemu-io"));
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .args(["-f", "qcow2", s(image)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io runs");
        child.stdin.as_mut().unwrap().write_all(b"read 0 512\n").unwrap();
        child.stdin.as_mut().unwrap().flush().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("read 512/512 bytes") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io exited before reading");
        }
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        use std::io::Write;
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

/// `commit` while another process holds the image or its base: qemu-img names the image it could
/// not open read-write (or the backing file it could not share), or reports the base's write lock
/// as is when only taking the base for writing fails; vdisk prints the same and changes nothing.
#[test]
fn commit_lock_conflicts_are_reported_as_by_qemu_img() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]).ok();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top), "4M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 3 1M 64k", s(&top)]).ok();
    let before = (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap());
    for (held, read_only) in [(&top, false), (&top, true), (&base, false), (&base, true)] {
        let _holder = Holder::new(held, read_only);
        for args in [vec!["commit", s(&top)], vec!["commit", "-d", s(&top)], vec!["commit", "-f", "qcow2", s(&top)]] {
            let q = qemu_img(&args);
            let v = vdisk(&args);
            let what = format!("{args:?} while {} is held (read-only: {read_only})", held.display());
            assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{what}");
            assert_eq!(q.code, 1, "{what}: qemu-img must fail");
            assert!(v.stderr.contains("lock"), "{what}: {}", v.stderr);
        }
        assert!(std::fs::read(&base).unwrap() == before.0, "base changed");
    }
    // qemu-img's failed attempts may rewrite the top's header; the data stays in the top.
    qemu_io(&["-f", "qcow2", "-c", "read -P 3 1M 64k", s(&top)]).ok();
}

/// `convert -n` of an image onto itself: the target's open conflicts with the source's lock in
/// the same process (the library says so in the error's kind), and the message is qemu-img's.
#[test]
fn converting_an_image_onto_itself_fails_as_in_qemu_img() {
    let d = tempdir();
    let img = d.path().join("same.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    let args = ["convert", "-n", "-f", "qcow2", "-O", "qcow2", s(&img), s(&img)];
    let q = qemu_img(&args);
    let v = vdisk(&args);
    assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr));
    assert_eq!(q.code, 1);
    assert!(v.stderr.contains("Failed to get \"write\" lock"), "{}", v.stderr);
}
