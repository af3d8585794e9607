//! Turning a descriptor chain into a virtio-blk request, enforcing the specification's rules.
//!
//! A chain is device-readable descriptors, then device-writable ones (a readable descriptor
//! after a writable one is an error). The readable bytes start with the 16-byte header (type,
//! reserved, sector), which may span descriptors; the last writable byte is the status. What lies
//! between is the request's data: readable for OUT, DISCARD and WRITE_ZEROES, writable for IN and
//! GET_ID. Every descriptor's range must lie in guest memory with the access its direction
//! needs; the chain's length is bounded by the queue size (the chain iterator's own limit) and by
//! [`MAX_DESCRIPTORS`]; lengths are summed in u64. Nothing here touches the image.

use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// Most descriptors accepted in one chain (the largest queue size virtio allows).
pub const MAX_DESCRIPTORS: usize = 32768;
/// Size of the request header.
pub const HEADER_LEN: u64 = 16;

/// Request types.
pub mod kind {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// One descriptor, as the chain gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A run of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// Why a chain is not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// No writable byte for the status.
    NoStatus,
    /// Fewer than 16 readable bytes.
    ShortHeader,
    /// A readable descriptor after a writable one.
    ReadableAfterWritable,
    /// A descriptor outside guest memory (or without the access it needs).
    BadAddress,
    /// More descriptors than any queue holds.
    TooLong,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request type (see [`kind`]).
    pub kind: u32,
    /// The first sector (512 bytes) for IN and OUT.
    pub sector: u64,
    /// Readable data after the header.
    pub readable: Vec<Segment>,
    /// Writable data before the status byte.
    pub writable: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes of readable data.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| s.len).sum()
    }

    /// Total bytes of writable data.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| s.len).sum()
    }
}

/// Copies `buf.len()` bytes starting `skip` bytes into `segs` out of guest memory.
pub fn read_from<M: GuestMemory>(mem: &M, segs: &[Segment], mut skip: u64, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = ((s.len - skip) as usize).min(buf.len() - done);
        let Some(addr) = s.addr.0.checked_add(skip) else { return false };
        if !read_guest(mem, GuestAddress(addr), &mut buf[done..done + n]) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

/// Reads guest bytes at `addr` (possibly across regions).
pub fn read_guest<M: GuestMemory>(mem: &M, addr: GuestAddress, buf: &mut [u8]) -> bool {
    let Ok(slices) = mem.get_slices(addr, buf.len(), Permissions::Read) else { return false };
    let mut at = 0;
    for s in slices {
        let Ok(s) = s else { return false };
        let n = s.len();
        if s.copy_to(&mut buf[at..at + n]) != n {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

/// Writes `data` to guest memory at `addr`.
pub fn write_guest<M: GuestMemory>(mem: &M, addr: GuestAddress, data: &[u8]) -> bool {
    let Ok(slices) = mem.get_slices(addr, data.len(), Permissions::Write) else { return false };
    let mut at = 0;
    for s in slices {
        let Ok(s) = s else { return false };
        let n = s.len();
        s.copy_from(&data[at..at + n]);
        at += n;
    }
    at == data.len()
}

/// The status byte's address in a chain, if it has a writable byte in guest memory: what an
/// error status can be reported through even when the rest of the chain is bad.
pub fn status_address<M: GuestMemory>(descs: &[Desc], mem: &M) -> Option<GuestAddress> {
    let last = descs.iter().rev().find(|d| d.write && d.len > 0)?;
    let addr = GuestAddress(last.addr.checked_add(last.len as u64 - 1)?);
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

/// Parses the chain `descs` (in chain order).
pub fn parse<M: GuestMemory>(descs: &[Desc], mem: &M) -> Result<Request, ChainError> {
    if descs.len() > MAX_DESCRIPTORS {
        return Err(ChainError::TooLong);
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        if d.len == 0 {
            continue;
        }
        let access = if d.write { Permissions::Write } else { Permissions::Read };
        if d.addr.checked_add(d.len as u64).is_none() || !mem.check_range(GuestAddress(d.addr), d.len as usize, access)
        {
            return Err(ChainError::BadAddress);
        }
        let seg = Segment { addr: GuestAddress(d.addr), len: d.len as u64 };
        if d.write {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            readable.push(seg);
        }
    }
    // The status: the last writable byte.
    let last = writable.last_mut().ok_or(ChainError::NoStatus)?;
    let status = GuestAddress(last.addr.0 + last.len - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    // The header: the first 16 readable bytes.
    let mut header = [0u8; HEADER_LEN as usize];
    if !read_from(mem, &readable, 0, &mut header) {
        return Err(ChainError::ShortHeader);
    }
    let mut skip = HEADER_LEN;
    let mut data = Vec::with_capacity(readable.len());
    for s in readable {
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        data.push(Segment { addr: GuestAddress(s.addr.0 + skip), len: s.len - skip });
        skip = 0;
    }
    Ok(Request {
        kind: u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")),
        sector: u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")),
        readable: data,
        writable,
        status,
    })
}
