//! Crash-consistency harness: recording containers, crash images built from any cut of what was
//! written, and a guest-level model that says which bytes every crash image must hold.
//!
//! How it works:
//! 1. A workload (a list of [`GuestOp`]s) runs against an image opened on [`RecordingStorage`]s
//!    (the image file, and its external data file if it has one: [`open_recording`]; with
//!    [`open_recording_chain`], its backing files too). They keep every change they receive —
//!    writes, zeroes, discards, length changes — and every flush, in one shared log ([`Event`]s
//!    tagged with the container), next to the bytes each held before the workload. The runner
//!    ([`record`]) notes where in the log each guest request started and ended, and the
//!    guest-visible content after every completed guest flush. A workload that must not change
//!    what the guest sees at all (a commit into the backing file) runs as arbitrary code instead
//!    ([`record_invariant`]), on drivers opened over the same containers ([`reopen_recording`]:
//!    the backing file read-write, say), and its one durable content is the content before it.
//! 2. [`crash_states`] enumerates crash images: every prefix of the log (a crash after any write),
//!    every prefix followed by a torn multi-sector write (only its first sector, or all but its last
//!    sector, reached the disk: 512-byte sectors are the unit a disk writes atomically), and, when
//!    asked, reordered crashes: before each flush, every container's writes up to its own last
//!    flush plus a random subset of its later ones (a disk's volatile cache may write back in any
//!    order; only a flush orders, and only its own container's writes).
//! 3. [`verify`] opens every crash image, lets a format-specific check judge its metadata (qcow2:
//!    vdisk's check and `qemu-img check` must find no corruption; leaks are allowed), and reads the
//!    whole disk back: every sector must hold what it held at the last guest flush that completed
//!    before the crash, or a value that a guest request in flight since then was writing.
//!    [`verify_with`] does the same for judges that need the cut and every container (to check a
//!    backing file on its own, and what it must hold once [`Cut::applied_before`] says its part of
//!    the work was durable).
//!
//! The model is one byte value per 512-byte sector: workloads write whole sectors, each filled with
//! one value, so any correct crash image has uniform sectors, and a sector mixing values is a torn
//! copy-on-write or a misdirected write.

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::{Arc, Mutex};

use blockdev::{BlockDriver, MemStorage, Prealloc, ResizeOptions, Result, Storage, ZeroFlags};

/// The unit a disk writes atomically, and the unit of the guest model.
pub const SECTOR: u64 = 512;

