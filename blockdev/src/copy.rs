//! The copy engine behind `convert`, `dd`, `commit` and `rebase`.
//!
//! A copy walks the source with block status, so holes are never read: each run becomes a job that
//! is *data* (read, zero-detected, written), *zero* (skipped when the target already reads as
//! zeros, otherwise written as efficient zeroes) or *skip* (left unallocated so a backing file shows
//! through). Jobs are handed out in order by one planner; a pool of worker threads performs them in
//! parallel. In-order mode (qemu-img's default) lets reads overlap but issues writes strictly in job
//! order, which keeps allocating formats laid out sequentially; out-of-order mode (`-W`) writes as
//! soon as data is ready.
//!
//! Zero detection follows qemu-img's rule so that targets come out with the same allocation: a data
//! buffer is scanned in 512-byte sectors, zero runs are only left out when at least `min_sparse`
//! long, and run ends are aligned to the target's alignment so no write needs a read-modify-write.
//!
//! Invariants: every byte of the requested range is accounted for by exactly one job; an error in
//! any worker stops the others at their next job and is returned; memory is bounded by
//! `workers * buf_size`.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::buffer::{is_zero, AlignedBuf};
use crate::driver::{chain_status, BlockDriver, ExtentKind, ZeroFlags};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// One compressed-write unit ready to store: `None` for a zero unit left out, else its
/// compressed form (`None` inside when compression did not make it smaller).
type PackedUnit = Option<Option<Vec<u8>>>;

/// Largest data job when compressing: compressed output is held per job until its turn to be
/// written, so jobs stay small to keep memory near qemu-img's.
const COMPRESS_JOB_BYTES: u64 = 256 << 10;

/// Default size of one data job (qemu-img's IO_BUF_SIZE).
pub const DEFAULT_BUF_SIZE: usize = 2 << 20;

/// Bytes of data buffers a copy holds at once when its caller sizes jobs with
/// [`budget_buf_size`]: well below what qemu-img's coroutine buffers touch (eight of 2 MiB on
/// raw sources; 64 KiB each on sparse VMDK sources, whose block status ends at every grain).
pub const COPY_BUFFER_BUDGET: usize = 2 << 20;

/// Smallest job [`budget_buf_size`] picks.
const MIN_BUDGET_JOB: usize = 256 << 10;

/// The data job size that keeps `workers` buffers within [`COPY_BUFFER_BUDGET`]: a power of two
/// between 256 KiB and [`DEFAULT_BUF_SIZE`]. Jobs smaller than a target's clusters or blocks cost
/// little: the first job into a fresh cluster has the file zero it (no bytes written for the
/// rest), the next ones write in place.
pub fn budget_buf_size(workers: usize) -> usize {
    let share = COPY_BUFFER_BUDGET / workers.max(1);
    let pow2 = if share == 0 { MIN_BUDGET_JOB } else { 1usize << (usize::BITS - 1 - share.leading_zeros()) };
    pow2.clamp(MIN_BUDGET_JOB, DEFAULT_BUF_SIZE)
}

/// Worker threads for a copy when the user names none: one per CPU, at least two (one can read
/// while the other writes) and at most qemu-img's eight coroutines. More threads than CPUs only
/// hold more buffers: the copies this engine runs are bound by memory copies and the CPU.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

const SECTOR: u64 = 512;

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Worker threads (qemu-img's `-m`, default 8).
    pub workers: usize,
    /// Issue writes in job order (qemu-img's default; `-W` turns it off).
    pub in_order: bool,
    /// Minimum length of a zero run inside data to leave out, in bytes (`-S`, default 4 KiB);
    /// 0 writes everything, zeros included, as data.
    pub min_sparse: u64,
    /// Write alignment for zero detection, in bytes (a power of two, at least 512).
    pub alignment: u64,
    /// Offload plain data runs with `copy_file_range` where both sides map 1:1 to files (`-C`).
    pub offload: bool,
    /// The target already reads as zeros everywhere (new image, or `--target-is-zero`).
    pub target_zeroed: bool,
    /// Only copy what the source chain allocates above this depth (1 = the top image alone, as
    /// `convert -B`; the depth of the base for `commit`); leave the rest alone. `None` copies the
    /// whole chain's view.
    pub above: Option<u32>,
    /// Largest data job, in bytes.
    pub buf_size: usize,
    /// Keep going past read errors: unreadable 512-byte sectors are written as zeros and reported
    /// through the warning callback (`--salvage`).
    pub salvage: bool,
    /// Look for zero runs inside data (qemu-img convert does; commit writes data as it is and only
    /// turns ranges the source marks as zero into zeroes).
    pub detect_zeroes: bool,
    /// Write data compressed, a whole target cluster at a time (`-c`); the target must implement
    /// [`crate::CompressedWrite`]. Clusters are compressed by the workers in parallel.
    pub compress: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            workers: 8,
            in_order: true,
            min_sparse: 4096,
            alignment: 4096,
            offload: false,
            target_zeroed: false,
            above: None,
            buf_size: DEFAULT_BUF_SIZE,
            salvage: false,
            compress: false,
            detect_zeroes: true,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written as data.
    pub written: u64,
    /// Bytes written as zeroes (write_zeroes calls).
    pub zeroed: u64,
    /// Bytes copied by offload.
    pub offloaded: u64,
    /// Bytes not written at all (holes on a zeroed target, skipped unallocated ranges).
    pub skipped: u64,
}

