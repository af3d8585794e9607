//! vdisk reading images from web servers: `http://` and `https://` names wherever a file name
//! goes, against nginx on loopback (tests/src/nginx.rs: HTTP, HTTPS with a certificate made for
//! the test, a redirect, a location without range support). qemu-img's curl driver on the same
//! URL is the reference for `info` and `map`; content is checked against the local file. Bad
//! servers (a fake one in this file) give errors within the timeout, never a hang or a panic.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdisk_tests::nginx::Nginx;
use vdisk_tests::{output, qemu_img, qemu_io, run_in, s, tempdir, vdisk_as_qemu_img, write_into_overlay, Run, TempDir};

fn vdisk_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vdisk"))
}

fn vdisk(args: &[&str]) -> Run {
    run_in(None, vdisk_bin(), args)
}

/// vdisk trusting `ca` through `SSL_CERT_FILE`, as a user with a private CA would run it.
fn vdisk_trusting(ca: &Path, args: &[&str]) -> Run {
    let mut c = Command::new(vdisk_bin());
    c.args(args).env("LC_ALL", "C").env("SSL_CERT_FILE", ca);
    output(&mut c).expect("run vdisk").into()
}

/// The same command by both tools must print the same (exit code, stdout, stderr).
fn same_as_qemu_img(args: &[&str]) -> Run {
    let (v, q) = (vdisk_as_qemu_img(vdisk_bin(), args), qemu_img(args));
    assert_eq!((v.code, &v.stdout, &v.stderr), (q.code, &q.stdout, &q.stderr), "{args:?}");
    v
}

/// A 16 MiB qcow2 in `dir` with data, a zero run and holes; returns it and its content as raw
/// (also in `dir`, so the server has both).
fn image(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    let writes = ["write -P 0x11 0 3M", "write -z 5M 1M", "write -P 0x22 9M 64k", "write -P 0x33 15M 1M"];
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.push(s(&img));
    qemu_io(&args).ok();
    let raw = dir.join("content.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)]).ok();
    (img, raw)
}

/// nginx serving a fresh directory holding [`image`]'s files.
fn served() -> (TempDir, Nginx, PathBuf) {
    let d = tempdir();
    let www = d.path().join("www");
    let work = d.path().join("nginx");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let (_, raw) = image(&www);
    let n = Nginx::start(&www, &work);
    (d, n, raw)
}

/// compare and convert (to raw and to qcow2) of `name` give `raw`'s content.
fn content_is(run: &dyn Fn(&[&str]) -> Run, name: &str, raw: &Path, out_dir: &Path) {
    run(&["compare", "-F", "raw", name, s(raw)]).ok();
    let out = out_dir.join("out.raw");
    run(&["convert", "-O", "raw", name, s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(raw).unwrap(), "{name}: converted content");
    let q = out_dir.join("out.qcow2");
    run(&["convert", "-O", "qcow2", name, s(&q)]).ok();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&q), s(raw)]).ok();
    // The qcow2's holes stay holes: 5 MiB of the 16 are allocated.
    let len = std::fs::metadata(&q).unwrap().len();
    assert!(len < 8 << 20, "{name}: convert kept the holes ({len} bytes)");
}

#[test]
fn http_and_https_images_read_like_qemu_img() {
    let (d, n, raw) = served();
    let url = n.http("img.qcow2");
    for args in [
        vec!["info", &url],
        vec!["info", "--output=json", &url],
        vec!["info", "--output=json", "-f", "raw", &url],
        vec!["map", "--output=json", &url],
        vec!["map", &url],
        vec!["check", &url],
    ] {
        same_as_qemu_img(&args);
    }
    let map = vdisk(&["map", "--output=json", &url]).ok();
    assert!(map.stdout.contains("\"data\": false"), "the qcow2's holes show through HTTP: {}", map.stdout);
    // A redirect is followed; the name stays the one given.
    let old = n.http("old/img.qcow2");
    same_as_qemu_img(&["info", &old]);
    content_is(&|a| vdisk(a), &url, &raw, d.path());
    content_is(&|a| vdisk(a), &old, &raw, d.path());

    // HTTPS: qemu-img cannot be told of the test's CA, so its HTTP output is the reference, with
    // the URL and protocol changed.
    let secure = n.https("img.qcow2");
    let want = qemu_img(&["info", &url]).ok().stdout.replace(&url, &secure).replace("type: http", "type: https");
    assert_eq!(vdisk_trusting(&n.ca, &["info", &secure]).ok().stdout, want);
    content_is(&|a| vdisk_trusting(&n.ca, a), &secure, &raw, d.path());
    // The CA as a node option instead (json: names and --image-opts), with other curl options.
    let ca = n.ca.display();
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"https","url":"{secure}","ca-file":"{ca}","readahead":"64k","timeout":10}}}}"#
    );
    content_is(&|a| vdisk(a), &json, &raw, d.path());
    let opts = format!("driver=qcow2,file.driver=https,file.url={secure},file.ca-file={ca},file.readahead=1M");
    vdisk(&["compare", "--image-opts", &opts, s(&raw)]).ok();
    // sslverify=off skips verification, as in qemu.
    let unverified = format!("driver=qcow2,file.driver=https,file.url={secure},file.sslverify=off");
    vdisk(&["compare", "--image-opts", &unverified, s(&raw)]).ok();
}

