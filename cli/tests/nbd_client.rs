//! vdisk as an NBD client: `nbd://`, `nbd+unix://` and `nbd:` image names wherever a file name
//! goes, against qemu-nbd and `vdisk serve --nbd` on loopback. qemu-img on the same URL is the
//! reference for `info` and `map`; content is checked against the local file. Bad servers (a fake
//! one in this file) give errors, never a hang or a panic.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vdisk_tests::servers::{start, Served};
use vdisk_tests::{qemu_img, qemu_io, qemu_tool, run_in, s, tempdir, write_into_overlay, Run};

fn vdisk(args: &[&str]) -> Run {
    run_in(None, Path::new(env!("CARGO_BIN_EXE_vdisk")), args)
}

/// A 16 MiB qcow2 with data, a zero cluster run and holes; returns it and its content as raw.
fn image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 3M",
        "-c",
        "write -z 5M 1M",
        "-c",
        "write -P 0x22 9M 64k",
        "-c",
        "write -P 0x33 15M 1M",
        s(&img),
    ])
    .ok();
    let raw = dir.join("content.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)]).ok();
    (img, raw)
}

fn qemu_nbd(args: &[&str], socket: &Path) -> Served {
    start(&qemu_tool("qemu-nbd"), args, socket)
}

/// `vdisk serve` with `args`; tests pass `-e N` above 1, since the listening probe of `start` is a
/// connection too and the server may not have seen it close when the next client arrives.
fn vdisk_serve(args: &[&str], socket: &Path) -> Served {
    start(Path::new(env!("CARGO_BIN_EXE_vdisk")), args, socket)
}

/// The same command by both tools must print the same (exit code, stdout, stderr).
fn same_as_qemu_img(args: &[&str]) -> Run {
    let (v, q) = (vdisk(args), qemu_img(args));
    assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{args:?}");
    v
}

/// info, map, compare and convert of `uri` (an export of `raw`'s content) like qemu-img.
fn reads_like_qemu_img(uri: &str, raw: &Path, out_dir: &Path) {
    same_as_qemu_img(&["info", uri]);
    same_as_qemu_img(&["info", "--output=json", uri]);
    let map = same_as_qemu_img(&["map", "--output=json", uri]);
    assert!(map.stdout.contains("\"data\": false"), "holes and zeros are reported as such: {}", map.stdout);
    same_as_qemu_img(&["map", uri]);
    vdisk(&["compare", "-f", "raw", "-F", "raw", uri, s(raw)]).ok();
    let out = out_dir.join("out.raw");
    vdisk(&["convert", "-f", "raw", "-O", "raw", uri, s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(raw).unwrap(), "{uri}: converted content");
    let q = out_dir.join("out.qcow2");
    vdisk(&["convert", "-f", "raw", "-O", "qcow2", uri, s(&q)]).ok();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&q), s(raw)]).ok();
    // Holes stay holes: 4 MiB of the 16 are data, so the qcow2 holds well under 16 MiB.
    let len = std::fs::metadata(&q).unwrap().len();
    assert!(len < 8 << 20, "{uri}: convert kept the holes ({len} bytes)");
}

#[test]
fn nbd_exports_of_qemu_nbd_and_vdisk_serve_read_like_qemu_img() {
    let d = tempdir();
    let (img, raw) = image(d.path());
    let qsock = d.path().join("q.sock");
    let q = qemu_nbd(&["-f", "qcow2", "-r", "-t", "-e", "8", "-x", "disk", "-k", s(&qsock), s(&img)], &qsock);
    reads_like_qemu_img(&q.uri(), &raw, d.path());
    // The older spelling, a json: name and --image-opts name the same export.
    let legacy = format!("nbd:unix:{}:exportname=disk", qsock.display());
    vdisk(&["compare", "-f", "raw", "-F", "raw", &legacy, s(&raw)]).ok();
    let sock = qsock.display();
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}},"export":"disk"}}}}"#
    );
    same_as_qemu_img(&["map", "--output=json", &json]);
    vdisk(&["compare", "-F", "raw", &json, s(&raw)]).ok();
    let opts = format!("driver=raw,file.driver=nbd,file.path={sock},file.export=disk");
    same_as_qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let out = d.path().join("opts.raw");
    vdisk(&["convert", "--image-opts", &opts, "-O", "raw", s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap(), "--image-opts export content");
    drop(q);

    let vsock = d.path().join("v.sock");
    let v = vdisk_serve(
        &["serve", "--nbd", "-t", "-e", "8", "-r", "-f", "qcow2", "-x", "disk", "-k", s(&vsock), s(&img)],
        &vsock,
    );
    reads_like_qemu_img(&v.uri(), &raw, d.path());
}

