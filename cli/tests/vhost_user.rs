//! End to end: a Linux guest under QEMU (TCG) boots with its disk served by `vdisk serve
//! --vhost-user` (qcow2, vmdk and vhd images, one and two queues, read-only), or by `vdisk serve
//! --nbd` with QEMU as the NBD client, reads known content and writes a pattern with O_DIRECT and
//! fsync; the host then checks the image with qemu-img.
//! The guest (`tests/e2e/init`, built by `tests/e2e/guest-assets.sh`) reports on the serial console.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vdisk_tests::{pseudo_random, qemu_img, qemu_tool, s, tempdir};

const SIZE: usize = 32 << 20;

/// The kernel and initramfs (built once and cached by the script).
fn guest() -> (PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/guest-assets.sh");
    let out = Command::new(&script).output().expect("run guest-assets.sh");
    assert!(out.status.success(), "guest-assets.sh: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (PathBuf::from(lines.next().unwrap()), PathBuf::from(lines.next().unwrap()))
}

fn md5(bytes: &[u8]) -> String {
    let d = tempdir();
    let f = d.path().join("x");
    std::fs::write(&f, bytes).unwrap();
    let out = Command::new("md5sum").arg(&f).output().expect("md5sum");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// Boots the guest with `disk` (QEMU options); the guest's `VDISK-E2E` lines, and the console.
fn run_guest(disk: &[&str]) -> (HashMap<String, String>, String) {
    let (kernel, initrd) = guest();
    let out = Command::new("timeout")
        .args(["120", s(&qemu_tool("qemu-system-x86_64"))])
        .args(["-accel", "tcg", "-smp", "2", "-m", "256", "-nographic", "-no-reboot", "-nic", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-kernel", s(&kernel), "-initrd", s(&initrd)])
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(disk)
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: HashMap<String, String> = console
        .lines()
        .filter_map(|l| l.split_once("VDISK-E2E ").map(|(_, rest)| rest))
        .filter_map(|l| l.trim().split_once(' ').map(|(k, v)| (k.to_string(), v.trim().to_string())))
        .collect();
    assert!(
        console.contains("VDISK-E2E done"),
        "the guest did not finish:\n{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (lines, console)
}

/// Serves `image` with vdisk and boots the guest against it; the guest's `VDISK-E2E` lines.
fn boot(image: &Path, fmt: &str, queues: u16, read_only: bool) -> HashMap<String, String> {
    let dir = image.parent().unwrap();
    let sock = dir.join(format!("vhost-{fmt}-{queues}-{read_only}.sock"));
    let q = queues.to_string();
    let mut args = vec!["serve", "--vhost-user", s(&sock), "--num-queues", &q, "-f", fmt];
    if read_only {
        args.push("-r");
    }
    args.push(s(image));
    let mut server = Command::new(env!("CARGO_BIN_EXE_vdisk")).args(&args).spawn().expect("vdisk serve");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no vhost-user socket");
        assert!(server.try_wait().unwrap().is_none(), "vdisk serve exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let device = format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}");
    let chardev = format!("socket,id=c0,path={}", s(&sock));
    let (lines, console) = run_guest(&[
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-machine",
        "memory-backend=mem",
        "-chardev",
        &chardev,
        "-device",
        &device,
    ]);
    // The frontend disconnected: the server closes the image and exits 0.
    let status = server.wait().unwrap();
    assert!(status.success(), "vdisk serve: {status}; console:\n{console}");
    lines
}

/// An image of `fmt` with pseudo-random data in its first 4 MiB; its raw content.
fn image(dir: &Path, fmt: &str) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{fmt}.src.raw"));
    let mut bytes = vec![0u8; SIZE];
    bytes[..4 << 20].copy_from_slice(&pseudo_random(4 << 20, 17));
    std::fs::write(&raw, &bytes).unwrap();
    let img = dir.join(format!("disk.{fmt}"));
    qemu_img(&["convert", "-q", "-f", "raw", "-O", fmt, s(&raw), s(&img)]).ok();
    let info = qemu_img(&["info", "--output=json", s(&img)]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    bytes.resize(v["virtual-size"].as_u64().unwrap() as usize, 0);
    (img, bytes)
}

/// What the guest writes at 8 MiB: "VDISKE2E\n" repeated, 1 MiB.
fn pattern() -> Vec<u8> {
    b"VDISKE2E\n".iter().copied().cycle().take(1 << 20).collect()
}

fn check_guest_wrote(img: &Path, fmt: &str, mut content: Vec<u8>, lines: &HashMap<String, String>) {
    assert_eq!(lines.get("write").map(String::as_str), Some("ok"), "{lines:?}");
    assert_eq!(lines["back-md5"], lines["pattern-md5"], "the guest reads back what it wrote");
    assert_eq!(lines["pattern-md5"], md5(&pattern()));
    content[8 << 20..9 << 20].copy_from_slice(&pattern());
    let expect = img.with_extension("expect.raw");
    std::fs::write(&expect, &content).unwrap();
    let c = qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&expect), s(img)]);
    assert_eq!(c.code, 0, "{fmt}: the image holds the guest's write: {}{}", c.stdout, c.stderr);
    if fmt != "vpc" {
        qemu_img(&["check", "-f", fmt, s(img)]).ok();
    }
}

#[test]
fn a_guest_boots_reads_and_writes_qcow2_vmdk_and_vhd_disks() {
    let d = tempdir();
    for fmt in ["qcow2", "vmdk", "vpc"] {
        let (img, content) = image(d.path(), fmt);
        let lines = boot(&img, fmt, 1, false);
        assert_eq!(lines["sectors"], (content.len() / 512).to_string(), "{fmt}: capacity");
        assert_eq!(lines["read-only"], "0");
        assert_eq!(lines["head-md5"], md5(&content[..4 << 20]), "{fmt}: the guest reads the image's content");
        check_guest_wrote(&img, fmt, content, &lines);
    }
}

#[test]
fn two_queues_and_read_only_devices() {
    let d = tempdir();
    let (img, content) = image(d.path(), "qcow2");
    let lines = boot(&img, "qcow2", 2, false);
    assert_eq!(lines["queues"], "2", "the guest sees two queues");
    check_guest_wrote(&img, "qcow2", content.clone(), &lines);

    let (img, content) = image(&d.path().join(""), "vmdk");
    let before = std::fs::read(&img).unwrap();
    let lines = boot(&img, "vmdk", 1, true);
    assert_eq!(lines["read-only"], "1", "{lines:?}");
    assert_eq!(lines["head-md5"], md5(&content[..4 << 20]));
    assert!(std::fs::read(&img).unwrap() == before, "a read-only device leaves the image as it was");
}

/// QEMU as the NBD client of `vdisk serve --nbd`: the guest's disk is the export; while it is
/// served, the image is locked against other writers as qemu-nbd locks it.
#[test]
fn a_guest_boots_on_an_nbd_export() {
    let d = tempdir();
    let (img, content) = image(d.path(), "qcow2");
    let sock = d.path().join("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--nbd", "-t", "-k", s(&sock), "-x", "disk", "-f", "qcow2", s(&img)])
        .spawn()
        .expect("vdisk serve");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no NBD socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let locked = qemu_img(&["info", s(&img)]);
    assert_ne!(locked.code, 0, "the served image is locked");
    assert!(locked.stderr.contains("lock"), "{}", locked.stderr);
    qemu_img(&["info", "-U", s(&img)]).ok();
    let drive = format!("file=nbd+unix:///disk?socket={},format=raw,if=virtio,cache=none,aio=threads", s(&sock));
    let (lines, _) = run_guest(&["-drive", &drive]);
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());
    assert_eq!(lines["sectors"], (content.len() / 512).to_string());
    assert_eq!(lines["head-md5"], md5(&content[..4 << 20]));
    check_guest_wrote(&img, "qcow2", content, &lines);
}