/// Progress as qemu-img counts it: bytes of data jobs handed out, out of all data in the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Data bytes handed to workers so far.
    pub done: u64,
    /// Data bytes in the whole copy (0 when counting was not asked for).
    pub total: u64,
}

/// One job for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Data,
    Zero,
    Skip,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    offset: u64, // relative to the start of the copy
    len: u64,
    kind: JobKind,
}

/// A source range, target range and the options: everything a copy needs.
pub struct Copy<'a> {
    /// Source disk (its backing chain is followed, down to `opts.above`).
    pub src: &'a dyn BlockDriver,
    /// First source byte.
    pub src_offset: u64,
    /// Target disk.
    pub dst: &'a dyn BlockDriver,
    /// First target byte.
    pub dst_offset: u64,
    /// Bytes to copy.
    pub len: u64,
    /// Options.
    pub opts: CopyOptions,
}

struct Planner<'a> {
    copy: &'a Copy<'a>,
    pos: u64,
    seq: u64,
    status: Option<(JobKind, u64)>, // kind and end of the current status run
    progress_done: u64,
    unit: Option<u64>, // compressed-write unit when compressing
}

impl Planner<'_> {
    fn classify(&self, offset: u64, max: u64) -> Result<(JobKind, u64)> {
        let c = self.copy;
        let src_pos = c.src_offset + offset;
        let (ext, depth) = match chain_status(c.src, src_pos, max) {
            Ok(s) => s,
            // Salvaging: if the map cannot be read, read the data itself, a sector at a time.
            Err(_) if c.opts.salvage => return Ok((JobKind::Data, max.min(SECTOR))),
            Err(e) => {
                let msg = format!("error while reading block status at offset {src_pos}: {}", e.message());
                return Err(e.with_message(msg));
            }
        };
        let len = ext.len.clamp(1, max);
        let below = c.opts.above.is_some_and(|limit| depth >= limit);
        let kind = match ext.kind {
            _ if below => JobKind::Skip,
            ExtentKind::Data => JobKind::Data,
            ExtentKind::Zero | ExtentKind::ZeroData => JobKind::Zero,
            ExtentKind::Unallocated if c.opts.above.is_some() => JobKind::Skip,
            ExtentKind::Unallocated => JobKind::Zero,
        };
        Ok((kind, len))
    }

    fn next(&mut self) -> Result<Option<Job>> {
        let c = self.copy;
        if self.pos >= c.len {
            return Ok(None);
        }
        let (kind, run_end) = match self.status {
            Some((k, end)) if end > self.pos => (k, end),
            _ => {
                let (k, len) = self.classify(self.pos, c.len - self.pos)?;
                self.status = Some((k, self.pos + len));
                (k, self.pos + len)
            }
        };
        let mut len = run_end - self.pos;
        let mut kind = kind;
        if let Some(unit) = self.unit {
            // Compressed targets are written in whole clusters: a run shorter than a cluster makes
            // the whole cluster data; longer runs end on a cluster boundary.
            if len < unit {
                len = unit.min(c.len - self.pos);
                kind = JobKind::Data;
            } else {
                len = len / unit * unit;
            }
        }
        let as_data = kind == JobKind::Data || (kind == JobKind::Zero && c.opts.min_sparse == 0);
        if as_data {
            // Data jobs end on multiples of the job size, so that after a run's first job every
            // job covers whole target clusters (no job shares a cluster with the next one, which
            // would make the target allocate it with one job and fill it in with another).
            let cap = c.job_capacity();
            len = len.min((self.pos / cap + 1) * cap - self.pos);
        }
        let job = Job { seq: self.seq, offset: self.pos, len, kind };
        self.seq += 1;
        self.pos += len;
        if as_data {
            self.progress_done += len;
        }
        Ok(Some(job))
    }
}

