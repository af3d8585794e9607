//! `vdisk serve --nbd` against real NBD clients: qemu-img, qemu-io, nbdinfo and nbdcopy (libnbd),
//! with qemu-nbd serving a copy of the same image as the reference for block status; hostile
//! clients (raw bytes on the socket) get errors or a closed connection and never a write on a
//! read-only export.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vdisk_tests::servers::{start, wait_for, Served};
use vdisk_tests::{pseudo_random, qemu_img, qemu_io, qemu_tool, run_in, s, tempdir, Run};

fn vdisk_serve(socket: &Path, extra: &[&str], image: &Path) -> Served {
    let sock = s(socket).to_string();
    let mut args = vec!["serve", "--nbd", "-t", "-k", &sock, "-x", "disk"];
    args.extend_from_slice(extra);
    args.push(s(image));
    // The probe connection of `start` is a client too: -t keeps the server up after it.
    start(Path::new(env!("CARGO_BIN_EXE_vdisk")), &args, socket)
}

fn tool(name: &str, args: &[&str]) -> Run {
    run_in(None, &qemu_tool(name), args)
}

/// A qcow2 over a qcow2 backing file, with data in both, zeros and holes: (top, its content).
fn chain(dir: &Path) -> (PathBuf, Vec<u8>) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 8M 2M", s(&base)]).ok();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]).ok();
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 1M 1M",
        "-c",
        "write -z 9M 512k",
        "-c",
        "write -P 0x44 12M 64k",
        s(&top),
    ])
    .ok();
    let raw = dir.join("content.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&top), s(&raw)]).ok();
    (top, std::fs::read(&raw).unwrap())
}

#[test]
fn real_clients_read_write_and_map_like_qemu_nbd() {
    let d = tempdir();
    let (top, content) = chain(d.path());
    // qemu-nbd serves a copy (the image is locked while served) as the reference.
    let copy_dir = d.path().join("ref");
    std::fs::create_dir(&copy_dir).unwrap();
    for f in ["base.qcow2", "top.qcow2"] {
        std::fs::copy(d.path().join(f), copy_dir.join(f)).unwrap();
    }
    let vsock = d.path().join("v.sock");
    let qsock = d.path().join("q.sock");
    let v = vdisk_serve(&vsock, &["-e", "4", "-f", "qcow2"], &top);
    let q = start(
        &qemu_tool("qemu-nbd"),
        &["-f", "qcow2", "-t", "-e", "4", "-x", "disk", "-A", "-r", "-k", s(&qsock), s(&copy_dir.join("top.qcow2"))],
        &qsock,
    );
    for map in ["--map", "--map=qemu:allocation-depth"] {
        let (a, b) = (tool("nbdinfo", &[map, &v.uri()]).ok(), tool("nbdinfo", &[map, &q.uri()]).ok());
        assert_eq!(a.stdout, b.stdout, "nbdinfo {map}: vdisk vs qemu-nbd");
    }
    let info = tool("nbdinfo", &["--json", &v.uri()]).ok().stdout;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16 << 20);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["is_read_only"], false);
    let list = tool("nbdinfo", &["--list", &v.uri()]).ok().stdout;
    assert!(list.contains("export=\"disk\""), "{list}");

    // Reads: nbdcopy (several connections) and qemu-img see the chain's content.
    let out = d.path().join("copy.raw");
    tool("nbdcopy", &[&v.uri(), s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == content, "nbdcopy");
    qemu_img(&["compare", "-f", "raw", s(&d.path().join("content.raw")), &v.uri()]).ok();
    let i = qemu_img(&["info", &v.uri()]).ok().stdout;
    assert!(i.contains("virtual size: 16 MiB (16777216 bytes)"), "{i}");

    // Writes through qemu-io: data with FUA, zeroes with and without unmap, discard. The same
    // commands on a raw copy of the content give the expected bytes.
    let expect = d.path().join("expect.raw");
    std::fs::write(&expect, &content).unwrap();
    let cmds = ["write -P 0x55 -f 3M 700k", "write -z 8M 1M", "write -z -u 0 64k", "discard 14M 1M", "flush"];
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let mut on_export = args.clone();
    let uri = v.uri();
    on_export.push(&uri);
    qemu_io(&on_export).ok();
    let mut on_raw = args.clone();
    on_raw.push(s(&expect));
    qemu_io(&on_raw).ok();
    // discard may leave either old data or zeros; make the expectation read what the export reads there.
    let mut want = std::fs::read(&expect).unwrap();
    let mut got = vec![0u8; want.len()];
    let back = d.path().join("back.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &v.uri(), s(&back)]).ok();
    got.copy_from_slice(&std::fs::read(&back).unwrap());
    let discarded = 14 << 20..15 << 20;
    assert!(
        got[discarded.clone()] == content[discarded.clone()] || got[discarded.clone()].iter().all(|&b| b == 0),
        "discarded range reads old data or zeros"
    );
    want[discarded.clone()].copy_from_slice(&got[discarded]);
    assert!(got == want, "the export reads what qemu-io wrote");
    drop(v);
    // The image itself: clean, and holding the writes.
    qemu_img(&["check", s(&top)]).ok();
    std::fs::write(&expect, &want).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&expect), s(&top)]).ok();
    drop(q);
}