#[test]
fn a_local_overlay_over_a_remote_base_reads_through() {
    let (d, n, raw) = served();
    let base = n.http("img.qcow2");
    let overlay = d.path().join("overlay.qcow2");
    vdisk(&["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", s(&overlay)]).ok();
    same_as_qemu_img(&["info", "--backing-chain", s(&overlay)]);
    vdisk(&["compare", "-F", "raw", s(&overlay), s(&raw)]).ok();
    // Writes land in the overlay; reads elsewhere still come from the server.
    let want = write_into_overlay(&overlay, &raw);
    let out = d.path().join("overlay.raw");
    vdisk(&["convert", "-O", "raw", s(&overlay), s(&out)]).ok();
    assert!(std::fs::read(&out).unwrap() == want, "overlay over the HTTP base");
    qemu_img(&["check", s(&overlay)]).ok();
    // The base cannot be written: commit fails cleanly and leaves the overlay as it was.
    let commit = vdisk(&["commit", s(&overlay)]);
    assert_eq!(commit.code, 1, "{commit:?}");
    assert!(!commit.stderr.contains("panicked"), "{}", commit.stderr);
    vdisk(&["compare", "-F", "raw", s(&overlay), s(&out)]).ok();

    // An HTTPS base: vdisk trusts the test's CA through SSL_CERT_FILE; qemu-io writes the overlay
    // (told to skip verification: it cannot be given the CA), vdisk reads it back.
    let secure = n.https("img.qcow2");
    let top = d.path().join("top.qcow2");
    vdisk_trusting(&n.ca, &["create", "-q", "-f", "qcow2", "-b", &secure, "-F", "qcow2", s(&top)]).ok();
    vdisk_trusting(&n.ca, &["compare", "-F", "raw", s(&top), s(&raw)]).ok();
    let opts = format!(
        "driver=qcow2,file.filename={},backing.driver=qcow2,backing.file.driver=https,backing.file.url={secure},backing.file.sslverify=off",
        top.display()
    );
    qemu_io(&["--image-opts", "-c", "write -P 0x44 1M 128k", "-c", "write -P 0x55 7M 64k", &opts]).ok();
    vdisk_trusting(&n.ca, &["compare", "-F", "raw", s(&top), s(&out)]).ok();
    // A json: backing name carrying the CA as a node option (vdisk's own; qemu refuses it).
    let ca = n.ca.display();
    let json = format!(r#"json:{{"driver":"qcow2","file":{{"driver":"https","url":"{secure}","ca-file":"{ca}"}}}}"#);
    let json_top = d.path().join("json-top.qcow2");
    vdisk(&["create", "-q", "-f", "qcow2", "-b", &json, "-F", "qcow2", s(&json_top)]).ok();
    vdisk(&["compare", "-F", "raw", s(&json_top), s(&raw)]).ok();
    // Converting the overlay with its remote backing makes a self-contained local copy.
    let copy = d.path().join("copy.qcow2");
    vdisk_trusting(&n.ca, &["convert", "-O", "qcow2", s(&top), s(&copy)]).ok();
    drop(n);
    qemu_img(&["compare", "-F", "raw", s(&copy), s(&out)]).ok();
}

/// How the fake server of [`bad_servers_give_errors_within_the_timeout`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Misbehaviour {
    /// Never answers the HEAD request.
    SilentHead,
    /// Sends half the bytes of a range, then closes.
    Truncated,
    /// Sends a range's headers, then nothing.
    Stalls,
    /// Sends a range's bytes one every 100 ms (each read finishes within the timeout).
    Trickles,
    /// Answers a range request with the whole file (200).
    IgnoresRange,
    /// Answers with a different range than asked.
    WrongRange,
}

const FAKE_LEN: u64 = 1 << 20;

/// Reads one request head; `None` at the end of the connection.
fn request(r: &mut BufReader<TcpStream>) -> Option<(String, Option<(u64, u64)>)> {
    let mut method = None;
    let mut range = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Some((method?, range));
        }
        if method.is_none() {
            method = line.split(' ').next().map(str::to_string);
        } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.split_once('-')?;
            range = Some((a.parse().ok()?, b.parse().ok()?));
        }
    }
}

