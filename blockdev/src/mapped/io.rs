//! The I/O paths every mapped format shares: read, write, write-zeroes and block status.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use super::iov::{push_range, push_zeros, with_range_mut, zero};
use super::{DataWritten, Fill, FillSource, Mapped, MappedImage, Mapping, WritePlan, Zeroing};
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
        Mapping::Compressed { host } => Extent {
            len,
            kind: ExtentKind::Data,
            host: host.map(|(storage, at)| (storage.name().into(), at)),
            compressed: true,
        },
        Mapping::Data { storage, offset: at, probe_holes: false } => {
            Extent::mapped(len, ExtentKind::Data, storage.name().into(), at)
        }
        Mapping::Data { storage, offset: at, probe_holes: true } => {
            // As qemu, the container's holes show as zeros (allocated, reading zeros).
            let (data, len) = match storage.len()? {
                end if at >= end => (false, len),
                end => {
                    let (data, n) = storage.data_status(at, len.min(end - at))?;
                    (data, n.clamp(1, len))
                }
            };
            let kind = if data { ExtentKind::Data } else { ExtentKind::ZeroData };
            Extent::mapped(len, kind, storage.name().into(), at)
        }
    })
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
        with_range_mut(bufs, done, run.len, |part| match &run.mapping {
            Mapping::Data { storage, offset: host, .. } => storage.read_at(*host, part),
            Mapping::Zero => {
                zero(part);
                Ok(())
            }
            Mapping::Unallocated => read_backing(f, at, part),
            Mapping::Compressed { .. } => f.read_compressed(at, part),
        })?;
        done += run.len;
    }
    Ok(())
}

/// Reads guest bytes at `at` from the backing image: zeros past its end or without one.
fn read_backing<F: MappedImage>(f: &F, at: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
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
    let mut list: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len() + 2);
    let fill = match fill {
        Some(fill) if head + tail > 0 => fill,
        _ => {
            push_range(bufs, from, n, &mut list);
            return storage.write_at(host, &list);
        }
    };
    let source = match fill.source {
        FillSource::Backing if f.backing().is_some() => FillSource::Backing,
        _ => FillSource::Zeros,
    };
    if source == FillSource::Zeros && storage.zero_without_writing(fill.host_start, fill.len) {
        push_range(bufs, from, n, &mut list);
        return storage.write_at(host, &list);
    }
    let (mut head_bytes, mut tail_bytes) = (Vec::new(), Vec::new());
    if source == FillSource::Backing {
        head_bytes.resize(head as usize, 0);
        read_clamped(f, fill.guest_start, &mut head_bytes, true)?;
        tail_bytes.resize(tail as usize, 0);
        read_clamped(f, at + n, &mut tail_bytes, true)?;
        list.push(IoSlice::new(&head_bytes));
        push_range(bufs, from, n, &mut list);
        list.push(IoSlice::new(&tail_bytes));
    } else {
        push_zeros(head, &mut list);
        push_range(bufs, from, n, &mut list);
        push_zeros(tail, &mut list);
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
            Mapping::Zero => true,
            Mapping::Unallocated => f.backing().is_none(),
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