/// One change a [`RecordingStorage`] received, or a flush.
#[derive(Debug, Clone)]
pub enum Event {
    /// Bytes written at `offset`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// `[offset, offset + len)` zeroed (the container grows to cover it).
    Zeroes {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `[offset, offset + len)` discarded: zeros within the current length.
    Discard {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// The length set.
    SetLen(u64),
    /// Everything before this is durable.
    Flush,
}

impl Event {
    /// Applies the whole change to `img`.
    pub fn apply(&self, img: &mut Vec<u8>) {
        match self {
            Event::Write { offset, data } => {
                let (o, end) = (*offset as usize, *offset as usize + data.len());
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[o..end].copy_from_slice(data);
            }
            Event::Zeroes { offset, len } => {
                let (o, end) = (*offset as usize, (*offset + *len) as usize);
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[o..end].fill(0);
            }
            Event::Discard { offset, len } => {
                let end = ((*offset + *len) as usize).min(img.len());
                if (*offset as usize) < end {
                    img[*offset as usize..end].fill(0);
                }
            }
            Event::SetLen(len) => img.resize(*len as usize, 0),
            Event::Flush => {}
        }
    }

    /// The sectors a write covers (0 for anything else, which is never torn).
    fn write_sectors(&self) -> u64 {
        match self {
            Event::Write { offset, data } if !data.is_empty() => {
                (offset + data.len() as u64 - 1) / SECTOR - offset / SECTOR + 1
            }
            _ => 0,
        }
    }

    /// Applies only the first `sectors` sectors of a write (a torn write).
    fn apply_torn(&self, img: &mut Vec<u8>, sectors: u64) {
        if let Event::Write { offset, data } = self {
            let end = ((offset / SECTOR + sectors) * SECTOR).min(offset + data.len() as u64);
            Event::Write { offset: *offset, data: data[..(end - offset) as usize].to_vec() }.apply(img);
        }
    }
}

/// The log several recording containers share: each event with the index of its container.
pub type Log = Arc<Mutex<Vec<(usize, Event)>>>;

/// A [`Storage`] in memory that logs every change and flush (see the module docs). Containers of
/// one image (the image file, its external data file, and with [`open_recording_chain`] its backing
/// files) share one [`Log`], so its order is the order in which the bytes of all of them changed; a
/// flush orders only its own container's writes.
#[derive(Debug)]
pub struct RecordingStorage {
    current: MemStorage,
    initial: Vec<u8>,
    file: usize,
    log: Log,
}

impl RecordingStorage {
    /// A container holding `bytes`, named `name` (the image's path, so that relative backing file
    /// names resolve as they would for the file), with a log of its own.
    pub fn new(name: &str, bytes: Vec<u8>) -> RecordingStorage {
        RecordingStorage::sharing(Log::default(), 0, name, bytes)
    }

    /// Container number `file` recording into `log`.
    pub fn sharing(log: Log, file: usize, name: &str, bytes: Vec<u8>) -> RecordingStorage {
        RecordingStorage { current: MemStorage::new(name, bytes.clone()), initial: bytes, file, log }
    }

    /// The shared log.
    pub fn log(&self) -> Log {
        self.log.clone()
    }

    /// How many events the log holds.
    pub fn position(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The bytes before the first event.
    pub fn initial(&self) -> &[u8] {
        &self.initial
    }

    /// The container's current bytes (every event applied).
    pub fn current(&self) -> Vec<u8> {
        self.current.snapshot()
    }
}

impl Storage for RecordingStorage {
    fn len(&self) -> Result<u64> {
        self.current.len()
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.current.read_at(offset, bufs)
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        // Hold the log across the write so the log's order is the order the bytes changed in.
        let mut log = self.log.lock().unwrap();
        self.current.write_at(offset, bufs)?;
        log.push((self.file, Event::Write { offset, data: bufs.iter().flat_map(|b| b.iter().copied()).collect() }));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.current.flush()?;
        self.log.lock().unwrap().push((self.file, Event::Flush));
        Ok(())
    }

    fn set_len(&self, len: u64, prealloc: Prealloc) -> Result<()> {
        let mut log = self.log.lock().unwrap();
        self.current.set_len(len, prealloc)?;
        log.push((self.file, Event::SetLen(len)));
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let mut log = self.log.lock().unwrap();
        self.current.write_zeroes(offset, len, may_unmap)?;
        log.push((self.file, Event::Zeroes { offset, len }));
        Ok(())
    }

    fn zero_without_writing(&self, offset: u64, len: u64) -> bool {
        let mut log = self.log.lock().unwrap();
        let done = self.current.zero_without_writing(offset, len);
        if done {
            log.push((self.file, Event::Zeroes { offset, len }));
        }
        done
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut log = self.log.lock().unwrap();
        self.current.discard(offset, len)?;
        log.push((self.file, Event::Discard { offset, len }));
        Ok(())
    }

    fn data_status(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.current.data_status(offset, max_len)
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn has_zero_init(&self) -> bool {
        true
    }

    fn name(&self) -> &str {
        self.current.name()
    }

    fn protocol(&self) -> &'static str {
        "file"
    }
}

/// One guest request of a workload. Offsets and lengths are multiples of [`SECTOR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestOp {
    /// Fill `[offset, offset + len)` with `byte`.
    Write {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// The fill value.
        byte: u8,
    },
    /// Write zeroes, optionally letting the format deallocate.
    Zeroes {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// Whether the range may be unmapped.
        unmap: bool,
    },
    /// Discard (the range may then read as zeros or as the backing file).
    Discard {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// Flush: everything before it must survive any later crash.
    Flush,
    /// Grow the disk to this size.
    Grow(u64),
    /// Take an internal snapshot called `s<n>` (a flush point once it completes).
    Snapshot(u8),
    /// Delete the snapshot `s<n>` (a flush point once it completes).
    DeleteSnapshot(u8),
    /// Revert the disk to the snapshot `s<n>` (a flush point once it completes; while in flight
    /// the disk may read as before or as the snapshot).
    ApplySnapshot(u8),
}

/// The name of snapshot `n` in workloads.
pub fn snapshot_name(n: u8) -> String {
    format!("s{n}")
}

/// The guest-visible content: one value per sector, and the disk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectorModel {
    /// Disk size in bytes (a multiple of [`SECTOR`]).
    pub size: u64,
    /// The value every byte of each sector holds.
    pub sectors: Vec<u8>,
}

impl SectorModel {
    /// Reads a whole disk, which must consist of uniform sectors.
    pub fn read(drv: &(dyn BlockDriver + 'static)) -> std::result::Result<SectorModel, String> {
        let size = drv.size();
        let mut sectors = Vec::with_capacity((size / SECTOR) as usize);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            drv.read_exact_at(pos, &mut buf[..n]).map_err(|e| format!("read at {pos}: {e}"))?;
            for (i, s) in buf[..n].chunks(SECTOR as usize).enumerate() {
                if s.iter().any(|&b| b != s[0]) {
                    return Err(format!("sector at {} mixes values", pos + i as u64 * SECTOR));
                }
                sectors.push(s[0]);
            }
            pos += n as u64;
        }
        Ok(SectorModel { size, sectors })
    }
}

/// A workload's run: the log, where each request sits in it, and the content at every flush.
#[derive(Debug)]
pub struct Recorded {
    /// Each container's bytes before the workload (index 0: the image file).
    pub initial: Vec<Vec<u8>>,
    /// Every change and flush the containers received, with the container's index.
    pub events: Vec<(usize, Event)>,
    /// Each request with the log positions where it started and ended.
    pub ops: Vec<(GuestOp, usize, usize)>,
    /// For each request index that was a completed flush (and for "before the first request",
    /// index `usize::MAX`): the guest-visible content then.
    pub durable: Vec<(usize, SectorModel)>,
    /// The value discarded or newly grown sectors may reveal (the backing file's fill), if any.
    pub backing_byte: Option<u8>,
    /// The content of every snapshot the workload took, by name (snapshots never change).
    pub snapshots: Vec<(String, SectorModel)>,
}

impl Recorded {
    /// The content snapshot `name` was taken with.
    pub fn snapshot(&self, name: &str) -> Option<&SectorModel> {
        self.snapshots.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }
}

/// Runs a snapshot request of a workload.
fn snapshot_op(drv: &(dyn BlockDriver + 'static), op: GuestOp) -> blockdev::Result<()> {
    let snaps = drv.snapshots().ok_or_else(|| blockdev::Error::unsupported("no internal snapshots"))?;
    match op {
        GuestOp::Snapshot(n) => snaps.create(&snapshot_name(n), 1_700_000_000, 0),
        GuestOp::ApplySnapshot(n) => snaps.apply(&snapshot_name(n)),
        GuestOp::DeleteSnapshot(n) => snaps.delete(None, Some(&snapshot_name(n))),
        _ => Ok(()),
    }
}

/// Runs `ops` on `drv`, an image opened on the containers `files` (which share one log; the image
/// file first), then closes it (recorded as a final flush); `backing_byte` is the fill of a backing file
/// covering the whole disk, if there is one. Requests must stay inside the disk.
pub fn record(
    drv: &(dyn BlockDriver + 'static),
    files: &[Arc<RecordingStorage>],
    ops: &[GuestOp],
    backing_byte: Option<u8>,
) -> std::result::Result<Recorded, String> {
    let rec = &files[0];
    let mut durable = vec![(usize::MAX, SectorModel::read(drv)?)];
    let mut snapshots = Vec::new();
    let mut spans = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let start = rec.position();
        let r = match *op {
            GuestOp::Write { offset, len, byte } => drv.write_all_at(offset, &vec![byte; len as usize]),
            GuestOp::Zeroes { offset, len, unmap } => {
                drv.write_zeroes(offset, len, ZeroFlags { may_unmap: unmap, no_fallback: false })
            }
            GuestOp::Discard { offset, len } => drv.discard(offset, len),
            GuestOp::Flush => drv.flush(),
            GuestOp::Grow(size) => drv.resize(size, &ResizeOptions::default()),
            GuestOp::Snapshot(_) | GuestOp::DeleteSnapshot(_) | GuestOp::ApplySnapshot(_) => snapshot_op(drv, *op),
        };
        r.map_err(|e| format!("request {i} ({op:?}): {e}"))?;
        spans.push((*op, start, rec.position()));
        let flushes = matches!(
            op,
            GuestOp::Flush | GuestOp::Snapshot(_) | GuestOp::DeleteSnapshot(_) | GuestOp::ApplySnapshot(_)
        );
        if flushes {
            let now = SectorModel::read(drv)?;
            if let GuestOp::Snapshot(n) = op {
                snapshots.push((snapshot_name(*n), now.clone()));
            }
            durable.push((i, now));
        }
    }
    // A clean close ends every workload: it is a flush too (and clears lazy refcounts' dirty bit).
    let last = SectorModel::read(drv)?;
    let start = rec.position();
    drv.close().map_err(|e| format!("close: {e}"))?;
    spans.push((GuestOp::Flush, start, rec.position()));
    durable.push((ops.len(), last));
    let initial = files.iter().map(|f| f.initial().to_vec()).collect();
    let events = rec.log.lock().unwrap().clone();
    Ok(Recorded { initial, events, ops: spans, durable, backing_byte, snapshots })
}

/// Records a workload that must leave the guest-visible content unchanged at every point (a
/// commit into the backing file, say): runs `work` (which drives drivers opened on `files`, closing
/// them as it needs), and returns a [`Recorded`] with no guest requests whose one durable content
/// is `content`, so [`verify`] and [`verify_with`] demand exactly `content` of every crash image.
/// The log is taken as `work` left it; `files` must be all the containers sharing it (the image
/// file first).
pub fn record_invariant(
    files: &[Arc<RecordingStorage>],
    content: SectorModel,
    work: impl FnOnce() -> std::result::Result<(), String>,
) -> std::result::Result<Recorded, String> {
    work()?;
    let initial = files.iter().map(|f| f.initial().to_vec()).collect();
    let events = files[0].log.lock().unwrap().clone();
    Ok(Recorded {
        initial,
        events,
        ops: vec![],
        durable: vec![(usize::MAX, content)],
        backing_byte: None,
        snapshots: vec![],
    })
}

/// How a crash image was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The first `n` events reached the disk.
    Prefix(usize),
    /// The first `n` events, then only the first `sectors` sectors of event `n`.
    Torn {
        /// Events applied whole.
        n: usize,
        /// Sectors of event `n` applied.
        sectors: u64,
    },
    /// A crash before event `at` with the disk's cache written back out of order: each
    /// container's events up to its last flush before `at` reached the disk, and of its later
    /// events only those in `kept`.
    Reordered {
        /// Events from here on did not reach the disk.
        at: usize,
        /// Where the durable part ends: before `durable_end`, every container had flushed.
        durable_end: usize,
        /// Unflushed events that reached the disk anyway (indices into the log).
        kept: Vec<usize>,
    },
}

impl Cut {
    /// `(a, b)`: events before `a` reached the disk, events from `b` on did not, and those in
    /// between may have (partly).
    pub fn window(&self) -> (usize, usize) {
        match self {
            Cut::Prefix(n) => (*n, *n),
            Cut::Torn { n, .. } => (*n, n + 1),
            Cut::Reordered { at, durable_end, .. } => (*durable_end, *at),
        }
    }

    /// Whether every event of container `file` before log position `pos` reached the disk in
    /// this crash image (`events` is the log the cut was made from).
    pub fn applied_before(&self, events: &[(usize, Event)], file: usize, pos: usize) -> bool {
        match self {
            Cut::Prefix(n) | Cut::Torn { n, .. } => *n >= pos,
            Cut::Reordered { at, kept, .. } => {
                let last_flush = events[..*at].iter().rposition(|(f, e)| *f == file && matches!(e, Event::Flush));
                *at >= pos
                    && (0..pos).all(|i| {
                        events[i].0 != file || last_flush.is_some_and(|l| i < l) || kept.binary_search(&i).is_ok()
                    })
            }
        }
    }
}

/// Enumerates crash images: every prefix, the torn variants of every multi-sector write, and
/// `reorder_samples` reordered crashes before every flush (and at the end of the log) with at
/// least two unflushed events. `visit` gets the cut and each container's bytes.
pub fn crash_states(
    rec: &Recorded,
    reorder_samples: usize,
    mut visit: impl FnMut(&Cut, &[Vec<u8>]) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut imgs = rec.initial.clone();
    let events = &rec.events;
    for n in 0..=events.len() {
        visit(&Cut::Prefix(n), &imgs)?;
        if let Some((f, e)) = events.get(n) {
            let sectors = e.write_sectors();
            let mut torn_at = vec![];
            if sectors > 1 {
                torn_at.push(1);
            }
            if sectors > 2 {
                torn_at.push(sectors - 1);
            }
            for s in torn_at {
                let mut t = imgs.clone();
                e.apply_torn(&mut t[*f], s);
                visit(&Cut::Torn { n, sectors: s }, &t)?;
            }
            e.apply(&mut imgs[*f]);
        }
    }
    if reorder_samples == 0 {
        return Ok(());
    }
    let mut rng = crate::XorShift::new(0x5eed_c4a5);
    let ends = events.iter().enumerate().filter(|(_, (_, e))| matches!(e, Event::Flush)).map(|(i, _)| i);
    for at in ends.chain([events.len()]) {
        // Each container's last flush before `at`.
        let mut last_flush: Vec<Option<usize>> = vec![None; rec.initial.len()];
        for (i, (f, e)) in events[..at].iter().enumerate() {
            if matches!(e, Event::Flush) {
                last_flush[*f] = Some(i);
            }
        }
        let durable = |i: usize, f: usize| last_flush[f].is_some_and(|l| i < l);
        let unflushed: Vec<usize> = (0..at).filter(|&i| !durable(i, events[i].0)).collect();
        if unflushed.len() < 2 {
            continue;
        }
        // Containers that were written but never flushed have no durable part at all.
        let durable_end = (0..rec.initial.len())
            .filter(|f| events[..at].iter().any(|(g, _)| g == f))
            .map(|f| last_flush[f].map_or(0, |l| l + 1))
            .min()
            .unwrap_or(0);
        for _ in 0..reorder_samples {
            let kept: Vec<usize> = unflushed.iter().copied().filter(|_| rng.next() & 1 == 1).collect();
            let mut t = rec.initial.clone();
            for (i, (f, e)) in events[..at].iter().enumerate() {
                if durable(i, *f) || kept.binary_search(&i).is_ok() {
                    e.apply(&mut t[*f]);
                }
            }
            visit(&Cut::Reordered { at, durable_end, kept }, &t)?;
        }
    }
    Ok(())
}

/// What every crash image with events `window` may show: the content at the last guest flush
/// completed before `a`, plus whatever requests in flight since then were writing.
pub struct Allowed<'a> {
    base: &'a SectorModel,
    in_flight: Vec<GuestOp>,
    backing_byte: Option<u8>,
    /// The contents an apply in flight may have switched the disk to.
    applying: Vec<&'a SectorModel>,
}

impl<'a> Allowed<'a> {
    /// The expectation for a crash whose events `[0, a)` reached the disk and `[b, ..)` did not.
    pub fn new(rec: &'a Recorded, (a, b): (usize, usize)) -> Allowed<'a> {
        // The last flush request whose events all reached the disk.
        let (flush_op, base) = rec
            .durable
            .iter()
            .rev()
            .find(|(i, _)| *i == usize::MAX || rec.ops[*i].2 <= a)
            .map(|(i, m)| (*i, m))
            .expect("the initial content is always durable");
        let first = if flush_op == usize::MAX { 0 } else { flush_op + 1 };
        let in_flight: Vec<GuestOp> =
            rec.ops[first..].iter().filter(|(_, start, _)| *start < b).map(|(op, ..)| *op).collect();
        let applying = in_flight
            .iter()
            .filter_map(|op| match op {
                &GuestOp::ApplySnapshot(n) => rec.snapshot(&snapshot_name(n)),
                _ => None,
            })
            .collect();
        Allowed { base, in_flight, backing_byte: rec.backing_byte, applying }
    }

    /// Whether a disk of `size` bytes is possible.
    pub fn size_ok(&self, size: u64) -> bool {
        size == self.base.size
            || self.in_flight.contains(&GuestOp::Grow(size))
            || self.applying.iter().any(|m| m.size == size)
    }

    /// Whether sector `s` may hold `v`.
    pub fn value_ok(&self, s: u64, v: u8) -> bool {
        let pos = s * SECTOR;
        let base = self.base.sectors.get(s as usize).copied();
        if base == Some(v) || self.applying.iter().any(|m| m.sectors.get(s as usize) == Some(&v)) {
            return true;
        }
        // Beyond the durable size, a grown disk reads zeros or the backing file.
        if base.is_none() && (v == 0 || Some(v) == self.backing_byte) {
            return true;
        }
        self.in_flight.iter().any(|op| match *op {
            GuestOp::Write { offset, len, byte } => (offset..offset + len).contains(&pos) && byte == v,
            GuestOp::Zeroes { offset, len, .. } => (offset..offset + len).contains(&pos) && v == 0,
            GuestOp::Discard { offset, len } => {
                (offset..offset + len).contains(&pos) && (v == 0 || Some(v) == self.backing_byte)
            }
            GuestOp::Flush
            | GuestOp::Grow(_)
            | GuestOp::Snapshot(_)
            | GuestOp::DeleteSnapshot(_)
            | GuestOp::ApplySnapshot(_) => false,
        })
    }

    /// Checks a crash image's content against the expectation.
    pub fn check(&self, got: &SectorModel) -> std::result::Result<(), String> {
        if !self.size_ok(got.size) {
            return Err(format!("disk size {} (durable size {})", got.size, self.base.size));
        }
        for (s, &v) in got.sectors.iter().enumerate() {
            if !self.value_ok(s as u64, v) {
                return Err(format!(
                    "sector at {} reads {v:#04x}; durable value {:?}, requests in flight {:?}",
                    s as u64 * SECTOR,
                    self.base.sectors.get(s),
                    self.in_flight
                ));
            }
        }
        Ok(())
    }
}

/// Counts of what [`verify`] tested.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrashStats {
    /// Events in the log.
    pub events: usize,
    /// Prefix crash images.
    pub prefixes: usize,
    /// Torn-write crash images.
    pub torn: usize,
    /// Reordered crash images.
    pub reordered: usize,
}

impl std::fmt::Display for CrashStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events, {} crash images ({} prefixes, {} torn, {} reordered)",
            self.events,
            self.total(),
            self.prefixes,
            self.torn,
            self.reordered
        )
    }
}

