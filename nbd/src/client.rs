//! vdisk's NBD client: an export as a [`Storage`], so that every format driver runs on top of it
//! (a qcow2 exported raw by `qemu-nbd -f raw` opens as qcow2) and `info`, `map`, `compare` and
//! `convert` read NBD URLs.
//!
//! - Negotiation: fixed newstyle; structured replies and the `base:allocation` context when the
//!   server has them (block status then tells holes from data, so convert and map stay sparse);
//!   `NBD_OPT_GO`. No TLS.
//! - Transmission: `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS`, `DISC` on
//!   drop. Requests are at most 32 MiB (the protocol's default limit), split as needed.
//! - No reconnection: once the connection fails (the server went away, a reply broke the
//!   protocol, a timeout), every later request fails with a clear error.
//!
//! # Invariants
//! - Nothing the server sends is trusted: option replies are bounded before they are read, every
//!   reply chunk must answer the request in flight and stay inside it, and a read succeeds only
//!   when every byte of it was delivered (by data or hole chunks).
//! - One request is in flight per connection; the connection's lock is held from sending a
//!   request until its reply is read in full, so replies never interleave.
//! - Socket reads and writes time out ([`ClientOptions::timeout`]): a server that stops answering
//!   yields an error, never a hang.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use blockdev::{Error, ErrorKind, Prealloc, Result, Storage};

use crate::address::{Address, Endpoint};
use crate::proto::{self, cflag, chunk, cmd, opt, rep, tflag};

/// Largest request payload the client sends or asks for (the protocol's default maximum).
pub const MAX_CLIENT_REQUEST: u64 = 32 << 20;
/// Largest option reply accepted during negotiation.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most option replies accepted for one option.
const MAX_OPTION_REPLIES: usize = 1024;
/// Most chunks accepted in one structured reply (a read of 32 MiB in 512-byte chunks).
const MAX_CHUNKS: usize = 1 << 16;
/// The oldstyle greeting's second word (not supported).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Open without write access (no write request is ever sent).
    pub read_only: bool,
    /// Limit on connecting and on every socket read and write.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions { read_only: true, timeout: Duration::from_secs(30) }
    }
}

/// A socket, TCP or unix.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Socket> {
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
        let t = Some(timeout);
        match &s {
            Socket::Tcp(x) => {
                x.set_read_timeout(t)?;
                x.set_write_timeout(t)?;
            }
            Socket::Unix(x) => {
                x.set_read_timeout(t)?;
                x.set_write_timeout(t)?;
            }
        }
        Ok(s)
    }

    fn try_clone(&self) -> io::Result<Socket> {
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

/// A protocol violation by the server.
fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD server broke the protocol: {}", what.into()))
}

/// One negotiated connection in transmission phase.
struct Conn {
    r: BufReader<Box<dyn Read + Send>>,
    w: Box<dyn Write + Send>,
    next_cookie: u64,
}

/// What the server told about the export.
#[derive(Debug, Clone, Copy)]
struct ExportInfo {
    size: u64,
    flags: u16,
    structured: bool,
    /// The id of `base:allocation`, when selected.
    allocation_context: Option<u32>,
}

/// One request's header fields.
#[derive(Debug, Clone, Copy)]
struct Req {
    command: u16,
    flags: u16,
    offset: u64,
    len: u32,
}

/// Where a reply's bytes go.
enum Sink<'a, 'b> {
    /// No payload expected.
    None,
    /// A read: `bufs` holds the request's bytes in order.
    Read(&'a mut [IoSliceMut<'b>]),
    /// Block status: the first extent of the context (length, flags).
    Status(u32, &'a mut Option<(u32, u32)>),
}

/// An NBD export as a [`Storage`]. See the module docs.
pub struct NbdStorage {
    /// The address in URL form (qemu's spelling in messages and `info`).
    name: String,
    info: ExportInfo,
    read_only: bool,
    conn: Mutex<Option<Conn>>,
}

impl fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdStorage").field("address", &self.name).field("size", &self.info.size).finish()
    }
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

