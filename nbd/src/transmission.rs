//! The transmission phase: requests in, replies out, one request at a time per connection.
//!
//! Every request is checked before it touches the image: its magic (a bad one ends the
//! connection: nothing after it can be trusted), its length against [`MAX_REQUEST`] (an
//! oversized write's payload is read and dropped, so the stream stays in step), its range
//! against the export's size, and write-type commands against a read-only export (`EPERM`,
//! never a write). Unknown commands get `EINVAL`. Flush means durable: `FLUSH` and the `FUA`
//! flag flush the image (which syncs its files) before the reply.

use std::io::{self, Read, Write};

use blockdev::{chain_status, ErrorKind, ExtentKind, ZeroFlags};

use crate::handshake::Negotiated;
use crate::proto::{self, cflag, chunk, cmd, errno};
use crate::{Context, MAX_REQUEST};

/// Most extents one block status reply describes per context.
pub const MAX_EXTENTS: usize = 1024;
/// Most image block status queries behind one reply per context (merged extents included).
pub const MAX_STATUS_CALLS: usize = 64 * 1024;

/// One request's header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let mut h = [0u8; 28];
    // A clean end of the stream between requests is a disconnect.
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let be32 = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    if be32(0) != proto::REQUEST_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
    }
    Ok(Some(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: be64(8),
        offset: be64(16),
        length: be32(24),
    }))
}

/// The protocol's error number for an image error.
fn errno_of(e: &blockdev::Error) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly | ErrorKind::PermissionDenied | ErrorKind::Locked | ErrorKind::LockedInProcess => {
            errno::EPERM
        }
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => errno::EINVAL,
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::Unsupported => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

/// A failed request: its error number and a message for structured replies.
struct Failure(u32, String);

impl From<blockdev::Error> for Failure {
    fn from(e: blockdev::Error) -> Self {
        Failure(errno_of(&e), e.message().to_string())
    }
}

fn fail(code: u32, msg: &str) -> Failure {
    Failure(code, msg.to_string())
}

/// Writes replies in the negotiated style.
struct Replies<'w, W: Write> {
    w: &'w mut W,
    structured: bool,
}

impl<W: Write> Replies<'_, W> {
    fn ok(&mut self, cookie: u64) -> io::Result<()> {
        if self.structured {
            self.w.write_all(&proto::chunk_header(chunk::FLAG_DONE, chunk::NONE, cookie, 0))?;
        } else {
            self.w.write_all(&proto::simple_header(0, cookie))?;
        }
        self.w.flush()
    }

    fn error(&mut self, cookie: u64, f: &Failure) -> io::Result<()> {
        if self.structured {
            let msg = &f.1.as_bytes()[..f.1.len().min(4096)];
            let mut payload = f.0.to_be_bytes().to_vec();
            payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            payload.extend_from_slice(msg);
            self.w.write_all(&proto::chunk_header(chunk::FLAG_DONE, chunk::ERROR, cookie, payload.len() as u32))?;
            self.w.write_all(&payload)?;
        } else {
            self.w.write_all(&proto::simple_header(f.0, cookie))?;
        }
        self.w.flush()
    }

    fn data(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.structured {
            let head = proto::chunk_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, data.len() as u32 + 8);
            self.w.write_all(&head)?;
            self.w.write_all(&offset.to_be_bytes())?;
        } else {
            self.w.write_all(&proto::simple_header(0, cookie))?;
        }
        self.w.write_all(data)?;
        self.w.flush()
    }
}