#[test]
fn read_only_exports_refuse_writes_and_other_formats_serve_too() {
    let d = tempdir();
    let raw = d.path().join("src.raw");
    std::fs::write(&raw, pseudo_random(6 << 20, 3)).unwrap();
    for fmt in ["vmdk", "vpc", "vdi", "raw"] {
        let img = d.path().join(format!("img.{fmt}"));
        qemu_img(&["convert", "-q", "-f", "raw", "-O", fmt, s(&raw), s(&img)]).ok();
        let before = std::fs::read(&img).unwrap();
        let sock = d.path().join(format!("{fmt}.sock"));
        // No connection limit: at the default of one, the probe connection of `start` or
        // qemu-io's, still closing, would get nbdinfo's connection closed at once.
        let v = vdisk_serve(&sock, &["-r", "-e", "0", "-f", fmt], &img);
        let w = qemu_io(&["-f", "raw", "-c", "write -P 1 0 4k", &v.uri()]);
        assert!(w.code != 0 || w.stderr.contains("read-only") || w.stdout.contains("failed"), "{fmt}: {w:?}");
        let info = tool("nbdinfo", &["--json", &v.uri()]).ok().stdout;
        assert!(info.contains("\"is_read_only\": true"), "{fmt}: {info}");
        let out = d.path().join(format!("{fmt}.out"));
        tool("nbdcopy", &[&v.uri(), s(&out)]).ok();
        let mut want = std::fs::read(&raw).unwrap();
        let got = std::fs::read(&out).unwrap();
        want.resize(got.len(), 0);
        assert!(got == want, "{fmt}: content over NBD");
        drop(v);
        assert!(std::fs::read(&img).unwrap() == before, "{fmt}: a read-only export never writes");
    }
}

/// Sends raw bytes; the reply bytes until the server stops sending (or closes).
fn exchange(sock: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Client flags, then EXPORT_NAME "disk" (old-style: simple replies).
fn attach() -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend(option(1, b"disk"));
    v
}

/// The simple reply errors in `reply` (after the 18-byte greeting and 10-byte export info).
fn simple_errors(reply: &[u8]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut at = 18 + 10;
    while at + 16 <= reply.len() {
        assert_eq!(reply[at..at + 4], 0x6744_6698u32.to_be_bytes(), "simple reply magic");
        let err = u32::from_be_bytes(reply[at + 4..at + 8].try_into().unwrap());
        let cookie = u64::from_be_bytes(reply[at + 8..at + 16].try_into().unwrap());
        out.push((cookie, err));
        at += 16;
    }
    out
}

