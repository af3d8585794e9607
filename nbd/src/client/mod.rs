//! vdisk's NBD client: an export as a [`Storage`], so that every format driver runs on top of it
//! (a qcow2 exported raw by `qemu-nbd -f raw` opens as qcow2) and `info`, `map`, `compare` and
//! `convert` read NBD URLs.
//!
//! - Negotiation: fixed newstyle; structured replies and the `base:allocation` context when the
//!   server has them (block status then tells holes from data, so convert and map stay sparse);
//!   `NBD_OPT_GO`. No TLS.
//! - Transmission: `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS`, `DISC` on
//!   drop. Requests are at most 32 MiB (the protocol's default limit), split as needed.
//! - No reconnection: once a connection fails (the server went away, a reply broke the
//!   protocol, a timeout), every later request fails with a clear error.
//!
//! # Invariants
//! - Nothing the server sends is trusted: option replies are bounded before they are read, every
//!   reply chunk must answer the request in flight and stay inside it, and a read succeeds only
//!   when every byte of it was delivered (by data or hole chunks).
//! - One request is in flight per connection: a connection is taken out of the pool from sending
//!   a request until its reply is read in full, so replies never interleave. Parallel requests
//!   use a second connection ([`MAX_CONNECTIONS`]) when the server advertises `CAN_MULTI_CONN`
//!   (its connections see each other's flushed writes); one that then refuses it, or leaves it
//!   in its listen queue for more than 2 s, is used through the connection it took.
//! - Socket reads and writes time out ([`ClientOptions::timeout`]): a server that stops answering
//!   yields an error, never a hang.

mod conn;
mod negotiate;

use std::fmt;
use std::io::{BufReader, IoSlice, IoSliceMut, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use blockdev::{Error, ErrorKind, Prealloc, Result, Storage};

use crate::address::Address;
use crate::proto::{self, cflag, cmd, tflag};
use conn::{for_each_segment, io_err, spans, Conn, Req, Sink};
use negotiate::{negotiate, ExportInfo, Socket};

/// Largest request payload the client sends or asks for (the protocol's default maximum).
pub const MAX_CLIENT_REQUEST: u64 = 32 << 20;

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

/// Most connections one export opens: a second lets parallel readers (convert's workers) keep
/// two requests in flight at once.
pub const MAX_CONNECTIONS: usize = 2;

/// How long an extra connection may take to negotiate: a server at its connection limit leaves
/// new ones waiting in its listen queue, and the request that asked for one should not wait the
/// whole timeout before making do with the connections there are.
const EXTRA_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// The connections of one export.
struct Pool {
    /// Connections waiting for a request.
    idle: Vec<Conn>,
    /// Connections that exist (idle or carrying a request).
    open: usize,
    /// Most connections to have; lowered to what exists once opening another fails.
    limit: usize,
    /// A connection failed: no reconnection, every request fails from now on.
    lost: bool,
}

/// Where to open more connections to the same export.
struct Dialer {
    address: Address,
    timeout: Duration,
}

/// An NBD export as a [`Storage`]. See the module docs.
pub struct NbdStorage {
    /// The address in URL form (qemu's spelling in messages and `info`).
    name: String,
    info: ExportInfo,
    read_only: bool,
    dialer: Option<Dialer>,
    pool: Mutex<Pool>,
    freed: Condvar,
}

impl fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdStorage").field("address", &self.name).field("size", &self.info.size).finish()
    }
}

/// Connects to the server of `address` and negotiates its export, within `setup` for connecting
/// and negotiating, then with `timeout` on every read and write.
fn dial(address: &Address, setup: Duration, timeout: Duration) -> Result<(Conn, ExportInfo)> {
    let name = address.to_string();
    let io = |e| io_err("connect", e);
    let socket = Socket::connect(&address.endpoint, setup)
        .map_err(|e| io(e).prefixed(format!("Failed to connect to '{name}'")))?;
    let reader = socket.try_clone().map_err(io)?;
    let control = socket.try_clone().map_err(io)?;
    let done = handshake(&name, Box::new(reader), Box::new(socket), &address.export)?;
    control.set_timeouts(timeout).map_err(io)?;
    Ok(done)
}

/// Negotiates `export` on a connected stream.
fn handshake(
    name: &str,
    r: Box<dyn Read + Send>,
    mut w: Box<dyn Write + Send>,
    export: &str,
) -> Result<(Conn, ExportInfo)> {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let info = negotiate(&mut r, &mut w, export).map_err(|e| e.with_path(name))?;
    Ok((Conn { r, w, next_cookie: 1 }, info))
}