/// A free TCP port on loopback (a race with other processes is possible but harmless here).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn format_drivers_run_on_an_export_over_tcp() {
    let d = tempdir();
    let (img, raw) = image(d.path());
    // qemu-nbd exports the qcow2 file's bytes (-f raw): vdisk probes and opens qcow2 on top.
    let port = free_port();
    let mut child = Command::new(qemu_tool("qemu-nbd"))
        .args(["-f", "raw", "-r", "-t", "-e", "8", "-b", "127.0.0.1", "-p", &port.to_string(), "-x", "disk", s(&img)])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let info = same_as_qemu_img(&["info", &uri]);
    assert!(info.stdout.contains("file format: qcow2"), "{}", info.stdout);
    same_as_qemu_img(&["map", "--output=json", &uri]);
    vdisk(&["compare", "-F", "raw", &uri, s(&raw)]).ok();
    let out = d.path().join("tcp.raw");
    vdisk(&["convert", "-O", "raw", &uri, s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn an_overlay_over_an_nbd_base_reads_through_and_commits_back() {
    let d = tempdir();
    let (_, raw) = image(d.path());
    let base = d.path().join("base.raw");
    std::fs::copy(&raw, &base).unwrap();
    let sock = d.path().join("b.sock");
    let server =
        vdisk_serve(&["serve", "--nbd", "-t", "-e", "4", "-f", "raw", "-x", "disk", "-k", s(&sock), s(&base)], &sock);
    let overlay = d.path().join("overlay.qcow2");
    vdisk(&["create", "-q", "-f", "qcow2", "-b", &server.uri(), "-F", "raw", s(&overlay)]).ok();
    let info = vdisk(&["info", s(&overlay)]).ok();
    assert!(info.stdout.contains(&format!("backing file: {}", server.uri())), "{}", info.stdout);
    // Before any write the overlay reads the remote base.
    vdisk(&["compare", "-f", "qcow2", "-F", "raw", s(&overlay), s(&raw)]).ok();
    let want = write_into_overlay(&overlay, &raw);
    let out = d.path().join("overlay.raw");
    vdisk(&["convert", "-O", "raw", s(&overlay), s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == want, "overlay over the NBD base");
    // commit writes the overlay's clusters into the base through the export.
    vdisk(&["commit", "-q", s(&overlay)]).ok();
    drop(server);
    assert!(std::fs::read(&base).unwrap() == want, "base after commit over NBD");
}

#[test]
fn convert_writes_into_an_export_that_fits_and_refuses_one_too_small() {
    let d = tempdir();
    let (_, raw) = image(d.path());
    let target = d.path().join("target.raw");
    std::fs::write(&target, vec![0xaau8; 16 << 20]).unwrap();
    let sock = d.path().join("t.sock");
    let server =
        vdisk_serve(&["serve", "--nbd", "-t", "-e", "4", "-f", "raw", "-x", "disk", "-k", s(&sock), s(&target)], &sock);
    // As qemu-img does, "creating" the target opens the existing export; zeros are written too.
    vdisk(&["convert", "-f", "raw", "-O", "raw", s(&raw), &server.uri()]).ok();
    let (v, q) =
        (vdisk(&["create", "-f", "raw", &server.uri(), "1G"]), qemu_img(&["create", "-f", "raw", &server.uri(), "1G"]));
    assert_eq!((v.code, q.code), (1, 1), "{v:?}");
    assert!(v.stderr.contains("Cannot grow NBD nodes"), "{}", v.stderr);
    drop(server);
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&raw).unwrap(), "converted into the export");
}

#[test]
fn a_server_at_its_connection_limit_is_used_through_the_connection_it_took() {
    let d = tempdir();
    let (img, raw) = image(d.path());
    let sock = d.path().join("l.sock");
    // Two clients at most, CAN_MULTI_CONN advertised; another client holds one of the two.
    let q = qemu_nbd(&["-f", "qcow2", "-r", "-t", "-e", "2", "-x", "disk", "-k", s(&sock), s(&img)], &sock);
    let _other = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let out = d.path().join("l.raw");
    vdisk(&["convert", "-f", "raw", "-O", "raw", &q.uri(), s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
}

/// What a fake server does once the client is in transmission.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Greets with garbage.
    BadGreeting,
    /// Closes the connection at the first request.
    Disconnect,
    /// Answers a read with a data chunk outside the request.
    ChunkOutside,
    /// Answers a read with a simple reply that claims another cookie.
    WrongCookie,
}

fn be_u32(r: &mut impl Read) -> u32 {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) {
    let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    w.write_all(&v).unwrap();
}

/// Serves one connection on `listener` the `how` way (structured replies, a 1 MiB read-only export).
fn fake_server(listener: UnixListener, how: Misbehaviour) {
    let Ok((mut c, _)) = listener.accept() else { return };
    if let Misbehaviour::BadGreeting = how {
        let _ = c.write_all(b"HELLO, I AM NOT NBD AT ALL");
        return;
    }
    let mut greeting = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    greeting.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    c.write_all(&greeting).unwrap();
    be_u32(&mut c); // client flags
    loop {
        let mut head = [0u8; 16];
        if c.read_exact(&mut head).is_err() {
            return;
        }
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data).unwrap();
        match opt {
            7 => {
                // GO: 1 MiB, HAS_FLAGS | READ_ONLY.
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&3u16.to_be_bytes());
                option_reply(&mut c, 7, 3, &info);
                option_reply(&mut c, 7, 1, &[]);
                break;
            }
            _ => option_reply(&mut c, opt, 1, &[]),
        }
    }
    let mut req = [0u8; 28];
    if c.read_exact(&mut req).is_err() {
        return;
    }
    let cookie = &req[8..16];
    let mut reply = Vec::new();
    match how {
        Misbehaviour::Disconnect | Misbehaviour::BadGreeting => return,
        Misbehaviour::ChunkOutside => {
            reply.extend_from_slice(&0x668e_33efu32.to_be_bytes());
            reply.extend_from_slice(&1u16.to_be_bytes()); // DONE
            reply.extend_from_slice(&1u16.to_be_bytes()); // OFFSET_DATA
            reply.extend_from_slice(cookie);
            reply.extend_from_slice(&(8u32 + 512).to_be_bytes());
            reply.extend_from_slice(&(1u64 << 40).to_be_bytes());
            reply.extend_from_slice(&[0xee; 512]);
        }
        Misbehaviour::WrongCookie => {
            reply.extend_from_slice(&0x6744_6698u32.to_be_bytes());
            reply.extend_from_slice(&0u32.to_be_bytes());
            reply.extend_from_slice(&0xdead_beefu64.to_be_bytes());
        }
    }
    let _ = c.write_all(&reply);
    // Keep the connection open a little: the client must not wait for more.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn bad_servers_and_names_give_errors_not_hangs() {
    let d = tempdir();
    for how in
        [Misbehaviour::BadGreeting, Misbehaviour::Disconnect, Misbehaviour::ChunkOutside, Misbehaviour::WrongCookie]
    {
        let sock = d.path().join(format!("{how:?}.sock"));
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || fake_server(listener, how));
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        let t = Instant::now();
        let r = vdisk(&["convert", "-O", "raw", &uri, s(&d.path().join("x.raw"))]);
        assert_eq!(r.code, 1, "{how:?}: {r:?}");
        assert!(r.stderr.starts_with("vdisk: Could not open"), "{how:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{how:?}: {}", r.stderr);
        assert!(t.elapsed() < Duration::from_secs(10), "{how:?}: took {:?}", t.elapsed());
        server.join().unwrap();
    }
    // No server, an unknown export, a malformed name: the same exit code as qemu-img.
    let (img, _) = image(d.path());
    let sock = d.path().join("q.sock");
    let q = qemu_nbd(&["-f", "qcow2", "-r", "-t", "-x", "disk", "-k", s(&sock), s(&img)], &sock);
    let missing = format!("nbd+unix:///disk?socket={}", d.path().join("none.sock").display());
    let unknown = format!("nbd+unix:///nosuch?socket={}", sock.display());
    for uri in [missing.as_str(), unknown.as_str(), "nbd://127.0.0.1:notaport/x"] {
        let (v, q) = (vdisk(&["info", uri]), qemu_img(&["info", uri]));
        assert_eq!((v.code, q.code), (1, 1), "{uri}: {v:?}");
        assert!(v.stderr.starts_with(&format!("vdisk: Could not open '{uri}': ")), "{uri}: {}", v.stderr);
    }
    drop(q);
}