impl CrashStats {
    /// All crash images.
    pub fn total(&self) -> usize {
        self.prefixes + self.torn + self.reordered
    }
}

/// Writes every crash image of `rec` (container `i` to `paths[i]`; the image file first) and runs
/// `judge` on the image; `judge` opens it, checks its metadata, and returns the content it reads.
/// The content must be allowed.
pub fn verify(
    rec: &Recorded,
    paths: &[&Path],
    reorder_samples: usize,
    mut judge: impl FnMut(&Path) -> std::result::Result<SectorModel, String>,
) -> std::result::Result<CrashStats, String> {
    verify_with(rec, paths, reorder_samples, |_, paths| judge(paths[0]))
}

/// [`verify`] for judges that need more than the image file: `judge` gets the cut (see
/// [`Cut::applied_before`]) and every container's path (`paths`, the image file first), may check
/// what it likes of any of them, and returns the image's content, which must be allowed.
pub fn verify_with(
    rec: &Recorded,
    paths: &[&Path],
    reorder_samples: usize,
    mut judge: impl FnMut(&Cut, &[&Path]) -> std::result::Result<SectorModel, String>,
) -> std::result::Result<CrashStats, String> {
    assert_eq!(paths.len(), rec.initial.len(), "a path per container");
    let mut stats = CrashStats { events: rec.events.len(), ..CrashStats::default() };
    crash_states(rec, reorder_samples, |cut, files| {
        for (path, bytes) in paths.iter().zip(files) {
            std::fs::write(path, bytes).map_err(|e| e.to_string())?;
        }
        let verdict = judge(cut, paths).and_then(|got| Allowed::new(rec, cut.window()).check(&got));
        if let Err(e) = verdict {
            return Err(format!("{cut:?}: {e}{}\nlog around the cut:\n{}", keep(paths, files), around(rec, cut)));
        }
        match cut {
            Cut::Prefix(_) => stats.prefixes += 1,
            Cut::Torn { .. } => stats.torn += 1,
            Cut::Reordered { .. } => stats.reordered += 1,
        }
        Ok(())
    })?;
    Ok(stats)
}