impl NbdStorage {
    /// Connects to the export `address` names and negotiates. More connections (at most
    /// [`MAX_CONNECTIONS`]) are opened as parallel requests need them when the server says its
    /// connections see each other's writes (`CAN_MULTI_CONN`, which qemu-nbd and `vdisk serve`
    /// advertise when they take more than one client).
    pub fn connect(address: &Address, opts: &ClientOptions) -> Result<NbdStorage> {
        let (conn, info) = dial(address, opts.timeout, opts.timeout)?;
        let dialer = Dialer { address: address.clone(), timeout: opts.timeout };
        Self::new(address.to_string(), conn, info, opts, Some(dialer))
    }

    /// Negotiates `export` with a server on an already connected byte stream (`r` and `w` its two
    /// directions; a VMM's own transport, or test and fuzz input) and returns the export, on that
    /// one connection; `name` is the name used in messages and `info`. `opts.timeout` is the
    /// stream's business.
    pub fn over_stream(
        name: &str,
        r: impl Read + Send + 'static,
        w: impl Write + Send + 'static,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<NbdStorage> {
        let (conn, info) = handshake(name, Box::new(r), Box::new(w), export)?;
        Self::new(name.to_string(), conn, info, opts, None)
    }

    fn new(name: String, conn: Conn, info: ExportInfo, opts: &ClientOptions, dialer: Option<Dialer>) -> Result<Self> {
        if !opts.read_only && info.flags & tflag::READ_ONLY != 0 {
            return Err(Error::read_only().with_message(format!("The NBD export '{name}' is read-only")));
        }
        let multi = info.flags & tflag::CAN_MULTI_CONN != 0;
        let limit = if dialer.is_some() && multi { MAX_CONNECTIONS } else { 1 };
        Ok(NbdStorage {
            name,
            info,
            read_only: opts.read_only,
            dialer,
            pool: Mutex::new(Pool { idle: vec![conn], open: 1, limit, lost: false }),
            freed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, operation: &'static str) -> Error {
        Error::new(ErrorKind::Io, format!("the connection to '{}' was lost", self.name)).with_operation(operation)
    }

    /// A connection for one request: an idle one, a new one while under the limit, or the next
    /// one given back.
    fn take(&self, operation: &'static str) -> Result<Conn> {
        let mut pool = self.lock();
        loop {
            if pool.lost {
                return Err(self.lost(operation));
            }
            if let Some(conn) = pool.idle.pop() {
                return Ok(conn);
            }
            if pool.open < pool.limit {
                pool.open += 1;
                drop(pool);
                let extra =
                    self.dialer.as_ref().map(|d| dial(&d.address, EXTRA_CONNECTION_TIMEOUT.min(d.timeout), d.timeout));
                match extra {
                    Some(Ok((conn, info))) if info.size == self.info.size && info.flags == self.info.flags => {
                        return Ok(conn)
                    }
                    _ => {
                        // The server takes no more connections (or answered differently): make do
                        // with the ones there are.
                        pool = self.lock();
                        pool.open -= 1;
                        pool.limit = pool.open.max(1);
                        continue;
                    }
                }
            }
            pool = self.freed.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs one request; a broken connection is dropped and the export marked lost (later
    /// requests fail at once).
    fn run(&self, operation: &'static str, req: Req, payload: &[IoSlice<'_>], sink: Sink<'_, '_>) -> Result<()> {
        let offset = req.offset;
        let mut conn = self.take(operation)?;
        let result = conn.request(&self.info, req, payload, sink);
        let mut pool = self.lock();
        match result {
            Ok(reply) => {
                pool.idle.push(conn);
                self.freed.notify_one();
                drop(pool);
                reply.map_err(|(errno, msg)| {
                    let e = Error::from_errno(operation, errno as i32).with_offset(offset);
                    if msg.is_empty() {
                        e
                    } else {
                        e.prefixed(msg)
                    }
                })
            }
            Err(e) => {
                pool.open -= 1;
                pool.lost = true;
                self.freed.notify_all();
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

    fn is_remote(&self) -> bool {
        true
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        let mut head = [0u8; 28];
        head[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        head[6..8].copy_from_slice(&cmd::DISC.to_be_bytes());
        for conn in self.lock().idle.iter_mut() {
            let _ = conn.w.write_all(&head);
        }
    }
}
