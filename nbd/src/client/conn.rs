//! One connection in transmission phase: a request sent, its whole reply read and checked.
//!
//! Every reply chunk must carry the cookie of the request in flight and stay inside it; a read
//! succeeds only when data and hole chunks delivered each of its bytes exactly once; at most
//! [`MAX_CHUNKS`] chunks make one reply.

use std::collections::BTreeMap;
use std::io::{self, BufReader, IoSlice, IoSliceMut, Read, Write};

use blockdev::Error;

use super::negotiate::ExportInfo;
use crate::proto::{self, chunk};

/// Most chunks accepted in one structured reply (a read of 32 MiB in 512-byte chunks).
const MAX_CHUNKS: usize = 1 << 16;

/// A protocol violation by the server.
pub(super) fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD server broke the protocol: {}", what.into()))
}

/// The block-layer error for a failed socket operation (timeouts and a closed connection get
/// their own words).
pub(super) fn io_err(operation: &'static str, e: io::Error) -> Error {
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

/// One negotiated connection in transmission phase.
pub(super) struct Conn {
    /// The server's side of the stream.
    pub(super) r: BufReader<Box<dyn Read + Send>>,
    /// The client's side.
    pub(super) w: Box<dyn Write + Send>,
    /// The cookie of the next request.
    pub(super) next_cookie: u64,
}

/// One request's header fields.
#[derive(Debug, Clone, Copy)]
pub(super) struct Req {
    /// The command.
    pub(super) command: u16,
    /// Its flags.
    pub(super) flags: u16,
    /// Export offset.
    pub(super) offset: u64,
    /// Length.
    pub(super) len: u32,
}

/// Where a reply's bytes go.
pub(super) enum Sink<'a, 'b> {
    /// No payload expected.
    None,
    /// A read: `bufs` holds the request's bytes in order.
    Read(&'a mut [IoSliceMut<'b>]),
    /// Block status: the first extent of the context (length, flags).
    Status(u32, &'a mut Option<(u32, u32)>),
}

/// The pieces of `[start, start+len)` (counted across slices of the lengths `lens`): slice
/// index and range inside that slice; `None` if the range runs past the slices.
pub(super) fn spans(
    lens: impl Iterator<Item = usize>,
    mut start: usize,
    mut len: usize,
) -> Option<Vec<(usize, usize, usize)>> {
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
pub(super) fn for_each_segment(
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
    pub(super) fn request(
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