/// Bytes of data the copy will move (qemu-img's progress denominator).
pub fn count_data(copy: &Copy<'_>) -> Result<u64> {
    let mut p = Planner { copy, pos: 0, seq: 0, status: None, progress_done: 0, unit: copy.compress_unit() };
    while p.next()?.is_some() {}
    Ok(p.progress_done)
}

struct Shared<'a> {
    planner: Mutex<Planner<'a>>,
    next_write: Mutex<u64>,
    write_turn: Condvar,
    failed: AtomicBool,
    /// The failure of the job with the lowest offset (among jobs that failed before the workers
    /// stopped), so that the error reported does not depend on which worker was faster.
    error: Mutex<Option<(u64, Error)>>,
    stats: Mutex<CopyStats>,
    offload: AtomicBool,
    src_storage: Option<Arc<dyn Storage>>,
    dst_storage: Option<Arc<dyn Storage>>,
    ordered: bool,
}

impl Copy<'_> {
    /// Runs the copy. `progress` is called (from the worker that took the job) each time a data job
    /// is handed out; `cancel` is polled between jobs.
    /// `warn` receives salvage warnings. Errors read "error while reading at byte N: ..." or
    /// "error while writing at byte N: ...".
    pub fn run(
        &self,
        progress: &(dyn Fn(Progress) + Sync),
        warn: &(dyn Fn(&str) + Sync),
        cancel: &AtomicBool,
        total: u64,
    ) -> Result<CopyStats> {
        let src_storage = self.src.identity_storage();
        let dst_storage = self.dst.identity_storage();
        let offload = self.opts.offload && src_storage.is_some() && dst_storage.is_some();
        // Write order only shapes the layout of targets that allocate as they are written; a target
        // that maps 1:1 onto its file (raw) ends up identical either way, so its writes go out as
        // soon as they are ready.
        let ordered = self.opts.in_order && dst_storage.is_none();
        let shared = Shared {
            planner: Mutex::new(Planner {
                copy: self,
                pos: 0,
                seq: 0,
                status: None,
                progress_done: 0,
                unit: self.compress_unit(),
            }),
            next_write: Mutex::new(0),
            write_turn: Condvar::new(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            stats: Mutex::new(CopyStats::default()),
            offload: AtomicBool::new(offload),
            src_storage,
            dst_storage,
            ordered,
        };
        let mut workers = self.opts.workers.clamp(1, 64);
        if self.compress_unit().is_some() {
            // Compression is bound by the CPU: more workers than cores only hold more buffers.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            workers = workers.min(cores);
        }
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    if let Err((at, e)) = self.worker(&shared, progress, warn, cancel, total) {
                        let mut slot = shared.error.lock().unwrap_or_else(|p| p.into_inner());
                        if slot.as_ref().is_none_or(|(first, _)| at < *first) {
                            *slot = Some((at, e));
                        }
                        shared.failed.store(true, Ordering::SeqCst);
                        let _guard = shared.next_write.lock().unwrap_or_else(|p| p.into_inner());
                        shared.write_turn.notify_all();
                    }
                });
            }
        });
        if let Some((_, e)) = shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        if self.compress_unit().is_some() {
            if let Some(cw) = self.dst.compressed() {
                cw.finish_compressed()?;
            }
        }
        Ok(shared.stats.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    fn worker(
        &self,
        sh: &Shared<'_>,
        progress: &(dyn Fn(Progress) + Sync),
        warn: &(dyn Fn(&str) + Sync),
        cancel: &AtomicBool,
        total: u64,
    ) -> std::result::Result<(), (u64, Error)> {
        let mem_align = self.dst.storage().map(|s| s.alignment().memory).unwrap_or(1).max(4096) as usize;
        let mut buf: Option<AlignedBuf> = None;
        loop {
            if sh.failed.load(Ordering::SeqCst) {
                return Ok(());
            }
            if cancel.load(Ordering::Relaxed) {
                return Err((0, Error::cancelled()));
            }
            let job = {
                let mut p = sh.planner.lock().unwrap_or_else(|p| p.into_inner());
                let before = p.progress_done;
                let at = p.pos;
                let job = p.next().map_err(|e| (at, e))?;
                if p.progress_done != before {
                    progress(Progress { done: p.progress_done, total });
                }
                job
            };
            let Some(job) = job else { return Ok(()) };
            let failed_job = |e: Error| (job.offset, e);
            let as_data = job.kind == JobKind::Data || (job.kind == JobKind::Zero && self.opts.min_sparse == 0);
            let offload_now = job.kind == JobKind::Data && sh.offload.load(Ordering::Relaxed);
            let b = buf.get_or_insert_with(|| AlignedBuf::new(self.job_capacity() as usize, mem_align));
            if as_data && !offload_now {
                let data = &mut b[..job.len as usize];
                if job.kind == JobKind::Data {
                    self.read_job(job, data, warn).map_err(failed_job)?;
                    sh.add(|s| s.read += job.len);
                } else {
                    data.fill(0);
                }
            }
            let packed = match (self.compress_unit(), as_data) {
                (Some(unit), true) => Some(self.compress_job(&b[..job.len as usize], unit).map_err(failed_job)?),
                _ => None,
            };
            if sh.ordered && !self.wait_turn(sh, job.seq) {
                return Ok(());
            }
            let result = if let Some(units) = packed {
                self.write_compressed_job(sh, job, &b[..job.len as usize], units)
            } else if offload_now {
                self.offload_job(sh, job, b)
            } else if as_data {
                self.write_data(sh, job, &b[..job.len as usize])
            } else {
                self.write_zero_job(sh, job)
            };
            let result = result.map_err(|e| {
                let at = self.dst_offset + job.offset;
                let msg = format!("error while writing at byte {at}: {}", e.message());
                e.with_message(msg)
            });
            if sh.ordered {
                let mut next = sh.next_write.lock().unwrap_or_else(|p| p.into_inner());
                *next += 1;
                sh.write_turn.notify_all();
            }
            result.map_err(failed_job)?;
        }
    }

    /// Reads a data job; with salvage, falls back to single sectors and zero-fills unreadable ones.
    fn read_job(&self, job: Job, data: &mut [u8], warn: &(dyn Fn(&str) + Sync)) -> Result<()> {
        let start = self.src_offset + job.offset;
        let err = match self.src.read_at(start, &mut [IoSliceMut::new(data)]) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !self.opts.salvage {
            let msg = format!("error while reading at byte {start}: {}", err.message());
            return Err(err.with_message(msg));
        }
        for (i, sector) in data.chunks_mut(SECTOR as usize).enumerate() {
            let off = start + i as u64 * SECTOR;
            if let Err(e) = self.src.read_at(off, &mut [IoSliceMut::new(sector)]) {
                warn(&format!("error while reading offset {off}: {}", e.message()));
                sector.fill(0);
            }
        }
        Ok(())
    }

    /// The compressed-write unit when compressing.
    fn compress_unit(&self) -> Option<u64> {
        if !self.opts.compress {
            return None;
        }
        self.dst.compressed().map(|c| c.compressed_unit()).filter(|u| *u > 0)
    }

    /// Largest data job: the buffer size, or when compressing whole units up to
    /// [`COMPRESS_JOB_BYTES`] (at least one unit).
    fn job_capacity(&self) -> u64 {
        match self.compress_unit() {
            Some(u) => (COMPRESS_JOB_BYTES.min(self.opts.buf_size as u64) / u).max(1) * u,
            None => self.opts.buf_size as u64,
        }
    }

    /// Compresses each unit of a data job. Units are compressed at full size (the disk's last
    /// cluster may be partial: it is padded with zeros).
    fn compress_job(&self, data: &[u8], unit: u64) -> Result<Vec<PackedUnit>> {
        let cw = self
            .dst
            .compressed()
            .ok_or_else(|| Error::unsupported("Compression not supported for this file format"))?;
        data.chunks(unit as usize)
            .map(|chunk| {
                // Zero clusters are left out, unless -S 0 asked for everything to be written.
                if self.opts.min_sparse != 0 && is_zero(chunk) {
                    return Ok(None);
                }
                Ok(Some(cw.compress(&whole_unit(chunk, unit))?))
            })
            .collect()
    }

    fn write_compressed_job(&self, sh: &Shared<'_>, job: Job, data: &[u8], units: Vec<PackedUnit>) -> Result<()> {
        let cw = self
            .dst
            .compressed()
            .ok_or_else(|| Error::unsupported("Compression not supported for this file format"))?;
        let unit = cw.compressed_unit();
        for ((i, u), chunk) in units.into_iter().enumerate().zip(data.chunks(unit as usize)) {
            let off = self.dst_offset + job.offset + i as u64 * unit;
            let len = chunk.len() as u64;
            match u {
                None if self.opts.target_zeroed => sh.add(|s| s.skipped += len),
                None => {
                    self.dst.write_zeroes(off, len, ZeroFlags { may_unmap: true, no_fallback: false })?;
                    sh.add(|s| s.zeroed += len);
                }
                Some(compressed) => {
                    cw.write_compressed(off, &whole_unit(chunk, unit), compressed.as_deref())?;
                    sh.add(|s| s.written += len);
                }
            }
        }
        Ok(())
    }

    /// Waits until `seq` may write; false if the copy failed meanwhile.
    fn wait_turn(&self, sh: &Shared<'_>, seq: u64) -> bool {
        let mut next = sh.next_write.lock().unwrap_or_else(|p| p.into_inner());
        while *next != seq {
            if sh.failed.load(Ordering::SeqCst) {
                return false;
            }
            next = sh.write_turn.wait(next).unwrap_or_else(|p| p.into_inner());
        }
        !sh.failed.load(Ordering::SeqCst)
    }

    fn write_zero_job(&self, sh: &Shared<'_>, job: Job) -> Result<()> {
        if job.kind == JobKind::Skip || self.opts.target_zeroed {
            sh.add(|s| s.skipped += job.len);
            return Ok(());
        }
        self.dst.write_zeroes(
            self.dst_offset + job.offset,
            job.len,
            ZeroFlags { may_unmap: true, no_fallback: false },
        )?;
        sh.add(|s| s.zeroed += job.len);
        Ok(())
    }

    fn write_data(&self, sh: &Shared<'_>, job: Job, data: &[u8]) -> Result<()> {
        if self.opts.min_sparse == 0 || (!self.opts.detect_zeroes && job.kind == JobKind::Data) {
            self.dst.write_at(self.dst_offset + job.offset, &[IoSlice::new(data)])?;
            sh.add(|s| s.written += job.len);
            return Ok(());
        }
        let min = (self.opts.min_sparse / SECTOR).max(1) as usize;
        let align = (self.opts.alignment / SECTOR).max(1) as usize;
        let first_sector = (self.dst_offset + job.offset) / SECTOR;
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let (allocated, len) = if rest.len() as u64 % SECTOR != 0 || (self.dst_offset + job.offset) % SECTOR != 0 {
                // Not sector-shaped (a tail of a disk whose size is not a sector multiple): no splitting.
                (!is_zero(rest), rest.len())
            } else {
                let (a, n) = allocated_sectors_min(rest, min, first_sector + (done as u64 / SECTOR), align);
                (a, n * SECTOR as usize)
            };
            let off = self.dst_offset + job.offset + done as u64;
            if allocated {
                self.dst.write_at(off, &[IoSlice::new(&rest[..len])])?;
                sh.add(|s| s.written += len as u64);
            } else if self.opts.target_zeroed {
                sh.add(|s| s.skipped += len as u64);
            } else {
                self.dst.write_zeroes(off, len as u64, ZeroFlags { may_unmap: true, no_fallback: false })?;
                sh.add(|s| s.zeroed += len as u64);
            }
            done += len;
        }
        Ok(())
    }

    fn offload_job(&self, sh: &Shared<'_>, job: Job, buf: &mut AlignedBuf) -> Result<()> {
        let (Some(src), Some(dst)) = (&sh.src_storage, &sh.dst_storage) else {
            return Err(Error::unsupported("copy offload without storage"));
        };
        let mut done = 0;
        while done < job.len {
            let s = self.src_offset + job.offset + done;
            let d = self.dst_offset + job.offset + done;
            match src.copy_range_to(s, dst.as_ref(), d, job.len - done) {
                Some(Ok(n)) if n > 0 => done += n,
                Some(Err(e)) => return Err(e),
                _ => {
                    // Not possible here after all: copy the rest by hand and stop trying.
                    sh.offload.store(false, Ordering::Relaxed);
                    let rest = (job.len - done) as usize;
                    let data = &mut buf[..rest];
                    self.src.read_at(s, &mut [IoSliceMut::new(data)])?;
                    self.dst.write_at(d, &[IoSlice::new(data)])?;
                    sh.add(|st| {
                        st.read += rest as u64;
                        st.written += rest as u64;
                    });
                    break;
                }
            }
        }
        sh.add(|s| s.offloaded += done.min(job.len));
        Ok(())
    }
}