/// The log's events near a cut, one line each, for failure messages.
fn around(rec: &Recorded, cut: &Cut) -> String {
    let (a, b) = cut.window();
    let from = a.saturating_sub(12);
    let to = (b + 2).min(rec.events.len());
    let mut out = String::new();
    for (i, (file, e)) in rec.events.iter().enumerate().take(to).skip(from) {
        let line = match e {
            Event::Write { offset, data } => format!("write {offset:#x} +{:#x}", data.len()),
            Event::Zeroes { offset, len } => format!("zeroes {offset:#x} +{len:#x}"),
            Event::Discard { offset, len } => format!("discard {offset:#x} +{len:#x}"),
            Event::SetLen(len) => format!("set_len {len:#x}"),
            Event::Flush => "flush".to_string(),
        };
        let op = rec.ops.iter().position(|(_, start, end)| (*start..*end).contains(&i));
        out += &format!("  {i:4} file {file} {line:28} (request {op:?})\n");
    }
    out
}

/// With `VDISK_CRASH_KEEP=DIR`, saves a failing crash image's files there; returns a note saying
/// where.
fn keep(paths: &[&Path], files: &[Vec<u8>]) -> String {
    let Some(dir) = std::env::var_os("VDISK_CRASH_KEEP") else { return String::new() };
    for (path, bytes) in paths.iter().zip(files) {
        let to = Path::new(&dir).join(path.file_name().unwrap_or_default());
        if let Err(e) = std::fs::write(&to, bytes) {
            return format!(" (could not keep the crash image: {e})");
        }
    }
    format!(" (crash image kept in {})", Path::new(&dir).display())
}

