//! Servers the tests start (vdisk serve --nbd, qemu-nbd): spawned, waited for until their unix
//! socket accepts connections, killed when dropped.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; killed when dropped.
pub struct Served {
    /// The server process.
    pub child: Child,
    /// Its unix socket.
    pub socket: PathBuf,
}

impl Served {
    /// The NBD URL of its export `disk`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `socket` accepts a connection; panics if `child` exits first or after 20 s.
pub fn wait_for(socket: &Path, child: &mut Child) {
    let start = Instant::now();
    while UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "server did not listen on {}", socket.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `program args...`, listening on `socket` (vdisk: `serve --nbd`; qemu-nbd).
pub fn start(program: &Path, args: &[&str], socket: &Path) -> Served {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    wait_for(socket, &mut child);
    Served { child, socket: socket.to_path_buf() }
}
