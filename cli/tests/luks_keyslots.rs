//! `amend`'s LUKS key-slot management against qemu-img, for the raw `luks` format and LUKS
//! qcow2: the same sequence of additions, erasures and refused requests run by each tool on its
//! copy of one volume gives the same exit codes, the same messages and the same active slots
//! after every step; and at the end every passphrase either tool put into a slot opens that
//! image in the other tool, while erased ones open nothing.

use std::path::Path;

use vdisk_tests::{qemu_img, qemu_io, s, tempdir, vdisk_as_qemu_img, Run};

fn vdisk(args: &[&str]) -> Run {
    vdisk_as_qemu_img(Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// Passphrases `k0`..`k7` as secrets `s0`..`s7`, and `s8` which is not UTF-8 (`/w==` is 0xff).
fn secrets() -> Vec<String> {
    let mut v: Vec<String> = (0..8).map(|i| format!("secret,id=s{i},data=passphrase-{i}")).collect();
    v.push("secret,id=s8,data=/w==,format=base64".into());
    v
}

/// `--image-opts` for `img` of driver `fmt`, unlocked with secret `key`.
fn opened(fmt: &str, img: &Path, key: &str) -> String {
    let prefix = if fmt == "qcow2" { "encrypt." } else { "" };
    format!("driver={fmt},file.filename={},{prefix}key-secret={key}", s(img))
}

/// Runs `tool` with `args`, every secret defined after the first (the subcommand, or a flag).
fn keyed(tool: fn(&[&str]) -> Run, args: &[&str]) -> Run {
    let objects: Vec<String> = secrets();
    let mut v = vec![args[0]];
    v.extend(objects.iter().flat_map(|o| ["--object", o.as_str()]));
    v.extend_from_slice(&args[1..]);
    tool(&v)
}

/// Which slots `info` (run by qemu-img, without a key) shows active.
fn active_slots(img: &Path) -> Vec<bool> {
    let info = qemu_img(&["info", "--output=json", s(img)]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let spec = &v["format-specific"]["data"];
    let slots = spec.get("slots").or_else(|| spec["encrypt"].get("slots")).expect("slots in info");
    slots.as_array().unwrap().iter().map(|s| s["active"].as_bool().unwrap()).collect()
}

/// One `amend` request: the secret the image is opened with, the `-o` string (keys without the
/// format's prefix) and whether `--force` is given.
struct Step {
    key: &'static str,
    opts: &'static str,
    force: bool,
}

const fn step(key: &'static str, opts: &'static str) -> Step {
    Step { key, opts, force: false }
}

const fn forced(key: &'static str, opts: &'static str) -> Step {
    Step { key, opts, force: true }
}

/// The sequence both tools run: each line succeeds or fails in a way qemu-img defines.
const STEPS: &[Step] = &[
    step("s0", "state=active,new-secret=s1,iter-time=10"),
    step("s1", "state=active,new-secret=s2,keyslot=5,iter-time=10"),
    step("s0", "state=active,new-secret=s3,keyslot=5,iter-time=10"),
    forced("s0", "state=active,new-secret=s3,keyslot=5,iter-time=10"),
    step("s3", "state=active,new-secret=s2,iter-time=10"),
    step("s0", "keyslot=1"),
    step("s0", "state=bogus"),
    step("s0", "state=active"),
    step("s0", "state=active,new-secret=s1,old-secret=s0"),
    step("s0", "state=active,new-secret=s1,keyslot=8"),
    step("s0", "state=active,new-secret=s1,keyslot=-1"),
    step("s0", "state=active,new-secret=s9,iter-time=10"),
    step("s0", "state=active,new-secret=s8,iter-time=10"),
    step("s0", "state=inactive"),
    step("s0", "state=inactive,new-secret=s1,keyslot=1"),
    step("s0", "state=inactive,iter-time=10,keyslot=1"),
    step("s0", "state=inactive,keyslot=-2"),
    step("s0", "state=inactive,keyslot=6"),
    forced("s0", "state=inactive,keyslot=6"),
    step("s0", "state=inactive,keyslot=1,old-secret=s2"),
    step("s0", "state=inactive,old-secret=s7"),
    step("s0", "state=inactive,old-secret=s9"),
    step("s0", "state=inactive,old-secret=s2"),
    step("s0", "state=inactive,keyslot=1,old-secret=s1"),
    step("s0", "state=active,new-secret=s4,iter-time=10"),
    step("s0", "state=active,new-secret=s4,iter-time=10"),
    step("s0", "state=active,new-secret=s4,iter-time=10"),
    step("s0", "state=active,new-secret=s5,iter-time=10"),
    step("s0", "state=active,new-secret=s6,iter-time=10"),
    step("s0", "state=active,new-secret=s6,iter-time=10"),
    step("s0", "state=active,new-secret=s7,iter-time=10"),
    step("s4", "state=inactive,old-secret=s4"),
    step("s0", "state=inactive,old-secret=s6"),
    step("s0", "state=inactive,old-secret=s0"),
    step("s5", "state=inactive,old-secret=s3"),
    step("s5", "state=inactive,old-secret=s5"),
    step("s5", "state=inactive,keyslot=4"),
    step("s5", "state=active,new-secret=s7,iter-time=0"),
    step("s7", "state=inactive,old-secret=s5"),
    step("s1", "state=active,new-secret=s2,iter-time=10"),
    step("s7", "state=active,new-secret=s1,iter-time=10"),
];

/// Secrets whose slots the sequence leaves active, and ones it erased.
const LEFT: &[&str] = &["s1", "s7"];
const ERASED: &[&str] = &["s0", "s2", "s3", "s4", "s5", "s6"];

/// Reads the first 64 KiB with `tool`'s qemu-io equivalent: qemu-io itself for qemu, `convert`
/// to raw for vdisk. Returns whether the image opened, and checks the pattern when it did.
fn opens(tool: &str, fmt: &str, img: &Path, key: &str, scratch: &Path) -> bool {
    let io = opened(fmt, img, key);
    if tool == "qemu" {
        let r = keyed(qemu_io, &["--image-opts", &io, "-c", "read -P 0x5a 0 64k"]);
        if r.code != 0 || r.stdout.contains("can't open") || r.stderr.contains("can't open") {
            return false;
        }
        assert!(!r.stdout.contains("Pattern verification failed"), "{fmt} {key}: {}", r.stdout);
        return true;
    }
    let out = scratch.join("plain.raw");
    let r = keyed(vdisk, &["convert", "--image-opts", &io, "-O", "raw", s(&out)]);
    if r.code != 0 {
        assert!(r.stderr.contains("Invalid password, cannot unlock any keyslot"), "{fmt} {key}: {}", r.stderr);
        return false;
    }
    let plain = std::fs::read(&out).unwrap();
    assert!(plain[..65536].iter().all(|&b| b == 0x5a), "{fmt} {key}: wrong plaintext");
    true
}

fn run_sequence(fmt: &str) {
    let d = tempdir();
    let prefix = if fmt == "qcow2" { "encrypt." } else { "" };
    let base = d.path().join("base");
    let mut create = vec!["create", "-q", "-f", fmt];
    let create_opts = if fmt == "qcow2" {
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
    } else {
        "key-secret=s0,iter-time=10"
    };
    create.extend(["-o", create_opts, s(&base), "4M"]);
    keyed(qemu_img, &create).ok();
    let io = opened(fmt, &base, "s0");
    keyed(qemu_io, &["--image-opts", &io, "-c", "write -P 0x5a 0 64k"]).ok();
    let (q, v) = (d.path().join("a.q"), d.path().join("a.v"));
    std::fs::copy(&base, &q).unwrap();
    std::fs::copy(&base, &v).unwrap();
    for st in STEPS {
        let o: String = st.opts.split(',').map(|kv| format!("{prefix}{kv}")).collect::<Vec<_>>().join(",");
        let mut results = Vec::new();
        for (tool, img, name) in [(qemu_img as fn(&[&str]) -> Run, &q, "a.q"), (vdisk, &v, "a.v")] {
            let io = opened(fmt, img, st.key);
            let mut args = vec!["amend", "--image-opts", &io, "-o", &o];
            if st.force {
                args.push("--force");
            }
            let r = keyed(tool, &args);
            results.push((r.code, r.stdout, r.stderr.replace(name, "IMG").replace(s(img), "IMG")));
        }
        assert_eq!(results[0], results[1], "{fmt}: amend -o {o} (force: {})", st.force);
        assert_eq!(active_slots(&q), active_slots(&v), "{fmt}: slots after amend -o {o}");
    }
    assert_eq!(active_slots(&v).iter().filter(|&&a| a).count(), 2, "{fmt}: the sequence leaves two slots");
    for (img, other) in [(&q, "vdisk"), (&v, "qemu")] {
        for key in LEFT {
            assert!(opens(other, fmt, img, key, d.path()), "{fmt}: {key} must open {} in {other}", s(img));
        }
        for key in ERASED {
            assert!(!opens(other, fmt, img, key, d.path()), "{fmt}: {key} must not open {} in {other}", s(img));
        }
    }
    // The qcow2 metadata around the LUKS area stays intact.
    if fmt == "qcow2" {
        keyed(qemu_img, &["check", "--image-opts", &opened(fmt, &v, "s1")]).ok();
    }
}

#[test]
fn luks_volume_keyslots_follow_qemu_img() {
    run_sequence("luks");
}

#[test]
fn qcow2_luks_keyslots_follow_qemu_img() {
    run_sequence("qcow2");
}

/// `cryptsetup` sees the slots vdisk adds and erases, and opens them.
#[test]
fn cryptsetup_sees_vdisk_keyslot_changes() {
    let d = tempdir();
    let img = d.path().join("c.luks");
    keyed(vdisk, &["create", "-q", "-f", "luks", "-o", "key-secret=s0,iter-time=10", s(&img), "1M"]).ok();
    let io = opened("luks", &img, "s0");
    for o in ["state=active,new-secret=s3,keyslot=3,iter-time=10", "state=inactive,keyslot=0,old-secret=s0"] {
        let io = if o.contains("inactive") { opened("luks", &img, "s3") } else { io.clone() };
        keyed(vdisk, &["amend", "--image-opts", &io, "-o", o]).ok();
    }
    let dump = std::process::Command::new("cryptsetup").args(["luksDump", s(&img)]).output().expect("cryptsetup");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("Key Slot 0: DISABLED") && text.contains("Key Slot 3: ENABLED"), "{text}");
    for (pass, ok) in [("passphrase-3", true), ("passphrase-0", false)] {
        let mut c = std::process::Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file=-", s(&img)])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(pass.as_bytes()).unwrap();
        assert_eq!(c.wait().unwrap().success(), ok, "{pass}");
    }
}