/// What [`open_recording`] and [`open_recording_chain`] return: the recording containers (the
/// image file first) and the driver.
pub type RecordingOpen = (Vec<Arc<RecordingStorage>>, Arc<dyn BlockDriver>);

/// Opens `path` through `format`'s driver on a fresh [`RecordingStorage`]; the containers the
/// image refers to (an external data file) are opened as recording containers sharing its log,
/// its backing files through the registry as usual (unrecorded).
/// Returns the containers (the image file first) and the driver.
pub fn open_recording(
    reg: &formats::Registry,
    format: &str,
    path: &Path,
    opts: &blockdev::OpenOptions,
) -> Result<RecordingOpen> {
    open_recording_with(reg, format, path, opts, false)
}

/// [`open_recording`], with the backing chain recorded too: every backing image is opened through
/// its format's driver (named by the referring image: `backing_fmt` is required) on a recording
/// container sharing the log, in the order they are opened (the backing file right after the
/// image, unless the image has a data file). Open drivers on these containers again with
/// [`reopen_recording`] (the backing file read-write for a commit, say).
pub fn open_recording_chain(
    reg: &formats::Registry,
    format: &str,
    path: &Path,
    opts: &blockdev::OpenOptions,
) -> Result<RecordingOpen> {
    open_recording_with(reg, format, path, opts, true)
}

