//! The I/O paths every mapped format shares: read, write, write-zeroes and block status.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use super::iov::{push_range, push_zeros, with_range_mut, zero};
use super::{DataWritten, Fill, FillSource, Holes, Mapped, MappedImage, Mapping, Unwritten, WritePlan, Zeroing};
use crate::driver::{check_request, Extent, ExtentKind, ZeroFlags};
use crate::error::{Error, Result};
use crate::storage::{iov_len, iov_len_mut, Storage};

/// Largest run of zeros written in one request by `write_zeroes`.
const ZERO_CHUNK: u64 = 1 << 20;

/// Reads `[offset, offset + len(bufs))` of the guest disk into `bufs`.
pub fn read<F: MappedImage>(f: &F, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
    let len = iov_len_mut(bufs);
    check_request(offset, len, f.size())?;
    read_inside(f, offset, len, bufs)
}

/// Writes `bufs` at guest `offset`.
pub fn write<F: MappedImage>(f: &F, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
    let len = iov_len(bufs);
    check_request(offset, len, f.size())?;
    writable(f)?;
    if len == 0 {
        return Ok(());
    }
    f.before_write()?;
    write_inside(f, offset, len, bufs)
}

/// Reads `[offset, offset + len(bufs))` of what the format maps, without checking the range
/// against the disk size: for areas a format keeps past the guest disk (qcow2's VM state) and
/// for callers that checked the range themselves.
pub fn read_mapped<F: MappedImage>(f: &F, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
    let len = iov_len_mut(bufs);
    crate::storage::checked_end(offset, len)?;
    read_inside(f, offset, len, bufs)
}

/// Writes `bufs` at `offset` of what the format maps, without checking the range against the
/// disk size (see [`read_mapped`]); the image must be writable. Copy-on-write fills read zeros
/// past the disk size.
pub fn write_mapped<F: MappedImage>(f: &F, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
    let len = iov_len(bufs);
    crate::storage::checked_end(offset, len)?;
    writable(f)?;
    if len == 0 {
        return Ok(());
    }
    f.before_write()?;
    write_inside(f, offset, len, bufs)
}

/// Makes `[offset, offset + len)` read as zeros: the format zeroes what it can in its metadata
/// ([`MappedImage::zero_range`]); of the rest, runs that already read as zeros are left alone and
/// the others get zeros written (refused with `Unsupported` under `no_fallback`).
pub fn write_zeroes<F: MappedImage>(f: &F, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    check_request(offset, len, f.size())?;
    writable(f)?;
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let (n, fallback) = match f.zero_range(at, end - at, flags)? {
            Zeroing::Done(n) => (n, false),
            Zeroing::Fallback(n) => (n, true),
        };
        if n == 0 || n > end - at {
            return Err(Error::corrupt(format!("{}: zeroing answered {n} bytes of {}", f.filename(), end - at)));
        }
        if fallback {
            zero_by_writing(f, at, n, flags)?;
        }
        at += n;
    }
    Ok(())
}

/// Describes the start of `[offset, offset + max_len)` from the same mapping reads use.
pub fn block_status<F: MappedImage>(f: &F, offset: u64, max_len: u64) -> Result<Extent> {
    let max_len = max_len.min(f.size().saturating_sub(offset));
    if max_len == 0 {
        return Err(Error::out_of_range(format!("block status at offset {offset} is past the end of the disk")));
    }
    let run = next_run(f, offset, max_len)?;
    let len = run.len;
    Ok(match run.mapping {
        Mapping::Zero => Extent::new(len, ExtentKind::Zero),
        Mapping::Unallocated => Extent::new(len, ExtentKind::Unallocated),
        Mapping::Reserved { storage, offset: at, reads } => {
            let kind = match reads {
                Unwritten::Zeros => ExtentKind::Zero,
                Unwritten::Backing => ExtentKind::Unallocated,
            };
            Extent::mapped(len, kind, storage.name().into(), at)
        }
        Mapping::Compressed { host } => Extent {
            len,
            kind: ExtentKind::Data,
            host: host.map(|(storage, at)| (storage.name().into(), at)),
            compressed: true,
        },
        Mapping::Data { storage, offset: at, holes } => data_status(storage.as_ref(), at, len, holes)?,
    })
}

