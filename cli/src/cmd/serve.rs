//! `serve --nbd [-k socket | -p port [-b addr]] [-x name] [-D description] [-r] [-t] [-e shared]
//! [-f fmt] [--image-opts] [--cache mode] [--object objectdef] filename`
//! `serve --vhost-user socket [--num-queues N] [--serial ID] [-r] [-f fmt] [--image-opts]
//! [--cache mode] [--object objectdef] filename`
//!
//! Exports an image over NBD with qemu-nbd's option letters and defaults: TCP port 10809 on
//! 0.0.0.0 unless a unix socket is named, export name "" (the empty name also selects the export),
//! one connection at a time (`-e 0` for no limit), exit once the last client has left unless `-t`.
//! The image is opened (and locked) once, read-only with `-r`, and shared by every connection.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use blockdev::{BlockDriver, CacheMode, OpenOptions};
use nbd::server::{Listener, Server};
use nbd::Export;

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::registry;
use crate::common::{cache_mode, img_open, Objects, OpenRequest};
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    flag("nbd", None, Some("nbd")),
    opt("vhost-user", None, Some("vhost-user")),
    opt("num-queues", None, Some("num-queues")),
    opt("serial", None, Some("serial")),
    opt("k", Some('k'), Some("socket")),
    opt("p", Some('p'), Some("port")),
    opt("b", Some('b'), Some("bind")),
    opt("x", Some('x'), Some("export-name")),
    opt("D", Some('D'), Some("description")),
    flag("r", Some('r'), Some("read-only")),
    flag("t", Some('t'), Some("persistent")),
    opt("e", Some('e'), Some("shared")),
    opt("f", Some('f'), Some("format")),
    opt("cache", None, Some("cache")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// Runs `serve`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    if p.value("vhost-user").is_some() == p.has("nbd") {
        return Err(CliError::usage("serve needs one of --nbd and --vhost-user SOCKET"));
    }
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let shared = match p.value("e") {
        None => 1,
        Some(v) => v.parse::<usize>().map_err(|_| CliError::new(format!("Invalid shared device number '{v}'")))?,
    };
    let read_only = p.has("r");
    let opts = OpenOptions {
        read_only,
        cache: cache_mode(p.value("cache"), CacheMode::Writeback, "cache")?,
        eager_writeback: true,
        ..OpenOptions::default()
    };
    let name = &p.positional[0];
    let image = img_open(&registry(), &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts })?;
    if let Some(socket) = p.value("vhost-user") {
        return serve_vhost_user(image, socket, read_only, p.value("num-queues"), p.value("serial"));
    }
    let listener = match (p.value("k"), p.value("p")) {
        (Some(_), Some(_)) => return Err(CliError::new("--socket and --port cannot be used together")),
        (Some(path), None) => {
            let _ = std::fs::remove_file(path);
            Listener::Unix(
                UnixListener::bind(path).map_err(|e| CliError::new(format!("Failed to bind '{path}': {e}")))?,
            )
        }
        (None, port) => {
            let port = port.unwrap_or("10809");
            let addr = format!("{}:{port}", p.value("b").unwrap_or("0.0.0.0"));
            Listener::Tcp(TcpListener::bind(&addr).map_err(|e| CliError::new(format!("Failed to bind {addr}: {e}")))?)
        }
    };
    let export = Export {
        name: p.value("x").unwrap_or("").to_string(),
        description: p.value("D").unwrap_or("").to_string(),
        image: image.clone(),
        read_only,
        multi_conn: shared != 1,
    };
    let server = Server { exports: vec![export], max_connections: shared, persistent: p.has("t") };
    let socket = p.value("k").map(str::to_string);
    stop_on_signals(image.clone(), socket.clone())?;
    let result = server.run(listener, |e| eprintln!("vdisk: connection: {e}"));
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(|e| CliError::new(format!("serve: {e}")))?;
    image.close()?;
    Ok(0)
}

/// SIGTERM, SIGINT and SIGHUP end the server cleanly, as they end qemu-nbd: the image is flushed
/// and closed, the socket removed, exit status 0. The signals are blocked in every thread (the
/// mask is inherited by the threads started after this) and taken by one thread with `sigwait`.
fn stop_on_signals(image: Arc<dyn BlockDriver>, socket: Option<String>) -> Result<(), CliError> {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use; the calls only
    // read and write it and the calling thread's signal mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(CliError::new("cannot block termination signals"));
        }
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is a valid, initialised signal set and `sig` a valid out pointer.
        while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
        let code = match image.close() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vdisk: {}", e.message());
                1
            }
        };
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        std::process::exit(code);
    });
    Ok(())
}

/// `serve --vhost-user SOCKET`: a vhost-user-blk backend until the frontend disconnects; then the
/// image is closed and the process exits (the daemon's threads are not joined: rust-vmm's
/// daemon can hang on drop).
fn serve_vhost_user(
    image: Arc<dyn BlockDriver>,
    socket: &str,
    read_only: bool,
    num_queues: Option<&str>,
    serial: Option<&str>,
) -> CmdResult {
    let num_queues = match num_queues {
        None => 1,
        Some(v) => match v.parse::<u16>() {
            Ok(n) if (1..=64).contains(&n) => n,
            _ => return Err(CliError::new(format!("Invalid number of queues '{v}' (1 to 64)"))),
        },
    };
    let opts = virtio_blk::DeviceOptions { read_only, num_queues, serial: serial.unwrap_or("vdisk").to_string() };
    let device = Arc::new(virtio_blk::BlockDevice::new(image.clone(), &opts));
    stop_on_signals(image.clone(), Some(socket.to_string()))?;
    let served = virtio_blk::vhost_user::serve(device, socket);
    let _ = std::fs::remove_file(socket);
    let closed = image.close();
    let code = match (served, closed) {
        (Ok(()), Ok(())) => 0,
        (Err(e), _) => {
            eprintln!("vdisk: {e}");
            1
        }
        (_, Err(e)) => {
            eprintln!("vdisk: {}", e.message());
            1
        }
    };
    std::process::exit(code);
}