fn open_recording_with(
    reg: &formats::Registry,
    format: &str,
    path: &Path,
    opts: &blockdev::OpenOptions,
    record_backing: bool,
) -> Result<RecordingOpen> {
    let image = Arc::new(RecordingStorage::new(crate::s(path), read_file(crate::s(path))?));
    let opener =
        RecordingOpener { registry: reg, files: Mutex::new(vec![image.clone()]), record_backing, reuse_only: false };
    let drv = format_of(reg, format)?.open(image, opts, &blockdev::Chain::new(), &opener)?;
    let files = opener.files.into_inner().unwrap();
    Ok((files, drv))
}

/// Opens another driver of `format` on `files[index]`, one of the containers an
/// [`open_recording`] or [`open_recording_chain`] returned (`files`, all of them), with `opts`:
/// the backing file read-write for a commit, or the image read-write without its backing file to
/// empty it. It starts from the container's current bytes, and its changes go into the same log.
/// What the image refers to must be among `files` (found by name) and is opened on those
/// containers; anything else fails.
pub fn reopen_recording(
    reg: &formats::Registry,
    format: &str,
    files: &[Arc<RecordingStorage>],
    index: usize,
    opts: &blockdev::OpenOptions,
) -> Result<Arc<dyn BlockDriver>> {
    let opener =
        RecordingOpener { registry: reg, files: Mutex::new(files.to_vec()), record_backing: true, reuse_only: true };
    let chain = blockdev::Chain::new().enter(Path::new(files[index].name()), opts.max_chain_depth)?;
    format_of(reg, format)?.open(files[index].clone(), opts, &chain, &opener)
}

