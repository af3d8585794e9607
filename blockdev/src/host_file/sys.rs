//! Thin, safe wrappers over the Linux system calls a host file needs.
//!
//! Each wrapper loops over partial transfers and `EINTR` where the call is restartable, and turns
//! failures into [`Error`] values tagged with the operation. Nothing here allocates per call except
//! the temporary iovec list when a request has more than `IOV_MAX` buffers.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;

use crate::error::{Error, Result};

/// Linux's limit on iovecs per call.
const IOV_MAX: usize = 1024;

fn last_os_error(op: &'static str) -> Error {
    Error::from_io(op, io::Error::last_os_error())
}

/// `preadv` until every buffer is full or EOF is reached; returns the bytes read.
pub fn preadv_full(fd: RawFd, mut offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<u64> {
    let mut total = 0u64;
    let mut index = 0usize; // first buffer not yet full
    let mut skip = 0usize; // bytes already filled in bufs[index]
    while index < bufs.len() {
        if bufs[index].len() == skip {
            index += 1;
            skip = 0;
            continue;
        }
        let end = (index + IOV_MAX).min(bufs.len());
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(end - index);
        for (i, b) in bufs[index..end].iter_mut().enumerate() {
            let s = if i == 0 { skip } else { 0 };
            // SAFETY: `s <= b.len()`, so the pointer stays inside the buffer.
            let base = unsafe { b.as_mut_ptr().add(s) };
            iov.push(libc::iovec { iov_base: base.cast(), iov_len: b.len() - s });
        }
        // SAFETY: every iovec points into a live, exclusively borrowed buffer of the stated length.
        let n = unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, offset as libc::off_t) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::from_io("read", err).with_offset(offset));
        }
        if n == 0 {
            break;
        }
        let mut n = n as usize;
        total += n as u64;
        offset += n as u64;
        while n > 0 && index < bufs.len() {
            let room = bufs[index].len() - skip;
            if n >= room {
                n -= room;
                index += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(total)
}

/// `pwritev` until everything is written.
pub fn pwritev_full(fd: RawFd, mut offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
    let mut index = 0usize;
    let mut skip = 0usize;
    while index < bufs.len() {
        if bufs[index].len() == skip {
            index += 1;
            skip = 0;
            continue;
        }
        let end = (index + IOV_MAX).min(bufs.len());
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(end - index);
        for (i, b) in bufs[index..end].iter().enumerate() {
            let s = if i == 0 { skip } else { 0 };
            // SAFETY: `s <= b.len()`; the kernel only reads through this pointer.
            let base = unsafe { b.as_ptr().add(s) };
            iov.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: b.len() - s });
        }
        // SAFETY: every iovec points into a live buffer of the stated length.
        let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, offset as libc::off_t) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::from_io("write", err).with_offset(offset));
        }
        if n == 0 {
            return Err(Error::from_errno("write", libc::EIO).with_offset(offset));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && index < bufs.len() {
            let room = bufs[index].len() - skip;
            if n >= room {
                n -= room;
                index += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// `fallocate(2)`; returns the raw errno on failure so callers can fall back on `EOPNOTSUPP`.
pub fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> std::result::Result<(), i32> {
    loop {
        // SAFETY: plain system call on a descriptor we own.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`; `Ok(None)` on `ENXIO` (no data/hole after `offset`).
pub fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> std::result::Result<Option<u64>, i32> {
    // SAFETY: lseek only changes the descriptor's position, which vdisk never uses for I/O.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if e == libc::ENXIO {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// `sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`: starts writeback of the range's dirty
/// pages without waiting for it. Only a hint; failures are ignored.
pub fn start_writeback(fd: RawFd, offset: u64, len: u64) {
    // SAFETY: plain system call on a descriptor we own.
    unsafe { libc::sync_file_range(fd, offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
}

/// `fdatasync(2)`.
pub fn fdatasync(fd: RawFd) -> Result<()> {
    loop {
        // SAFETY: plain system call on a descriptor we own.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(Error::from_io("flush", err));
        }
    }
}

/// `copy_file_range(2)` between two descriptors; the raw errno on failure.
pub fn copy_file_range(src: RawFd, src_off: u64, dst: RawFd, dst_off: u64, len: u64) -> std::result::Result<u64, i32> {
    let mut so = src_off as libc::loff_t;
    let mut d = dst_off as libc::loff_t;
    let chunk = len.min(1 << 30) as usize;
    loop {
        // SAFETY: the offsets are passed by pointer to locals; the kernel copies between our descriptors.
        let r = unsafe { libc::copy_file_range(src, &mut so, dst, &mut d, chunk, 0) };
        if r >= 0 {
            return Ok(r as u64);
        }
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// `fstat(2)`.
pub fn fstat(fd: RawFd) -> Result<libc::stat> {
    // SAFETY: `stat` is plain data; zeroed is a valid bit pattern and fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(last_os_error("stat"));
    }
    Ok(st)
}

/// Size of a block device in bytes (`BLKGETSIZE64`).
pub fn block_device_size(fd: RawFd) -> Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 through the pointer.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) } != 0 {
        return Err(last_os_error("ioctl"));
    }
    Ok(size)
}

/// The direct-I/O alignment of an open file: (offset alignment, memory alignment), from `statx`
/// where the kernel reports it.
pub fn dio_alignment(fd: RawFd) -> Option<(u32, u32)> {
    const STATX_DIOALIGN: u32 = 0x2000;
    // SAFETY: statx is plain data; zeroed is valid and the kernel fills it.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = b"\0";
    // SAFETY: AT_EMPTY_PATH with an empty C string queries the descriptor itself.
    let r = unsafe { libc::statx(fd, empty.as_ptr().cast(), libc::AT_EMPTY_PATH, STATX_DIOALIGN, &mut stx) };
    if r != 0 || stx.stx_mask & STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align.max(1)))
}

/// Applies or tests an OFD byte-range lock. `op` is `F_OFD_SETLK` or `F_OFD_GETLK`; for GETLK the
/// returned type tells whether somebody else holds a conflicting lock.
pub fn ofd_lock(
    fd: RawFd,
    op: libc::c_int,
    start: u64,
    kind: libc::c_short,
) -> std::result::Result<libc::c_short, i32> {
    // SAFETY: flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0;
    loop {
        // SAFETY: `fl` is a valid flock for the duration of the call.
        let r = unsafe { libc::fcntl(fd, op, &mut fl) };
        if r != -1 {
            return Ok(fl.l_type);
        }
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return Err(e);
        }
    }
}