/// The status of a data run of `len` bytes at `at` in `storage`, holes reported as `holes` says.
fn data_status(storage: &dyn Storage, at: u64, len: u64, holes: Holes) -> Result<Extent> {
    let (data, n, hole_kind) = match holes {
        Holes::Ignored => (true, len, ExtentKind::Data),
        Holes::AllocatedZeros => {
            let end = storage.len()?;
            let (data, n) = if at >= end { (false, len) } else { storage.data_status(at, len.min(end - at))? };
            (data, n, ExtentKind::ZeroData)
        }
        Holes::Container => {
            let (data, mut n) = storage.data_status(at, len)?;
            // Data that ends with an unaligned end of file covers the rest of the last aligned
            // block when the file needs aligned requests (O_DIRECT), as qemu rounds block status
            // to its request alignment; with byte-granular access the tail reads as a hole.
            let align = storage.alignment().request as u64;
            if data && align > 1 {
                let end = storage.len()?;
                if end % align != 0 && at + n == end {
                    n = (end.next_multiple_of(align) - at).min(len);
                }
            }
            (data, n, ExtentKind::Zero)
        }
    };
    let kind = if data { ExtentKind::Data } else { hole_kind };
    Ok(Extent::mapped(n.clamp(1, len), kind, storage.name().into(), at))
}

fn writable<F: MappedImage>(f: &F) -> Result<()> {
    if f.is_read_only() {
        return Err(Error::read_only().with_path(f.filename()));
    }
    Ok(())
}

/// The mapping of a non-empty prefix of `[at, at + max)`, at most `max` long.
fn next_run<F: MappedImage>(f: &F, at: u64, max: u64) -> Result<Mapped> {
    let mut run = f.map(at, max)?;
    if run.len == 0 {
        return Err(Error::corrupt(format!("{}: the format mapped no bytes at offset {at}", f.filename())));
    }
    run.len = run.len.min(max);
    Ok(run)
}

/// Reads a range known to lie inside the disk.
fn read_inside<F: MappedImage>(f: &F, offset: u64, len: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
    let mut done = 0;
    while done < len {
        let at = offset + done;
        let run = next_run(f, at, len - done)?;
        if run.len == len {
            // One run covers the request: the caller's list goes down as it is.
            return read_run(f, at, &run.mapping, bufs);
        }
        with_range_mut(bufs, done, run.len, |part| read_run(f, at, &run.mapping, part))?;
        done += run.len;
    }
    Ok(())
}

/// Reads guest bytes at `at`, mapped as `mapping`, into `bufs`.
fn read_run<F: MappedImage>(f: &F, at: u64, mapping: &Mapping, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
    match mapping {
        Mapping::Data { storage, offset: host, .. } => storage.read_at(*host, bufs),
        Mapping::Zero | Mapping::Reserved { reads: Unwritten::Zeros, .. } => {
            zero(bufs);
            Ok(())
        }
        Mapping::Unallocated | Mapping::Reserved { reads: Unwritten::Backing, .. } => read_backing(f, at, bufs),
        Mapping::Compressed { .. } => f.read_compressed(at, bufs),
    }
}

/// Reads guest bytes at `at` from the backing image: zeros past its end or without one.
pub fn read_backing<F: MappedImage>(f: &F, at: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
    let Some(backing) = f.backing() else {
        zero(bufs);
        return Ok(());
    };
    f.check_backing_read()?;
    let len = iov_len_mut(bufs);
    let have = backing.size().saturating_sub(at).min(len);
    if have == len {
        return backing.read_at(at, bufs);
    }
    if have > 0 {
        with_range_mut(bufs, 0, have, |part| backing.read_at(at, part))?;
    }
    with_range_mut(bufs, have, len - have, zero);
    Ok(())
}

/// Reads `buf.len()` guest bytes at `at`, zeros past the end of the disk.
fn read_clamped<F: MappedImage>(f: &F, at: u64, buf: &mut [u8], from_backing: bool) -> Result<()> {
    let have = f.size().saturating_sub(at).min(buf.len() as u64) as usize;
    let (inside, past) = buf.split_at_mut(have);
    past.fill(0);
    if have == 0 {
        return Ok(());
    }
    let bufs = &mut [IoSliceMut::new(inside)];
    if from_backing {
        read_backing(f, at, bufs)
    } else {
        read_inside(f, at, have as u64, bufs)
    }
}

/// Writes a range known to lie inside a writable disk, widened to whole sectors for formats
/// that track them.
fn write_inside<F: MappedImage>(f: &F, offset: u64, len: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
    let Some(granularity) = f.granularity() else {
        return write_planned(f, offset, len, bufs);
    };
    let sector = granularity.bytes();
    let start = offset - offset % sector;
    let end = (offset + len).next_multiple_of(sector);
    let _sectors = granularity.lock.lock(start, end);
    if start == offset && end == offset + len {
        return write_planned(f, offset, len, bufs);
    }
    let mut head = vec![0u8; (offset - start) as usize];
    read_clamped(f, start, &mut head, false)?;
    let mut tail = vec![0u8; (end - offset - len) as usize];
    read_clamped(f, offset + len, &mut tail, false)?;
    let mut whole = Vec::with_capacity(bufs.len() + 2);
    whole.push(IoSlice::new(&head));
    whole.extend(bufs.iter().map(|b| IoSlice::new(b)));
    whole.push(IoSlice::new(&tail));
    write_planned(f, start, end - start, &whole)
}