fn format_of<'a>(reg: &'a formats::Registry, format: &str) -> Result<&'a dyn blockdev::Format> {
    reg.format(format).ok_or_else(|| blockdev::Error::invalid_image(format!("no format {format}")))
}

fn read_file(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| blockdev::Error::from(e).with_path(path))
}

/// Opens referenced containers as recording containers sharing the first one's log, and
/// referenced images (backing files) through the registry, or with `record_backing` on recording
/// containers too. With `reuse_only`, references resolve to containers already in `files` only.
struct RecordingOpener<'a> {
    registry: &'a formats::Registry,
    files: Mutex<Vec<Arc<RecordingStorage>>>,
    record_backing: bool,
    reuse_only: bool,
}

impl RecordingOpener<'_> {
    /// The recording container for `path`: an existing one, or (unless `reuse_only`) a new one
    /// holding the file's bytes.
    fn container(&self, path: &str) -> Result<Arc<RecordingStorage>> {
        let mut files = self.files.lock().unwrap();
        if self.reuse_only {
            return files.iter().find(|f| f.name() == path).cloned().ok_or_else(|| {
                blockdev::Error::unsupported(format!("'{path}' is not one of the recording containers"))
            });
        }
        let log = files[0].log();
        let rec = Arc::new(RecordingStorage::sharing(log, files.len(), path, read_file(path)?));
        files.push(rec.clone());
        Ok(rec)
    }
}