impl Shared<'_> {
    fn add(&self, f: impl FnOnce(&mut CopyStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// The length of the leading run of `buf` (in sectors) and whether it is data: sector runs of equal
/// zero-ness, with run ends pulled to `align`-sector boundaries so that no write is partial.
fn allocated_sectors(buf: &[u8], first_sector: u64, align: usize) -> (bool, usize) {
    let n = buf.len() / SECTOR as usize;
    if n == 0 {
        return (false, 0);
    }
    let sector = |i: usize| &buf[i * SECTOR as usize..(i + 1) * SECTOR as usize];
    let mut zero = is_zero(sector(0));
    let mut i = 1;
    while i < n && is_zero(sector(i)) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = ((first_sector + i as u64) % align as u64) as usize;
    if tail != 0 {
        if zero && i <= tail {
            // The following data would rewrite this partial block anyway.
            zero = false;
        }
        if !zero {
            i = (i + align - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// Like [`allocated_sectors`], but zero runs shorter than `min` sectors count as data.
fn allocated_sectors_min(buf: &[u8], min: usize, first_sector: u64, align: usize) -> (bool, usize) {
    let n = buf.len() / SECTOR as usize;
    let min = min.min(n);
    let (data, first) = allocated_sectors(buf, first_sector, align);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let rest = &buf[checked * SECTOR as usize..];
        let (d, len) = allocated_sectors(rest, first_sector + checked as u64, align);
        checked += len;
        if d {
            used = checked;
        } else if len >= min {
            break;
        }
    }
    (true, used)
}

/// `chunk` as a whole unit: itself, or (the disk's partial last unit) a copy padded with zeros.
fn whole_unit(chunk: &[u8], unit: u64) -> std::borrow::Cow<'_, [u8]> {
    if chunk.len() as u64 == unit {
        return std::borrow::Cow::Borrowed(chunk);
    }
    let mut full = chunk.to_vec();
    full.resize(unit as usize, 0);
    std::borrow::Cow::Owned(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(pattern: &[(bool, usize)]) -> Vec<u8> {
        let mut v = Vec::new();
        for &(data, sectors) in pattern {
            v.extend(std::iter::repeat_n(if data { 0xaa } else { 0 }, sectors * 512));
        }
        v
    }

    #[test]
    fn budget_buf_size_keeps_all_buffers_within_the_budget() {
        for workers in 1..=64 {
            let job = budget_buf_size(workers);
            assert!(job.is_power_of_two(), "{workers} workers: {job}");
            assert!((MIN_BUDGET_JOB..=DEFAULT_BUF_SIZE).contains(&job), "{workers} workers: {job}");
            if workers * MIN_BUDGET_JOB <= COPY_BUFFER_BUDGET {
                assert!(workers * job <= COPY_BUFFER_BUDGET, "{workers} workers of {job} bytes");
            }
        }
        assert_eq!(budget_buf_size(1), DEFAULT_BUF_SIZE);
        assert_eq!(budget_buf_size(2), 1 << 20);
        assert_eq!(budget_buf_size(3), 512 << 10);
        assert_eq!(budget_buf_size(8), 256 << 10);
        assert_eq!(budget_buf_size(64), MIN_BUDGET_JOB);
        assert!((2..=8).contains(&default_workers()));
    }

    #[test]
    fn zero_runs_shorter_than_min_stay_data() {
        // 1 data, 4 zero, 1 data, 16 zero sectors; min 8 sectors, alignment 1.
        let b = buf(&[(true, 1), (false, 4), (true, 1), (false, 16)]);
        assert_eq!(allocated_sectors_min(&b, 8, 0, 1), (true, 6));
        assert_eq!(allocated_sectors_min(&b[6 * 512..], 8, 6, 1), (false, 16));
    }

    #[test]
    fn run_ends_are_aligned() {
        // Data for 3 sectors then zeros; alignment 8: the data run is extended to sector 8.
        let b = buf(&[(true, 3), (false, 29)]);
        assert_eq!(allocated_sectors(&b, 0, 8), (true, 8));
        // Zeros for 10 sectors then data; alignment 8: the zero run is cut back to sector 8.
        let b = buf(&[(false, 10), (true, 6)]);
        assert_eq!(allocated_sectors(&b, 0, 8), (false, 8));
        // A short zero run before data within one block becomes data.
        let b = buf(&[(false, 2), (true, 6)]);
        assert_eq!(allocated_sectors(&b, 0, 8), (true, 8));
        assert_eq!(allocated_sectors(&buf(&[(false, 4)]), 0, 8), (false, 4));
    }
}