/// Serves requests until the client disconnects. `Err` on a broken stream or protocol.
pub fn serve(r: &mut impl Read, w: &mut impl Write, n: &Negotiated<'_>) -> io::Result<()> {
    let export = n.export;
    let image = &export.image;
    let mut buf: Vec<u8> = Vec::new();
    let mut replies = Replies { w, structured: n.structured };
    while let Some(req) = read_request(r)? {
        let size = image.size();
        let in_range = req.offset.checked_add(req.length as u64).is_some_and(|end| end <= size);
        let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if req.kind == cmd::WRITE {
            // The payload follows in any case; read it (or drop it) to stay in step.
            if req.length > MAX_REQUEST {
                proto::skip(r, req.length as u64)?;
                replies.error(req.cookie, &fail(errno::EINVAL, "request too large"))?;
                continue;
            }
            // Grown as the payload arrives: a client cannot make the server allocate 32 MiB by
            // announcing a payload it never sends.
            buf.clear();
            if r.take(req.length as u64).read_to_end(&mut buf)? < req.length as usize {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if req.kind == cmd::DISC {
            return Ok(());
        }
        let checked = if writes && export.read_only {
            Err(fail(errno::EPERM, "the export is read-only"))
        } else if !matches!(req.kind, cmd::FLUSH) && !in_range {
            Err(fail(errno::EINVAL, "request out of range"))
        } else {
            Ok(())
        };
        if let Err(f) = checked {
            replies.error(req.cookie, &f)?;
            continue;
        }
        let fua = req.flags & cflag::FUA != 0;
        let result: Result<(), Failure> = match req.kind {
            cmd::READ => {
                if req.length > MAX_REQUEST {
                    Err(fail(errno::EINVAL, "request too large"))
                } else {
                    buf.resize(req.length as usize, 0);
                    match image.read_exact_at(req.offset, &mut buf) {
                        Ok(()) => {
                            replies.data(req.cookie, req.offset, &buf)?;
                            continue;
                        }
                        Err(e) => Err(e.into()),
                    }
                }
            }
            cmd::WRITE => image.write_all_at(req.offset, &buf).map_err(Failure::from),
            cmd::FLUSH => image.flush().map_err(Failure::from),
            cmd::TRIM => image.discard(req.offset, req.length as u64).map_err(Failure::from),
            cmd::WRITE_ZEROES => {
                let flags = ZeroFlags {
                    may_unmap: req.flags & cflag::NO_HOLE == 0,
                    no_fallback: req.flags & cflag::FAST_ZERO != 0,
                };
                image.write_zeroes(req.offset, req.length as u64, flags).map_err(|e| {
                    let mut f = Failure::from(e);
                    if req.flags & cflag::FAST_ZERO != 0 && f.0 != errno::EPERM {
                        f.0 = errno::ENOTSUP;
                    }
                    f
                })
            }
            cmd::CACHE => Ok(()),
            cmd::BLOCK_STATUS => {
                if !n.structured || n.contexts.is_empty() {
                    Err(fail(errno::EINVAL, "no metadata context was negotiated"))
                } else if req.length == 0 {
                    Err(fail(errno::EINVAL, "block status of no bytes"))
                } else {
                    match block_status(n, &req) {
                        Ok(chunks) => {
                            let last = chunks.len() - 1;
                            for (i, payload) in chunks.iter().enumerate() {
                                let flags = if i == last { chunk::FLAG_DONE } else { 0 };
                                let head =
                                    proto::chunk_header(flags, chunk::BLOCK_STATUS, req.cookie, payload.len() as u32);
                                replies.w.write_all(&head)?;
                                replies.w.write_all(payload)?;
                            }
                            replies.w.flush()?;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            _ => Err(fail(errno::EINVAL, "unknown command")),
        };
        let result = result.and_then(|()| if fua && writes { image.flush().map_err(Failure::from) } else { Ok(()) });
        match result {
            Ok(()) => replies.ok(req.cookie)?,
            Err(f) => replies.error(req.cookie, &f)?,
        }
    }
    Ok(())
}

/// The block status payloads, one per selected context: the context id, then (length, flags)
/// descriptors covering the request from its start (at most [`MAX_EXTENTS`], one with `REQ_ONE`).
fn block_status(n: &Negotiated<'_>, req: &Request) -> Result<Vec<Vec<u8>>, Failure> {
    let image = n.export.image.as_ref();
    let one = req.flags & cflag::REQ_ONE != 0;
    let mut out = Vec::with_capacity(n.contexts.len());
    for &(id, context) in &n.contexts {
        let mut payload = id.to_be_bytes().to_vec();
        let end = req.offset + req.length as u64;
        let mut at = req.offset;
        let mut descriptors: Vec<(u64, u32)> = Vec::new();
        let mut calls = 0;
        while at < end && descriptors.len() < MAX_EXTENTS && calls < MAX_STATUS_CALLS {
            calls += 1;
            let (ext, depth) = chain_status(image, at, end - at)?;
            let len = ext.len.clamp(1, end - at);
            let flags = match context {
                Context::BaseAllocation => match ext.kind {
                    ExtentKind::Data => 0,
                    ExtentKind::ZeroData => proto::STATE_ZERO,
                    ExtentKind::Zero | ExtentKind::Unallocated => proto::STATE_HOLE | proto::STATE_ZERO,
                },
                Context::AllocationDepth => match ext.kind {
                    ExtentKind::Unallocated => 0,
                    _ => depth + 1,
                },
            };
            match descriptors.last_mut() {
                Some((l, f)) if *f == flags && *l + len <= u32::MAX as u64 => *l += len,
                _ => descriptors.push((len, flags)),
            }
            at += len;
            if one {
                break;
            }
        }
        if one {
            descriptors.truncate(1);
        }
        for (len, flags) in descriptors {
            // A descriptor is at most 4 GiB - 1 bytes (the request length bounds it anyway).
            payload.extend_from_slice(&(len.min(u32::MAX as u64) as u32).to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        out.push(payload);
    }
    Ok(out)
}