impl blockdev::Opener for RecordingOpener<'_> {
    fn open_image(
        &self,
        referrer: &str,
        name: &str,
        format: Option<&str>,
        opts: &blockdev::OpenOptions,
        chain: &blockdev::Chain,
    ) -> Result<Arc<dyn BlockDriver>> {
        if !self.record_backing {
            return self.registry.open_image(referrer, name, format, opts, chain);
        }
        blockdev::check_reference(opts.references, referrer, name)?;
        let path = blockdev::resolve_reference(referrer, name);
        let format = format.ok_or_else(|| {
            blockdev::Error::unsupported(format!("recording the backing file '{path}' needs its format"))
        })?;
        let chain = chain.enter(Path::new(&path), opts.max_chain_depth)?;
        format_of(self.registry, format)?.open(self.container(&path)?, opts, &chain, self)
    }

    fn open_storage(&self, referrer: &str, name: &str, opts: &blockdev::OpenOptions) -> Result<Arc<dyn Storage>> {
        blockdev::check_reference(opts.references, referrer, name)?;
        Ok(self.container(&blockdev::resolve_reference(referrer, name))?)
    }

    fn create_storage(&self, name: &str, opts: &blockdev::options::CreateOptions) -> Result<Arc<dyn Storage>> {
        self.registry.create_storage(name, opts)
    }
}