/// Writes plan by plan: prepare, write the data (and fill), commit.
fn write_planned<F: MappedImage>(f: &F, offset: u64, len: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
    let mut done = 0;
    while done < len {
        let at = offset + done;
        let WritePlan { len: n, storage, host, fill, pending } = f.prepare_write(at, len - done)?;
        if n == 0 || n > len - done {
            return Err(Error::corrupt(format!(
                "{}: a write was planned for {n} bytes of {}",
                f.filename(),
                len - done
            )));
        }
        write_data(f, at, n, (&storage, host), fill, bufs, done)?;
        f.commit_write(pending, DataWritten(()))?;
        done += n;
    }
    Ok(())
}

/// Writes bytes `[from, from + n)` of `bufs` (guest offset `at`) to `host` in `storage`, with
/// the fill of a fresh unit around them.
fn write_data<F: MappedImage>(
    f: &F,
    at: u64,
    n: u64,
    (storage, host): (&Arc<dyn Storage>, u64),
    fill: Option<Fill>,
    bufs: &[IoSlice<'_>],
    from: u64,
) -> Result<()> {
    let (head, tail) = match fill {
        Some(fill) => {
            let inside = fill.guest_start <= at
                && at + n <= fill.guest_start + fill.len
                && host == fill.host_start + (at - fill.guest_start);
            if !inside {
                return Err(Error::corrupt(format!("{}: a write was planned outside its fresh unit", f.filename())));
            }
            (at - fill.guest_start, fill.guest_start + fill.len - (at + n))
        }
        None => (0, 0),
    };
    let fill = match fill {
        Some(fill) if head + tail > 0 => Some(fill),
        Some(fill) => {
            // The request covers its fresh unit whole: nothing to fill, but fresh space is
            // still reserved before it is written.
            if fill.fresh_space {
                storage.reserve(fill.host_start, fill.len);
            }
            None
        }
        None => None,
    };
    if fill.is_none() && from == 0 && n == iov_len(bufs) {
        // The plan covers the request: the caller's list goes down as it is.
        return storage.write_at(host, bufs);
    }
    let mut list: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len() + 2);
    let fill = match fill {
        Some(fill) => fill,
        None => {
            push_range(bufs, from, n, &mut list);
            return storage.write_at(host, &list);
        }
    };
    let source = match fill.source {
        FillSource::Backing if f.backing().is_none() => FillSource::Zeros,
        source => source,
    };
    if source == FillSource::Zeros && storage.zero_without_writing(fill.host_start, fill.len) {
        push_range(bufs, from, n, &mut list);
        return storage.write_at(host, &list);
    }
    let (mut head_bytes, mut tail_bytes) = (Vec::new(), Vec::new());
    if source == FillSource::Zeros {
        push_zeros(head, &mut list);
        push_range(bufs, from, n, &mut list);
        push_zeros(tail, &mut list);
    } else {
        let from_backing = source == FillSource::Backing;
        head_bytes.resize(head as usize, 0);
        read_clamped(f, fill.guest_start, &mut head_bytes, from_backing)?;
        tail_bytes.resize(tail as usize, 0);
        read_clamped(f, at + n, &mut tail_bytes, from_backing)?;
        if fill.fresh_space
            && crate::buffer::is_zero(&head_bytes)
            && crate::buffer::is_zero(&tail_bytes)
            && storage.zero_without_writing(fill.host_start, fill.len)
        {
            // Nothing to carry over after all: only the request is written.
            push_range(bufs, from, n, &mut list);
            return storage.write_at(host, &list);
        }
        list.push(IoSlice::new(&head_bytes));
        push_range(bufs, from, n, &mut list);
        list.push(IoSlice::new(&tail_bytes));
    }
    if fill.fresh_space {
        storage.reserve(fill.host_start, fill.len);
    }
    storage.write_at(fill.host_start, &list)
}

/// The fallback of `write_zeroes`: zeros written over every run that does not read as zeros.
fn zero_by_writing<F: MappedImage>(f: &F, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
    let mut done = 0;
    while done < len {
        let at = offset + done;
        let run = next_run(f, at, len - done)?;
        let reads_zeros = match run.mapping {
            Mapping::Zero | Mapping::Reserved { reads: Unwritten::Zeros, .. } => true,
            Mapping::Unallocated | Mapping::Reserved { reads: Unwritten::Backing, .. } => f.backing().is_none(),
            _ => false,
        };
        if !reads_zeros {
            if flags.no_fallback {
                return Err(Error::unsupported(format!(
                    "{}: {} cannot zero this range without writing data",
                    f.filename(),
                    f.format()
                )));
            }
            f.before_write()?;
            let mut z = 0;
            while z < run.len {
                let n = (run.len - z).min(ZERO_CHUNK);
                let mut zeros = Vec::new();
                push_zeros(n, &mut zeros);
                write_inside(f, at + z, n, &zeros)?;
                z += n;
            }
        }
        done += run.len;
    }
    Ok(())
}