#[test]
fn hostile_clients_get_errors_or_a_closed_connection() {
    let d = tempdir();
    let img = d.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 0 64k", s(&img)]).ok();
    let sock = d.path().join("h.sock");
    let v = vdisk_serve(&sock, &["-e", "0", "-r", "-f", "qcow2"], &img);
    let before = std::fs::read(&img).unwrap();

    // Out of range, oversized, unknown command, write/trim/zero on a read-only export, then a
    // read that works: each gets its own error (EINVAL 22, EPERM 1) and the stream stays in step.
    let mut bytes = attach();
    bytes.extend(request(0, 0, 1, 1 << 20, 512)); // read past the end
    bytes.extend(request(0, 0, 2, 0, 64 << 20)); // read larger than 32 MiB
    bytes.extend(request(42, 0, 3, 0, 512)); // unknown command
    bytes.extend(request(1, 0, 4, 0, 4)); // write on a read-only export
    bytes.extend_from_slice(&[9, 9, 9, 9]);
    bytes.extend(request(4, 0, 5, 0, 4096)); // trim
    bytes.extend(request(6, 0, 6, 0, 4096)); // write zeroes
    bytes.extend(request(7, 0, 7, 0, 4096)); // block status without a context
    bytes.extend(request(3, 0, 8, 0, 0)); // flush: fine
    bytes.extend(request(2, 0, 9, 0, 0)); // disconnect
    let reply = exchange(&sock, &bytes);
    let errors = simple_errors(&reply);
    assert_eq!(errors, vec![(1, 22), (2, 22), (3, 22), (4, 1), (5, 1), (6, 1), (7, 22), (8, 0)], "{reply:x?}");

    // A bad request magic, a bad option magic, an option longer than 64 KiB, unknown client
    // flags: the connection ends; the server keeps serving.
    let mut bad = attach();
    bad.extend_from_slice(&[0xde; 28]);
    exchange(&sock, &bad);
    let mut bad = 1u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&[0xab; 16]);
    exchange(&sock, &bad);
    let mut big = 1u32.to_be_bytes().to_vec();
    big.extend(option(6, &vec![0u8; 100 << 10]));
    exchange(&sock, &big);
    exchange(&sock, &0xffff_ffffu32.to_be_bytes());
    // Malformed INFO and meta context options get ERR_INVALID and negotiation goes on.
    let mut opts = 1u32.to_be_bytes().to_vec();
    opts.extend(option(6, &[0, 0, 0, 200, b'x']));
    opts.extend(option(10, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 50]));
    opts.extend(option(2, &[]));
    let r = exchange(&sock, &opts);
    let mut codes = Vec::new();
    let mut at = 18;
    while at + 20 <= r.len() {
        let be32 = |i: usize| u32::from_be_bytes(r[i..i + 4].try_into().unwrap());
        codes.push(be32(at + 12));
        at += 20 + be32(at + 16) as usize;
    }
    assert_eq!(codes, vec![(1 << 31) | 3, (1 << 31) | 3, 1], "{r:x?}");

    let q = qemu_img(&["compare", "-f", "qcow2", "-U", s(&img), &v.uri()]);
    assert_eq!(q.code, 0, "still serving after the abuse: {q:?}");
    drop(v);
    assert!(std::fs::read(&img).unwrap() == before, "nothing was written");
    qemu_img(&["check", s(&img)]).ok();
}

#[test]
fn one_shot_servers_exit_after_the_client_and_limit_connections() {
    let d = tempdir();
    let img = d.path().join("img.raw");
    std::fs::write(&img, vec![5u8; 1 << 20]).unwrap();
    let sock = d.path().join("o.sock");
    // -e 1 (the default): while one client is attached, another connection is closed at once.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--nbd", "-k", s(&sock), "-f", "raw", s(&img)])
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut first = loop {
        if let Ok(c) = UnixStream::connect(&sock) {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut greeting = [0u8; 18];
    first.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut second = UnixStream::connect(&sock).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 18];
    assert_eq!(second.read(&mut b).unwrap_or(0), 0, "the second connection is refused");
    // The first client leaves; the one-shot server exits.
    drop(first);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "server still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM ends a persistent server cleanly: exit status 0, socket removed, image closed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--nbd", "-t", "-k", s(&sock), "-f", "raw", s(&img)])
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "the socket is removed");
    // TCP works as well.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "--nbd", "-t", "-p", &port, "-b", "127.0.0.1", "-x", "disk", "-f", "raw", s(&img)])
        .spawn()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let start = Instant::now();
    let r = loop {
        let r = tool("nbdinfo", &["--size", &uri]);
        if r.code == 0 || start.elapsed() > Duration::from_secs(20) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.stdout.trim(), "1048576", "{r:?}");
}
