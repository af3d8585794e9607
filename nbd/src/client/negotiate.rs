//! The client's side of fixed newstyle negotiation, and the socket it runs on.
//!
//! Option replies are bounded ([`MAX_OPTION_REPLY`] bytes, [`MAX_OPTION_REPLIES`] per option)
//! before anything is allocated from them; a server that answers out of turn ends negotiation
//! with an error.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use blockdev::{Error, ErrorKind, Result};

use super::conn::{io_err, violation};
use crate::address::Endpoint;
use crate::proto::{self, opt, rep};

/// Largest option reply accepted during negotiation.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most option replies accepted for one option.
const MAX_OPTION_REPLIES: usize = 1024;
/// The oldstyle greeting's second word (not supported).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// A socket, TCP or unix.
pub(super) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Connects to `endpoint`, with `timeout` on connecting and on every read and write.
    pub(super) fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Socket> {
        let s = match endpoint {
            Endpoint::Unix(path) => Socket::Unix(UnixStream::connect(path)?),
            Endpoint::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host name resolves to no address");
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
        };
        s.set_timeouts(timeout)?;
        Ok(s)
    }

    /// Sets the limit on every read and write (of every clone of the socket).
    pub(super) fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        let t = Some(timeout);
        match self {
            Socket::Tcp(x) => {
                x.set_read_timeout(t)?;
                x.set_write_timeout(t)
            }
            Socket::Unix(x) => {
                x.set_read_timeout(t)?;
                x.set_write_timeout(t)
            }
        }
    }

    /// Another handle on the same socket.
    pub(super) fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the server told about the export.
#[derive(Debug, Clone, Copy)]
pub(super) struct ExportInfo {
    /// The export's size.
    pub(super) size: u64,
    /// Its transmission flags.
    pub(super) flags: u16,
    /// Structured replies were negotiated.
    pub(super) structured: bool,
    /// The id of `base:allocation`, when selected.
    pub(super) allocation_context: Option<u32>,
}

fn send_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// Reads one option reply to `option`: its type and data.
fn read_option_reply(r: &mut impl Read, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if proto::read_u64(r)? != proto::OPTION_REPLY_MAGIC {
        return Err(violation("bad option reply magic"));
    }
    if proto::read_u32(r)? != option {
        return Err(violation("option reply to another option"));
    }
    let kind = proto::read_u32(r)?;
    let len = proto::read_u32(r)?;
    if len > MAX_OPTION_REPLY {
        return Err(violation(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((kind, data))
}

/// The error an option's refusal means.
fn option_refused(what: &str, kind: u32, data: &[u8]) -> Error {
    let text = String::from_utf8_lossy(data);
    let why = match kind {
        rep::ERR_UNKNOWN => "export unknown",
        rep::ERR_POLICY => "refused by the server's policy",
        rep::ERR_UNSUP => "not supported by the server",
        _ => "refused",
    };
    let msg = if text.is_empty() { format!("{what}: {why}") } else { format!("{what}: {why}: {text}") };
    let kind = if kind == rep::ERR_UNKNOWN { ErrorKind::NotFound } else { ErrorKind::Io };
    Error::new(kind, msg)
}

/// Negotiates with a server that just accepted the connection.
pub(super) fn negotiate(r: &mut impl Read, w: &mut impl Write, export: &str) -> Result<ExportInfo> {
    let io = |e| io_err("NBD negotiation", e);
    if proto::read_u64(r).map_err(io)? != proto::NBD_MAGIC {
        return Err(Error::new(ErrorKind::Io, "not an NBD server (bad greeting)"));
    }
    match proto::read_u64(r).map_err(io)? {
        proto::IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(Error::unsupported("the NBD server speaks the oldstyle protocol")),
        _ => return Err(Error::new(ErrorKind::Io, "not an NBD server (bad greeting)")),
    }
    let server_flags = proto::read_u16(r).map_err(io)?;
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::unsupported("the NBD server does not speak fixed newstyle"));
    }
    let client_flags = proto::CLIENT_FIXED_NEWSTYLE | u32::from(server_flags & proto::FLAG_NO_ZEROES != 0) << 1;
    w.write_all(&client_flags.to_be_bytes()).map_err(io)?;

    send_option(w, opt::STRUCTURED_REPLY, &[]).map_err(io)?;
    let (kind, _) = read_option_reply(r, opt::STRUCTURED_REPLY).map_err(io)?;
    let structured = kind == rep::ACK;

    let mut allocation_context = None;
    if structured {
        let query = b"base:allocation";
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query);
        send_option(w, opt::SET_META_CONTEXT, &data).map_err(io)?;
        for _ in 0..MAX_OPTION_REPLIES {
            let (kind, d) = read_option_reply(r, opt::SET_META_CONTEXT).map_err(io)?;
            match kind {
                rep::META_CONTEXT if d.len() >= 4 && &d[4..] == query => {
                    allocation_context = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                }
                rep::META_CONTEXT => {}
                _ => break, // ACK, or an error: block status is then not used
            }
        }
    }

    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(w, opt::GO, &data).map_err(io)?;
    let mut size_flags = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (kind, d) = read_option_reply(r, opt::GO).map_err(io)?;
        match kind {
            rep::ACK => break,
            rep::INFO if d.len() >= 2 && u16::from_be_bytes([d[0], d[1]]) == proto::info::EXPORT => {
                if d.len() != 12 {
                    return Err(io(violation("bad export information")));
                }
                let size = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
                size_flags = Some((size, u16::from_be_bytes([d[10], d[11]])));
            }
            rep::INFO => {}
            k if k & (1 << 31) != 0 => return Err(option_refused(&format!("NBD export '{export}'"), k, &d)),
            _ => return Err(io(violation("unexpected reply to GO"))),
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| io(violation("no export size")))?;
    if size > i64::MAX as u64 {
        return Err(io(violation(format!("export size {size}"))));
    }
    Ok(ExportInfo { size, flags, structured, allocation_context })
}