fn fake_connection(conn: TcpStream, how: Misbehaviour) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    while let Some((method, range)) = request(&mut r) {
        if method == "HEAD" {
            if how == Misbehaviour::SilentHead {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {FAKE_LEN}\r\nAccept-Ranges: bytes\r\n\r\n");
            let _ = w.write_all(head.as_bytes());
            continue;
        }
        let (a, b) = range.unwrap_or((0, FAKE_LEN - 1));
        let n = b - a + 1;
        let head = match how {
            Misbehaviour::IgnoresRange => format!("HTTP/1.1 200 OK\r\nContent-Length: {FAKE_LEN}\r\n\r\n"),
            Misbehaviour::WrongRange => format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: bytes {}-{}/{FAKE_LEN}\r\n\r\n",
                a + 1,
                b + 1
            ),
            _ => format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: bytes {a}-{b}/{FAKE_LEN}\r\n\r\n"
            ),
        };
        let _ = w.write_all(head.as_bytes());
        match how {
            Misbehaviour::Truncated => {
                let _ = w.write_all(&vec![0x5a; (n / 2) as usize]);
                return;
            }
            Misbehaviour::Stalls => {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            Misbehaviour::Trickles => {
                for _ in 0..n {
                    if w.write_all(&[0x5a]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Misbehaviour::IgnoresRange => {
                let _ = w.write_all(&vec![0x5a; FAKE_LEN as usize]);
            }
            _ => {
                let _ = w.write_all(&vec![0x5a; n as usize]);
            }
        }
    }
}

/// Serves connections on `listener` (each on its own thread) until `stop`.
fn fake_server(listener: TcpListener, how: Misbehaviour, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                std::thread::spawn(move || fake_connection(conn, how));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn bad_servers_give_errors_within_the_timeout() {
    let d = tempdir();
    let cases = [
        (Misbehaviour::SilentHead, "Could not open"),
        (Misbehaviour::Truncated, "HTTP read of"),
        (Misbehaviour::Stalls, "timeout"),
        (Misbehaviour::Trickles, "timeout"),
        (Misbehaviour::IgnoresRange, "Server does not support 'range'"),
        (Misbehaviour::WrongRange, "answered with the range 'bytes 1-"),
    ];
    for (how, says) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || fake_server(listener, how, stop))
        };
        // A 1 s timeout (the default is qemu's 5 s); -f raw, so the open itself reads nothing. A
        // trickle fails within the timeout plus a second per 128 KiB of the request: the probe of
        // the format reads one 4 KiB chunk.
        let name = match how {
            Misbehaviour::Trickles => format!(
                r#"json:{{"file":{{"driver":"http","url":"http://127.0.0.1:{port}/disk","timeout":1,"readahead":"4k"}}}}"#
            ),
            _ => format!(
                r#"json:{{"driver":"raw","file":{{"driver":"http","url":"http://127.0.0.1:{port}/disk","timeout":1}}}}"#
            ),
        };
        let t = Instant::now();
        let r = vdisk(&["convert", "-O", "raw", &name, s(&d.path().join("x.raw"))]);
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        assert_eq!(r.code, 1, "{how:?}: {r:?}");
        assert!(r.stderr.contains(says), "{how:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{how:?}: {}", r.stderr);
        assert!(took < Duration::from_secs(10), "{how:?}: took {took:?}");
    }

    // nginx: a missing file and a location without ranges give qemu-img's very messages; an
    // untrusted certificate and a closed port fail as they do in qemu-img.
    let (_d, n, _) = served();
    same_as_qemu_img(&["info", &n.http("nosuch.qcow2")]);
    same_as_qemu_img(&["info", &n.http("norange/img.qcow2")]);
    let untrusted = vdisk(&["info", &n.https("img.qcow2")]);
    assert_eq!((untrusted.code, qemu_img(&["info", &n.https("img.qcow2")]).code), (1, 1));
    assert!(untrusted.stderr.contains("invalid peer certificate: UnknownIssuer"), "{}", untrusted.stderr);
    let closed = format!(
        "http://127.0.0.1:{}/img.qcow2",
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let r = vdisk(&["info", &closed]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with(&format!("vdisk: Could not open '{closed}': ")), "{}", r.stderr);
    // Writing is refused up front, with qemu-img's words: an HTTP image is never opened
    // read-write, and nothing is created on a web server.
    same_as_qemu_img(&["resize", &n.http("content.raw"), "32M"]);
    same_as_qemu_img(&["create", "-q", "-f", "qcow2", &n.http("new.qcow2"), "1G"]);
}
