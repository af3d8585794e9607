//! Comparing two disks as qemu-img's `compare` does, with parallel reads.
//!
//! The range both disks share is walked with block status over each whole backing chain. Ranges
//! zero in both are skipped; ranges allocated in both are read from both and compared; a range
//! allocated in only one is read there and must be zeros. The part where the larger disk goes on
//! must be zeros too (or unallocated). Workers take chunks in order and read in parallel; the result
//! is always the *first* difference, whatever order the workers finish in.

use std::io::IoSliceMut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::buffer::{is_zero, AlignedBuf};
use crate::driver::{chain_status, BlockDriver, ExtentKind};
use crate::error::Error;

/// Largest chunk read at once (qemu-img's IO_BUF_SIZE).
const CHUNK: u64 = 1 << 20;

/// What a comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same content.
    Identical,
    /// Same content where both exist; the sizes differ (the extra part is zeros).
    IdenticalSizesDiffer,
    /// The first differing byte.
    Mismatch(u64),
    /// Strict mode: the sizes differ.
    StrictSizeMismatch,
    /// Strict mode: allocation differs at this offset.
    StrictStatusMismatch(u64),
}

/// Why a comparison could not finish; `which` is 1 or 2 (the first or second disk).
#[derive(Debug)]
pub enum Failure {
    /// Block status failed (qemu-img exit code 3).
    Status {
        /// Which disk.
        which: u8,
        /// The error.
        error: Error,
    },
    /// Reading failed (exit code 4).
    Read {
        /// Which disk.
        which: u8,
        /// Where.
        offset: u64,
        /// The error.
        error: Error,
    },
}

/// Status flags as qemu's `bdrv_block_status_above` reports them (for strict mode and the plan).
///
/// Strict mode compares them all, `eof` included: qemu sets `BDRV_BLOCK_EOF` on the extent that
/// reaches the end of the disk, so two disks whose last extents start at the same offset but
/// end at different places (one reaches the end, the other does not) differ there, even when
/// both extents are the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flags {
    data: bool,
    zero: bool,
    allocated: bool,
    offset_valid: bool,
    eof: bool,
}

/// The flags and length of the extent of `d` at `offset`; `max` is what is left of the disk.
fn flags(d: &dyn BlockDriver, offset: u64, max: u64) -> crate::Result<(Flags, u64)> {
    let (e, _) = chain_status(d, offset, max)?;
    let len = e.len.clamp(1, max);
    let (data, zero, allocated, offset_valid) = match e.kind {
        ExtentKind::Data => (true, false, true, e.host.is_some()),
        ExtentKind::Zero => (false, true, true, e.host.is_some()),
        ExtentKind::ZeroData => (true, true, true, e.host.is_some()),
        ExtentKind::Unallocated => (false, true, false, false),
    };
    Ok((Flags { data, zero, allocated, offset_valid, eof: len == max }, len))
}

#[derive(Debug, Clone, Copy)]
enum Job {
    /// Read both and compare.
    Both(u64, u64),
    /// Read disk `which` and check for zeros.
    One(u8, u64, u64),
}