fn io_err(operation: &'static str, e: io::Error) -> Error {
    let kind = e.kind();
    let e = Error::from_io(operation, e);
    match kind {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            let msg = format!("NBD server did not answer in time ({})", e.message());
            e.with_message(msg)
        }
        io::ErrorKind::UnexpectedEof => e.with_message("NBD server closed the connection"),
        _ => e,
    }
}

/// Negotiates with a server that just accepted the connection.
fn negotiate(r: &mut impl Read, w: &mut impl Write, export: &str) -> Result<ExportInfo> {
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

/// The pieces of `[start, start+len)` (counted across slices of the lengths `lens`): slice
/// index and range inside that slice; `None` if the range runs past the slices.
fn spans(lens: impl Iterator<Item = usize>, mut start: usize, mut len: usize) -> Option<Vec<(usize, usize, usize)>> {
    let mut out = Vec::new();
    for (i, l) in lens.enumerate() {
        if len == 0 {
            break;
        }
        if start >= l {
            start -= l;
            continue;
        }
        let take = (l - start).min(len);
        out.push((i, start, start + take));
        start = 0;
        len -= take;
    }
    (len == 0).then_some(out)
}

/// Fills `len` bytes of `bufs` from byte `start` on (counted across the slices) with `fill`.
fn for_each_segment(
    bufs: &mut [IoSliceMut<'_>],
    start: usize,
    len: usize,
    mut fill: impl FnMut(&mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let pieces = spans(bufs.iter().map(|b| b.len()), start, len).ok_or_else(|| violation("chunk past the request"))?;
    for (i, from, to) in pieces {
        fill(&mut bufs[i][from..to])?;
    }
    Ok(())
}

/// The parts of a read that chunks delivered: start → end, never overlapping.
#[derive(Default)]
struct Delivered {
    ranges: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Delivered {
    /// Records `[start, end)` of a request of `total` bytes; false if it leaves the request or
    /// overlaps a part already delivered.
    fn mark(&mut self, start: u64, end: u64, total: u64) -> bool {
        if start >= end || end > total {
            return false;
        }
        let before_overlaps = self.ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start);
        if before_overlaps {
            return false;
        }
        self.ranges.insert(start, end);
        self.bytes += end - start;
        true
    }
}

impl Conn {
    /// Sends one request with its payload and reads its whole reply into `sink`.
    fn request(
        &mut self,
        info: &ExportInfo,
        req: Req,
        payload: &[IoSlice<'_>],
        mut sink: Sink<'_, '_>,
    ) -> io::Result<std::result::Result<(), (u32, String)>> {
        let Req { command, flags, offset, len } = req;
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        head[4..6].copy_from_slice(&flags.to_be_bytes());
        head[6..8].copy_from_slice(&command.to_be_bytes());
        head[8..16].copy_from_slice(&cookie.to_be_bytes());
        head[16..24].copy_from_slice(&offset.to_be_bytes());
        head[24..28].copy_from_slice(&len.to_be_bytes());
        self.w.write_all(&head)?;
        for p in payload {
            self.w.write_all(p)?;
        }
        let total = u64::from(len);
        let mut delivered = Delivered::default();
        let mut failure = None;
        for _ in 0..MAX_CHUNKS {
            let r = &mut self.r;
            match proto::read_u32(r)? {
                proto::SIMPLE_REPLY_MAGIC => {
                    let error = proto::read_u32(r)?;
                    if proto::read_u64(r)? != cookie {
                        return Err(violation("reply to another request"));
                    }
                    if error != 0 {
                        return Ok(Err((error, String::new())));
                    }
                    if let Sink::Read(bufs) = &mut sink {
                        if info.structured {
                            return Err(violation("simple reply to a read after structured replies"));
                        }
                        for_each_segment(bufs, 0, len as usize, |b| r.read_exact(b))?;
                    }
                    return Ok(Ok(()));
                }
                proto::STRUCTURED_REPLY_MAGIC if info.structured => {}
                _ => return Err(violation("bad reply magic")),
            }
            let chunk_flags = proto::read_u16(r)?;
            let kind = proto::read_u16(r)?;
            if proto::read_u64(r)? != cookie {
                return Err(violation("reply to another request"));
            }
            let plen = proto::read_u32(r)?;
            match (kind, &mut sink) {
                (chunk::NONE, _) => {
                    if plen != 0 {
                        return Err(violation("payload in a NONE chunk"));
                    }
                }
                (chunk::OFFSET_DATA, Sink::Read(bufs)) => {
                    let at = proto::read_u64(r)?.wrapping_sub(offset);
                    let n = u64::from(plen.checked_sub(8).ok_or_else(|| violation("short data chunk"))?);
                    if !delivered.mark(at, at.saturating_add(n), total) {
                        return Err(violation("data chunk outside the read or overlapping another"));
                    }
                    for_each_segment(bufs, at as usize, n as usize, |b| r.read_exact(b))?;
                }
                (chunk::OFFSET_HOLE, Sink::Read(bufs)) => {
                    if plen != 12 {
                        return Err(violation("bad hole chunk"));
                    }
                    let at = proto::read_u64(r)?.wrapping_sub(offset);
                    let n = u64::from(proto::read_u32(r)?);
                    if !delivered.mark(at, at.saturating_add(n), total) {
                        return Err(violation("hole chunk outside the read or overlapping another"));
                    }
                    for_each_segment(bufs, at as usize, n as usize, |b| {
                        b.fill(0);
                        Ok(())
                    })?;
                }
                (chunk::BLOCK_STATUS, Sink::Status(id, first)) => {
                    if plen < 12 || (plen - 4) % 8 != 0 {
                        return Err(violation("bad block status chunk"));
                    }
                    let context = proto::read_u32(r)?;
                    let length = proto::read_u32(r)?;
                    let state = proto::read_u32(r)?;
                    if context == *id && first.is_none() {
                        if length == 0 || u64::from(length) > total {
                            return Err(violation("block status extent of a bad length"));
                        }
                        **first = Some((length, state));
                    }
                    proto::skip(r, u64::from(plen - 12))?;
                }
                (k, _) if k & chunk::ERROR_BIT != 0 => {
                    if plen < 6 {
                        return Err(violation("short error chunk"));
                    }
                    let error = proto::read_u32(r)?;
                    let msg_len = proto::read_u16(r)?;
                    let rest = plen - 6;
                    if u32::from(msg_len) > rest {
                        return Err(violation("error message longer than its chunk"));
                    }
                    let mut msg = vec![0u8; usize::from(msg_len)];
                    r.read_exact(&mut msg)?;
                    proto::skip(r, u64::from(rest - u32::from(msg_len)))?;
                    failure.get_or_insert((error.max(1), String::from_utf8_lossy(&msg).into_owned()));
                }
                (chunk::OFFSET_DATA | chunk::OFFSET_HOLE | chunk::BLOCK_STATUS, _) => {
                    return Err(violation("chunk that does not fit the request"));
                }
                _ => proto::skip(r, u64::from(plen))?,
            }
            if chunk_flags & chunk::FLAG_DONE != 0 {
                if let Some(f) = failure {
                    return Ok(Err(f));
                }
                if matches!(sink, Sink::Read(_)) && delivered.bytes != total {
                    return Err(violation("read reply that leaves bytes out"));
                }
                return Ok(Ok(()));
            }
        }
        Err(violation("too many reply chunks"))
    }
}

impl NbdStorage {
    /// Connects to the export `address` names and negotiates.
    pub fn connect(address: &Address, opts: &ClientOptions) -> Result<NbdStorage> {
        let name = address.to_string();
        let socket = Socket::connect(&address.endpoint, opts.timeout)
            .map_err(|e| io_err("connect", e).prefixed(format!("Failed to connect to '{name}'")))?;
        let reader = socket.try_clone().map_err(|e| io_err("connect", e))?;
        Self::over_stream(&name, reader, socket, &address.export, opts)
    }

    /// Negotiates `export` with a server on an already connected byte stream (`r` and `w` its two
    /// directions; a VMM's own transport, or test and fuzz input) and returns the export;
    /// `name` is the name used in messages and `info`. `opts.timeout` is the stream's business.
    pub fn over_stream(
        name: &str,
        r: impl Read + Send + 'static,
        w: impl Write + Send + 'static,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<NbdStorage> {
        let mut r = BufReader::with_capacity(256 << 10, Box::new(r) as Box<dyn Read + Send>);
        let mut w = Box::new(w) as Box<dyn Write + Send>;
        let info = negotiate(&mut r, &mut w, export).map_err(|e| e.with_path(name))?;
        if !opts.read_only && info.flags & tflag::READ_ONLY != 0 {
            return Err(Error::read_only().with_message(format!("The NBD export '{name}' is read-only")));
        }
        Ok(NbdStorage {
            name: name.to_string(),
            info,
            read_only: opts.read_only,
            conn: Mutex::new(Some(Conn { r, w, next_cookie: 1 })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one request; a broken connection is dropped (later requests fail at once).
    fn run(&self, operation: &'static str, req: Req, payload: &[IoSlice<'_>], sink: Sink<'_, '_>) -> Result<()> {
        let offset = req.offset;
        let mut guard = self.lock();
        let Some(conn) = guard.as_mut() else {
            return Err(Error::new(ErrorKind::Io, format!("the connection to '{}' was lost", self.name))
                .with_operation(operation));
        };
        match conn.request(&self.info, req, payload, sink) {
            Ok(Ok(())) => Ok(()),
            Ok(Err((errno, msg))) => {
                let e = Error::from_errno(operation, errno as i32).with_offset(offset);
                Err(if msg.is_empty() { e } else { e.prefixed(msg) })
            }
            Err(e) => {
                *guard = None;
                Err(io_err(operation, e).with_offset(offset).with_path(self.name.clone()))
            }
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only());
        }
        if offset.checked_add(len).is_none_or(|end| end > self.info.size) {
            return Err(Error::out_of_range(format!(
                "Cannot write past the end of the NBD export ({} bytes)",
                self.info.size
            ))
            .with_offset(offset));
        }
        Ok(())
    }

    /// Sends a command without payload over `[offset, offset+len)` in pieces the protocol allows.
    fn ranged(&self, operation: &'static str, command: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 30);
            self.run(operation, Req { command, flags, offset: offset + done, len: n as u32 }, &[], Sink::None)?;
            done += n;
        }
        Ok(())
    }
}

/// The slices of `bufs` covering `[start, start+len)` (counted across the slices).
fn sub_slices<'a>(bufs: &'a [IoSlice<'_>], start: usize, len: usize) -> Vec<IoSlice<'a>> {
    let pieces = spans(bufs.iter().map(|b| b.len()), start, len).unwrap_or_default();
    pieces.into_iter().map(|(i, from, to)| IoSlice::new(&bufs[i][from..to])).collect()
}

impl Storage for NbdStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.info.size)
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let inside = self.info.size.saturating_sub(offset).min(total);
        if inside < total {
            // Past the end reads as zeros (the Storage contract).
            for_each_segment(bufs, inside as usize, (total - inside) as usize, |b| {
                b.fill(0);
                Ok(())
            })
            .expect("the range is inside bufs");
        }
        let mut done = 0;
        while done < inside {
            let n = (inside - done).min(MAX_CLIENT_REQUEST);
            if done == 0 && n == total {
                self.run("read", Req { command: cmd::READ, flags: 0, offset, len: n as u32 }, &[], Sink::Read(bufs))?;
            } else {
                let mut piece = vec![0u8; n as usize];
                self.run(
                    "read",
                    Req { command: cmd::READ, flags: 0, offset: offset + done, len: n as u32 },
                    &[],
                    Sink::Read(&mut [IoSliceMut::new(&mut piece)]),
                )?;
                let mut src = &piece[..];
                for_each_segment(bufs, done as usize, n as usize, |b| {
                    let (head, rest) = src.split_at(b.len());
                    b.copy_from_slice(head);
                    src = rest;
                    Ok(())
                })
                .expect("the range is inside bufs");
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_writable(offset, total)?;
        let mut done = 0;
        while done < total {
            let n = (total - done).min(MAX_CLIENT_REQUEST);
            let parts = sub_slices(bufs, done as usize, n as usize);
            self.run(
                "write",
                Req { command: cmd::WRITE, flags: 0, offset: offset + done, len: n as u32 },
                &parts,
                Sink::None,
            )?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.info.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.run("flush", Req { command: cmd::FLUSH, flags: 0, offset: 0, len: 0 }, &[], Sink::None)
    }

    /// An export's size is the server's: growing is refused (qemu's message); a smaller length
    /// is accepted and changes nothing, as qemu's NBD driver accepts an inexact truncate.
    fn set_len(&self, len: u64, _prealloc: Prealloc) -> Result<()> {
        if len > self.info.size {
            return Err(Error::unsupported("Cannot grow NBD nodes"));
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        if self.info.flags & tflag::SEND_WRITE_ZEROES != 0 {
            let flags = if may_unmap { 0 } else { cflag::NO_HOLE };
            return self.ranged("write zeroes", cmd::WRITE_ZEROES, flags, offset, len);
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &[IoSlice::new(&zeros[..n])])?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        if self.info.flags & tflag::SEND_TRIM == 0 {
            return Ok(());
        }
        self.ranged("discard", cmd::TRIM, 0, offset, len)
    }

    fn data_status(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        if offset >= self.info.size {
            return Ok((false, max_len));
        }
        let Some(id) = self.info.allocation_context else { return Ok((true, max_len)) };
        let len = max_len.min(self.info.size - offset).min(1 << 30);
        if len == 0 {
            return Ok((true, max_len));
        }
        let mut first = None;
        self.run(
            "block status",
            Req { command: cmd::BLOCK_STATUS, flags: 0, offset, len: len as u32 },
            &[],
            Sink::Status(id, &mut first),
        )?;
        let (length, state) =
            first.ok_or_else(|| Error::new(ErrorKind::Io, "NBD server broke the protocol: no block status"))?;
        Ok((state & proto::STATE_HOLE == 0, u64::from(length)))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &'static str {
        "nbd"
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        if let Some(conn) = self.lock().as_mut() {
            let mut head = [0u8; 28];
            head[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
            head[6..8].copy_from_slice(&cmd::DISC.to_be_bytes());
            let _ = conn.w.write_all(&head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_parts_must_stay_inside_and_not_overlap() {
        let mut d = Delivered::default();
        assert!(d.mark(100, 200, 1000));
        assert!(d.mark(0, 100, 1000));
        assert!(d.mark(200, 1000, 1000));
        assert_eq!(d.bytes, 1000);
        for (s, e) in [(150, 160), (50, 150), (0, 1), (999, 1000), (10, 10), (900, 1001), (u64::MAX - 1, u64::MAX)] {
            assert!(!Delivered { ranges: d.ranges.clone(), bytes: 0 }.mark(s, e, 1000) || s >= 1000, "{s}..{e}");
        }
        let mut fresh = Delivered::default();
        assert!(!fresh.mark(5, 5, 10), "empty part");
        assert!(!fresh.mark(5, 11, 10), "past the request");
    }

    #[test]
    fn segments_span_slices_and_refuse_to_run_past_them() {
        let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let mut n = 0u8;
        for_each_segment(&mut bufs, 2, 4, |s| {
            for x in s {
                n += 1;
                *x = n;
            }
            Ok(())
        })
        .unwrap();
        assert!(for_each_segment(&mut bufs, 6, 3, |_| Ok(())).is_err());
        assert_eq!((a, b), ([0, 0, 1], [2, 3, 4, 0, 0]));
    }
}
