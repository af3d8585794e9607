//! Listening: a unix socket or TCP, one thread per connection.
//!
//! Connections past the limit are closed at once (the client sees the connection end before
//! the greeting). Without `persistent` the server returns once a client has come and the last
//! one has left (qemu-nbd's default); with it, it serves until the process ends. The images are
//! flushed before [`Server::run`] returns.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use crate::{handle, Export};

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// A stream of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Small replies must not wait for Nagle's timer.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// An NBD server.
#[derive(Debug)]
pub struct Server {
    /// The exports.
    pub exports: Vec<Export>,
    /// Most simultaneous connections (0: no limit).
    pub max_connections: usize,
    /// Keep serving after the last client left.
    pub persistent: bool,
}

fn serve_stream(stream: Stream, exports: &[Export]) -> io::Result<()> {
    match stream {
        Stream::Unix(s) => handle(s.try_clone()?, s, exports),
        Stream::Tcp(s) => handle(s.try_clone()?, s, exports),
    }
}

impl Server {
    /// Serves on `listener` (see the module docs for when it returns). `on_error` hears about
    /// connections that ended with an error.
    pub fn run(self, listener: Listener, on_error: impl Fn(&io::Error) + Send + Sync + 'static) -> io::Result<()> {
        let exports = Arc::new(self.exports);
        let active = Arc::new(AtomicUsize::new(0));
        let on_error = Arc::new(on_error);
        let (ended_tx, ended_rx) = mpsc::channel::<()>();
        let limit = self.max_connections;
        {
            let exports = exports.clone();
            let active = active.clone();
            std::thread::spawn(move || loop {
                let stream = match listener.accept() {
                    Ok(s) => s,
                    Err(e) => {
                        on_error(&e);
                        continue;
                    }
                };
                if limit > 0 && active.load(Ordering::SeqCst) >= limit {
                    drop(stream);
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (exports, active, on_error, ended) =
                    (exports.clone(), active.clone(), on_error.clone(), ended_tx.clone());
                std::thread::spawn(move || {
                    if let Err(e) = serve_stream(stream, &exports) {
                        if e.kind() != io::ErrorKind::UnexpectedEof && e.kind() != io::ErrorKind::BrokenPipe {
                            on_error(&e);
                        }
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                    let _ = ended.send(());
                });
            });
        }
        loop {
            if ended_rx.recv().is_err() {
                break;
            }
            if !self.persistent && active.load(Ordering::SeqCst) == 0 {
                break;
            }
        }
        for e in exports.iter() {
            e.image.flush().map_err(|err| io::Error::other(err.message().to_string()))?;
        }
        Ok(())
    }
}