/// Compares `a` and `b`. `progress(bytes)` is called as chunks are decided.
pub fn compare(
    a: &dyn BlockDriver,
    b: &dyn BlockDriver,
    strict: bool,
    workers: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Outcome, Failure> {
    let (s1, s2) = (a.size(), b.size());
    if strict && s1 != s2 {
        return Ok(Outcome::StrictSizeMismatch);
    }
    let common = s1.min(s2);
    let disks = [a, b];
    // The planner walks block status in order; workers execute jobs.
    struct Plan {
        offset: u64,
        phase2: bool,
    }
    let plan = Mutex::new(Plan { offset: 0, phase2: false });
    let first_diff = AtomicU64::new(u64::MAX);
    let failure: Mutex<Option<(u64, Failure)>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let strict_diff = AtomicU64::new(u64::MAX);
    let larger = if s1 > s2 { 0usize } else { 1 };
    let total = s1.max(s2);

    let next_job = || -> Result<Option<(u64, Job)>, Failure> {
        let mut p = plan.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let off = p.offset;
            if stop.load(Ordering::SeqCst) || off >= first_diff.load(Ordering::SeqCst) {
                return Ok(None);
            }
            if !p.phase2 {
                if off >= common {
                    p.phase2 = true;
                    continue;
                }
                let (f1, n1) = flags(a, off, s1 - off).map_err(|error| Failure::Status { which: 1, error })?;
                let (f2, n2) = flags(b, off, s2 - off).map_err(|error| Failure::Status { which: 2, error })?;
                let mut n = n1.min(n2).min(common - off);
                if strict && f1 != f2 {
                    strict_diff.store(off, Ordering::SeqCst);
                    stop.store(true, Ordering::SeqCst);
                    return Ok(None);
                }
                let job = if f1.zero && f2.zero {
                    None
                } else if f1.allocated == f2.allocated {
                    if f1.allocated {
                        n = n.min(CHUNK);
                        Some(Job::Both(off, n))
                    } else {
                        None
                    }
                } else {
                    n = n.min(CHUNK);
                    Some(Job::One(if f1.allocated { 0 } else { 1 }, off, n))
                };
                p.offset += n;
                progress(n);
                if let Some(j) = job {
                    return Ok(Some((off, j)));
                }
            } else {
                if off >= total {
                    return Ok(None);
                }
                let d = disks[larger];
                let (f, n) =
                    flags(d, off, total - off).map_err(|error| Failure::Status { which: larger as u8 + 1, error })?;
                let mut n = n;
                let job = if f.allocated && !f.zero {
                    n = n.min(CHUNK);
                    Some(Job::One(larger as u8, off, n))
                } else {
                    None
                };
                p.offset += n;
                progress(n);
                if let Some(j) = job {
                    return Ok(Some((off, j)));
                }
            }
        }
    };

    let read = |which: u8, off: u64, buf: &mut [u8]| -> Result<(), Failure> {
        disks[which as usize].read_at(off, &mut [IoSliceMut::new(buf)]).map_err(|error| Failure::Read {
            which: which + 1,
            offset: off,
            error,
        })
    };

    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, 16) {
            scope.spawn(|| {
                let mut b1 = AlignedBuf::new(CHUNK as usize, 4096);
                let mut b2 = AlignedBuf::new(CHUNK as usize, 4096);
                loop {
                    let job = match next_job() {
                        Ok(Some((_, j))) => j,
                        Ok(None) => return,
                        Err(f) => {
                            record(&failure, &stop, 0, f);
                            return;
                        }
                    };
                    let result = match job {
                        Job::Both(off, n) => {
                            let (x, y) = (&mut b1[..n as usize], &mut b2[..n as usize]);
                            read(0, off, x).and_then(|()| read(1, off, y)).map(|()| {
                                // Equal slices compare with memcmp; only a mismatch is located.
                                if x == y {
                                    return None;
                                }
                                x.iter()
                                    .zip(y.iter())
                                    .position(|(p, q)| p != q)
                                    .map(|i| off + first_sector_diff(i as u64))
                            })
                        }
                        Job::One(which, off, n) => {
                            let x = &mut b1[..n as usize];
                            read(which, off, x).map(|()| {
                                if is_zero(x) {
                                    None
                                } else {
                                    x.iter().position(|&c| c != 0).map(|i| off + first_sector_diff(i as u64))
                                }
                            })
                        }
                    };
                    match result {
                        Ok(Some(at)) => {
                            first_diff.fetch_min(at, Ordering::SeqCst);
                        }
                        Ok(None) => {}
                        Err(f) => {
                            let at = match &f {
                                Failure::Read { offset, .. } => *offset,
                                Failure::Status { .. } => 0,
                            };
                            record(&failure, &stop, at, f);
                            return;
                        }
                    }
                }
            });
        }
    });
    let diff = first_diff.load(Ordering::SeqCst);
    if let Some((at, f)) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        if at < diff {
            return Err(f);
        }
    }
    let sd = strict_diff.load(Ordering::SeqCst);
    if sd != u64::MAX && sd <= diff {
        return Ok(Outcome::StrictStatusMismatch(sd));
    }
    if diff != u64::MAX {
        return Ok(Outcome::Mismatch(diff));
    }
    Ok(if s1 != s2 { Outcome::IdenticalSizesDiffer } else { Outcome::Identical })
}

/// qemu-img reports differences at sector granularity: the start of the first differing (or
/// non-zero) 512-byte sector.
fn first_sector_diff(i: u64) -> u64 {
    i / 512 * 512
}

fn record(slot: &Mutex<Option<(u64, Failure)>>, stop: &AtomicBool, at: u64, f: Failure) {
    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
    if s.as_ref().is_none_or(|(old, _)| at < *old) {
        *s = Some((at, f));
    }
    stop.store(true, Ordering::SeqCst);
}
